"""Extended Phase Graph (EPG) simulation of FISP-MRF fingerprints.

The FISP readout has an unbalanced (dephasing) gradient in every TR, so the magnetisation is a
sum of configuration states: transverse ``F+_k``, ``F-_k`` and longitudinal ``Z_k`` (Weigel, JMRI
2015). Each TR applies, in this order: the RF pulse (flip ``b1 * alpha_n``, phase ``phi_n``); the
readout at TE (signal ``F+_0 * exp(-TE/T2)``); relaxation over TR (``F *= E2``, ``Z *= E1``,
``Z_0 += 1 - E1``); the gradient (``F+_k -> F+_{k+1}``, ``F-_k -> F-_{k-1}``). An inversion with
efficiency ``eta`` followed by the delay TI sets ``Z_0 = 1 - (1 + eta) exp(-TI/T1)`` before the
first pulse. Magnetisation is in units of M0 = 1 and the signal convention makes a 90-degree
phase-0 pulse on ``Mz = +1`` give the real, positive signal ``+1``.

Two implementations share this model:

* a fast path (no autograd, RF phases multiples of 180 degrees): the states are real (``F+ =
  -i p``, ``F- = i q``, ``Z`` real), the gradient shift is a moving view into a buffer instead of a
  copy, atoms are processed in cache-sized chunks sorted by their state count, and the whole
  per-pulse update is a handful of fused in-place ops;
* a general path (any RF phase, differentiable in T1, T2 and B1, forward- and reverse-mode
  autograd): out-of-place complex arithmetic.

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

References:
    Weigel, Extended phase graphs: dephasing, RF pulses, and echoes - pure and simple, JMRI 2015.
    Jiang et al., MR fingerprinting using FISP, MRM 2015.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import NamedTuple

import numpy as np
import torch

from . import _ckernel
from ._device import check_device
from .sequence import Sequence

__all__ = [
    "simulate", "simulate_jacobian", "states_needed", "truncation_rate", "verified_range",
    "EPG_VERSION", "DEFAULT_TOL", "JACOBIAN_PARAMS",
]

#: bumped whenever the simulated signal changes (part of every dictionary cache key)
EPG_VERSION = "2"
#: default truncation tolerance: relative L2 error of the normalised magnitude fingerprint
DEFAULT_TOL = 1e-3
#: states per (T2 / TR_min) per e-fold of tolerance, calibrated (see states_needed)
TRUNCATION_RATE = 0.2
#: states always kept on top of the T2-proportional count (see states_needed)
_K_MIN = 8
#: target working-set size of one fast-path chunk (three state arrays), bytes
_CHUNK_BYTES = 768 * 1024
#: atoms per call of the fused C kernel (progress is reported between calls)
_KERNEL_CHUNK = 8192


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
    key = ((_arrays or _seq_arrays(seq)).fingerprint, tol, t2_max, t1_max, b1_range)
    if key in _RATE_CACHE:
        return _RATE_CACHE[key]
    rate = TRUNCATION_RATE
    if t2_max <= 0:
        _RATE_CACHE[key] = rate
        return rate
    t2p = np.array([t2_max, t2_max / 3, t2_max / 10])
    probes = []
    for t2 in t2p:
        for t1 in np.unique(np.clip([t2, 2 * t2, 1000.0, 2000.0, t1_max], t2, max(t1_max, t2))):
            for bb in sorted(set(b1_range)):
                probes.append((t1, t2, bb))
    p = torch.tensor(probes, dtype=torch.float64)
    with torch.no_grad():
        while True:
            k1 = states_needed(t2p.max(), float(seq.tr_ms.min()), len(seq), tol, rate)
            if k1 >= len(seq):
                break
            a = simulate(seq, p[:, 0], p[:, 1], p[:, 2], dtype=torch.float64, tol=tol,
                         _rate=rate).abs()
            b = simulate(seq, p[:, 0], p[:, 1], p[:, 2], dtype=torch.float64, tol=tol,
                         _rate=2 * rate).abs()
            a = a / a.norm(dim=1, keepdim=True).clamp_min(1e-300)
            b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
            if float((a - b).norm(dim=1).max()) < tol / 2:
                break
            rate *= 1.5
    _RATE_CACHE[key] = rate
    return rate


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


class _SeqArrays(NamedTuple):
    raw: tuple  # copies of (flip_angle_deg, phase_deg, tr_ms) this entry was made from
    scalars: tuple  # (te_ms, inversion, ti_ms, inversion_efficiency)
    fingerprint: str  # Sequence.fingerprint()
    alpha: np.ndarray  # nominal flip angles, rad, float64 (T,)
    sign: np.ndarray  # cos(phase) rounded to +-1 (meaningful for real-phase trains), (T,)
    tr: np.ndarray  # TR, ms, float64 contiguous (T,)
    tr_min: float
    real_phases: bool


def _seq_arrays(seq: Sequence) -> _SeqArrays:
    """What the simulator needs from the train, computed once per train and kept on the object.

    The entry is checked against the train's current arrays on every call (a comparison, cheaper
    than hashing them), so a train changed in place is never simulated with stale values.
    """
    raw = (seq.flip_angle_deg, seq.phase_deg, seq.tr_ms)
    scalars = (seq.te_ms, seq.inversion, seq.ti_ms, seq.inversion_efficiency)
    hit = seq.__dict__.get("_epg_arrays")
    if hit is not None and hit.scalars == scalars and all(
            np.array_equal(a, b) for a, b in zip(hit.raw, raw)):
        return hit
    hit = _SeqArrays(
        tuple(np.array(a, copy=True) for a in raw), scalars, seq.fingerprint(),
        np.ascontiguousarray(np.deg2rad(seq.flip_angle_deg)),
        np.ascontiguousarray(np.cos(np.deg2rad(seq.phase_deg)).round()),
        np.ascontiguousarray(seq.tr_ms, dtype=np.float64), float(seq.tr_ms.min()),
        seq.real_phases)
    seq.__dict__["_epg_arrays"] = hit
    return hit


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------

def _param(name: str, value, device, dtype) -> torch.Tensor:
    """Validate one parameter (in float64, before any cast) and return it as a 1-D tensor."""
    if value is None:
        what = {"t1_ms": "T1 in ms", "t2_ms": "T2 in ms"}.get(name, "a value")
        raise ValueError(f"{name} is None: pass {what}")
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(f"{name} must be real, got a complex tensor")
        check = value.detach().to("cpu", torch.float64)
    else:
        if isinstance(value, complex) or np.iscomplexobj(value):
            raise ValueError(f"{name} must be real, got complex values")
        try:
            check = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be numeric: {e}") from None
    if check.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {tuple(check.shape)}")
    if check.numel() == 0:
        raise ValueError(f"{name} is empty: pass at least one value")
    lo, hi = (float(v) for v in torch.aminmax(check))  # one pass; NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf values")
    if lo < 0:
        raise ValueError(f"{name} must be non-negative (ms for T1/T2, a factor for B1)")
    if hi > torch.finfo(dtype).max:
        raise ValueError(f"{name} has values too large for {dtype}; use dtype=torch.float64")
    if isinstance(value, torch.Tensor):
        t = value.to(device=device if device is not None else value.device, dtype=dtype)
    else:
        t = check.to(device=device, dtype=dtype)
    return t.reshape(-1)


def _prepare(seq, t1_ms, t2_ms, b1, device, dtype):
    if not isinstance(seq, Sequence):
        raise ValueError(f"seq must be a mrflight.physics.Sequence, got {type(seq).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if device is None:
        for v in (t1_ms, t2_ms, b1):
            if isinstance(v, torch.Tensor):
                device = v.device
                break
    device = check_device(device) if device is not None else torch.device("cpu")
    t1 = _param("t1_ms", t1_ms, device, dtype)
    t2 = _param("t2_ms", t2_ms, device, dtype)
    b = _param("b1", 1.0 if b1 is None else b1, device, dtype)
    n = max(t1.numel(), t2.numel(), b.numel())
    bad = [name for name, t in (("t1_ms", t1), ("t2_ms", t2), ("b1", b))
           if t.numel() not in (1, n)]
    if bad:
        sizes = ", ".join(f"{nm}: {t.numel()}" for nm, t in
                          (("t1_ms", t1), ("t2_ms", t2), ("b1", b)))
        raise ValueError(
            f"{' and '.join(bad)} do(es) not match the other parameters' length {n} "
            f"({sizes} values): pass equal lengths or scalars"
        )
    return t1.expand(n), t2.expand(n), b.expand(n), device


def _decay(tau_ms, t_ms):
    """exp(-t / tau) with the limits tau = 0 -> 0 (for t > 0) and t = 0 -> 1; grad-safe."""
    t = torch.as_tensor(t_ms, dtype=tau_ms.dtype, device=tau_ms.device)
    pos = tau_ms > 0
    safe = torch.where(pos, tau_ms, torch.ones_like(tau_ms))
    e = torch.exp(-t / safe)
    zero_tau = torch.where(t > 0, torch.zeros_like(e), torch.ones_like(e))
    return torch.where(pos, e, zero_tau)


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------

def simulate(
    seq: Sequence,
    t1_ms,
    t2_ms,
    b1=None,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
    tol: float = DEFAULT_TOL,
    max_states: int | None = None,
    chunk_size: int | None = None,
    progress=None,
    bounds: dict | None = None,
    _rate: float | None = None,
) -> torch.Tensor:
    """Simulate FISP-MRF fingerprints with the EPG formalism.

    Args:
        seq: the pulse train.
        t1_ms: T1, ms; scalar or shape ``(N,)``. 0 means instant recovery.
        t2_ms: T2, ms; scalar or ``(N,)``. 0 means instant transverse decay.
        b1: flip-angle scale factor (1 = nominal); scalar or ``(N,)``; default 1.
        dtype: real working precision, ``torch.float32`` (default) or ``torch.float64``.
        device: where to compute; default the device of a tensor argument, else CPU.
        tol: allowed relative L2 error of the normalised magnitude fingerprint from truncating
            the state count (see the module docstring); default 1e-3.
        max_states: hard cap on the state count (``None``: set by ``tol`` alone).
        chunk_size: atoms per chunk, a positive integer (``None``: chosen from the state count
            to fit the cache on CPU, 65536 atoms on CUDA). Memory is bounded by the chunk, not
            by N.
        progress: optional callable ``progress(n_done_atoms)`` called after every chunk.
        bounds: the parameter range the atoms are drawn from, e.g. ``dict(t1_max=4000.0,
            t2_max=500.0, b1_range=(0.7, 1.3))`` (ms, ms, ratio; any key may be left out). The
            state truncation is verified once for this range (:func:`truncation_rate`, cached),
            so that every batch drawn from the prior uses the same truncation and none probes
            again; atoms outside the bounds widen the verified range. Without ``bounds`` the
            range is that of the atoms (widened to :func:`verified_range`).

    Returns:
        Complex fingerprints, shape ``(N, T)``, dtype complex64 (complex128 for float64), in units
        of M0, on ``device``. Differentiable with respect to tensor inputs that require grad.

    Raises:
        ValueError: negative, non-finite, empty, missing or mismatched parameters (naming the
            argument); a bad ``tol``, ``chunk_size``, ``max_states`` or ``bounds``.
    """
    t1, t2, b, device = _prepare(seq, t1_ms, t2_ms, b1, device, dtype)
    if not (0 < tol < 1):
        raise ValueError(f"tol must lie in (0, 1), got {tol}")
    _check_chunk_size(chunk_size)
    n_atoms, n_pulses = t1.numel(), len(seq)
    arrays = _seq_arrays(seq)
    if _rate is None:
        _rate = _rate_for(seq, tol, t1.detach(), t2.detach(), b.detach(), bounds, arrays)
    t2n = t2.detach().cpu().numpy()
    k_atom = states_needed(t2n, arrays.tr_min, n_pulses, tol, _rate)
    if max_states is not None:
        if max_states < 1:
            raise ValueError(f"max_states must be >= 1, got {max_states}")
        k_atom = np.minimum(k_atom, max_states)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (t1, t2, b))
    fast = arrays.real_phases and not needs_grad and not _has_forward_grad(t1, t2, b)
    cdtype = torch.complex64 if dtype == torch.float32 else torch.complex128
    if not fast:
        out = []
        order = np.arange(n_atoms)
        step = chunk_size or 4096
        for s in range(0, n_atoms, step):
            idx = order[s: s + step]
            k = int(k_atom[idx].max())
            sel = torch.as_tensor(idx, device=device)
            out.append(_epg_general(seq, t1[sel], t2[sel], b[sel], k))
            if progress is not None:
                progress(min(s + step, n_atoms))
        return torch.cat(out, 0)

    if device.type == "cuda":
        out = _run_gpu_kernel(seq, t1, t2, b, k_atom, (), 16 if dtype == torch.float32 else 8,
                              chunk_size, progress)
        if out is not None:
            return out[0]
    use_kernel = device.type == "cpu" and _ckernel.kernel() is not None
    if use_kernel and n_atoms <= (chunk_size or _KERNEL_CHUNK):
        # a batch that fits one chunk: one kernel call, no scatter into a second buffer
        with torch.no_grad():
            signal = _epg_real_kernel(seq, t1, t2, b, k_atom, arrays, complex_out=True)
        if progress is not None:
            progress(n_atoms)
        return signal
    order = np.argsort(k_atom, kind="stable")
    signal = torch.empty(n_atoms, n_pulses, dtype=dtype, device=device)
    s = 0
    while s < n_atoms:
        k_here = int(k_atom[order[min(n_atoms - 1, s)]])
        if chunk_size is not None:
            step = chunk_size
        elif device.type == "cuda" or use_kernel:
            step = 65536 if device.type == "cuda" else _KERNEL_CHUNK
        else:
            step = max(16, _CHUNK_BYTES // (3 * 4 * max(k_here, 8)))
        idx = order[s: s + step]
        k = k_atom[idx]
        sel = torch.as_tensor(idx, device=device)
        with torch.no_grad():
            if use_kernel:
                signal[sel] = _epg_real_kernel(seq, t1[sel], t2[sel], b[sel], k)
            else:
                signal[sel] = _epg_real_fast(seq, t1[sel], t2[sel], b[sel], int(k.max()))
        s += len(idx)
        if progress is not None:
            progress(s)
    return signal.to(cdtype)


def _inv_ms(t_ms: np.ndarray) -> np.ndarray:
    """1 / t for t > 0, +inf for t = 0 (a relaxation rate, 1/ms)."""
    pos = t_ms > 0
    return np.where(pos, 1.0 / np.where(pos, t_ms, 1.0), np.inf)


def _decay_np(rate: np.ndarray, t_ms: float) -> np.ndarray:
    """exp(-t * rate) with the limits of :func:`_decay` (rate = inf: 0 for t > 0, 1 for t = 0)."""
    fin = np.isfinite(rate)
    return np.where(fin, np.exp(-t_ms * np.where(fin, rate, 0.0)), 1.0 if t_ms == 0 else 0.0)


def _epg_real_kernel(seq: Sequence, t1, t2, b1, k_atom: np.ndarray,
                     arrays: _SeqArrays | None = None, complex_out: bool = False) -> torch.Tensor:
    """The fast real path through the fused C kernel (CPU). Same result as _epg_real_fast.

    The atoms are sorted by state count for the kernel's SIMD groups and returned in the input
    order, shape ``(n, T)``, real of the dtype of ``t1`` (complex with ``complex_out``).
    Reordering and the complex result are made by numpy: a multi-threaded torch gather or
    conversion of a small batch costs more than the simulation on a busy machine (idle threads
    of torch's pool spin: 7 ms CPU for a 64-atom conversion with 2 threads, measured).
    """
    arrays = arrays or _seq_arrays(seq)
    r1 = _inv_ms(t1.detach().cpu().double().numpy())
    r2 = _inv_ms(t2.detach().cpu().double().numpy())
    b1n = b1.detach().cpu().double().numpy()
    z0 = (1.0 - (1.0 + seq.inversion_efficiency) * _decay_np(r1, seq.ti_ms)) if seq.inversion \
        else np.ones_like(r1)
    n = r1.size
    order = np.argsort(k_atom, kind="stable")
    if not np.array_equal(order, np.arange(n)):
        r1, r2, b1n, z0, k_atom = r1[order], r2[order], b1n[order], z0[order], k_atom[order]
    else:
        order = None
    out = np.empty((n, len(seq)), dtype=np.float32 if t1.dtype == torch.float32 else np.float64)
    _ckernel.run(arrays.alpha, arrays.sign, arrays.tr, r1, r2, b1n, z0, k_atom, out,
                 torch.get_num_threads())
    out *= _decay_np(r2, seq.te_ms).astype(out.dtype)[:, None]
    rows = slice(None)
    if order is not None:
        rows = np.empty_like(order)
        rows[order] = np.arange(n)
    if not complex_out:
        return torch.from_numpy(out[rows])
    res = np.zeros(out.shape, np.complex64 if out.dtype == np.float32 else np.complex128)
    res.real = out[rows]
    return torch.from_numpy(res)


def _gpu_kernel():
    """The fused GPU kernel module (:mod:`mrflight.physics._triton`), or ``None`` when Triton is
    not installed, failed before, or ``MRFLIGHT_NO_TRITON=1`` asks for the pure-torch path."""
    global _TRITON
    if os.environ.get("MRFLIGHT_NO_TRITON", "") not in ("", "0"):
        return None
    if _TRITON is False:
        try:
            from . import _triton
        except Exception:  # no triton, or no usable backend: the torch path serves
            _triton = None
        _TRITON = _triton
    return _TRITON


_TRITON = False  # False: not imported yet; None: unavailable


def _run_gpu_kernel(seq, t1, t2, b1, k_atom, wrt, lanes, chunk_size=None, progress=None):
    """Fingerprints (and derivatives) from the fused GPU kernel, or ``None`` to fall back.

    ``lanes`` reproduces the CPU kernels' truncation (their SIMD groups share the largest state
    count: 16 atoms in float32, 8 in float64 and for derivatives), so both give the same signal
    up to rounding. A kernel that fails to compile or launch (an unsupported GPU) warns once and
    leaves this process on the pure-torch path.
    """
    global _TRITON
    gk = _gpu_kernel()
    if gk is None:
        return None
    try:
        with torch.no_grad():
            return gk.run(seq, t1, t2, b1, k_atom, wrt=wrt, lanes=lanes, chunk_size=chunk_size,
                          progress=progress)
    except (ValueError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:  # e.g. triton's CompilationError on an unsupported GPU
        warnings.warn(f"mrflight: the fused GPU EPG kernel failed ({type(e).__name__}: {e}); "
                      "using the slower pure-torch path", RuntimeWarning, stacklevel=3)
        _TRITON = None
        return None


def simulate_jacobian(seq: Sequence, t1_ms, t2_ms, b1=None, *, wrt=("t1", "t2"),
                      tol: float = 1e-4, device=None, chunk_size: int = 4096,
                      bounds: dict | None = None, _real_ok: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fingerprints and their derivatives with respect to T1, T2 and/or B1, in float64.

    On the CPU, for trains whose RF phases are multiples of 180 degrees, a fused kernel propagates
    the tangent states ``d/dT1``, ``d/dT2`` (and ``d/dB1`` when asked for) through the same real
    recursion as the signal (forward-mode differentiation by hand, ~3-4x the cost of a
    simulation). Otherwise the derivatives come from torch forward-mode autograd through the
    general path. Both agree to float64 precision (tested).

    Args:
        seq: the pulse train.
        t1_ms, t2_ms: ms, scalars or ``(N,)``.
        b1: flip-angle scale, scalar or ``(N,)``; default 1.
        wrt: the parameters to differentiate by, any ordering or subset of ``("t1", "t2",
            "b1")``; the last axis of the Jacobian follows this order.
        tol: truncation tolerance (tighter than the simulation default, since derivatives are
            taken).
        device: where to compute (the C kernel on the CPU, the Triton kernel on CUDA).
        chunk_size: atoms per pass of the autograd route (a positive integer).
        bounds: the parameter range the atoms come from, as for :func:`simulate`.

    Returns:
        ``(x, jac)``: complex128 ``(N, T)`` fingerprints and complex128 ``(N, T, len(wrt))``
        derivatives: per ms for T1 and T2, per unit of B1 (ratio to nominal) for B1.

    Raises:
        ValueError: bad parameters (see :func:`simulate`), an unknown or repeated name in
            ``wrt``, or a bad ``chunk_size``.
    """
    wrt = _check_wrt(wrt)
    _check_chunk_size(chunk_size)
    t1, t2, b, device = _prepare(seq, t1_ms, t2_ms, b1, device, torch.float64)
    t1, t2, b = (x.detach() for x in (t1, t2, b))
    arrays = _seq_arrays(seq)
    rate = _rate_for(seq, tol, t1, t2, b, bounds, arrays)
    t2n = t2.cpu().numpy()
    k_atom = states_needed(t2n, arrays.tr_min, len(seq), tol, rate)
    n = t1.numel()
    if device.type == "cuda" and seq.real_phases:
        out = _run_gpu_kernel(seq, t1, t2, b, k_atom, wrt, 8)
        if out is not None:
            return out
    if device.type == "cpu" and seq.real_phases and _ckernel.kernel() is not None:
        t1n = t1.numpy()
        r1, r2 = _inv_ms(t1n), _inv_ms(t2n)
        if seq.inversion:
            ei = _decay_np(r1, seq.ti_ms)
            z0 = 1.0 - (1.0 + seq.inversion_efficiency) * ei
            dz0 = np.where(t1n > 0, -(1.0 + seq.inversion_efficiency) * ei * seq.ti_ms
                           * np.where(t1n > 0, r1, 0.0) ** 2, 0.0)
        else:
            z0, dz0 = np.ones(n), np.zeros(n)
        order = np.argsort(k_atom, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(n)
        xs, d1s, d2s = (np.empty((n, len(seq))) for _ in range(3))
        dbs = np.empty((n, len(seq))) if "b1" in wrt else None
        _ckernel.run_jac(arrays.alpha, arrays.sign, arrays.tr, r1[order], r2[order],
                         b.numpy()[order], z0[order], dz0[order], k_atom[order], xs, d1s, d2s,
                         torch.get_num_threads(), db=dbs)
        x, d1, d2 = xs[inv], d1s[inv], d2s[inv]
        # readout at TE: x = p0 * exp(-TE/T2), so d/dT2 gains p0 * d exp(-TE/T2)/dT2
        e2te = _decay_np(r2, seq.te_ms)
        de2te = np.where(t2n > 0, e2te * seq.te_ms * np.where(t2n > 0, r2, 0.0) ** 2, 0.0)
        d2 = d2 * e2te[:, None] + x * de2te[:, None]
        cols = {"t1": d1 * e2te[:, None], "t2": d2}
        if dbs is not None:
            cols["b1"] = dbs[inv] * e2te[:, None]
        x = torch.from_numpy(x * e2te[:, None])
        jac = torch.from_numpy(np.stack([cols[w] for w in wrt], -1))
        if _real_ok:  # the caller takes real float64 (the signal of this path is real)
            return x, jac
        return x.to(torch.complex128), jac.to(torch.complex128)
    return _jacobian_forward_ad(seq, t1, t2, b, wrt, tol, device, chunk_size, rate)


def _jacobian_forward_ad(seq, t1, t2, b, wrt, tol, device, chunk_size, rate):
    """Value and derivatives by ``wrt`` through forward-mode autograd (the general path)."""
    import torch.autograd.forward_ad as fwad

    xs, js = [], []
    p = len(wrt)
    for s in range(0, t1.numel(), chunk_size):
        chunk = {"t1": t1[s: s + chunk_size], "t2": t2[s: s + chunk_size],
                 "b1": b[s: s + chunk_size]}
        m = chunk["t1"].numel()
        with fwad.dual_level():
            # atoms stacked once per derivative: copy j carries the tangent of wrt[j]
            args = []
            for name in ("t1", "t2", "b1"):
                v = chunk[name].repeat(p)
                if name in wrt:
                    tangent = torch.zeros_like(v)
                    j = wrt.index(name)
                    tangent[j * m: (j + 1) * m] = 1.0
                    v = fwad.make_dual(v, tangent)
                args.append(v)
            out = simulate(seq, *args, dtype=torch.float64, tol=tol, device=device, _rate=rate)
            primal, tangent = fwad.unpack_dual(out)
        if tangent is None:  # constant signal (all flip angles 0)
            tangent = torch.zeros_like(primal)
        xs.append(primal[:m])
        js.append(torch.stack([tangent[j * m: (j + 1) * m] for j in range(p)], -1))
    return torch.cat(xs), torch.cat(js)


#: the parameters :func:`simulate_jacobian` can differentiate by
JACOBIAN_PARAMS = ("t1", "t2", "b1")


def _check_wrt(wrt) -> tuple[str, ...]:
    names = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    bad = [w for w in names if w not in JACOBIAN_PARAMS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"wrt must name distinct parameters among {JACOBIAN_PARAMS}, "
                         f"got {wrt!r}")
    return names


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(
            chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer (atoms per chunk) or None, "
                         f"got {chunk_size!r}")


def _has_forward_grad(*ts) -> bool:
    import torch.autograd.forward_ad as fwAD

    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


# --------------------------------------------------------------------------------------------
# fast real path
# --------------------------------------------------------------------------------------------

def _epg_real_fast(seq: Sequence, t1, t2, b1, n_states: int) -> torch.Tensor:
    """Real-arithmetic EPG for phases in {0, 180} deg, no autograd. Returns (n, T) real signal.

    States: ``F+_k = -i p_k``, ``F-_k = i q_k`` (so ``F-_0 = conj(F+_0)`` means ``q_0 = p_0``),
    ``Z_k`` real. For phase 0 the RF pulse acts as
    ``p' = c2 p - s2 q + sa Z``, ``q' = c2 q - s2 p + sa Z``, ``Z' = ca Z - sa/2 (p + q)``
    with ``c2 = cos^2(a/2)``, ``s2 = sin^2(a/2)``, ``sa = sin a``, ``ca = cos a``; a phase of 180
    degrees flips the sign of ``sa``. The signal is ``i F+_0 = p_0``.
    """
    n, T, K = t1.numel(), len(seq), n_states
    dev, dt = t1.device, t1.dtype
    alpha = torch.as_tensor(np.deg2rad(seq.flip_angle_deg), dtype=dt, device=dev)
    sign = torch.as_tensor(np.cos(np.deg2rad(seq.phase_deg)).round(), dtype=dt, device=dev)
    a = alpha[None, :] * b1[:, None]  # (n, T) actual flip angles
    c2 = torch.cos(a / 2) ** 2
    s2 = 1.0 - c2
    sa = torch.sin(a) * sign[None, :]
    ca = torch.cos(a)
    tr = torch.as_tensor(seq.tr_ms, dtype=dt, device=dev)
    e1 = _decay(t1[:, None], tr[None, :])  # (n, T)
    e2 = _decay(t2[:, None], tr[None, :])
    e2te = _decay(t2, seq.te_ms)[:, None]
    # relaxation folded into the RF coefficients: one fused update per state array
    pc2, ps2, psa = e2 * c2, e2 * s2, e2 * sa
    zca, zsa, rec = e1 * ca, e1 * sa * 0.5, 1.0 - e1
    # columns of the (n, T) coefficient tables, contiguous per pulse
    pc2, ps2, psa, zca, zsa, rec = (x.T.contiguous() for x in (pc2, ps2, psa, zca, zsa, rec))
    # unfolded coefficients for the readout at TE (right after the pulse)
    c2t, s2t, sat = (x.T.contiguous() for x in (c2, s2, sa))

    # states along rows, atoms along contiguous columns: every op below is a contiguous pass,
    # and the per-pulse coefficients broadcast along the fast axis
    width_buf = T + K + 1
    pbuf = torch.zeros(width_buf, n, dtype=dt, device=dev)
    qbuf = torch.zeros(width_buf, n, dtype=dt, device=dev)
    z = torch.zeros(K, n, dtype=dt, device=dev)
    tmp = torch.empty(K, n, dtype=dt, device=dev)
    tmp2 = torch.empty(K, n, dtype=dt, device=dev)
    out = torch.empty(T, n, dtype=dt, device=dev)
    z0 = 1.0 - (1.0 + seq.inversion_efficiency) * _decay(t1, seq.ti_ms) if seq.inversion \
        else torch.ones_like(t1)
    z[0] = z0
    ps, qs = T, 0  # view starts: the p view moves up, the q view down, once per TR
    for i in range(T):
        w = min(i + 1, K)
        p = pbuf[ps: ps + w]
        q = qbuf[qs: qs + w]
        zz = z[:w]
        t = tmp[:w]
        u = tmp2[:w]
        # readout at TE: F+_0 right after the pulse (relaxation to TE applied at the end)
        out[i] = c2t[i] * p[0] - s2t[i] * q[0] + sat[i] * zz[0]
        # t = p + q (for Z), u = sa * Z (shared by p and q); with relaxation folded in,
        # p' = c2 p - s2 q + sa Z = E2 p - s2 (p + q) + sa Z  (c2 + s2 = E2)
        torch.add(p, q, out=t)
        torch.mul(zz, psa[i], out=u)
        e2i = pc2[i] + ps2[i]
        p.mul_(e2i).addcmul_(t, ps2[i], value=-1.0).add_(u)
        q.mul_(e2i).addcmul_(t, ps2[i], value=-1.0).add_(u)
        zz.mul_(zca[i]).addcmul_(t, zsa[i], value=-1.0)
        zz[0].add_(rec[i])
        # gradient: p_k <- p_{k-1} (view start moves up), q_k <- q_{k+1}, new p_0 = q_0
        ps -= 1
        qs += 1
        pbuf[ps] = qbuf[qs]
    return out.T * e2te


# --------------------------------------------------------------------------------------------
# general (complex, differentiable) path
# --------------------------------------------------------------------------------------------

def _epg_general(seq: Sequence, t1, t2, b1, n_states: int) -> torch.Tensor:
    """Complex out-of-place EPG for any RF phase; supports reverse- and forward-mode autograd.

    Returns the complex signal ``i F+_0 exp(-TE/T2)``, shape ``(n, T)``.
    """
    n, T, K = t1.numel(), len(seq), n_states
    dev, dt = t1.device, t1.dtype
    cdt = torch.complex64 if dt == torch.float32 else torch.complex128
    alpha = torch.as_tensor(np.deg2rad(seq.flip_angle_deg), dtype=dt, device=dev)
    phi = torch.as_tensor(np.deg2rad(seq.phase_deg), dtype=dt, device=dev)
    tr = torch.as_tensor(seq.tr_ms, dtype=dt, device=dev)
    a = alpha[None, :] * b1[:, None]
    c2 = (torch.cos(a / 2) ** 2).to(cdt)
    s2 = (torch.sin(a / 2) ** 2).to(cdt)
    sa = torch.sin(a).to(cdt)
    ca = torch.cos(a).to(cdt)
    eip = torch.polar(torch.ones_like(phi), phi)[None, :]  # e^{i phi}, (1, T)
    e1 = _decay(t1[:, None], tr[None, :]).to(cdt)
    e2 = _decay(t2[:, None], tr[None, :]).to(cdt)
    e2te = _decay(t2, seq.te_ms).to(cdt)
    z0 = (1.0 - (1.0 + seq.inversion_efficiency) * _decay(t1, seq.ti_ms)) if seq.inversion \
        else torch.ones_like(t1)
    fp = torch.zeros(n, K, dtype=cdt, device=dev)
    fm = torch.zeros(n, K, dtype=cdt, device=dev)
    z = torch.cat([z0.to(cdt)[:, None], torch.zeros(n, K - 1, dtype=cdt, device=dev)], 1)
    zero_col = torch.zeros(n, 1, dtype=cdt, device=dev)
    unit = torch.zeros(K, dtype=cdt, device=dev)
    unit[0] = 1
    sig = []
    for i in range(T):
        e, c, s, si, co = eip[:, i: i + 1], c2[:, i: i + 1], s2[:, i: i + 1], sa[:, i: i + 1], \
            ca[:, i: i + 1]
        fp_n = c * fp + e * e * s * fm - 1j * e * si * z
        fm_n = s * fp / (e * e) + c * fm + 1j * si * z / e
        z_n = -0.5j * si * fp / e + 0.5j * e * si * fm + co * z
        sig.append(1j * fp_n[:, 0])
        fp_n = fp_n * e2[:, i: i + 1]
        fm_n = fm_n * e2[:, i: i + 1]
        z = z_n * e1[:, i: i + 1] + (1 - e1[:, i: i + 1]) * unit
        fp = torch.cat([fm_n[:, 1:2].conj(), fp_n[:, :-1]], 1) if K > 1 else fm_n[:, 0:1].conj() * 0
        fm = torch.cat([fm_n[:, 1:], zero_col], 1)
    return torch.stack(sig, 1) * e2te[:, None]
