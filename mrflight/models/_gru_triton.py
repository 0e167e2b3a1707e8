"""Fused Triton kernel of one GRU step's gates (inference; see :mod:`mrflight.models.fused_gru`).

One launch per step reads this step's input projection ``gi`` (a strided view of all steps'
projections: one row of ``3H`` values per sample, PyTorch's gate order r, z, n), the hidden
projection ``gh = h W_hh^T`` and ``h``, and writes the new state::

    r = sigmoid(gi_r + gh_r + b_ir + b_hr)
    z = sigmoid(gi_z + gh_z + b_iz + b_hz)
    n = tanh(gi_n + b_in + r * (gh_n + b_hn))
    h' = (1 - z) * n + z * h

in the state's precision (float32; float64 in the tests), whatever the precision of ``gi`` and
``gh`` (bfloat16/float16 under autocast). ``HAS_H=False`` is the first step (``h = 0``, no
``gh``). One program owns ``BLOCK_R`` rows of all ``H`` units (``BLOCK_H``, the next power of
two, masked), so every load of a gate block is a contiguous run of each row.

Requires ``triton``. Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same
kernel runs on CPU tensors through Triton's interpreter (slow; used by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["gates"]

#: values per program (rows x padded units)
_TILE = 2048


@triton.jit
def _tanh(x):
    """tanh from one exp, absolute error of a few ulp (no overflow: the exponent is <= 0)."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def _gru_gates(gi_ptr, gh_ptr, h_ptr, out_ptr, b_ptr, n_rows, gi_stride, gh_stride, h_stride,
               out_stride, H: tl.constexpr, HAS_H: tl.constexpr, BLOCK_R: tl.constexpr,
               BLOCK_H: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < n_rows)[:, None] & (cols < H)[None, :]
    rows = rows.to(tl.int64)[:, None]
    cols = cols[None, :]
    cmask = cols < H
    f = out_ptr.dtype.element_ty
    # bias: (b_ir + b_hr, b_iz + b_hz, b_in, b_hn), in the state's precision
    b_r = tl.load(b_ptr + cols, mask=cmask, other=0.0)
    b_z = tl.load(b_ptr + H + cols, mask=cmask, other=0.0)
    b_n = tl.load(b_ptr + 2 * H + cols, mask=cmask, other=0.0)
    hn = tl.load(b_ptr + 3 * H + cols, mask=cmask, other=0.0)
    gi = gi_ptr + rows * gi_stride + cols
    a_r = tl.load(gi, mask=mask, other=0.0).to(f) + b_r
    a_z = tl.load(gi + H, mask=mask, other=0.0).to(f) + b_z
    a_n = tl.load(gi + 2 * H, mask=mask, other=0.0).to(f) + b_n
    if HAS_H:
        gh = gh_ptr + rows * gh_stride + cols
        a_r += tl.load(gh, mask=mask, other=0.0).to(f)
        a_z += tl.load(gh + H, mask=mask, other=0.0).to(f)
        hn += tl.load(gh + 2 * H, mask=mask, other=0.0).to(f)
    r = 1.0 / (1.0 + tl.exp(-a_r))
    z = 1.0 / (1.0 + tl.exp(-a_z))
    n = _tanh(a_n + r * hn)
    new = (1.0 - z) * n
    if HAS_H:
        new += z * tl.load(h_ptr + rows * h_stride + cols, mask=mask, other=0.0)
    tl.store(out_ptr + rows * out_stride + cols, new.to(f), mask=mask)


def gates(gi: torch.Tensor, gh: torch.Tensor | None, h: torch.Tensor | None,
          bias: torch.Tensor, out: torch.Tensor) -> None:
    """Write one GRU step's new state into ``out`` (see the module docstring).

    Args:
        gi: ``(B, 3H)`` input projection of the step (rows may be strided, columns contiguous).
        gh: ``(B, 3H)`` hidden projection without bias, or ``None`` on the first step.
        h: ``(B, H)`` previous state, or ``None`` on the first step; may be ``out`` itself.
        bias: ``(4H,)`` contiguous, ``(b_ir + b_hr, b_iz + b_hz, b_in, b_hn)``, dtype of ``out``.
        out: ``(B, H)`` float32 or float64 (rows may be strided, columns contiguous).
    """
    n_rows, hidden = out.shape
    for t in (gi, gh, h, out):
        if t is not None and t.shape[0] and t.stride(1) != 1:
            raise ValueError("the GRU gate kernel needs contiguous rows (column stride 1)")
    block_h = triton.next_power_of_2(hidden)
    block_r = max(1, _TILE // block_h)
    grid = (triton.cdiv(n_rows, block_r),)
    first = gh is None
    _gru_gates[grid](gi, gi if first else gh, out if first else h, out, bias, n_rows,
                     gi.stride(0), 0 if first else gh.stride(0), 0 if first else h.stride(0),
                     out.stride(0), H=hidden, HAS_H=not first, BLOCK_R=block_r,
                     BLOCK_H=block_h, enable_fp_fusion=True)
