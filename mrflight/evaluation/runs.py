"""The checkpoints an evaluation covers: each loaded with its run's saved config (sequence and
data split, see :func:`mrflight.checkpoints.read_run_config`) and grouped by what they share."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from mrflight.config import instantiate
from mrflight.evaluation.settings import EvalSettings
from mrflight.evaluation.testdata import Group, data_key

__all__ = ["Run", "checkpoint_groups", "matching_group", "method_of"]

log = logging.getLogger("mrflight")


@dataclass
class Run:
    """One evaluated checkpoint.

    Attributes:
        ckpt: the checkpoint file.
        config: the run's saved config (``None`` without one); the eval loggers read the W&B
            name and group of the run from it.
        module: the loaded LightningModule.
        method: ``lstm``, ``gru``, ``ann``, ``cnn`` (:func:`method_of`).
        label: the run directory relative to the evaluated ``ckpt_path`` (``""`` for itself).
    """

    ckpt: Path
    config: dict | None
    module: object = None
    method: str = ""
    label: str = ""


def method_of(module) -> str:
    """The registry name of a module's network (``gru`` ...), else its class name."""
    from mrflight.models import REGISTRY

    target = str((module.hparams.get("net") or {}).get("_target_", ""))
    cls = target.rsplit(".", 1)[-1]
    for key, c in REGISTRY.items():
        if c.__name__ == cls or isinstance(getattr(module, "net", None), c):
            return key
    return cls.lower() or "network"


def _load_run(ck: Path, root: Path, device, default_sequence, cache_dir):
    """``(run, sequence, data config)`` of a checkpoint: the sequence of the run's saved config,
    else the checkpoint's, else ``default_sequence()``; the saved data config (an unresolved
    ``cache_dir`` falls back to ``cache_dir``), else ``None``."""
    import mrflight
    from mrflight.checkpoints import checkpoint_sequence, read_run_config

    run_dir, rcfg = read_run_config(ck)
    module = mrflight.load_checkpoint(str(ck), map_location=device)
    if rcfg is not None and rcfg.get("sequence"):
        from omegaconf import OmegaConf

        seq = instantiate(OmegaConf.create(rcfg["sequence"]))
    else:
        seq = checkpoint_sequence(module) or default_sequence()
    data_cfg = None
    if rcfg is not None and rcfg.get("data"):
        # the saved config is resolved; an unresolved cache_dir falls back to ours
        data_cfg = dict(rcfg["data"])
        if "${" in str(data_cfg.get("cache_dir", "")):
            data_cfg["cache_dir"] = str(cache_dir) if cache_dir else None
    else:
        log.warning("no config.yaml beside %s: using the eval grid and split", ck)
    rel = run_dir.relative_to(root) if run_dir.is_relative_to(root) else run_dir
    run = Run(ck, rcfg, module, method_of(module), "" if str(rel) == "." else str(rel))
    return run, seq, data_cfg


def checkpoint_groups(ckpts: list[Path], root: Path, settings: EvalSettings, default_sequence,
                      cache_dir=None) -> list[Group]:
    """The checkpoints ``ckpts`` found under ``root``, loaded (on ``settings.device``) and
    grouped by sequence, data config and split.

    Args:
        default_sequence: a callable giving the sequence of a run that records none.
        cache_dir: the dictionary cache of a run whose saved ``cache_dir`` is unresolved.
    """
    groups: dict[str, Group] = {}
    for ck in ckpts:
        run, seq, data_cfg = _load_run(ck, root, settings.device, default_sequence, cache_dir)
        key = data_key(seq, data_cfg, settings.split_seed)
        groups.setdefault(key, Group(seq, key, [], data_cfg)).runs.append(run)
    return list(groups.values())


def matching_group(seq, settings: EvalSettings) -> Group:
    """The group without checkpoints: matching and the bound on the eval grid."""
    return Group(seq, data_key(seq, None, settings.split_seed), [])
