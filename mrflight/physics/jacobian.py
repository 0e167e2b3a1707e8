"""Fingerprints and their derivatives by T1, T2 and B1 (for the Cramér–Rao bound).

On the CPU the value-and-tangent C kernel propagates the derivatives by hand; on CUDA the Triton
kernel does; otherwise torch forward-mode autograd runs through the general path of
:func:`mrflight.physics.epg.simulate`.
"""

from __future__ import annotations

import torch

from . import _ckernel
from ._ckernel_glue import _jacobian_kernel
from ._inputs import _check_chunk_size, _prepare, _seq_arrays
from ._triton_glue import _run_gpu_kernel
from .epg import simulate
from .sequence import Sequence
from .truncation import _rate_for, states_needed

__all__ = ["simulate_jacobian", "JACOBIAN_PARAMS"]

#: the parameters :func:`simulate_jacobian` can differentiate by
JACOBIAN_PARAMS = ("t1", "t2", "b1")


def _check_wrt(wrt) -> tuple[str, ...]:
    names = (wrt,) if isinstance(wrt, str) else tuple(wrt)
    bad = [w for w in names if w not in JACOBIAN_PARAMS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(f"wrt must name distinct parameters among {JACOBIAN_PARAMS}, "
                         f"got {wrt!r}")
    return names


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
    k_atom = states_needed(t2.cpu().numpy(), arrays.tr_min, len(seq), tol, rate)
    if device.type == "cuda" and seq.real_phases:
        out = _run_gpu_kernel(seq, t1, t2, b, k_atom, wrt, 8)
        if out is not None:
            return out
    if device.type == "cpu" and seq.real_phases and _ckernel.kernel() is not None:
        x, jac = _jacobian_kernel(seq, t1, t2, b, k_atom, wrt, arrays)
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
