"""Inputs that must never be misread: parameter names, damaged files, schedules, real series,
scale, file modes and settings checked before the work starts."""

import os
import stat
import warnings

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from mrflight import dictionary
from mrflight.data import FingerprintDataModule
from mrflight.fileio import atomic_path, load_mat, save_mat
from mrflight.matching import DictionaryMatcher
from mrflight.physics import normalize, oksuz2019


@pytest.fixture(scope="module")
def seq():
    return oksuz2019(n_pulses=60, lobe_length=20)


@pytest.fixture(scope="module")
def small(seq):
    p = dictionary.regular_grid(t1_min=200, t1_max=2000, n_t1=12, t2_min=20, t2_max=200, n_t2=8)
    return dictionary.generate(seq, p, progress=False)


# --------------------------------------------------------------------------- parameter names
def _swapped_files(small, tmp_path):
    """The same dictionary as .h5, .npz and .mat with its columns stored as (T2, T1)."""
    swapped = np.ascontiguousarray(small.params[:, ::-1])
    h5 = tmp_path / "swapped.h5"
    with h5py.File(h5, "w") as f:
        f["atoms"], f["params"] = small.atoms, swapped
        f.attrs["param_names"] = '["T2", "T1"]'
    npz = tmp_path / "swapped.npz"
    np.savez(npz, atoms=small.atoms, params=swapped, param_names=np.array(["t2", "T1_ms"]))
    mat = tmp_path / "swapped.mat"
    scipy.io.savemat(mat, {"D": small.atoms, "lut": swapped, "param_names": "T2,T1"})
    return h5, npz, mat


def test_param_names_order_is_honoured_on_load(small, tmp_path):
    for path in _swapped_files(small, tmp_path):
        d = dictionary.load(path)
        assert d.param_names == ("t1_ms", "t2_ms"), path
        np.testing.assert_array_equal(d.params, small.params)
        # matching returns T1 in the first column, as for the original dictionary
        m = DictionaryMatcher(d.atoms, d.params)
        np.testing.assert_array_equal(m.match(small.atoms[[3, 40]]).numpy(),
                                      small.params[[3, 40]])
    with dictionary.open_h5(tmp_path / "swapped.h5") as (_, params, header):
        assert header["param_names"] == ["t1_ms", "t2_ms"]
        np.testing.assert_array_equal(params, small.params)


def test_param_names_seconds_b1_and_unknown(small, tmp_path):
    p = np.column_stack([np.full(len(small), 0.9), small.params[:, 1] / 1e3,
                         small.params[:, 0] / 1e3])
    d = dictionary.Dictionary(small.atoms, p, ("B1", "T2 (s)", "t1"), ("1", "", "s"))
    assert d.param_names == ("t1_ms", "t2_ms", "b1") and d.units == ("ms", "ms", "1")
    np.testing.assert_allclose(d.params[:, :2], small.params)
    with pytest.raises(ValueError, match="T1 and a T2"):
        dictionary.Dictionary(small.atoms, small.params, ("a", "b"), ("ms", "ms"))
    with pytest.raises(ValueError, match="twice"):
        dictionary.Dictionary(small.atoms, small.params, ("t1", "T1_ms"), ("ms", "ms"))
    path = tmp_path / "bad.npz"
    np.savez(path, atoms=small.atoms, params=small.params, param_names=np.array(["x", "y"]))
    with pytest.raises(ValueError, match="T1 and a T2"):
        dictionary.load(path)


def test_training_on_a_swapped_file_gets_the_right_targets(small, seq, tmp_path):
    h5, _, mat = _swapped_files(small, tmp_path)
    for path in (h5, mat):
        dm = FingerprintDataModule(sequence=seq, path=str(path), n_test=5, progress=False)
        atoms, params, _, splits = dm.load_splits()
        np.testing.assert_array_equal(params.numpy(), small.params)


def test_npz_with_only_atoms_and_params_loads(small, tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, atoms=small.atoms, params=small.params)
    d = dictionary.load(path)
    assert d.param_names == ("t1_ms", "t2_ms") and d.units == ("ms", "ms")
    np.testing.assert_array_equal(d.params, small.params)
    b1 = np.column_stack([small.params, np.full(len(small), 1.1)])
    np.savez(path, atoms=small.atoms, params=b1)
    assert dictionary.load(path).param_names == ("t1_ms", "t2_ms", "b1")


# --------------------------------------------------------------------------- damaged files
def _data_offset(path, name):
    with h5py.File(path, "r") as f:
        return f[name].id.get_offset()


def test_v73_mat_with_a_flipped_byte_is_refused(small, tmp_path):
    path = tmp_path / "d.mat"
    dictionary.save(small, path, mat_version="7.3")
    np.testing.assert_allclose(dictionary.load(path).atoms, small.atoms, rtol=1e-5, atol=1e-7)
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, "dict/D") + 1001] ^= 0x40
    bad = tmp_path / "flipped.mat"
    bad.write_bytes(raw)
    with pytest.raises(ValueError, match="damaged.*checksum|checksum.*damaged"):
        dictionary.load(bad)


@pytest.mark.parametrize("kind", ["mat", "h5", "npz"])
def test_truncated_files_name_the_file(small, seq, tmp_path, kind):
    path = tmp_path / f"d.{kind}"
    dictionary.save(small, path, **({"mat_version": "7.3"} if kind == "mat" else {}))
    for keep in (0.5, 0.05):
        cut = tmp_path / f"cut{keep}.{kind}"
        cut.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])
        with pytest.raises(ValueError, match="truncated or damaged") as e:
            dictionary.load(cut)
        assert str(cut) in str(e.value)
        dm = FingerprintDataModule(sequence=seq, path=str(cut), n_test=5, progress=False)
        with pytest.raises(ValueError, match="truncated or damaged"):
            dm.load_splits()


class _Unused:
    """A reconstructor of ``length`` time points that fails the test when it is called."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __call__(self, signals, b1=None):
        raise AssertionError("a damaged file was reconstructed")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_names_the_file_and_its_option(seq, tmp_path, suffix):
    """A cut-short NIfTI series, mask or B1 map: one ValueError naming the option, the file and
    the damage (not gzip's EOFError nor nibabel's 'not enough data')."""
    import nibabel as nib

    from mrflight import maps

    rng = np.random.default_rng(0)
    series = (rng.standard_normal((6, 6, 1, len(seq)))
              + 1j * rng.standard_normal((6, 6, 1, len(seq)))).astype(np.complex64)
    grid_map = rng.uniform(0.8, 1.2, (6, 6, 1)).astype(np.float32)
    for option, arr in (("input", series), ("mask", grid_map), ("b1map", grid_map)):
        whole, cut = tmp_path / f"{option}{suffix}", tmp_path / f"cut_{option}{suffix}"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(whole))
        raw = whole.read_bytes()
        cut.write_bytes(raw[: len(raw) * 3 // 4])
        files = {"series": cut} if option == "input" else {"series": series, option: cut}
        with pytest.raises(ValueError, match=rf"^{option}=\S*cut_{option}.* truncated or damaged"):
            maps.reconstruct_series(reconstructor=_Unused(len(seq)), **files)


def test_truncated_matlab_v7_series_mask_or_b1map_names_its_option(seq, tmp_path):
    """A cut-short MATLAB v7 series, mask or B1 map: one ValueError naming the option as well
    as the file (it named the file only: "/data/b1.mat is not a readable MATLAB file")."""
    from mrflight import maps

    rng = np.random.default_rng(0)
    series = rng.uniform(0.1, 1.0, (6, 6, len(seq))).astype(np.float32)
    grid_map = rng.uniform(0.8, 1.2, (6, 6)).astype(np.float32)
    for option, arr in (("input", series), ("mask", grid_map), ("b1map", grid_map)):
        whole, cut = tmp_path / f"{option}.mat", tmp_path / f"cut_{option}.mat"
        save_mat(whole, {"x": arr})
        raw = whole.read_bytes()
        cut.write_bytes(raw[: len(raw) * 3 // 4])
        files = {"series": cut} if option == "input" else {"series": series, option: cut}
        with pytest.raises(ValueError, match=rf"^{option}=\S*cut_{option}.mat is not a "
                                             "readable MATLAB file"):
            maps.reconstruct_series(reconstructor=_Unused(len(seq)), **files)


def test_mat_checksum_covers_every_variable(tmp_path):
    path = tmp_path / "s.mat"
    save_mat(path, {"x": np.arange(200.0), "s": {"name": "abc", "y": np.ones((3, 4))}}, v73=True)
    assert load_mat(path)["s"]["name"] == "abc"
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, "x") + 80] ^= 0x01
    path.write_bytes(raw)
    with pytest.raises(ValueError, match="checksum"):
        load_mat(path)


# --------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        dest = tmp_path / "out.txt"
        with atomic_path(dest) as tmp:
            tmp.write_text("x")
        assert stat.S_IMODE(dest.stat().st_mode) == mode
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
        assert stat.S_IMODE(plain.stat().st_mode) == mode  # what open() gives
        os.chmod(dest, 0o640)  # replacing a file keeps its mode, as open(..., "w") does
        with atomic_path(dest) as tmp:
            tmp.write_text("y")
        assert stat.S_IMODE(dest.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_dictionary_cache_is_readable_by_the_group(seq, tmp_path):
    old = os.umask(0o022)
    try:
        dictionary.generate(seq, [[1000.0, 100.0]], cache_dir=tmp_path, progress=False)
    finally:
        os.umask(old)
    (f,) = tmp_path.glob("*.h5")
    assert stat.S_IMODE(f.stat().st_mode) == 0o644


# --------------------------------------------------------------------------- schedule files
def _csv(tmp_path, text, name="s.csv", encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


@pytest.mark.parametrize("text,match", [
    ("flip_angle_deg,phase_deg,tr_ms\n10,0,5\n20,,5\n30,0,5\n", "line 3: phase_deg is empty"),
    ("flip_angle_deg,phase_deg,tr_ms\n10,0,5\n20,nan,5\n", "line 3: phase_deg is empty or NaN"),
    ("flip_angle_deg,phase_deg,tr_ms\n10,0,5\n20,inf,5\n", "line 3: phase_deg is infinite"),
    ("# comment\nflip_angle_deg,tr_ms\n10,5\n20,1e400\n", "line 4: tr_ms is infinite"),
    ("flip_angle_deg,tr_ms,tr_ms\n10,5,6\n", "'tr_ms' appears twice"),
    ("FA,TR,tr\n10,5,6\n", "'tr_ms' appears twice"),
    ("flip_angle_deg,tr_ms,te_ms\n10,5,2\n20,5,3\n", r"te_ms varies \(2\.\.3 ms\)"),
    ("10,5\n20,5\n", "second column the RF phase or the TR"),
    ("angle,TR\n10,5\n", r"column\(s\) 'angle' not understood"),
])
def test_schedule_files_are_never_misread(tmp_path, text, match):
    from mrflight.sequence_files import from_file

    with pytest.raises(ValueError, match=match):
        from_file(_csv(tmp_path, text))


def test_schedule_headers_bom_case_and_encoding(tmp_path):
    from mrflight.sequence_files import from_file

    text = "Flip_Angle_Deg,Phase_Deg,TR_ms,TE_ms\n10,0,5,2\n20,180,6,2\n"
    seq = from_file(_csv(tmp_path, "\ufeff" + text))
    assert seq.flip_angle_deg.tolist() == [10, 20] and seq.phase_deg.tolist() == [0, 180]
    assert seq.tr_ms.tolist() == [5, 6] and seq.te_ms == 2
    seq = from_file(_csv(tmp_path, "FA,TR\n10,5\n20,6\n"))
    assert seq.tr_ms.tolist() == [5, 6] and seq.phase_deg.tolist() == [0, 0]
    # a constant TE column, and an entirely empty one (absent: the default)
    assert from_file(_csv(tmp_path, "fa,tr,te\n10,5,3\n20,5,3\n")).te_ms == 3
    assert from_file(_csv(tmp_path, "fa,tr,te\n10,5,\n20,5,\n")).te_ms == 2
    assert from_file(_csv(tmp_path, "fa,tr,te\n10,5,2\n20,5,4\n"), te_ms=3.0).te_ms == 3
    latin = _csv(tmp_path, "FA (°),TR\n10,5\n", name="latin.csv", encoding="latin-1")
    with pytest.raises(ValueError, match="latin.csv is not UTF-8"):
        from_file(latin)


# --------------------------------------------------------------------------- scale and noise
@pytest.fixture(scope="module")
def model(seq):
    from mrflight.models import ANNRegressor
    from mrflight.regressor import MRFRegressor

    torch.manual_seed(0)
    return MRFRegressor(ANNRegressor(input_length=len(seq), hidden_sizes=[16]),
                        sequence=seq.to_dict()).eval()


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-22, 1e-35])
@pytest.mark.parametrize("complex_", [False, True])
def test_any_scale_gives_the_same_prediction(model, small, scale, complex_):
    from mrflight.data import preprocess

    x = small.atoms[:20] if complex_ else np.abs(small.atoms[:20])
    ref = model.predict_parameters(x)
    torch.testing.assert_close(model.predict_parameters(x * np.float32(scale)), ref,
                               rtol=1e-4, atol=1e-3)
    t = torch.from_numpy(x)
    for mode in ("magnitude", "complex"):
        torch.testing.assert_close(preprocess(t * scale, mode), preprocess(t, mode),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(normalize(t * scale), normalize(t), rtol=1e-5, atol=1e-6)
    z = x[:3].copy()
    z[1] = 0
    with pytest.warns(RuntimeWarning, match="all-zero"):
        out = model.predict_parameters(z * np.float32(scale))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_noise_std_must_be_finite(value, tmp_path):
    from mrflight.physics import add_noise
    from mrflight.pipeline import check_config, compose_config

    cfg = compose_config(["debug=tiny", "logger=none", f"data.noise_std={value}"],
                         output_dir=tmp_path)
    with pytest.raises(ValueError, match="data.noise_std must be a finite number"):
        check_config(cfg)
    with pytest.raises(ValueError, match="noise_std"):
        FingerprintDataModule(params=[[1000.0, 100.0]] * 20, sequence=oksuz2019(n_pulses=10),
                              noise_std=float(value), n_test=2)
    with pytest.raises(ValueError, match="noise_std"):
        add_noise(torch.ones(2, 5, dtype=torch.complex64), float(value))
    with pytest.raises(ValueError, match=r"noise must have the shape of the signals \(2, 5\)"):
        add_noise(torch.ones(2, 5, dtype=torch.complex64), 0.01,
                  noise=torch.zeros(5, 2, dtype=torch.complex64))


@pytest.mark.parametrize("scale", [1.0, 1e-200, 1e200])
def test_add_noise_keeps_a_real_float64_input_in_double_precision(scale):
    # a real input is the complex signal with zero imaginary part: complex128 for float64 (was
    # cast to complex64 first: 1e-200 became 0, NaN after normalising, and float64 was lost)
    from mrflight.physics import add_noise, normalize

    x = torch.linspace(1.0, 2.0, 7, dtype=torch.float64)[None] * (1 + 1e-12)
    out = add_noise(x * scale, 0.0)
    assert out.dtype == torch.complex128
    torch.testing.assert_close(out.real, normalize(x), rtol=1e-15, atol=0)
    assert torch.equal(out.imag, torch.zeros_like(x))
    assert add_noise(x.float() * 1e-30, 0.0).dtype == torch.complex64


# --------------------------------------------------------------------------- real signals
def test_matcher_refuses_signed_real_signals(small):
    m = DictionaryMatcher(small.atoms, small.params)
    np.testing.assert_array_equal(m.match(np.abs(small.atoms[:4])).numpy(), small.params[:4])
    with pytest.raises(ValueError, match="negative values.*not a magnitude"):
        m.match(small.atoms[:4].real)
    mc = DictionaryMatcher(small.atoms, small.params, complex_matching=True)
    with pytest.raises(ValueError, match="complex_matching=True needs complex signals"):
        mc.match(np.abs(small.atoms[:4]))


# --------------------------------------------------------------------------- evaluation settings
@pytest.mark.parametrize("override,match", [
    ("evaluation.phantom_size=16", r"evaluation.phantom_size must be an integer >= 32"),
    ("evaluation.bound_signals=0", r"evaluation.bound_signals must be null .* >= 1"),
    ("evaluation.phantom_noise_std=inf", r"evaluation.phantom_noise_std"),
])
def test_eval_settings_fail_before_the_evaluation(tmp_path, monkeypatch, override, match):
    from mrflight import evaluation
    from mrflight.evaluation import runner
    from mrflight.pipeline import compose_config, evaluate

    def not_reached(*a, **k):
        raise AssertionError("the evaluation started before the settings were checked")

    monkeypatch.setattr(runner, "build_group_data", not_reached)
    cfg = compose_config([override, "sequence.n_pulses=50"], output_dir=tmp_path,
                         config_name="eval")
    with pytest.raises(ValueError, match=match):
        evaluate(cfg)
    evaluation.EvalSettings(phantom_size=16, phantoms=["brain"])  # the brain draws from 16


def test_phantom_size_that_cannot_fit_is_refused(monkeypatch):
    from mrflight import evaluation
    from mrflight.evaluation import settings

    monkeypatch.setattr(settings, "_available_memory", lambda: 2 * 2**30)
    with pytest.raises(ValueError, match=r"phantom_size=5000 needs about \d+\.\d GiB.*2\.0 GiB"):
        evaluation.EvalSettings(phantom_size=5000)
    evaluation.EvalSettings(phantom_size=256)


def test_phantom_signals_are_made_in_bounded_blocks(seq, monkeypatch):
    from mrflight import evaluation
    from mrflight.evaluation import phantom_maps
    from mrflight.evaluation.methods import Predictor

    monkeypatch.setattr(phantom_maps, "_PHANTOM_BLOCK_BYTES", 200 * 40 * len(seq))
    sizes = []

    def spy(s):
        sizes.append(len(s))
        return np.column_stack([np.full(len(s), 900.0), np.arange(len(s), dtype=float)])

    group = evaluation.Group(seq, "k", [])
    settings = evaluation.EvalSettings(phantoms=["brain"], phantom_size=32, plots=False)
    arrays = {}
    phantom_maps.phantom_maps(group, [Predictor("matching", spy)], settings, {}, arrays, "")
    n = int(arrays["phantoms/brain.npz"]["mask"].sum())
    assert max(sizes) == 200 and sum(sizes) == n > 200
    t2 = arrays["phantoms/brain.npz"]["matching_t2_ms"]
    mask = arrays["phantoms/brain.npz"]["mask"]
    # every block's estimates land on its own voxels, in order
    np.testing.assert_array_equal(t2[mask], np.concatenate([np.arange(k) for k in sizes]))


@pytest.mark.parametrize("scale", [1e30, 1e-30, 1e-34])
@pytest.mark.parametrize("complex_matching", [False, True])
def test_matcher_at_any_scale(small, scale, complex_matching):
    m = DictionaryMatcher(small.atoms, small.params, complex_matching=complex_matching)
    x = small.atoms[:6] if complex_matching else np.abs(small.atoms[:6])
    ref, m0 = m.match(x, return_m0=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "all-zero" warning for tiny signals
        out, m0s = m.match(x * np.float32(scale), return_m0=True)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(m0s.abs().double() / scale, m0.abs().double(), rtol=1e-4,
                               atol=0)


def test_complex_normalize_matches_the_definition_on_views():
    """The complex path works on the (re, im) view: the same as x / ||x|| in float64, also for
    conjugate and strided views."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, dtype=torch.complex128, generator=g)
    for v in (x, x.conj(), x[:, ::3], x.T.contiguous().T):
        ref = v.resolve_conj() / torch.linalg.vector_norm(v, dim=-1, keepdim=True)
        torch.testing.assert_close(normalize(v), ref, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(normalize(v.to(torch.complex64)), ref.to(torch.complex64),
                                   rtol=1e-6, atol=1e-7)


def test_a_folder_given_as_a_series_is_named_as_a_folder(tmp_path):
    from mrflight.series_io import open_series

    (tmp_path / "scan.nii.gz").mkdir()  # a DICOM-export-like folder with a series-like name
    for p in (tmp_path, tmp_path / "scan.nii.gz"):
        with pytest.raises(ValueError, match=r"input=.* is a folder: give the image series file"):
            open_series(p)


@pytest.mark.parametrize("call, match", [
    (lambda s, p: dictionary.random_params(n=2.5), "n must be a positive integer, got 2.5"),
    (lambda s, p: dictionary.random_params(n=True), "n must be a positive integer, got True"),
    (lambda s, p: dictionary.random_params(n="100"), "n must be a positive integer, got '100'"),
    (lambda s, p: DictionaryMatcher(p.atoms, p.params, chunk_size=0),
     "chunk_size must be a positive integer"),
    (lambda s, p: DictionaryMatcher(p.atoms, p.params, max_candidates=64.5),
     "max_candidates must be a positive integer"),
    (lambda s, p: oksuz2019(n_pulses=np.float64(12.5)), "n_pulses must be a positive integer"),
])
def test_counts_are_whole_numbers_never_truncated(small, seq, call, match):
    """Every count argument goes through one check: bools, strings and fractions are refused
    with the argument's name (a fit of 2.5 iterations was run with 2), whole floats such as
    1e5 from a command line are taken."""
    with pytest.raises(ValueError, match=match):
        call(seq, small)


def test_whole_float_counts_are_taken_as_integers(seq):
    from mrflight.physics.checks import count, is_number

    assert len(dictionary.random_params(n=1e2, seed=0)) == 100
    assert len(oksuz2019(n_pulses=40.0, lobe_length=20)) == 40
    assert count(np.int64(3), "x") == 3 and type(count(3.0, "x")) is int
    assert not any(is_number(v) for v in (True, "1", None, float("nan"), float("inf"), 1j))
    with pytest.raises(ValueError, match=r"x must be an integer >= 0 \(rows\), got -1"):
        count(-1, "x", low=0, hint=" (rows)")
