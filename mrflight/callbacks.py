"""Lightning callbacks: the paper's relative early stopping, predicted-vs-true figures (test and,
per epoch, validation), a one-line summary per epoch in the log, an exponential moving average
of the weights (:class:`WeightEMA`), the global random states in checkpoints
(:class:`RandomState`, added to every training run by the pipeline) and ``last.ckpt`` at the end
of every finished epoch (:class:`EpochEndCheckpoint`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint

from mrflight.loggers import is_wandb

__all__ = ["RelativeEarlyStopping", "ScatterPlot", "ValidationScatter", "EpochSummary",
           "WeightEMA", "RandomState", "EpochEndCheckpoint"]


class RelativeEarlyStopping(EarlyStopping):
    """Early stopping where an improvement counts only when it is large *relative* to the best.

    A new value ``v`` of the monitored metric improves on the best ``b`` when
    ``v < b * (1 - min_delta_rel)`` (mode ``"min"``; ``v > b * (1 + min_delta_rel)`` in mode
    ``"max"``, both for ``b > 0``; the threshold uses ``|b|``). Training stops after
    ``patience`` consecutive validation checks (epochs) without such an improvement. Lightning's
    own ``min_delta`` is absolute; this class sets it from the current best before every check.

    Args:
        monitor: metric name, e.g. ``"val/loss"``.
        min_delta_rel: relative improvement that counts (the paper: 0.005, i.e. 0.5 %).
        patience: checks without improvement before stopping (the paper: 100 epochs).
        mode: ``"min"`` or ``"max"``.
        **kwargs: passed to :class:`lightning.pytorch.callbacks.EarlyStopping`.

    References:
        Oksuz et al., ISBI 2019 (patience 100 epochs, 0.5 % relative improvement).
    """

    def __init__(self, monitor: str = "val/loss", min_delta_rel: float = 0.005,
                 patience: int = 100, mode: str = "min", **kwargs) -> None:
        if not 0.0 <= min_delta_rel < 1.0:
            raise ValueError(f"min_delta_rel must lie in [0, 1), got {min_delta_rel}")
        kwargs.pop("min_delta", None)
        super().__init__(monitor=monitor, min_delta=0.0, patience=patience, mode=mode, **kwargs)
        self.min_delta_rel = float(min_delta_rel)

    def _evaluate_stopping_criteria(self, current: torch.Tensor):
        best = self.best_score
        delta = (self.min_delta_rel * best.abs()).to(current) if torch.isfinite(best) \
            else torch.zeros_like(current)
        # Lightning compares ``monitor_op(current - min_delta, best)`` with a signed min_delta
        self.min_delta = delta if self.monitor_op == torch.gt else -delta
        return super()._evaluate_stopping_criteria(current)


class ScatterPlot(L.Callback):
    """Predicted-vs-true T1 and T2 scatter of the test split, saved and sent to the loggers.

    Collects the test predictions (``test_step`` returns ``pred_ms`` and ``true_ms``), draws one
    panel per parameter with the identity line at the end of testing, writes
    ``<dirpath>/scatter_test.png`` and logs the figure through ``trainer.loggers``
    (``WandbLogger.log_image``; ``add_figure`` for loggers whose experiment has it, e.g.
    TensorBoard). Runs on rank 0 only.

    Args:
        dirpath: folder of the PNG (``None``: ``<trainer.default_root_dir>/figures``).
        max_points: points drawn per panel (a random subset beyond that).
    """

    def __init__(self, dirpath: str | None = None, max_points: int = 5000) -> None:
        self.dirpath = dirpath
        self.max_points = int(max_points)
        self._pred: list[torch.Tensor] = []
        self._true: list[torch.Tensor] = []
        self.figure_path: Path | None = None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._pred, self._true = [], []

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                          dataloader_idx=0) -> None:
        if isinstance(outputs, dict) and "pred_ms" in outputs:
            self._pred.append(outputs["pred_ms"].detach().float().cpu())
            self._true.append(outputs["true_ms"].detach().float().cpu())

    def on_test_end(self, trainer, pl_module) -> None:
        pred, true = _gathered(trainer, self._pred), _gathered(trainer, self._true)
        if not len(pred) or not trainer.is_global_zero:
            return
        pred, true = pred.numpy(), true.numpy()
        n_all = len(pred)
        k = min(pred.shape[1], true.shape[1])
        mae = np.abs(pred[:, :k] - true[:, :k]).mean(0)  # every test signal, as test/*_mae
        if len(pred) > self.max_points:
            keep = torch.randperm(len(pred), generator=torch.Generator().manual_seed(0))
            keep = keep[: self.max_points].numpy()
            pred, true = pred[keep], true[keep]
        n = min(pred.shape[1], true.shape[1])
        shown = f", {len(pred)} shown" if len(pred) < n_all else ""
        fig = _scatter_figure(pred[:, :n], true[:, :n], _param_names(pl_module, n),
                              title=f"test split (training noise), {n_all} signals{shown}",
                              mae=mae[:n])
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "figures")
        folder.mkdir(parents=True, exist_ok=True)
        from mrflight.fileio import atomic_path

        self.figure_path = folder / "scatter_test.png"
        with atomic_path(self.figure_path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        _log_figure(trainer, "test/scatter", fig, self.figure_path)
        import matplotlib.pyplot as plt

        plt.close(fig)
        self._pred, self._true = [], []


def _gathered(trainer, tensors: list[torch.Tensor]) -> torch.Tensor:
    """``tensors`` of every DDP rank, concatenated (under DDP each rank tests its own share of
    the test set: rank 0's alone would be half the signals). Every rank must call it."""
    local = torch.cat(tensors) if tensors else torch.zeros(0)
    if int(getattr(trainer, "world_size", 1) or 1) <= 1:
        return local
    import torch.distributed as dist

    parts: list = [None] * int(trainer.world_size)
    dist.all_gather_object(parts, local)
    parts = [p for p in parts if p.numel()]
    return torch.cat(parts) if parts else local


def _param_names(pl_module, n: int) -> list[str]:
    names = list((getattr(pl_module, "hparams", None) or {}).get("targets") or ("t1", "t2"))
    names = [str(p).upper() if str(p).lower() in ("t1", "t2", "b1") else str(p) for p in names]
    return (names + [f"p{i}" for i in range(len(names), n)])[:n]


def _scatter_figure(pred, true, names=("T1", "T2"), title: str = "", mae=None):
    """Predicted against true, one panel per parameter (ms; B1 as a ratio, its MAE in %).

    ``mae``: per-parameter MAE to print (e.g. over every signal when only a subset is drawn);
    ``None``: that of the points drawn."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = pred.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4.2), constrained_layout=True,
                             squeeze=False)
    for ax, i, name in zip(axes[0], range(n), names):
        t, p = true[:, i], pred[:, i]
        fin = np.isfinite(t) & np.isfinite(p)
        if mae is not None:
            err = float(mae[i])
        else:
            err = float(np.abs(p - t).mean())
        if name == "B1":  # a ratio to nominal near 1: not from 0, MAE in % as b1_mae_pct
            lo = float(min(t[fin].min(), p[fin].min())) if fin.any() else 0.0
            hi = float(max(t[fin].max(), p[fin].max())) if fin.any() else 1.0
            pad = 0.03 * (hi - lo or 1.0)
            lo, hi = lo - pad, hi + pad
            axis_unit, mae_text = " (ratio to nominal)", f"MAE {100 * err:.3g} %"
        else:
            hi = float(max(t[fin].max(), p[fin].max())) if fin.any() else 1.0
            lo, hi = 0.0, 1.02 * hi
            axis_unit, mae_text = " (ms)", f"MAE {err:.3g} ms"
        ax.plot([lo, hi], [lo, hi], color="0.4", lw=1)
        ax.scatter(t, p, s=2, alpha=0.4, color="tab:blue")
        ax.set(xlabel=f"true {name}{axis_unit}", ylabel=f"predicted {name}{axis_unit}",
               title=f"{name}: {mae_text}", xlim=(lo, hi), ylim=(lo, hi))
        ax.set_aspect("equal")
    if title:
        fig.suptitle(title)
    return fig


def _log_figure(trainer, key: str, fig, path=None) -> None:
    """Send a figure through every logger of the trainer that takes images."""
    for logger in trainer.loggers:
        if is_wandb(logger):
            if path is None:
                from mrflight.plots import figure_to_array

                images = [figure_to_array(fig)]
            else:
                images = [str(path)]
            logger.log_image(key=key, images=images, step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_figure"):
            logger.experiment.add_figure(key, fig, global_step=trainer.global_step)


def _image_loggers(trainer) -> bool:
    return any(is_wandb(lg) or hasattr(getattr(lg, "experiment", None), "add_figure")
               for lg in trainer.loggers)


class ValidationScatter(L.Callback):
    """Predicted-vs-true figure of the validation split every ``every_n_epochs`` epochs.

    Sent through the trainer's loggers only (``val/scatter``; W&B shows one figure per epoch on a
    step slider); nothing is computed when no logger takes images. Predictions come from one
    extra forward pass over the first ``max_points`` validation signals.

    Args:
        every_n_epochs: draw every n-th epoch (and the last).
        max_points: validation signals drawn.
    """

    def __init__(self, every_n_epochs: int = 1, max_points: int = 2000) -> None:
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = int(every_n_epochs)
        self.max_points = int(max_points)
        self._pred: list[torch.Tensor] = []
        self._true: list[torch.Tensor] = []
        self.n_logged = 0

    def _active(self, trainer) -> bool:
        if trainer.sanity_checking or not trainer.is_global_zero or not _image_loggers(trainer):
            return False
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        return last or trainer.current_epoch % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._pred, self._true = [], []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        if not self._active(trainer) or sum(len(p) for p in self._pred) >= self.max_points:
            return
        with torch.no_grad():
            self._pred.append(pl_module(batch.signal).detach().float().cpu())
        self._true.append(batch.params_ms.detach().float().cpu())

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self._pred or not self._active(trainer):
            return
        import matplotlib.pyplot as plt

        pred = torch.cat(self._pred)[: self.max_points].numpy()
        true = torch.cat(self._true)[: self.max_points].numpy()
        n = min(pred.shape[1], true.shape[1])
        fig = _scatter_figure(pred[:, :n], true[:, :n], _param_names(pl_module, n),
                              title=f"validation, epoch {trainer.current_epoch}")
        _log_figure(trainer, "val/scatter", fig)
        plt.close(fig)
        self.n_logged += 1
        self._pred, self._true = [], []


class EpochSummary(L.Callback):
    """One log line per epoch: epoch, step, train and val loss, val MAEs, epoch time.

    Written through the ``mrflight`` logger, i.e. to the console and the run's log file
    (``train.log``) under Hydra. While a progress bar owns an interactive terminal (stdout is a
    TTY and the trainer shows a bar) the line goes to the log file only. The validation metrics
    appear in the line of an epoch that validated (not an earlier epoch's again, as after
    ``trainer.check_val_every_n_epoch=2`` or an epoch cut short by ``trainer.max_steps``).
    """

    def __init__(self) -> None:
        self._t0: float | None = None
        self._validated = False
        self.lines: list[str] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        import time

        self._t0 = time.perf_counter()
        self._validated = False

    def on_validation_end(self, trainer, pl_module) -> None:
        self._validated = self._validated or not trainer.sanity_checking

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning 2 runs the epoch-end validation before this hook: both losses are known
        if trainer.is_global_zero and not trainer.sanity_checking:
            self._report(trainer)

    def _report(self, trainer) -> None:
        import logging
        import time

        from mrflight.run_logging import interactive, log_to_file

        m = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1
             and (self._validated or not k.startswith("val"))}
        parts = [f"epoch {trainer.current_epoch + 1}"
                 + (f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0
                    else ""), f"step {trainer.global_step}"]
        for key, label in (("train/loss_epoch", "train loss"), ("val/loss", "val loss")):
            if key in m or key.removesuffix("_epoch") in m:
                parts.append(f"{label} {m.get(key, m.get(key.removesuffix('_epoch'))):.4g}")
        maes = sorted(k for k in m if k.startswith("val/") and k.endswith("_mae_ms"))
        if maes:
            names = "/".join(k[4:].split("_")[0].upper() for k in maes)
            vals = "/".join(f"{m[k]:.1f}" for k in maes)
            parts.append(f"val {names} MAE {vals} ms")
        if self._t0 is not None:
            parts.append(f"{time.perf_counter() - self._t0:.1f} s")
        line = ", ".join(parts)
        self.lines.append(line)
        bar = getattr(trainer, "progress_bar_callback", None) is not None
        log = logging.getLogger("mrflight")
        if interactive() and bar:
            log_to_file(logging.INFO, "%s", line)
        else:
            log.info("%s", line)


class WeightEMA(EMAWeightAveraging):
    """An exponential moving average of the weights, for validation, checkpoints and the result.

    Lightning's :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` (``decay`` per
    training step; the checkpoints' ``state_dict`` holds the average, the raw weights travel
    under ``current_model_state`` so that a resumed run goes on from both), with the average
    made when training starts rather than at setup: a network fits data-dependent buffers (the
    subspace basis) in ``on_fit_start``, after the callbacks' setup, and the average must copy
    them. Until then (the sanity check) validation uses the raw weights.

    Args:
        decay: weight of the old average per step (0.999: about the last 1000 steps).
        **kwargs: passed to :class:`~lightning.pytorch.callbacks.EMAWeightAveraging`.
    """

    def __init__(self, decay: float = 0.999, **kwargs) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in (0, 1), got {decay}")
        super().__init__(decay=decay, **kwargs)
        self._pending: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        # the average is made in on_train_start (see the class docstring)
        pass

    def on_train_start(self, trainer, pl_module) -> None:
        super().setup(trainer, pl_module, "fit")
        if self._pending is not None:
            super().on_load_checkpoint(trainer, pl_module, self._pending)
            self._pending = None

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if trainer.state.fn != "fit":
            # testing or predicting with a checkpoint: its state_dict, the average
            return
        if self._average_model is not None:
            return super().on_load_checkpoint(trainer, pl_module, checkpoint)
        if "current_model_state" in checkpoint and "averaging_state" in checkpoint:
            # a resumed run: the module goes on from its raw weights now (the average is
            # restored once it exists)
            pl_module.load_state_dict(checkpoint["current_model_state"])
            self._pending = {k: checkpoint[k] for k in
                             ("state_dict", "current_model_state", "averaging_state")}


class RandomState(L.Callback):
    """Stores the global random states in checkpoints (dropout etc.).

    Training noise and shuffling do not depend on them (see :mod:`mrflight.data.stored`);
    this makes a resumed run continue every other global random stream where it stopped.
    """

    @property
    def state_key(self) -> str:
        return "mrflight_random_state"

    def state_dict(self) -> dict:
        import random

        import numpy as np

        # tensors and plain numbers only, so checkpoints load with weights_only=True
        name, key, pos, has_gauss, gauss = np.random.get_state()
        st = {"torch": torch.get_rng_state(),
              "numpy": {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)),
                        "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
              "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            st["cuda"] = torch.cuda.get_rng_state_all()
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        import random

        import numpy as np

        # restored at once: Lightning loads callback states before it builds the training
        # iterator of the resumed epoch (whose creation draws from the global generator); its
        # sanity check in between runs under isolate_rng
        st = state_dict
        torch.set_rng_state(st["torch"])
        n = st["numpy"]
        np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["gauss"]))
        random.setstate(st["python"])
        if "cuda" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda"])


class EpochEndCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` written at the end of every training epoch that ran all its batches:
    what ``ckpt_path=last`` resumes from.

    Lightning's own saves after a validation where validation does not run at every epoch's end
    (``trainer.val_check_interval`` below an epoch: a checkpoint in the middle of an epoch;
    ``trainer.check_val_every_n_epoch=2``: none after the other epochs), and at the end of an
    epoch cut short by ``trainer.max_steps`` or ``trainer.max_time``, which it records as
    finished: a resumed run then skipped the epoch's other batches and its learning-rate step. A
    run resumed from the end of its last finished epoch trains the batches of an uninterrupted
    run (a batch is a function of its seed, epoch and index)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**{**kwargs, "save_on_train_epoch_end": True})

    @property
    def state_key(self) -> str:
        # Lightning's key ("ModelCheckpoint{...}"), which mrflight.checkpoints reads
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        batches = trainer.num_training_batches
        done = trainer.fit_loop.epoch_loop.batch_progress.current.ready
        if batches == float("inf") or done >= batches:
            super().on_train_epoch_end(trainer, pl_module)
