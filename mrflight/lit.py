"""The LightningModule that trains every regressor, and checkpoint loading.

:class:`MRFRegressor` wraps any regressor of :mod:`mrflight.models` (given as its config
``{"_target_": class path, **kwargs}`` so that checkpoints reload with no injected object). It owns
the loss (MSE on scaled targets ``params_ms / target_scale_ms``), Adam, an optional learning-rate
scheduler and the metrics (torchmetrics MAE and RMSE of T1 and T2 in ms), logged as
``train/loss``, ``val/loss``, ``val/t1_mae_ms``, ``val/t1_rmse_ms``, ``val/t2_mae_ms``,
``val/t2_rmse_ms`` and the same under ``test/``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError

from mrflight.data.datamodule import DEFAULT_TARGET_SCALE_MS, INPUT_MODES, Batch, preprocess
from mrflight.models import build_net, net_config

__all__ = ["MRFRegressor", "load_checkpoint"]

_PARAMS = ("t1", "t2")


def _plain(obj):
    """OmegaConf containers -> plain Python (for hparams and instantiation)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


class MRFRegressor(L.LightningModule):
    """Regress T1 and T2 (ms) from fingerprints with any :mod:`mrflight.models` network.

    Args:
        net: the network's config ``{"_target_": "mrflight.models.GRURegressor",
            "input_length": T, ...}`` or an ``nn.Module`` built by :mod:`mrflight.models` (its
            config is recorded instead of the object).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        scheduler: optional scheduler config ``{"_target_": "torch.optim.lr_scheduler.X",
            **kwargs}`` (the optimizer is passed in), plus optional keys ``interval``
            (``"epoch"``/``"step"``) and ``monitor`` (for ``ReduceLROnPlateau``).
        target_scale_ms: ``(T1, T2)`` in ms; the net predicts ``params_ms / target_scale_ms``.
        sequence: the pulse train the model is trained for (``Sequence.to_dict()``), stored in
            the checkpoint.
        input_mode: ``"magnitude"`` or ``"complex"`` (see :func:`mrflight.data.preprocess`).
        noise_std: the training noise level (recorded for reference).
    """

    def __init__(self, net, lr: float = 1e-3, weight_decay: float = 0.0,
                 scheduler: dict | None = None,
                 target_scale_ms=DEFAULT_TARGET_SCALE_MS, sequence: dict | None = None,
                 input_mode: str = "magnitude", noise_std: float | None = None) -> None:
        super().__init__()
        if isinstance(net, nn.Module):
            net_module, net = net, net_config(net)
        else:
            net = _plain(net)
            if not isinstance(net, dict) or "_target_" not in net:
                raise ValueError("net must be an nn.Module or a config dict with '_target_'")
            net_module = build_net(net)
        if not lr > 0:
            raise ValueError(f"module.lr must be positive, got {lr}")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        scheduler = _plain(scheduler)
        sequence = _plain(sequence)
        target_scale_ms = [float(s) for s in target_scale_ms]
        self.save_hyperparameters({
            "net": net, "lr": float(lr), "weight_decay": float(weight_decay),
            "scheduler": scheduler, "target_scale_ms": target_scale_ms, "sequence": sequence,
            "input_mode": input_mode, "noise_std": noise_std,
        }, logger=False)  # loggers get a flat config from the pipeline, not the pulse arrays
        self.net = net_module
        self.register_buffer("target_scale", torch.tensor(target_scale_ms), persistent=False)
        self.loss_fn = nn.MSELoss()
        self.metrics = nn.ModuleDict({
            f"{split}_": nn.ModuleDict({
                f"{p}_{m}": (MeanAbsoluteError() if m == "mae_ms"
                             else MeanSquaredError(squared=False))
                for p in _PARAMS for m in ("mae_ms", "rmse_ms")
            })
            for split in ("train", "val", "test")
        })

    # -- inference ----------------------------------------------------------------------------
    @property
    def input_length(self) -> int:
        return int(self.net.input_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed inputs ``(B, T)`` / ``(B, 2, T)`` -> T1, T2 in ms ``(B, 2)``."""
        return self.net(x) * self.target_scale

    @torch.no_grad()
    def predict_parameters(self, signals, batch_size: int = 256) -> torch.Tensor:
        """Estimate T1 and T2 (ms) of fingerprints.

        Args:
            signals: ``(N, T)`` or ``(T,)``, complex or magnitude, numpy or torch, at any scale;
                preprocessed exactly as in training (magnitude, L2-normalised; or the two
                channels of the normalised complex signal for ``input_mode="complex"``).
            batch_size: inference chunk size (256 is the fastest or close to it for every
                default model on a CPU: larger chunks fall out of cache, see
                ``benchmarks/inference_speed.py``).

        Returns:
            float32 tensor ``(N, 2)`` on the CPU: T1 and T2 in ms. All-zero fingerprints give NaN
            rows (with a warning).

        Raises:
            ValueError: wrong number of time points (names the expected length and sequence),
                NaN/Inf values, or ``batch_size < 1``.
        """
        x = torch.as_tensor(np.asarray(signals) if not torch.is_tensor(signals) else signals)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        seq = self.hparams.get("sequence") or {}
        if x.ndim != 2 or x.shape[1] != self.input_length:
            raise ValueError(
                f"signals must have shape (N, {self.input_length}): this model was trained for "
                f"the sequence {seq.get('name', 'unknown')!r} with {self.input_length} time "
                f"points, got shape {tuple(x.shape)}"
            )
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = int(batch_size)
        if not x.is_complex():
            x = x.to(torch.float32)
        # validate everything first so that a bad voxel fails before any work is done. On the
        # real view, by min and max (NaN propagates, so both are finite iff every value is):
        # isfinite() goes through abs() and cost more than an ANN's forward pass
        xr = torch.view_as_real(x).flatten(1) if x.is_complex() else x
        if xr.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(xr))).all()):
            raise ValueError("signals contain NaN or Inf values: remove or mask those voxels")
        zero = ~(xr != 0).any(dim=1)
        n_zero = int(zero.sum())
        if n_zero:
            warnings.warn(f"{n_zero} all-zero fingerprints cannot be normalised; "
                          "their T1/T2 are NaN", RuntimeWarning, stacklevel=2)
        was_training = self.training
        self.eval()
        out = torch.empty((x.shape[0], 2), dtype=torch.float32)
        try:
            with torch.inference_mode():  # contiguous chunks: no gather copy of the input
                for start in range(0, x.shape[0], batch_size):
                    inp = preprocess(x[start:start + batch_size], self.hparams.input_mode)
                    out[start:start + batch_size] = self(inp.to(self.device)).float().cpu()
        finally:
            self.train(was_training)
        if n_zero:
            out[zero] = float("nan")
        return out

    # -- training -----------------------------------------------------------------------------
    def _step(self, batch: Batch, split: str) -> torch.Tensor:
        pred = self.net(batch.signal)
        loss = self.loss_fn(pred, batch.target)
        bs = batch.target.shape[0]
        self.log(f"{split}/loss", loss, on_step=split == "train", on_epoch=True,
                 prog_bar=True, batch_size=bs, sync_dist=split != "train")
        pred_ms = pred.detach() * self.target_scale
        for i, p in enumerate(_PARAMS):
            for m in ("mae_ms", "rmse_ms"):
                metric = self.metrics[f"{split}_"][f"{p}_{m}"]
                metric(pred_ms[:, i], batch.params_ms[:, i])
                self.log(f"{split}/{p}_{m}", metric, on_step=False, on_epoch=True,
                         prog_bar=split == "val" and m == "mae_ms", batch_size=bs)
        self._last_pred_ms = pred_ms
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Batch, batch_idx: int) -> dict:
        self._step(batch, "test")
        return {"pred_ms": self._last_pred_ms, "true_ms": batch.params_ms}

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr,
                               weight_decay=self.hparams.weight_decay)
        sched_cfg = self.hparams.get("scheduler")
        if not sched_cfg:
            return opt
        sched_cfg = dict(sched_cfg)
        interval = sched_cfg.pop("interval", "epoch")
        monitor = sched_cfg.pop("monitor", "val/loss")
        target = sched_cfg.pop("_target_")
        import importlib

        module, _, name = target.rpartition(".")
        sched = getattr(importlib.import_module(module), name)(opt, **sched_cfg)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": interval, "monitor": monitor}}


def load_checkpoint(path, map_location="cpu") -> MRFRegressor:
    """Load a trained :class:`MRFRegressor` from a checkpoint with no other argument.

    Returns:
        The module in eval mode; use ``.predict_parameters(signals)``.
    """
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    try:
        module = MRFRegressor.load_from_checkpoint(p, map_location=map_location,
                                                   weights_only=False)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - pickle/zip/key errors of a damaged or foreign file
        raise ValueError(f"checkpoint {str(path)!r} is not a readable mrflight checkpoint "
                         f"({type(e).__name__}: {e}); is it truncated, or from another "
                         "program?") from None
    module.eval()
    return module
