"""The Cramér–Rao bound against the Monte-Carlo spread of an efficient estimator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mrflight.physics import Sequence, add_noise, crb, oksuz2019, simulate

F64 = torch.float64
SEQ = oksuz2019(n_pulses=300)


def _unit(seq, t1, t2):
    """Normalised complex model u(T1, T2), untruncated float64 EPG (an independent route: the
    fast real path, no autograd)."""
    x = simulate(seq, t1, t2, dtype=F64, tol=1e-300)
    return x / x.norm(dim=1, keepdim=True)


def _gauss_newton(seq, y, t1, t2, iters=8):
    """Batched Gauss-Newton fit of (rho, T1, T2) to ``y = rho u(T1, T2) + noise``, real rho;
    Jacobian by central finite differences."""
    t1, t2 = t1.clone(), t2.clone()
    rho = torch.ones(len(y), dtype=F64)
    for _ in range(iters):
        h1, h2 = 1e-3 * t1, 1e-3 * t2
        u = _unit(seq, t1, t2)
        d1 = (_unit(seq, t1 + h1, t2) - _unit(seq, t1 - h1, t2)) / (2 * h1[:, None])
        d2 = (_unit(seq, t1, t2 + h2) - _unit(seq, t1, t2 - h2)) / (2 * h2[:, None])
        jac = torch.stack([u, rho[:, None] * d1, rho[:, None] * d2], -1)  # (n, T, 3)
        jr = torch.cat([jac.real, jac.imag], 1)
        r = y - rho[:, None] * u
        rr = torch.cat([r.real, r.imag], 1)
        step = torch.linalg.solve(jr.transpose(1, 2) @ jr, (jr.transpose(1, 2) @ rr[..., None]))
        rho, t1, t2 = rho + step[:, 0, 0], t1 + step[:, 1, 0], t2 + step[:, 2, 0]
    return t1, t2


def test_crb_matches_monte_carlo():
    t1, t2, sigma, n = 800.0, 60.0, 0.005, 200
    bound = crb(SEQ, t1, t2, sigma)[0]
    gen = torch.Generator().manual_seed(0)
    clean = simulate(SEQ, torch.full((n,), t1, dtype=F64), torch.full((n,), t2, dtype=F64),
                     dtype=F64, tol=1e-300)
    y = add_noise(clean, sigma, generator=gen)
    est1, est2 = _gauss_newton(SEQ, y, torch.full((n,), t1, dtype=F64),
                               torch.full((n,), t2, dtype=F64))
    s1, s2 = float(est1.std()), float(est2.std())
    # std of a sample std over 200 draws is ~5 %: 0.8-1.25 is a >4-sigma band
    print(f"MC/CRB std ratio: T1 {s1 / float(bound[0]):.3f}, T2 {s2 / float(bound[1]):.3f}")
    assert 0.8 < s1 / float(bound[0]) < 1.25, (s1, bound)
    assert 0.8 < s2 / float(bound[1]) < 1.25, (s2, bound)
    # the estimator is unbiased at this SNR (mean within 4 standard errors)
    assert abs(float(est1.mean()) - t1) < 4 * s1 / np.sqrt(n)
    assert abs(float(est2.mean()) - t2) < 4 * s2 / np.sqrt(n)


def test_crb_matches_finite_difference_fisher():
    t1 = torch.tensor([500.0, 1500.0], dtype=F64)
    t2, sigma = torch.tensor([40.0, 150.0], dtype=F64), 0.02
    bound = crb(SEQ, t1, t2, sigma, tol=1e-300)
    u = _unit(SEQ, t1, t2)
    h1, h2 = 1e-3 * t1, 1e-3 * t2
    d1 = (_unit(SEQ, t1 + h1, t2) - _unit(SEQ, t1 - h1, t2)) / (2 * h1[:, None])
    d2 = (_unit(SEQ, t1, t2 + h2) - _unit(SEQ, t1, t2 - h2)) / (2 * h2[:, None])
    jac = torch.stack([u, d1, d2], -1)
    fim = (jac.conj().transpose(1, 2) @ jac).real / sigma**2
    ref = torch.sqrt(torch.diagonal(torch.linalg.inv(fim), dim1=-2, dim2=-1)[:, 1:])
    assert torch.allclose(bound, ref, rtol=1e-5)


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
    rng = np.random.default_rng(3)
    seq = Sequence(SEQ.flip_angle_deg, rng.uniform(0, 360, len(SEQ)), SEQ.tr_ms, SEQ.te_ms)
    mag, cpx = crb(seq, t1, t2, 0.01, magnitude=True), crb(seq, t1, t2, 0.01)
    assert (mag >= cpx * (1 - 1e-9)).all() and (mag > 1.01 * cpx).any()


def test_crb_bad_noise_raises():
    for bad in (-1.0, float("nan"), "x"):
        with pytest.raises(ValueError, match="noise_std"):
            crb(SEQ, 800.0, 60.0, bad)
    with pytest.raises(ValueError, match="t1_ms"):
        crb(SEQ, -1.0, 60.0, 0.01)


def test_kernel_jacobian_equals_forward_mode_autograd(monkeypatch):
    """The fused kernel's hand-propagated tangents equal torch forward-mode AD (general path)."""
    import numpy as np

    import mrflight.physics._ckernel as ck
    from mrflight.physics import Sequence, simulate_jacobian

    if ck.kernel() is None:
        pytest.skip("no C compiler: only the autograd path exists here")
    seq = Sequence(5 + 55 * np.sin(np.linspace(0, 6, 150)) ** 2, tr_ms=np.linspace(5, 7, 150),
                   te_ms=1.5, ti_ms=15.0, inversion_efficiency=0.9)
    t1 = torch.tensor([300.0, 1000, 2500, 0.0, 50])
    t2 = torch.tensor([30.0, 80, 400, 0.0, 50])
    b1 = torch.tensor([1.0, 0.8, 1.2, 1.0, 1.0])
    x, jac = simulate_jacobian(seq, t1, t2, b1)
    monkeypatch.setattr(ck, "_lib", None)  # force the forward-mode autograd route
    x_ad, jac_ad = simulate_jacobian(seq, t1, t2, b1)
    assert torch.allclose(x, x_ad, atol=1e-14)
    assert float((jac - jac_ad).abs().max()) < 1e-12 * float(jac_ad.abs().max()) + 1e-16
    assert float(jac_ad.abs().max()) > 1e-4  # the derivatives are not trivially zero
