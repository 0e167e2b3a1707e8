"""Experiment loggers of a run: building them, naming W&B runs, a flat config, the run summary.

What a dashboard needs from a run is a short, flat config it can filter and plot by
(:func:`flat_config`: model, hidden size, lr, batch size, noise, sequence, seed, data source,
estimated parameters, loss), a readable unique name (:func:`run_name`, e.g.
``gru-h100-lr3e-3-1126-031245``), a group per sweep with its name and date (:func:`run_group`),
tags, and the best validation and the test metrics in the run summary
(:func:`finish_loggers`). The whole resolved config stays in ``checkpoints/config.yaml``.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from pathlib import Path

from omegaconf import DictConfig, open_dict

from mrflight.config import instantiate, to_plain

__all__ = ["flat_config", "run_name", "run_group", "run_tags", "build_loggers",
           "log_flat_config", "finish_loggers", "run_summary", "is_wandb",
           "choices", "read_offline_run", "eval_runs", "build_eval_loggers"]

log = logging.getLogger("mrflight")


def is_wandb(logger) -> bool:
    """Whether ``logger`` is Lightning's ``WandbLogger``."""
    return type(logger).__name__ == "WandbLogger"


def choices(hc) -> dict:
    """Hydra's chosen option per config group (``{"model": "gru", ...}``), ``{}`` without Hydra."""
    try:
        return {k: v for k, v in dict(hc.runtime.choices).items() if v is not None}
    except Exception:  # noqa: BLE001 - no Hydra context
        return {}


def _short(target: str | None) -> str | None:
    return None if not target else str(target).rsplit(".", 1)[-1]


def _model_name(cfg: DictConfig, ch: dict) -> str:
    from mrflight.models import REGISTRY

    target = _short(cfg.model.get("_target_")) if cfg.get("model") else None
    for name, cls in REGISTRY.items():
        if cls.__name__ == target:
            return name
    return ch.get("model") or (target or "model").lower()


def flat_config(cfg: DictConfig, hc=None) -> dict:
    """The run's hyperparameters as one flat dict of scalars (what a W&B panel filters by).

    Keys: ``model``, ``hidden_size`` (recurrent), ``hidden_sizes`` (ANN), ``channels`` (CNN),
    ``head_sizes`` and ``rank`` (recurrent, subspace), ``values_per_step``, ``lr``,
    ``weight_decay``, ``scheduler``, ``batch_size``, ``noise_std``
    (or ``noise_std_min``/``noise_std_max`` for a range), ``input_mode``, ``n_train``,
    ``sequence``, ``n_pulses``, ``data``, ``targets``, ``loss``, ``seed``, ``max_epochs``,
    ``experiment``, ``hparams_search``; absent values are left out.
    """
    ch = choices(hc)
    model = cfg.get("model") or {}
    module = cfg.get("module") or {}
    data = cfg.get("data") or {}
    seq = cfg.get("sequence") or {}
    out: dict = {"model": _model_name(cfg, ch)}
    for key in ("hidden_size", "num_layers", "values_per_step", "rank"):
        if model.get(key) is not None:
            out[key] = to_plain(model.get(key))
    for key in ("hidden_sizes", "channels", "head_sizes"):
        if model.get(key):
            out[key] = "x".join(str(v) for v in to_plain(model.get(key)))
    out["lr"] = module.get("lr")
    out["weight_decay"] = module.get("weight_decay")
    sched = module.get("scheduler")
    out["scheduler"] = _short(sched.get("_target_")) if sched else "none"
    out["batch_size"] = data.get("batch_size")
    noise = to_plain(data.get("noise_std"))
    if isinstance(noise, (list, tuple)):
        out["noise_std_min"], out["noise_std_max"] = float(min(noise)), float(max(noise))
    else:
        out["noise_std"] = noise
    for key in ("noise_std_min", "noise_std_max"):  # a range given as two keys
        if data.get(key) is not None:
            out[key] = to_plain(data.get(key))
    out["input_mode"] = data.get("input_mode")
    out["n_train"] = data.get("n_train")
    out["sequence"] = ch.get("sequence") or _short(seq.get("_target_"))
    out["n_pulses"] = seq.get("n_pulses")
    out["data"] = ch.get("data") or _short((data.get("params") or {}).get("_target_")
                                           if isinstance(data.get("params"), DictConfig)
                                           else None) or ("file" if data.get("path") else None)
    targets = module.get("targets") or data.get("targets") or ["t1", "t2"]
    out["targets"] = ",".join(str(t) for t in to_plain(targets))
    out["loss"] = str(module.get("loss") or "mse")
    out["seed"] = cfg.get("seed")
    out["max_epochs"] = (cfg.get("trainer") or {}).get("max_epochs")
    for group in ("experiment", "hparams_search", "debug"):
        if ch.get(group):
            out[group] = ch[group]
    return {k: v for k, v in out.items() if v is not None}


def _num(v) -> str:
    """``0.003 -> "3e-3"``, ``100 -> "100"``."""
    if isinstance(v, float) and not float(v).is_integer():
        mant, exp = f"{v:.0e}".split("e")
        return f"{mant}e{int(exp)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def run_name(flat: dict, hc=None, now: _dt.datetime | None = None) -> str:
    """``<model>-h<hidden>-lr<lr>[-n<noise>]-<MMDD-HHMMSS>[-j<job>]``, readable and unique."""
    parts = [str(flat.get("model", "run"))]
    if "hidden_size" in flat:
        parts.append(f"h{flat['hidden_size']}")
    elif "hidden_sizes" in flat:
        parts.append(f"h{flat['hidden_sizes']}")
    if flat.get("lr") is not None:
        parts.append(f"lr{_num(float(flat['lr']))}")
    if flat.get("noise_std") is not None and flat["noise_std"] != 0.01:
        parts.append(f"n{_num(float(flat['noise_std']))}")
    parts.append((now or _dt.datetime.now()).strftime("%m%d-%H%M%S"))
    try:
        if str(hc.mode) == "RunMode.MULTIRUN":
            parts.append(f"j{hc.job.num}")
    except Exception:  # noqa: BLE001 - no Hydra context
        pass
    return "-".join(parts)


def run_group(flat: dict, hc=None, now: _dt.datetime | None = None) -> str:
    """The W&B group: one per sweep (``<sweep name>-<date>-<time>``), per W&B sweep, or per
    model and day for single runs."""
    sweep_id = os.environ.get("WANDB_SWEEP_ID")
    if sweep_id:
        return f"wandb-sweep-{sweep_id}"
    now = now or _dt.datetime.now()
    try:
        multirun = str(hc.mode) == "RunMode.MULTIRUN"
    except Exception:  # noqa: BLE001
        multirun = False
    if multirun:
        name = flat.get("hparams_search") or flat.get("experiment") or "multirun"
        sweep = Path(str(hc.sweep.dir))
        # the whole folder name: two multiruns started in one second are two groups
        stamp = f"{sweep.parent.name}-{sweep.name}" if sweep.parent.name else sweep.name
        return f"{name}-{stamp}"
    return f"{flat.get('experiment') or flat.get('model', 'run')}-{now:%Y-%m-%d}"


def run_tags(flat: dict, extra=()) -> list[str]:
    tags = [flat.get("model"), f"data:{flat.get('data')}", f"seq:{flat.get('sequence')}",
            flat.get("experiment"), flat.get("hparams_search"), *(to_plain(extra) or [])]
    out = []
    for t in tags:
        if t and str(t) not in out and "None" not in str(t):
            out.append(str(t))
    return out


def _each_logger(cfg: DictConfig, wandb_args):
    """``(name, node, logger, extra)`` of every logger node of ``cfg.logger``, instantiated in
    order; a W&B node gets the keyword arguments ``wandb_args(node)``."""
    for name, node in (cfg.get("logger") or {}).items():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        extra = wandb_args(node) if "WandbLogger" in node._target_ else {}
        lg = instantiate(node, **extra)
        if is_wandb(lg):
            # Lightning passes anonymous=None, which wandb >= 0.19 warns about on every run
            getattr(lg, "_wandb_init", {}).pop("anonymous", None)
        yield name, node, lg, extra


def build_loggers(cfg: DictConfig, hc=None) -> list:
    """Instantiate ``cfg.logger``; a W&B logger gets :func:`run_name`, :func:`run_group` and
    :func:`run_tags` unless the config sets them. The values used are written back into
    ``cfg.logger.wandb`` so that the saved ``config.yaml`` records them (``eval.py`` groups
    its W&B run with the runs it evaluates)."""
    flat = None

    def wandb_args(node: DictConfig) -> dict:
        nonlocal flat
        flat = flat or flat_config(cfg, hc)
        extra = {"name": node.get("name") or run_name(flat, hc),
                 "group": node.get("group") or run_group(flat, hc),
                 "tags": run_tags(flat, node.get("tags"))}
        with open_dict(node):
            node.name, node.group, node.tags = extra["name"], extra["group"], extra["tags"]
        return extra

    loggers = []
    for name, node, lg, extra in _each_logger(cfg, wandb_args):
        loggers.append(lg)
        log.info("logger %s -> %s%s", name, node._target_,
                 f" (run {extra['name']}, group {extra['group']})" if extra else "")
    return loggers


def log_flat_config(loggers, cfg: DictConfig, hc=None) -> dict:
    """Log :func:`flat_config` as the run's hyperparameters (W&B config, CSV ``hparams.yaml``)."""
    flat = flat_config(cfg, hc)
    for lg in loggers:
        lg.log_hyperparams(flat)
    return flat


def finish_loggers(loggers, summary: dict | None = None, exit_code: int = 0) -> None:
    """Put ``summary`` (best validation, test metrics) into the W&B run summary, then finish the
    W&B run (in a multirun every job runs in one process) with the status its task ends with
    (not 0: W&B marks the run failed, not finished)."""
    if not any(is_wandb(lg) for lg in loggers):
        return
    import wandb

    if wandb.run is not None:
        if summary:
            wandb.run.summary.update({k: v for k, v in summary.items() if v is not None})
        wandb.finish(exit_code=exit_code)


def run_summary(trainer, metrics: dict) -> dict:
    """Best validation loss and epoch, final and test metrics: the W&B run summary."""
    out = {k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))}
    cb = getattr(trainer, "checkpoint_callback", None)
    if cb is not None and cb.best_model_score is not None:
        out[f"best/{cb.monitor}"] = float(cb.best_model_score)
        out["best/checkpoint"] = str(cb.best_model_path)
    out["epochs"] = int(trainer.current_epoch)
    out["global_step"] = int(trainer.global_step)
    return out


def read_offline_run(run_dir) -> dict:
    """What an offline W&B run recorded, read from its ``.wandb`` file without W&B's servers.

    Args:
        run_dir: a ``wandb/offline-run-*`` directory, its ``wandb/`` folder or the run's output
            directory (the last ``.wandb`` file found is read).

    Returns:
        ``{"name", "group", "tags", "job_type", "config": {key: value}, "summary": {...},
        "history_keys": set}``, and ``"exit_code"`` once the run is finished (values decoded
        from JSON; later updates win). A file W&B is still writing is read up to its last whole
        record.
    """
    import json
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    files = [f for pattern in ("*.wandb", "offline-run-*/*.wandb", "wandb/offline-run-*/*.wandb")
             for f in sorted(run_dir.glob(pattern))]
    if not files:
        raise ValueError(f"no .wandb file in {run_dir} (an offline W&B run directory)")
    data = files[-1].read_bytes()
    out: dict = {"config": {}, "summary": {}, "history_keys": set()}
    # A LevelDB-style log: a 7-byte file header, then 32 KiB blocks of chunks, each with a 7-byte
    # header (CRC-32 seeded with the chunk type, length, type: 1 full record, 2 first, 3 middle,
    # 4 last piece of one). W&B's service may still be writing the file (finish() can return
    # first), so reading stops at the first chunk that is cut short or fails its checksum.
    block, pos, buf = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        if len(chunk) < length or zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            break
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind not in (1, 4):  # the first or a middle piece of a longer record
            continue
        rec = pb.Record()
        rec.ParseFromString(buf)
        buf = b""
        which = rec.WhichOneof("record_type")
        if which == "run":
            out.update(name=rec.run.display_name, group=rec.run.run_group,
                       tags=list(rec.run.tags), job_type=rec.run.job_type)
        elif which == "config":
            for u in rec.config.update:
                out["config"][u.key] = json.loads(u.value_json)
        elif which == "summary":
            for u in rec.summary.update:
                if u.key:
                    out["summary"][u.key] = json.loads(u.value_json)
        elif which == "history":
            out["history_keys"] |= {u.key or "/".join(u.nested_key) for u in rec.history.item}
        elif which == "exit":
            out["exit_code"] = rec.exit.exit_code
    return out


def eval_runs(groups) -> list[dict]:
    """``[{"checkpoint", "method", "run_name", "group"}]`` of the runs an evaluation covers,
    read from the configs saved beside their checkpoints."""
    out = []
    for g in groups:
        for r in g.runs:
            wb = ((r.config or {}).get("logger") or {}).get("wandb") or {}
            out.append({"checkpoint": str(r.ckpt), "method": r.method,
                        "run_name": wb.get("name"), "group": wb.get("group")})
    return out


def build_eval_loggers(cfg: DictConfig, runs: list[dict], settings: dict | None = None,
                       now: _dt.datetime | None = None) -> list:
    """Loggers of an ``eval.py`` run, tied to the training runs it evaluates.

    The W&B run joins their group when they share one (else ``eval-<date>``), is named
    ``eval-<methods>-<MMDD-HHMMSS>``, has job type ``eval`` and a config listing the evaluated
    checkpoints and W&B run names beside the evaluation settings.
    """
    now = now or _dt.datetime.now()
    groups = {r["group"] for r in runs if r.get("group")}
    group = next(iter(groups)) if len(groups) == 1 else f"eval-{now:%Y-%m-%d}"
    methods = sorted({r["method"] for r in runs}) or ["matching"]
    name = f"eval-{'+'.join(methods)}-{now:%m%d-%H%M%S}"
    config = {"checkpoints": [r["checkpoint"] for r in runs],
              "evaluated_runs": [r["run_name"] for r in runs if r.get("run_name")],
              "evaluated_groups": sorted(groups), "methods": ",".join(methods)}
    for key in ("n_test", "noise_levels", "test_sets", "svd_rank", "complex_matching",
                "bound", "device"):
        if settings and key in settings:
            config[key] = settings[key]

    def wandb_args(node: DictConfig) -> dict:
        return {"name": node.get("name") or name, "group": node.get("group") or group,
                "job_type": "eval", "tags": run_tags({"model": "eval"},
                                                     [*methods, *(node.get("tags") or [])])}

    loggers = []
    for _, _, lg, _ in _each_logger(cfg, wandb_args):
        lg.log_hyperparams(config)
        loggers.append(lg)
    return loggers
