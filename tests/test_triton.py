"""The fused Triton kernels (EPG, GRU gates): arithmetic on the CPU through Triton's interpreter,
and on CUDA.

The interpreter checks run ``tests/triton_interp_checks.py`` (EPG) and
``tests/triton_gru_interp_checks.py`` (GRU gates) once each in a subprocess with
``TRITON_INTERPRET=1`` (the variable is read when the kernel is decorated, so it must be set
before the module is imported, and it must not leak into the rest of the session). They compare
the kernels with the CPU C kernels at the same per-atom state counts and with forward-mode
autograd through the general (complex) path. Skipped when ``triton`` is not installed (it is in
the ``dev`` extra on Linux).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install "
                                  "triton, Linux): the fused GPU kernels cannot be checked")
needs_cuda = pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()),
                                reason="needs CUDA and triton")

#: float32 bound against the C kernel at equal state counts (both round every state update to
#: float32; measured 2-4e-7 on the interpreter checks' 80-pulse train, 5.7e-6 on an H200 for
#: the 1750-pulse paper grid, whose float32 exp differs from the CPU's in the last bits)
F32_TOL = 1e-5
#: float64: the two implementations differ only in the order of rounding (measured: 7e-12 on
#: the interpreter, 6e-10 for GPU vs CPU on the paper grid, where the GPU's float64 exp/sin/cos
#: differ from the CPU's libm in the last bits)
F64_TOL = 1e-10
F64_GPU_TOL = 1e-8


def _interpreted(script: str) -> dict:
    """The JSON line printed by ``tests/<script>`` run under ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("MRFLIGHT_NO_TRITON", None)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / script)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interp():
    return _interpreted("triton_interp_checks.py")


@pytest.fixture(scope="module")
def gru_interp():
    return _interpreted("triton_gru_interp_checks.py")


#: the fused noise kernel against realise's torch path on the same draws: float32 rounding of
#: both (measured 2-3e-7 on simulated fingerprints); random complex fingerprints, whose sum of
#: squares (the phase alignment's angle) is ~12x smaller than their squared norm, amplify it
#: (measured 1.3e-6)
REALISE_TOL = 1e-5


@needs_triton
def test_interpreted_noise_kernel_matches_torch_path():
    got = _interpreted("triton_realise_interp_checks.py")
    assert got["cases"] == 16
    for key in ("simulated_magnitude", "simulated_complex", "random_magnitude",
                "random_complex"):
        assert got[key] < REALISE_TOL, key


@needs_triton
def test_interpreted_forward_matches_c_kernel(interp):
    assert interp["k_range"][0] < interp["k_range"][1]  # atoms of different state counts
    assert interp["fwd_f32_dtype"] == "torch.complex64"
    assert interp["fwd_f32_vs_c"] < F32_TOL
    assert interp["fwd_f32_fast_coefficients_vs_c"] < F32_TOL
    assert interp["fwd_f64_vs_c"] < F64_TOL


@needs_triton
def test_interpreted_jacobian_matches_forward_ad(interp):
    assert interp["jac_dtype"] == "torch.complex128"
    for name in ("b1", "t1", "t2"):
        assert interp[f"jac_{name}_vs_forward_ad"] < F64_TOL, name
    assert interp["jac_value_vs_general"] < F64_TOL
    assert interp["jac_t2_vs_c_kernel"] < F64_TOL


@needs_triton
def test_interpreted_kernel_with_z_in_registers_matches_the_scratch_kernel(interp):
    """``z_registers=True`` (Z kept in registers, p and q through the scratch; one launch per
    power-of-two bucket of state counts) does the scratch kernel's arithmetic in the same order:
    the same fingerprints to the last bit in the interpreter, float32 and float64, over three
    buckets and launches of 8 atoms."""
    for name, tol in (("f32", F32_TOL), ("f64", F64_TOL)):
        assert interp[f"zreg_{name}_vs_kernel"] == 0.0, name
        assert interp[f"zreg_{name}_vs_c"] < tol, name
    assert interp["zreg_buckets"] == [64, 32, 16]
    assert interp["zreg_buckets_vs_kernel"] == 0.0


#: the GRU gate kernel against the pure-torch gates: float64 rounding only (measured 3e-16);
#: float32 and bfloat16 inputs (gates in float32): the kernel's tanh from one exp against
#: torch.tanh, a few float32 ulps of |h| < 1 (measured 4e-7)
GATES_F64_TOL = 1e-14
GATES_F32_TOL = 2e-6


@needs_triton
def test_interpreted_gru_gates_match_torch_gates(gru_interp):
    assert gru_interp["gates_f64"] < GATES_F64_TOL
    assert gru_interp["gates_f32"] < GATES_F32_TOL
    assert gru_interp["gates_bf16_inputs"] < GATES_F32_TOL


@needs_triton
def test_interpreted_fused_gru_matches_nn_gru(gru_interp):
    """The whole forward with the kernel: 1 layer of 13 units over a batch of 37, 2
    bidirectional layers, batch 1 with 100 units, a regressor with padded steps (absolute
    errors of the final states |h| < 1; float32 against the float64 nn.GRU)."""
    for case in ("1x13", "2x10_bidir", "batch1"):
        assert gru_interp[f"fwd_{case}_shape_ok"], case
        assert gru_interp[f"fwd_{case}_f64"] < GATES_F64_TOL, case
        assert gru_interp[f"fwd_{case}_f32"] < GATES_F32_TOL, case
    assert gru_interp["regressor_padded_f64"] < GATES_F64_TOL


#: the scan kernel against the float64 nn.GRU. Float32 operands: the products' float32 rounding
#: over up to 200 terms of order 1 and the kernel's tanh, compounded over the steps (measured
#: 9e-7 at 100 units). Float16 operands round x, h and the weights to 11 bits (2.4e-4 relative),
#: so the gates move by about 1e-3 (measured 1.7e-3); a wrong gate or weight is off by 0.1 to 1
SCAN_F32_TOL = 3e-6
SCAN_F16_TOL = 5e-3


@needs_triton
def test_interpreted_gru_scan_matches_nn_gru(gru_interp):
    """The one-launch scan of the default GRU's recurrence: plain step inputs (batches over one
    program's rows, input widths over one product's columns) and the folded subspace input of a
    complex regressor with padded steps; a 2-layer GRU is left to the per-step path."""
    assert gru_interp["scan_eligible"] and gru_interp["scan_shape_ok"]
    assert gru_interp["scan_f32"] < SCAN_F32_TOL
    assert gru_interp["scan_f16"] < SCAN_F16_TOL
    assert gru_interp["scan_folded_f32"] < SCAN_F32_TOL
    assert gru_interp["scan_not_for_2_layers"]


#: the most shared memory one block may use on an H100 or H200 (227 kB)
HOPPER_SHARED = 232448


def _hopper_usage(kernel, signature: dict, constexprs: dict, num_warps: int):
    """``(shared bytes, registers, stack bytes per thread)`` of ``kernel`` compiled here for an
    H100/H200 (sm_90a) by Triton's own toolchain (no GPU needed), read with its ``cuobjdump``;
    skips where this Triton has no CUDA toolchain."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").is_file() or not (tools / "cuobjdump").is_file():
        pytest.skip(f"this Triton has no CUDA toolchain in {tools}")
    sig = dict(signature, **{k: "constexpr" for k in constexprs})
    k = triton.compile(ASTSource(kernel, sig, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": num_warps, "num_stages": 1,
                                "enable_fp_fusion": True})  # as every launch pins it
    cubin = Path(os.environ.get("TMPDIR", "/tmp")) / f"mrflight_{k.metadata.hash}.cubin"
    cubin.write_bytes(k.asm["cubin"])
    try:
        out = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, timeout=60).stdout
    finally:
        cubin.unlink()
    reg, stack = (int(re.search(rf"{key}:(\d+)", out).group(1)) for key in ("REG", "STACK"))
    return k.metadata.shared, reg, stack


@needs_triton
@pytest.mark.parametrize("operands", ["fp16", "bf16", "tf32"])
def test_gru_scan_compiles_for_hopper_within_its_limits(operands):
    """The GRU scan kernel at its default launch for the default GRU (100 units, 96 coordinates)
    compiled for an H100/H200: within the 227 kB of shared memory a block may use (in float32
    the hoisted W_hh^T tiles took 245-279 kB and the launch failed), and without heavy spills
    (at most 2 kB of stack per thread; IEEE float32, which spills 6.6 kB, is left to the
    per-step path; measured with Triton 3.9: 0 bytes in half precision, 776 in TF32)."""
    from mrflight.models._gru_scan_triton import _gru_scan, launch_settings

    s = launch_settings(100, 96)
    dt = "fp32" if operands == "tf32" else operands
    sig = {n: "i32" for n in ("n_rows", "S", "N_IN", "H", "sa_r", "sa_t", "sm_i", "sm_t",
                              "w_step", "so_r")}
    sig.update(a_ptr="*fp32", m_ptr=f"*{dt}", w_ptr=f"*{dt}", b_ptr="*fp32", out_ptr="*fp32")
    shared, _, stack = _hopper_usage(_gru_scan, sig, {
        "BLOCK_R": s["BLOCK_R"], "BK": s["BK"], "BH": s["BH"],
        "PREC": "tf32" if operands == "tf32" else "ieee", "W_RELOAD": dt == "fp32"},
        s["num_warps"])
    assert shared <= HOPPER_SHARED, shared
    assert stack <= 2048, stack


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
def test_epg_kernel_with_z_in_registers_compiles_for_hopper_without_spills(dtype):
    """Every bucket the paper grid needs (up to 256 states) and the next (512), at the launch
    settings of ``run(..., z_registers=True)``, compiled for an H100/H200: no shared memory and
    no spills beyond a call frame (measured with Triton 3.9: 40 bytes of stack, 80-222
    registers)."""
    from mrflight.physics._triton import _epg_fisp_zreg_kernel, _zreg_launch

    p = f"*{dtype}"
    sig = {n: p for n in ("alpha_ptr", "sgn_ptr", "tr_ptr", "r1_ptr", "r2_ptr", "b1_ptr",
                          "z0_ptr", "scratch_ptr", "out_ptr")}
    sig.update(kst_ptr="*i32", idx_ptr="*i64", kg_ptr="*i32", soff_ptr="*i64", n="i32", T="i32",
               te="fp32", so_a="i32", so_t="i32")
    for kp in (16, 32, 64, 128, 256, 512):
        ba, nw = _zreg_launch(kp)
        shared, _, stack = _hopper_usage(_epg_fisp_zreg_kernel, sig,
                                         {"ACC": True, "BLOCK_A": ba, "KP": kp}, nw)
        assert shared <= HOPPER_SHARED and stack <= 128, (kp, shared, stack)


def test_every_kernel_launch_pins_fp_fusion():
    """FMA contraction (``enable_fp_fusion``) is Triton's default up to 3.9 and off by default
    from 3.10: the kernels' error bounds (the matching kernels' ``k u``) and the tolerances of
    the GPU tests assume it, so every launch in the package pins it."""
    import ast

    launches = []
    for path in sorted((ROOT / "mrflight").rglob("*.py")):
        tree = ast.parse(path.read_text())
        jitted = {f.name for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)
                  and any("jit" in ast.unparse(d) for d in f.decorator_list)}
        for node in ast.walk(tree):  # kernel[grid](...)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                name = ast.unparse(node.func.value)
                if name in jitted:
                    kw = {k.arg: k.value for k in node.keywords}
                    pinned = (isinstance(kw.get("enable_fp_fusion"), ast.Constant)
                              and kw["enable_fp_fusion"].value is True)
                    launches.append((f"{path.name}:{node.lineno} {name}", pinned))
    assert len(launches) >= 8, launches  # EPG x2, GRU gates and scan, noise, matching x3
    assert all(p for _, p in launches), [n for n, p in launches if not p]


def test_no_triton_env_forces_the_torch_path(monkeypatch):
    from mrflight.physics import _triton_glue

    monkeypatch.setenv("MRFLIGHT_NO_TRITON", "1")
    assert _triton_glue._gpu_kernel() is None


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

def _rel(a, b):
    d = (a.cpu().to(torch.complex128) - b.cpu().to(torch.complex128)).flatten(1).norm(dim=1)
    return float((d / b.cpu().to(torch.complex128).flatten(1).norm(dim=1)).max())


@needs_cuda
def test_cuda_kernel_is_used_and_matches_c_kernel():
    import warnings

    from mrflight.dictionary import random_params
    from mrflight.physics import _triton_glue, oksuz2019, simulate

    seq = oksuz2019(n_pulses=400)
    p = torch.tensor(random_params(3000, seed=1))
    b1 = torch.linspace(0.7, 1.3, 3000, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel failure would warn
        for dt in (torch.float32, torch.float64):
            gpu = simulate(seq, p[:, 0].cuda(), p[:, 1].cuda(), b1.cuda(), dtype=dt)
            cpu = simulate(seq, p[:, 0], p[:, 1], b1, dtype=dt)
            assert gpu.device.type == "cuda" and gpu.dtype == cpu.dtype
            assert _rel(gpu, cpu) < (F32_TOL if dt == torch.float32 else F64_GPU_TOL)
    assert _triton_glue._TRITON.value not in (None, False)  # imported, never disabled


@needs_cuda
def test_cuda_kernel_with_z_in_registers_matches_the_scratch_kernel():
    """The Z-in-registers variant on CUDA gives the scratch kernel's fingerprints (which the test
    above holds to the C kernel) at the same state counts, float32 and float64, over the five
    power-of-two buckets of counts of a 400-pulse oksuz2019 train (9 to 169 states)."""
    from mrflight.dictionary import random_params
    from mrflight.physics import _triton, oksuz2019
    from mrflight.physics.truncation import DEFAULT_TOL, states_needed, truncation_rate

    seq = oksuz2019(n_pulses=400)
    p = torch.tensor(random_params(3000, seed=2))
    b1 = torch.linspace(0.7, 1.3, 3000, dtype=torch.float64)
    rate = truncation_rate(seq, DEFAULT_TOL, float(p[:, 1].max()), float(p[:, 0].max()),
                           (0.7, 1.3))
    k = states_needed(p[:, 1].numpy(), float(seq.tr_ms.min()), len(seq), DEFAULT_TOL, rate)
    assert len(_triton._buckets(np.sort(k))) == 5
    for dt, lanes, tol in ((torch.float32, 16, F32_TOL), (torch.float64, 8, F64_GPU_TOL)):
        a = (p[:, 0].to(dt).cuda(), p[:, 1].to(dt).cuda(), b1.to(dt).cuda())
        ref, _ = _triton.run(seq, *a, k, lanes=lanes)
        x, _ = _triton.run(seq, *a, k, lanes=lanes, z_registers=True)
        assert _rel(x, ref) < tol, dt


@needs_cuda
def test_cuda_jacobian_matches_forward_ad():
    from mrflight.dictionary import random_params
    from mrflight.physics import _triton_glue, jacobian, oksuz2019, simulate_jacobian, truncation

    seq = oksuz2019(n_pulses=300)
    p = torch.tensor(random_params(200, seed=2))
    b1 = torch.linspace(0.7, 1.3, 200, dtype=torch.float64)
    wrt = ("t2", "b1", "t1")
    x, jac = simulate_jacobian(seq, p[:, 0].cuda(), p[:, 1].cuda(), b1.cuda(), wrt=wrt)
    assert jac.device.type == "cuda" and jac.shape == (200, 300, 3)
    # the reference: forward-mode autograd through the general path at the same state counts
    rate = truncation.truncation_rate(seq, 1e-4, float(p[:, 1].max()), float(p[:, 0].max()),
                                      (0.7, 1.3))
    k = truncation.states_needed(p[:, 1].numpy(), float(seq.tr_ms.min()), 300, 1e-4, rate)
    xk, jk = _triton_glue._run_gpu_kernel(seq, p[:, 0].cuda(), p[:, 1].cuda(), b1.cuda(),
                                          np.full(200, int(k.max())), wrt, 1)
    xr, jr = jacobian._jacobian_forward_ad(seq, p[:, 0], p[:, 1], b1, wrt, 1e-4,
                                           torch.device("cpu"), 4096, rate)
    assert _rel(xk, xr) < F64_GPU_TOL
    for j in range(3):
        assert _rel(jk[..., j], jr[..., j]) < F64_GPU_TOL, wrt[j]
    # the public call (per-atom counts, groups of 8) against the same kernel at the max count:
    # differences are truncation only, within the 1e-4 tolerance it was asked for
    assert _rel(x, xk) < 1e-4


@needs_cuda
@pytest.mark.parametrize("path", ["scan", "per_step"])
@pytest.mark.parametrize("mode", ["fp32", "tf32", "bf16"])
def test_cuda_fused_gru_matches_nn_gru(mode, path, monkeypatch):
    """The regressor in eval mode under inference_mode runs a Triton path on CUDA: the one-launch
    scan (one layer of at most 128 units, TF32 or half-precision products; IEEE float32 takes
    the per-step path, where cuBLAS's FMA GEMMs serve better), or, with the scan off, one gate
    launch per step (the path of deeper or bidirectional GRUs). Against the float64 nn.GRU on
    the CPU it is as close as cuDNN's GRU in the same precision (TF32 and bf16 round the GEMM
    operands), and within float32 rounding in fp32 (no allowance for cuDNN there: its RNNs may
    use TF32 even then)."""
    import copy
    import types
    import warnings

    from mrflight.matching import float32_matmul
    from mrflight.models import GRURegressor
    from mrflight.models import fused_gru as fg

    torch.manual_seed(0)
    net = GRURegressor(input_length=1750, hidden_size=100, values_per_step=50).cuda().eval()
    x = torch.nn.functional.normalize(torch.rand(4099, 1750, device="cuda"), dim=1)
    gates, scan, calls = fg.triton_gates(), fg._SCAN.get(), []
    assert gates is not None and scan is not None
    precision = (torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16"
                 else float32_matmul("cuda", "tf32" if mode == "tf32" else "ieee"))
    net64 = copy.deepcopy(net).double().cpu()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a kernel failure would warn
        ref = net64(x.double().cpu())
        with precision:
            monkeypatch.setenv("MRFLIGHT_NO_TRITON", "1")
            cudnn = net(x)
            monkeypatch.delenv("MRFLIGHT_NO_TRITON")
            monkeypatch.setattr(fg._KERNEL, "value",
                                lambda *a: (calls.append("step"), gates(*a)))
            monkeypatch.setattr(fg._SCAN, "value", None if path == "per_step" else
                                types.SimpleNamespace(scan=lambda *a: (calls.append("scan"),
                                                                       scan.scan(*a))))
            got = net(x)
    assert calls == (["step"] * 35 if path == "per_step" or mode == "fp32" else ["scan"])
    assert got.dtype == cudnn.dtype
    err, err_cudnn = ((y.double().cpu() - ref).abs().max() for y in (got, cudnn))
    tol = {"fp32": 1e-5, "tf32": 5e-3, "bf16": 3e-2}[mode]
    assert err < (tol if mode == "fp32" else max(tol, 2 * err_cudnn)), (err, err_cudnn)


@needs_cuda
@pytest.mark.parametrize("mode", ["tf32", "bf16"])
def test_cuda_default_gru_scan_matches_nn_gru(mode, monkeypatch):
    """The default GRU (gru.yaml: complex input on a rank-48 basis, 100 values per step, the
    read-out on the coordinates too) runs one scan launch on the folded coordinates, with the
    estimates of nn.GRU in float64 within cuDNN's error in the same precision."""
    import copy
    import types
    import warnings

    from omegaconf import OmegaConf

    from mrflight.matching import float32_matmul
    from mrflight.models import GRURegressor
    from mrflight.models import fused_gru as fg

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "mrflight/configs/model/gru.yaml"))
    cfg.pop("_target_")
    torch.manual_seed(0)
    net = GRURegressor(input_length=1750, in_channels=2, **cfg)
    net.set_basis(torch.linalg.qr(torch.randn(1750, cfg["rank"], dtype=torch.float64))[0].float())
    net = net.cuda().eval()
    x = torch.nn.functional.normalize(torch.randn(3001, 2, 1750, device="cuda"), dim=(1, 2))
    scan, calls = fg._SCAN.get(), []
    net64 = copy.deepcopy(net).double().cpu()
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        ref = net64(x.double().cpu())
        precision = (torch.autocast("cuda", dtype=torch.bfloat16) if mode == "bf16"
                     else float32_matmul("cuda", "tf32"))
        with precision:
            monkeypatch.setenv("MRFLIGHT_NO_TRITON", "1")
            cudnn = net(x)
            monkeypatch.delenv("MRFLIGHT_NO_TRITON")
            monkeypatch.setattr(fg._SCAN, "value", types.SimpleNamespace(
                scan=lambda *a: (calls.append("scan"), scan.scan(*a))))
            got = net(x)
    assert calls == ["scan"]
    err, err_cudnn = ((y.float().double().cpu() - ref).abs().max() for y in (got, cudnn))
    tol = {"tf32": 5e-3, "bf16": 3e-2}[mode]
    assert err < max(tol, 2 * err_cudnn), (err, err_cudnn)


@needs_cuda
def test_cuda_predict_parameters_keeps_gpu_input_on_the_gpu(monkeypatch):
    """GPU-resident signals are preprocessed on the GPU and give the CPU input's estimates."""
    from mrflight import regressor
    from mrflight.models import GRURegressor

    torch.manual_seed(0)
    module = regressor.MRFRegressor(GRURegressor(input_length=300, hidden_size=16)).cuda()
    x = torch.randn(1000, 300, dtype=torch.complex64)
    x[3] = 0
    seen = []
    real = regressor.preprocess
    monkeypatch.setattr(regressor, "preprocess", lambda z, m: (seen.append(z.device.type),
                                                              real(z, m))[1])
    with pytest.warns(RuntimeWarning, match="all-zero"):
        ref = module.predict_parameters(x, batch_size=256)
    assert set(seen) == {"cpu"}
    seen.clear()
    with pytest.warns(RuntimeWarning, match="all-zero"):
        got = module.predict_parameters(x.cuda(), batch_size=256)
    assert set(seen) == {"cuda"} and len(seen) == 4  # every chunk preprocessed on the GPU
    assert got.device.type == "cpu" and got.shape == ref.shape
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and bool(torch.isnan(got[3]).all())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3, equal_nan=True)


@needs_cuda
@pytest.mark.parametrize("mode", ["complex", "magnitude"])
def test_cuda_noise_kernel_is_used_and_matches_torch_path(mode, monkeypatch):
    """Training inputs realised on CUDA: the fused kernel (no fallback warning) against the
    torch path on the same CUDA draws, at the bound of the interpreter check."""
    import warnings

    from mrflight.data import simulated
    from mrflight.physics import oksuz2019, simulate

    p = torch.linspace(0, 1, 2000, dtype=torch.float64)
    clean = simulate(oksuz2019(), (100 + 3000 * p).cuda(), (10 + 290 * p).cuda(),
                     (0.7 + 0.6 * p).cuda())
    std = torch.logspace(-3, -1, 2000).cuda()

    def run():
        g = torch.Generator(device="cuda").manual_seed(7)
        return simulated.realise(clean, std, g, True, mode, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = run()
    assert simulated._FUSED.value not in (None, False) and got.device.type == "cuda"
    monkeypatch.setenv("MRFLIGHT_NO_TRITON", "1")
    ref = run()
    err = ((got - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1)).max()
    assert float(err) < REALISE_TOL, float(err)


def test_jacobian_wrt_selects_and_orders_columns():
    """``wrt`` on the CPU: T1 from the C kernel path equals T1 from the autograd path, and the
    B1 column matches a central finite difference of the simulation (float64)."""
    from mrflight.physics import oksuz2019, simulate, simulate_jacobian

    seq = oksuz2019(n_pulses=60)
    t1, t2 = torch.tensor([300.0, 900.0, 2000.0]), torch.tensor([40.0, 80.0, 150.0])
    b1 = torch.tensor([0.8, 1.0, 1.2], dtype=torch.float64)
    _, j12 = simulate_jacobian(seq, t1, t2, b1)
    x, jb = simulate_jacobian(seq, t1, t2, b1, wrt=("b1", "t1"))
    assert jb.shape == (3, 60, 2)
    assert _rel(jb[..., 1], j12[..., 0]) < 1e-6  # truncation of the two paths may differ
    h = 1e-5
    kw = dict(dtype=torch.float64, tol=1e-4)
    fd = (simulate(seq, t1, t2, b1 + h, **kw) - simulate(seq, t1, t2, b1 - h, **kw)) / (2 * h)
    assert _rel(jb[..., 0], fd) < 1e-6
    with pytest.raises(ValueError, match="wrt must name"):
        simulate_jacobian(seq, t1, t2, wrt=("t1", "t3"))
