"""Resuming a training run: its own config, its checkpoint checked first, its logs continued.

``python train.py hydra.run.dir=RUN ckpt_path=last [overrides]`` resumes ``RUN`` from
``RUN/checkpoints/last.ckpt``:

* the config is the run's saved one (``checkpoints/config.yaml``, else ``.hydra/config.yaml``)
  with the new command-line overrides applied on top (:func:`resume_config`); overrides that
  change the model, the data or the sequence are refused with one error, since the checkpoint
  was trained for them (start a new run for that). Runtime settings (``data.cache_dir``,
  ``data.num_workers``, ``data.progress``, ``paths``) follow the new command.
* nothing of the run is written before the checkpoint has loaded into the model: Hydra's own
  ``.hydra/*.yaml`` are left as they are (:class:`mrflight.hydra_callbacks.KeepRunConfig`) and
  ``checkpoints/config.yaml`` is rewritten (with the merged config) only after the check.
* the CSV log continues: the rows of the steps the checkpoint covers are kept in
  ``csv/metrics.csv`` and the resumed epochs are appended (:func:`continue_csv_logs`).
"""

from __future__ import annotations

import csv
import logging
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from mrflight.checkpoints import (
    CHECKPOINT_DIR,
    RUN_CONFIGS,
    resume_checkpoint,
    run_config_path,
    run_dir_of,
    unstarted_run,
)
from mrflight.config import to_plain
from mrflight.errors import command
from mrflight.fileio import FINISHED

__all__ = ["resume_config", "requeued_run", "sweep_job", "started_with", "continue_csv_logs",
           "check_fits", "FIXED_NODES", "RUNTIME_DATA_KEYS"]

log = logging.getLogger("mrflight")

#: config nodes a checkpoint was trained for: a resume may not change them
FIXED_NODES = ("model", "data", "sequence")
#: single settings a resume cannot change either: the loss (``val/loss``, which picks the best
#: checkpoint and stops early, is in its unit; ``log`` changes what the network predicts)
FIXED_KEYS = ("module.loss", "module.bias_weight")
#: data settings that do not change the data (where it is cached, how it is loaded)
RUNTIME_DATA_KEYS = ("cache_dir", "num_workers", "progress", "eval_batch_size")


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def _reroot(node, old: str, new: str):
    """Every string that starts with ``old`` (the saved run's output dir) moved under ``new``."""
    if isinstance(node, dict):
        return {k: _reroot(v, old, new) for k, v in node.items()}
    if isinstance(node, list):
        return [_reroot(v, old, new) for v in node]
    if isinstance(node, str) and old and (node == old or node.startswith(old.rstrip("/") + "/")):
        return new + node[len(old.rstrip("/")):] if node != old else new
    return node


def _override_keys(overrides) -> list[tuple[str, bool]]:
    """``(key, is_delete)`` of each override; a group of global package expands to its keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mrflight.config import CONFIG_DIR

    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if o.is_delete():
            out.append((key, True))
            continue
        if o.package:  # grid@data.params=regular: the option replaces data.params
            out.append((o.package, False))
            continue
        option = CONFIG_DIR / key / f"{o.value()}.yaml" if isinstance(o.value(), str) else None
        if option is not None and option.is_file() and "_global_" in option.read_text()[:200]:
            node = to_plain(OmegaConf.load(option), resolve=False)
            for d in node.pop("defaults", None) or []:  # override /model: gru ...
                if isinstance(d, dict):
                    out += [(str(g).split()[-1].lstrip("/"), False) for g in d]
            node.pop("hydra", None)
            out += [(k, False) for k in _flat(node) if k]
        else:
            out.append((key, False))
    return out


def requeued_run(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``ckpt_path=last`` when this is a job Slurm requeued (``SLURM_RESTART_COUNT``
    above 0: preempted, or timed out under the submitit launcher's ``max_num_timeout``) into the
    folder of the run it had started: the job comes back with its first overrides, and its run
    resumes (or starts again, :func:`mrflight.checkpoints.unstarted_run`) instead of the folder
    being refused as another run's. A job that continues another run (``ckpt_path=B``) goes on
    from its own ``last.ckpt`` once it has one, instead of from ``B`` again. A run that has
    finished (its ``metrics.json``) is not resumed: its folder is refused as any other run's,
    its results kept (a shell that inherited the variable starts no resume). Anything else is
    returned as it is."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "")
    if not cfg.get("train", True) or not restarts.isdigit() or int(restarts) == 0:
        return cfg
    out = Path(str(cfg.paths.output_dir))
    if not (out / RUN_CONFIGS[0]).is_file():
        return cfg  # nothing of the run was saved (Hydra's .hydra/ is): it starts as a new run
    if (out / FINISHED).is_file():  # resuming would test again and rewrite its metrics.json
        log.warning("SLURM_RESTART_COUNT=%s, but the run in %s has finished (%s): it is not "
                    "resumed", restarts, out, FINISHED)
        return cfg
    given = cfg.get("ckpt_path")
    if given is not None and not _own_progress(out, given):
        return cfg
    log.warning("requeued job (SLURM_RESTART_COUNT=%s): its run in %s goes on from its last "
                "checkpoint (ckpt_path=last)", restarts, cfg.paths.output_dir)
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.ckpt_path = "last"
    return cfg


def sweep_job(cfg: DictConfig, job, overrides=()) -> tuple[DictConfig, dict | None]:
    """A job of a multirun given ``ckpt_path=last`` (an interrupted sweep run again with its
    command, ``hydra.sweep.dir=S`` and ``ckpt_path=last``): ``(cfg, None)`` with ``ckpt_path``
    dropped for a job that has no run in its folder yet (the sweep stopped before it, or before
    it saved its config): it starts from the beginning; ``(cfg, metrics)`` for a job whose run
    has finished (its ``metrics.json``) with the settings the job's ``overrides`` give and that
    the command does not give more epochs: it is kept as it is, not trained again, and
    ``metrics`` is what it recorded (a finished run with other settings, an Optuna trial drawn
    anew, is refused). Every other job (a run interrupted in its folder) resumes as a single
    run does. Returns ``(cfg, None)`` unchanged where ``ckpt_path`` is not ``last``."""
    import json

    if str(cfg.get("ckpt_path")) != "last" or not cfg.get("train", True):
        return cfg, None
    out = Path(str(cfg.paths.output_dir))
    if (out / FINISHED).is_file() and (out / RUN_CONFIGS[0]).is_file():
        saved = OmegaConf.load(out / RUN_CONFIGS[0])
        done = OmegaConf.select(saved, "trainer.max_epochs", default=None)
        wanted = OmegaConf.select(cfg, "trainer.max_epochs", default=None)
        if isinstance(done, int) and isinstance(wanted, int) and wanted > done:
            return cfg, None  # trained further, as a single run
        changed = _changed_settings(saved, cfg, overrides)
        if changed:
            raise ValueError(f"job {job}: {out} holds a finished run with other settings "
                             f"({'; '.join(changed)}): a sweep goes on with ckpt_path=last only "
                             f"with the command that started it (an Optuna sweep draws its "
                             f"trials anew): start this one in a new hydra.sweep.dir")
        log.info("job %s: its run in %s has finished (%s): kept as it is, not trained again",
                 job, out, FINISHED)
        return cfg, json.loads((out / FINISHED).read_text())
    if not (out / RUN_CONFIGS[0]).is_file() and not (out / CHECKPOINT_DIR / "last.ckpt").is_file():
        log.info("job %s: no run in %s yet: it starts from the beginning", job, out)
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.ckpt_path = None
    return cfg, None


def _changed_settings(saved: DictConfig, cfg: DictConfig, overrides) -> list[str]:
    """``"key: saved -> new"`` for each key the command-line ``overrides`` set (``hydra.*``,
    ``paths`` and ``ckpt_path`` left out) whose value in ``cfg`` differs from the saved run's."""
    changed = []
    for key, delete in _override_keys(overrides):
        if delete or key.split(".")[0] in ("hydra", "paths", "ckpt_path"):
            continue
        old, new = (to_plain(OmegaConf.select(c, key, default=None)) for c in (saved, cfg))
        if old != new:
            changed.append(f"{key}: {old} -> {new}")
    return changed


def started_with(out: Path, given) -> bool:
    """Whether the run in folder ``out`` is an unfinished earlier try of a command with
    ``ckpt_path=given`` (its saved config names that checkpoint; no ``metrics.json``): a job
    restarted after a crash or requeued, continuing another run's checkpoint."""
    if (out / FINISHED).is_file() or not (out / RUN_CONFIGS[0]).is_file():
        return False
    try:
        saved = OmegaConf.load(out / RUN_CONFIGS[0]).get("ckpt_path")
    except Exception:  # noqa: BLE001 - an unreadable config is no earlier try of this job
        return False
    return str(saved) == str(given)


def _own_progress(out: Path, given) -> bool:
    """The folder of a job started with ``ckpt_path=given`` (another run's checkpoint) has a
    ``last.ckpt`` of its own: the job's progress since, to go on from."""
    return (str(given) != "last" and (out / CHECKPOINT_DIR / "last.ckpt").is_file()
            and started_with(out, given))


def resume_config(cfg: DictConfig, overrides=None) -> tuple[DictConfig, tuple | None]:
    """The config of a resumed run and its checkpoint.

    Args:
        cfg: the composed config (defaults plus ``overrides``), with ``ckpt_path`` set.
        overrides: the command-line overrides (Hydra's ``overrides.task``). ``None`` (a config
            composed in Python): ``cfg`` is used as given and only checked against the run's.

    Returns:
        ``(config, (checkpoint path, checkpoint dict))``; ``(cfg, None)`` when not resuming;
        ``(config, None)`` for ``ckpt_path=last`` in a run folder whose run stopped before its
        first checkpoint (:func:`mrflight.checkpoints.unstarted_run`): it starts again with its
        saved config.

    Raises:
        ValueError: the checkpoint is missing or does not load, or the overrides change the
            model, data or sequence the checkpoint was trained with.
    """
    if not cfg.get("train", True):
        if cfg.get("ckpt_path") is not None:
            raise ValueError(f"train=false tests the network's initial (seeded) weights and "
                             f"reads no checkpoint, but ckpt_path={cfg.ckpt_path} is given: to "
                             f"test a trained run use {command('eval')} ckpt_path=RUN; to resume "
                             "it leave out train=false")
        return cfg, None
    restart = unstarted_run(cfg.get("ckpt_path"), cfg.paths.output_dir)
    found = None if restart else resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.output_dir)
    if found is None and restart is None:
        return cfg, None
    path = found[0] if found else restart
    saved_file = run_config_path(restart or run_dir_of(path))
    if saved_file is None:
        log.warning("no saved config beside %s: resuming with the given config", path)
        return cfg, found
    saved = to_plain(OmegaConf.load(saved_file), resolve=False)
    old_out = str((saved.get("paths") or {}).get("output_dir") or "")
    saved = OmegaConf.create(_reroot(saved, old_out, str(cfg.paths.output_dir)))
    merged = cfg.copy() if overrides is None else _with_overrides(saved, cfg, overrides)
    _check_saved_targets(merged, cfg, saved_file)
    if overrides is not None:
        _schedule_spans_the_run(saved, merged, overrides)
    with open_dict(merged):
        for k in RUNTIME_DATA_KEYS:
            if merged.get("data") is not None and cfg.get("data") is not None \
                    and k in cfg.data:
                merged.data[k] = cfg.data[k]
    changed = _fixed_node_changes(saved, merged)
    if changed:
        shown = "; ".join(changed[:6]) + (f"; ... ({len(changed)} in all)"
                                           if len(changed) > 6 else "")
        raise ValueError(
            f"ckpt_path={cfg.get('ckpt_path')} resumes {path} with the config it was trained "
            f"with ({saved_file}), but these settings differ: {shown}. A checkpoint cannot "
            "change its model, data, sequence or loss: drop those overrides, or start a new run "
            "(another hydra.run.dir) without ckpt_path")
    if found is not None:
        _check_not_finished(cfg, found, merged)
    if restart:
        log.warning("ckpt_path=last: the run in %s stopped before its first epoch ended (no "
                    "checkpoint yet): it starts again from the beginning with its config", path)
    return merged, found


def _targets(node, key: str = ""):
    """``(dotted key, _target_)`` of every node of a plain config that names one."""
    if isinstance(node, dict):
        if node.get("_target_") is not None:
            yield key or "<root>", str(node["_target_"])
        for k, v in node.items():
            yield from _targets(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _targets(v, f"{key}[{i}]")


def shipped_targets() -> frozenset[str]:
    """Every ``_target_`` that mrflight's own config files name."""
    import re

    from mrflight.config import _MOVED, CONFIG_DIR

    found = set(_MOVED)
    for f in CONFIG_DIR.rglob("*.yaml"):
        found |= set(re.findall(r"^\s*_target_:\s*([\w.]+)\s*(?:#.*)?$", f.read_text(),
                                flags=re.M))
    return frozenset(found)


def _check_saved_targets(merged: DictConfig, cfg: DictConfig, saved_file) -> None:
    """A run folder may come from anywhere (``ckpt_path=`` takes any run, and a copied run
    resumes with ``hydra.run.dir=RUN ckpt_path=last``): the resumed config builds only the
    ``_target_``s of mrflight's config files and those the command's own config names
    (``+callbacks.x._target_=...`` given again), and schedulers of
    ``torch.optim.lr_scheduler`` (built by :func:`mrflight.checkpoints.scheduler_class`).

    Raises:
        ValueError: the saved config names another ``_target_``.
    """
    from mrflight.checkpoints import scheduler_class

    allowed = shipped_targets() | {t for _, t in _targets(to_plain(cfg, resolve=False))}
    for key, target in _targets(to_plain(merged, resolve=False)):
        if target in allowed:
            continue
        if key == "module.scheduler":
            try:
                scheduler_class(target)
                continue
            except ValueError:
                pass
        raise ValueError(f"{saved_file}: {key} names {target!r}, which neither mrflight's "
                         "configs nor this command's name: a resumed run builds only those "
                         f"(give {key}._target_={target} on the command line if you trust "
                         "it)")


def _with_overrides(saved: DictConfig, cfg: DictConfig, overrides) -> DictConfig:
    """The saved run config with the keys the command-line ``overrides`` set (or delete) taken
    from ``cfg``, and the new command's ``paths`` and ``ckpt_path``."""
    merged = saved.copy()
    for key, delete in _override_keys(overrides):
        if delete:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(merged, parent) if parent else merged
            if isinstance(node, DictConfig) and leaf in node:
                with open_dict(node):
                    del node[leaf]
            continue
        value = to_plain(OmegaConf.select(cfg, key, default=None), resolve=False)
        with open_dict(merged):
            OmegaConf.update(merged, key, value, merge=False, force_add=True)
    with open_dict(merged):
        merged.paths = to_plain(cfg.paths)
        merged.ckpt_path = cfg.get("ckpt_path")
    return merged


def _schedule_spans_the_run(saved: DictConfig, merged: DictConfig, overrides) -> None:
    """A schedule that spanned the saved run (``module.scheduler.T_max`` equal to its
    ``trainer.max_epochs``: the default ``T_max: ${trainer.max_epochs}``, saved resolved) spans
    the resumed run's new ``trainer.max_epochs`` too, unless the command sets the scheduler
    itself. The cosine schedule goes on from the learning rate the run has reached and ends at
    its ``eta_min`` with the new last epoch (instead of rising again past the old ``T_max``)."""
    old = OmegaConf.select(saved, "trainer.max_epochs", default=None)
    new = OmegaConf.select(merged, "trainer.max_epochs", default=None)
    sched = OmegaConf.select(merged, "module.scheduler", default=None)
    set_here = any(k in ("module", "module.scheduler") or k.startswith("module.scheduler.")
                   for k, _ in _override_keys(overrides))
    if (old == new or set_here or not isinstance(sched, DictConfig) or "T_max" not in sched
            or OmegaConf.select(saved, "module.scheduler.T_max", default=None) != old):
        return
    if not isinstance(new, int) or new <= 0:
        raise ValueError(f"trainer.max_epochs={new} leaves the learning-rate schedule, whose "
                         f"T_max follows it (it was {old}), without an end: give a number of "
                         "epochs, or module.scheduler.T_max=N as well")
    with open_dict(merged):
        merged.module.scheduler.T_max = new
    log.info("resumed with trainer.max_epochs=%s (was %s): the learning-rate schedule's T_max "
             "follows it", new, old)


def _check_not_finished(cfg: DictConfig, found: tuple, merged: DictConfig) -> None:
    """Refuse to resume, into the folder of its results, a run that has finished its epochs
    (or its ``trainer.max_steps``): there is nothing to train, and its ``metrics.json`` would be
    rewritten by a test alone (without the training and validation metrics)."""
    out = Path(str(cfg.paths.output_dir))
    if not (out / FINISHED).is_file():
        return
    for key, done, unit, option in (
            ("max_epochs", int(found[1].get("epoch", -1)) + 1, "epoch(s)", "trainer.max_epochs"),
            # not a key of the trainer configs: given with +
            ("max_steps", int(found[1].get("global_step", 0)), "step(s)", "+trainer.max_steps")):
        limit = OmegaConf.select(merged, f"trainer.{key}", default=None)
        if isinstance(limit, int) and 0 <= limit <= done:
            raise ValueError(f"ckpt_path={cfg.get('ckpt_path')}: the run in {out} has finished "
                             f"its {done} {unit} ({FINISHED}): to train it further raise "
                             f"{option} above {done}"
                             f"{' (-1: no limit)' if key == 'max_steps' else ''}; to evaluate "
                             f"it use {command('eval')} ckpt_path={out}")


def _fixed_node_changes(saved: DictConfig, merged: DictConfig) -> list[str]:
    """``"node.key: old -> new"`` for every setting of :data:`FIXED_NODES` and
    :data:`FIXED_KEYS` that differs (a changed ``_target_`` alone where the class differs;
    runtime data keys ignored)."""
    changed = []
    for node in FIXED_NODES:
        a = _flat(to_plain(OmegaConf.select(saved, node, default=None)) or {})
        b = _flat(to_plain(OmegaConf.select(merged, node, default=None)) or {})
        keys = sorted(set(a) | set(b))
        if a.get("_target_") != b.get("_target_"):
            keys = ["_target_"]  # another class: its arguments differ as a consequence
        for k in keys:
            if node == "data" and k.split(".")[0] in RUNTIME_DATA_KEYS:
                continue
            if a.get(k, "<unset>") != b.get(k, "<unset>"):
                changed.append(f"{node}.{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}")
    for key in FIXED_KEYS:
        a, b = (OmegaConf.select(c, key, default="<unset>") for c in (saved, merged))
        if a != b:
            changed.append(f"{key}: {a!r} -> {b!r}")
    return changed


def check_fits(module, found) -> None:
    """Load the checkpoint's weights into ``module`` (strict): it fits before anything is written.

    Raises:
        ValueError: the weights do not fit the configured network.
    """
    from mrflight.checkpoints import state_dict_mismatch

    path, ck = found
    try:
        module.load_state_dict(ck["state_dict"], strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit the configured model "
                         f"({state_dict_mismatch(e)}): resume with the config the run was "
                         "trained with") from None


def continue_csv_logs(loggers, found) -> None:
    """Keep the CSV rows of the steps ``found``'s checkpoint covers; the resumed run appends.

    Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts. Rows logged at
    steps before the checkpoint's ``global_step`` (its finished epochs) are written back, and the
    logger appends the resumed epochs to them. Rows after the checkpoint (an interrupted epoch,
    which is trained again) and test rows are dropped.
    """
    if found is None:
        return
    from lightning.pytorch.loggers import CSVLogger

    from mrflight.fileio import atomic_path

    step_done = int(found[1].get("global_step", 0))
    epoch_done = int(found[1].get("epoch", 0))
    for lg in loggers:
        if not isinstance(lg, CSVLogger):
            continue
        metrics = Path(lg.log_dir) / "metrics.csv"
        if not metrics.is_file():
            continue
        with open(metrics, newline="") as f:
            reader = csv.DictReader(f)
            header = sorted(reader.fieldnames or [])
            rows = [r for r in reader if _keep(r, step_done, epoch_done)]
        with warnings.catch_warnings():  # "previous log files will be deleted": not these
            warnings.filterwarnings("ignore", message=".*Previous log files.*")
            writer = lg.experiment  # Lightning's writer: it removes metrics.csv here
        with atomic_path(metrics) as tmp, open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)
        writer.metrics_keys = header
        log.info("resumed CSV log %s: kept %d rows of steps < %d", metrics, len(rows), step_done)


def _keep(row: dict, step_done: int, epoch_done: int) -> bool:
    try:
        step = int(float(row.get("step") or 0))
        epoch = int(float(row["epoch"])) if row.get("epoch") else 0
    except ValueError:
        return False
    is_test = any(k.startswith("test/") and v not in ("", None) for k, v in row.items())
    return step < step_done and epoch <= epoch_done and not is_test
