"""The LightningModule that trains every regressor, and checkpoint loading.

:class:`MRFRegressor` wraps any regressor of :mod:`mrflight.models` (given as its config
``{"_target_": class path, **kwargs}`` so that checkpoints reload with no injected object). It owns
the loss (see :data:`LOSSES`), Adam, an optional learning-rate scheduler and the metrics
(MAE and RMSE of T1 and T2 in ms, of B1 in % of nominal: torchmetrics for the evaluation sets,
sums over the epoch for training), logged as ``train/loss``, ``train/t1_mae_ms`` ... (at the
epoch's end), ``val/loss``, ``val/t1_mae_ms``, ``val/t1_rmse_ms``, ``val/t2_mae_ms``,
``val/t2_rmse_ms``, ``val/b1_mae_pct``, ``val/b1_rmse_pct``, the same under ``test/``, and under
``val@0.01/...`` for each fixed evaluation noise level of the data module.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric

from mrflight.config import to_plain
from mrflight.matching import float32_matmul
from mrflight.models import build_net, net_config
from mrflight.physics.checks import is_number
from mrflight.transforms import DEFAULT_TARGET_SCALE_MS, INPUT_MODES, preprocess

log = logging.getLogger("mrflight")

if TYPE_CHECKING:  # the batch type only; the inference API does not import the data modules
    from mrflight.data.batches import Batch

__all__ = ["MRFRegressor", "load_checkpoint", "outputs_to_params", "LOSSES", "PARAMETER_UNITS"]

#: per-sample error normalisations of the loss (see :meth:`MRFRegressor.loss`)
LOSSES = ("mse", "relative", "crb", "log", "l1")
#: name and unit of every parameter a model can estimate, in output order
PARAMETER_UNITS = {"t1": ("t1_ms", "ms"), "t2": ("t2_ms", "ms"), "b1": ("b1", "ratio to nominal")}


_PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
#: ``MRFRegressor._nonfinite_step`` (the epoch's first step with a NaN or infinite training
#: loss) while every loss of the epoch was finite
_ALL_FINITE = torch.iinfo(torch.int64).max


def _checked_training_range(value) -> dict | None:
    """``value`` as ``{"t1": [low, high], "t2": [low, high]}`` of floats (ms), or ``None``.

    Raises:
        ValueError: not such a dict of finite ranges with ``0 <= low <= high``.
    """
    value = to_plain(value)
    if value is None:
        return None
    try:
        out = {k: [float(v) for v in value[k]] for k in ("t1", "t2")}
    except (TypeError, KeyError, ValueError, IndexError):
        out = None
    if out is None or not all(len(v) == 2 and all(np.isfinite(v)) and 0 <= v[0] <= v[1]
                              for v in out.values()):
        raise ValueError(f"module.training_range must be {{t1: [low, high], t2: [low, high]}} "
                         f"in ms with 0 <= low <= high (or null: not recorded), got {value!r}")
    return out


def outputs_to_params(raw: torch.Tensor, target_scale: torch.Tensor,
                      log_output: bool) -> torch.Tensor:
    """A net's outputs as parameters: ``raw * target_scale``, or ``exp(raw) * target_scale``
    for a net trained with ``loss="log"`` (shared by :class:`MRFRegressor` and the exported
    graph)."""
    return (torch.exp(raw) if log_output else raw) * target_scale


@contextlib.contextmanager
def _precision(precision: str, device: torch.device):
    """The numeric mode of :meth:`MRFRegressor.predict_parameters` (restored on exit)."""
    if precision in ("bf16", "fp16"):
        half = torch.bfloat16 if precision == "bf16" else torch.float16
        with torch.autocast(device.type, dtype=half):
            yield
    else:
        with float32_matmul(device, "tf32" if precision == "tf32" else "ieee"):
            yield


class WeightedMean(Metric):
    """The mean of per-batch values weighted by their batch sizes, over every DDP rank: the
    loss of the evaluation sets. Lightning's ``sync_dist`` averages the summed batch sizes of
    the ranks as integers (shares of 101 and 100 signals were divided by 200, not 201), and
    torchmetrics' ``MeanMetric`` drops NaNs or, told not to, its weights; a NaN loss stays
    NaN here, as a diverged run must show."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: torch.Tensor, weight: int) -> None:
        self.total += value.detach().float() * weight
        self.weight += weight

    def compute(self) -> torch.Tensor:
        return self.total / self.weight


def _key(name: str) -> str:
    """ModuleDict key of a metric set (``val@0.01`` -> ``val@0_01_``: no dots, no clash with
    ``nn.Module.train``)."""
    return name.replace(".", "_") + "_"


class MRFRegressor(L.LightningModule):
    """Regress T1 and T2 (ms), and B1, from fingerprints with any :mod:`mrflight.models` network.

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
        noise_std: the training noise level, a number or ``[low, high]`` (recorded).
        targets: the estimated parameters in output order, ``["t1", "t2"]`` or
            ``["t1", "t2", "b1"]`` (the net has one output per target).
        loss: ``"mse"`` (squared error of the scaled targets), ``"relative"`` (squared relative
            error), ``"crb"`` (squared error divided by the per-sample Cramér–Rao bound: each
            parameter of each sample weighs as its precision allows; Zhang et al. 2022), ``"log"``
            (squared error of the logarithms: the net predicts ``log(params / target_scale)``
            and :meth:`forward` returns ``exp(net(x)) * target_scale``; it learns the posterior
            mean of ``log T1``, ``log T2``, ``log B1``, whose exponential is close to
            median-unbiased where the prior is log-uniform and weighs every parameter by its
            relative error), ``"l1"`` (absolute error of the scaled targets: it learns the posterior
            median of each parameter, which, unlike the mean, is the same for T1 or log T1).
        bias_weight: extra weight of the squared *bias*: with ``K > 1`` noise realisations of
            each fingerprint in a batch (``data.realizations``), the loss adds
            ``bias_weight * (mean_k e_k)^2`` to the mean of ``e_k^2`` (variance + bias^2), which
            pushes the estimator towards unbiasedness across noise levels (after Mao et al.
            2023). Ignored with one realisation.
        training_range: ``{"t1": [low, high], "t2": [low, high]}`` in ms, the T1 and T2 the
            network was trained on, kept in the checkpoint so that maps flag the estimates
            above it wherever the checkpoint goes
            (:class:`~mrflight.maps.NetworkReconstructor`). Training records its data module's
            (``training_range``: a simulated prior's ranges, a stored dictionary's train split)
            when the fit starts (:meth:`on_fit_start`); ``None``: not recorded (checkpoints
            written before this existed).

    References:
        Zhang et al., Cramér-Rao bound-informed training of neural networks for quantitative
        MRI, MRM 2022;88:436. Mao, Flassbeck, Assländer, Bias-reduced neural networks for
        parameter estimation in quantitative MRI, arXiv:2312.11468 (2023).
    """

    def __init__(self, net, lr: float = 1e-3, weight_decay: float = 0.0,
                 scheduler: dict | None = None,
                 target_scale_ms=DEFAULT_TARGET_SCALE_MS, sequence: dict | None = None,
                 input_mode: str = "magnitude", noise_std=None, targets=("t1", "t2"),
                 loss: str = "mse", bias_weight: float = 0.0,
                 training_range: dict | None = None) -> None:
        super().__init__()
        if isinstance(net, nn.Module):
            net_module, net = net, net_config(net)
        else:
            net = to_plain(net)
            if not isinstance(net, dict) or "_target_" not in net:
                raise ValueError("net must be an nn.Module or a config dict with '_target_'")
            net_module = build_net(net)
        if not lr > 0:
            raise ValueError(f"module.lr must be positive, got {lr}")
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
        scheduler = to_plain(scheduler)
        sequence = to_plain(sequence)
        targets = [str(t).lower() for t in (to_plain(targets) or ())]
        if targets not in (["t1", "t2"], ["t1", "t2", "b1"]):
            raise ValueError(f"targets must be [t1, t2] or [t1, t2, b1], got {targets}")
        target_scale_ms = [float(s) for s in target_scale_ms]
        if len(target_scale_ms) != len(targets):
            raise ValueError(f"target_scale_ms needs one scale per target {targets}, got "
                             f"{target_scale_ms}")
        if int(getattr(net_module, "n_outputs", 2)) != len(targets):
            raise ValueError(f"the net has {getattr(net_module, 'n_outputs', 2)} outputs but "
                             f"{len(targets)} targets {targets}: set the net's n_outputs")
        if loss not in LOSSES:
            raise ValueError(f"module.loss must be one of {LOSSES}, got {loss!r}")
        if not (float(bias_weight) >= 0 and np.isfinite(float(bias_weight))):
            raise ValueError(f"module.bias_weight must be a finite number >= 0, got "
                             f"{bias_weight!r}")
        noise_std = to_plain(noise_std)
        if loss == "crb" and noise_std is not None and not max(
                noise_std if isinstance(noise_std, (list, tuple)) else [noise_std]) > 0:
            # the bound of noise-free data is 0: every error would be divided by the clamp
            # (1e-6), a loss of about 1e11 that trains nothing meaningful
            raise ValueError(f"module.loss=crb divides each error by the sample's Cramér–Rao "
                             f"bound, which is 0 without noise (data.noise_std={noise_std!r}, "
                             "also set by debug=overfit): give data.noise_std > 0 or choose "
                             "another module.loss (l1, mse, relative, log)")
        training_range = _checked_training_range(training_range)
        self.save_hyperparameters({
            "net": net, "lr": float(lr), "weight_decay": float(weight_decay),
            "scheduler": scheduler, "target_scale_ms": target_scale_ms, "sequence": sequence,
            "input_mode": input_mode, "noise_std": noise_std, "targets": targets,
            "loss": loss, "bias_weight": float(bias_weight), "training_range": training_range,
        }, logger=False)  # loggers get a flat config from the pipeline, not the pulse arrays
        self.net = net_module
        if noise_std is not None and getattr(net_module, "rank", 0):
            # inputs noisier than the training noise are read as at its top (a checkpoint
            # written before this ceiling existed gets it from here when loaded)
            net_module.set_noise_ceiling(max(noise_std) if isinstance(noise_std, (list, tuple))
                                         else noise_std)
        self.targets = tuple(targets)
        self.register_buffer("target_scale", torch.tensor(target_scale_ms), persistent=False)
        self.log_output = loss == "log"
        self.loss_fn = nn.MSELoss()
        self.metrics = nn.ModuleDict({_key(split): self._metric_set()
                                      for split in ("val", "test")})
        self.eval_loss = nn.ModuleDict({split: WeightedMean() for split in ("val", "test")})
        # training errors: per target the sum of |error| and of error^2 over the epoch, and the
        # count, in each target's metric unit (x100: B1 in %). One update per step: six
        # torchmetrics updates and logs per step made a default GRU epoch 10 % slower (3-epoch
        # runs alternating on a 2-core CPU: 15.1 against 13.7 s)
        self._train_sums = torch.zeros(2, len(self.targets), dtype=torch.float64)
        self._train_count = 0
        self._nonfinite_step = torch.tensor(_ALL_FINITE)
        self._resumed_optimizer = None  # (lr, weight_decay) of a checkpoint resumed from
        self._percent = torch.tensor([100.0 if u == "pct" else 1.0 for u in self._units],
                                     dtype=torch.float64)

    def _metric_set(self) -> nn.ModuleDict:
        return nn.ModuleDict({
            f"{p}_{m}_{u}": MeanAbsoluteError() if m == "mae" else MeanSquaredError(squared=False)
            for p, u in zip(self.targets, self._units) for m in ("mae", "rmse")
        })

    @property
    def _units(self) -> list[str]:
        return ["pct" if p == "b1" else "ms" for p in self.targets]

    @property
    def parameter_names(self) -> list[str]:
        """Names of the columns of :meth:`predict_parameters` (``t1_ms``, ``t2_ms``[, ``b1``])."""
        return [PARAMETER_UNITS[p][0] for p in self.targets]

    @property
    def parameter_units(self) -> list[str]:
        """Units of the columns of :meth:`predict_parameters`."""
        return [PARAMETER_UNITS[p][1] for p in self.targets]

    @property
    def needs_bound(self) -> bool:
        """Whether the loss needs the per-sample Cramér–Rao bound in every batch."""
        return self.hparams.get("loss", "mse") == "crb"

    def setup(self, stage: str | None = None) -> None:
        """Create the metrics of the data module's extra evaluation sets (fixed noise levels)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        for name in getattr(dm, "eval_set_names", [""])[1:]:
            for split in ("val", "test"):
                if _key(split + name) not in self.metrics:
                    self.metrics[_key(split + name)] = self._metric_set().to(self.device)

    def on_fit_start(self) -> None:
        self._record_training_range()
        self._fit_basis()

    def _record_training_range(self) -> None:
        """Record the data module's ``training_range`` (T1/T2 in ms) as the
        ``training_range`` hyper-parameter, which Lightning writes into every checkpoint of
        the fit. A resumed run records it again from its data (a resume may not change the
        data: the same range); a data module without one leaves the recorded range as it is
        (the constructor's, else the resumed checkpoint's, see :meth:`on_load_checkpoint`).
        Every DDP rank holds the whole training range: nothing to gather."""
        dm = getattr(self.trainer, "datamodule", None)
        found = getattr(dm, "training_range", None)
        if found is not None:
            self.hparams["training_range"] = _checked_training_range(found)

    def on_test_start(self) -> None:
        self._fit_basis()  # a test of the initial weights (train=false)

    def _fit_basis(self) -> None:
        """Fit a network's data-dependent part before its first step (the subspace basis of
        :class:`mrflight.models.SubspaceRegressor` and of a recurrent net with ``rank``) from
        the run's sequence and the data's prior; a resumed run or a trained checkpoint has it
        already."""
        if getattr(self.net, "has_basis", True):
            return
        from mrflight.physics import Sequence

        if not self.hparams.get("sequence"):
            raise ValueError(f"{type(self.net).__name__} fits its basis to the run's sequence: "
                             "pass sequence=Sequence.to_dict() to MRFRegressor")
        prior = getattr(getattr(self.trainer, "datamodule", None), "prior", None)
        ranges = {"b1_range": (0.7, 1.3) if "b1" in self.targets else None}
        for key in ("t1_range", "t2_range", "b1_range"):
            if prior is not None and hasattr(prior, key):
                ranges[key] = getattr(prior, key)
        noise = self.hparams.get("noise_std")
        noise_min = min(noise) if isinstance(noise, (list, tuple)) else noise
        t0 = time.perf_counter()
        self.net.fit_basis(Sequence.from_dict(self.hparams["sequence"]), noise_min=noise_min,
                           **ranges)
        log.info("subspace basis of rank %d fitted in %.1f s", self.net.rank,
                 time.perf_counter() - t0)

    def on_train_start(self) -> None:
        """The configured schedule's settings win over a resumed checkpoint's. Lightning
        restores the scheduler's whole state, its settings (``T_max``, ``eta_min``, ...) with
        it, so a run resumed with a longer ``trainer.max_epochs`` (which ``T_max`` follows, see
        :func:`mrflight.resume.resume_config`) would keep the old ``T_max``, and the cosine
        schedule, periodic past it, would raise the learning rate again. So do ``module.lr``
        (the schedule goes on scaled by new / old: from the learning rate reached, times it)
        and ``module.weight_decay``, which Lightning would take from the optimizer's state."""
        cfg = self.hparams.get("scheduler") or {}
        for sc in self.trainer.lr_scheduler_configs:
            for key, value in cfg.items():
                old = getattr(sc.scheduler, key, None)
                if is_number(value) and is_number(old) and old != value:
                    setattr(sc.scheduler, key, value)
                    log.info("learning-rate schedule: %s %s (the checkpoint's: %s)", key,
                             value, old)
        old, new = self._resumed_optimizer, (self.hparams.lr, self.hparams.weight_decay)
        if old is not None and old != new:
            log.info("module.lr %g, module.weight_decay %g (the checkpoint's: %g, %g)",
                     *new, *old)
            ratio = new[0] / old[0]
            for group in (g for opt in self.trainer.optimizers for g in opt.param_groups):
                group["lr"] *= ratio
                group["weight_decay"] = new[1]
                if "initial_lr" in group:
                    group["initial_lr"] *= ratio
            for sc in self.trainer.lr_scheduler_configs:
                if hasattr(sc.scheduler, "base_lrs"):
                    sc.scheduler.base_lrs = [lr * ratio for lr in sc.scheduler.base_lrs]
        self._warn_of_a_cut_schedule()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        hp = checkpoint.get("hyper_parameters") or {}
        if is_number(hp.get("lr")) and is_number(hp.get("weight_decay")):
            self._resumed_optimizer = (float(hp["lr"]), float(hp["weight_decay"]))
        if self.hparams.get("training_range") is None and hp.get("training_range") is not None:
            # a resumed fit's module is built from the config, without the range its checkpoint
            # recorded: kept unless the data module gives one (on_fit_start)
            self.hparams["training_range"] = _checked_training_range(hp["training_range"])

    def _warn_of_a_cut_schedule(self) -> None:
        """A schedule over ``T_max`` epochs (the cosine's follows ``trainer.max_epochs``) that
        ``trainer.max_steps`` ends in an earlier epoch: its learning rate never decays to the
        end, and nothing else would say so. Not for ``trainer.fast_dev_run`` (``debug=
        fast_dev_run``): Lightning sets ``max_steps`` for that one-batch check itself."""
        trainer = self.trainer
        batches = trainer.num_training_batches
        if (trainer.fast_dev_run or trainer.max_steps < 0
                or not 0 < batches < float("inf")):
            return
        epochs = -(-trainer.max_steps // -(-int(batches) // trainer.accumulate_grad_batches))
        for sc in trainer.lr_scheduler_configs:
            t_max = getattr(sc.scheduler, "T_max", None)
            if sc.interval == "epoch" and is_number(t_max) and epochs < t_max:
                log.warning("trainer.max_steps=%d stops training in epoch %d of the %d of the "
                            "learning-rate schedule (module.scheduler.T_max, which follows "
                            "trainer.max_epochs): the learning rate does not decay to its end; "
                            "for the whole schedule give trainer.max_epochs=%d (or "
                            "module.scheduler.T_max=%d)", trainer.max_steps, epochs, t_max,
                            epochs, epochs)

    def metric_names(self, eval_set_names=("",)) -> list[str]:
        """Every metric name this module logs (``split/quantity``): the losses (``train/loss``
        also as ``train/loss_step`` and ``train/loss_epoch``) and each metric under its split
        and evaluation set, e.g. ``val/t1_mae_ms``, ``val@0.01/b1_rmse_pct``
        (``eval_set_names``: the data module's, ``""`` first). ``optimized_metric`` must be one
        of them."""
        names = ["train/loss", "train/loss_step", "train/loss_epoch", "val/loss", "test/loss"]
        keys = list(self._metric_set().keys())
        for split in ("train", "val", "test"):
            for s in ([""] if split == "train" else list(eval_set_names)):
                names += [f"{split}{s}/{k}" for k in keys]
        return names

    # -- inference ----------------------------------------------------------------------------
    @property
    def input_length(self) -> int:
        return int(self.net.input_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed inputs ``(B, T)`` / ``(B, 2, T)`` -> parameters ``(B, P)`` (ms, ratio)."""
        return self.to_params(self.net(x))

    def to_params(self, raw: torch.Tensor) -> torch.Tensor:
        """The net's outputs ``(B, P)`` as parameters (ms, ratio): :func:`outputs_to_params`."""
        return outputs_to_params(raw, self.target_scale, self.log_output)

    @torch.no_grad()
    def predict_parameters(self, signals, batch_size: int | None = None, *,
                           precision: str = "fp32") -> torch.Tensor:
        """Estimate T1 and T2 (ms) of fingerprints.

        Args:
            signals: ``(N, T)`` or ``(T,)``, complex or magnitude, numpy or torch, at any scale;
                preprocessed exactly as in training (magnitude, L2-normalised; or the two
                channels of the normalised complex signal for ``input_mode="complex"``).
            batch_size: inference chunk size; default on a CPU the network's
                ``cpu_batch_size`` (256, the fastest or close to it for the default models, see
                ``benchmarks/inference_speed.py``; 1024 for a GRU with a subspace basis) and
                65536 on a GPU (which needs large batches to fill it). Signals given as a
                tensor on the model's GPU are preprocessed there with no host round trip: the
                way to the GPU's full speed (a CPU tensor is copied chunk by chunk, and the GRU
                reads faster than PCIe delivers).
            precision: ``"fp32"`` (default), ``"tf32"`` (float32 matrix products on TF32 tensor
                cores, CUDA), ``"bf16"`` (bfloat16 autocast, CUDA or CPU) or ``"fp16"``
                (float16 autocast, CUDA: the fastest GRU on an H100 with the smallest change of
                the RMSE); the outputs are float32 in every case. ``benchmarks/gpu_check.py``
                compares the RMSE of each against fp32.

        Returns:
            float32 tensor ``(N, P)`` on the CPU: T1 and T2 in ms, then B1 (ratio to nominal)
            for models that estimate it (column names in :attr:`parameter_names`). All-zero
            fingerprints give NaN rows (with a warning).

        Raises:
            ValueError: wrong number of time points (names the expected length and sequence),
                NaN/Inf values, or ``batch_size < 1``.
        """
        x = self._signal_matrix(signals)
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        if precision == "fp16" and self.device.type != "cuda":
            raise ValueError("precision='fp16' (float16 autocast) needs the model on a CUDA GPU; "
                             "on a CPU use precision='bf16'")
        if batch_size is None:
            batch_size = (65536 if self.device.type == "cuda"
                          else int(getattr(self.net, "cpu_batch_size", 256)))
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = int(batch_size)
        x, zero = self._checked_values(x)
        n_zero = int(zero.sum())
        was_training = self.training
        self.eval()
        # signals already on the model's device stay there (preprocessed there, estimates
        # gathered there): no host round trip
        out = torch.empty((x.shape[0], len(self.targets)), dtype=torch.float32,
                          device=self.device if x.device == self.device else "cpu")
        try:
            with torch.inference_mode(), _precision(precision, self.device):
                for start in range(0, x.shape[0], batch_size):
                    inp = preprocess(x[start:start + batch_size], self.hparams.input_mode)
                    out[start:start + batch_size] = self(inp.to(self.device)).float()
        finally:
            self.train(was_training)
        out = out.cpu()
        if n_zero:
            out[zero.cpu()] = float("nan")
        return out

    def _signal_matrix(self, signals) -> torch.Tensor:
        """``signals`` as an ``(N, T)`` tensor; a wrong ``T`` names the model's sequence."""
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
        return x

    def _checked_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real input as float32 (float64 kept), NaN/Inf and negative real values (not a
        magnitude) refused; returns ``(x, all-zero rows)``
        and warns (at the caller of :meth:`predict_parameters`) of real input to a complex
        model and of all-zero fingerprints."""
        if not x.is_complex():
            if self.hparams.input_mode == "complex":
                warnings.warn("this model was trained on complex fingerprints but got real "
                              "ones: a magnitude has lost the sign changes of the signal, so "
                              "its estimates are biased; pass the complex series, or use a "
                              "model trained with data.input_mode=magnitude", RuntimeWarning,
                              stacklevel=4)  # past torch.no_grad's wrapper
            if x.dtype != torch.float64:
                x = x.to(torch.float32)
        # validate everything first so that a bad voxel fails before any work is done. On the
        # real view, by min and max (NaN propagates, so both are finite iff every value is):
        # isfinite() goes through abs() and cost more than an ANN's forward pass
        xr = torch.view_as_real(x).flatten(1) if x.is_complex() else x
        if xr.numel():
            low_high = torch.stack(torch.aminmax(xr))
            if not bool(torch.isfinite(low_high).all()):
                raise ValueError("signals contain NaN or Inf values: remove or mask those voxels")
            if not x.is_complex():  # real input is read as a magnitude, as the matcher reads it
                from mrflight.matching import check_magnitude

                check_magnitude(float(low_high[0]), "the real-valued signals")
        zero = ~(xr != 0).any(dim=1)
        n_zero = int(zero.sum())
        if n_zero:
            warnings.warn(f"{n_zero} all-zero fingerprints cannot be normalised; "
                          "their T1/T2 are NaN", RuntimeWarning, stacklevel=4)
        return x, zero

    # -- training -----------------------------------------------------------------------------
    def loss(self, pred: torch.Tensor, batch: Batch) -> torch.Tensor:
        """The training loss of scaled predictions ``(R, P)`` for ``batch``.

        ``R = K * B`` rows for ``K`` noise realisations of each of the ``B`` fingerprints
        (grouped). The per-sample error ``e`` is the scaled error (``mse``), the relative error
        (``relative``), the error in units of the sample's Cramér–Rao bound (``crb``) or the
        error of the logarithms (``log``, ``pred`` being the log of the scaled estimate); the loss
        is the mean of ``e^2`` (of ``|e|`` for ``l1``) plus ``bias_weight`` times the mean squared
        bias over the realisations.
        """
        kind = self.hparams.get("loss", "mse")
        target = batch.target
        k = pred.shape[0] // target.shape[0]
        if kind == "mse" and k == 1:
            return self.loss_fn(pred, target)
        if k > 1:
            target = target.repeat_interleave(k, dim=0)
        if kind == "log":
            target = target.clamp_min(1e-6).log()
        err = pred - target
        if kind == "relative":
            err = err / target.clamp_min(1e-6)
        elif kind == "crb":
            if batch.bound is None:
                raise ValueError("module.loss=crb needs the per-sample bound in every batch: the "
                                 "data module did not provide it (set its with_bound)")
            bound = batch.bound / self.target_scale
            err = err / bound.clamp_min(1e-6).repeat_interleave(k, dim=0)
        loss = err.abs().mean() if kind == "l1" else (err ** 2).mean()
        w = float(self.hparams.get("bias_weight", 0.0))
        if k > 1 and w > 0:
            bias = err.view(-1, k, err.shape[-1]).mean(dim=1)
            loss = loss + w * (bias ** 2).mean()
        return loss

    def _step(self, batch: Batch, split: str, dataloader_idx: int = 0) -> torch.Tensor:
        pred = self.net(batch.signal)
        k = pred.shape[0] // batch.target.shape[0]
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        name = split + getattr(dm, "eval_set_names", [""])[dataloader_idx]
        bs = batch.target.shape[0]
        if name == split:
            loss = self.loss(pred, batch)
            logged = loss
            if split != "train":
                logged = self.eval_loss[split]
                logged.update(loss, bs)
            self.log(f"{split}/loss", logged, on_step=split == "train", on_epoch=True,
                     prog_bar=True, batch_size=bs, add_dataloader_idx=False)
        else:
            loss = None
        pred_ms = self.to_params(pred.detach())
        if k > 1:  # metrics of the first realisation of each fingerprint
            pred_ms = pred_ms[::k]
        if split == "train":
            err = (pred_ms - batch.params_ms).double() * self._percent.to(pred_ms.device)
            sums = torch.stack([err.abs().sum(0), err.square().sum(0)])
            self._train_sums = self._train_sums.to(sums.device) + sums
            self._train_count += err.shape[0]
            return loss
        for i, (p, u) in enumerate(zip(self.targets, self._units)):
            f = 100.0 if u == "pct" else 1.0
            for m in ("mae", "rmse"):
                metric = self.metrics[_key(name)][f"{p}_{m}_{u}"]
                metric(pred_ms[:, i] * f, batch.params_ms[:, i] * f)
                self.log(f"{name}/{p}_{m}_{u}", metric, on_step=False, on_epoch=True,
                         prog_bar=name == "val" and m == "mae" and p != "b1", batch_size=bs,
                         add_dataloader_idx=False)
        self._last_pred_ms = pred_ms
        return loss

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        # the first step whose loss is not finite, kept on the device: read (synchronised) only
        # by _stop_if_diverged, before validation and at the epoch's end
        self._nonfinite_step = torch.where(torch.isfinite(loss.detach()), self._nonfinite_step,
                                           self._nonfinite_step.clamp(max=self.global_step + 1))
        return loss

    def on_train_epoch_start(self) -> None:
        self._train_sums = torch.zeros_like(self._train_sums)
        self._train_count = 0
        self._nonfinite_step = torch.full((), _ALL_FINITE, device=self.device)

    def on_validation_start(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._stop_if_diverged()

    def _stop_if_diverged(self) -> None:
        """End a fit whose weights are no longer finite (a NaN or infinite loss or gradient)
        with one error naming the step and the fix, before validation and the checkpoints: the
        checkpoints keep the last finite epoch, and no epoch is trained on in vain. Once
        NaN, the weights stay NaN; the loss alone is not enough (under float16 AMP the
        gradient scaler skips the step of an infinite loss)."""
        finite = torch.stack([torch.isfinite(p).all() for p in self.parameters()]).all()
        # the step named where the weights are not finite: the first non-finite loss, else the last
        step = torch.where(finite, _ALL_FINITE, self._nonfinite_step.clamp(max=self.global_step))
        step = int(self.trainer.strategy.reduce(step, reduce_op="min"))  # every DDP rank stops
        if step == _ALL_FINITE:
            return
        epoch, max_epochs = self.current_epoch + 1, self.trainer.max_epochs
        where = f"step {step} (epoch {epoch}{f' of {max_epochs}' if (max_epochs or 0) > 0 else ''})"
        what = (f"the training loss was NaN or infinite in {where}"
                if int(self._nonfinite_step) != _ALL_FINITE else
                f"the weights became NaN or infinite in {where}, the loss finite")
        clip = ("" if self.trainer.gradient_clip_val else
                ", or clip the gradients (+trainer.gradient_clip_val=1.0)")
        kept = (f"; the checkpoints up to epoch {epoch - 1} are kept"
                if epoch > 1 and self.trainer.checkpoint_callbacks else "")
        raise ValueError(f"training diverged: {what}: train again with a lower module.lr "
                         f"(this run's: {self.hparams.lr:g}){clip}{kept}")

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training MAE and RMSE of every target (summed over DDP ranks), once
        its weights are known to be finite (where no validation checked them)."""
        self._stop_if_diverged()
        if not self._train_count:
            return
        strategy = self.trainer.strategy
        sums = strategy.reduce(self._train_sums, reduce_op="sum")
        n = float(strategy.reduce(torch.tensor(float(self._train_count), device=sums.device),
                                  reduce_op="sum"))
        for i, (p, u) in enumerate(zip(self.targets, self._units)):
            self.log(f"train/{p}_mae_{u}", float(sums[0, i] / n))
            self.log(f"train/{p}_rmse_{u}", float((sums[1, i] / n).sqrt()))

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, "val", dataloader_idx)

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> dict:
        self._step(batch, "test", dataloader_idx)
        if dataloader_idx == 0:
            return {"pred_ms": self._last_pred_ms, "true_ms": batch.params_ms}
        return {}

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr,
                               weight_decay=self.hparams.weight_decay)
        sched_cfg = self.hparams.get("scheduler")
        if not sched_cfg:
            return opt
        sched_cfg = dict(sched_cfg)
        interval = sched_cfg.pop("interval", "epoch")
        monitor = sched_cfg.pop("monitor", "val/loss")
        from mrflight.checkpoints import scheduler_class

        sched = scheduler_class(sched_cfg.pop("_target_"))(opt, **sched_cfg)
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": sched, "interval": interval, "monitor": monitor}}


def load_checkpoint(path, map_location="cpu") -> MRFRegressor:
    """Load a trained :class:`MRFRegressor` from a checkpoint with no other argument.

    Safe for checkpoints from untrusted sources: the file is read with
    ``torch.load(weights_only=True)`` (tensors and plain values only; pickled objects are
    refused) and the network is built only from the registered mrflight regressors
    (:func:`mrflight.models.base.build_net`).

    Args:
        path: a ``.ckpt`` file (for a run directory, see
            :func:`mrflight.checkpoints.best_checkpoint`).
        map_location: device of the weights (``"cpu"``, ``"cuda"``...).

    Returns:
        The module in eval mode; use ``.predict_parameters(signals)``.

    Raises:
        ValueError: a missing file or a directory, a truncated or foreign file, pickled objects,
            a network that is not an mrflight regressor, NaN or infinite weights (a diverged
            run's), or an unusable device.
    """
    from mrflight.checkpoints import read_checkpoint, state_dict_mismatch
    from mrflight.physics._device import check_device

    if isinstance(map_location, (str, torch.device)):
        check_device(map_location)
    read_checkpoint(path)  # the clear errors (missing, directory, truncated, pickled objects)
    try:
        module = MRFRegressor.load_from_checkpoint(Path(str(path)).expanduser(),
                                                   map_location=map_location, weights_only=True)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - missing keys or shapes of a foreign checkpoint
        raise ValueError(f"checkpoint {str(path)!r} is not a readable mrflight checkpoint "
                         f"({type(e).__name__}: {state_dict_mismatch(e)}); is it from another "
                         "program or version?") from None
    bad = next((n for n, w in module.named_parameters() if not torch.isfinite(w).all()), None)
    if bad is not None:  # a diverged run's: every estimate would be NaN
        raise ValueError(f"checkpoint {str(path)!r} has NaN or infinite weights ({bad}): its "
                         "training diverged; use a checkpoint of an earlier epoch, or train "
                         "again with a lower module.lr")
    module.eval()
    return module
