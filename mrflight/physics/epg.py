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

import numpy as np
import torch

from . import _ckernel
from .sequence import Sequence

__all__ = [
    "simulate", "simulate_jacobian", "states_needed", "truncation_rate", "EPG_VERSION",
    "DEFAULT_TOL",
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


def truncation_rate(seq: Sequence, tol: float, t2_max: float, t1_max: float,
                    b1_range: tuple[float, float] = (1.0, 1.0)) -> float:
    """The verified truncation rate for this train, tolerance and parameter range.

    Probe atoms (T2 in ``{t2_max, t2_max/3, t2_max/10}``, T1 from T2 up to ``t1_max``, B1 at both
    ends of ``b1_range``) are simulated in float64 with ``K`` and ``2K`` states; the rate starts at
    :data:`TRUNCATION_RATE` and grows by 1.5x until the normalised magnitude fingerprints differ
    by less than ``tol / 2`` (relative L2) for every probe. Results are cached per train and range.
    """
    key = (seq.fingerprint(), tol, round(float(t2_max), 3), round(float(t1_max), 3),
           tuple(round(float(x), 4) for x in b1_range))
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


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------

def _param(name: str, value, device, dtype) -> torch.Tensor:
    """Validate one parameter (in float64, before any cast) and return it as a 1-D tensor."""
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
    if not torch.isfinite(check).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    if (check < 0).any():
        raise ValueError(f"{name} must be non-negative (ms for T1/T2, a factor for B1)")
    if isinstance(value, torch.Tensor):
        t = value.to(device=device if device is not None else value.device, dtype=dtype)
    else:
        t = check.to(device=device, dtype=dtype)
    t = t.reshape(-1)
    if not torch.isfinite(t.detach()).all():
        raise ValueError(f"{name} has values too large for {dtype}; use dtype=torch.float64")
    return t


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
    device = torch.device(device) if device is not None else torch.device("cpu")
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
        chunk_size: atoms per chunk (``None``: chosen from the state count to fit the cache on
            CPU, 65536 atoms on CUDA). Memory is bounded by the chunk, not by N.
        progress: optional callable ``progress(n_done_atoms)`` called after every chunk.

    Returns:
        Complex fingerprints, shape ``(N, T)``, dtype complex64 (complex128 for float64), in units
        of M0, on ``device``. Differentiable with respect to tensor inputs that require grad.

    Raises:
        ValueError: negative, non-finite, empty or mismatched parameters (naming the argument).
    """
    t1, t2, b, device = _prepare(seq, t1_ms, t2_ms, b1, device, dtype)
    if not (0 < tol < 1):
        raise ValueError(f"tol must lie in (0, 1), got {tol}")
    n_atoms, n_pulses = t1.numel(), len(seq)
    t2n = t2.detach().cpu().numpy()
    if _rate is None:
        with torch.no_grad():
            _rate = truncation_rate(seq, tol, float(t2n.max()), float(t1.detach().max()),
                                    (float(b.detach().min()), float(b.detach().max())))
    k_atom = states_needed(t2n, float(seq.tr_ms.min()), n_pulses, tol, _rate)
    if max_states is not None:
        if max_states < 1:
            raise ValueError(f"max_states must be >= 1, got {max_states}")
        k_atom = np.minimum(k_atom, max_states)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (t1, t2, b))
    fast = seq.real_phases and not needs_grad and not _has_forward_grad(t1, t2, b)
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
    order = np.argsort(k_atom, kind="stable")
    signal = torch.empty(n_atoms, n_pulses, dtype=dtype, device=device)
    use_kernel = device.type == "cpu" and _ckernel.kernel() is not None
    s = 0
    while s < n_atoms:
        k_here = int(k_atom[order[min(n_atoms - 1, s)]])
        if chunk_size is not None:
            step = chunk_size
        elif device.type == "cuda" or use_kernel:
            step = 65536 if device.type == "cuda" else 8192
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


def _epg_real_kernel(seq: Sequence, t1, t2, b1, k_atom: np.ndarray) -> torch.Tensor:
    """The fast real path through the fused C kernel (CPU). Same result as _epg_real_fast."""
    dt = t1.dtype
    t1n = t1.detach().cpu().double().numpy()
    t2n = t2.detach().cpu().double().numpy()
    with np.errstate(divide="ignore"):
        r1 = np.where(t1n > 0, 1.0 / np.where(t1n > 0, t1n, 1.0), np.inf)
        r2 = np.where(t2n > 0, 1.0 / np.where(t2n > 0, t2n, 1.0), np.inf)
    z0 = (1.0 - (1.0 + seq.inversion_efficiency) * _decay(t1.double(), seq.ti_ms)) \
        if seq.inversion else torch.ones_like(t1, dtype=torch.float64)
    out = np.empty((t1.numel(), len(seq)), dtype=np.float32 if dt == torch.float32 else np.float64)
    _ckernel.run(np.deg2rad(seq.flip_angle_deg), np.cos(np.deg2rad(seq.phase_deg)).round(),
                 seq.tr_ms, r1, r2, b1.detach().cpu().double().numpy(),
                 z0.detach().cpu().numpy(), k_atom, out, torch.get_num_threads())
    return torch.from_numpy(out) * _decay(t2, seq.te_ms)[:, None]


def simulate_jacobian(seq: Sequence, t1_ms, t2_ms, b1=None, *, wrt=("t1", "t2"),
                      tol: float = 1e-4, device=None,
                      chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Fingerprints and their derivatives with respect to T1, T2 and/or B1, in float64.

    On the CPU, for trains whose RF phases are multiples of 180 degrees, a fused kernel propagates
    the tangent states ``d/dT1`` and ``d/dT2`` through the same real recursion as the signal
    (forward-mode differentiation by hand, ~3x the cost of a simulation). Otherwise the
    derivatives come from torch forward-mode autograd through the general path. Both agree to
    float64 precision (tested). On CUDA (with Triton installed) the same tangent recursion runs
    as one fused GPU kernel (:mod:`mrflight.physics._triton`), in float64.

    Args:
        seq: the pulse train.
        t1_ms, t2_ms: ms, scalars or ``(N,)``.
        b1: flip-angle scale, scalar or ``(N,)``; default 1.
        wrt: the parameters to differentiate by, any ordering or subset of ``("t1", "t2",
            "b1")``; the last axis of the Jacobian follows this order.
        tol: truncation tolerance (tighter than the simulation default, since derivatives are
            taken).
        device: where to compute (the C kernel on the CPU, the Triton kernel on CUDA).
        chunk_size: atoms per pass.

    Returns:
        ``(x, jac)``: complex128 ``(N, T)`` fingerprints and complex128 ``(N, T, len(wrt))``
        derivatives: per ms for T1 and T2, per unit of B1 (ratio to nominal) for B1.
    """
    wrt = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    if not wrt or len(set(wrt)) != len(wrt) or not set(wrt) <= {"t1", "t2", "b1"}:
        raise ValueError(f"wrt must name distinct parameters among ('t1', 't2', 'b1'), "
                         f"got {wrt!r}")
    t1, t2, b, device = _prepare(seq, t1_ms, t2_ms, b1, device, torch.float64)
    t1, t2, b = (x.detach() for x in (t1, t2, b))
    t2n = t2.cpu().numpy()
    rate = truncation_rate(seq, tol, float(t2n.max()), float(t1.max()),
                           (float(b.min()), float(b.max())))
    k_atom = states_needed(t2n, float(seq.tr_ms.min()), len(seq), tol, rate)
    n = t1.numel()
    if device.type == "cuda" and seq.real_phases:
        out = _run_gpu_kernel(seq, t1, t2, b, k_atom, wrt, 8)
        if out is not None:
            return out
    if wrt != ("t1", "t2"):  # T1/T2 below; any other selection through forward-mode autograd
        return _jacobian_forward_ad(seq, t1, t2, b, wrt, tol, device, chunk_size, rate)
    if device.type == "cpu" and seq.real_phases and _ckernel.kernel() is not None:
        t1n = t1.numpy()
        with np.errstate(divide="ignore"):
            r1 = np.where(t1n > 0, 1.0 / np.where(t1n > 0, t1n, 1.0), np.inf)
            r2 = np.where(t2n > 0, 1.0 / np.where(t2n > 0, t2n, 1.0), np.inf)
        if seq.inversion:
            ei = np.where(t1n > 0, np.exp(-seq.ti_ms * np.where(t1n > 0, r1, 0.0)),
                          1.0 if seq.ti_ms == 0 else 0.0)
            z0 = 1.0 - (1.0 + seq.inversion_efficiency) * ei
            dz0 = np.where(t1n > 0, -(1.0 + seq.inversion_efficiency) * ei * seq.ti_ms
                           * np.where(t1n > 0, r1, 0.0) ** 2, 0.0)
        else:
            z0, dz0 = np.ones(n), np.zeros(n)
        x = np.empty((n, len(seq)))
        d1 = np.empty_like(x)
        d2 = np.empty_like(x)
        order = np.argsort(k_atom, kind="stable")
        inv = np.empty_like(order)
        inv[order] = np.arange(n)
        xs, d1s, d2s = np.empty_like(x), np.empty_like(x), np.empty_like(x)
        _ckernel.run_jac(np.deg2rad(seq.flip_angle_deg), np.cos(np.deg2rad(seq.phase_deg)).round(),
                         seq.tr_ms, r1[order], r2[order], b.numpy()[order], z0[order],
                         dz0[order], k_atom[order], xs, d1s, d2s, torch.get_num_threads())
        x, d1, d2 = xs[inv], d1s[inv], d2s[inv]
        # readout at TE: x = p0 * exp(-TE/T2), so d/dT2 gains p0 * d exp(-TE/T2)/dT2
        e2te = np.where(t2n > 0, np.exp(-seq.te_ms * np.where(t2n > 0, r2, 0.0)),
                        1.0 if seq.te_ms == 0 else 0.0)
        de2te = np.where(t2n > 0, e2te * seq.te_ms * np.where(t2n > 0, r2, 0.0) ** 2, 0.0)
        d2 = d2 * e2te[:, None] + x * de2te[:, None]
        x = x * e2te[:, None]
        d1 = d1 * e2te[:, None]
        jac = torch.from_numpy(np.stack([d1, d2], -1)).to(torch.complex128)
        return torch.from_numpy(x).to(torch.complex128), jac
    import torch.autograd.forward_ad as fwad

    xs, js = [], []
    for s in range(0, n, chunk_size):
        c1, c2, cb = t1[s: s + chunk_size], t2[s: s + chunk_size], b[s: s + chunk_size]
        m = c1.numel()
        ones, zeros = torch.ones_like(c1), torch.zeros_like(c1)
        with fwad.dual_level():
            # atoms stacked twice: the first copy carries the T1 tangent, the second the T2 one
            dd1 = fwad.make_dual(torch.cat([c1, c1]), torch.cat([ones, zeros]))
            dd2 = fwad.make_dual(torch.cat([c2, c2]), torch.cat([zeros, ones]))
            out = simulate(seq, dd1, dd2, torch.cat([cb, cb]), dtype=torch.float64, tol=tol,
                           device=device, _rate=rate)
            primal, tangent = fwad.unpack_dual(out)
        if tangent is None:  # constant signal (all flip angles 0)
            tangent = torch.zeros_like(primal)
        xs.append(primal[:m])
        js.append(torch.stack([tangent[:m], tangent[m:]], -1))
    return torch.cat(xs), torch.cat(js)


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
