"""The real-arithmetic EPG through the fused C kernels (:mod:`mrflight.physics._ckernel`).

Relaxation rates, the initial ``Z_0`` and the state-count order are prepared in numpy, the kernel
fills the signal (and the tangents) at the readout, and the decay to TE is applied here.
Reordering and the complex result are made by numpy: a multi-threaded torch gather or conversion
of a small batch costs more than the simulation on a busy machine (idle threads of torch's pool
spin: 7 ms CPU for a 64-atom conversion with 2 threads, measured).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _ckernel
from ._inputs import _seq_arrays, _SeqArrays
from .sequence import Sequence


def _inv_ms(t_ms: np.ndarray) -> np.ndarray:
    """1 / t for t > 0, +inf for t = 0 (a relaxation rate, 1/ms)."""
    pos = t_ms > 0
    return np.where(pos, 1.0 / np.where(pos, t_ms, 1.0), np.inf)


def _decay_np(rate: np.ndarray, t_ms: float) -> np.ndarray:
    """exp(-t * rate) with the limits of ``_decay`` (rate = inf: 0 for t > 0, 1 for t = 0)."""
    fin = np.isfinite(rate)
    return np.where(fin, np.exp(-t_ms * np.where(fin, rate, 0.0)), 1.0 if t_ms == 0 else 0.0)


def _initial_z(seq: Sequence, r1: np.ndarray) -> np.ndarray:
    """``Z_0`` before the first pulse, from the rates ``1/T1``."""
    if seq.inversion:
        return 1.0 - (1.0 + seq.inversion_efficiency) * _decay_np(r1, seq.ti_ms)
    return np.ones_like(r1)


def _initial_z_dt1(seq: Sequence, t1n: np.ndarray, r1: np.ndarray) -> np.ndarray:
    """``d Z_0 / d T1`` (per ms)."""
    if not seq.inversion:
        return np.zeros_like(r1)
    ei = _decay_np(r1, seq.ti_ms)
    return np.where(t1n > 0, -(1.0 + seq.inversion_efficiency) * ei * seq.ti_ms
                    * np.where(t1n > 0, r1, 0.0) ** 2, 0.0)


def _state_order(k_atom: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(order, inverse)``: the stable permutation sorting the atoms by state count (the kernels'
    SIMD groups share their largest count) and its inverse; ``None`` when already sorted."""
    n = k_atom.size
    order = np.argsort(k_atom, kind="stable")
    if np.array_equal(order, np.arange(n)):
        return None
    inv = np.empty_like(order)
    inv[order] = np.arange(n)
    return order, inv


def _epg_real_kernel(seq: Sequence, t1, t2, b1, k_atom: np.ndarray,
                     arrays: _SeqArrays | None = None, complex_out: bool = False) -> torch.Tensor:
    """The fast real path through the fused C kernel (CPU). Same result as ``_epg_real_fast``.

    Returns the signal in the input order, shape ``(n, T)``, real of the dtype of ``t1``
    (complex with ``complex_out``).
    """
    arrays = arrays or _seq_arrays(seq)
    r1 = _inv_ms(t1.detach().cpu().double().numpy())
    r2 = _inv_ms(t2.detach().cpu().double().numpy())
    b1n = b1.detach().cpu().double().numpy()
    z0 = _initial_z(seq, r1)
    perm = _state_order(k_atom)
    if perm is not None:
        r1, r2, b1n, z0, k_atom = (a[perm[0]] for a in (r1, r2, b1n, z0, k_atom))
    out = np.empty((r1.size, len(seq)),
                   dtype=np.float32 if t1.dtype == torch.float32 else np.float64)
    _ckernel.run(arrays.alpha, arrays.sign, arrays.tr, r1, r2, b1n, z0, k_atom, out,
                 torch.get_num_threads())
    out *= _decay_np(r2, seq.te_ms).astype(out.dtype)[:, None]
    if perm is not None:
        out = out[perm[1]]
    if not complex_out:
        return torch.from_numpy(out)
    res = np.zeros(out.shape, np.complex64 if out.dtype == np.float32 else np.complex128)
    res.real = out
    return torch.from_numpy(res)


def _jacobian_kernel(seq: Sequence, t1: torch.Tensor, t2: torch.Tensor, b: torch.Tensor,
                     k_atom: np.ndarray, wrt: tuple[str, ...], arrays: _SeqArrays
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Signal and derivatives by ``wrt`` from the value-and-tangent C kernel (CPU, float64).

    Returns real float64 ``(n, T)`` and ``(n, T, len(wrt))`` tensors in the input order.
    """
    t1n, t2n = t1.numpy(), t2.numpy()
    r1, r2 = _inv_ms(t1n), _inv_ms(t2n)
    n, T = t1n.size, len(seq)
    args = (r1, r2, b.numpy(), _initial_z(seq, r1), _initial_z_dt1(seq, t1n, r1), k_atom)
    perm = _state_order(k_atom)
    if perm is not None:
        args = tuple(a[perm[0]] for a in args)
    x, d1, d2 = (np.empty((n, T)) for _ in range(3))
    db = np.empty((n, T)) if "b1" in wrt else None
    _ckernel.run_jac(arrays.alpha, arrays.sign, arrays.tr, *args, x, d1, d2,
                     torch.get_num_threads(), db=db)
    if perm is not None:
        x, d1, d2 = x[perm[1]], d1[perm[1]], d2[perm[1]]
        db = None if db is None else db[perm[1]]
    # readout at TE: x = p0 * exp(-TE/T2), so d/dT2 gains p0 * d exp(-TE/T2)/dT2
    e2te = _decay_np(r2, seq.te_ms)
    de2te = np.where(t2n > 0, e2te * seq.te_ms * np.where(t2n > 0, r2, 0.0) ** 2, 0.0)
    cols = {"t1": d1 * e2te[:, None], "t2": d2 * e2te[:, None] + x * de2te[:, None]}
    if db is not None:
        cols["b1"] = db * e2te[:, None]
    return (torch.from_numpy(x * e2te[:, None]),
            torch.from_numpy(np.stack([cols[w] for w in wrt], -1)))
