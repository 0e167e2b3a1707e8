"""Config glue: the one place where Hydra/OmegaConf nodes become objects and plain values.

* :func:`instantiate`: ``hydra.utils.instantiate`` that re-raises a constructor's ``ValueError``
  as itself (so a bad value reads as one line) and follows renamed ``_target_`` paths of configs
  saved by earlier versions.
* :func:`to_plain`: OmegaConf containers (also nested in mappings) -> plain Python.
* :func:`compose_config`: compose ``mrflight/configs/<name>.yaml`` outside a Hydra run.
* :func:`hydra_config`: the running Hydra config, or None.

Checkpoints are different: :func:`mrflight.load_checkpoint` never instantiates a ``_target_``
(untrusted files); it builds only registered networks and schedulers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

__all__ = ["CONFIG_DIR", "instantiate", "to_plain", "compose_config", "hydra_config"]

#: the configs shipped with the package (``train.py``/``eval.py`` read the same folder)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: ``_target_`` paths renamed since a run could have saved its config (old -> new)
_MOVED = {"mrflight.lit.MRFRegressor": "mrflight.regressor.MRFRegressor",
          "mrflight.physics.sequence.from_file": "mrflight.sequence_files.from_file"}


def to_plain(obj, resolve: bool = True):
    """OmegaConf containers -> plain dicts/lists (resolved); mappings converted item by item."""
    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=resolve)
    if isinstance(obj, Mapping):
        return {k: to_plain(v, resolve) for k, v in obj.items()}
    return obj


def _moved(node):
    target = node.get("_target_") if isinstance(node, (Mapping, DictConfig)) else None
    if target not in _MOVED:
        return node
    if isinstance(node, DictConfig):
        node = node.copy()
        with open_dict(node):
            node._target_ = _MOVED[target]
        return node
    return {**node, "_target_": _MOVED[target]}


def instantiate(node, **kwargs):
    """``hydra.utils.instantiate(node, **kwargs)``; a constructor's ValueError is raised as is,
    and a setting the constructor does not take becomes a ValueError naming it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(_moved(node), **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, ValueError):
            raise cause from None
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(cause or ""))
        if isinstance(cause, TypeError) and unknown:
            # Hydra names the failing node in its message ("full_key: data.params"), and the
            # failing target ("Error in call to target '...'"): a nested node (data.params) is
            # not the node instantiated (data)
            nested = re.search(r"full_key: ([\w.]+)", str(e))
            called = re.search(r"Error in call to target '([\w.]+)'", str(e))
            where = (getattr(e, "full_key", "") or (nested.group(1) if nested else "")
                     or _node_key(node))
            key = ".".join(k for k in (where, unknown.group(1)) if k)
            target = called.group(1) if called else node.get("_target_")
            raise ValueError(f"{key} is not a setting of {target}: remove it "
                             f"(~{key} on the command line){_setting_hint(key)}") from None
        raise


def _setting_hint(key: str) -> str:
    """Where a setting its constructor does not take usually comes from."""
    if key in ("sequence.n_pulses", "sequence.lobe_length"):
        return ("; debug=tiny sets sequence.n_pulses and sequence.lobe_length, which only "
                "sequence=oksuz2019 takes: with another sequence add ~sequence.n_pulses "
                "~sequence.lobe_length")
    if key == "data.targets":
        return ("; stored data (data=random, paper, file) trains T1 and T2 only, also on a "
                "dictionary with a B1 column: data=simulated estimates B1")
    if key.startswith("data.params."):
        return ("; debug=tiny sets data.params to 600 random atoms (random_params), merged "
                "into the grid chosen with grid@data.params: use one or the other")
    return ""


def _node_key(node) -> str:
    """The dotted key of a config node within its config (``""`` for a plain dict)."""
    try:
        return str(node._get_full_key("")) if isinstance(node, DictConfig) else ""
    except Exception:  # noqa: BLE001 - OmegaConf internals: the name is a courtesy
        return ""


def hydra_config():
    """The running Hydra config (``HydraConfig.get()``), or None outside a Hydra run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get() if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - no Hydra context
        return None


def compose_config(overrides=(), output_dir=None, config_name: str = "train",
                   return_hydra_config: bool = False) -> DictConfig:
    """Compose ``mrflight/configs/<config_name>.yaml`` outside a Hydra run (tests, notebooks).

    Args:
        overrides: Hydra overrides, e.g. ``["model=lstm", "debug=tiny"]``.
        output_dir: sets ``paths.output_dir`` (which otherwise needs a Hydra run).
        config_name: ``"train"`` or ``"eval"``.
        return_hydra_config: keep the ``hydra`` node (launchers, sweepers).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides),
                      return_hydra_config=return_hydra_config)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
    return cfg
