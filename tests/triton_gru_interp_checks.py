"""Run the fused GRU gate kernel through Triton's interpreter on CPU tensors and compare it with
the pure-torch gates and with ``nn.GRU``; print the measured errors as one JSON line.

Used by ``tests/test_triton.py`` in a subprocess (``TRITON_INTERPRET=1`` must be set before the
kernel module is imported, and must not leak into the rest of the test session). Run by hand
with ``python tests/triton_gru_interp_checks.py``.

Cases (small, the interpreter is slow): hidden sizes 13 and 100 (not powers of two), batches 1
and 37 (not a multiple of a program's rows), strided step views, the state updated in place,
bfloat16 projections, 2 bidirectional layers, a regressor with padded steps.
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
from mrflight.models.fused_gru import fused_gru, gru_gates_torch  # noqa: E402

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


def main() -> dict:
    t0 = time.perf_counter()
    res = {"gates_f64": gate_errors(F64, F64), "gates_f32": gate_errors(torch.float32,
                                                                         torch.float32),
           "gates_bf16_inputs": gate_errors(torch.bfloat16, torch.float32)}
    res.update(forward_errors())
    res["regressor_padded_f64"] = regressor_error()
    res["time_s"] = time.perf_counter() - t0
    return res


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.stdout.flush()
