"""How many EPG states each atom keeps, and the verification of that count.

State truncation is controlled by an accuracy bound, not a fixed guess. A configuration of order
``k`` must spend at least ``k`` TRs in the transverse plane to dephase there (and ``k`` more to
come back to ``F_0``), so its weight in the signal decays like ``exp(-c k TR_min / T2)``. The
simulator keeps ``K(T2) = ceil(rate * ln(1/tol) * T2 / TR_min) + 8`` states per atom (clipped to
``[1, T]``); ``tol`` is the allowed relative L2 error of the normalised magnitude fingerprint
(default 1e-3). ``rate`` starts at 0.2 (calibrated on the default train, where the worst atom of
the paper's range, T1 = 4000, T2 = 500 ms, then errs by 2e-4) and is verified for every sequence
and parameter range before use (:func:`truncation_rate`): probe atoms at the largest T2 (and
fractions of it), across the T1 and B1 range, are simulated with ``K`` and ``2K`` states, and the
rate is raised by 1.5x until their difference is below ``tol / 2``. Trains with fast-changing or
large flip angles therefore get more states automatically.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._inputs import _check_tol, _seq_arrays, _SeqArrays
from ._paths import run_batch
from .sequence import Sequence

__all__ = ["states_needed", "verified_range", "truncation_rate", "DEFAULT_TOL", "TRUNCATION_RATE"]

#: default truncation tolerance: relative L2 error of the normalised magnitude fingerprint
DEFAULT_TOL = 1e-3
#: states per (T2 / TR_min) per e-fold of tolerance, calibrated (see states_needed)
TRUNCATION_RATE = 0.2
#: states always kept on top of the T2-proportional count (see states_needed)
_K_MIN = 8


def states_needed(t2_ms, tr_min_ms: float, n_pulses: int, tol: float = DEFAULT_TOL,
                  rate: float = TRUNCATION_RATE) -> np.ndarray:
    """Number of EPG states kept for each T2: ``ceil(rate * ln(1/tol) * T2 / TR_min) + 8``.

    The 8 extra states cover short T2 (a few TR), where the geometric decay that the first term
    assumes has not set in yet (measured: without them, atoms with T2 ~ 2 TR on a 100-pulse train
    erred by 2e-3; with them by 4e-4).

    Args:
        t2_ms: T2 values, ms, any shape.
        tr_min_ms: the shortest TR of the train, ms.
        n_pulses: train length T (a train of T pulses never populates more than T states).
        tol: allowed relative L2 error of the normalised magnitude fingerprint.
        rate: states per (T2 / TR_min) per e-fold of ``1/tol`` (see :func:`truncation_rate`).

    Returns:
        int64 array of the same shape as ``t2_ms``, in ``[1, n_pulses]``.
    """
    t2 = np.asarray(t2_ms, dtype=np.float64)
    k = np.ceil(rate * math.log(1.0 / tol) * t2 / tr_min_ms) + _K_MIN
    return np.clip(k, 1, n_pulses).astype(np.int64)


_RATE_CACHE: dict = {}
#: T1/T2 maxima of a verified range are rounded up on a grid of this many steps per decade
_GRID_PER_DECADE = 8
#: B1 ends of a verified range are rounded outwards to multiples of this
_B1_GRID = 0.05


def _round_up_log(x: float) -> float:
    if x <= 0:
        return 0.0
    return float(10.0 ** (math.ceil(_GRID_PER_DECADE * math.log10(x) - 1e-9) / _GRID_PER_DECADE))


def verified_range(t2_max: float, t1_max: float, b1_range: tuple[float, float] = (1.0, 1.0)
                   ) -> tuple[float, float, tuple[float, float]]:
    """The parameter range :func:`truncation_rate` verifies for a requested one: T1 and T2 maxima
    rounded up on a grid of 8 steps per decade (500 -> 562 ms, 4000 -> 4217 ms), the B1 ends
    rounded outwards to multiples of 0.05. Batches drawn from one prior therefore share one
    verified range (and one cached rate) although each batch has its own maxima."""
    lo, hi = float(min(b1_range)), float(max(b1_range))
    lo = math.floor(lo / _B1_GRID + 1e-4) * _B1_GRID
    hi = math.ceil(hi / _B1_GRID - 1e-4) * _B1_GRID
    return (_round_up_log(float(t2_max)), _round_up_log(float(t1_max)),
            (round(max(lo, 0.0), 4), round(hi, 4)))


def truncation_rate(seq: Sequence, tol: float, t2_max: float, t1_max: float,
                    b1_range: tuple[float, float] = (1.0, 1.0), *,
                    _arrays: _SeqArrays | None = None) -> float:
    """The verified truncation rate for this train, tolerance and parameter range.

    The range is first widened to :func:`verified_range` (so that it is the same for all batches
    of one prior). Probe atoms (T2 in ``{t2_max, t2_max/3, t2_max/10}``, T1 from T2 up to
    ``t1_max``, B1 at both ends of ``b1_range``) are simulated in float64 with ``K`` and ``2K``
    states; the rate starts at :data:`TRUNCATION_RATE` and grows by 1.5x until the normalised
    magnitude fingerprints differ by less than ``tol / 2`` (relative L2) for every probe. Results
    are cached per train, tolerance and widened range: the rate is a function of these alone.
    """
    t2_max, t1_max, b1_range = verified_range(t2_max, t1_max, b1_range)
    arrays = _arrays or _seq_arrays(seq)
    key = (arrays.fingerprint, tol, t2_max, t1_max, b1_range)
    if key in _RATE_CACHE:
        return _RATE_CACHE[key]
    rate = TRUNCATION_RATE
    if t2_max > 0:
        p = _probe_atoms(t2_max, t1_max, b1_range)
        with torch.no_grad():
            while states_needed(t2_max, arrays.tr_min, len(seq), tol, rate) < len(seq):
                a = _probe_signal(seq, p, arrays, tol, rate)
                b = _probe_signal(seq, p, arrays, tol, 2 * rate)
                if float((a - b).norm(dim=1).max()) < tol / 2:
                    break
                rate *= 1.5
    _RATE_CACHE[key] = rate
    return rate


def _probe_atoms(t2_max: float, t1_max: float, b1_range: tuple[float, float]) -> torch.Tensor:
    """``(P, 3)`` float64 probe atoms (T1, T2, B1) spanning a verified range."""
    probes = []
    for t2 in (t2_max, t2_max / 3, t2_max / 10):
        for t1 in np.unique(np.clip([t2, 2 * t2, 1000.0, 2000.0, t1_max], t2, max(t1_max, t2))):
            for bb in sorted(set(b1_range)):
                probes.append((t1, t2, bb))
    return torch.tensor(probes, dtype=torch.float64)


def _probe_signal(seq: Sequence, p: torch.Tensor, arrays: _SeqArrays, tol: float,
                  rate: float) -> torch.Tensor:
    """The normalised magnitude fingerprints of the probe atoms at a truncation rate."""
    _check_tol(tol)
    k_atom = states_needed(p[:, 1].numpy(), arrays.tr_min, len(seq), tol, rate)
    x = run_batch(seq, p[:, 0], p[:, 1], p[:, 2], k_atom, arrays, dtype=torch.float64,
                  device=torch.device("cpu")).abs()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)


_BOUND_KEYS = ("t1_max", "t2_max", "b1_range")


def _rate_for(seq: Sequence, tol: float, t1: torch.Tensor, t2: torch.Tensor, b: torch.Tensor,
              bounds: dict | None, arrays: _SeqArrays | None = None) -> float:
    """The truncation rate for a batch: verified for the batch's range joined with ``bounds``."""
    with torch.no_grad():
        ext = torch.stack([t2.max(), t1.max(), -b.min(), b.max()]).cpu().double().tolist()
    t2_max, t1_max, b_lo, b_hi = ext[0], ext[1], -ext[2], ext[3]
    if bounds is not None:
        if not isinstance(bounds, dict) or set(bounds) - set(_BOUND_KEYS):
            raise ValueError(f"bounds must be a dict with keys among {_BOUND_KEYS}, "
                             f"e.g. dict(t1_max=4000, t2_max=500, b1_range=(0.7, 1.3)); "
                             f"got {bounds!r}")
        try:
            bt1 = float(bounds.get("t1_max", 0.0))
            bt2 = float(bounds.get("t2_max", 0.0))
            lo, hi = (float(v) for v in bounds.get("b1_range", (b_lo, b_hi)))
        except (TypeError, ValueError):
            raise ValueError(f"bounds values must be numbers (t1_max, t2_max in ms) and a pair "
                             f"(b1_range), got {bounds!r}") from None
        if not all(math.isfinite(v) and v >= 0 for v in (bt1, bt2, lo, hi)) or lo > hi:
            raise ValueError(f"bounds must be finite and non-negative with b1_range = (low, "
                             f"high), got {bounds!r}")
        t1_max, t2_max = max(t1_max, bt1), max(t2_max, bt2)
        b_lo, b_hi = min(b_lo, lo), max(b_hi, hi)
    return truncation_rate(seq, tol, t2_max, t1_max, (b_lo, b_hi), _arrays=arrays)
