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
def _input_part(acc, a_ptr, m_ptr, rows, rmask, ks, cols, t, N_IN, sa_r, sa_t, sm_i, sm_t, gate,
                BK: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr):
    """``acc`` plus one gate's input projection of step ``t``: ``a_t M_t[:, gate]`` (``M``
    zero-padded to whole blocks: no mask)."""
    wdt = m_ptr.dtype.element_ty
    for i0 in range(0, N_IN, BK):
        ii = i0 + ks
        a = tl.load(a_ptr + rows[:, None] * sa_r + t * sa_t + ii[None, :],
                    mask=rmask[:, None] & (ii < N_IN)[None, :], other=0.0).to(wdt)
        m = tl.load(m_ptr + t * sm_t + ii[:, None] * sm_i + gate * BH + cols[None, :])
        acc = tl.dot(a, m, acc, input_precision=PREC)
    return acc


@triton.jit
def _w_tile(w_ptr, cols, gate, step, BH: tl.constexpr):
    """One gate's ``W_hh^T`` tile (zero-padded ``(BH, 3 BH)``); ``step`` is 0 at run time but
    unknown to the compiler, so that the tile is reloaded every step instead of hoisted."""
    k = cols + step
    return tl.load(w_ptr + k[:, None] * (3 * BH) + gate * BH + cols[None, :])


@triton.jit
def _gru_scan(a_ptr, m_ptr, w_ptr, b_ptr, out_ptr, n_rows, S, N_IN, H,
              sa_r, sa_t, sm_i, sm_t, w_step, so_r,
              BLOCK_R: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr,
              PREC: tl.constexpr, W_RELOAD: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    rows = rows.to(tl.int64)
    ks = tl.arange(0, BK)
    cols = tl.arange(0, BH)
    wdt = m_ptr.dtype.element_ty
    # bias (b_ir + b_hr, b_iz + b_hz, b_in, b_hn), W_hh^T and M are zero-padded to BH units per
    # gate by the host, so padded units stay 0 and no load needs a mask but the input's. The
    # biases are loaded where used, at a step offset of 0 the compiler cannot see through:
    # hoisted, their four tiles broadcast to the products' layout would hold registers for
    # the whole loop
    zero = tl.zeros((BLOCK_R, BH), dtype=tl.float32)
    h = zero
    for t in range(S):
        # W_hh^T's tiles do not depend on the step: the compiler hoists them into shared memory
        # for the whole launch (3 BH^2 values: 96 kB in half precision, which fits; 192 kB in
        # float32, which with the step's operands exceeds an H100's 227 kB and fails the
        # launch), so float32 (W_RELOAD) adds a step offset of 0 it cannot see through
        ws = t * w_step if W_RELOAD else 0
        bp = b_ptr + t * w_step + cols
        hw = h.to(wdt)
        # one gate at a time, so that at most h, its operand copy, one accumulator and one
        # finished gate are live (register pressure): r, then n (which needs r), then z
        acc = _input_part(tl.dot(hw, _w_tile(w_ptr, cols, 0, ws, BH), zero, input_precision=PREC),
                          a_ptr, m_ptr, rows, rmask, ks, cols, t, N_IN, sa_r, sa_t, sm_i, sm_t,
                          0, BK, BH, PREC)
        r = _sigmoid(acc + tl.load(bp)[None, :])
        acc = r * (tl.dot(hw, _w_tile(w_ptr, cols, 2, ws, BH), zero, input_precision=PREC)
                   + tl.load(bp + 3 * BH)[None, :]) + tl.load(bp + 2 * BH)[None, :]
        n = _tanh(_input_part(acc, a_ptr, m_ptr, rows, rmask, ks, cols, t, N_IN, sa_r, sa_t,
                              sm_i, sm_t, 2, BK, BH, PREC))
        acc = _input_part(tl.dot(hw, _w_tile(w_ptr, cols, 1, ws, BH), zero, input_precision=PREC),
                          a_ptr, m_ptr, rows, rmask, ks, cols, t, N_IN, sa_r, sa_t, sm_i, sm_t,
                          1, BK, BH, PREC)
        z = _sigmoid(acc + tl.load(bp + BH)[None, :])
        h = (1.0 - z) * n + z * h
    tl.store(out_ptr + rows[:, None] * so_r + cols[None, :], h,
             mask=rmask[:, None] & (cols < H)[None, :])


def launch_settings(hidden: int, inputs: int) -> dict:
    """Block sizes and warps of a launch: ``BH`` (padded hidden size), ``BK`` (input columns per
    product), ``BLOCK_R`` (rows per program) and ``num_warps``. At ``BH = 128`` 32 rows and 8
    warps compile for an H100 (sm_90a) without spills in float16/bfloat16 (255 registers, no
    stack; 64 rows spill about 100 bytes per thread), as the compiled kernel's resource usage
    shows (``tests/test_triton.py::test_gru_scan_compiles_for_hopper_within_its_limits``)."""
    bh = max(16, triton.next_power_of_2(hidden))
    bk = min(64, max(16, triton.next_power_of_2(inputs)))
    block_r = max(16, min(32, 4096 // bh))
    return {"BLOCK_R": block_r, "BK": bk, "BH": bh,
            "num_warps": 8 if block_r * bh >= 4096 else 4}


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
    bh, bk = s["BH"], s["BK"]
    steps_m = 1 if m_step_stride == 0 else steps
    # zero-padded copies: BH units per gate, the inputs to whole BK blocks
    mp = torch.zeros(triton.cdiv(inputs, bk) * bk, steps_m, 3, bh, dtype=m.dtype, device=m.device)
    mp[:inputs, :, :, :hidden] = torch.as_strided(
        m, (inputs, steps_m, 3, hidden), (m.stride(0), m_step_stride, hidden, 1))
    wp = torch.zeros(bh, 3, bh, dtype=m.dtype, device=m.device)
    wp[:hidden, :, :hidden] = w_hh_t.view(hidden, 3, hidden)
    bp = torch.zeros(4, bh, dtype=torch.float32, device=m.device)
    bp[:, :hidden] = bias.view(4, hidden)
    grid = (triton.cdiv(n_rows, s["BLOCK_R"]),)
    _gru_scan[grid](a, mp, wp, bp, out, n_rows, steps, inputs, hidden,
                    a.stride(0), a_step_stride, mp.stride(0), 0 if steps_m == 1 else mp.stride(1),
                    0, out.stride(0), BLOCK_R=s["BLOCK_R"], BK=bk, BH=bh, PREC=precision,
                    W_RELOAD=m.element_size() > 2, num_warps=s["num_warps"], num_stages=1,
                    enable_fp_fusion=True)
