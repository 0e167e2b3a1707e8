"""The checkpoints an evaluation covers: each loaded with the sequence stored in it and its
run's saved config (data split, see :func:`mrflight.checkpoints.read_run_config`), and grouped
by what they share."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
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
        overrides: the command-line overrides the run was trained with (Hydra's
            ``.hydra/overrides.yaml``; none without it): what tells the runs of a sweep apart.
    """

    ckpt: Path
    config: dict | None
    module: object = None
    method: str = ""
    label: str = ""
    overrides: list = field(default_factory=list)

    def summary(self, group: int = 0) -> dict:
        """What ``metrics.json``'s ``info.runs`` says of the run: its row's name, checkpoint,
        training noise and overrides."""
        noise = (getattr(self.module, "hparams", None) or {}).get("noise_std")
        return {"method": self.method, "run": self.label, "group": group,
                "checkpoint": str(self.ckpt), "training_noise_std": noise,
                "overrides": list(self.overrides)}


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
    """``(run, sequence, data config, note)`` of a checkpoint: the sequence of
    :func:`_run_sequence` (and its note); the saved data config (an unresolved ``cache_dir``
    falls back to ``cache_dir``), else ``None``."""
    import mrflight
    from mrflight.checkpoints import read_run_config

    run_dir, rcfg = read_run_config(ck)
    module = mrflight.load_checkpoint(str(ck), map_location=device)
    seq, note = _run_sequence(module, rcfg, default_sequence)
    data_cfg = None
    if rcfg is not None and rcfg.get("data"):
        # the saved config is resolved; an unresolved cache_dir falls back to ours
        data_cfg = dict(rcfg["data"])
        if "${" in str(data_cfg.get("cache_dir", "")):
            data_cfg["cache_dir"] = str(cache_dir) if cache_dir else None
    else:
        log.warning("no config.yaml beside %s: using the eval grid and split", ck)
    rel = run_dir.relative_to(root) if run_dir.is_relative_to(root) else run_dir
    run = Run(ck, rcfg, module, method_of(module), "" if str(rel) == "." else str(rel),
              _overrides(run_dir))
    return run, seq, data_cfg, note


def _overrides(run_dir: Path) -> list[str]:
    """The run's command-line overrides (``.hydra/overrides.yaml``), or ``[]``."""
    import yaml

    try:
        found = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return []
    return [str(o) for o in found] if isinstance(found, list) else []


def _run_sequence(module, rcfg: dict | None, default_sequence):
    """``(sequence, note)``: the sequence stored in the checkpoint (the one its network was
    trained on), else that of the run's saved config, else ``default_sequence()``. ``note`` says
    how the saved config's sequence setting differs from the checkpoint's (a schedule file
    edited or moved since training), else ``None``."""
    from omegaconf import OmegaConf

    from mrflight.checkpoints import checkpoint_sequence

    stored = checkpoint_sequence(module)
    node = rcfg.get("sequence") if rcfg is not None else None
    if not node:
        return stored or default_sequence(), None
    if stored is None:
        return instantiate(OmegaConf.create(node)), None
    setting = (f"sequence.path={node['path']}" if node.get("path")
               else f"sequence ({node.get('_target_', '?')})")
    try:
        built = instantiate(OmegaConf.create(node))
    except Exception as e:  # noqa: BLE001 - a file moved or edited: the checkpoint's is the truth
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return stored, f"{setting} of the run's config no longer builds ({first})"
    if built == stored:
        return stored, None
    a, b = stored.to_dict(), built.to_dict()
    changed = [k for k in a if k != "name" and a[k] != b[k]]
    return stored, (f"{setting} of the run's config now gives another sequence than the "
                    f"network was trained on ({', '.join(changed)} differ)")


def checkpoint_groups(ckpts: list[Path], root: Path, settings: EvalSettings, default_sequence,
                      cache_dir=None, unloadable: dict | None = None) -> list[Group]:
    """The checkpoints ``ckpts`` found under ``root``, loaded (on ``settings.device``) and
    grouped by sequence (:func:`_run_sequence`; one warning per saved sequence setting that
    differs from the checkpoints'), data config and split.

    Args:
        default_sequence: a callable giving the sequence of a run that records none.
        cache_dir: the dictionary cache of a run whose saved ``cache_dir`` is unresolved.
        unloadable: where given, a checkpoint that does not load (a ``ValueError`` of
            :func:`mrflight.load_checkpoint` or of its run's saved config, or an unreadable
            config) is added to it, ``{file: error}``
            (:func:`mrflight.checkpoints.run_notes`), instead of raising, and the run's next
            checkpoint in rank order that loads is evaluated in its place (none: the run is
            left out).
    """
    import yaml

    groups: dict[str, Group] = {}
    notes: dict[str, list[Path]] = {}
    for best in ckpts:
        loaded, queue = None, [best]
        while queue and loaded is None:
            ck = queue.pop(0)
            try:
                loaded = _load_run(ck, root, settings.device, default_sequence, cache_dir)
            except (ValueError, OSError, yaml.YAMLError) as e:
                if unloadable is None:
                    raise
                unloadable[ck] = str(e) or type(e).__name__
                if ck == best:  # the run's others are read only once its best has failed
                    queue = _fallbacks(ck, unloadable)
        if loaded is None:
            continue
        run, seq, data_cfg, note = loaded
        if note:
            notes.setdefault(note, []).append(ck)
        key = data_key(seq, data_cfg, settings.split_seed)
        groups.setdefault(key, Group(seq, key, [], data_cfg)).runs.append(run)
    for note, cks in notes.items():  # once per setting, not per run of a sweep
        log.warning("%s: evaluating %s with the sequence stored in the checkpoint instead",
                    note, cks[0] if len(cks) == 1 else f"{len(cks)} checkpoints ({cks[0]}, ...)")
    return list(groups.values())


def _fallbacks(ck: Path, unloadable: dict) -> list[Path]:
    """The next checkpoints to try when ``ck``, its run's best, does not load as a network (NaN
    weights, a state dict that does not fit): the run's others in rank order
    (:func:`mrflight.checkpoints.ranked_checkpoints`), those known not to load left out."""
    from mrflight.checkpoints import ranked_checkpoints

    try:
        ranked = ranked_checkpoints(ck.parent, warn=False)
    except ValueError:
        return []
    return [c for c in ranked if c != ck and c not in unloadable]


def matching_group(seq, settings: EvalSettings) -> Group:
    """The group without checkpoints: matching and the bound on the eval grid."""
    return Group(seq, data_key(seq, None, settings.split_seed), [])
