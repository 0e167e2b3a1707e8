"""``train(cfg)`` and ``evaluate(cfg)``: what ``train.py`` and ``eval.py`` delegate to.

``train`` builds everything from the composed Hydra config (sequence, data module, network,
LightningModule, callbacks, loggers, trainer), fits, tests with the best checkpoint and returns
the optimised metric (``cfg.optimized_metric``) for sweepers. Everything it writes lies under
``cfg.paths.output_dir``: ``checkpoints/`` (best, last and the resolved ``config.yaml``),
``csv/metrics.csv``, ``wandb/``, ``figures/``.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mrflight.config import compose_config, hydra_config, instantiate, to_plain
from mrflight.errors import command, exit_status
from mrflight.loggers import (
    build_loggers,
    finish_loggers,
    log_flat_config,
    run_summary,
)
from mrflight.physics.checks import is_number
from mrflight.run_logging import (
    configure_logging,
    interactive,
    log_to_file,
    quiet_fresh_checkpoint_dir,
    test_table,
)

__all__ = ["train", "evaluate", "check_config", "compose_config"]

log = logging.getLogger("mrflight")


#: the settings of a short run on fresh simulated batches (debug=tiny is for stored data)
_SHORT_SIMULATED = ("sequence.n_pulses=100 sequence.lobe_length=20 data.batches_per_epoch=10 "
                    "data.n_val=200 data.n_test=200 trainer.max_epochs=1")


def _choices(choices=None) -> dict:
    """The config-group choices of the running Hydra job (``{}`` outside one)."""
    if choices is None:
        hc = hydra_config()
        choices = dict(hc.runtime.choices) if hc is not None else {}
    return {str(k): v for k, v in dict(choices).items()}


def check_debug_data(cfg: DictConfig, choices=None) -> None:
    """``debug=tiny`` (600 stored random atoms: ``override /data: random`` plus ``data.params``
    and ``data.n_train``) against the data a command or an experiment chose: one line naming
    the conflict and a short run that works, not a setting error from deep inside Hydra."""
    choices = _choices(choices)
    debug, exp, data_choice = (choices.get(k) for k in ("debug", "experiment", "data"))
    if debug and exp:
        import yaml

        from mrflight.config import CONFIG_DIR

        path = CONFIG_DIR / "experiment" / f"{exp}.yaml"
        defaults = yaml.safe_load(path.read_text()).get("defaults", []) if path.is_file() else []
        wanted = next((d["override /data"] for d in defaults
                       if isinstance(d, dict) and "override /data" in d), None)
        def module_of(name):
            f = CONFIG_DIR / "data" / f"{name}.yaml"
            return yaml.safe_load(f.read_text()).get("_target_") if f.is_file() else name

        # data=paper -> data=random (debug=tiny) keeps the data module: only its atoms change
        if wanted is not None and data_choice is not None \
                and module_of(wanted) != module_of(data_choice):
            short = (f"; a short run of it: {command('train')} experiment={exp} {_SHORT_SIMULATED}"
                     if wanted == "simulated" else "")
            raise ValueError(f"experiment={exp} trains on data={wanted}, but debug={debug} "
                             f"replaces it with data={data_choice}: leave out debug={debug}"
                             f"{short}")
    data = cfg.get("data") or {}
    if "SimulatedDataModule" in str(data.get("_target_")):
        stored = [k for k in ("params", "n_train") if k in data.keys()]
        if stored:
            via = " (set by debug=tiny: 600 stored random atoms)" if debug == "tiny" else ""
            raise ValueError(
                f"{' and '.join('data.' + k for k in stored)}{via} belong to stored data "
                f"(data=random, data=paper), not to data=simulated, which draws fresh batches: "
                f"for a short run on fresh batches leave out debug=tiny and add "
                f"{_SHORT_SIMULATED}")


def check_config(cfg: DictConfig, choices=None) -> None:
    """Fail fast, with one clear line, on config values that cannot work (``choices``: the
    config-group choices, by default the running Hydra job's)."""
    from mrflight.models import REGISTRY
    from mrflight.models.base import allowed_targets

    check_runtime(cfg)
    check_debug_data(cfg, choices)
    target = cfg.model.get("_target_") if cfg.get("model") else None
    if target not in allowed_targets():
        raise ValueError(f"unknown model {target!r}: choose model= one of "
                         f"{', '.join(sorted(REGISTRY))}, or your own nn.Module class "
                         "(model._target_=module.Class, its module importable: on PYTHONPATH)")
    data = cfg.data
    if "path" in data.keys() and data.get("params", None) is not None:
        raise ValueError("data.path (a dictionary file, data=file) and data.params (T1/T2 to "
                         "simulate) are both set: debug=tiny sets data.params and works with "
                         "data=paper or data=random; for a short run on a file use "
                         "trainer.max_epochs=2 data.n_train=1000 data.n_test=100")
    noise = data.get("noise_std")
    values = list(noise) if OmegaConf.is_list(noise) else [noise]
    if not values or len(values) > 2 or not all(is_number(v) and v >= 0 for v in values):
        raise ValueError(f"data.noise_std must be a finite number >= 0 or a range [low, high] "
                         f"(e.g. 0.01 or [0.005, 0.03]), got {noise!r}")
    bs = data.get("batch_size")
    if not isinstance(bs, int) or bs <= 0:
        raise ValueError(f"data.batch_size must be a positive integer, got {bs}")
    trainer = cfg.get("trainer") or {}
    check_accelerator(trainer)
    for key in ("max_epochs", "min_epochs"):
        v = trainer.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < -1):
            raise ValueError(f"trainer.{key} must be an integer (-1: no limit), got {v!r}")
    acc = trainer.get("accumulate_grad_batches", 1)
    if not isinstance(acc, int) or isinstance(acc, bool) or acc < 1:
        raise ValueError(f"trainer.accumulate_grad_batches must be a positive integer (batches "
                         f"per optimizer step), got {acc!r}")
    if cfg.get("train", True) and trainer.get("limit_train_batches") == 0:
        raise ValueError("trainer.limit_train_batches=0 trains nothing (and validates nothing): "
                         "to test the initial weights use train=false")
    if trainer.get("overfit_batches") and "SimulatedDataModule" in str(data.get("_target_")):
        raise ValueError("trainer.overfit_batches (debug=overfit) repeats a few stored batches, "
                         "but data=simulated draws fresh ones every step: add data=random or "
                         "data=paper")
    sched = cfg.module.get("scheduler")
    if sched and str(sched.get("_target_", "")).endswith(".CosineAnnealingLR"):
        t_max = sched.get("T_max")
        if not isinstance(t_max, int) or isinstance(t_max, bool) or t_max <= 0:
            raise ValueError(
                f"module.scheduler.T_max must be a positive number of epochs for the cosine "
                f"learning-rate schedule, got {t_max!r} (it follows trainer.max_epochs, where "
                "-1 means no limit): set trainer.max_epochs=N, or module.scheduler.T_max=N, or "
                "module.scheduler=null for a constant learning rate")
    if not (is_number(lr := cfg.module.get("lr", 1.0)) and lr > 0):
        raise ValueError(f"module.lr must be a positive number, got {cfg.module.get('lr')!r}")
    bias_weight, k = cfg.module.get("bias_weight", 0.0), data.get("realizations", 1)
    if is_number(bias_weight) and bias_weight > 0 and not (is_number(k) and k > 1):
        raise ValueError(f"module.bias_weight={bias_weight} weighs the bias over the "
                         f"data.realizations noise draws of each fingerprint, but there is one "
                         f"draw, so it does nothing: add data.realizations=K (K >= 2, "
                         f"data=simulated), or leave module.bias_weight at 0")
    if not (is_number(wd := cfg.module.get("weight_decay", 0.0)) and wd >= 0):
        raise ValueError(f"module.weight_decay must be a number >= 0 (0: none), got "
                         f"{cfg.module.get('weight_decay')!r}")


def check_accelerator(trainer) -> None:
    """``trainer=gpu`` / ``trainer=ddp`` (``trainer.accelerator`` gpu, cuda or mps) needs that
    device: one line naming the fix, not Lightning's "No supported gpu backend found!" raised from
    inside the Trainer with a traceback."""
    import torch

    acc = str(trainer.get("accelerator") or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if {"gpu": cuda or mps, "cuda": cuda, "mps": mps}.get(acc, True):
        return
    raise ValueError(f"trainer.accelerator={acc} (trainer=gpu, trainer=ddp) needs a GPU, but torch "
                     f"sees none here (torch.cuda.is_available() is False): use trainer=cpu "
                     f"(with trainer=ddp: trainer.accelerator=cpu)")


def check_runtime(cfg: DictConfig) -> None:
    """Settings of ``train.py`` and ``eval.py`` alike: ``seed`` and ``threads``."""
    seed = cfg.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not 0 <= seed < 2**32):  # numpy's seeds
        raise ValueError(f"seed must be an integer from 0 to 2**32 - 1 (or null: not seeded), "
                         f"got {seed!r}")
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise ValueError(f"threads must be a positive integer (torch CPU threads) or null "
                         f"(torch's default), got {threads!r}")


def _split(metric) -> str:
    """The split of a metric name: ``val@0.01/t1_mae_ms`` -> ``val``."""
    return str(metric).split("/", 1)[0].split("@", 1)[0]


def check_metric(cfg: DictConfig, module, eval_set_names=("",)) -> None:
    """``optimized_metric`` and the metrics the callbacks monitor (``callbacks.NAME.monitor``:
    the best checkpoint, early stopping) must be metrics the module logs, and validation
    metrics need validation (checked before training, not after its first epoch)."""
    name = cfg.get("optimized_metric")
    if name and _split(name) == "test":
        raise ValueError(f"optimized_metric={name!r} is a test metric: a sweep would choose its "
                         "settings on the test set; choose a validation metric (val/loss, the "
                         "default, or another val/...)")
    names = module.metric_names(eval_set_names) if hasattr(module, "metric_names") else None
    monitors = {"optimized_metric": name} | {
        f"callbacks.{key}.monitor": node.get("monitor")
        for key, node in (cfg.get("callbacks") or {}).items() if isinstance(node, DictConfig)}
    monitors = {k: v for k, v in monitors.items() if v}
    for key, metric in monitors.items():
        fit = key != "optimized_metric"  # a callback's: test metrics come after the fit
        logged = None if names is None else [n for n in names if not fit or _split(n) != "test"]
        if logged is not None and metric not in logged:
            raise ValueError(f"{key}={metric!r} is not a metric this module logs"
                             f"{' while training' if fit else ''}: choose one of "
                             f"{', '.join(logged)}")
    trainer = cfg.get("trainer") or {}
    if cfg.get("train", True) and trainer.get("limit_val_batches") == 0:
        needing = {k: v for k, v in monitors.items() if _split(v) == "val"}
        if needing:
            drop = " ".join("optimized_metric=null" if k == "optimized_metric"
                            else f"~{k.rsplit('.', 1)[0]}" for k in needing)
            raise ValueError(
                f"trainer.limit_val_batches=0 turns validation off, but "
                f"{', '.join(f'{k}={v}' for k, v in needing.items())} need"
                f"{'s' if len(needing) == 1 else ''} it: add {drop}, or validate "
                "(trainer.limit_val_batches above 0)")


def _resume(cfg: DictConfig, hc) -> tuple[DictConfig, tuple | None]:
    """The config of a resumed run (its saved one plus the new overrides) and the checkpoint."""
    from mrflight.resume import resume_config

    overrides = list(hc.overrides.task) if hc is not None else None
    return resume_config(cfg, overrides)


def _in_multirun(hc) -> bool:
    return hc is not None and str(hc.mode) == "RunMode.MULTIRUN"


def train(cfg: DictConfig) -> float | None:
    """Train and test one model from a composed config; returns ``cfg.optimized_metric``.

    Inside a Hydra multirun a failing job does not end the sweep: the error and its traceback
    are written to ``<output_dir>/FAILED.txt`` (atomically) and ``None`` is returned (also for
    a non-finite metric: an Optuna trial is then marked failed), so the other jobs run;
    :class:`mrflight.hydra_callbacks.FailureReport` lists the failed jobs in
    ``<sweep dir>/failures.json`` and ``train.py`` exits non-zero. Outside a multirun errors
    propagate.

    Determinism: the same config and seed give the same weights and metrics on the same machine
    and library versions (weights from ``seed``; training shuffle and noise from ``(seed, epoch,
    batch)``; fixed validation/test noise from ``data.noise_seed``; the random states are also
    stored in ``last.ckpt`` so ``ckpt_path=last`` resumes bit for bit). Set
    ``trainer.deterministic=true`` to force deterministic kernels on GPUs.
    """
    hc = hydra_config()
    if not _in_multirun(hc):
        return _train(cfg)
    try:
        metric = _train(cfg)
    except Exception as e:  # noqa: BLE001 - recorded, reported at the end of the sweep
        _record_failure(cfg, hc, e)
        return None  # Optuna records a trial without a value as failed; nan would end the study
    if metric is not None and not math.isfinite(metric):
        log.warning("job %s: %s is %s: the sweeper gets no value (a failed trial)",
                    hc.job.num, cfg.get("optimized_metric"), metric)
        return None
    return metric


def _record_failure(cfg: DictConfig, hc, e: BaseException) -> None:
    import json
    import traceback

    from mrflight.errors import one_line, root_cause
    from mrflight.fileio import atomic_path
    from mrflight.hydra_callbacks import FAILED_FILE

    try:
        out = Path(cfg.paths.output_dir)
    except Exception:  # noqa: BLE001 - the config itself may be what is broken
        out = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task) if hc is not None else []
    msg = one_line(e)
    log.error("job %s failed: %s", hc.job.num if hc is not None else "?", msg)
    with atomic_path(out / FAILED_FILE) as tmp:
        tmp.write_text(json.dumps({
            "error": msg, "type": type(root_cause(e)).__name__, "overrides": overrides,
            "traceback": "".join(traceback.format_exception(e)),
        }, indent=2))


def _callbacks(cfg: DictConfig, loggers) -> tuple[list, dict]:
    """``cfg.callbacks`` instantiated; without a terminal the progress bar is left out (the
    epoch summaries of :class:`mrflight.callbacks.EpochSummary` report progress instead), and so
    are the progress bar and the checkpoints that ``trainer.enable_progress_bar=false`` and
    ``trainer.enable_checkpointing=false`` turn off (Lightning refuses a trainer given both)."""
    from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar

    from mrflight.callbacks import RandomState

    callbacks, trainer_kw = [], {}
    trainer = cfg.get("trainer") or {}
    for node in (cfg.get("callbacks") or {}).values():
        if not (isinstance(node, DictConfig) and "_target_" in node):
            continue
        if not loggers and "LearningRateMonitor" in node._target_:
            continue  # needs a logger
        if "ProgressBar" in node._target_ and not interactive():
            trainer_kw["enable_progress_bar"] = False
            continue
        callback = instantiate(node)
        if not any(isinstance(callback, kind) and trainer.get(option) is False for kind, option
                   in ((ProgressBar, "enable_progress_bar"),
                       (ModelCheckpoint, "enable_checkpointing"))):
            callbacks.append(callback)
    if trainer.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in callbacks):  # callbacks=none
        # Lightning's own checkpoint of the last epoch, but in the run's checkpoints/ (Lightning
        # puts it into the first logger's folder, csv/ or mrflight/RUN_ID/, where neither
        # eval.py nor ckpt_path finds it)
        callbacks.append(ModelCheckpoint(dirpath=Path(cfg.paths.output_dir) / "checkpoints"))
    callbacks.append(RandomState())
    return callbacks, trainer_kw


def _log_model_size(module) -> None:
    n = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    log.info("model %s: %s parameters (%s trainable, %.2f MB)", type(module.net).__name__,
             f"{n:,}", f"{trainable:,}", 4 * n / 2**20)


def _prepare_run(cfg: DictConfig, resuming: bool, fix: str | None = None) -> Path:
    """Logging, W&B offline, seed and threads; the output dir made (refused where it holds
    another run's results and this is no resume of it) and cleared of the temporary files of
    killed writers. Returns the output dir."""
    import lightning as L
    import torch

    from mrflight.fileio import RUN_RESULTS, output_folder, remove_stale_temp_files

    configure_logging()
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if cfg.get("seed") is not None:
        L.seed_everything(int(cfg.seed), workers=True)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    output_dir = output_folder(
        cfg.paths.output_dir, () if resuming or _launched_rank() > 0 else RUN_RESULTS,
        fix=fix or "resume that run with ckpt_path=last, or start this one in another "
                   "hydra.run.dir (each run gets a new one by default)")
    for folder in (output_dir, output_dir / "checkpoints"):
        remove_stale_temp_files(folder)
    return output_dir


def _launched_rank() -> int:
    """This process's rank where a launcher set one (Lightning's DDP processes, torchrun,
    SLURM): only rank 0 checks the run folder, the others find rank 0's files there."""
    ranks = (os.environ.get(k, "0") for k in ("RANK", "LOCAL_RANK", "NODE_RANK",
                                              "SLURM_PROCID"))
    return max(int(v) if v.isdigit() else 0 for v in ranks)


def _build_data_and_module(cfg: DictConfig):
    """The data module (for the run's sequence) and the LightningModule, whose network config
    gets the input length, channels and outputs of the data."""
    sequence = instantiate(cfg.sequence)
    datamodule = instantiate(cfg.data, sequence=sequence)
    targets = list(datamodule.targets)
    net_cfg = to_plain(cfg.model)
    net_cfg.update(input_length=len(sequence), in_channels=datamodule.in_channels,
                   n_outputs=len(targets))
    module = instantiate(
        cfg.module, net=net_cfg, sequence=sequence.to_dict(), input_mode=datamodule.input_mode,
        target_scale_ms=list(datamodule.target_scale_ms), noise_std=datamodule.noise_std,
        targets=targets, _recursive_=False, _convert_="all",
    )
    datamodule.with_bound = module.needs_bound
    return datamodule, module


def _build_trainer(cfg: DictConfig, loggers):
    """``cfg.trainer`` with the callbacks and loggers; checkpoints written atomically (a full
    disk or a crash never leaves a truncated ``.ckpt``) unless the config sets plugins."""
    from mrflight.checkpoints import AtomicCheckpointIO

    callbacks, trainer_kw = _callbacks(cfg, loggers)
    if not cfg.trainer.get("plugins"):
        trainer_kw["plugins"] = [AtomicCheckpointIO()]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **trainer_kw)


def _save_run_config(cfg: DictConfig, trainer, output_dir: Path) -> None:
    """The resolved config as ``checkpoints/config.yaml`` (what ``eval.py`` and a resume read)."""
    from mrflight.fileio import atomic_path

    resolved = to_plain(cfg)
    if not trainer.is_global_zero:
        return
    ckpt_dir = output_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(ckpt_dir / "config.yaml") as tmp:
        OmegaConf.save(OmegaConf.create(resolved), tmp)
    quiet_fresh_checkpoint_dir(ckpt_dir)


def _fit_and_test(cfg: DictConfig, trainer, module, datamodule, resume_from,
                  metrics: dict) -> None:
    """Fit (from the resumed checkpoint), then test with the best checkpoint; the trainer's
    metrics after each step go into ``metrics`` (also when the next step fails), and the best
    checkpoint's score as ``best/<monitor>``."""
    if cfg.get("train", True):
        ckpt = str(resume_from[0]) if resume_from is not None else None
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    cb = trainer.checkpoint_callback
    if cb is not None and cb.monitor and cb.best_model_score is not None:
        metrics[f"best/{cb.monitor}"] = float(cb.best_model_score)
    if cfg.get("test", True):
        best = None
        if trainer.checkpoint_callback is not None and not trainer.fast_dev_run:
            best = trainer.checkpoint_callback.best_model_path or None
        # ckpt_path=None: the module's current weights
        # verbose=False: Lightning's table (one column per test loader, mostly empty cells) is
        # replaced by test_table's few lines after the run
        trainer.test(module, datamodule=datamodule, ckpt_path=best, weights_only=True,
                     verbose=False)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})


def _stopped_before_validation(cfg: DictConfig, metrics: dict) -> bool:
    """Whether training (``trainer.max_steps``, ``trainer.max_time``) stopped before its first
    validation: the validation metric ``optimized_metric`` names was never logged, nor any
    other validation metric, and no checkpoint holds a score (a resumed run whose epochs were
    all done, stopped during its test, validates no more but has its best checkpoint's)."""
    name = cfg.get("optimized_metric")
    return bool(cfg.get("train", True) and name and str(name).startswith("val")
                and name not in metrics and f"best/{name}" not in metrics
                and not any(k.startswith("val") for k in metrics))


def _optimized_metric(cfg: DictConfig, metrics: dict, sweep: bool = False) -> float | None:
    """``metrics[cfg.optimized_metric]`` (None when no metric is optimised): the best
    checkpoint's score where the metric is the one checkpoints are chosen by (the sweep then
    ranks the model that is tested and evaluated, not the last epoch's). A single run that
    ``trainer.max_steps`` or ``trainer.max_time`` stopped before its first validation has no
    validation metric to report: warned, None (a sweep's job fails: it has no score)."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    if f"best/{name}" in metrics:
        return metrics[f"best/{name}"]
    if name not in metrics and not cfg.get("train", True):
        log.info("train=false: no %s to report (optimized_metric)", name)
        return None
    if _stopped_before_validation(cfg, metrics):
        why = (f"training stopped before its first validation (trainer.max_steps or "
               f"trainer.max_time within the first epoch), so there is no {name}")
        if sweep:
            raise ValueError(f"{why} to score this sweep job by (optimized_metric): let every "
                             "job train at least one epoch")
        log.warning("%s (optimized_metric) and no checkpoint: the test used the last weights, "
                    "no metrics.json is written, and ckpt_path=last in this folder starts the "
                    "run again", why)
        return None
    if name not in metrics:
        raise ValueError(f"optimized_metric={name!r} was not logged; available: "
                         f"{', '.join(sorted(metrics))}")
    return metrics[name]


def _train(cfg: DictConfig) -> float | None:
    from mrflight.checkpoints import unstarted_run
    from mrflight.resume import requeued_run, sweep_job

    hc = hydra_config()
    if _in_multirun(hc):  # an interrupted sweep run again with ckpt_path=last
        cfg, finished = sweep_job(cfg, hc.job.num, hc.overrides.task)
        if finished is not None:
            return _optimized_metric(cfg, finished)
    cfg = requeued_run(cfg)
    # the run already in this folder: resumed, or started again where it had no checkpoint yet
    own_run = unstarted_run(cfg.get("ckpt_path"), cfg.paths.output_dir) is not None
    _trust_own_model(cfg)
    cfg, resume_from = _resume(cfg, hc)  # checks the checkpoint loads: nothing written yet
    check_config(cfg)
    output_dir = _prepare_run(cfg, resuming=own_run or _continues_here(cfg, resume_from),
                              fix=None if resume_from is None or own_run else
                              f"continue ckpt_path={cfg.get('ckpt_path')} in another "
                              "hydra.run.dir (each run gets a new one by default)")
    lock = _lock_run_folder(output_dir)
    try:
        return _train_in(cfg, hc, resume_from, output_dir)
    finally:
        if lock is not None:
            lock.close()  # a joblib launcher's worker process goes on with other jobs


def _continues_here(cfg: DictConfig, resume_from) -> bool:
    """Whether the resumed checkpoint continues the run already in the output folder: the
    checkpoint lies in that folder (``ckpt_path=last``, a moved or copied run), or the folder
    is an unfinished earlier try of this same command (its saved ``ckpt_path`` is this one: a
    job restarted after a crash or requeued). A checkpoint of another run continued into a
    folder that holds a run's results is no resume of that run: its ``metrics.json``,
    checkpoints and CSV log would be overwritten and mixed with the other run's."""
    from mrflight.checkpoints import run_dir_of
    from mrflight.resume import started_with

    if resume_from is None:
        return False
    out = Path(str(cfg.paths.output_dir))
    return (os.path.realpath(run_dir_of(resume_from[0])) == os.path.realpath(out)
            or started_with(out, cfg.get("ckpt_path")))


def _trust_own_model(cfg: DictConfig) -> None:
    """The network the command's own config names (``model._target_``, e.g. a user's model
    from their own config dir) is built like mrflight's (:func:`mrflight.models.trust`); one
    that cannot be imported is left to :func:`check_config`'s error."""
    from mrflight.models import trust

    target = cfg.model.get("_target_") if cfg.get("model") else None
    if isinstance(target, str) and not target.startswith("mrflight."):
        try:
            trust(target)
        except ValueError:
            pass


def _trusted_paths(value) -> list[str]:
    """The class paths of ``eval.py trust=``: a list, or one path given alone
    (``trust=mymodels.MyNet``, which would otherwise be trusted letter by letter).

    Raises:
        ValueError: anything else (a number, a mapping, a list of non-strings).
    """
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    items = OmegaConf.to_container(value) if OmegaConf.is_list(value) else value
    if isinstance(items, (list, tuple)) and all(isinstance(v, str) for v in items):
        return list(items)
    raise ValueError(f"trust={value!r}: give the class paths of your networks, e.g. "
                     "'trust=[mymodels.MyNet]'")


def _lock_run_folder(output_dir: Path):
    """Rank 0's lock on the run folder (:func:`mrflight.fileio.lock_folder`), held until the
    run ends: a second run started in the same folder at the same time is refused."""
    from mrflight.fileio import lock_folder

    if _launched_rank() > 0:
        return None  # the other DDP processes write into rank 0's folder
    return lock_folder(output_dir, fix="each run needs its own hydra.run.dir (each run gets "
                                        "a new one by default)")


def _train_in(cfg: DictConfig, hc, resume_from, output_dir: Path) -> float | None:
    from mrflight.resume import check_fits, continue_csv_logs

    datamodule, module = _build_data_and_module(cfg)
    check_metric(cfg, module, getattr(datamodule, "eval_set_names", [""]))
    if resume_from is not None:
        check_fits(module, resume_from)

    loggers = build_loggers(cfg, hc)
    trainer = _build_trainer(cfg, loggers)
    _log_model_size(module)
    if trainer.is_global_zero:
        continue_csv_logs(loggers, resume_from)
    log_flat_config(loggers, cfg, hc)
    _save_run_config(cfg, trainer, output_dir)

    metrics: dict = {}
    status = 0
    try:
        _fit_and_test(cfg, trainer, module, datamodule, resume_from, metrics)
        metric = _optimized_metric(cfg, metrics, sweep=_in_multirun(hc))
        table = test_table(metrics)
        if table:
            log.info("test of the %s:\n%s", "best checkpoint" if cfg.get("train", True)
                     else "checkpoint", table)
        # every metric (also in metrics.json): in the log file, on the console without a test
        (log_to_file if table else log.log)(
            logging.INFO, "metrics: %s", {k: round(v, 3) for k, v in sorted(metrics.items())})
        # a run stopped before its first validation (no checkpoint) stays unfinished: without
        # a metrics.json, ckpt_path=last starts it again instead of refusing a finished run
        if trainer.is_global_zero and not _stopped_before_validation(cfg, metrics):
            _write_metrics(output_dir, metrics)
    except BaseException as e:  # the W&B run is marked failed, with the command's status
        status = exit_status(e)
        raise
    finally:
        finish_loggers(loggers, run_summary(trainer, metrics), status)
    return metric


def _write_metrics(output_dir: Path, metrics: dict) -> None:
    import json

    from mrflight.fileio import FINISHED, atomic_path

    with atomic_path(output_dir / FINISHED) as tmp:
        Path(tmp).write_text(json.dumps({"units": "ms for *_ms, loss on scaled targets",
                                         **metrics}, indent=2))


def evaluate(cfg: DictConfig):
    """Body of ``eval.py``: ``input=...`` makes maps of an image series (:mod:`mrflight.maps`),
    ``export=...`` exports checkpoints (:mod:`mrflight.export`), else the evaluation of trained
    models and dictionary matching (:mod:`mrflight.evaluation`); :mod:`mrflight.eval_entry`
    turns the config into their typed inputs."""
    from mrflight import eval_entry
    from mrflight.models import trust

    check_runtime(cfg)
    _check_eval_mode(cfg)
    trust(*_trusted_paths(cfg.get("trust")))
    if cfg.get("input"):
        return eval_entry.maps_from_config(cfg)
    if cfg.get("export"):
        return eval_entry.export_from_config(cfg)
    return eval_entry.evaluation_from_config(cfg)


def _check_eval_mode(cfg: DictConfig) -> None:
    """``eval.py`` does one of three things; options of another are refused, not ignored."""
    if cfg.get("input") and cfg.get("export"):
        raise ValueError("input= (maps of a series) and export= (a model file) are separate "
                         "commands: run eval.py once with each")
    if not cfg.get("input"):
        given = [k for k in ("dictionary", "mask", "b1map") if cfg.get(k)]
        if given:
            raise ValueError(f"{'= and '.join(given)}= appl{'y' if len(given) > 1 else 'ies'} "
                             "to maps of an image series: add "
                             "input=SERIES, or drop them (the evaluation of ckpt_path= matches "
                             "against its own test dictionaries)")
