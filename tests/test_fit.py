"""The maximum-likelihood fit (mrflight.physics.fit) against the truth, an independent
finite-difference Gauss-Newton and the Cramér–Rao bound."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from test_crb import _gauss_newton

from mrflight.physics import add_noise, crb, oksuz2019, simulate
from mrflight.physics.fit import DEFAULT_FIT_BOUNDS, fit

F64 = torch.float64
SEQ = oksuz2019(n_pulses=300)
ATOMS = torch.tensor([[800.0, 60.0, 0.9], [1500.0, 150.0, 1.15], [400.0, 25.0, 1.0]], dtype=F64)


def _signals(atoms, sigma, n, seed, pd=1.0):
    """``n`` noisy draws per atom, each with a random global phase and proton density ``pd``."""
    gen = torch.Generator().manual_seed(seed)
    truth = atoms.repeat_interleave(n, 0)
    clean = simulate(SEQ, truth[:, 0], truth[:, 1], truth[:, 2], dtype=F64, tol=1e-300)
    clean = clean / clean.norm(dim=1, keepdim=True)
    phase = torch.rand(len(truth), generator=gen, dtype=F64) * 2 * np.pi
    y = clean * torch.polar(torch.full_like(phase, pd), phase)[:, None]
    return (add_noise(y, sigma, generator=gen) if sigma else y), truth, phase


def test_noise_free_fit_recovers_the_truth_from_a_distant_start():
    y, truth, phase = _signals(ATOMS, 0.0, 1, 0, pd=0.7)
    start = truth * torch.tensor([1.3, 0.75, 1.1], dtype=F64)
    est, scale = fit(SEQ, y, start, tol=1e-10, xtol=1e-10, max_iter=60, return_scale=True)
    assert torch.allclose(est, truth, rtol=1e-6), (est, truth)
    # the scale of the unit-norm fingerprint: the proton density and the global phase
    assert torch.allclose(scale.abs(), torch.full((3,), 0.7, dtype=F64), rtol=1e-6)
    assert torch.allclose(torch.polar(torch.ones(3, dtype=F64), phase), scale / scale.abs(),
                          atol=1e-6)


def test_fixed_b1_is_used_and_not_fitted():
    y, truth, _ = _signals(ATOMS, 0.0, 1, 1)
    start = truth[:, :2] * 1.2
    est = fit(SEQ, y, start, estimate_b1=False, b1=truth[:, 2], tol=1e-10, xtol=1e-10,
              max_iter=60)
    assert est.shape == (3, 2)
    assert torch.allclose(est, truth[:, :2], rtol=1e-6)
    # a wrong fixed B1 moves T1 and T2 away from the truth: B1 is really held
    wrong = fit(SEQ, y, start, estimate_b1=False, b1=1.0, tol=1e-10, xtol=1e-10, max_iter=60)
    assert (wrong[:2] - truth[:2, :2]).abs().max() > 1.0


def test_agrees_with_an_independent_finite_difference_gauss_newton():
    """Noisy signals at small noise (one minimum near the truth): the variable-projection
    Levenberg-Marquardt of the fused Jacobian kernel and a plain Gauss-Newton with the complex
    scale as two more unknowns and finite-difference columns of the untruncated simulation land
    on the same estimate."""
    y, truth, _ = _signals(ATOMS, 0.004, 4, 2)
    ref = _gauss_newton(SEQ, y, truth[:, 0], truth[:, 1], truth[:, 2], iters=10,
                        estimate_b1=True, complex_scale=True)
    est = fit(SEQ, y, truth, tol=1e-10, xtol=1e-10, max_iter=60)
    assert torch.allclose(est, ref, rtol=2e-5), (est - ref) / ref


def test_spread_at_small_noise_is_the_cramer_rao_bound():
    """An efficient estimator: at small noise the std of the fit over 200 draws is the bound of
    T1, T2 and B1 with the complex scale unknown, atom by atom, and its bias is within 4
    standard errors."""
    n, sigma = 200, 0.004
    y, truth, _ = _signals(ATOMS[:2], sigma, n, 3)
    est = fit(SEQ, y, truth * 1.05, max_iter=40)
    bound = crb(SEQ, ATOMS[:2, 0], ATOMS[:2, 1], sigma, ATOMS[:2, 2], estimate_b1=True,
                phase_nuisance=True)
    for i in range(2):
        e = est[i * n: (i + 1) * n] - ATOMS[i]
        ratio = (e.std(0) / bound[i]).tolist()
        # the std of a sample std over 200 draws is 5 %: 0.8-1.25 is a > 4-sigma band
        assert all(0.8 < r < 1.25 for r in ratio), (i, ratio)
        assert (e.mean(0).abs() < 4 * e.std(0) / np.sqrt(n)).all(), (i, e.mean(0))


def test_never_ends_above_its_start_and_stays_in_bounds():
    y, truth, _ = _signals(ATOMS, 0.03, 20, 4, pd=0.5)
    start = truth.clone()
    start[::7] *= torch.tensor([4.0, 0.2, 1.4], dtype=F64)  # far starts, some outside the box
    est = fit(SEQ, y, start, max_iter=8, bounds={"b1": (0.6, 1.4)})

    def cost(p):
        x = simulate(SEQ, p[:, 0], p[:, 1], p[:, 2], dtype=F64, tol=1e-10).to(torch.complex128)
        c = (x.conj() * y).sum(1) / (x.conj() * x).real.sum(1)
        return (y - c[:, None] * x).abs().pow(2).sum(1)

    inside = start.clone()
    inside[:, 2] = inside[:, 2].clamp(0.6, 1.4)
    assert (cost(est) <= cost(inside) * (1 + 1e-6)).all()
    assert (est[:, 2] >= 0.6).all() and (est[:, 2] <= 1.4).all()
    assert (est[:, 1] <= est[:, 0]).all()
    lo, hi = DEFAULT_FIT_BOUNDS["t2"]
    assert ((est[:, 1] >= lo) & (est[:, 1] <= hi)).all()


def test_non_finite_starts_give_nan_rows_and_the_rest_is_fitted():
    y, truth, _ = _signals(ATOMS, 0.0, 1, 5)
    start = truth.clone()
    start[1, 0] = float("nan")
    est = fit(SEQ, y, start, tol=1e-10, xtol=1e-10)
    assert torch.isnan(est[1]).all()
    assert torch.allclose(est[[0, 2]], truth[[0, 2]], rtol=1e-6)
    # an all-zero signal (image background) gets NaN with a warning, the others their fit
    y0 = y.clone()
    y0[2] = 0
    with pytest.warns(RuntimeWarning, match="1 all-zero signal"):
        est0 = fit(SEQ, y0, truth, tol=1e-10, xtol=1e-10)
    assert torch.isnan(est0[2]).all() and torch.allclose(est0[0], truth[0], rtol=1e-6)


def test_starts_of_zero_or_below_begin_at_the_box_edge_and_are_fitted():
    """A start T1 or T2 <= 0 (a network's output for a short-T2 voxel) gave a NaN row without
    a word, while any other start outside the box is clamped to it and fitted."""
    y, truth, _ = _signals(ATOMS[2:], 0.0, 1, 4)  # T1 400, T2 25 ms
    for start in ([[400.0, 0.0, 1.0]], [[400.0, -3.0, 1.0]], [[-1.0, 25.0, 1.0]]):
        start = torch.tensor(start, dtype=F64)
        est = fit(SEQ, y, start, tol=1e-10, xtol=1e-10, max_iter=60)
        assert torch.allclose(est, truth, rtol=1e-5), (start, est)
        assert float(start.min()) <= 0  # the caller's init is not changed


def test_starts_in_seconds_are_warned_about():
    """A start in seconds (T1 0.8 'ms') is clamped to the box and fitted from there: warned."""
    y, truth, _ = _signals(ATOMS, 0.0, 1, 7)
    start = truth.clone()
    start[:, :2] /= 1000
    with pytest.warns(UserWarning, match="every start T1 in init is below 20 ms"):
        fit(SEQ, y, start, max_iter=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(SEQ, y, truth, max_iter=1)
        # a held B1 from init's column, as the error message advises
        est = fit(SEQ, y, truth * 1.1, estimate_b1=False, b1=truth[:, 2], tol=1e-10,
                  xtol=1e-10, max_iter=60)
    assert torch.allclose(est, truth[:, :2], rtol=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    ({"signals": "magnitude"}, "complex fingerprints"),
    ({"init": np.ones((3, 4))}, "init must have shape"),
    ({"init": np.ones((2, 3))}, "init must have shape"),
    ({"max_iter": 0}, "max_iter"),
    ({"bounds": {"t1": (100.0, 50.0)}}, "0 < low < high"),
    ({"bounds": {"pd": (0.1, 1.0)}}, "keys"),
    ({"signals": "short"}, "time points"),
    ({"b1": [1.0, 0.9]}, "one value per signal"),
    ({"chunk_size": 0}, "chunk_size"),
    ({"tol": 0}, r"tol must be a number in \(0, 1\)"),
    ({"xtol": -1e-4}, "xtol must be a number"),
    ({"bounds": {"t1": 3000.0}}, r"bounds\['t1'\] must be a pair"),
    ({"seq": "dict"}, "seq must be a Sequence"),
    # one NaN sample: named up front, not as a NaN T1 of a Levenberg-Marquardt step
    ({"signals": "nan"}, r"signals hold NaN or Inf values \(1 signal\(s\), e.g. rows \[1\]"),
    # a B1 column that a held B1 would silently replace by 1
    ({"estimate_b1": False}, r"init has a B1 column but estimate_b1=False.*b1=init\[:, 2\]"),
])
def test_bad_input_is_named(kwargs, match):
    y, truth, _ = _signals(ATOMS, 0.0, 1, 6)
    args = {"signals": y, "init": truth}
    args.update(kwargs)
    if isinstance(args["signals"], str):
        kind, args["signals"] = args["signals"], y.clone()
        if kind == "nan":
            args["signals"][1, 5] = float("nan")
        else:
            args["signals"] = y.abs() if kind == "magnitude" else y[:, :100]
    seq = SEQ.to_dict() if args.pop("seq", None) == "dict" else SEQ
    with pytest.raises(ValueError, match=match):
        fit(seq, args.pop("signals"), args.pop("init"), **args)
