"""Physics tests of the EPG simulator: analytic limits, slow references, gradients.

Every test compares numbers with an independent route (a recursion written here, a closed-form
steady state, a straightforward per-atom numpy EPG, a Bloch simulation of isochromats, finite
differences); none only checks shapes.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from mrflight.physics import (
    Sequence,
    _ckernel,
    _ckernel_glue,
    _paths,
    _torch_epg,
    jiang2015,
    oksuz2019,
    simulate,
    truncation,
)

F64 = torch.float64


def _exact(seq, t1, t2, b1=None, dtype=F64):
    """Untruncated EPG (K = T states): ``tol`` so small that every atom keeps all T states."""
    return simulate(seq, t1, t2, b1, dtype=dtype, tol=1e-300)


def _nmag(x: torch.Tensor) -> torch.Tensor:
    m = x.abs()
    return m / m.norm(dim=-1, keepdim=True)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of the normalised magnitude fingerprints, one value per atom."""
    return (_nmag(a) - _nmag(b)).norm(dim=-1)


# --------------------------------------------------------------------------------------------
# a slow, straightforward reference: textbook EPG (Weigel 2015), one atom at a time, numpy
# --------------------------------------------------------------------------------------------

def _rf_matrix(alpha: float, phi: float) -> np.ndarray:
    """Weigel 2015, eq. 15: the RF rotation acting on (F+_k, F-_k, Z_k)."""
    c2, s2 = np.cos(alpha / 2) ** 2, np.sin(alpha / 2) ** 2
    sa, ca = np.sin(alpha), np.cos(alpha)
    e = np.exp(1j * phi)
    return np.array([
        [c2, e ** 2 * s2, -1j * e * sa],
        [np.conj(e) ** 2 * s2, c2, 1j * np.conj(e) * sa],
        [-0.5j * np.conj(e) * sa, 0.5j * e * sa, ca],
    ])


def reference_epg(seq: Sequence, t1: float, t2: float, b1: float = 1.0) -> np.ndarray:
    """Per-atom complex128 EPG with explicit F+, F-, Z arrays of T+1 states (no truncation).

    Order per TR: RF pulse, readout ``i F+_0 exp(-TE/T2)``, relaxation over TR, gradient shift.
    """
    T = len(seq)
    fp = np.zeros(T + 1, complex)
    fm = np.zeros(T + 1, complex)
    z = np.zeros(T + 1, complex)
    e_ti = np.exp(-seq.ti_ms / t1) if t1 > 0 else 0.0
    z[0] = 1 - (1 + seq.inversion_efficiency) * e_ti if seq.inversion else 1.0
    e2te = np.exp(-seq.te_ms / t2) if t2 > 0 else float(seq.te_ms == 0)
    sig = np.zeros(T, complex)
    for n in range(T):
        rf = _rf_matrix(np.deg2rad(seq.flip_angle_deg[n]) * b1, np.deg2rad(seq.phase_deg[n]))
        fp, fm, z = rf @ np.stack([fp, fm, z])
        sig[n] = 1j * fp[0] * e2te
        e1 = np.exp(-seq.tr_ms[n] / t1) if t1 > 0 else 0.0
        e2 = np.exp(-seq.tr_ms[n] / t2) if t2 > 0 else 0.0
        fp, fm, z = fp * e2, fm * e2, z * e1
        z[0] += 1 - e1
        # gradient: F+_k -> F+_{k+1}, F-_k -> F-_{k-1}, F+_0 = conj(F-_0) after the shift
        fp = np.concatenate([[np.conj(fm[1])], fp[:-1]])
        fm = np.concatenate([fm[1:], [0.0]])
        fm[0] = np.conj(fp[0])
    return sig


def _short_train(n=200, phase="zero", seed=0) -> Sequence:
    rng = np.random.default_rng(seed)
    fa = 10 + 50 * np.abs(np.sin(np.linspace(0, 3 * np.pi, n))) + rng.uniform(0, 5, n)
    tr = rng.uniform(8.0, 12.0, n)
    if phase == "zero":
        ph = 0.0
    elif phase == "alternating":
        ph = np.where(np.arange(n) % 2 == 0, 0.0, 180.0)
    else:
        ph = rng.uniform(0, 360, n)
    return Sequence(fa, ph, tr, te_ms=2.5, inversion=True, ti_ms=20.0, inversion_efficiency=0.9)


ATOMS = [(800.0, 60.0, 1.0), (1500.0, 200.0, 0.75), (300.0, 30.0, 1.2), (2500.0, 400.0, 1.0)]


@pytest.mark.parametrize("phase", ["zero", "alternating", "random"])
def test_matches_textbook_reference(phase):
    seq = _short_train(phase=phase)
    t1, t2, b1 = (torch.tensor(c, dtype=F64) for c in zip(*ATOMS))
    got = _exact(seq, t1, t2, b1).numpy()
    for i, (a1, a2, ab) in enumerate(ATOMS):
        ref = reference_epg(seq, a1, a2, ab)
        assert np.abs(got[i] - ref).max() < 1e-10 * np.abs(ref).max()
    if phase == "random":  # the general path is the only route; the signal is truly complex
        assert np.abs(got.imag).max() > 1e-2


def bloch_isochromats(seq: Sequence, t1: float, t2: float, b1: float = 1.0,
                      n_spins: int | None = None) -> np.ndarray:
    """The same train simulated without phase graphs: ``n_spins`` isochromats, float64 Bloch.

    The spins' dephasing per TR is spread evenly over one cycle; with more than ``2 T`` spins the
    average over them equals the configuration state ``F_0`` exactly (no state aliases onto 0).
    Each pulse is a right-handed rotation by ``b1 * alpha`` about ``(cos phi, sin phi, 0)``; the
    signal is ``i (Mx + i My) exp(-TE/T2)``, so a 90-degree phase-0 pulse on ``Mz = 1`` reads +1.
    This shares no code or formula with the EPG recursion: not the RF matrix, not the shift.
    """
    T = len(seq)
    n = n_spins or 2 * T + 2
    theta = 2 * np.pi * np.arange(n) / n
    mx, my = np.zeros(n), np.zeros(n)
    mz = np.ones(n)
    if seq.inversion:
        e_ti = np.exp(-seq.ti_ms / t1)
        mz = -seq.inversion_efficiency * mz * e_ti + (1 - e_ti)
    e2te = np.exp(-seq.te_ms / t2)
    sig = np.zeros(T, complex)
    for k in range(T):
        a = np.deg2rad(seq.flip_angle_deg[k]) * b1
        phi = np.deg2rad(seq.phase_deg[k])
        ux, uy = np.cos(phi), np.sin(phi)  # the rotation axis (ux, uy, 0): Rodrigues' formula
        c, s = np.cos(a), np.sin(a)
        dot = ux * mx + uy * my
        cx, cy, cz = uy * mz, -ux * mz, ux * my - uy * mx  # u x M
        mx, my, mz = (mx * c + cx * s + ux * dot * (1 - c),
                      my * c + cy * s + uy * dot * (1 - c),
                      mz * c + cz * s)
        sig[k] = 1j * (mx + 1j * my).mean() * e2te
        e1, e2 = np.exp(-seq.tr_ms[k] / t1), np.exp(-seq.tr_ms[k] / t2)
        mxy = (mx + 1j * my) * e2 * np.exp(1j * theta)  # relax, then one cycle of dephasing
        mx, my, mz = mxy.real, mxy.imag, mz * e1 + (1 - e1)
    return sig


@pytest.mark.parametrize("phase", ["zero", "alternating", "random"])
def test_matches_bloch_isochromats(phase):
    """The EPG signal (the real-state path for phases 0 and 180, else the complex one) equals
    a Bloch simulation of isochromats: RF phase, B1, inversion efficiency, TE and varying TR."""
    seq = _short_train(n=120, phase=phase, seed=3)
    t1, t2, b1 = (torch.tensor(c, dtype=F64) for c in zip(*ATOMS))
    got = _exact(seq, t1, t2, b1).numpy()
    default = simulate(seq, t1.float(), t2.float(), b1.float()).numpy()  # float32, truncated
    for i, (a1, a2, ab) in enumerate(ATOMS):
        ref = bloch_isochromats(seq, a1, a2, ab)
        assert np.abs(got[i] - ref).max() < 1e-10 * np.abs(ref).max(), (phase, i)
        assert np.abs(default[i] - ref).max() < 2e-6 * np.abs(ref).max(), (phase, i)
        # too few spins alias states back onto F_0: the reference can tell a wrong signal apart
        coarse = bloch_isochromats(seq, a1, a2, ab, n_spins=16)
        assert np.abs(coarse - ref).max() > 1e-6 * np.abs(ref).max()


def test_fast_kernel_torch_and_general_paths_agree():
    seq = _short_train(phase="alternating")
    t1, t2, b1 = (torch.tensor(c, dtype=F64) for c in zip(*ATOMS))
    for k in (len(seq), 12):  # untruncated and a hard truncation: all paths truncate alike
        general = _torch_epg._epg_general(seq, t1, t2, b1, k)
        fast = _torch_epg._epg_real_fast(seq, t1, t2, b1, k)
        assert torch.allclose(general.real, fast, atol=1e-12, rtol=0)
        assert general.imag.abs().max() < 1e-12
        if _ckernel.kernel() is not None:
            kern = _ckernel_glue._epg_real_kernel(seq, t1, t2, b1, np.full(len(ATOMS), k))
            assert torch.allclose(kern, fast, atol=1e-12, rtol=0)
    # through the public entry point: autograd forces the general path
    with_grad = simulate(seq, t1.clone().requires_grad_(), t2, b1, dtype=F64, tol=1e-300)
    assert torch.allclose(with_grad.detach(), _exact(seq, t1, t2, b1), atol=1e-12, rtol=0)


def test_pure_torch_path_without_kernel(monkeypatch):
    seq = _short_train(phase="zero")
    t1, t2, b1 = (torch.tensor(c, dtype=F64) for c in zip(*ATOMS))
    with_kernel = _exact(seq, t1, t2, b1)
    monkeypatch.setattr(_ckernel, "kernel", lambda: None)
    without = _exact(seq, t1, t2, b1)
    assert torch.allclose(with_kernel, without, atol=1e-12, rtol=0)
    ref = reference_epg(seq, *ATOMS[1])
    assert np.abs(without[1].numpy() - ref).max() < 1e-10


# --------------------------------------------------------------------------------------------
# analytic limits
# --------------------------------------------------------------------------------------------

def _spoiled_gre(seq: Sequence, t1: float, b1: float = 1.0) -> np.ndarray:
    """T2 -> 0: ideal spoiled gradient echo, Mz before each pulse, signal Mz sin(a)."""
    eta = seq.inversion_efficiency if seq.inversion else None
    e_ti = np.exp(-seq.ti_ms / t1) if t1 > 0 else 0.0
    mz = 1 - (1 + eta) * e_ti if seq.inversion else 1.0
    out = np.zeros(len(seq))
    for n in range(len(seq)):
        a = np.deg2rad(seq.flip_angle_deg[n]) * b1 * np.cos(np.deg2rad(seq.phase_deg[n]))
        out[n] = mz * np.sin(a)
        e1 = np.exp(-seq.tr_ms[n] / t1) if t1 > 0 else 0.0
        mz = 1 - (1 - mz * np.cos(a)) * e1
    return out


@pytest.mark.parametrize("t1", [0.0, 5.0, 300.0, 1000.0, 4000.0])
def test_t2_zero_is_spoiled_gradient_echo(t1):
    base = oksuz2019()
    seq = Sequence(base.flip_angle_deg, 0.0, base.tr_ms, te_ms=0.0, inversion=True,
                   ti_ms=base.ti_ms, inversion_efficiency=0.95)
    got = simulate(seq, [t1, t1], [0.0, 0.0], [1.0, 0.8], dtype=F64)
    for i, b1 in enumerate((1.0, 0.8)):
        ref = _spoiled_gre(seq, t1, b1)
        assert np.abs(got[i].real.numpy() - ref).max() < 1e-12
        assert np.abs(got[i].imag.numpy()).max() == 0


@pytest.mark.parametrize("t1", [0.0, 700.0, 3000.0])
def test_t2_zero_varying_tr_jiang(t1):
    j = jiang2015()
    seq = Sequence(j.flip_angle_deg, j.phase_deg, j.tr_ms, te_ms=0.0, inversion=True,
                   ti_ms=j.ti_ms, inversion_efficiency=j.inversion_efficiency)
    assert np.ptp(seq.tr_ms) > 2.0  # really a varying-TR train
    got = simulate(seq, t1, 0.0, dtype=F64)[0].real.numpy()
    assert np.abs(got - _spoiled_gre(seq, t1)).max() < 1e-12


def test_t1_zero_t2_zero_finite():
    base = oksuz2019()  # TE = 2 ms
    got = simulate(base, [0.0, 0.0, 100.0], [0.0, 50.0, 0.0])
    assert torch.isfinite(got.real).all() and torch.isfinite(got.imag).all()
    # T2 = 0 with TE > 0: the echo has fully decayed
    assert got[0].abs().max() == 0 and got[2].abs().max() == 0 and got[1].abs().max() > 0.01
    # T1 = 0 and T2 = 0 at TE = 0: full recovery before every pulse, the signal is sin(a)
    te0 = Sequence(base.flip_angle_deg, 0.0, base.tr_ms, te_ms=0.0, ti_ms=base.ti_ms)
    x = simulate(te0, 0.0, 0.0, dtype=F64)[0].real
    assert torch.allclose(x, torch.sin(torch.deg2rad(torch.tensor(base.flip_angle_deg))),
                          atol=1e-14, rtol=0)


@pytest.mark.parametrize("t1,t2,alpha", [(1000.0, 100.0, 30.0), (800.0, 60.0, 50.0),
                                         (300.0, 200.0, 20.0)])
def test_constant_train_reaches_fisp_steady_state(t1, t2, alpha):
    tr, n = 5.0, 3000
    seq = Sequence(np.full(n, alpha), 0.0, tr, te_ms=0.0, inversion=False)
    x = _exact(seq, t1, t2)[0].real.numpy()
    assert np.ptp(x[-100:]) < 1e-8
    # closed-form FISP (gradient-spoiled, unbalanced SSFP) FID steady state, i.e. the bSSFP
    # signal averaged over a full dephasing cycle (Scheffler, Concepts MR 2003, eq. for FISP)
    e1, e2, a = np.exp(-tr / t1), np.exp(-tr / t2), np.deg2rad(alpha)
    p = 1 - e1 * np.cos(a) - e2 ** 2 * (e1 - np.cos(a))
    q = e2 * (1 - e1) * (1 + np.cos(a))
    ss = np.tan(a / 2) * (1 - (e1 - np.cos(a)) * (1 - e2 ** 2) / np.sqrt(p * p - q * q))
    assert abs(x[-1] - ss) < 1e-8


def test_constant_train_t2_zero_spoiled_steady_state():
    tr, n, alpha, t1 = 4.3, 3000, 30.0, 900.0
    seq = Sequence(np.full(n, alpha), 0.0, tr, te_ms=0.0, inversion=True)
    x = simulate(seq, t1, 0.0, dtype=F64)[0].real.numpy()
    e1, a = np.exp(-tr / t1), np.deg2rad(alpha)
    assert np.ptp(x[-100:]) < 1e-8
    assert abs(x[-1] - np.sin(a) * (1 - e1) / (1 - e1 * np.cos(a))) < 1e-8


def test_inversion_sign_and_efficiency():
    base = oksuz2019(n_pulses=300)
    t1, t2 = [800.0, 1500.0], [60.0, 100.0]
    inv = simulate(base, t1, t2, dtype=F64)
    plain = Sequence(base.flip_angle_deg, 0.0, base.tr_ms, base.te_ms, inversion=False)
    noinv = simulate(plain, t1, t2, dtype=F64)
    assert (inv[:, 0].real < 0).all() and (noinv[:, 0].real > 0).all()
    # efficiency 0 is a saturation (Mz = -0 right after it, see Sequence): Z_0 = 1 - exp(-TI/T1)
    sat = Sequence(base.flip_angle_deg, 0.0, base.tr_ms, base.te_ms, inversion=True,
                   ti_ms=base.ti_ms, inversion_efficiency=0.0)
    first = simulate(sat, t1, t2, dtype=F64)[:, 0].real.numpy()
    a0 = np.deg2rad(base.flip_angle_deg[0])
    expect = np.sin(a0) * (1 - np.exp(-base.ti_ms / np.array(t1))) * np.exp(
        -base.te_ms / np.array(t2))
    assert np.allclose(first, expect, atol=1e-14, rtol=0) and (first > 0).all()
    # an inversion long before the train (TI >> T1) has fully recovered: no inversion at all
    late = Sequence(base.flip_angle_deg, 0.0, base.tr_ms, base.te_ms, inversion=True,
                    ti_ms=1e6, inversion_efficiency=1.0)
    assert torch.allclose(simulate(late, t1, t2, dtype=F64), noinv, atol=1e-14, rtol=0)


def test_te_decay_and_b1_zero():
    base = oksuz2019(n_pulses=200)
    te0 = Sequence(base.flip_angle_deg, 0.0, base.tr_ms, te_ms=0.0, ti_ms=base.ti_ms)
    te2 = Sequence(base.flip_angle_deg, 0.0, base.tr_ms, te_ms=2.0, ti_ms=base.ti_ms)
    a, b = simulate(te0, 900.0, 80.0, dtype=F64), simulate(te2, 900.0, 80.0, dtype=F64)
    assert torch.allclose(b, a * np.exp(-2.0 / 80.0), atol=1e-15, rtol=0)
    # B1 = 0: no pulse tips anything, the signal is exactly zero
    assert simulate(base, 900.0, 80.0, 0.0).abs().max() == 0


# --------------------------------------------------------------------------------------------
# precision, gradients, truncation
# --------------------------------------------------------------------------------------------

def test_float32_matches_float64():
    seq = oksuz2019()
    t1 = torch.tensor([20.0, 300.0, 800.0, 1500.0, 4000.0, 4000.0])
    t2 = torch.tensor([5.0, 30.0, 60.0, 150.0, 500.0, 2.0])
    b1 = torch.tensor([1.0, 0.7, 1.0, 1.3, 1.0, 0.9])
    lo = simulate(seq, t1, t2, b1, dtype=torch.float32)
    hi = simulate(seq, t1, t2, b1, dtype=F64)
    assert lo.dtype == torch.complex64 and hi.dtype == torch.complex128
    lo_n = lo.to(torch.complex128) / lo.to(torch.complex128).norm(dim=1, keepdim=True)
    hi_n = hi / hi.norm(dim=1, keepdim=True)
    assert float((lo_n - hi_n).norm(dim=1).max()) < 1e-5


def test_gradcheck_t1_t2_b1():
    seq = _short_train(n=40, phase="alternating")
    t1 = torch.tensor([800.0, 1500.0, 300.0], dtype=F64, requires_grad=True)
    t2 = torch.tensor([60.0, 200.0, 30.0], dtype=F64, requires_grad=True)
    b1 = torch.tensor([1.0, 0.8, 1.2], dtype=F64, requires_grad=True)

    def f(a, b, c):
        return torch.view_as_real(simulate(seq, a, b, c, dtype=F64, tol=1e-300))

    assert torch.autograd.gradcheck(f, (t1, t2, b1), eps=1e-6, atol=1e-7, rtol=1e-4)


def test_forward_mode_matches_reverse_mode():
    import torch.autograd.forward_ad as fwad

    seq = _short_train(n=60, phase="zero")
    t1 = torch.tensor([800.0, 1500.0], dtype=F64)
    t2 = torch.tensor([60.0, 200.0], dtype=F64)
    with fwad.dual_level():
        out = simulate(seq, fwad.make_dual(t1, torch.ones_like(t1)), t2, dtype=F64, tol=1e-300)
        tangent = fwad.unpack_dual(out).tangent
    t1r = t1.clone().requires_grad_()
    x = simulate(seq, t1r, t2, dtype=F64, tol=1e-300)
    # d Re x[0, n] / d T1 by reverse mode, for a few n
    for n in (0, 17, 59):
        (g,) = torch.autograd.grad(x[0, n].real, t1r, retain_graph=True)
        assert abs(float(g[0]) - float(tangent[0, n].real)) < 1e-12 + 1e-8 * abs(float(g[0]))


PAPER_CORNERS = [(t1, t2, b1) for t1 in (20.0, 500.0, 4000.0) for t2 in (2.0, 100.0, 500.0)
                 for b1 in (0.7, 1.0, 1.3) if t2 <= t1]


@pytest.mark.parametrize("builder", [oksuz2019, jiang2015])
def test_default_truncation_meets_its_bound(builder):
    seq = builder()
    t1, t2, b1 = (torch.tensor(c, dtype=F64) for c in zip(*PAPER_CORNERS))
    trunc = simulate(seq, t1, t2, b1, dtype=F64)  # default tol = 1e-3
    full = simulate(seq, t1, t2, b1, dtype=F64, tol=1e-300, _rate=1.0)
    err = _rel_l2(trunc, full)
    assert float(err.max()) < 1e-3
    # and it really truncates: far fewer than T states for the largest T2
    k = truncation.states_needed(500.0, float(seq.tr_ms.min()), len(seq), 1e-3,
                                 truncation.truncation_rate(seq, 1e-3, 500.0, 4000.0, (0.7, 1.3)))
    assert k < len(seq) / 2


# --------------------------------------------------------------------------------------------
# input validation
# --------------------------------------------------------------------------------------------

SEQ20 = oksuz2019(n_pulses=20)


@pytest.mark.parametrize("arg", ["t1_ms", "t2_ms", "b1"])
@pytest.mark.parametrize("bad", [[-1.0], [float("nan")], [float("inf")], [], [[1.0, 2.0]],
                                 [1.0 + 2.0j], "abc"])
def test_bad_inputs_raise_naming_argument(arg, bad):
    kwargs = {"t1_ms": [800.0], "t2_ms": [60.0], "b1": [1.0]}
    if isinstance(bad, list) and bad and isinstance(bad[0], complex):
        cases = [bad, np.asarray(bad), torch.tensor(bad)]
    elif bad == "abc":
        cases = [bad]
    else:
        cases = [bad, np.asarray(bad, dtype=np.float64), torch.tensor(bad, dtype=torch.float32)]
    for value in cases:
        kwargs[arg] = value
        with pytest.raises(ValueError, match=arg):
            simulate(SEQ20, kwargs["t1_ms"], kwargs["t2_ms"], kwargs["b1"])


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="t2_ms"):
        simulate(SEQ20, [800.0, 900.0, 1000.0], [60.0, 70.0])
    with pytest.raises(ValueError, match="b1"):
        simulate(SEQ20, [800.0, 900.0], [60.0, 70.0], [1.0, 1.0, 1.0])
    # scalars broadcast
    out = simulate(SEQ20, [800.0, 900.0], 60.0, 1.0, dtype=F64)
    assert out.shape == (2, 20) and not torch.allclose(out[0], out[1])


def test_bad_seq_dtype_tol_raise():
    with pytest.raises(ValueError, match="seq"):
        simulate(np.ones(10), 800.0, 60.0)
    with pytest.raises(ValueError, match="dtype"):
        simulate(SEQ20, 800.0, 60.0, dtype=torch.float16)
    with pytest.raises(ValueError, match="tol"):
        simulate(SEQ20, 800.0, 60.0, tol=0.0)


# --------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("no_triton", ["0", "1"], ids=["fused-kernel", "torch-path"])
def test_cuda_matches_cpu(no_triton, monkeypatch):
    monkeypatch.setenv("MRFLIGHT_NO_TRITON", no_triton)
    seq = oksuz2019()
    t1, t2, b1 = (torch.tensor(c, dtype=F64) for c in zip(*PAPER_CORNERS))
    cpu = simulate(seq, t1, t2, b1, dtype=F64)
    gpu = simulate(seq, t1.cuda(), t2.cuda(), b1.cuda(), dtype=F64)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-10, rtol=0)
    g32 = simulate(seq, t1, t2, b1, device="cuda")
    # float32: every pulse rounds each state update with relative error <= u = 2^-24, and the
    # recursion is contractive (|coefficients| <= 1), so the errors of the T pulses add up at
    # most linearly: T u = 1.0e-4 for the 1750 pulses. (Measured: 5e-6 for the CPU kernels,
    # 4.2e-5 for the pure-torch path on an H200; a truncation or arithmetic bug gives >= 1e-3.)
    bound = len(seq) * 2.0**-24
    assert float(_rel_l2(g32.cpu().to(torch.complex128), cpu).max()) < bound
    # the differentiable path on CUDA too
    t1g = t1[:3].cuda().requires_grad_()
    x = simulate(seq, t1g, t2[:3].cuda(), dtype=F64)
    x.abs().sum().backward()
    assert torch.isfinite(t1g.grad).all() and (t1g.grad != 0).any()


def test_truncation_bound_holds_for_short_t2_on_a_short_train():
    """Short T2 (a few TR) on a short train: the fixed extra states keep the bound."""
    from mrflight.dictionary import random_params

    seq = oksuz2019(n_pulses=100, lobe_length=20)
    p = torch.tensor(random_params(700, seed=0))
    ref = simulate(seq, p[:, 0], p[:, 1], dtype=torch.float64, tol=1e-9).abs()
    out = simulate(seq, p[:, 0], p[:, 1], dtype=torch.float64).abs()
    ref = ref / ref.norm(dim=1, keepdim=True)
    out = out / out.norm(dim=1, keepdim=True)
    assert float((ref - out).norm(dim=1).max()) < 1e-3


# --------------------------------------------------------------------------------------------
# small batches: truncation fixed per prior, cached train arrays, threads, bad arguments
# --------------------------------------------------------------------------------------------

def _prior_batch(n, seed):
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(100, 4000, n)
    t2 = rng.uniform(10, np.minimum(t1, 500))
    return [torch.tensor(x) for x in (t1, t2, rng.uniform(0.7, 1.3, n))]


def test_verified_range_grid():
    t2, t1, b1 = truncation.verified_range(500.0, 4000.0, (0.7, 1.3))
    assert (t2, t1, b1) == (pytest.approx(10 ** 2.75), pytest.approx(10 ** 3.625), (0.7, 1.3))
    # every batch of one prior maps to the same range, float32 rounding included
    for t2, t1, lo, hi in ((480.0, 3900.0, 0.72, 1.29), (423.0, 3200.0, 0.6999999, 1.26)):
        assert truncation.verified_range(t2, t1, (lo, hi)) == truncation.verified_range(
            500.0, 4000.0, (0.7, 1.3))
    assert truncation.verified_range(0.0, 0.0) == (0.0, 0.0, (1.0, 1.0))


def test_bounds_fix_the_truncation_for_a_prior(monkeypatch):
    seq = oksuz2019(n_pulses=300)
    bounds = dict(t1_max=4000.0, t2_max=500.0, b1_range=(0.7, 1.3))
    monkeypatch.setattr(truncation, "_RATE_CACHE", {})
    first = simulate(seq, *_prior_batch(16, 0), bounds=bounds)
    assert len(truncation._RATE_CACHE) == 1  # verified once, for the prior's range
    probes = []
    real_run = _paths.run_batch

    def spy(*a, **k):
        probes.append(1)
        return real_run(*a, **k)

    monkeypatch.setattr(truncation, "run_batch", spy)  # truncation_rate's probe simulations
    for seed in range(1, 20):
        simulate(seq, *_prior_batch(16, seed), bounds=bounds)
    assert not probes and len(truncation._RATE_CACHE) == 1
    # the result does not depend on what was simulated before: same batch, same fingerprints
    monkeypatch.setattr(truncation, "_RATE_CACHE", {})
    assert torch.equal(simulate(seq, *_prior_batch(16, 0), bounds=bounds), first)
    # and stays within tol of the untruncated simulation
    full = simulate(seq, *_prior_batch(16, 0), dtype=F64, tol=1e-300)
    assert float(_rel_l2(first.to(torch.complex128), full).max()) < 1e-3
    # atoms outside the bounds widen the verified range instead of being under-resolved
    monkeypatch.setattr(truncation, "_RATE_CACHE", {})
    simulate(seq, 800.0, 60.0, bounds=bounds)
    simulate(seq, 800.0, 900.0, bounds=bounds)
    assert [k[2] for k in truncation._RATE_CACHE] == [pytest.approx(10 ** 2.75), 1000.0]
    for bad in ({"t1max": 1.0}, {"t2_max": -1.0}, {"b1_range": (1.3, 0.7)}, {"t1_max": "x"},
                [1, 2]):
        with pytest.raises(ValueError, match="bounds"):
            simulate(seq, 800.0, 60.0, bounds=bad)


def test_train_changed_in_place_is_not_simulated_stale():
    seq = oksuz2019(n_pulses=100)
    before = simulate(seq, 800.0, 60.0, dtype=F64)
    seq.flip_angle_deg[:] = seq.flip_angle_deg * 0.5
    seq.tr_ms[:] = 5.0
    fresh = Sequence(seq.flip_angle_deg.copy(), 0.0, 5.0, seq.te_ms, ti_ms=seq.ti_ms)
    after = simulate(seq, 800.0, 60.0, dtype=F64)
    assert not torch.allclose(before, after)
    assert torch.equal(after, simulate(fresh, 800.0, 60.0, dtype=F64))


def test_threads_and_chunks_do_not_change_the_result():
    """One kernel call per batch, several chunks, 1 or 2 threads: the same fingerprints, in the
    order of the input (untruncated, so that grouping atoms cannot change their state count)."""
    seq = oksuz2019(n_pulses=200)
    t1, t2, b1 = _prior_batch(70, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = simulate(seq, t1, t2, b1, dtype=F64, tol=1e-300)
        torch.set_num_threads(2)
        two = simulate(seq, t1, t2, b1, dtype=F64, tol=1e-300)
    finally:
        torch.set_num_threads(threads)
    chunked = simulate(seq, t1, t2, b1, dtype=F64, tol=1e-300, chunk_size=9)
    assert torch.equal(one, two) and torch.allclose(one, chunked, atol=1e-14, rtol=0)
    ref = reference_epg(seq, float(t1[5]), float(t2[5]), float(b1[5]))
    assert np.abs(one[5].numpy() - ref).max() < 1e-10


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_chunk_size_raises(bad):
    with pytest.raises(ValueError, match="chunk_size"):
        simulate(SEQ20, [800.0, 900.0], 60.0, chunk_size=bad)


def test_missing_parameter_message():
    with pytest.raises(ValueError, match="t1_ms is None: pass T1 in ms"):
        simulate(SEQ20, None, 100.0)
    with pytest.raises(ValueError, match="t2_ms is None: pass T2 in ms"):
        simulate(SEQ20, 800.0, None)


def test_kernel_cache_is_keyed_on_cpu_features(monkeypatch):
    """A cache directory shared by machines with different CPUs never gives one CPU the binary
    compiled (-march=native) for another."""
    here = _ckernel.kernel_path()
    features = _ckernel.cpu_features()
    assert features and features == _ckernel.cpu_features()
    monkeypatch.setattr(_ckernel, "cpu_features", lambda: features + " avx512_other_cpu")
    other = _ckernel.kernel_path()
    assert other != here and other.parent == here.parent
    monkeypatch.setattr(_ckernel, "cpu_features", lambda: features)
    assert _ckernel.kernel_path() == here


@pytest.mark.skipif(_ckernel._compiler() is None, reason="needs a C compiler")
def test_a_kernel_another_process_compiled_meanwhile_is_kept(tmp_path):
    """Processes started together (a joblib multirun, jobs sharing a home directory) all find
    no kernel and compile it. The first library to arrive is kept: the others may have loaded
    it, and a library replaced under a process that maps it on a network file system can fail
    there (stale file handle). No build folder is left behind."""
    import ctypes

    dest = tmp_path / "kernels" / "epg_test.so"
    _ckernel._compile(dest)
    assert ctypes.CDLL(str(dest)).epg_fisp_f64  # a loadable library
    first = dest.stat()
    _ckernel._compile(dest)  # another process's build arriving second
    second = dest.stat()
    assert (second.st_ino, second.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["epg_test.so"]


def test_a_killed_compiles_build_folder_is_removed_once_it_is_old(tmp_path, monkeypatch):
    """A compile killed midway leaves its build folder (object files) in the kernel cache; the
    next process removes it once nothing touched it for an hour, and leaves a recent one (a
    compile running on another host of a shared cache) and everything else alone."""
    kernels = tmp_path / "kernels"
    old_build, old_legacy, live = (kernels / n for n in (".build.abc123", "tmpxyz", ".build.q"))
    for d in (old_build, old_legacy, live):
        d.mkdir(parents=True)
        (d / "epg_fisp_f32.o").write_bytes(b"\0" * 64)
    (kernels / "notes").mkdir()
    stale = time.time() - 2 * 3600
    for d in (old_build, old_legacy, kernels / "notes"):
        os.utime(d, (stale, stale))
    monkeypatch.setattr(_ckernel, "_lib", False)
    monkeypatch.setattr(_ckernel, "kernel_path", lambda: kernels / "epg_missing.so")
    monkeypatch.setattr(_ckernel, "_compile", lambda dest: (_ for _ in ()).throw(
        RuntimeError("no compiler in this test")))
    with pytest.warns(RuntimeWarning, match="no compiler in this test"):
        assert _ckernel.kernel() is None
    assert sorted(p.name for p in kernels.iterdir()) == [".build.q", "notes"]


def test_a_cc_that_is_no_command_leaves_the_torch_path_with_its_name(tmp_path, monkeypatch):
    """``CC`` with an unclosed quote is named, with the fix, and the simulator falls back to
    torch, as for a missing compiler (it was a ValueError out of the simulator)."""
    monkeypatch.setenv("CC", 'gcc "')
    monkeypatch.setattr(_ckernel, "_lib", False)
    monkeypatch.setattr(_ckernel, "kernel_path", lambda: tmp_path / "kernels" / "epg_new.so")
    with pytest.warns(RuntimeWarning, match=r"CC='gcc \"' is not a command.*unset it"):
        assert _ckernel.kernel() is None
