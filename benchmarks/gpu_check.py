"""One GPU check: fused EPG and Jacobian kernels, exact matching, GRU inference, CUDA tests.

Measures on one CUDA GPU, with the CPU baseline in the same run, and prints one table (also
written to ``OUT/gpu_check.md`` and ``OUT/gpu_check.json``; a ``--smoke`` run to
``OUT/gpu_check_smoke.*``, so that it never replaces a GPU run's record):

* the paper grid (114 650 atoms x the 1750-pulse oksuz2019 train, float32) through
  ``simulate`` (the fused Triton kernel), against the CPU C kernel (on a subset, extrapolated)
  and the pure-torch CUDA path, and their agreement; the kernel alone under 12 settings (atoms
  per program, warps, states per step, coefficient precision) and its variant with Z in
  registers (``z_registers=True``);
* ``data=simulated`` on the GPU: the simulation share of a training step (batch 1024, GRU 256 x
  2), one batch per launch and 32 768 atoms per launch;
* the blochsim benchmark case (100 000 atoms, inversion + 500 pulses, TR 10 ms, 32 states);
* the Jacobian (T1, T2, B1) of 100 000 atoms (blochsim train; oksuz2019 train) in float64
  and float32, and its accuracy;
* exhaustive matching: exact noise-free atoms and time against a plain float32 GEMM, where the
  time goes (one call under torch's profiler: its top kernels and host synchronisations; and
  the time with 4x larger blocks), and the atoms re-scored in float64 per signal (mean, max);
* SVD (rank 25) matching of a 256 x 256 slice against the paper grid, and where its time goes;
* GRU inference (the default model of ``configs/model/gru.yaml`` on complex fingerprints with
  B1; briefly trained here on fresh simulated batches) in fp32/TF32/bf16/fp16
  at batches of 1024, 16 384 and 65 536 through the Triton paths (``mrflight.models.fused_gru``,
  eval mode, inference_mode: the one-launch scan kernel of the recurrence, and the per-step path
  of one GEMM and one gate launch per step) and through cuDNN's GRU for comparison, with the test
  RMSE of each; the scan kernel alone under a few launch settings;
* the CUDA tests (``pytest -k cuda``) when pytest is installed.

Every row runs under ``try``: a failure prints its error in its row and the check goes on; a
global time budget skips the rows that no longer fit. Kernel times are medians of CUDA-event
timings after a warm-up; the first call (Triton JIT compilation included) is reported apart.

Usage (from the repository root; needs torch, triton, numpy and, for the GRU row, omegaconf)::

    PYTHONPATH=. python3 benchmarks/gpu_check.py            # within --budget (270 s) + tests
    PYTHONPATH=. python3 benchmarks/gpu_check.py --smoke    # every row on the CPU, tiny sizes,
                                                            # kernels through TRITON_INTERPRET=1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # must precede the first import of the kernel module
    os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from mrflight.dictionary import paper_grid, random_params  # noqa: E402
from mrflight.fileio import atomic_path  # noqa: E402
from mrflight.matching import DictionaryMatcher, float32_matmul  # noqa: E402
from mrflight.models import GRURegressor  # noqa: E402
from mrflight.models import fused_gru as fg  # noqa: E402
from mrflight.models.fused_gru import fused_gru_available  # noqa: E402
from mrflight.physics import Sequence, add_noise, oksuz2019, simulate  # noqa: E402
from mrflight.physics._triton_glue import _run_gpu_kernel  # noqa: E402
from mrflight.physics.jacobian import _jacobian_forward_ad  # noqa: E402
from mrflight.physics.truncation import DEFAULT_TOL, states_needed, truncation_rate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS: list[dict] = []
T_START = time.perf_counter()


class Ctx:
    """Run-wide settings (sizes shrink in smoke mode)."""

    def __init__(self, args):
        self.smoke = args.smoke
        self.dev = torch.device("cpu" if args.smoke else "cuda")
        self.budget = args.budget
        self.reps = 1 if args.smoke else args.repeats
        s = args.smoke
        self.grid = paper_grid()[::4000] if s else paper_grid()     # 29 atoms in smoke mode
        self.pulses = 40 if s else 1750
        self.n_bloch = 48 if s else 100_000
        self.bloch_pulses = 30 if s else 500
        self.bloch_states = 8 if s else 32
        self.n_jac = 40 if s else 100_000
        self.jac_pulses = 30 if s else 1750
        self.n_cpu_subset = 29 if s else 16384
        self.n_match = 20 if s else 5000
        self.n_cpu_match = 10 if s else 1000
        self.n_slice = 64 if s else 256 * 256
        self.train_s = 2.0 if s else 25.0
        self.n_test = 64 if s else 20_000
        self.train_batch = 32 if s else 1024
        self.sim_launch = 64 if s else 32768
        self.gru_batches = (32,) if s else (16384, 65536)
        # the GRU scan kernel: (rows per program, warps, input columns per product)
        self.scan_settings = ([(16, 4, 16)] if s else
                              [(64, 8, 64), (32, 4, 64), (64, 4, 64), (32, 8, 64), (64, 8, 32),
                               (16, 4, 64), (128, 8, 32)])
        # (atoms per program, warps, states per step, float64 coefficients)
        self.kernel_settings = ([(32, 4, 16, True), (16, 2, 16, False)] if s else
                                [(32, 4, 16, True), (32, 4, 16, False), (16, 2, 16, True),
                                 (16, 4, 16, True), (32, 2, 16, True), (32, 8, 16, True),
                                 (32, 4, 32, True), (32, 4, 8, True), (64, 4, 16, True),
                                 (64, 8, 16, True), (64, 8, 32, True), (16, 1, 16, True)])

    def left(self) -> float:
        return self.budget - (time.perf_counter() - T_START)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def bench(fn, ctx: Ctx) -> tuple[float, float]:
    """(first call incl. compilation, median of the timed calls), seconds."""
    t0 = time.perf_counter()
    fn()
    sync(ctx.dev)
    first = time.perf_counter() - t0
    times = []
    for _ in range(ctx.reps):
        if ctx.dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


def row(name: str, target: str = "", est_s: float = 5.0):
    """Decorator: run the row now, record ``(value, status, note)``, print it at once."""
    def deco(fn):
        r = {"row": name, "value": "", "target": target, "status": "", "note": ""}
        if ctx.left() < est_s:
            r.update(status="skipped", note=f"time budget ({ctx.left():.0f} s left)")
        else:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", RuntimeWarning)  # a kernel fallback warns
                    value, ok, note = fn()
                r.update(value=value, status="" if ok is None else ("PASS" if ok else "FAIL"),
                         note=note)
            except Exception as e:  # the row reports its error; the check goes on
                tb = traceback.format_exc().strip().splitlines()
                r.update(status="ERROR", note=f"{type(e).__name__}: {e} ({tb[-3].strip()})"
                         .replace("|", "/")[:400])
            r["note"] = (r["note"] + f" [{time.perf_counter() - t0:.1f} s]").strip()
        ROWS.append(r)
        print(f"| {r['row']} | {r['value']} | {r['target']} | {r['status']} | {r['note']} |",
              flush=True)
        return fn
    return deco


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.cpu().to(torch.complex128), b.cpu().to(torch.complex128)
    d = (a - b).flatten(1).norm(dim=1)
    r = b.flatten(1).norm(dim=1)
    return float(torch.where(r > 0, d / torch.where(r > 0, r, 1.0), d).max())


def fused(seq, t1, t2, b1=None, dtype=torch.float32, wrt=(), k_atom=None, lanes=None):
    """The fused kernel: through ``simulate`` on CUDA; called directly in smoke mode (the
    dispatch is CUDA-only) and when explicit state counts or derivatives are asked for."""
    if ctx.dev.type == "cuda" and not wrt and k_atom is None:
        return simulate(seq, t1, t2, b1, dtype=dtype), None
    b1 = torch.ones_like(t1) if b1 is None else b1
    if k_atom is None:
        tol = 1e-4 if wrt else DEFAULT_TOL
        rate = truncation_rate(seq, tol, float(t2.max()), float(t1.max()),
                               (float(b1.min()), float(b1.max())))
        k_atom = states_needed(t2.cpu().numpy(), float(seq.tr_ms.min()), len(seq), tol, rate)
    if lanes is None:
        lanes = 1 if k_atom is not None and np.all(k_atom == k_atom[0]) else (
            16 if dtype == torch.float32 and not wrt else 8)
    out = _run_gpu_kernel(seq, t1.to(dtype), t2.to(dtype), b1.to(dtype), k_atom, wrt, lanes)
    if out is None:
        raise RuntimeError("the fused kernel is unavailable (triton missing or disabled)")
    return out


def profile_kernels(fn, ctx: Ctx, top: int = 6) -> tuple[str, int, float, float]:
    """One call of ``fn`` (after a warm-up) under torch's profiler: ``(kernels, syncs, wall,
    busy)``, the ``top`` kernels by device time ("name xcount time"), the host
    synchronisations, the wall time and the device's busy time (s). On the CPU (smoke mode) the
    operators by their own CPU time, and busy = wall."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(ctx.dev)
    cuda = ctx.dev.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        fn()
        sync(ctx.dev)
        wall = time.perf_counter() - t0
    events = prof.key_averages()

    def own(e):  # microseconds
        return e.self_device_time_total if cuda else e.self_cpu_time_total

    # on CUDA the kernels and copies themselves: a CPU operator's own device time is that of
    # the kernels it launched, which would count them twice
    device = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    kept = [e for e in events if own(e) > 0 and e.device_type == device]
    kept.sort(key=own, reverse=True)
    busy = sum(own(e) for e in kept) / 1e6 if cuda else wall
    names = ", ".join(f"{e.key[:48]} x{e.count} {own(e) / 1e3:.1f} ms" for e in kept[:top])
    syncs = sum(e.count for e in events
                if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                             "cudaEventSynchronize"))
    return names.replace("|", "/"), syncs, wall, busy


def ms(s: float) -> str:
    return f"{1e3 * s:.1f} ms"


def table() -> str:
    lines = ["| check | value | target | status | note |", "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['value']} | {r['target']} | {r['status']} | {r['note']} |"
              for r in ROWS]
    return "\n".join(lines)


def main() -> int:
    global ctx
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--budget", type=float, default=270.0, help="seconds for all rows")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    ap.add_argument("--no-tests", action="store_true", help="skip the pytest row")
    args = ap.parse_args()
    ctx = Ctx(args)
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke to check the script on the CPU")
        return 2
    dev = ctx.dev
    gpu = torch.cuda.get_device_name(0) if dev.type == "cuda" else "none (smoke run)"
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "not installed"
    m = torch.backends.cuda.matmul
    tf32 = getattr(m, "fp32_precision", None) or f"allow_tf32={m.allow_tf32}"
    head = (f"- GPU: {gpu}; torch {torch.__version__}, triton {tv}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPU threads (torch uses "
            f"{torch.get_num_threads()})\n- default float32 matmul mode: {tf32}; mode "
            + ("smoke (CPU, tiny sizes, TRITON_INTERPRET=1: times mean nothing)" if ctx.smoke
               else "full") +
            f"\n- command: `PYTHONPATH=. python3 benchmarks/gpu_check.py"
            f"{''.join(' ' + a for a in sys.argv[1:])}`")
    print(head, flush=True)
    print("| check | value | target | status | note |\n|---|---|---|---|---|", flush=True)
    state: dict = {}
    seq = oksuz2019(n_pulses=ctx.pulses) if ctx.smoke else oksuz2019()
    grid = torch.tensor(ctx.grid)

    @row("EPG paper grid, float32 (fused kernel via simulate)", "<= 50 ms", 30)
    def _():
        t1, t2 = grid[:, 0].float().to(dev), grid[:, 1].float().to(dev)
        first, t = bench(lambda: fused(seq, t1, t2), ctx)
        state["atoms"] = fused(seq, t1, t2)[0]
        return (ms(t), t <= 0.05,
                f"{len(grid)} atoms x {len(seq)} pulses; first call (JIT compile) {first:.2f} s")

    @row("EPG paper grid: kernel settings (atoms/program, warps, states/step, fp64 coefs; "
         "zreg: Z in registers)", "", 60)
    def _():
        from mrflight.physics._triton_glue import _gpu_kernel

        gk = _gpu_kernel()
        if gk is None:
            return "n/a", None, "triton unavailable"
        t1, t2 = grid[:, 0].float().to(dev), grid[:, 1].float().to(dev)
        b1 = torch.ones_like(t1)
        rate = truncation_rate(seq, DEFAULT_TOL, float(t2.max()), float(t1.max()))
        k = states_needed(t2.cpu().numpy(), float(seq.tr_ms.min()), len(seq), DEFAULT_TOL,
                          rate)
        res = {}
        # the Z-in-registers variant first (the measurement to make): its launch settings, 4
        # and 16 warps, and float32 coefficients
        for acc, nw in ((True, None), (False, None), (True, 4), (True, 16)):
            label = f"zreg/{'fp64' if acc else 'fp32'}/{nw or 'default'} warps"
            _, res[label] = bench(lambda acc=acc, nw=nw: gk.run(
                seq, t1, t2, b1, k, lanes=16, z_registers=True, accurate=acc, num_warps=nw), ctx)
        for ba, nw, kc, acc in ctx.kernel_settings:
            if ctx.left() < 40:
                break
            def f(ba=ba, nw=nw, kc=kc, acc=acc):
                return gk.run(seq, t1, t2, b1, k, lanes=16, block_a=ba, k_chunk=kc,
                              num_warps=nw, accurate=acc)
            _, res[f"{ba}/{nw}/{kc}/{'fp64' if acc else 'fp32'}"] = bench(f, ctx)
        ref = gk.run(seq, t1, t2, b1, k, lanes=16)[0]
        agree = rel_l2(gk.run(seq, t1, t2, b1, k, lanes=16, z_registers=True)[0], ref)
        best = sorted(res, key=res.get)
        state["kernel_best"] = best[0]
        note = "; ".join(f"{b}: {ms(res[b])}" for b in best)
        return (ms(res[best[0]]), res[best[0]] <= 0.05,
                f"best first; default 32/4/16/fp64; zreg vs default max rel L2 {agree:.1e}. "
                + note)

    @row("data=simulated on the GPU: simulation share of a training step", "<= 10 %", 40)
    def _():
        from mrflight.data.simulated import BatchSimulator, ParameterPrior
        from mrflight.regressor import MRFRegressor

        b, n_launch = ctx.train_batch, ctx.sim_launch
        sim = BatchSimulator(seq, ParameterPrior(), ("t1", "t2", "b1"),
                             torch.tensor([4000.0, 500.0, 1.0]), b, "complex", True, 1)

        def on_dev(batch):
            return batch._replace(**{f: getattr(batch, f).to(dev) for f in
                                     ("target", "params_ms", "noise_std", "sim_params", "key")})
        # what training does (SimulatedDataModule._device_batch): one call simulates, noises
        # and preprocesses a launch of batches; the one-batch call is shown for comparison
        group = on_dev(sim.draw_launch(0, 0, 0, n_launch // b, 0))
        one = on_dev(sim.draw(0, 0, 0, 0))
        _, t_one = bench(lambda: sim.realise(one), ctx)
        _, t_launch = bench(lambda: sim.realise(group), ctx)
        _, t_sim = bench(lambda: sim.simulate(group.sim_params), ctx)
        net = GRURegressor(input_length=len(seq), in_channels=2, n_outputs=3, hidden_size=256,
                           num_layers=2)
        module = MRFRegressor(net, target_scale_ms=[4000.0, 500.0, 1.0], input_mode="complex",
                              targets=["t1", "t2", "b1"], loss="relative").to(dev)
        opt = torch.optim.Adam(module.parameters(), lr=2e-3)
        real = sim.realise(one)

        def step():
            loss = module.loss(module(real.signal), real)
            opt.zero_grad()
            loss.backward()
            opt.step()
        _, t_step = bench(step, ctx)
        n = n_launch // b
        per = t_launch / n
        share = per / (per + t_step)
        alone = t_one / (t_one + t_step)
        return (f"{100 * share:.1f} %", share <= 0.10,
                f"batch {b}: a launch of {n_launch} fingerprints simulated, noised and "
                f"preprocessed in {ms(t_launch)} (simulation {ms(t_sim)}; {ms(per)} per batch); "
                f"one batch alone {ms(t_one)} ({100 * alone:.0f} % of a step); GRU 256x2 step "
                f"(relative loss) {ms(t_step)}")

    @row("EPG paper grid, CPU C kernel (same run)", "", 30)
    def _():
        pick = np.random.default_rng(0).choice(len(grid), ctx.n_cpu_subset, replace=False)
        g = grid[pick]
        simulate(seq, g[:8, 0], g[:8, 1])  # compile/load the C kernel
        t0 = time.perf_counter()
        cpu = simulate(seq, g[:, 0], g[:, 1])
        t = (time.perf_counter() - t0) * len(grid) / len(g)
        # the same call on the GPU: the same atoms give the same truncation (a subset of the
        # grid has its own state-count groups, which differ from the whole grid's within tol)
        agree = rel_l2(fused(seq, g[:, 0].float().to(dev), g[:, 1].float().to(dev))[0], cpu)
        state["cpu_s"] = t
        return (f"{t:.2f} s (extrapolated from {len(g)} atoms)", None,
                f"GPU vs CPU kernel (float32 both, same truncation): max rel L2 {agree:.1e} "
                f"(bound T*2^-24 = {len(seq) * 2.0**-24:.1e}) "
                f"{'ok' if agree < len(seq) * 2.0**-24 else 'TOO LARGE'}")

    @row("EPG paper grid, pure-torch CUDA path (MRFLIGHT_NO_TRITON=1)", "", 20)
    def _():
        if dev.type != "cuda":
            return "n/a", None, "CUDA only"
        t1, t2 = grid[:, 0].float().to(dev), grid[:, 1].float().to(dev)
        os.environ["MRFLIGHT_NO_TRITON"] = "1"
        try:
            _, t = bench(lambda: simulate(seq, t1, t2), ctx)
        finally:
            os.environ.pop("MRFLIGHT_NO_TRITON")
        return ms(t), None, "the fallback, for reference"

    ib = np.arange(ctx.bloch_pulses)
    bseq = Sequence(10 + 50 * np.abs(np.sin(np.pi * ib / 250)), 0.0, 10.0, te_ms=5.0,
                    inversion=True, ti_ms=20.0, name="blochsim-like")

    @row("blochsim case: 100k atoms, inversion + 500 pulses, TR 10 ms, 32 states", "<= 10 ms", 20)
    def _():
        p = torch.tensor(random_params(ctx.n_bloch, (100.0, 4000.0), (10.0, 500.0), seed=3),
                         dtype=torch.float32, device=dev)
        k = np.full(ctx.n_bloch, ctx.bloch_states)
        first, t = bench(lambda: fused(bseq, p[:, 0], p[:, 1], k_atom=k, lanes=1), ctx)
        return (ms(t), t <= 0.01, f"{ctx.n_bloch} atoms x {ctx.bloch_pulses} pulses x "
                f"{ctx.bloch_states} states, float32, flip 10-60 deg; first call {first:.2f} s")

    pj = torch.tensor(random_params(ctx.n_jac, seed=4), device=dev)
    bj = torch.linspace(0.7, 1.3, ctx.n_jac, dtype=torch.float64, device=dev)
    jseq = oksuz2019(n_pulses=ctx.jac_pulses)
    wrt3 = ("t1", "t2", "b1")
    cases = [("blochsim train (500 pulses, 32 states)", bseq, np.full(ctx.n_jac, ctx.bloch_states),
              True), ("oksuz2019 (1750 pulses, tol 1e-4)", jseq, None, False)]
    for label, jsq, kj, targeted in cases:
        for dt in (torch.float64, torch.float32):
            name = "float64" if dt == torch.float64 else "float32"

            @row(f"Jacobian (T1, T2, B1) of 100k atoms, {label}, {name}",
                 "<= 100 ms" if targeted else "", 30)
            def _(dt=dt, jsq=jsq, kj=kj, targeted=targeted, tag=label[:4] + name):
                def f():
                    return fused(jsq, pj[:, 0], pj[:, 1], bj, dtype=dt, wrt=wrt3, k_atom=kj)

                first, t = bench(f, ctx)
                state[tag] = f()[1]
                note = f"{ctx.n_jac} atoms, B1 0.7-1.3; first call {first:.2f} s"
                ref = state.get(tag.replace("float32", "float64"))
                if dt == torch.float32 and ref is not None:
                    err = max(rel_l2(state[tag][..., j], ref[..., j]) for j in range(3))
                    note += f"; float32 vs float64 derivatives: max rel L2 {err:.1e}"
                return ms(t), (t <= 0.1) if targeted else None, note

    @row("Jacobian accuracy vs forward-mode autograd (float64, CPU)", "<= 1e-10", 40)
    def _():
        n = 16
        sub = slice(0, ctx.n_jac, ctx.n_jac // n)
        t1, t2, b1 = pj[sub, 0].cpu(), pj[sub, 1].cpu(), bj[sub].cpu()
        wrt = ("t1", "t2", "b1")
        rate = truncation_rate(jseq, 1e-4, float(t2.max()), float(t1.max()),
                               (float(b1.min()), float(b1.max())))
        k = states_needed(t2.numpy(), float(jseq.tr_ms.min()), len(jseq), 1e-4, rate)
        k = np.full(len(t1), int(k.max()))  # the general path runs a chunk at its largest count
        x, jg = fused(jseq, t1.to(dev), t2.to(dev), b1.to(dev), torch.float64, wrt, k, 1)
        xr, jr = _jacobian_forward_ad(jseq, t1, t2, b1, wrt, 1e-4, torch.device("cpu"),
                                      4096, rate)
        err = max(rel_l2(jg[..., j], jr[..., j]) for j in range(3))
        return f"{err:.1e}", err <= 1e-10, f"{len(t1)} atoms, max over T1/T2/B1 columns"

    @row("exhaustive matching: exact noise-free paper-grid atoms", "100 %", 40)
    def _():
        atoms = state["atoms"]
        params = grid.to(dev)
        mt = DictionaryMatcher(atoms, params, device=dev)
        pick = torch.as_tensor(np.random.default_rng(5).choice(len(grid), ctx.n_match, False),
                               device=dev)
        clean = atoms[pick]
        got = mt.match(clean)
        exact = float((got == params[pick].to(got.dtype)).all(1).double().mean())
        note = f"{ctx.n_match} atoms"
        if dev.type == "cuda":
            cm = DictionaryMatcher(atoms.cpu(), grid, device="cpu")
            c = cm.match(clean[: ctx.n_cpu_match].cpu())
            same = float((c == got[: ctx.n_cpu_match].cpu().to(c.dtype)).all(1).double().mean())
            note += f"; same atom as the CPU matcher for {100 * same:.2f} % of {ctx.n_cpu_match}"
            del cm
        state["matcher"], state["pick"] = mt, pick
        state["noisy"] = add_noise(clean, 0.01,
                                   generator=torch.Generator(device=dev).manual_seed(0)).to(dev)
        return f"{100 * exact:.2f} %", exact == 1.0, note

    @row("exhaustive matching time vs plain float32 GEMM", "<= 1.2x", 30)
    def _():
        mt, pick, noisy = state["matcher"], state["pick"], state["noisy"]
        sig = noisy.abs().float()
        sig = sig / sig.norm(dim=1, keepdim=True)

        def gemm():
            with float32_matmul(dev, "ieee"):
                return sig @ mt.atoms.T

        _, tg = bench(gemm, ctx)
        _, tm = bench(lambda: mt.match(noisy), ctx)
        state["gemm_s"] = tg
        return (f"{tm / tg:.2f}x", tm / tg <= 1.2,
                f"match {ms(tm)}, GEMM {ms(tg)} (IEEE float32) for {len(pick)} noisy signals")

    @row("exhaustive matching: where its time goes (one call profiled; 4x larger blocks)", "", 40)
    def _():
        import mrflight.matching as matching

        mt, noisy = state["matcher"], state["noisy"]
        top, syncs, wall, busy = profile_kernels(lambda: mt.match(noisy), ctx)
        blocks = matching.DEFAULT_BLOCK_BYTES
        try:  # fewer, larger signal blocks: is the cost per block?
            matching.DEFAULT_BLOCK_BYTES = 4 * blocks
            _, big = bench(lambda: mt.match(noisy), ctx)
        finally:
            matching.DEFAULT_BLOCK_BYTES = blocks
        gemm = state.get("gemm_s")
        ratio = f", {big / gemm:.2f}x the GEMM" if gemm else ""
        return (ms(busy), None, f"wall {ms(wall)}, device busy {ms(busy)}, {syncs} host syncs; "
                f"top kernels: {top}; with 4x larger blocks {ms(big)}{ratio}")

    @row("exhaustive matching: atoms re-scored in float64 per signal (mean / max)", "", 40)
    def _():
        mt, pick, noisy = state["matcher"], state["pick"], state["noisy"]
        out = []
        for name, sig in (("noise-free", state["atoms"][pick]), ("noise 0.01", noisy)):
            mt.match(sig)
            c = mt.last_candidates.double()
            out.append(f"{name} {float(c.mean()):.1f} / {int(c.max())}")
        return out[0], None, f"{len(pick)} signals; " + "; ".join(out)

    @row("SVD matching (rank 25) of a 256x256 slice vs the paper grid", "a few ms", 45)
    def _():
        atoms = state["atoms"]
        t0 = time.perf_counter()
        svd = DictionaryMatcher(atoms, grid.to(dev), rank=25, device=dev)
        sync(dev)
        build = time.perf_counter() - t0
        gemm = DictionaryMatcher(atoms, grid.to(dev), rank=25, device=dev, scan="gemm")
        pick = torch.as_tensor(np.random.default_rng(6).choice(len(grid), ctx.n_slice, True),
                               device=dev)
        sl = add_noise(atoms[pick], 0.01, generator=torch.Generator(device=dev).manual_seed(1))
        _, t = bench(lambda: svd.match(sl), ctx)
        kernels = svd._use_kernels()
        c = svd.last_candidates.double()
        _, tg = bench(lambda: gemm.match(sl), ctx)
        same = float((svd.match(sl) == gemm.match(sl)).all(1).double().mean())
        got = svd.match(atoms[state["pick"]])
        exact = float((got == grid.to(dev)[state["pick"]].to(got.dtype)).all(1).double().mean())
        del state["matcher"], state["noisy"]
        state["svd"], state["slice"] = svd, sl
        return (ms(t), None, f"{ctx.n_slice} signals, scan: "
                f"{'fused kernels (3xTF32)' if kernels else 'GEMM blocks'}; the GEMM-block scan "
                f"{ms(tg)}, same atoms {100 * same:.2f} %; basis built in {build:.2f} s; exact "
                f"noise-free atoms {100 * exact:.2f} %; atoms re-scored in float64 per signal "
                f"{float(c.mean()):.1f} mean, {int(c.max())} max")

    @row("SVD matching of the slice: where its time goes (one call profiled)", "", 20)
    def _():
        svd, sl = state.pop("svd"), state.pop("slice")
        top, syncs, wall, busy = profile_kernels(lambda: svd.match(sl), ctx)
        return (ms(busy), None, f"wall {ms(wall)}, device busy {ms(busy)}, {syncs} host syncs; "
                f"top kernels: {top}")

    @row("GRU inference (the default model: gru.yaml, complex input, T1/T2/B1), fused path vs "
         "cuDNN, fp32 / tf32 / bf16 / fp16", ">= 10 M/s", 60)
    def _():
        from omegaconf import OmegaConf

        from mrflight.data.simulated import DEFAULT_SCALES, BatchSimulator, ParameterPrior

        torch.manual_seed(0)
        cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "mrflight/configs/model/gru.yaml"))
        cfg.pop("_target_")
        if ctx.smoke:  # 40 pulses: a rank below the train's length
            cfg["rank"] = min(cfg.get("rank", 0), 8)
        targets = ("t1", "t2", "b1")
        prior = ParameterPrior()
        net = GRURegressor(input_length=len(seq), in_channels=2, n_outputs=3, **cfg)
        if net.rank:
            net.fit_basis(seq, noise_min=prior.noise_std[0], t1_range=prior.t1_range,
                          t2_range=prior.t2_range, b1_range=prior.b1_range)
        net = net.to(dev)
        scale = torch.tensor([DEFAULT_SCALES[t] for t in targets], device=dev)
        sim = BatchSimulator(seq, prior, targets, scale.cpu(), ctx.train_batch, "complex",
                             True, 1)

        def realised(batch):  # drawn on the CPU (a function of its indices), realised on dev
            batch = batch._replace(**{f: getattr(batch, f).to(dev) for f in
                                      ("target", "params_ms", "noise_std", "sim_params",
                                       "key")})
            b = sim.realise(batch)
            return b.signal, b.params_ms

        # a short training on fresh simulated batches of the default prior (B1, noise range,
        # random phase) so that the RMSE comparison means something
        opt = torch.optim.Adam(net.parameters(), lr=3e-3)
        t0, steps = time.perf_counter(), 0
        while time.perf_counter() - t0 < ctx.train_s:
            x, p = realised(sim.draw(0, 0, steps, 0))
            loss = torch.nn.functional.mse_loss(net(x), p / scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
        net.eval()
        test = [realised(sim.draw(1, 0, j, 0))
                for j in range(max(1, ctx.n_test // ctx.train_batch))]
        xt, pt = torch.cat([t[0] for t in test]), torch.cat([t[1] for t in test])
        big = max(ctx.gru_batches)
        xb = xt[:big].repeat(max(1, big // len(xt) + 1), 1, 1)[:big]
        modes = ("fp32", "tf32", "bf16", "fp16")

        def run(x, mode, path):
            """net(x) in eval mode under inference_mode. path "default": the package's choice
            (the one-launch scan kernel for TF32/bf16/fp16, the per-step path for IEEE fp32);
            "step": the scan off (one GEMM and one gate launch per step); "cudnn":
            MRFLIGHT_NO_TRITON (nn.GRU)."""
            prev = os.environ.pop("MRFLIGHT_NO_TRITON", None)
            scan = fg._SCAN.value
            if path == "cudnn":
                os.environ["MRFLIGHT_NO_TRITON"] = "1"
            if path == "step":
                fg._SCAN.value = None
            try:
                with torch.inference_mode():
                    if mode in ("bf16", "fp16"):
                        half = torch.bfloat16 if mode == "bf16" else torch.float16
                        with torch.autocast(dev.type, dtype=half):
                            return net(x).float()
                    with float32_matmul(dev, "tf32" if mode == "tf32" else "ieee"):
                        return net(x)
            finally:
                fg._SCAN.value = scan
                os.environ.pop("MRFLIGHT_NO_TRITON", None)
                if prev is not None:
                    os.environ["MRFLIGHT_NO_TRITON"] = prev

        with torch.inference_mode():
            used = fused_gru_available(net.rnn, xb)  # the input's device, eval, no grad
        # which path the default takes per precision: the scan kernel counted by a spy; a scan
        # that fails warns, is disabled, and is reported (not timed as if it ran)
        ran, real = {}, fg._SCAN.get()
        for mode in modes:
            calls = []
            fg._SCAN.value = None if real is None else types.SimpleNamespace(
                scan=lambda *a, calls=calls: (calls.append(1), real.scan(*a)))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                run(xb[:4096], mode, "default")
            failed = [str(w.message)[:160] for w in caught if "scan kernel failed" in
                      str(w.message)]
            ran[mode] = (f"scan FAILED ({failed[0]})" if failed else
                         "scan" if calls else "per-step")
            fg._SCAN.value = real
        rates, rmse = {}, {}
        paths = [(p, m) for p in ("default", "step", "cudnn") for m in modes]
        for path, mode in paths:
            for bs in sorted({min(1024, big), *ctx.gru_batches}):  # 1024: launch-bound?
                _, t = bench(lambda bs=bs, m=mode, p=path: run(xb[:bs], m, p), ctx)
                rates[(path, mode, bs)] = bs / t
            est = torch.cat([run(xt[i: i + 8192], mode, path)
                             for i in range(0, len(xt), 8192)]) * scale
            rmse[(path, mode)] = ((est - pt) ** 2).mean(0).sqrt().tolist()
        base = rmse[("cudnn", "fp32")]
        ch = {k: max(abs(v[j] / base[j] - 1) for j in range(2)) for k, v in rmse.items()}
        best = max((k for k in rates if k[0] != "cudnn"), key=rates.get)
        state["gru"] = (net, xb)
        return (f"{rates[best] / 1e6:.1f} M/s ({best[0]}, {best[1]}, batch {best[2]})",
                rates[best] >= 1e7 and ch[best[:2]] <= 0.01,
                "the default path per precision: "
                + ", ".join(f"{m} {ran[m]}" for m in modes)
                + f"; Triton paths {'used' if used else 'NOT used (no CUDA/Triton)'}; "
                + "; ".join(f"{p} {m} batch {b}: {r / 1e6:.2f} M/s"
                            for (p, m, b), r in rates.items())
                + f"; trained {steps} steps ({ctx.train_s:.0f} s); test RMSE T1/T2 "
                + ", ".join(f"{p} {m} {v[0]:.0f}/{v[1]:.1f} ms ({100 * ch[(p, m)]:.2f} %)"
                            for (p, m), v in rmse.items())
                + " (change vs cuDNN fp32, target <= 1 %)")

    @row("GRU scan kernel settings (rows per program, warps, input columns per product), "
         "the default GRU's recurrence alone, batch 65536", "", 30)
    def _():
        if "gru" not in state or fg._SCAN.get() is None:
            return "n/a", None, "no GRU row, or no Triton"
        net, xb = state["gru"]
        with torch.inference_mode():
            coef, _ = net.project(xb * net.input_scale, net.input_scale)
            fold = fg.folded_weights(net.rnn, net.basis, net.values_per_step)
        res = {}
        for mode in ("fp16", "tf32"):
            for br, nw, bk in ctx.scan_settings:
                if ctx.left() < 15:
                    break
                key = (mode, br, nw, bk)

                def f(br=br, nw=nw, bk=bk, mode=mode):
                    with torch.inference_mode():
                        if mode == "fp16":
                            with torch.autocast(dev.type, dtype=torch.float16):
                                return fg.scan_gru(net.rnn, coef, fold, {
                                    "BLOCK_R": br, "num_warps": nw, "BK": bk})
                        with float32_matmul(dev, "tf32"):
                            return fg.scan_gru(net.rnn, coef, fold, {
                                "BLOCK_R": br, "num_warps": nw, "BK": bk})
                try:
                    _, res[key] = bench(f, ctx)
                except Exception as e:  # noqa: BLE001 - a setting the GPU cannot run
                    res[key] = float("inf")
                    print(f"  scan {key}: {type(e).__name__}: {str(e)[:200]}", flush=True)
        if not res:
            return "n/a", None, "no time left"
        order = sorted(res, key=res.get)
        n = len(coef)
        return (f"{n / res[order[0]] / 1e6:.1f} M/s", None,
                "default " + str(fg._SCAN.get().launch_settings(net.hidden_size,
                                                                  coef[0].numel()))
                + "; " + "; ".join(f"{m} {br}/{nw}/{bk}: "
                                   + (f"{n / res[(m, br, nw, bk)] / 1e6:.1f} M/s"
                                      if res[(m, br, nw, bk)] < float("inf") else "failed")
                                   for m, br, nw, bk in order))

    if not args.no_tests:
        @row("CUDA tests: pytest -k cuda (test_epg, test_matching, test_triton, "
             "test_match_kernels, test_checkpoints)", "all pass", 120)
        def _():
            try:
                import pytest  # noqa: F401
            except ImportError:
                return "not run", None, "pytest is not installed here"
            cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                   "tests/test_epg.py", "tests/test_matching.py", "tests/test_triton.py",
                   "tests/test_match_kernels.py", "tests/test_checkpoints.py", "-k", "cuda"]
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            env.pop("TRITON_INTERPRET", None)
            r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                               timeout=max(30, ctx.left() - 5))
            last = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
            if r.returncode not in (0, 5):
                fails = [ln for ln in r.stdout.splitlines() if ln.startswith("FAILED")]
                last += " " + "; ".join(fails)[:300]
            return last, r.returncode == 0, ""

    total = time.perf_counter() - T_START
    text = f"# GPU check\n\n{head}\n- total {total:.0f} s\n\n{table()}\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_smoke" if ctx.smoke else "gpu_check"  # a smoke run keeps the GPU record
    for name, body in ((f"{stem}.md", text), (f"{stem}.json", json.dumps(ROWS, indent=1))):
        with atomic_path(out / name) as tmp:
            Path(tmp).write_text(body)
    print(f"\n{text}\nwritten to {out / (stem + '.md')}", flush=True)
    return 0


ctx: Ctx

if __name__ == "__main__":
    sys.exit(main())
