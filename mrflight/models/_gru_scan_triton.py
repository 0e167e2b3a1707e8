"""Fused Triton kernel of a whole single-layer GRU recurrence (inference; see
:mod:`mrflight.models.fused_gru`).

One launch runs every step of a unidirectional one-layer GRU. A program owns ``BLOCK_R`` rows
(samples) and keeps their state ``h`` in registers for all ``S`` steps; per step it computes the
input projection ``gi = a_t M_t`` and the hidden projection ``gh = h W_hh^T`` as matrix products
on the GPU's tensor cores (``tl.dot``, float32 accumulation) and applies the gates (PyTorch's
order r, z, n)::

    r = sigmoid(gi_r + gh_r + b_ir + b_hr)
    z = sigmoid(gi_z + gh_z + b_iz + b_hz)
    n = tanh(gi_n + b_in + r * (gh_n + b_hn))
    h' = (1 - z) * n + z * h

so neither the projections of all steps nor a step's ``gh`` is ever written to memory: the
launch reads the input once and writes the final state. ``a_t`` and ``M_t`` cover both inputs
the regressors give: the fingerprint cut into steps (``a_t = x[:, t]``, ``M_t = W_ih^T`` for
every step), or its subspace coordinates (``a_t = coef`` for every step, ``M_t`` the folded
``W_ih``-and-basis matrix of step ``t``, :func:`mrflight.models.fused_gru.folded_weights`).

The state and the gates are float32; the products' operands are float32 (``PREC`` ``"ieee"`` or
``"tf32"``) or, under autocast, bfloat16/float16 (the weights are cast by the caller, ``a_t`` and
``h`` in the kernel). The hidden size is padded to ``BH`` (a power of two, at most 128: one
product's operand ``W_hh^T`` of a gate, ``BH x BH``, is staged whole); padded units stay zero.

Requires ``triton``. Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same
kernel runs on CPU tensors through Triton's interpreter (slow; used by the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mrflight.models._gru_triton import _tanh

__all__ = ["scan", "MAX_HIDDEN", "launch_settings"]

#: the largest hidden size the kernel takes (padded to a power of two)
MAX_HIDDEN = 128


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gru_scan(a_ptr, m_ptr, w_ptr, b_ptr, out_ptr, n_rows, S, N_IN, H,
              sa_r, sa_t, sm_i, sm_t, sw_k, so_r,
              BLOCK_R: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
              PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows = rows.to(tl.int64)
    ks = tl.arange(0, BK)
    cols = tl.arange(0, BH)
    cmask = cols < H
    wdt = m_ptr.dtype.element_ty
    # bias: (b_ir + b_hr, b_iz + b_hz, b_in, b_hn), float32
    b_r = tl.load(b_ptr + cols, mask=cmask, other=0.0)[None, :]
    b_z = tl.load(b_ptr + H + cols, mask=cmask, other=0.0)[None, :]
    b_n = tl.load(b_ptr + 2 * H + cols, mask=cmask, other=0.0)[None, :]
    b_hn = tl.load(b_ptr + 3 * H + cols, mask=cmask, other=0.0)[None, :]
    # W_hh^T (H, 3H): rows of padded units load as zeros, so padded h never contributes
    wptr = w_ptr + cols[:, None] * sw_k + cols[None, :]
    wmask = cmask[:, None] & cmask[None, :]
    h = tl.zeros((BLOCK_R, BH), dtype=tl.float32)
    for t in range(S):
        acc_r = tl.zeros((BLOCK_R, BH), dtype=tl.float32)
        acc_z = tl.zeros((BLOCK_R, BH), dtype=tl.float32)
        acc_n = tl.zeros((BLOCK_R, BH), dtype=tl.float32)
        for i0 in range(0, N_IN, BK):
            ii = i0 + ks
            imask = ii < N_IN
            a = tl.load(a_ptr + rows[:, None] * sa_r + t * sa_t + ii[None, :],
                        mask=rmask[:, None] & imask[None, :], other=0.0).to(wdt)
            mp = m_ptr + t * sm_t + ii[:, None] * sm_i + cols[None, :]
            mm = imask[:, None] & cmask[None, :]
            acc_r = tl.dot(a, tl.load(mp, mask=mm, other=0.0), acc_r, input_precision=PREC)
            acc_z = tl.dot(a, tl.load(mp + H, mask=mm, other=0.0), acc_z, input_precision=PREC)
            acc_n = tl.dot(a, tl.load(mp + 2 * H, mask=mm, other=0.0), acc_n,
                           input_precision=PREC)
        hw = h.to(wdt)
        acc_r = tl.dot(hw, tl.load(wptr, mask=wmask, other=0.0), acc_r, input_precision=PREC)
        acc_z = tl.dot(hw, tl.load(wptr + H, mask=wmask, other=0.0), acc_z,
                       input_precision=PREC)
        g_n = tl.dot(hw, tl.load(wptr + 2 * H, mask=wmask, other=0.0),
                     tl.zeros((BLOCK_R, BH), dtype=tl.float32), input_precision=PREC)
        r = _sigmoid(acc_r + b_r)
        z = _sigmoid(acc_z + b_z)
        n = _tanh(acc_n + b_n + r * (g_n + b_hn))
        h = (1.0 - z) * n + z * h
    tl.store(out_ptr + rows[:, None] * so_r + cols[None, :], h,
             mask=rmask[:, None] & cmask[None, :])


def launch_settings(hidden: int, inputs: int) -> dict:
    """Block sizes and warps of a launch: ``BH`` (padded hidden size), ``BK`` (input columns per
    product), ``BLOCK_R`` (rows per program: five ``BLOCK_R x BH`` float32 tiles live in
    registers) and ``num_warps``."""
    bh = max(16, triton.next_power_of_2(hidden))
    bk = min(64, max(16, triton.next_power_of_2(inputs)))
    block_r = max(16, min(64, 8192 // bh))
    return {"BLOCK_R": block_r, "BK": bk, "BH": bh,
            "num_warps": 8 if block_r * bh >= 8192 else 4}


def scan(a: torch.Tensor, m: torch.Tensor, w_hh_t: torch.Tensor, bias: torch.Tensor,
         out: torch.Tensor, steps: int, a_step_stride: int, m_step_stride: int,
         precision: str = "ieee", settings: dict | None = None) -> None:
    """Write the final state of the recurrence into ``out`` (see the module docstring).

    Args:
        a: ``(B, ...)`` the input; step ``t`` reads the ``I`` contiguous values at
            ``a[b].flatten()[t * a_step_stride:]`` (``a_step_stride`` 0: the same for every step).
        m: ``(I, ...)`` the input projection; step ``t`` reads ``m`` at offset
            ``t * m_step_stride``, rows of stride ``m.stride(0)``, ``3H`` contiguous columns.
        w_hh_t: ``(H, 3H)`` contiguous ``W_hh^T``, in ``m``'s dtype.
        bias: ``(4H,)`` float32, ``(b_ir + b_hr, b_iz + b_hz, b_in, b_hn)``.
        out: ``(B, H)`` float32, contiguous rows.
        steps: the number of steps ``S``.
        precision: ``"ieee"`` or ``"tf32"`` for float32 operands (ignored for half ones).
        settings: launch settings (default :func:`launch_settings`).
    """
    n_rows, hidden = out.shape
    inputs = m.shape[0]
    if hidden > MAX_HIDDEN:
        raise ValueError(f"the GRU scan kernel takes hidden sizes up to {MAX_HIDDEN}, got {hidden}")
    if out.dtype != torch.float32 or bias.dtype != torch.float32 or w_hh_t.dtype != m.dtype:
        raise ValueError("the GRU scan kernel needs a float32 state and bias, and W_hh^T in the "
                         "projection's dtype")
    for x in (a, m, w_hh_t, out):
        if x.shape[0] and x.stride(-1) != 1:
            raise ValueError("the GRU scan kernel needs contiguous rows (column stride 1)")
    s = dict(launch_settings(hidden, inputs), **(settings or {}))
    grid = (triton.cdiv(n_rows, s["BLOCK_R"]),)
    _gru_scan[grid](a, m, w_hh_t, bias, out, n_rows, steps, inputs, hidden,
                    a.stride(0), a_step_stride, m.stride(0), m_step_stride, w_hh_t.stride(0),
                    out.stride(0), BLOCK_R=s["BLOCK_R"], BK=s["BK"], BH=s["BH"],
                    PREC=precision, num_warps=s["num_warps"], num_stages=1)
