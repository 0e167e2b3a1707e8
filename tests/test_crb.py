"""The Cramér–Rao bound against the Monte-Carlo spread of an efficient estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrflight.physics import Sequence, add_noise, crb, oksuz2019, simulate

F64 = torch.float64
SEQ = oksuz2019(n_pulses=300)


def _unit(seq, t1, t2, b1=None):
    """Normalised complex model u(T1, T2, B1), untruncated float64 EPG (an independent route: the
    fast real path, no autograd)."""
    x = simulate(seq, t1, t2, b1, dtype=F64, tol=1e-300)
    return x / x.norm(dim=1, keepdim=True)


def _fd_columns(seq, t1, t2, b1, estimate_b1):
    """u and its central finite differences by T1, T2 (and B1): ``(n, T)`` and ``(n, T, P)``."""
    u = _unit(seq, t1, t2, b1)
    h1, h2, hb = 1e-3 * t1, 1e-3 * t2, torch.full_like(b1, 1e-5)
    cols = [(_unit(seq, t1 + h1, t2, b1) - _unit(seq, t1 - h1, t2, b1)) / (2 * h1[:, None]),
            (_unit(seq, t1, t2 + h2, b1) - _unit(seq, t1, t2 - h2, b1)) / (2 * h2[:, None])]
    if estimate_b1:
        cols.append((_unit(seq, t1, t2, b1 + hb) - _unit(seq, t1, t2, b1 - hb))
                    / (2 * hb[:, None]))
    return u, torch.stack(cols, -1)


def _gauss_newton(seq, y, t1, t2, b1=None, iters=8, estimate_b1=False, complex_scale=False):
    """Batched Gauss-Newton (maximum-likelihood) fit of ``y = c u(T1, T2, B1) + noise`` with a real
    or complex scale ``c``; B1 fitted or fixed. Jacobian by central finite differences.
    Returns the fitted ``(n, P)`` parameters (T1, T2[, B1])."""
    n = len(y)
    p = torch.stack([t1, t2] + ([b1] if estimate_b1 else []), 1).clone()
    fixed_b1 = torch.ones(n, dtype=F64) if b1 is None else b1
    c = torch.ones(n, dtype=torch.complex128)
    for _ in range(iters):
        bb = p[:, 2] if estimate_b1 else fixed_b1
        u, du = _fd_columns(seq, p[:, 0], p[:, 1], bb, estimate_b1)
        scale_cols = [u] + ([1j * u] if complex_scale else [])
        jac = torch.cat([torch.stack(scale_cols, -1), c[:, None, None] * du], -1)
        jr = torch.cat([jac.real, jac.imag], 1)
        r = y - c[:, None] * u
        rr = torch.cat([r.real, r.imag], 1)
        step = torch.linalg.solve(jr.transpose(1, 2) @ jr, jr.transpose(1, 2) @ rr[..., None])
        step = step[..., 0]
        c = c + step[:, 0] + (1j * step[:, 1] if complex_scale else 0)
        p = p + step[:, 1 + complex_scale:]
    return p


def test_crb_matches_monte_carlo():
    t1, t2, sigma, n = 800.0, 60.0, 0.005, 200
    bound = crb(SEQ, t1, t2, sigma)[0]
    gen = torch.Generator().manual_seed(0)
    clean = simulate(SEQ, torch.full((n,), t1, dtype=F64), torch.full((n,), t2, dtype=F64),
                     dtype=F64, tol=1e-300)
    y = add_noise(clean, sigma, generator=gen)
    est1, est2 = _gauss_newton(SEQ, y, torch.full((n,), t1, dtype=F64),
                               torch.full((n,), t2, dtype=F64)).T
    s1, s2 = float(est1.std()), float(est2.std())
    # std of a sample std over 200 draws is ~5 %: 0.8-1.25 is a >4-sigma band
    print(f"MC/CRB std ratio: T1 {s1 / float(bound[0]):.3f}, T2 {s2 / float(bound[1]):.3f}")
    assert 0.8 < s1 / float(bound[0]) < 1.25, (s1, bound)
    assert 0.8 < s2 / float(bound[1]) < 1.25, (s2, bound)
    # the estimator is unbiased at this SNR (mean within 4 standard errors)
    assert abs(float(est1.mean()) - t1) < 4 * s1 / np.sqrt(n)
    assert abs(float(est2.mean()) - t2) < 4 * s2 / np.sqrt(n)


def test_crb_b1_and_complex_scale_match_monte_carlo():
    """Unknown T1, T2, B1 and complex scale: the spread of a maximum-likelihood fit at small noise
    equals the bound, atom by atom (two atoms, B1 != 1, random global phase per signal)."""
    atoms = [(800.0, 60.0, 0.9), (1500.0, 150.0, 1.15)]
    sigma, n = 0.004, 200
    t1, t2, b1 = (list(c) for c in zip(*atoms))
    bound = crb(SEQ, t1, t2, sigma, b1, estimate_b1=True, phase_nuisance=True)
    assert bound.shape == (2, 3)
    gen = torch.Generator().manual_seed(1)
    truth = torch.tensor(atoms, dtype=F64).repeat_interleave(n, 0)
    clean = simulate(SEQ, truth[:, 0], truth[:, 1], truth[:, 2], dtype=F64, tol=1e-300)
    phase = torch.rand(len(truth), generator=gen, dtype=F64) * 2 * np.pi
    y = add_noise(clean * torch.polar(torch.ones_like(phase), phase)[:, None], sigma,
                  generator=gen)
    est = _gauss_newton(SEQ, y, truth[:, 0], truth[:, 1], truth[:, 2], estimate_b1=True,
                        complex_scale=True)
    for i in range(len(atoms)):
        std = est[i * n: (i + 1) * n].std(0)
        ratio = (std / bound[i]).tolist()
        print(f"atom {atoms[i]}: MC/CRB std ratio T1 {ratio[0]:.3f}, T2 {ratio[1]:.3f}, "
              f"B1 {ratio[2]:.3f}")
        assert all(0.8 < r < 1.25 for r in ratio), (atoms[i], ratio)


def _random_phase_train(n=120, seed=5) -> Sequence:
    """A short train with arbitrary RF phases (the general complex path; a complex model)."""
    rng = np.random.default_rng(seed)
    return Sequence(SEQ.flip_angle_deg[:n], rng.uniform(0, 360, n), SEQ.tr_ms[:n], SEQ.te_ms)


def test_crb_matches_finite_difference_fisher():
    t1 = torch.tensor([500.0, 1500.0], dtype=F64)
    t2, sigma = torch.tensor([40.0, 150.0], dtype=F64), 0.02
    b1 = torch.tensor([1.0, 0.85], dtype=F64)
    seq_phase = _random_phase_train()  # the global phase is not free there
    for seq in (SEQ, seq_phase):
        for estimate_b1 in (False, True):
            for phase_nuisance in (False, True):
                bound = crb(seq, t1, t2, sigma, b1, tol=1e-300, estimate_b1=estimate_b1,
                            phase_nuisance=phase_nuisance)
                u, du = _fd_columns(seq, t1, t2, b1, estimate_b1)
                nuis = [u] + ([1j * u] if phase_nuisance else [])
                jac = torch.cat([torch.stack(nuis, -1), du], -1)
                fim = (jac.conj().transpose(1, 2) @ jac).real / sigma**2
                ref = torch.sqrt(torch.diagonal(torch.linalg.inv(fim), dim1=-2, dim2=-1)
                                 [:, len(nuis):])
                assert torch.allclose(bound, ref, rtol=1e-5), (estimate_b1, phase_nuisance)


def test_unknown_b1_and_phase_never_lower_the_bound():
    t1, t2, b1 = [300.0, 800.0, 2000.0, 1200.0], [30.0, 60.0, 200.0, 100.0], [1.0, 0.8, 1.2, 1.0]
    for seq in (SEQ, _random_phase_train()):
        known = crb(seq, t1, t2, 0.01, b1)
        phase = crb(seq, t1, t2, 0.01, b1, phase_nuisance=True)
        with_b1 = crb(seq, t1, t2, 0.01, b1, estimate_b1=True)
        full = crb(seq, t1, t2, 0.01, b1, estimate_b1=True, phase_nuisance=True)
        assert (with_b1[:, :2] >= known * (1 - 1e-9)).all()
        assert (with_b1[:, :2] > 1.001 * known).any()  # B1 is not free: it correlates with T1
        assert (phase >= known * (1 - 1e-9)).all() and (full >= with_b1 * (1 - 1e-9)).all()
        assert torch.isfinite(full).all() and (full[:, 2] > 0).all()
        if seq is SEQ:  # a real-phase train has a real normalised model: a phase costs nothing
            assert torch.allclose(full, with_b1, rtol=1e-6)
            assert torch.allclose(phase, known, rtol=1e-6)
        else:  # with arbitrary RF phases it does (a little: 1e-4 relative here)
            assert (phase > (1 + 1e-5) * known).any() and (full > (1 + 1e-5) * with_b1).any()
        # linear in the noise level
        assert torch.allclose(crb(seq, t1, t2, 0.03, b1, estimate_b1=True, phase_nuisance=True),
                              3 * full, rtol=1e-12)
    assert (crb(SEQ, t1, t2, 0.0, b1, estimate_b1=True) == 0).all()


def test_crb_scales_linearly_with_noise():
    t1, t2 = [300.0, 800.0, 2000.0], [30.0, 60.0, 200.0]
    a = crb(SEQ, t1, t2, 0.01)
    b = crb(SEQ, t1, t2, 0.03)
    assert torch.allclose(b, 3 * a, rtol=1e-12)
    assert (crb(SEQ, t1, t2, 0.0) == 0).all()
    # longer T1 is harder to pin down with a 300-pulse (1.3 s) train
    assert a[2, 0] / 2000.0 > a[0, 0] / 300.0


def test_crb_finite_over_paper_range():
    t1 = torch.tensor([10.0, 100.0, 500.0, 500.0, 2000.0, 4000.0, 4000.0, 4000.0], dtype=F64)
    t2 = torch.tensor([2.0, 100.0, 2.0, 500.0, 100.0, 2.0, 100.0, 500.0], dtype=F64)
    b1 = torch.tensor([1.0, 1.0, 0.8, 1.0, 1.2, 1.0, 1.0, 0.7], dtype=F64)
    bound = crb(SEQ, t1, t2, 0.01, b1)
    assert torch.isfinite(bound).all() and (bound > 0).all()
    # T2 = 0 with TE > 0 gives a zero fingerprint: no information, an infinite bound
    assert torch.isinf(crb(SEQ, 800.0, 0.0, 0.01)).all()


def test_magnitude_bound():
    t1, t2 = [800.0, 1500.0], [60.0, 150.0]
    # a real-phase train gives a real signal: the magnitude keeps all the information
    assert torch.allclose(crb(SEQ, t1, t2, 0.01, magnitude=True), crb(SEQ, t1, t2, 0.01),
                          rtol=1e-6)
    # with random RF phases the phase carries information that the magnitude loses
    seq = _random_phase_train(seed=3)
    mag, cpx = crb(seq, t1, t2, 0.01, magnitude=True), crb(seq, t1, t2, 0.01)
    assert (mag >= cpx * (1 - 1e-9)).all() and (mag > 1.01 * cpx).any()
    # also with B1 unknown; the magnitude does not depend on a global phase at all
    mag_b1 = crb(seq, t1, t2, 0.01, magnitude=True, estimate_b1=True)
    assert (mag_b1 >= crb(seq, t1, t2, 0.01, estimate_b1=True) * (1 - 1e-9)).all()
    assert torch.equal(crb(seq, t1, t2, 0.01, magnitude=True, estimate_b1=True,
                           phase_nuisance=True), mag_b1)


def test_crb_bad_noise_raises():
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="noise_std"):
            crb(SEQ, 800.0, 60.0, bad)
    with pytest.raises(ValueError, match="t1_ms"):
        crb(SEQ, -1.0, 60.0, 0.01)


@pytest.mark.parametrize("phase", ["zero", "alternating"])
def test_kernel_jacobian_equals_forward_mode_autograd(monkeypatch, phase):
    """The fused kernel's hand-propagated tangents (T1, T2, B1) equal torch forward-mode AD
    through the general path: B1 != 1, inversion with efficiency < 1, varying TR, T = 0 limits."""
    import mrflight.physics._ckernel as ck
    from mrflight.physics import simulate_jacobian

    if ck.kernel() is None:
        pytest.skip("no C compiler: only the autograd path exists here")
    n = 150
    ph = 0.0 if phase == "zero" else np.where(np.arange(n) % 3 == 0, 180.0, 0.0)
    seq = Sequence(5 + 55 * np.sin(np.linspace(0, 6, n)) ** 2, ph, tr_ms=np.linspace(5, 7, n),
                   te_ms=1.5, ti_ms=15.0, inversion_efficiency=0.9)
    t1 = torch.tensor([300.0, 1000, 2500, 0.0, 50, 700])
    t2 = torch.tensor([30.0, 80, 400, 0.0, 50, 0.0])
    b1 = torch.tensor([1.0, 0.8, 1.2, 1.0, 1.0, 1.1])
    wrts = [("t1", "t2"), ("t1", "t2", "b1"), ("b1", "t1"), ("b1",)]
    kern = [simulate_jacobian(seq, t1, t2, b1, wrt=w) for w in wrts]
    monkeypatch.setattr(ck, "_lib", None)  # force the forward-mode autograd route
    for w in (("b1", "t2", "t1"), ("t2",)):
        x_ad, jac_ad = simulate_jacobian(seq, t1, t2, b1, wrt=w)
        x, jac = kern[1]
        jac = jac[..., [("t1", "t2", "b1").index(name) for name in w]]
        assert jac_ad.shape == (6, n, len(w)) and jac_ad.dtype == torch.complex128
        assert torch.allclose(x, x_ad, atol=1e-14)
        assert float((jac - jac_ad).abs().max()) < 1e-12 * float(jac_ad.abs().max()) + 1e-16
        assert float(jac_ad.abs().amax((0, 1)).min()) > 1e-4  # no column trivially zero
    # the default is (T1, T2), and the kernel's columns follow the order asked for
    x, full = kern[1]
    assert all(j.shape == (6, n, len(w)) for w, (_, j) in zip(wrts, kern))
    assert torch.equal(kern[0][1], full[..., :2]) and torch.equal(kern[2][1], full[..., [2, 0]])
    assert torch.equal(kern[3][1], full[..., 2:])
    # d/dB1 against central finite differences of the simulator
    h = 1e-6
    b64 = b1.double()
    fd = (simulate(seq, t1, t2, b64 + h, dtype=F64, tol=1e-4)
          - simulate(seq, t1, t2, b64 - h, dtype=F64, tol=1e-4)) / (2 * h)
    assert float((fd - full[..., 2]).abs().max()) < 1e-8 * float(fd.abs().max())


def test_jacobian_bad_arguments():
    from mrflight.physics import simulate_jacobian

    for bad in (("t1", "m0"), (), ("t1", "t1"), "rho"):
        with pytest.raises(ValueError, match="wrt"):
            simulate_jacobian(SEQ, 800.0, 60.0, wrt=bad)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            simulate_jacobian(SEQ, 800.0, 60.0, chunk_size=bad)
        with pytest.raises(ValueError, match="chunk_size"):
            crb(SEQ, 800.0, 60.0, 0.01, chunk_size=bad)


def test_bound_table_interpolates_the_exact_bound():
    """The tabulated unit-noise bound agrees with crb() at random points of the range (within a
    few per cent), scales with the noise in the data module, and clamps outside the range."""
    import numpy as np

    from mrflight.physics import oksuz2019
    from mrflight.physics.crb_table import CRBTable

    seq = oksuz2019()  # the default train and grid: what data=simulated's crb loss uses
    table = CRBTable(seq, (100.0, 3000.0), (10.0, 300.0), (0.8, 1.2), estimate_b1=True,
                     phase_nuisance=True)
    rng = np.random.default_rng(0)
    t1 = torch.tensor(np.exp(rng.uniform(np.log(100), np.log(3000), 64)))
    t2 = torch.minimum(torch.tensor(np.exp(rng.uniform(np.log(10), np.log(300), 64))), t1)
    b1 = torch.tensor(rng.uniform(0.8, 1.2, 64))
    exact = crb(seq, t1, t2, 1.0, b1=b1, estimate_b1=True, phase_nuisance=True)
    approx = table(t1, t2, b1)
    rel = (approx / exact - 1).abs()
    assert approx.shape == (64, 3)
    assert float(rel.median()) < 0.005 and float(rel.max()) < 0.03, rel.max(0).values
    # at a grid node the table is the bound itself
    node = table(torch.tensor([100.0]), torch.tensor([10.0]), torch.tensor([0.8]))
    ref = crb(seq, 100.0, 10.0, 1.0, b1=0.8, estimate_b1=True, phase_nuisance=True)
    assert torch.allclose(node, ref, rtol=1e-3)  # (truncation verified for another range)
    # outside the range: the value at the edge
    assert torch.allclose(table(torch.tensor([50.0]), torch.tensor([10.0]), torch.tensor([0.8])),
                          node)
