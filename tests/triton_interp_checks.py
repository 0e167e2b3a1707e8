"""Run the fused Triton EPG kernels through Triton's interpreter on CPU tensors and compare them
with the CPU references; print the measured errors as one JSON line.

Used by ``tests/test_triton.py`` in a subprocess: ``TRITON_INTERPRET=1`` must be set before the
kernel module is imported (the ``@triton.jit`` decorator reads it), and it must not leak into the
rest of the test session. Run by hand with ``python tests/triton_interp_checks.py``.

Cases (small, the interpreter is slow): 40 atoms with T1 = 0, T2 = 0, T2 of 0.5-3 ms, T2 = T1,
B1 in [0.6, 1.3], on an 80-pulse (derivatives: 60) train with inversion, varying TR and
180-degree phases on some pulses; the kernel with Z in registers against the scratch kernel.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.autograd.forward_ad as fwad  # noqa: E402

from mrflight.physics import Sequence, _triton, simulate, simulate_jacobian  # noqa: E402
from mrflight.physics._triton_glue import _run_gpu_kernel  # noqa: E402
from mrflight.physics.truncation import DEFAULT_TOL, states_needed, truncation_rate  # noqa: E402

F64 = torch.float64
#: one program for all 40 atoms, one chunk for all states: the fewest interpreted steps
ONE_PROGRAM = dict(block_a=64, k_chunk=128)


def train(n_pulses: int) -> Sequence:
    """A train exercising every branch: inversion, varying TR, phases 0/180, large flips."""
    rng = np.random.default_rng(1)
    i = np.arange(n_pulses)
    flip = 10 + 60 * np.abs(np.sin(np.pi * i / 40)) + rng.uniform(0, 5, n_pulses)
    flip[5] = 180.0
    phase = np.where(rng.random(n_pulses) < 0.3, 180.0, 0.0)
    tr = rng.uniform(8.0, 14.0, n_pulses)
    return Sequence(flip, phase, tr, te_ms=3.0, inversion=True, ti_ms=15.0,
                    inversion_efficiency=0.95, name="interp-check")


def atoms(n: int = 40):
    rng = np.random.default_rng(0)
    t1 = rng.uniform(200.0, 3000.0, n)
    t2 = np.minimum(rng.uniform(5.0, 40.0, n), t1)
    t1[0], t2[0] = 0.0, 0.0          # instant recovery and decay
    t2[1] = 0.0                      # instant transverse decay only
    t2[2], t2[3], t2[4] = 0.5, 1.5, 3.0   # T2 below TR
    t2[5] = t1[5] = 40.0             # T2 = T1
    b1 = rng.uniform(0.6, 1.3, n)
    b1[6] = 1.0
    return (torch.tensor(v, dtype=F64) for v in (t1, t2, b1))


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest per-atom relative L2 error (atoms with an all-zero reference compared absolutely)."""
    d = (a.to(torch.complex128) - ref.to(torch.complex128)).flatten(1).norm(dim=1)
    r = ref.to(torch.complex128).flatten(1).norm(dim=1)
    return float(torch.where(r > 0, d / torch.where(r > 0, r, 1.0), d).max())


def k_atoms(seq, t1, t2, b1, tol):
    rate = truncation_rate(seq, tol, float(t2.max()), float(t1.max()),
                           (float(b1.min()), float(b1.max())))
    return states_needed(t2.numpy(), float(seq.tr_ms.min()), len(seq), tol, rate)


def main() -> dict:
    res: dict = {}
    seq = train(80)
    t1, t2, b1 = atoms()
    k = k_atoms(seq, t1, t2, b1, DEFAULT_TOL)
    res["k_range"] = [int(k.min()), int(k.max())]
    # forward, float32 through the dispatch glue (programs of 32 atoms), against the C kernel at
    # the same per-atom state counts (its SIMD groups of 16 atoms share their largest count)
    t0 = time.perf_counter()
    x, _ = _run_gpu_kernel(seq, t1.float(), t2.float(), b1.float(), k, (), 16)
    res["time_fwd_f32"] = time.perf_counter() - t0
    res["fwd_f32_vs_c"] = rel_l2(x, simulate(seq, t1, t2, b1))
    res["fwd_f32_dtype"] = str(x.dtype)
    # float64 (groups of 8), one program of 64 atoms, states in chunks of 8 (the inner loop of
    # the GPU's long trains); then float32 with the coefficients in float32 (accurate=False)
    x, _ = _triton.run(seq, t1, t2, b1, k, lanes=8, block_a=64, k_chunk=8)
    res["fwd_f64_vs_c"] = rel_l2(x, simulate(seq, t1, t2, b1, dtype=F64))
    x, _ = _triton.run(seq, t1.float(), t2.float(), b1.float(), k, lanes=16, accurate=False,
                       **ONE_PROGRAM)
    res["fwd_f32_fast_coefficients_vs_c"] = rel_l2(x, simulate(seq, t1, t2, b1))
    # Z in registers (z_registers=True): the same arithmetic as the scratch kernel, in float32
    # and float64, and over several power-of-two buckets of counts (one count per atom, 1-44),
    # in launches of at most 8 atoms
    for dt, lanes, name in ((torch.float32, 16, "f32"), (F64, 8, "f64")):
        a = (t1.to(dt), t2.to(dt), b1.to(dt))
        ref, _ = _triton.run(seq, *a, k, lanes=lanes)
        x, _ = _triton.run(seq, *a, k, lanes=lanes, z_registers=True)
        res[f"zreg_{name}_vs_kernel"] = rel_l2(x, ref)
        res[f"zreg_{name}_vs_c"] = rel_l2(x, simulate(seq, t1, t2, b1, dtype=dt))
    kk = np.arange(40) + 5
    kk[0] = 1
    ref, _ = _triton.run(seq, t1, t2, b1, kk, lanes=1, block_a=8, k_chunk=8)
    x, _ = _triton.run(seq, t1, t2, b1, kk, lanes=1, z_registers=True, chunk_size=8)
    res["zreg_buckets"] = [kp for _, _, kp in _triton._buckets(np.sort(kk))]
    res["zreg_buckets_vs_kernel"] = rel_l2(x, ref)
    # derivatives w.r.t. (b1, t1, t2) in that order against forward-mode autograd through the
    # general (complex) path, float64, one uniform state count (as the general path uses)
    seqj = train(60)
    # the general path runs a chunk at its largest count, here min(12, the atoms' largest)
    kj = int(min(12, k_atoms(seqj, t1, t2, b1, DEFAULT_TOL).max()))
    t0 = time.perf_counter()
    xj, jac = _triton.run(seqj, t1, t2, b1, np.full(40, kj), wrt=("b1", "t1", "t2"),
                          **ONE_PROGRAM)
    res["time_jac_f64"] = time.perf_counter() - t0
    for j, name in enumerate(("b1", "t1", "t2")):
        args = {"t1": t1, "t2": t2, "b1": b1}
        with fwad.dual_level():
            args[name] = fwad.make_dual(args[name], torch.ones_like(args[name]))
            out = simulate(seqj, args["t1"], args["t2"], args["b1"], dtype=F64, max_states=kj)
            primal, tangent = fwad.unpack_dual(out)
        res[f"jac_{name}_vs_forward_ad"] = rel_l2(jac[..., j], tangent)
    res["jac_value_vs_general"] = rel_l2(xj, primal)
    res["jac_dtype"] = str(jac.dtype)
    # T2 alone through the dispatch glue against the CPU Jacobian kernel (groups of 8)
    kc = k_atoms(seqj, t1, t2, b1, 1e-4)
    _, jc = simulate_jacobian(seqj, t1, t2, b1)
    _, jg = _run_gpu_kernel(seqj, t1, t2, b1, kc, ("t2",), 8)
    res["jac_t2_vs_c_kernel"] = rel_l2(jg[..., 0], jc[..., 1])
    return res


if __name__ == "__main__":
    t0 = time.perf_counter()
    out = main()
    out["total_s"] = time.perf_counter() - t0
    print(json.dumps(out))
    sys.stdout.flush()
