"""Dictionary matching: exactness, noise, SVD compression, M0, chunking, input validation."""

import warnings

import numpy as np
import pytest
import torch

from mrflight.matching import DictionaryMatcher, svd_basis
from mrflight.physics import add_noise, oksuz2019, simulate


@pytest.fixture(scope="module")
def small_dict():
    seq = oksuz2019(n_pulses=150)
    t1 = np.geomspace(50, 4000, 40)
    t2 = np.geomspace(5, 500, 30)
    g1, g2 = np.meshgrid(t1, t2, indexing="ij")
    keep = g2.ravel() <= g1.ravel()
    params = np.stack([g1.ravel()[keep], g2.ravel()[keep]], 1)
    atoms = simulate(seq, torch.from_numpy(params[:, 0]), torch.from_numpy(params[:, 1]))
    return seq, atoms, torch.from_numpy(params)


def test_noise_free_atoms_recovered_exactly_at_any_scale(small_dict):
    _, atoms, params = small_dict
    dm = DictionaryMatcher(atoms, params)
    # magnitude and complex inputs, arbitrary (even complex) scale
    out = dm.match(atoms * (2.5 * np.exp(1j * 0.7)))
    assert torch.equal(out.to(params.dtype), params)
    out_mag = dm.match(atoms.abs().numpy() * 0.1)
    assert torch.equal(out_mag.to(params.dtype), params)


def test_complex_matching_recovers_atoms_and_is_phase_invariant(small_dict):
    _, atoms, params = small_dict
    dm = DictionaryMatcher(atoms, params, complex_matching=True, dtype=torch.float64)
    out, m0 = dm.match(atoms * (3 * np.exp(1j * 1.1)), return_m0=True)
    assert torch.equal(out, params)
    assert torch.allclose(m0, torch.full_like(m0, 3 * np.exp(1j * 1.1)), atol=1e-9)


def test_float32_complex_matching_resolves_close_neighbours(small_dict):
    # neighbouring long-T1/T2 atoms differ by < 1e-6 in normalised inner product: the float64
    # re-scoring of the GEMM's candidates must still find every atom exactly
    _, atoms, params = small_dict
    out = DictionaryMatcher(atoms, params, complex_matching=True).match(atoms)
    assert torch.equal(out.to(params.dtype), params)


def test_degrades_gracefully_with_noise(small_dict):
    _, atoms, params = small_dict
    dm = DictionaryMatcher(atoms, params)
    gen = torch.Generator().manual_seed(0)
    exact, mae = [], []
    for std in (0.001, 0.003, 0.01):
        out = dm.match(add_noise(atoms, std, generator=gen)).double()
        exact.append((out == params).all(1).double().mean().item())
        mae.append((out - params).abs().mean(0))
        rel = (out - params).abs() / params
        # most signals land on their own atom or a neighbour (no jumps across the grid)
        assert rel.median(0).values.max() < 0.05
    assert exact[0] == 1.0  # SNR 1000/point: every atom still found
    assert exact[0] > exact[1] > exact[2] > 0.3
    assert (mae[0] < mae[1]).all() and (mae[1] < mae[2]).all()


def test_m0_recovered_magnitude_and_svd(small_dict):
    _, atoms, params = small_dict
    scale = torch.linspace(0.5, 4.0, len(atoms))
    sig = atoms * scale[:, None]
    for rank in (None, 20):
        dm = DictionaryMatcher(atoms, params, rank=rank)
        out, m0 = dm.match(sig, return_m0=True)
        assert torch.equal(out.to(params.dtype), params)
        assert torch.allclose(m0, scale, rtol=2e-3)


@pytest.mark.parametrize("complex_matching", [False, True])
def test_m0_at_a_low_rank_is_the_least_squares_scale_in_the_subspace(small_dict,
                                                                     complex_matching):
    """At a rank that keeps only part of the atoms (projection norms down to 0.86-0.88 at rank
    2), M0 is the least-squares scale of the matched atom in the subspace, <P a, P s> /
    ||P a||^2 (the scale itself for a scaled atom), not that scale times the norm of its
    projection."""
    _, atoms, params = small_dict
    scale = torch.linspace(0.5, 4.0, len(atoms), dtype=torch.float64)
    dm = DictionaryMatcher(atoms, params, rank=2, complex_matching=complex_matching,
                           dtype=torch.float64)
    a = atoms.to(torch.complex128)
    a = a if complex_matching else a.abs()
    proj = torch.linalg.vector_norm(a @ dm.basis.conj().to(a.dtype), dim=1)
    assert float((proj / torch.linalg.vector_norm(a, dim=1)).min()) < 0.9
    out, m0 = dm.match(a * scale[:, None], return_m0=True)
    assert torch.equal(out, params)  # noise-free: every atom still found
    np.testing.assert_allclose(m0.real.numpy(), scale.numpy(), rtol=1e-6)
    if complex_matching:
        np.testing.assert_allclose(m0.imag.numpy(), 0.0, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-25, 1e25])
def test_atoms_at_any_scale_match_as_at_unit_scale(small_dict, scale):
    # float32 atoms whose squared norm under- or overflows (was: "every atom is all-zero", or
    # every signal matched to atom 0), and float64 atoms below float32's range
    _, atoms, params = small_dict
    sig = atoms * (2.5 * np.exp(1j * 0.7))
    for rank in (None, 20):
        out, m0 = DictionaryMatcher(atoms * scale, params, rank=rank).match(sig, return_m0=True)
        assert torch.equal(out.to(params.dtype), params)
        assert torch.allclose(m0, torch.full_like(m0, 2.5 / scale), rtol=2e-3)
        out = DictionaryMatcher(atoms.to(torch.complex128) * scale ** 8, params, rank=rank)
        assert torch.equal(out.match(sig).to(params.dtype), params)


def test_svd_full_rank_equals_exhaustive(small_dict):
    _, atoms, params = small_dict
    gen = torch.Generator().manual_seed(1)
    sig = add_noise(atoms[::3], 0.02, generator=gen)
    kw = dict(dtype=torch.float64)
    exh = DictionaryMatcher(atoms, params, **kw)
    full = DictionaryMatcher(atoms, params, rank=atoms.shape[1], **kw)
    assert torch.equal(exh.match(sig), full.match(sig))
    i_e, s_e, _ = exh.match_indices(sig)
    i_f, s_f, _ = full.match_indices(sig)
    assert torch.allclose(s_e, s_f, rtol=1e-9)


def test_svd_low_rank_recovers_noise_free_atoms(small_dict):
    _, atoms, params = small_dict
    dm = DictionaryMatcher(atoms, params, rank=25)
    frac = (dm.match(atoms).to(params.dtype) == params).all(1).double().mean()
    assert frac >= 0.99
    # and it really is compressed
    assert dm.atoms.shape == (len(atoms), 25)


def test_energy_chosen_rank(small_dict):
    _, atoms, params = small_dict
    dm = DictionaryMatcher(atoms, params, energy=0.999)
    sv2 = dm.singular_values2
    frac = torch.cumsum(sv2, 0) / sv2.sum()
    k = dm.rank
    assert frac[k - 1] >= 0.999 and (k == 1 or frac[k - 2] < 0.999)
    assert 1 < k < atoms.shape[1] // 2  # MRF dictionaries are highly compressible
    lower = DictionaryMatcher(atoms, params, energy=0.99)
    assert lower.rank < k


@pytest.mark.parametrize("complex_matching", [False, True])
def test_rank_one_is_refused_as_it_cannot_tell_atoms_apart(small_dict, complex_matching):
    """In one renormalised coordinate every atom is +-1 (magnitude) or a unit phase (complex):
    all scores tie and atom 0 won for every signal, with a misleading max_candidates warning."""
    _, atoms, params = small_dict
    with pytest.raises(ValueError, match="rank=1 cannot tell atoms apart"):
        DictionaryMatcher(atoms, params, rank=1, complex_matching=complex_matching)
    with pytest.raises(ValueError, match="energy=0.5 chose rank 1"):
        DictionaryMatcher(atoms, params, energy=0.5, complex_matching=complex_matching)
    # rank 2 already matches noise-free atoms
    dm = DictionaryMatcher(atoms, params, rank=2, complex_matching=complex_matching,
                           dtype=torch.float64)
    x = atoms if complex_matching else atoms.abs()
    assert (dm.match(x[::7]).to(params.dtype) == params[::7]).all(1).double().mean() > 0.9


def test_svd_basis_matches_numpy_svd():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 20)) @ np.diag(np.geomspace(10, 0.01, 20))
    basis, sv2 = svd_basis(torch.from_numpy(a), rank=5)
    _, s, vh = np.linalg.svd(a, full_matrices=False)
    np.testing.assert_allclose(sv2.numpy(), s**2, rtol=1e-8)
    # same subspace: projector equality
    p1 = basis.numpy() @ basis.numpy().T
    p2 = vh[:5].T @ vh[:5]
    np.testing.assert_allclose(p1, p2, atol=1e-8)


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunking_invariance(small_dict, chunk):
    _, atoms, params = small_dict
    gen = torch.Generator().manual_seed(2)
    sig = add_noise(atoms[::5], 0.03, generator=gen)
    ref_i, ref_s, _ = DictionaryMatcher(atoms, params).match_indices(sig)
    i, s, _ = DictionaryMatcher(atoms, params, chunk_size=chunk).match_indices(sig)
    assert torch.equal(i, ref_i)
    assert torch.allclose(s, ref_s, rtol=1e-5)


def test_extra_parameter_columns_carried(small_dict):
    _, atoms, params = small_dict
    p3 = torch.cat([params, torch.arange(len(params), dtype=params.dtype)[:, None]], 1)
    out = DictionaryMatcher(atoms, p3).match(atoms[10:20])
    assert torch.equal(out[:, 2].long(), torch.arange(10, 20))


def test_bad_input(small_dict):
    _, atoms, params = small_dict
    with pytest.raises(ValueError, match="atoms"):
        DictionaryMatcher(torch.zeros(0, 150), torch.zeros(0, 2))
    with pytest.raises(ValueError, match="params"):
        DictionaryMatcher(atoms, params[:-1])
    with pytest.raises(ValueError, match="rank"):
        DictionaryMatcher(atoms, params, rank=0)
    with pytest.raises(ValueError, match="rank"):
        DictionaryMatcher(atoms, params, rank=1000)
    with pytest.raises(ValueError, match="energy"):
        DictionaryMatcher(atoms, params, energy=1.5)
    with pytest.raises(ValueError, match="complex"):
        DictionaryMatcher(atoms.abs(), params, complex_matching=True)
    # signed real atoms (the real part of a 0/180-degree train) are not magnitudes either
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        DictionaryMatcher(atoms, params, chunk_size="5")
    with pytest.raises(ValueError, match="negative values in the real-valued atoms"):
        DictionaryMatcher(atoms.real if atoms.is_complex() else -atoms, params)
    bad = atoms.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        DictionaryMatcher(bad, params)
    dm = DictionaryMatcher(atoms, params)
    with pytest.raises(ValueError, match="time points"):
        dm.match(atoms[:, :100])
    sig = atoms[:4].clone()
    sig[1, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        dm.match(sig)


def test_all_zero_signals_give_nan_rows_and_warning(small_dict):
    _, atoms, params = small_dict
    dm = DictionaryMatcher(atoms, params)
    sig = atoms[:3].clone()
    sig[1] = 0
    with pytest.warns(RuntimeWarning, match="all-zero"):
        out, m0 = dm.match(sig, return_m0=True)
    assert torch.isnan(out[1]).all() and torch.isnan(m0[1])
    assert torch.equal(out[[0, 2]].to(params.dtype), params[[0, 2]])


def test_zero_atoms_are_never_matched(small_dict):
    _, atoms, params = small_dict
    a = torch.cat([torch.zeros(1, atoms.shape[1], dtype=atoms.dtype), atoms])
    p = torch.cat([torch.tensor([[0.0, 0.0]], dtype=params.dtype), params])
    out = DictionaryMatcher(a, p).match(atoms)
    assert torch.equal(out.to(params.dtype), params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(small_dict):
    _, atoms, params = small_dict
    sig = add_noise(atoms[::4], 0.01, generator=torch.Generator().manual_seed(3))
    cpu = DictionaryMatcher(atoms, params).match(sig)
    gpu = DictionaryMatcher(atoms, params, device="cuda").match(sig.cuda())
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.cpu(), cpu)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rank", [None, 10])
def test_cuda_matches_cpu_exactly_with_tf32_enabled(small_dict, rank):
    """A program that enabled TF32 globally still gets the CPU's atoms (TF32 is off for the
    matcher's GEMM and the setting is restored afterwards)."""
    _, atoms, params = small_dict
    m = torch.backends.cuda.matmul
    cpu = DictionaryMatcher(atoms, params, rank=rank).match(atoms)
    prev = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        gpu = DictionaryMatcher(atoms, params, rank=rank, device="cuda").match(atoms.cuda())
        assert m.fp32_precision == "tf32"
    finally:
        m.fp32_precision = prev
    assert torch.equal(gpu.cpu(), cpu)
    if rank is None:
        assert torch.equal(cpu.to(params.dtype), params)


def _near_duplicates(complex_data: bool, n: int = 200, t: int = 300, seed: int = 0):
    """``n`` atoms within ~5e-9 of each other in normalised score against the signal ``x``
    (far below float32 resolution), the exact atom ``x`` last: the float64 best."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 1.5, t) * (np.exp(1j * rng.uniform(0, 6.3, t)) if complex_data else 1)
    shape = (n - 1, t)
    eta = rng.standard_normal(shape) + (1j * rng.standard_normal(shape) if complex_data else 0)
    atoms = np.concatenate([x + 1e-4 * np.linalg.norm(x) / np.sqrt(2 * t) * eta, x[None]])
    return torch.from_numpy(atoms), torch.arange(n, dtype=torch.float64)[:, None], x


@pytest.mark.parametrize("complex_matching, rank", [(False, None), (True, None), (False, 40),
                                                     (True, 40)])
def test_float64_best_found_among_many_float32_ties(complex_matching, rank):
    atoms, params, x = _near_duplicates(complex_matching)
    m = DictionaryMatcher(atoms, params, complex_matching=complex_matching, rank=rank)
    s, _, _ = m._prepare_signals(torch.from_numpy(x))
    s = s if m.basis is None else s @ m.basis.conj()
    gemm = (s @ (m.atoms.mH if complex_matching else m.atoms.T)).abs()[0]
    # the case a fixed top-16 of the float32 scores can miss: more than 16 atoms score within
    # the round-off of a 300-term float32 dot product (~1e-6 relative) of the true atom, so
    # which of them a top-16 holds is up to rounding and tie-breaking (on one CPU the true atom
    # was outside it, on another inside)
    assert int((gemm >= gemm[-1] * (1 - 4e-6)).sum()) > 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx, _, _ = m.match_indices(torch.from_numpy(x) * 3.0)
    assert int(idx[0]) == len(atoms) - 1
    assert int(m.last_candidates[0]) > 16


def _float64_best(m: DictionaryMatcher, signals) -> torch.Tensor:
    """Brute force in float64 over every stored atom (renormalised), first index on ties."""
    s, _, _ = m._prepare_signals(signals)
    s = s if m.basis is None else s @ m.basis.conj()
    hi = torch.complex128 if m.complex_matching else torch.float64
    a = m.atoms.to(hi)
    a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True)
    score = (s.to(hi) @ (a.mH if m.complex_matching else a.T)).abs()
    top = score == score.max(1, keepdim=True).values
    return torch.where(top, torch.arange(len(a)), len(a)).amin(1)


@pytest.mark.parametrize("complex_matching, rank, chunk", [(False, None, None), (True, None, 97),
                                                           (False, 10, 97), (True, 10, None)])
def test_agrees_with_float64_brute_force(small_dict, complex_matching, rank, chunk):
    _, atoms, params = small_dict
    m = DictionaryMatcher(atoms, params, complex_matching=complex_matching, rank=rank,
                          chunk_size=chunk)
    sig = torch.cat([atoms[::7], add_noise(atoms[::3], 0.02,
                                           generator=torch.Generator().manual_seed(4))])
    if not complex_matching:
        sig = sig.abs()
    assert torch.equal(m.match_indices(sig)[0], _float64_best(m, sig))


@pytest.mark.parametrize("complex_matching", [False, True])
def test_kernel_scan_agrees_with_gemm_scan(small_dict, complex_matching):
    """Compressed matching through the fused candidate kernels (their torch reference here:
    3xTF32 emulated) returns the GEMM scan's atoms, the float64 best, also among float32 ties."""
    _, atoms, params = small_dict
    sig = torch.cat([atoms[::7], add_noise(atoms[::3], 0.02,
                                           generator=torch.Generator().manual_seed(4))])
    if not complex_matching:
        sig = sig.abs()
    kw = dict(complex_matching=complex_matching, rank=10)
    gemm = DictionaryMatcher(atoms, params, scan="gemm", **kw)
    kern = DictionaryMatcher(atoms, params, scan="kernels", **kw)
    idx, raw, norm = kern.match_indices(sig)
    ref = gemm.match_indices(sig)
    assert torch.equal(idx, ref[0]) and torch.equal(idx, _float64_best(kern, sig))
    assert torch.equal(raw, ref[1]) and torch.equal(norm, ref[2])
    dup, dparams, x = _near_duplicates(complex_matching)
    m = DictionaryMatcher(dup, dparams, complex_matching=complex_matching, rank=40,
                          scan="kernels")
    assert int(m.match_indices(torch.from_numpy(x))[0][0]) == len(dup) - 1
    with pytest.raises(ValueError, match="scan"):
        DictionaryMatcher(atoms, params, scan="fast")


def test_kernel_failure_warns_and_falls_back_to_the_gemm_scan(small_dict, monkeypatch):
    from mrflight import match_kernels

    _, atoms, params = small_dict

    def broken(*args, **kwargs):
        raise RuntimeError("no usable backend")
    monkeypatch.setattr(match_kernels, "candidate_pairs", broken)
    m = DictionaryMatcher(atoms, params, rank=10, scan="kernels")
    with pytest.warns(RuntimeWarning, match="fused matching kernels failed"):
        got = m.match(atoms[::9])
    assert torch.equal(got, DictionaryMatcher(atoms, params, rank=10, scan="gemm").match(
        atoms[::9]))
    assert not m._use_kernels()  # disabled for the rest of the matcher's life


def test_random_data_agrees_with_float64_brute_force():
    rng = np.random.default_rng(3)
    atoms = rng.uniform(0, 1, (3000, 64)) ** 4
    sig = atoms[rng.choice(3000, 200)] + 0.05 * rng.uniform(0, 1, (200, 64))
    m = DictionaryMatcher(atoms, np.arange(3000.0), chunk_size=500)
    assert torch.equal(m.match_indices(sig)[0], _float64_best(m, torch.from_numpy(sig)))


def test_float32_score_error_well_below_tolerance(small_dict):
    # the bound eps (twice one atom's error) keeps a wide margin over the measured error
    _, atoms, params = small_dict
    for cm, rank in ((False, None), (True, None), (False, 10)):
        m = DictionaryMatcher(atoms, params, complex_matching=cm, rank=rank)
        s, _, _ = m._prepare_signals(add_noise(atoms[::5], 0.01,
                                               generator=torch.Generator().manual_seed(5)))
        s = s if m.basis is None else s @ m.basis.conj()
        hi = torch.complex128 if cm else torch.float64
        a64 = m.atoms.to(hi) * m._inv_norms[:, None]
        f32 = (s @ (m.atoms.mH if cm else m.atoms.T)).abs().double()
        f64 = (s.to(hi) @ (a64.mH if cm else a64.T)).abs()
        err = (f32 - f64).abs().amax(1)
        assert (err < m._tolerance(s).double() / 5).all()


def test_exact_ties_go_to_the_lowest_index_and_cap_warns():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1, (2, 50))
    atoms = np.stack([y, x, x, 2 * x, y, x])  # atoms 1, 2, 3, 5 are the signal's direction
    for chunk in (None, 1, 4):
        m = DictionaryMatcher(atoms, np.arange(6.0), chunk_size=chunk)
        assert int(m.match_indices(x)[0][0]) == 1
    # a cap below the number of tied atoms still picks the lowest index, with a warning
    m = DictionaryMatcher(atoms, np.arange(6.0), max_candidates=2)
    with pytest.warns(RuntimeWarning, match="max_candidates=2"):
        assert int(m.match_indices(x)[0][0]) == 1
    assert int(m.last_candidates[0]) == 2
    with pytest.raises(ValueError, match="max_candidates"):
        DictionaryMatcher(atoms, np.arange(6.0), max_candidates=0)
