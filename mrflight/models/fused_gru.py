"""Inference-only GRU forward, numerically the function of ``nn.GRU`` (up to rounding): Triton
kernels on the GPU, and on the CPU the per-step path below with the torch gates.

A one-layer unidirectional GRU of at most 128 units in float32 (the default regressor's), with
TF32 or half-precision products (``predict_parameters(..., precision="tf32"/"bf16"/"fp16")``),
runs in one launch of the scan kernel (:func:`scan_gru`,
:mod:`mrflight.models._gru_scan_triton`): each program keeps its samples' state in registers for
all steps and computes both projections of a step as tensor-core products, so neither is written
to memory; with a subspace basis it reads the coordinates and the folded weights
(:func:`folded_weights`), never the fingerprint.

Other GRUs (stacked, bidirectional, wider, float64) and IEEE float32 products take the per-step
path, which organises the work as large GEMMs (cuDNN's GRU reached about 3.2 M fingerprints/s on
an H200 for a regressor of 35 steps of 50 values and 100 units):

1. the input projections of all steps of a layer, ``(B*S, I) @ W_ih^T``, in one GEMM (both
   directions at once: their weights are stacked); for a regressor with a subspace basis, the
   first layer's come from the coordinates through :func:`folded_projection`;
2. per step ``gh = h @ W_hh^T`` (one GEMM; none on the first step, where ``h = 0``), then one
   gate kernel that reads the step's slice of the projections (a strided view, no copy), ``gh``
   and ``h``, adds the biases and writes the new state (:mod:`mrflight.models._gru_triton` on
   CUDA; :func:`gru_gates_torch`, the same arithmetic in torch, elsewhere and as reference).

The GEMMs run in the caller's precision (float32 IEEE, TF32 when enabled, or bfloat16/float16
operands under autocast, whose outputs are then half precision); the gates and the state are
float32 (float64 for float64 input). Stacked layers keep every step's output of the layers below
the top (the next layer's projection is one GEMM on them); bidirectional layers run the reversed
direction on the same projections. Dropout between layers is the identity in eval mode.
A CUDA graph of the step loop is not used: at the batches that fill a GPU (65 536) a step's two
launches cost the host some tens of microseconds while the GPU's work per step is estimated at
about 0.1 ms (GEMM and gates), so the host stays ahead; small batches are launch-bound (the
benchmark times batch 1024 against cuDNN).
"""

from __future__ import annotations

import torch
from torch import nn

from mrflight.physics._triton_glue import LazyKernel, guarded_kernel

__all__ = ["fused_gru", "folded_projection", "folded_weights", "gru_gates_torch", "triton_gates",
           "fused_gru_available", "scan_gru", "scan_eligible", "run_fused_gru", "CPU_MIN_BATCH"]


def gru_gates_torch(gi: torch.Tensor, gh: torch.Tensor | None, h: torch.Tensor | None,
                    bias: torch.Tensor, out: torch.Tensor) -> None:
    """One GRU step's new state into ``out``; arguments as :func:`mrflight.models._gru_triton.gates`
    (``bias = (b_ir + b_hr, b_iz + b_hz, b_in, b_hn)``, ``gh``/``h`` ``None`` on the first step)."""
    f = out.dtype
    b_r, b_z, b_n, hn = bias.view(4, -1)
    a_r, a_z, a_n = (g.to(f) for g in gi.chunk(3, dim=1))
    a_r, a_z, a_n = a_r + b_r, a_z + b_z, a_n + b_n
    if gh is not None:
        g_r, g_z, g_n = (g.to(f) for g in gh.chunk(3, dim=1))
        a_r, a_z, hn = a_r + g_r, a_z + g_z, hn + g_n
    r, z = torch.sigmoid(a_r), torch.sigmoid(a_z)
    n = torch.tanh(a_n + r * hn)
    new = (1 - z) * n
    out.copy_(new if h is None else new + z * h)


def _weights(rnn: nn.GRU, layer: int, dtype: torch.dtype):
    """``W_ih`` of both directions stacked ``(D*3H, I)``, and per direction ``W_hh`` and the
    gate bias ``(b_ir + b_hr, b_iz + b_hz, b_in, b_hn)`` in ``dtype``."""
    h = rnn.hidden_size
    sfx = [f"_l{layer}", f"_l{layer}_reverse"][: 2 if rnn.bidirectional else 1]
    w_ih = torch.cat([getattr(rnn, "weight_ih" + s) for s in sfx])
    per_dir = []
    for s in sfx:
        w_hh = getattr(rnn, "weight_hh" + s)
        if rnn.bias:
            b_ih, b_hh = (getattr(rnn, n + s).to(dtype) for n in ("bias_ih", "bias_hh"))
            bias = torch.cat([b_ih[:2 * h] + b_hh[:2 * h], b_ih[2 * h:], b_hh[2 * h:]])
        else:
            bias = torch.zeros(4 * h, dtype=dtype, device=w_hh.device)
        per_dir.append((w_hh, bias.contiguous()))
    return w_ih, per_dir


def _direction(gi: torch.Tensor, w_hh: torch.Tensor, bias: torch.Tensor, reverse: bool,
               out: torch.Tensor | None, gates) -> torch.Tensor:
    """Run one direction over the steps of ``gi`` ``(B, S, 3H)``; every step's state goes to
    ``out[:, t]`` when given (layers below the top), else one buffer is updated in place.
    Returns the last state ``(B, H)``."""
    b, s, _ = gi.shape
    h = None
    buf = None if out is not None else torch.empty(b, w_hh.shape[1], dtype=bias.dtype,
                                                   device=gi.device)
    w_t = w_hh.t()
    for t in (range(s - 1, -1, -1) if reverse else range(s)):
        dst = out[:, t] if out is not None else buf
        gates(gi[:, t], None if h is None else torch.mm(h, w_t), h, bias, dst)
        h = dst
    return h


def fused_gru(rnn: nn.GRU, x: torch.Tensor, gates=gru_gates_torch,
              projected: bool = False) -> torch.Tensor:
    """The final hidden states ``(num_layers * D, B, H)`` of ``rnn`` (``batch_first``, eval mode,
    zero initial state) on ``x`` ``(B, S, I)``, as ``nn.GRU`` returns them.

    ``gates`` is the gate function (:func:`gru_gates_torch`, or the Triton kernel from
    :func:`triton_gates`). With ``projected``, ``x`` holds the first layer's input projections
    ``(B, S, D*3H)`` (``input @ W_ih^T`` of both directions, no bias) instead of its input, e.g.
    from :func:`folded_projection`. Run it without autograd (inference only).
    """
    if not rnn.batch_first or x.ndim != 3:
        raise ValueError("fused_gru needs a batch_first nn.GRU and input (B, S, I)")
    b, s, _ = x.shape
    hid, d = rnn.hidden_size, 2 if rnn.bidirectional else 1
    if projected and x.shape[2] != d * 3 * hid:
        raise ValueError(f"projected input must be (B, S, {d * 3 * hid}), got {tuple(x.shape)}")
    state = torch.float64 if x.dtype == torch.float64 else torch.float32
    inp, finals = x, []
    for layer in range(rnn.num_layers):
        w_ih, per_dir = _weights(rnn, layer, state)
        gi = (x if projected and layer == 0 else
              torch.mm(inp.reshape(b * s, -1), w_ih.t()).view(b, s, d * 3 * hid))
        top = layer == rnn.num_layers - 1
        out = None if top else torch.empty(b, s, d * hid, dtype=state, device=x.device)
        for k, (w_hh, bias) in enumerate(per_dir):
            finals.append(_direction(gi[..., k * 3 * hid:(k + 1) * 3 * hid], w_hh, bias, k == 1,
                                     None if top else out[..., k * hid:(k + 1) * hid], gates))
        inp = out
    return torch.stack(finals)


def folded_weights(rnn: nn.GRU, basis: torch.Tensor, values_per_step: int) -> torch.Tensor:
    """``W_ih`` and the subspace basis folded into one ``(C*R, S*D*3H)`` float32 matrix: the
    first layer's input projections of all steps are ``coef.reshape(B, C*R)`` times it.

    The recurrent regressors feed ``rnn`` the fingerprint ``coef @ basis^T`` (``coef`` ``(B, C,
    R)``, ``basis`` ``(T, R)``), zero-padded to ``S * V`` time points and cut into ``S`` steps of
    ``V = values_per_step`` points, channels fastest. Each step's projection is linear in
    ``coef``, so the ``(B, C, S*V)`` fingerprint, its padded and permuted copies are never
    written. Row ``c*R + r``, column ``s*D*3H + j``.
    """
    r = basis.shape[1]
    w_ih = _weights(rnn, 0, torch.float32)[0]
    j = w_ih.shape[0]
    c = w_ih.shape[1] // values_per_step
    t = basis.shape[0]
    steps = -(-t // values_per_step)
    padded = nn.functional.pad(basis.to(w_ih.dtype), (0, 0, 0, steps * values_per_step - t))
    with torch.autocast(basis.device.type, enabled=False):  # the fold in the weights' precision
        m = torch.einsum("jvc,svr->crsj", w_ih.view(j, values_per_step, c),
                         padded.view(steps, values_per_step, r))
    return m.reshape(c * r, steps * j)


def folded_projection(rnn: nn.GRU, coef: torch.Tensor, fold: torch.Tensor) -> torch.Tensor:
    """The first layer's input projections ``(B, S, D*3H)`` of a fingerprint given by its
    subspace coordinates ``coef`` ``(B, C, R)``, one GEMM with the folded weights ``fold``
    (:func:`folded_weights`), without rebuilding the fingerprint."""
    per_step = 3 * rnn.hidden_size * (2 if rnn.bidirectional else 1)
    b = coef.shape[0]
    return torch.mm(coef.reshape(b, -1), fold.to(coef.dtype)).view(b, -1, per_step)


_KERNEL = LazyKernel("mrflight.models._gru_triton", "gates")


def triton_gates():
    """The Triton gate kernel (:func:`mrflight.models._gru_triton.gates`), or ``None`` when Triton
    is not installed, failed before, or ``MRFLIGHT_NO_TRITON=1`` asks for ``nn.GRU``."""
    return _KERNEL.get()


#: the smallest batch for which the CPU runs the folded projections (below, nn.GRU)
CPU_MIN_BATCH = 512


def fused_gru_available(rnn: nn.Module, x: torch.Tensor, folded: bool = False) -> bool:
    """Whether ``RecurrentRegressor`` runs :func:`run_fused_gru` instead of ``nn.GRU``: a GRU in
    eval mode, no autograd, not being traced for export, and either CUDA input with Triton
    usable, or (``folded``) a batch of at least :data:`CPU_MIN_BATCH` subspace coordinates on
    another device: there the torch gates on the folded projections beat ``nn.GRU`` on the
    rebuilt fingerprint (the CPU: 1.35-1.47x at batches of 1024), while at small batches their
    per-step calls cost more than they save (a batch of 1: 1.6-2.2 ms against 0.5 ms; README,
    Performance)."""
    return (type(rnn) is nn.GRU and not rnn.training and not torch.is_grad_enabled()
            and not torch.jit.is_tracing()
            and ((x.is_cuda and triton_gates() is not None)
                 or (folded and not x.is_cuda and x.shape[0] >= CPU_MIN_BATCH)))


_SCAN = LazyKernel("mrflight.models._gru_scan_triton")


def _tf32_matmul() -> bool:
    """Whether torch's float32 matrix products on CUDA use TF32 (``fp32_precision = "tf32"``,
    or ``torch.set_float32_matmul_precision("high")``/``"medium"``)."""
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision") and m.fp32_precision in ("tf32", "ieee"):
        return m.fp32_precision == "tf32"
    try:
        return torch.get_float32_matmul_precision() != "highest"
    except RuntimeError:  # torch refuses to mix its two APIs
        return False


def _operands(device: torch.device) -> tuple[torch.dtype, str]:
    """The scan kernel's product operands, as torch's own products would take them here:
    bfloat16/float16 under autocast, else float32 (``"tf32"`` or ``"ieee"``)."""
    if torch.is_autocast_enabled(device.type):
        dt = torch.get_autocast_dtype(device.type)
        if dt in (torch.float16, torch.bfloat16):
            return dt, "ieee"
    return torch.float32, "tf32" if _tf32_matmul() else "ieee"


def scan_eligible(rnn: nn.Module, x: torch.Tensor) -> bool:
    """Whether the one-launch scan kernel takes ``rnn`` on ``x``: a float32 one-layer
    unidirectional ``nn.GRU`` of at most 128 units (the default GRU regressor), Triton usable."""
    from mrflight.models._gru_scan_triton import MAX_HIDDEN

    return (type(rnn) is nn.GRU and rnn.num_layers == 1 and not rnn.bidirectional
            and rnn.hidden_size <= MAX_HIDDEN and x.dtype != torch.float64
            and rnn.weight_hh_l0.dtype == torch.float32 and _SCAN.get() is not None)


def scan_gru(rnn: nn.GRU, x: torch.Tensor, fold: torch.Tensor | None = None,
             settings: dict | None = None) -> torch.Tensor:
    """The final state ``(1, B, H)`` of a one-layer unidirectional GRU from one launch of the scan
    kernel (:mod:`mrflight.models._gru_scan_triton`): ``x`` ``(B, S, I)`` the steps' inputs, or,
    with ``fold`` (:func:`folded_weights`), ``x`` the subspace coordinates ``(B, C, R)``.
    ``settings`` overrides the kernel's launch settings (benchmarks)."""
    kernel = _SCAN.get()
    hid = rnn.hidden_size
    w_ih, ((w_hh, bias),) = _weights(rnn, 0, torch.float32)
    dt, precision = _operands(x.device)
    b = x.shape[0]
    a = x.reshape(b, -1).contiguous()
    if fold is None:
        steps, a_step, m_step = x.shape[1], x.shape[2], 0
        m = w_ih.t().to(dt).contiguous()          # (I, 3H), the same for every step
    else:
        steps, a_step, m_step = fold.shape[1] // (3 * hid), 0, 3 * hid
        m = fold.to(dt).contiguous()              # (C*R, S*3H), 3H columns per step
    out = torch.empty(b, hid, dtype=torch.float32, device=x.device)
    kernel.scan(a, m, w_hh.t().to(dt).contiguous(), bias, out, steps, a_step, m_step,
                precision, settings)
    return out[None]


def _triton_device(x: torch.Tensor) -> bool:
    """Whether ``x`` is where the Triton kernels run (CUDA)."""
    return x.is_cuda


def run_fused_gru(rnn: nn.GRU, x: torch.Tensor, fold: torch.Tensor | None = None
                  ) -> torch.Tensor | None:
    """The final states of ``rnn`` on ``x`` (with ``fold``, ``x`` holds the subspace coordinates,
    see :func:`scan_gru`). On CUDA from the Triton kernels: the one-launch scan where it applies,
    else :func:`fused_gru` with the Triton gates; ``None`` (the caller runs ``nn.GRU``) after a
    kernel failure (e.g. a GPU Triton cannot compile for), which warns once and disables that
    kernel. Elsewhere :func:`fused_gru` with the torch gates."""
    # IEEE float32 products run on the FMA units, where the scan kernel spills (its compiled
    # stack is 6.6 kB per thread on an H100): cuBLAS's per-step GEMMs serve them better
    if (_triton_device(x) and scan_eligible(rnn, x)
            and _operands(x.device) != (torch.float32, "ieee")):
        out = guarded_kernel(lambda: scan_gru(rnn, x, fold), "the GRU scan kernel",
                             "using the per-step GRU kernels")
        if out is not None:
            return out
        _SCAN.disable()
    if fold is not None:  # the first layer's projections of all steps, materialised
        x = folded_projection(rnn, x, fold)
    if not _triton_device(x):
        return fused_gru(rnn, x, gru_gates_torch, fold is not None)
    out = guarded_kernel(lambda: fused_gru(rnn, x, triton_gates(), fold is not None),
                         "the fused GRU kernel", "using nn.GRU (cuDNN)")
    if out is None:
        _KERNEL.disable()
    return out
