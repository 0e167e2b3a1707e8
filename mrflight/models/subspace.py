"""Subspace regressor: the fingerprint's coordinates in a low-rank SVD basis -> MLP.

Noise-free FISP fingerprints of a whole prior span a subspace of a few dozen dimensions (rank 48
keeps 99.999 % of their energy for the Oksuz 2019 train of 1750 pulses), so their projection on
that basis is (up to this energy) a sufficient statistic of T1, T2 and B1, and the energy left
outside it measures the noise level. The MLP then works on ``2 R + 1`` numbers instead of
``C * T``: cheap enough on a CPU to see several times more fresh simulated fingerprints in the same
training time as the recurrent models (the SVD compression of MRF dictionaries of McGivney et
al., IEEE TMI 2014, put in front of a network).

The basis is a buffer of the network, saved in its checkpoint. It is fitted once when training
starts (:meth:`SubspaceRegressor.fit_basis`, called by
:class:`mrflight.regressor.MRFRegressor` with its sequence and the data's prior): the leading
right singular vectors of fingerprints drawn from the prior, phase-aligned (complex input) or as
magnitudes (magnitude input), as the data module feeds them to the network.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .base import Regressor, hidden_layers

__all__ = ["SubspaceBasis", "SubspaceRegressor", "subspace_basis"]


_PRIOR_DEFAULTS = {"t1_range": (50.0, 5000.0), "t2_range": (5.0, 600.0), "b1_range": (0.7, 1.3)}


def _prior_fingerprints(seq, n_atoms: int, seed: int, t1_range, t2_range, b1_range):
    """``(n_atoms, T)`` complex128 noise-free fingerprints: T1 and T2 log-uniform in their
    ranges (T2 <= T1), B1 uniform in ``b1_range`` (``None``: B1 = 1)."""
    from mrflight.physics import simulate

    rng = np.random.default_rng(seed)
    t1 = np.exp(rng.uniform(np.log(t1_range[0]), np.log(t1_range[1]), n_atoms))
    t2_hi = np.minimum(t2_range[1], t1)
    t2 = np.exp(rng.uniform(np.log(t2_range[0]), np.log(t2_hi)))
    b1 = np.ones(n_atoms) if b1_range is None else rng.uniform(*b1_range, n_atoms)
    return simulate(seq, torch.from_numpy(t1), torch.from_numpy(t2), torch.from_numpy(b1),
                    dtype=torch.float64)


def subspace_basis(seq, rank: int, input_mode: str = "complex",
                   t1_range=_PRIOR_DEFAULTS["t1_range"], t2_range=_PRIOR_DEFAULTS["t2_range"],
                   b1_range=_PRIOR_DEFAULTS["b1_range"], n_atoms: int = 20000,
                   seed: int = 0) -> torch.Tensor:
    """The ``rank`` leading right singular vectors of model inputs drawn from a prior.

    T1 and T2 are log-uniform in their ranges (T2 <= T1), B1 uniform in ``b1_range`` (``None``:
    B1 = 1); the fingerprints go through :func:`mrflight.transforms.preprocess` as the network
    sees them: phase-aligned and unit-norm (``complex``: the real channel carries the
    fingerprint), or the unit-norm magnitude.

    Returns:
        float32 ``(T, rank)`` with orthonormal columns, by decreasing singular value.
    """
    from mrflight.transforms import preprocess

    x = _prior_fingerprints(seq, n_atoms, seed, t1_range, t2_range, b1_range)
    z = preprocess(x, input_mode).to(torch.float64)
    z = z[:, 0] if z.ndim == 3 else z
    if not 1 <= int(rank) <= z.shape[1]:
        raise ValueError(f"rank must be in [1, {z.shape[1]}] (the sequence length), got {rank}")
    _, evecs = torch.linalg.eigh(z.T @ z)  # the Gram matrix: T x T, cheap for T ~ 2000
    return evecs[:, -int(rank):].flip(1).to(torch.float32).contiguous()


def _measured_outside_fraction(fingerprints: torch.Tensor, basis: torch.Tensor,
                               noise_std: float, seed: int = 0) -> float:
    """The mean fraction of a unit-norm magnitude input's energy outside ``basis`` ``(T, R)``
    when complex noise of std ``noise_std`` (relative to the unit-norm fingerprint) is added
    to ``fingerprints`` ``(N, T)`` (noise-free, complex) before the magnitude is taken."""
    from mrflight.physics import normalize
    from mrflight.transforms import preprocess

    x = normalize(torch.as_tensor(fingerprints).to(torch.complex128))
    if x.ndim != 2 or x.shape[1] != basis.shape[0]:
        raise ValueError(f"fingerprints must be (N, {basis.shape[0]}) complex, got "
                         f"{tuple(x.shape)}")
    g = torch.Generator().manual_seed(seed)
    noise = torch.complex(torch.randn(x.shape, generator=g, dtype=torch.float64),
                          torch.randn(x.shape, generator=g, dtype=torch.float64))
    z = preprocess(x + noise_std * noise, "magnitude").to(torch.float64)
    inside = ((z @ basis.to(torch.float64)) ** 2).sum(1)
    return float((1 - inside).mean())


class SubspaceBasis:
    """A fitted SVD basis of the prior's fingerprints as buffers of a network (a mixin).

    Registers ``basis`` ``(T, R)``, ``basis_fitted`` and ``log_outside_floor`` (saved in the
    checkpoint) with :meth:`_init_basis`; :class:`mrflight.regressor.MRFRegressor` calls
    :meth:`fit_basis` when training starts unless :attr:`has_basis`. A network built without a
    basis (rank 0) has nothing to fit.
    """

    rank: int = 0

    def _init_basis(self, rank: int) -> None:
        self.rank = int(rank)
        if self.rank == 0:
            return
        if not 1 <= self.rank <= self.input_length:
            raise ValueError(f"rank must be in [1, {self.input_length}] (the input length), "
                             f"got {rank}")
        self.register_buffer("basis", torch.zeros(self.input_length, self.rank))
        self.register_buffer("basis_fitted", torch.zeros((), dtype=torch.bool))
        # the log energy outside the basis is clamped below at what the lowest training noise
        # leaves there (set with the basis; -inf: no clamp), so a voxel less noisy than any
        # training sample is read as one at the lowest training noise instead of extrapolated;
        # and above at what noise a quarter above the highest leaves there (+inf: none), where
        # the coordinates are rescaled to match (set_noise_ceiling)
        self.register_buffer("log_outside_floor", torch.full((), -math.inf))
        self.register_buffer("log_outside_ceiling", torch.full((), math.inf))

    @property
    def has_basis(self) -> bool:
        return self.rank == 0 or bool(self.basis_fitted)

    def set_basis(self, basis: torch.Tensor, noise_min: float | None = None,
                  fingerprints: torch.Tensor | None = None) -> None:
        """Use ``basis`` ``(T, R)`` (orthonormal columns) from now on.

        ``noise_min``: the lowest training noise std (relative to the unit-norm fingerprint),
        below which inputs are read as at that noise (``None``: no floor; the highest is
        :meth:`set_noise_ceiling`'s). The floor is 0.98 of the mean fraction of a unit-norm
        input's energy that noise ``noise_min`` leaves outside the basis: for complex inputs
        the formula of :meth:`outside_fraction`; magnitudes (rectified noise, no closed form)
        need ``fingerprints``, noise-free complex ``(N, T)`` ones of the prior, on which it is
        measured (:meth:`fit_basis` passes them)."""
        if self.rank == 0:
            raise ValueError(f"this {type(self).__name__} was built without a subspace basis "
                             "(rank 0)")
        b = torch.as_tensor(basis, dtype=torch.float32)
        if b.shape != self.basis.shape:
            raise ValueError(f"basis must be ({self.input_length}, {self.rank}), got "
                             f"{tuple(b.shape)}")
        gram = b.T.double() @ b.double()
        if not torch.allclose(gram, torch.eye(self.rank, dtype=torch.float64), atol=1e-4):
            raise ValueError("basis columns must be orthonormal (see subspace_basis)")
        floor = -math.inf
        if noise_min is not None and noise_min > 0:
            if self.in_channels == 2:
                mean = self.outside_fraction(float(noise_min))
            elif fingerprints is None:
                raise ValueError("the noise floor of a magnitude network is measured on "
                                 "fingerprints: pass fingerprints=(N, T) noise-free complex "
                                 "fingerprints of the prior, or call fit_basis(sequence, "
                                 "noise_min)")
            else:
                mean = _measured_outside_fraction(fingerprints, b, float(noise_min))
            # 0.98 of the mean: the inputs at the lowest training noise below it (37-49 % in
            # the tests' 200-pulse train; fewer for longer trains, whose noise feature spreads
            # less) and every less noisy one are read as at this floor
            floor = math.log(0.98 * mean) if mean > 0 else -math.inf  # (rank T: none)
        self.basis.copy_(b.to(self.basis.device))
        self.basis_fitted.fill_(True)
        self.log_outside_floor.fill_(floor)

    def outside_fraction(self, noise_std: float) -> float:
        """``o(s) = 2 (T - R) s^2 / (1 + 2 T s^2)``: the mean fraction of a unit-norm complex
        input's energy that complex noise of std ``s`` per real channel leaves outside the
        basis (the fingerprint itself lies in it; the normalisation spreads the unit norm over
        the noise). Within 0.1 % of simulated noise, as the tests check."""
        s2 = float(noise_std) ** 2
        t = self.input_length
        return 2 * (t - self.rank) * s2 / (1 + 2 * t * s2)

    def set_noise_ceiling(self, noise_max: float | None) -> None:
        """Read complex inputs noisier than the training noise as if at its top.

        ``noise_max``: the highest training noise std per real channel, relative to the
        unit-norm fingerprint (``None`` or 0: no ceiling). Complex noise of std ``s`` leaves
        on average the fraction ``o(s)`` (:meth:`outside_fraction`) of a unit-norm input's
        energy outside the basis. Where an input has more
        than ``o(1.25 noise_max)`` outside (1.095 times the mean at noise_max = 0.03 for 1750
        time points and rank 48: training inputs stay below it, as the tests check), its noise
        feature is set to that ceiling and its coordinates are scaled to the energy
        ``1 - o(1.25 noise_max)``: so an input noisier than any training sample is shown to the
        network as a training-like one of that noise, with its coordinates' direction kept. An
        MLP reading the coordinates otherwise sees them shrink with the noise (the
        normalisation spreads the unit norm over the noise) and extrapolates far (the default
        GRU at twice the top training noise: T1 RMSE 463 ms without the ceiling, 253 ms with
        it; the README's robustness figures). :class:`mrflight.regressor.MRFRegressor` sets it
        from the run's ``noise_std``. Magnitude inputs get no ceiling (their noise is rectified,
        and the formula does not hold for them)."""
        ceiling = math.inf
        if self.rank and self.in_channels == 2 and noise_max is not None and noise_max > 0:
            o_max = self.outside_fraction(1.25 * float(noise_max))
            ceiling = math.log(o_max) if o_max > 0 else math.inf  # (rank T: nothing outside)
        self.log_outside_ceiling.fill_(ceiling)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the noise ceiling existed lack it: they keep the value
        # set at construction (MRFRegressor sets it from the run's training noise)
        key = prefix + "log_outside_ceiling"
        if self.rank and prefix + "basis" in state_dict and key not in state_dict:
            state_dict[key] = self.log_outside_ceiling.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fit_basis(self, seq, noise_min: float | None = None, **prior) -> None:
        """Fit the basis to fingerprints of ``seq`` drawn from ``prior`` (keyword arguments of
        :func:`subspace_basis`: ``t1_range``, ``t2_range``, ``b1_range``); ``noise_min``: see
        :meth:`set_basis`."""
        if len(seq) != self.input_length:
            raise ValueError(f"the sequence has {len(seq)} time points, the network expects "
                             f"{self.input_length}")
        mode = "magnitude" if self.in_channels == 1 else "complex"
        basis = subspace_basis(seq, self.rank, mode, **prior)
        fingerprints = None
        if mode == "magnitude" and noise_min is not None and noise_min > 0:
            # (other draws than the basis's: the floor is measured on fingerprints it was
            # not fitted to, as the network will meet them)
            ranges = {k: prior.get(k, v) for k, v in _PRIOR_DEFAULTS.items()}
            fingerprints = _prior_fingerprints(seq, 2000, 1, **ranges)
        self.set_basis(basis, noise_min, fingerprints)

    def project(self, x: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, T)`` inputs, ``scale`` times unit-norm ones -> their coordinates ``(B, C, R)``
        (of ``x`` as given) and the log energy outside the basis ``(B,)`` of the unit-norm input
        (clamped below at :meth:`set_basis`'s floor; above the ceiling of
        :meth:`set_noise_ceiling` it is the ceiling, and the coordinates are scaled to match)."""
        if not self.has_basis:
            raise RuntimeError(f"{type(self).__name__} has no basis yet: train it (the basis is "
                               "fitted when training starts), load a trained checkpoint, or "
                               "call fit_basis(sequence)")
        coef = x @ self.basis.to(x.dtype)
        inside = (coef * coef).sum(dim=(1, 2))
        outside = (x * x).sum(dim=(1, 2)) - inside
        log_outside = torch.log(outside.clamp_min(1e-10 * scale * scale)) - 2 * math.log(scale)
        ceiling = self.log_outside_ceiling.to(log_outside.dtype)
        over = log_outside > ceiling
        # noisier than training: the coordinates get the energy 1 - o_max of a unit-norm input
        # (no branch on the data: no device sync; +inf ceiling: nothing is over)
        keep = (1.0 - torch.exp(ceiling.clamp_max(0.0))) * (scale * scale)  # (ONNX has no expm1)
        gain = torch.where(over, (keep / inside.clamp_min(1e-30 * scale * scale)).sqrt(),
                           torch.ones_like(inside))
        coef = coef * gain[:, None, None].to(coef.dtype)
        return coef, torch.minimum(log_outside, ceiling).clamp_min(self.log_outside_floor)


class SubspaceRegressor(SubspaceBasis, Regressor):
    """Projection on a fitted SVD basis, then a multilayer perceptron.

    Features of a unit-norm input ``x`` (``C`` channels): the coordinates ``x_c @ V`` of every
    channel (``C * R`` numbers) and ``log(||x||^2 - sum of their squares)``, the log energy
    outside the subspace (the noise level: it is what noise alone adds), clamped below at what
    the lowest training noise leaves there.

    Args:
        input_length: ``T``.
        in_channels: 1 (magnitude) or 2 (phase-aligned real, imaginary).
        n_outputs: estimated parameters (2: T1, T2; 3: T1, T2, B1).
        rank: ``R``, the basis size.
        hidden_sizes: widths of the hidden layers (ReLU).

    The basis must be set before the first forward pass (:meth:`fit_basis` or
    :meth:`set_basis`; training does it, a checkpoint restores it).
    """

    def __init__(self, input_length: int, in_channels: int = 1, n_outputs: int = 2,
                 rank: int = 48, hidden_sizes: tuple[int, ...] | list[int] = (256, 256, 256)
                 ) -> None:
        super().__init__(input_length, in_channels, n_outputs)
        if int(rank) < 1:
            raise ValueError(f"rank must be in [1, {self.input_length}] (the input length), "
                             f"got {rank}")
        self._init_basis(rank)
        self.hidden_sizes = tuple(int(h) for h in hidden_sizes)
        if not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"hidden_sizes must be a non-empty list of positive widths, got "
                             f"{hidden_sizes}")
        layers, width = hidden_layers(self.in_channels * self.rank + 1, self.hidden_sizes)
        self.net = nn.Sequential(*layers, nn.Linear(width, self.n_outputs))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T)`` unit-norm inputs -> ``(B, C * R + 1)`` features."""
        coef, log_outside = self.project(x)
        return torch.cat([coef.flatten(1), log_outside[:, None]], dim=1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(x / self.input_scale))
