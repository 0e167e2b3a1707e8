"""``SimulatedDataModule``: fresh simulated fingerprints for every training batch.

No dictionary is stored for training. Every training batch draws new tissue parameters from a
configured prior (:class:`ParameterPrior`: T1 and T2, uniform or log-uniform, T2 <= T1; B1, the
flip-angle scale; the noise level, fixed or drawn per sample) and simulates them with
:func:`mrflight.physics.simulate`. An "epoch" is ``batches_per_epoch`` batches.

Where the work is done: on a CPU the batch is simulated, noised and preprocessed in the
DataLoader (``num_workers=1``, the default, overlaps that with the training step on the other
core); on a GPU (``simulate_on="device"``, chosen automatically for a CUDA trainer) the loader
only draws the parameters and the simulation and noise run on the GPU in
:meth:`SimulatedDataModule.on_after_batch_transfer`, with no host round trip of the signals.
There one call simulates, noises and preprocesses ``batches_per_launch`` consecutive batches
(default: 32 768 fingerprints), because one batch of 1024 atoms would occupy only a few of the
GPU's multiprocessors and its noise and preprocessing would be a series of small kernels; each
batch still has its own parameters and noise levels.

Determinism: training batch ``i`` of epoch ``e`` on rank ``r`` is a function of ``(seed, e, i,
r)`` only: the parameters come from ``numpy.random.default_rng(stream_seed(seed, 2, e, i, r))``
and the noise from a torch generator seeded with ``stream_seed(seed, 1, e, i, r)`` (on the
device: of the group's first batch ``i``, so there ``batches_per_launch`` matters too), so a resumed
run sees exactly the batches of an uninterrupted one, whatever the worker count.

Validation and test sets are fixed: ``n_val`` / ``n_test`` parameter sets drawn from the prior
with ``split_seed``, simulated once (cached on disk through
:func:`mrflight.dictionary.generate`), with noise fixed per index (``noise_seed``). Each is
evaluated with per-sample noise levels drawn from the prior (metrics ``val/...``, ``test/...``;
``val/loss`` drives early stopping) and at each of ``eval_noise_levels`` (metrics
``val@0.01/...``).

Noise model (as everywhere in mrflight): the complex fingerprint is L2-normalised, multiplied by
a random global phase ``exp(i phi)`` (``random_phase``; real scanners give every voxel its own
phase), and complex Gaussian noise with standard deviation ``noise_std`` on the real and on the
imaginary part is added. A voxel of proton density ``rho`` under noise ``sigma`` is the same
as a unit-norm fingerprint under noise ``sigma / rho``: the noise range covers both.

References:
    Barbieri et al., A deep learning approach for MRF parameter estimation with continuous
    random training data, NMR Biomed 2022 (fresh continuous training data, varied noise).
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mrflight.physics import Sequence, normalize
from mrflight.physics._triton_glue import LazyKernel, guarded_kernel
from mrflight.physics.checks import count
from mrflight.transforms import INPUT_MODES, preprocess

from .batches import (
    Batch,
    ModelInputs,
    TrainingSeed,
    collate,
    eval_sampler,
    loader_context,
    stream_seed,
    training_epoch,
)

__all__ = ["ParameterPrior", "SimulatedDataModule", "TARGETS", "DEFAULT_SCALES"]

#: the parameters a network can estimate, in output order
TARGETS = ("t1", "t2", "b1")
#: divisor of each target for the loss (T1, T2 in ms; B1 a ratio). With MSE, the scales weigh
#: the targets against each other: B1 at 1 and T1 at 4000 ms gave B1 about half of the loss and
#: T1 a twentieth; T1 at 2000 and B1 at 2 brought the default GRU's T1 from 1.14x to 1.07x the
#: bound (T2 1.17x to 1.18x)
DEFAULT_SCALES = {"t1": 2000.0, "t2": 500.0, "b1": 2.0}
_DISTRIBUTIONS = ("uniform", "log-uniform")


def _pair(name: str, value, positive: bool = True) -> tuple[float, float]:
    """``value`` as a ``(low, high)`` pair of finite floats (a scalar gives ``(v, v)``)."""
    try:
        vals = [float(value)] * 2 if np.ndim(value) == 0 else [float(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number or a pair [low, high], got {value!r}") from None
    if len(vals) != 2:
        raise ValueError(f"{name} must be a number or a pair [low, high], got {value!r}")
    lo, hi = vals
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi < lo or (positive and lo <= 0) \
            or lo < 0:
        raise ValueError(f"{name} must be finite with {'0 <' if positive else '0 <='} low <= "
                         f"high, got {value!r}")
    return lo, hi


class ParameterPrior:
    """The distribution of the training parameters: T1, T2, B1 and the noise level.

    T1 is drawn from ``t1_range``; T2 from ``t2_range`` capped at the sample's T1 when
    ``t2_le_t1`` (T2 > T1 is unphysical), both uniform or uniform in the logarithm
    (``distribution="log-uniform"``: equal weight per octave, the natural prior for relaxation
    times that span two decades). B1 is uniform in ``b1_range``; the noise standard deviation is
    log-uniform in ``noise_std`` (a pair) or fixed (a number).

    Args:
        t1_range: ``(low, high)`` T1 in ms.
        t2_range: ``(low, high)`` T2 in ms; ``low`` must not exceed ``t1_range``'s low when
            ``t2_le_t1``.
        distribution: ``"log-uniform"`` or ``"uniform"`` for T1 and T2.
        b1_range: ``(low, high)`` flip-angle scale (ratio to nominal), or ``None`` for B1 = 1.
        noise_std: noise std relative to the unit-norm fingerprint: a number, or ``(low,
            high)`` drawn log-uniformly per sample.
        t2_le_t1: cap T2 at T1.
    """

    def __init__(self, t1_range=(50.0, 5000.0), t2_range=(5.0, 600.0),
                 distribution: str = "log-uniform", b1_range=(0.7, 1.3),
                 noise_std=(0.005, 0.03), t2_le_t1: bool = True) -> None:
        if distribution not in _DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {_DISTRIBUTIONS}, got "
                             f"{distribution!r}")
        self.t1_range = _pair("data.t1_range", t1_range)
        self.t2_range = _pair("data.t2_range", t2_range)
        self.b1_range = None if b1_range is None else _pair("data.b1_range", b1_range)
        self.noise_std = _pair("data.noise_std", noise_std, positive=False)
        if self.noise_std[0] == 0 and self.noise_std[1] > 0:
            raise ValueError(f"data.noise_std={noise_std!r}: a log-uniform noise range needs a "
                             "positive lower end (e.g. [0.005, 0.03]); use 0 for noise-free")
        self.distribution = distribution
        self.t2_le_t1 = bool(t2_le_t1)
        if self.t2_le_t1 and self.t2_range[0] > self.t1_range[0]:
            raise ValueError(f"data.t2_range low ({self.t2_range[0]} ms) exceeds data.t1_range "
                             f"low ({self.t1_range[0]} ms): with T2 <= T1 the shortest T1 has no "
                             "T2; lower t2_range or raise t1_range")

    @property
    def estimates_b1(self) -> bool:
        return self.b1_range is not None

    def _draw(self, rng: np.random.Generator, lo, hi, n: int, log: bool) -> np.ndarray:
        u = rng.random(n)
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        if log:
            return np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
        return lo + u * (hi - lo)

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``n`` samples.

        Returns:
            ``(params, noise_std)``: float64 ``(n, 3)`` T1 ms, T2 ms, B1; float64 ``(n,)``.
        """
        log = self.distribution == "log-uniform"
        t1 = self._draw(rng, *self.t1_range, n, log)
        t2_hi = np.minimum(self.t2_range[1], t1) if self.t2_le_t1 else self.t2_range[1]
        t2 = self._draw(rng, self.t2_range[0], t2_hi, n, log)
        b1 = (np.ones(n) if self.b1_range is None
              else self._draw(rng, *self.b1_range, n, False))
        lo, hi = self.noise_std
        noise = np.full(n, lo) if lo == hi else self._draw(rng, lo, hi, n, True)
        return np.stack([t1, t2, b1], axis=1), noise

    @property
    def t2_top(self) -> float:
        """The largest T2 drawn: the top of ``t2_range``, capped at T1's top with ``t2_le_t1``."""
        return min(self.t2_range[1], self.t1_range[1]) if self.t2_le_t1 else self.t2_range[1]

    def bounds(self) -> dict:
        """The prior's extremes, for a simulation truncation verified once for all draws."""
        b1 = self.b1_range or (1.0, 1.0)
        return {"t1_max": self.t1_range[1], "t2_max": self.t2_top, "b1_range": b1}


def realise(clean: torch.Tensor, noise_std: torch.Tensor, generator: torch.Generator,
            random_phase: bool, input_mode: str, realizations: int = 1) -> torch.Tensor:
    """Noisy model inputs from clean fingerprints: normalise, global phase, noise, preprocess.

    Args:
        clean: ``(B, T)`` complex fingerprints (any scale).
        noise_std: ``(B,)`` noise std per fingerprint (relative to its unit-norm version).
        generator: the torch generator of this batch's noise (on the signals' device).
        random_phase: multiply each fingerprint by ``exp(i phi)``, ``phi`` uniform.
        input_mode: see :func:`mrflight.data.preprocess`.
        realizations: ``K`` noise draws per fingerprint, grouped: rows ``b*K .. b*K+K-1`` are
            fingerprint ``b``.

    Returns:
        Model inputs of ``K*B`` rows.

    On CUDA with Triton the arithmetic after the random draws runs as one fused kernel
    (:mod:`mrflight.data._realise_triton`: 1.8 ms with the draws for a launch of 32 768
    fingerprints, against 8.7 ms for this chain of full-size element-wise passes, on two
    H100s a day apart), which
    gives the same inputs up to float32 rounding.
    """
    dev = clean.device
    rows, t = clean.shape[0] * realizations, clean.shape[1]
    phi = (torch.rand(clean.shape[0], generator=generator, device=dev) * (2 * math.pi)
           if random_phase else None)
    nr = torch.randn((rows, t), generator=generator, device=dev)
    ni = torch.randn((rows, t), generator=generator, device=dev)
    fused = _fused_realise() if dev.type == "cuda" else None
    if fused is not None:
        out = guarded_kernel(lambda: fused(clean, noise_std, nr, ni, phi, input_mode,
                                           realizations),
                             "the fused noise kernel", "using the torch element-wise path")
        if out is not None:
            return out
        _FUSED.disable()
    x = normalize(clean.to(torch.complex64))
    if phi is not None:
        x = x * torch.polar(torch.ones_like(phi), phi)[:, None]
    if realizations > 1:
        x = x.repeat_interleave(realizations, dim=0)
        noise_std = noise_std.repeat_interleave(realizations)
    noisy = x + noise_std.to(dev, torch.float32)[:, None] * torch.complex(nr, ni)
    return preprocess(noisy, input_mode)


_FUSED = LazyKernel("mrflight.data._realise_triton", "realise_fused")


def _fused_realise():
    """:func:`mrflight.data._realise_triton.realise_fused`, or ``None`` without Triton (or with
    ``MRFLIGHT_NO_TRITON=1``, or after it failed once in this process)."""
    return _FUSED.get()


class _EpochKeys(DistributedSampler):
    """Yields ``(epoch, batch index)`` keys: every batch of this rank's epoch.

    The epoch is read for every key: from ``epoch_fn`` (the trainer's, see
    :func:`~mrflight.data.batches.training_epoch`) where given, else from :meth:`set_epoch`.
    Loader workers are sent their first keys as soon as the iterator exists, which on a resumed
    run is before the trainer has set the epoch; should a key still be stale,
    :meth:`SimulatedDataModule.on_after_batch_transfer` redraws its batch.

    A ``DistributedSampler`` of one replica, so that Lightning does not wrap it in one that
    shares the keys out among the DDP ranks: each rank draws its own batches (the rank is part
    of every draw) and trains ``n_batches`` of them per epoch.
    """

    def __init__(self, n_batches: int, epoch_fn=None) -> None:
        super().__init__(range(int(n_batches)), num_replicas=1, rank=0, shuffle=False)
        self.n_batches = int(n_batches)
        self.epoch_fn = epoch_fn

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n_batches

    def __iter__(self):
        # a generator: the epoch is read at each key, not when the iterator is made
        for i in range(self.n_batches):
            yield (int(self.epoch_fn()) if self.epoch_fn is not None else self.epoch, i)


class BatchSimulator:
    """Draws and simulates the training batches (picklable: loader workers hold a copy).

    Args:
        sequence: the pulse train.
        prior: the parameter prior.
        targets: estimated parameter names (see :data:`TARGETS`).
        scale: ``(P,)`` target divisors.
        batch_size: fingerprints per batch.
        input_mode: see :func:`mrflight.data.preprocess`.
        random_phase: random global phase per fingerprint.
        realizations: noise draws per fingerprint.
        bound_table: per-sample bounds of training batches interpolated from a
            :class:`~mrflight.physics.crb_table.CRBTable` of the prior's range (built once);
            ``False``: computed exactly for every batch (a Jacobian simulation per sample).
    """

    def __init__(self, sequence: Sequence, prior: ParameterPrior, targets, scale: torch.Tensor,
                 batch_size: int, input_mode: str, random_phase: bool,
                 realizations: int, bound_table: bool = True) -> None:
        from mrflight.physics.epg import truncation_rate

        self.sequence, self.prior, self.targets = sequence, prior, tuple(targets)
        self.columns = [TARGETS.index(t) for t in self.targets]
        self.scale, self.batch_size = scale, int(batch_size)
        self.input_mode, self.random_phase = input_mode, bool(random_phase)
        self.realizations = int(realizations)
        self.with_bound = False
        self.bound_table = bool(bound_table)
        self._table = None
        b = prior.bounds()
        # the truncation verified once for the whole prior: no probing per batch
        self.rate = truncation_rate(sequence, 1e-3, b["t2_max"], b["t1_max"],
                                    tuple(b["b1_range"]))

    def draw(self, seed: int, epoch: int, index: int, rank: int) -> Batch:
        """Parameters and noise levels of one batch: a function of its arguments only."""
        rng = np.random.default_rng(stream_seed(seed, 2, epoch, index, rank))
        params, noise = self.prior.sample(self.batch_size, rng)
        p = torch.from_numpy(params[:, self.columns]).to(torch.float32)
        return Batch(signal=torch.empty(0), target=p / self.scale, params_ms=p,
                     noise_std=torch.from_numpy(noise).to(torch.float32),
                     sim_params=torch.from_numpy(params),
                     key=torch.tensor([stream_seed(seed, 1, epoch, index, rank), epoch, index]))

    def draw_launch(self, seed: int, epoch: int, first: int, last: int, rank: int) -> Batch:
        """Batches ``first .. last - 1`` of an epoch drawn as one batch (fields concatenated in
        order; the noise key of the first), for one simulation and noise draw on a device."""
        draws = [self.draw(seed, epoch, j, rank) for j in range(first, last)]
        return Batch(*(None if f[0] is None else torch.cat(f)
                       for f in zip(*(d[:-1] for d in draws))), key=draws[0].key)

    def simulate(self, params: torch.Tensor) -> torch.Tensor:
        """Clean complex fingerprints ``(B, T)`` of ``(B, 3)`` T1, T2, B1 on their device."""
        from mrflight.physics import simulate

        return simulate(self.sequence, params[:, 0], params[:, 1], params[:, 2],
                        device=params.device, _rate=self.rate)

    def table(self):
        """The bound table of the prior's range (built at the first call, ~2 s on a CPU)."""
        from mrflight.physics.crb_table import CRBTable

        if self._table is None:
            t2 = (self.prior.t2_range[0], min(self.prior.t2_range[1], self.prior.t1_range[1]))
            self._table = CRBTable(self.sequence, self.prior.t1_range, t2,
                                   self.prior.b1_range, estimate_b1="b1" in self.targets,
                                   phase_nuisance=self.random_phase)
        return self._table

    def bounds(self, params: torch.Tensor, noise_std: torch.Tensor,
               exact: bool = False) -> torch.Tensor:
        """Per-sample Cramér–Rao bound of the targets ``(B, P)`` (ms, ms, ratio): from the
        table (``bound_table``) unless ``exact``."""
        from mrflight.physics import crb

        if self.bound_table and not exact:
            b = self.table().to(params.device)(params[:, 0], params[:, 1], params[:, 2])
            return (b * noise_std.to(b)[:, None]).to(torch.float32)
        b = crb(self.sequence, params[:, 0], params[:, 1], 1.0, b1=params[:, 2],
                estimate_b1="b1" in self.targets, phase_nuisance=self.random_phase)
        return (b.to(torch.float32).cpu()
                * noise_std.cpu().to(torch.float32)[:, None]).to(noise_std.device)

    def realise(self, batch: Batch, clean: torch.Tensor | None = None) -> Batch:
        """Simulate (unless its ``clean`` fingerprints are given), noise and preprocess a drawn
        batch on the device of its tensors."""
        dev = batch.target.device
        params = batch.sim_params.to(dev)
        with torch.no_grad():
            if clean is None:
                clean = self.simulate(params)
            g = torch.Generator(device=dev)
            g.manual_seed(int(batch.key[0]))
            signal = realise(clean, batch.noise_std, g, self.random_phase, self.input_mode,
                             self.realizations)
            bound = self.bounds(params, batch.noise_std) if self.with_bound else None
        return batch._replace(signal=signal, bound=bound)


class _TrainBatches(Dataset):
    """Training batches keyed by ``(epoch, index)``; simulated here or on the device later."""

    def __init__(self, sim: BatchSimulator, n_batches: int, seed: int, rank: int) -> None:
        self.sim, self.n_batches, self.seed, self.rank = sim, int(n_batches), int(seed), int(rank)
        self.simulate_here = True

    def __len__(self) -> int:
        return self.n_batches

    def __getitem__(self, key) -> Batch:
        epoch, i = key
        batch = self.sim.draw(self.seed, epoch, i, self.rank)
        return self.sim.realise(batch) if self.simulate_here else batch


def _check_counts(**counts) -> None:
    """Every count (``data.<name>``) is a positive integer (``num_workers`` is passed + 1)."""
    for name, v in counts.items():
        count(v, f"data.{name}")


def _sequence_and_targets(sequence, targets) -> tuple[Sequence, tuple[str, ...]]:
    """The pulse train (from its ``to_dict()`` too) and the lower-cased target names."""
    if isinstance(sequence, dict):
        sequence = Sequence.from_dict(sequence)
    if not isinstance(sequence, Sequence):
        raise ValueError("data=simulated needs a sequence (the pipeline passes the run's "
                         f"sequence config), got {type(sequence).__name__}")
    targets = tuple(str(t).lower() for t in targets)
    if targets[:2] != ("t1", "t2") or not set(targets) <= set(TARGETS) \
            or len(set(targets)) != len(targets):
        raise ValueError(f"data.targets must be [t1, t2] or [t1, t2, b1], got {list(targets)}")
    return sequence, targets


def _check_choices(eval_noise_levels, input_mode: str, simulate_on: str) -> list[float]:
    """Check the evaluation noise levels, input mode and simulation place; the levels."""
    levels = [float(s) for s in (eval_noise_levels or ())]
    if any(not (math.isfinite(s) and s >= 0) for s in levels):
        raise ValueError(f"data.eval_noise_levels must be finite numbers >= 0, got "
                         f"{eval_noise_levels}")
    if input_mode not in INPUT_MODES:
        raise ValueError(f"data.input_mode must be one of {INPUT_MODES}, got {input_mode!r}")
    if simulate_on not in ("auto", "loader", "device"):
        raise ValueError(f"data.simulate_on must be auto, loader or device, got "
                         f"{simulate_on!r}")
    return levels


def _target_scales(targets, target_scale_ms) -> tuple[float, ...]:
    """One positive divisor per target (``None``: :data:`DEFAULT_SCALES`)."""
    if target_scale_ms is None:
        target_scale_ms = [DEFAULT_SCALES[t] for t in targets]
    scale = tuple(float(s) for s in target_scale_ms)
    if len(scale) != len(targets) or min(scale) <= 0:
        raise ValueError(f"data.target_scale_ms must be {len(targets)} positive numbers (one "
                         f"per target {list(targets)}), got {target_scale_ms}")
    return scale


#: fingerprints simulated per kernel launch on a GPU (fills an H100/H200 with programs)
_FINGERPRINTS_PER_LAUNCH = 32768


class SimulatedDataModule(ModelInputs, TrainingSeed, L.LightningDataModule):
    """Fresh simulated training fingerprints every batch; fixed, seeded validation and test sets.

    Args:
        sequence: the pulse train (a :class:`~mrflight.physics.Sequence` or its ``to_dict()``).
        targets: estimated parameters, a subset of ``("t1", "t2", "b1")`` starting with T1 and
            T2. Without ``"b1"`` B1 is fixed at 1 (``b1_range`` is ignored).
        t1_range, t2_range, distribution, b1_range, noise_std: the prior, see
            :class:`ParameterPrior`.
        batch_size: training fingerprints per batch.
        batches_per_epoch: training batches per epoch.
        realizations: noise draws per training fingerprint (``K``; the batch has
            ``K * batch_size`` inputs, grouped per fingerprint), for the bias-reducing loss.
        n_val, n_test: sizes of the fixed validation and test sets.
        eval_noise_levels: fixed noise levels at which validation and test are also reported.
        eval_batch_size: batch size of validation and test.
        input_mode: ``"magnitude"`` or ``"complex"`` (see :func:`mrflight.data.preprocess`).
        random_phase: give every fingerprint a random global phase.
        target_scale_ms: divisor of each target for the loss (``None``: T1 2000 ms, T2 500 ms,
            B1 2: :data:`DEFAULT_SCALES`).
        split_seed: seed of the validation/test parameters.
        noise_seed: seed of the fixed validation/test noise.
        seed: seed of the training draws (``None``: ``torch.initial_seed()`` at setup), kept in
            the checkpoint for a resume.
        cache_dir: cache folder of the simulated validation/test sets (``None``: no cache).
        num_workers: DataLoader worker processes for the training batches (1 overlaps the
            simulation with the training step on a CPU).
        simulate_on: ``"auto"`` (the device of the trainer), ``"loader"`` or ``"device"``.
        batches_per_launch: on the device, consecutive training batches simulated by one call
            (``None``: enough for 32 768 fingerprints, at most ``batches_per_epoch``).
        bound_table: for ``module.loss=crb``, the bound of every training sample interpolated
            from a table over the prior (within 1.5 %, built once in ~2 s); ``False``: an exact
            bound per sample (a value-and-tangent simulation per sample, ~4x a GRU step on a
            CPU). The fixed validation and test sets always get exact bounds.
        progress: show progress while simulating the fixed sets.
    """

    def __init__(self, sequence: Sequence | dict | None = None,
                 targets=("t1", "t2", "b1"), t1_range=(50.0, 5000.0), t2_range=(5.0, 600.0),
                 distribution: str = "log-uniform", b1_range=(0.7, 1.3),
                 noise_std=(0.005, 0.03), batch_size: int = 256,
                 batches_per_epoch: int = 200, realizations: int = 1, n_val: int = 2000,
                 n_test: int = 5000, eval_noise_levels=(0.005, 0.01, 0.02),
                 eval_batch_size: int | None = None, input_mode: str = "magnitude",
                 random_phase: bool = True, target_scale_ms=None, split_seed: int = 0,
                 noise_seed: int = 1, seed: int | None = None, cache_dir: str | None = None,
                 num_workers: int = 1, simulate_on: str = "auto",
                 batches_per_launch: int | None = None, bound_table: bool = True,
                 progress: bool = True) -> None:
        super().__init__()
        sequence, targets = _sequence_and_targets(sequence, targets)
        self.targets = targets
        if "b1" in targets and b1_range is None:
            # B1 fixed at 1: the b1 output would learn a constant and report its error as if
            # B1 were estimated
            raise ValueError("data.targets includes b1 but data.b1_range=null fixes B1 at 1: "
                             "set data.targets=[t1,t2] (B1 = 1) or give data.b1_range, e.g. "
                             "[0.7, 1.3]")
        self.prior = ParameterPrior(t1_range, t2_range, distribution,
                                    b1_range if "b1" in targets else None, noise_std)
        _check_counts(batch_size=batch_size, batches_per_epoch=batches_per_epoch,
                      realizations=realizations, n_val=n_val, n_test=n_test,
                      num_workers=num_workers + 1,
                      batches_per_launch=1 if batches_per_launch is None else batches_per_launch)
        levels = _check_choices(eval_noise_levels, input_mode, simulate_on)
        scale = _target_scales(targets, target_scale_ms)
        self.sequence = sequence
        self.batch_size = int(batch_size)
        self.batches_per_epoch = int(batches_per_epoch)
        self.realizations = int(realizations)
        self.n_val, self.n_test = int(n_val), int(n_test)
        self.eval_noise_levels = tuple(levels)
        self.eval_batch_size = int(eval_batch_size or 4 * batch_size)
        self.input_mode = input_mode
        self.random_phase = bool(random_phase)
        self.target_scale_ms = scale
        self.scale = torch.tensor(scale, dtype=torch.float32)
        self.target_columns = [TARGETS.index(t) for t in targets]
        self.split_seed, self.noise_seed = int(split_seed), int(noise_seed)
        self.seed = None if seed is None else int(seed)
        self.cache_dir = cache_dir
        self.num_workers = int(num_workers)
        self.simulate_on = simulate_on
        self.bound_table = bool(bound_table)
        self.batches_per_launch = min(self.batches_per_epoch, int(
            batches_per_launch or max(1, _FINGERPRINTS_PER_LAUNCH // self.batch_size)))
        self._launch: tuple[tuple[int, int], Batch] | None = None
        self.progress = bool(progress)
        self.with_bound = False  # set by a module whose loss needs the per-sample bound
        self._sim: BatchSimulator | None = None
        self.train_set = None
        self._eval: dict = {}

    # -- what the pipeline and the module read ------------------------------------------------
    @property
    def noise_std(self):
        """The training noise: a number, or ``[low, high]`` drawn per sample."""
        lo, hi = self.prior.noise_std
        return lo if lo == hi else [lo, hi]

    @property
    def training_range(self) -> dict:
        """``{"t1": [low, high], "t2": [low, high]}`` in ms: the T1 and T2 of the training
        draws, the prior's ranges with T2's top capped at T1's top (T2 <= T1). The module
        records it in its checkpoints (``MRFRegressor``'s ``training_range``): maps flag the
        estimates above it."""
        p = self.prior
        return {"t1": list(p.t1_range), "t2": [p.t2_range[0], p.t2_top]}

    @property
    def eval_set_names(self) -> list[str]:
        """Names of the validation/test sets, in dataloader order (``""``: the prior's noise)."""
        return [""] + [f"@{s:g}" for s in self.eval_noise_levels]

    @property
    def simulator(self) -> BatchSimulator:
        if self._sim is None:
            self._sim = BatchSimulator(self.sequence, self.prior, self.targets, self.scale,
                                       self.batch_size, self.input_mode, self.random_phase,
                                       self.realizations, self.bound_table)
        self._sim.with_bound = self.with_bound
        return self._sim

    # -- fixed sets ---------------------------------------------------------------------------
    def _fixed_set(self, n: int, split: int) -> dict:
        from mrflight import dictionary

        rng = np.random.default_rng([self.split_seed, split])
        params, noise = self.prior.sample(n, rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            d = dictionary.generate(self.sequence, params[:, :2], b1=params[:, 2],
                                    cache_dir=self.cache_dir, progress=self.progress)
        clean = torch.from_numpy(np.ascontiguousarray(d.atoms)).to(torch.complex64)
        p = torch.from_numpy(params)
        ptar = p[:, self.target_columns].to(torch.float32)
        sets = []
        levels = [torch.from_numpy(noise).to(torch.float32)] + [
            torch.full((n,), s, dtype=torch.float32) for s in self.eval_noise_levels]
        for j, std in enumerate(levels):
            # ten levels per split keep the seeds the README's results were measured with;
            # beyond them that formula would repeat another split's seeds: a stream of their own
            g = torch.Generator().manual_seed(
                self.noise_seed * 1_000_003 + 10 * split + j if j < 10
                else stream_seed(self.noise_seed, 3, split, j))
            x = realise(clean, std, g, self.random_phase, self.input_mode)
            bound = self.simulator.bounds(p, std, exact=True) if self.with_bound else None
            sets.append(_FixedSet(x, ptar / self.scale, ptar, std, bound))
        return {"params": p, "noise_std": torch.from_numpy(noise), "sets": sets}

    def fixed_sets(self, split: str) -> dict:
        """The fixed ``"val"`` or ``"test"`` set: parameters ``(n, 3)``, noise, datasets."""
        if split not in self._eval:
            n, code = (self.n_val, 1) if split == "val" else (self.n_test, 2)
            self._eval[split] = self._fixed_set(n, code)
        return self._eval[split]

    def setup(self, stage: str | None = None) -> None:
        trainer = getattr(self, "trainer", None)
        rank = int(trainer.global_rank) if trainer is not None else 0
        if self.train_set is None:
            self.train_set = _TrainBatches(self.simulator, self.batches_per_epoch,
                                           self._training_seed(), rank)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.train_set is not None:
            self.train_set.seed = self.seed

    def _on_cuda(self) -> bool:
        trainer = getattr(self, "trainer", None)
        try:
            return trainer is not None and trainer.strategy.root_device.type == "cuda"
        except Exception:  # noqa: BLE001 - no strategy yet
            return False

    def train_dataloader(self) -> DataLoader:
        on_device = self.simulate_on == "device" or (self.simulate_on == "auto"
                                                     and self._on_cuda())
        self.train_set.simulate_here = not on_device
        workers = 0 if on_device else self.num_workers
        trainer = getattr(self, "trainer", None)
        epoch_fn = (lambda: training_epoch(trainer)) if trainer is not None else None
        return DataLoader(self.train_set, batch_size=None, sampler=_EpochKeys(
            self.batches_per_epoch, epoch_fn), num_workers=workers,
            persistent_workers=workers > 0, collate_fn=_identity,
            multiprocessing_context=loader_context(workers))

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        trainer = getattr(self, "trainer", None)
        return [DataLoader(ds, batch_size=self.eval_batch_size, collate_fn=collate,
                           sampler=eval_sampler(ds, trainer, f"data.n_{split}"))
                for ds in self.fixed_sets(split)["sets"]]

    def val_dataloader(self):
        return self._eval_loaders("val")

    def test_dataloader(self):
        return self._eval_loaders("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if not (isinstance(batch, Batch) and batch.key is not None):
            return batch
        trainer = getattr(self, "trainer", None)
        epoch = int(batch.key[1])
        if trainer is not None and trainer.training and int(trainer.current_epoch) != epoch:
            # drawn for a stale epoch (prefetched before a resumed run reached its epoch)
            dev = batch.target.device
            fresh = self.simulator.draw(self.seed, int(trainer.current_epoch),
                                        int(batch.key[2]), self.train_set.rank)
            batch = fresh._replace(**{k: getattr(fresh, k).to(dev) for k in
                                      ("target", "params_ms", "noise_std", "sim_params", "key")})
        if batch.signal.numel() == 0:  # drawn only (or redrawn): simulate as the loader would
            if self.train_set.simulate_here:
                return self.simulator.realise(batch)
            return self._device_batch(batch)
        return batch

    def _device_batch(self, batch: Batch) -> Batch:
        """A drawn batch realised on the device. One call simulates, noises and preprocesses
        ``batches_per_launch`` consecutive batches of its epoch (drawn here as the loader would
        draw them, so each keeps its parameters and noise level); the group's noise comes from
        one generator seeded by its first batch's key."""
        epoch, index = int(batch.key[1]), int(batch.key[2])
        first = index - index % self.batches_per_launch
        if self._launch is None or self._launch[0] != (epoch, first):
            last = min(first + self.batches_per_launch, self.batches_per_epoch)
            group = self.simulator.draw_launch(self.seed, epoch, first, last,
                                               self.train_set.rank)
            self._launch = None  # free the previous launch's signals first
            dev = batch.target.device
            group = group._replace(**{f: getattr(group, f).to(dev) for f in
                                      ("target", "params_ms", "noise_std", "sim_params")})
            self._launch = ((epoch, first), self.simulator.realise(group))
        group, j = self._launch[1], index - first
        rows = self.batch_size * self.realizations
        return batch._replace(signal=group.signal[j * rows: (j + 1) * rows],
                              bound=None if group.bound is None else
                              group.bound[j * self.batch_size: (j + 1) * self.batch_size])


def _identity(x):
    return x


class _FixedSet(Dataset):
    """A fixed evaluation set: ready model inputs and targets (and bounds when requested)."""

    def __init__(self, signals, target, params_ms, noise_std, bound) -> None:
        self.signals, self.target, self.params_ms = signals, target, params_ms
        self.noise_std, self.bound = noise_std, bound

    def __len__(self) -> int:
        return self.signals.shape[0]

    def __getitem__(self, i: int) -> Batch:
        return Batch(self.signals[i], self.target[i], self.params_ms[i], self.noise_std[i],
                     bound=None if self.bound is None else self.bound[i])

    def __getitems__(self, indices) -> Batch:
        """The batch of ``indices`` at once (what :func:`~mrflight.data.batches.collate` makes
        of their :meth:`__getitem__` items: the same values, contiguous): stacking 1024 items
        one by one took 20 ms per validation batch."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return Batch(*(None if t is None else t.index_select(0, idx).contiguous()
                       for t in (self.signals, self.target, self.params_ms, self.noise_std,
                                 self.bound)))
