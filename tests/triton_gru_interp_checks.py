"""Run the fused GRU kernels (the per-step gates, the one-launch scan) through Triton's
interpreter on CPU tensors and compare them with the pure-torch gates and with ``nn.GRU``; print
the measured errors as one JSON line.

Used by ``tests/test_triton.py`` in a subprocess (``TRITON_INTERPRET=1`` must be set before the
kernel module is imported, and must not leak into the rest of the test session). Run by hand
with ``python tests/triton_gru_interp_checks.py``.

Cases (small, the interpreter is slow): hidden sizes 13 and 100 (not powers of two), batches 1
and 37 (not a multiple of a program's rows), strided step views, the state updated in place,
bfloat16 projections, 2 bidirectional layers, a regressor with padded steps. The scan: hidden
sizes 13 and 100, batches 1, 37 and 70 (more than one program's 64 rows), input widths 7, 50 and
100 (more than one product's 64 columns), float32 and float16 operands, and a complex regressor
with a rank-6 subspace basis over padded steps (the folded input of the default GRU).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mrflight.models import GRURegressor  # noqa: E402
from mrflight.models._gru_triton import gates  # noqa: E402
from mrflight.models.fused_gru import (  # noqa: E402
    folded_weights,
    fused_gru,
    gru_gates_torch,
    scan_eligible,
    scan_gru,
)

F64 = torch.float64


def step_inputs(b: int, h: int, s: int, dtype, gen):
    """A step's strided ``gi`` view (of ``(b, s, 3h)``), ``gh``, ``h`` and the bias, of order 3."""
    gi = (3 * torch.randn(b, s, 3 * h, generator=gen, dtype=F64)).to(dtype)[:, s // 2]
    gh = (3 * torch.randn(b, 3 * h, generator=gen, dtype=F64)).to(dtype)
    state = torch.rand(b, h, generator=gen, dtype=F64) * 2 - 1
    bias = torch.randn(4 * h, generator=gen, dtype=F64)
    return gi, gh, state, bias


def gate_errors(dtype, state_dtype) -> float:
    """Largest |kernel - torch gates| over the step cases, with and without a previous state."""
    gen = torch.Generator().manual_seed(0)
    err = 0.0
    for b, h in ((1, 13), (37, 13), (37, 100)):
        gi, gh, state, bias = step_inputs(b, h, 5, dtype, gen)
        state, bias = state.to(state_dtype), bias.to(state_dtype)
        ref = torch.empty_like(state)
        gru_gates_torch(gi, gh, state, bias, ref)
        got = state.clone()
        gates(gi, gh, got, bias, got)  # h and out the same buffer, as the forward runs it
        first_ref, first = torch.empty_like(state), torch.empty_like(state)
        gru_gates_torch(gi, None, None, bias, first_ref)
        gates(gi, None, None, bias, first)
        err = max(err, float((got - ref).abs().max()), float((first - first_ref).abs().max()))
    return err


def forward_errors() -> dict:
    """fused_gru with the kernel against nn.GRU: float64 and float32 (vs the float64 nn.GRU)."""
    torch.manual_seed(1)
    res = {}
    for name, (i, h, layers, bi, b, s) in {"1x13": (7, 13, 1, False, 37, 6),
                                           "2x10_bidir": (5, 10, 2, True, 3, 4),
                                           "batch1": (50, 100, 1, False, 1, 3)}.items():
        rnn = nn.GRU(i, h, layers, batch_first=True, bidirectional=bi).double().eval()
        x = 3 * torch.randn(b, s, i, dtype=F64)
        with torch.no_grad():
            _, ref = rnn(x)
            res[f"fwd_{name}_f64"] = float((fused_gru(rnn, x, gates) - ref).abs().max())
            got = fused_gru(rnn.float(), x.float(), gates)
            res[f"fwd_{name}_f32"] = float((got.double() - ref).abs().max())
            res[f"fwd_{name}_shape_ok"] = got.shape == ref.shape and got.dtype == torch.float32
    return res


def regressor_error() -> float:
    """A regressor with 7 values per step over 30 points (2 padded), the kernel path vs nn.GRU."""
    torch.manual_seed(2)
    net = GRURegressor(input_length=30, in_channels=2, hidden_size=12, values_per_step=7).double()
    net.eval()
    x = torch.randn(4, 2, 30, dtype=F64)
    steps = torch.nn.functional.pad(x * 30 ** 0.5, (0, 5)).reshape(4, 2, 5, 7)
    steps = steps.permute(0, 2, 3, 1).reshape(4, 5, 14)
    with torch.no_grad():
        ref = net(x)
        got = net.fc(fused_gru(net.rnn, steps, gates)[-1])
    return float((got - ref).abs().max())


def scan_errors() -> dict:
    """The scan kernel against the float64 nn.GRU: float32 operands (IEEE) and float16 ones
    (autocast), for plain step inputs; and the folded subspace input of a regressor."""
    torch.manual_seed(3)
    res = {"scan_f32": 0.0, "scan_f16": 0.0}
    for i, h, b, s in ((7, 13, 37, 6), (100, 100, 70, 3), (50, 100, 1, 2)):
        rnn = nn.GRU(i, h, batch_first=True).double().eval()
        x = 3 * torch.randn(b, s, i, dtype=F64)
        with torch.no_grad():
            ref = rnn(x)[1]
            r32 = rnn.float()
            res["scan_eligible"] = scan_eligible(r32, x.float())
            got = scan_gru(r32, x.float())
            res["scan_shape_ok"] = got.shape == ref.shape and got.dtype == torch.float32
            res["scan_f32"] = max(res["scan_f32"], float((got.double() - ref).abs().max()))
            with torch.autocast("cpu", dtype=torch.float16):
                got = scan_gru(r32, x.float())
            res["scan_f16"] = max(res["scan_f16"], float((got.double() - ref).abs().max()))
    net = GRURegressor(input_length=30, in_channels=2, hidden_size=12, values_per_step=7,
                       rank=6).double().eval()
    q = torch.linalg.qr(torch.randn(30, 6, dtype=F64))[0]
    net.set_basis(q)
    x = torch.randn(5, 2, 30, dtype=F64) / 30 ** 0.5
    with torch.no_grad():
        coef, _ = net.project(x * net.input_scale, net.input_scale)
        ref = net._recurrence(coef @ net.basis.T)
        got = scan_gru(net.rnn.float(), coef.float(), fold=folded_weights(
            net.rnn.float(), net.basis.float(), net.values_per_step))
    res["scan_folded_f32"] = float((got.double() - ref).abs().max())
    res["scan_not_for_2_layers"] = not scan_eligible(nn.GRU(4, 3, 2, batch_first=True),
                                                     torch.zeros(1, 2, 4))
    return res


def main() -> dict:
    t0 = time.perf_counter()
    res = {"gates_f64": gate_errors(F64, F64), "gates_f32": gate_errors(torch.float32,
                                                                         torch.float32),
           "gates_bf16_inputs": gate_errors(torch.bfloat16, torch.float32)}
    res.update(forward_errors())
    res["regressor_padded_f64"] = regressor_error()
    res.update(scan_errors())
    res["time_s"] = time.perf_counter() - t0
    return res


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.stdout.flush()
