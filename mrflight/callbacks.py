"""Lightning callbacks: the paper's relative early stopping and a predicted-vs-true figure."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping

__all__ = ["RelativeEarlyStopping", "ScatterPlot"]


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
        if not self._pred or not trainer.is_global_zero:
            return
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        pred, true = torch.cat(self._pred).numpy(), torch.cat(self._true).numpy()
        if len(pred) > self.max_points:
            keep = torch.randperm(len(pred), generator=torch.Generator().manual_seed(0))
            keep = keep[: self.max_points].numpy()
            pred, true = pred[keep], true[keep]
        fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), constrained_layout=True)
        for ax, i, name in zip(axes, (0, 1), ("T1", "T2")):
            lim = float(max(true[:, i].max(), pred[:, i].max()))
            ax.plot([0, lim], [0, lim], color="0.4", lw=1)
            ax.scatter(true[:, i], pred[:, i], s=2, alpha=0.4, color="tab:blue")
            mae = float(abs(pred[:, i] - true[:, i]).mean())
            ax.set(xlabel=f"true {name} (ms)", ylabel=f"predicted {name} (ms)",
                   title=f"{name}: MAE {mae:.1f} ms", xlim=(0, lim), ylim=(0, lim))
            ax.set_aspect("equal")
        folder = Path(self.dirpath or Path(trainer.default_root_dir) / "figures")
        folder.mkdir(parents=True, exist_ok=True)
        from mrflight.matio import atomic_path

        self.figure_path = folder / "scatter_test.png"
        with atomic_path(self.figure_path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        for logger in trainer.loggers:
            try:
                from lightning.pytorch.loggers import WandbLogger
            except ImportError:  # pragma: no cover
                WandbLogger = ()
            if isinstance(logger, WandbLogger):
                logger.log_image(key="test/scatter", images=[str(self.figure_path)])
            elif hasattr(getattr(logger, "experiment", None), "add_figure"):
                logger.experiment.add_figure("test/scatter", fig, global_step=trainer.global_step)
        plt.close(fig)
        self._pred, self._true = [], []
