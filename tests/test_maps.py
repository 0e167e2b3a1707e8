"""Maps from image series: every input format, time axis first/last, 2-D/3-D, masks, units.

Series are simulated: a phantom's T1/T2/M0 maps go through the EPG simulator (a short 200-pulse
train), each tissue fingerprint is L2-normalised and scaled by M0, and complex Gaussian noise is
added everywhere (the background is pure noise). Matching uses a dictionary whose grid contains
every phantom value, so an exact match is the expected answer at this noise level.
"""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from mrflight import eval_entry, maps, pipeline
from mrflight.dictionary import generate
from mrflight.fileio import load_mat, save_mat
from mrflight.phantoms import brain_phantom, nist_phantom
from mrflight.physics import oksuz2019, simulate
from mrflight.series_io import SeriesSource, open_series, series_stem

N_PULSES = 200
# per real/imaginary component, relative to a unit-norm fingerprint (M0 = 1): a voxel SNR
# (fingerprint norm / noise norm) of 100. The 200-pulse train lasts 0.86 s and barely encodes a
# 4 s T1 (CSF): at 4x this noise a third of the CSF voxels already match a +-10 % neighbour.
NOISE = 0.0005


# ------------------------------------------------------------------------------- phantoms
def _phantom(kind: str):
    """(T1 ms, T2 ms, M0, mask) of the project's brain (24 x 24) or NIST-like sphere phantom
    (32 x 32, the smallest it draws)."""
    ph = brain_phantom(24) if kind == "brain" else nist_phantom(32)
    return ph.t1_ms, ph.t2_ms, ph.m0, ph.mask


def _series(t1, t2, m0, mask, seq, noise=NOISE, seed=0, magnitude=False):
    """Space + (T,) complex64 series: M0 * fingerprint + complex Gaussian noise.

    The fingerprints are the simulator's, in units of M0 (not normalised), so the M0 a
    reconstruction estimates is the phantom's M0. The noise std is ``noise`` times the mean
    fingerprint norm (``noise`` relative to a unit-norm fingerprint, as in the noise model).
    """
    out = np.zeros(t1.shape + (len(seq),), np.complex64)
    fp = simulate(seq, torch.tensor(t1[mask]), torch.tensor(t2[mask]))
    scale = float(torch.linalg.vector_norm(fp, dim=1).mean())
    out[mask] = (fp * torch.tensor(m0[mask], dtype=torch.float32)[:, None]).numpy()
    rng = np.random.default_rng(seed)
    out += noise * scale * (rng.standard_normal(out.shape)
                            + 1j * rng.standard_normal(out.shape)).astype(np.complex64)
    # a global receive phase: complex matching must not care
    out *= np.complex64(np.exp(0.7j))
    return np.abs(out) if magnitude else out


@pytest.fixture(scope="module")
def seq():
    return oksuz2019(n_pulses=N_PULSES)


@pytest.fixture(scope="module")
def phantoms():
    brain = _phantom("brain")
    sphere = _phantom("sphere")
    # 3-D: three slices of the sphere phantom with M0 varying along z
    t1, t2, m0, mask = sphere
    stack = lambda a: np.stack([a, a, a], axis=-1)
    sphere3 = (stack(t1), stack(t2), stack(m0) * np.array([1.0, 0.7, 1.3]), stack(mask))
    return {"brain": brain, "sphere": sphere, "sphere3d": sphere3}


@pytest.fixture(scope="module")
def dictionary(seq, phantoms):
    """A grid containing every phantom value, plus neighbours at +-10 % and +-20 %."""
    pairs = set()
    for t1, t2, _, mask in phantoms.values():
        pairs |= set(zip(t1[mask].tolist(), t2[mask].tolist()))
    grid = set()
    for a, b in pairs:
        for fa in (0.8, 0.9, 1.0, 1.1, 1.2):
            for fb in (0.8, 0.9, 1.0, 1.1, 1.2):
                grid.add((round(a * fa, 3), round(b * fb, 3)))
    grid = np.array(sorted(grid))
    return generate(seq, grid, progress=False)


@pytest.fixture(scope="module")
def matcher_complex(dictionary):
    return maps.MatchingReconstructor.from_dictionary(dictionary, complex_matching=True,
                                                      source="test-dictionary")


@pytest.fixture(scope="module")
def matcher_magnitude(dictionary):
    return maps.MatchingReconstructor.from_dictionary(dictionary, complex_matching=False)


OPTS = maps.MapOptions(previews=False, progress=False)


def _check_maps(res_t1, res_t2, res_m0, t1, t2, m0, mask, m0_tol=0.03):
    """Exact T1/T2 matches in (almost) every tissue voxel, M0 within noise, NaN background."""
    assert np.all(np.isnan(res_t1[~mask])) and np.all(np.isnan(res_t2[~mask]))
    assert np.all(np.isnan(res_m0[~mask]))
    assert np.all(np.isfinite(res_t1[mask])) and np.all(np.isfinite(res_m0[mask]))
    f32 = lambda a: a[mask].astype(np.float32)  # maps are float32
    exact = (res_t1[mask] == f32(t1)) & (res_t2[mask] == f32(t2))
    assert exact.mean() >= 0.95, f"only {exact.mean():.1%} exact matches"
    # the rest lands on a neighbouring grid value (+-10 % or +-20 %), never far off
    assert np.all(np.abs(res_t1[mask] / t1[mask] - 1) <= 0.2 + 1e-6)
    assert np.all(np.abs(res_t2[mask] / t2[mask] - 1) <= 0.2 + 1e-6)
    rel = np.abs(res_m0[mask] / m0[mask] - 1)
    assert np.median(rel) < m0_tol


# ------------------------------------------------------------------------------- unit pieces
def test_detect_time_axis_and_clear_errors():
    assert maps.detect_time_axis((24, 24, 200), 200) == 2
    assert maps.detect_time_axis((200, 24, 24, 3), 200) == 0
    assert maps.detect_time_axis((24, 200, 24), 200, time_axis=-2) == 1
    with pytest.raises(ValueError, match=r"sequence length 200.*|200.*\(24, 24, 150\)"):
        maps.detect_time_axis((24, 24, 150), 200)
    with pytest.raises(ValueError, match="maps.time_axis"):
        maps.detect_time_axis((200, 200, 200), 200)
    with pytest.raises(ValueError, match="150 points but the sequence has 200"):
        maps.detect_time_axis((24, 24, 150), 200, time_axis=2)
    with pytest.raises(ValueError, match="2-D or 3-D space"):
        maps.detect_time_axis((200,), 200)


def test_otsu_separates_two_populations():
    rng = np.random.default_rng(1)
    bg = np.abs(rng.normal(0.1, 0.02, 5000))
    fg = rng.normal(1.0, 0.1, 2000)
    thr = maps.otsu_threshold(np.concatenate([bg, fg]))
    assert bg.max() < thr < fg.min()
    assert 0.3 < thr < 0.7  # the middle of the gap, not its edge
    mask, info = maps.auto_mask(np.concatenate([bg, fg, [0.0, np.nan]]), "fraction", 0.3)
    assert mask[:5000].sum() == 0 and mask[5000:7000].all() and not mask[-2:].any()
    assert info["Threshold"] == pytest.approx(0.3 * np.percentile(np.concatenate(
        [bg, fg, [0.0]])[np.concatenate([bg, fg, [0.0]]) > 0], 99))


@pytest.mark.parametrize("seed", [0, 1])
def test_snr_mask_at_low_snr(seq, phantoms, seed):
    """Per-frame SNR about 3.5: the temporal-SNR mask is exactly the object; white-noise
    background sits at r = 1 and tissue well above the threshold 1 + 5 sqrt(3 / T)."""
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq, noise=0.02, seed=seed).reshape(-1, N_PULSES)
    norm = np.linalg.norm(ser, axis=1).reshape(mask.shape)
    dnorm = np.linalg.norm(np.diff(ser, axis=1), axis=1).reshape(mask.shape)
    got, info = maps.auto_mask(norm, "snr", diff_norm=dnorm, length=N_PULSES)
    assert np.array_equal(got, mask)
    assert info["Threshold"] == pytest.approx(1 + 5 * np.sqrt(3 / N_PULSES))
    r = 2 * norm**2 / dnorm**2
    assert abs(np.median(r[~mask]) - 1) < 0.05  # white noise: r = 1


@pytest.mark.parametrize("magnitude", [False, True])
def test_snr_mask_warns_of_the_tissue_it_leaves_out(seq, phantoms, matcher_complex,
                                                     matcher_magnitude, magnitude):
    """Tissue whose fingerprints stand above the noise but below the temporal-SNR threshold
    (here the left half of the brain at a quarter of its signal, complex: noise 0.08-0.12
    relative to the fingerprint, 3.5-8 noise standard deviations of r above white noise) is not
    left out silently: a warning counts it and names mask=FILE; the same series at full signal
    gives no warning and its mask is the whole tissue."""
    import warnings

    t1, t2, m0, mask = phantoms["brain"]
    clean = _series(t1, t2, m0, mask, seq, noise=0.0)
    scale = float(np.linalg.norm(clean[mask], axis=1).mean())
    rng = np.random.default_rng(3)
    level = 0.008 if magnitude else 0.02  # a magnitude's threshold asks for a higher SNR
    noise = (level * scale * (rng.standard_normal(clean.shape)
                             + 1j * rng.standard_normal(clean.shape))).astype(np.complex64)
    weak = clean.copy()
    weak[:, :12] *= 0.3 if magnitude else 0.25
    rec = matcher_magnitude if magnitude else matcher_complex
    for series, left_out in ((clean + noise, False), (weak + noise, True)):
        series = np.abs(series) if magnitude else series
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = maps.reconstruct_series(series, rec)
        said = [str(w.message) for w in caught if "left out about" in str(w.message)]
        dropped = int((mask & ~res.mask).sum())
        if not left_out:
            assert dropped == 0 and not said and res.mask_info["LeftOutAboveNoise"] == 0
            continue
        assert dropped > 30 and len(said) == 1 and "mask=FILE" in said[0]
        assert 0.5 * dropped <= res.mask_info["LeftOutAboveNoise"] <= 1.2 * dropped
        assert ("RelativeNoise does not see them" in said[0]) is not magnitude


def test_snr_mask_noise_spread_is_that_of_white_noise():
    """The spread of r assumed for the left-out count: sqrt(0.5 / T) for complex white noise,
    about sqrt(2.3 / T) (relative, mean 4.66) for its magnitude."""
    rng = np.random.default_rng(0)
    for length in (200, 1000):
        n = rng.standard_normal((4000, length)) + 1j * rng.standard_normal((4000, length))
        for x, mean, rel in ((n, 1.0, 0.5), (np.abs(n), 2 / (2 - np.pi / 2), 2.3)):
            r = 2 * (np.abs(x) ** 2).sum(1) / (np.abs(np.diff(x, axis=1)) ** 2).sum(1)
            assert r.mean() == pytest.approx(mean, rel=0.02)
            assert r.std() / mean == pytest.approx(np.sqrt(rel / length), rel=0.08)


def test_least_squares_m0_recovers_scale_and_ignores_phase(seq):
    sim = simulate(seq, torch.tensor([800.0, 1500.0]), torch.tensor([60.0, 100.0]))
    meas = sim * torch.tensor([2.5, 0.3])[:, None].to(sim.dtype) * np.exp(1.1j)
    m0 = maps.least_squares_m0(meas, sim)
    assert torch.allclose(m0, torch.tensor([2.5, 0.3]), rtol=1e-5)
    m0_mag = maps.least_squares_m0(meas.abs(), sim)
    assert torch.allclose(m0_mag, torch.tensor([2.5, 0.3]), rtol=1e-5)


# ------------------------------------------------------------------------------- formats
def _write(path, arr, fmt, affine=None):
    if fmt in ("nii", "nii.gz"):
        nib.save(nib.Nifti1Image(arr, affine), str(path))
    elif fmt == "npy":
        np.save(path, arr)
    elif fmt == "npz":
        np.savez(path, series=arr, notes=np.arange(3))
    elif fmt == "mat":
        save_mat(path, {"images": arr, "TR": 4.3})
    elif fmt == "mat73":
        save_mat(path, {"recon": {"images": arr}, "TR": 4.3}, v73=True)
    elif fmt == "h5":
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("mrf/series", data=arr)
            f.create_dataset("mrf/mask_guess", data=np.ones(arr.shape[:2]))


AFFINE = np.array([[0.0, -1.5, 0.0, 30.0],
                   [1.5, 0.0, 0.0, -20.0],
                   [0.0, 0.0, 3.0, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])

CASES = [  # (format, suffix, phantom, time first?)
    ("nii", ".nii", "sphere3d", False),
    ("nii.gz", ".nii.gz", "brain", False),
    ("npy", ".npy", "brain", True),
    ("npy", ".npy", "sphere3d", False),
    ("npz", ".npz", "sphere", True),
    ("mat", ".mat", "brain", False),
    ("mat73", ".mat", "sphere3d", True),
    ("h5", ".h5", "sphere", False),
]


@pytest.mark.parametrize("fmt,suffix,kind,time_first", CASES,
                         ids=[f"{c[0]}-{c[2]}-{'tfirst' if c[3] else 'tlast'}" for c in CASES])
def test_formats_reconstruct_known_values(tmp_path, seq, phantoms, matcher_complex,
                                          fmt, suffix, kind, time_first):
    t1, t2, m0, mask = phantoms[kind]
    ser = _series(t1, t2, m0, mask, seq, seed=hash(fmt) % 1000)
    if time_first:
        ser = np.moveaxis(ser, -1, 0)
    path = tmp_path / f"sub-01_mrf{suffix}"
    affine = AFFINE if fmt.startswith("nii") else None
    _write(path, ser, fmt, affine)
    files = maps.make_maps(path, matcher_complex, tmp_path / "out", options=OPTS)
    stem = "sub-01_mrf"
    assert series_stem(path) == stem

    t1_ms = np.load(tmp_path / "out" / f"{stem}_T1map_ms.npy")
    t2_ms = np.load(tmp_path / "out" / f"{stem}_T2map_ms.npy")
    m0_map = np.load(tmp_path / "out" / f"{stem}_M0map.npy")
    assert t1_ms.shape == t1.shape  # the input's spatial shape and order
    _check_maps(t1_ms, t2_ms, m0_map, t1, t2, m0, mask)
    assert np.array_equal(np.load(files["mask.npy"]), mask)

    # NIfTI in seconds, affine kept for NIfTI inputs (identity otherwise)
    img = nib.load(str(files["T1map.nii.gz"]))
    vol = np.asarray(img.dataobj).reshape(t1.shape)
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(vol[mask], t1[mask] / 1000.0, rtol=1e-6)
    assert np.all(np.isnan(vol[~mask]))
    np.testing.assert_allclose(img.affine, AFFINE if affine is not None else np.eye(4))
    t2_img = nib.load(str(files["T2map.nii.gz"]))
    np.testing.assert_allclose(np.asarray(t2_img.dataobj).reshape(t1.shape)[mask],
                               t2[mask] / 1000.0, rtol=1e-6)
    # M0 in its own unit (input intensity per unit of simulated fingerprint) in both files
    m0_img = nib.load(str(files["M0map.nii.gz"]))
    np.testing.assert_allclose(np.asarray(m0_img.dataobj).reshape(t1.shape)[mask],
                               m0_map[mask], rtol=1e-6)
    np.testing.assert_allclose(m0_img.affine, img.affine)
    side = json.loads(files["T1map.json"].read_text())
    assert side["Units"] == "s" and side["NumpyUnits"] == "ms"
    assert side["EstimationMethod"] == "dictionary matching"
    assert side["Dictionary"] == "test-dictionary"
    assert side["SequenceLength"] == N_PULSES and side["SequenceName"] == "oksuz2019"
    assert side["SoftwareVersion"]
    assert json.loads(files["M0map.json"].read_text())["Units"] == "arbitrary"


def test_magnitude_series(tmp_path, seq, phantoms, matcher_magnitude):
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq, magnitude=True, noise=0.001)
    assert ser.dtype == np.float32
    res = maps.reconstruct_series(ser, matcher_magnitude)
    _check_maps(res.t1_ms, res.t2_ms, res.m0, t1, t2, m0, mask)


def test_nifti_header_zooms_and_previews(tmp_path, seq, phantoms, matcher_complex):
    t1, t2, m0, mask = phantoms["sphere3d"]
    img = nib.Nifti1Image(_series(t1, t2, m0, mask, seq), AFFINE)
    img.header.set_zooms((1.5, 1.5, 3.0, 4.3))
    img.header.set_xyzt_units("mm", "msec")
    img.header["descrip"] = b"mrf test series"
    path = tmp_path / "scan.nii.gz"
    nib.save(img, str(path))
    files = maps.make_maps(path, matcher_complex, tmp_path / "out",
                           options=maps.MapOptions(progress=True, previews=True))
    out = nib.load(str(files["T2map.nii.gz"]))
    assert out.shape == t1.shape
    assert out.header.get_zooms() == (1.5, 1.5, 3.0)
    assert out.header.get_xyzt_units()[0] == "mm"
    assert out.header["descrip"].tobytes().startswith(b"mrf test series")
    np.testing.assert_allclose(out.affine, AFFINE)
    for name in ("T1map.png", "T2map.png", "M0map.png"):
        assert files[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob("*.tmp"))  # atomic writes leave nothing behind


def test_preview_titles_name_each_map(tmp_path, monkeypatch):
    """Every preview's title names its map: TB1 (the B1 map), not a cut-off 'TB'."""
    from mrflight.maps import writers

    titles = {}
    monkeypatch.setattr(writers, "_save_preview",
                        lambda dest, vol, kind, unit, title, nifti: titles.update(
                            {dest.name: title.split("\n")[0]}))
    ones = np.ones((2, 2), np.float32)
    res = maps.MapResult(ones * 800, ones * 60, ones, ones > 0, ones, 2, {}, ones)
    maps.write_maps(res, tmp_path, "scan", previews=True)
    assert titles == {"scan_T1map.png": "scan T1 (ms)", "scan_T2map.png": "scan T2 (ms)",
                      "scan_M0map.png": "scan M0 (arbitrary)",
                      "scan_TB1map.png": "scan TB1 (ratio)"}


def test_wrong_series_length_is_a_clear_error(tmp_path, seq, phantoms, matcher_complex):
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)[..., :150]
    np.save(tmp_path / "short.npy", ser)
    with pytest.raises(ValueError, match=r"sequence length 200.*|\(24, 24, 150\)"):
        maps.make_maps(tmp_path / "short.npy", matcher_complex, tmp_path / "out", options=OPTS)
    assert not (tmp_path / "out").exists()


def test_mask_file_and_explicit_time_axis(tmp_path, seq, phantoms, matcher_complex):
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    user_mask = mask.copy()
    user_mask[:, :12] = False  # keep only the right half
    np.save(tmp_path / "m.npy", user_mask.astype(np.uint8))
    res = maps.reconstruct_series(ser, matcher_complex, mask=tmp_path / "m.npy", time_axis=-1)
    assert np.array_equal(res.mask, user_mask)
    assert np.all(np.isnan(res.t1_ms[~user_mask]))
    _check_maps(res.t1_ms, res.t2_ms, res.m0, t1, t2, m0, user_mask)
    with pytest.raises(ValueError, match="mask has shape"):
        maps.reconstruct_series(ser, matcher_complex, mask=np.ones((5, 5)))


class _NeverCalled:
    """A reconstructor that fails the test when asked to reconstruct anything."""

    length = N_PULSES

    def __call__(self, signals, b1=None):
        raise AssertionError("reconstruction started")


def test_maps_never_overwrite_files_in_the_output_folder(tmp_path, seq, phantoms,
                                                         matcher_complex):
    """``paths.output_dir`` = the data folder: a mask or B1 map with the BIDS names the maps
    use (``<stem>_mask.nii.gz``, ``<stem>_TB1map.nii.gz``), or an earlier run's maps, are
    refused before any reconstruction, listing the files; nothing is written."""
    t1, t2, m0, mask = phantoms["brain"]
    np.save(tmp_path / "scan.npy", _series(t1, t2, m0, mask, seq))
    mine = {"scan_mask.nii.gz": nib.Nifti1Image(mask.astype(np.uint8), np.eye(4)),
            "scan_TB1map.nii.gz": nib.Nifti1Image(np.ones(t1.shape, np.float32), np.eye(4))}
    for name, img in mine.items():
        nib.save(img, str(tmp_path / name))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match=r"paths.output_dir=.* already holds scan_TB1map.nii.gz, "
                                         r"scan_mask.nii.gz.*give another paths.output_dir"):
        maps.make_maps(tmp_path / "scan.npy", _NeverCalled(), tmp_path, options=OPTS,
                       mask=tmp_path / "scan_mask.nii.gz", b1map=tmp_path / "scan_TB1map.nii.gz")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # an earlier run's maps in the same folder: refused too, by make_maps and by write_maps
    files = maps.make_maps(tmp_path / "scan.npy", matcher_complex, tmp_path / "out",
                           options=OPTS)
    with pytest.raises(ValueError, match="already holds scan_T1map.nii.gz"):
        maps.make_maps(tmp_path / "scan.npy", _NeverCalled(), tmp_path / "out", options=OPTS)
    result = maps.reconstruct_series(tmp_path / "scan.npy", matcher_complex)
    with pytest.raises(ValueError, match="already holds scan_T1map.nii.gz"):
        maps.write_maps(result, tmp_path / "out", "scan", previews=False)
    assert sorted(tmp_path.joinpath("out").iterdir()) == sorted(files.values())


def test_mask_and_b1map_file_errors_name_their_option(tmp_path, seq, phantoms):
    """A missing mask or B1 map names ``mask=``/``b1map=`` (not ``input=``, not nibabel's
    words); a file of several arrays says how to make one the mask; one array is read."""
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    for option, name in (("mask", "m.npy"), ("mask", "m.nii.gz"), ("b1map", "b.nii.gz")):
        with pytest.raises(ValueError, match=rf"^{option}='.*{name}' does not exist"):
            maps.reconstruct_series(ser, _NeverCalled(), **{option: tmp_path / name})
    np.savez(tmp_path / "two.npz", mask=mask, other=mask)
    with pytest.raises(ValueError, match=r"mask=.*two.npz holds several arrays.*np.save"
                                         r"\('mask.npy', arr\).*pass that file as mask=") as e:
        maps.reconstruct_series(ser, _NeverCalled(), mask=tmp_path / "two.npz")
    assert "dataset" not in str(e.value)  # maps.dataset chooses the series, not the mask
    np.savez(tmp_path / "one.npz", mask=mask, spacing=np.ones(2))
    np.testing.assert_array_equal(maps.load_mask(tmp_path / "one.npz", mask.shape), mask)


def test_mask_must_be_binary_and_select_a_voxel(tmp_path, seq, phantoms):
    """An all-zero mask and a mask of fractions (``!= 0`` would keep every voxel) are refused
    with the fix, before any reconstruction."""
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    np.save(tmp_path / "zero.npy", np.zeros(t1.shape, np.uint8))
    with pytest.raises(ValueError, match=r"mask=.*zero.npy selects no voxel.*leave mask= out"):
        maps.reconstruct_series(ser, _NeverCalled(), mask=tmp_path / "zero.npy")
    prob = np.where(mask, 0.9, 0.05).astype(np.float32)
    with pytest.raises(ValueError, match=r"values between 0 and 1 .*0/1 or boolean mask"):
        maps.reconstruct_series(ser, _NeverCalled(), mask=prob)
    # a series whose automatic mask selects nothing (noise only) is refused the same way
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(ser.shape) + 1j * rng.standard_normal(ser.shape)) * 1e-3
    with pytest.raises(ValueError, match=r"automatic mask \(maps.mask_method=snr\) selects no"):
        maps.reconstruct_series(noise.astype(ser.dtype), _NeverCalled())
    # 0/1 floats, booleans and labels (non-zero = reconstruct) are masks
    for good in (mask.astype(np.float32), mask, 3 * mask.astype(np.int16)):
        np.testing.assert_array_equal(maps.load_mask(good, mask.shape), mask)


def test_automatic_mask_warns_about_non_finite_fingerprints(seq, phantoms, matcher_complex):
    """A voxel with a NaN time point is left out of the automatic mask with the same warning
    (a count of voxels) that a mask file gives."""
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    bad = tuple(np.argwhere(mask)[:2].T)
    ser[bad + (50,)] = np.nan
    for user_mask in (None, mask):
        with pytest.warns(RuntimeWarning, match="^2 .*voxel\\(s\\) had .*non-finite"):
            res = maps.reconstruct_series(ser, matcher_complex, mask=user_mask)
        assert not res.mask[bad].any() and np.isnan(res.t1_ms[bad]).all()


@pytest.mark.parametrize("key,value", [("mask_method", "otsu2"), ("mask_fraction", 1.5),
                                       ("chunk_voxels", 0), ("chunk_voxels", "many"),
                                       ("block_mb", -1), ("rank", 0), ("rank", 2.5),
                                       ("device", "nonsense"), ("time_axis", "last"),
                                       ("time_axis", 2.7)])
def test_map_option_errors_name_the_config_key(key, value):
    with pytest.raises(ValueError, match=rf"^maps\.{key}"):
        maps.MapOptions(**{key: value})


def test_matching_rank_beyond_the_fingerprint_names_maps_rank(dictionary):
    with pytest.raises(ValueError, match=r"maps.rank.*\[1, 200\]"):
        maps.MatchingReconstructor.from_dictionary(dictionary, rank=500)


def test_blocks_bound_memory_and_match_whole_read(tmp_path, seq, phantoms, matcher_complex,
                                                  monkeypatch):
    """Tiny blocks: every read stays within the budget and the maps do not change."""
    t1, t2, m0, mask = phantoms["sphere3d"]
    ser = _series(t1, t2, m0, mask, seq).astype(np.complex128)  # float64 on disk
    np.save(tmp_path / "s.npy", ser)
    whole = maps.reconstruct_series(tmp_path / "s.npy", matcher_complex)
    sizes = []
    orig = SeriesSource.read

    def spy(self, index):
        blk = orig(self, index)
        sizes.append(blk.nbytes)
        assert blk.dtype == np.complex64  # converted block by block, never float64 whole
        return blk

    monkeypatch.setattr(SeriesSource, "read", spy)
    budget_mb = 4 * 3 * N_PULSES * 8 / 2**20  # four rows (of 3 voxels x T complex64) of a slice
    res = maps.reconstruct_series(tmp_path / "s.npy", matcher_complex, block_mb=budget_mb,
                                  chunk_voxels=17)
    assert max(sizes) <= budget_mb * 2**20
    assert len(sizes) >= 24 * 6  # the norm pass alone reads 24 slices x 6 blocks
    np.testing.assert_array_equal(whole.t1_ms, res.t1_ms)
    np.testing.assert_array_equal(whole.t2_ms, res.t2_ms)
    np.testing.assert_allclose(whole.m0, res.m0, rtol=1e-5)  # GEMM blocking: last-bit changes


def test_multi_array_files_need_a_choice(tmp_path, seq, phantoms):
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    np.savez(tmp_path / "two.npz", a=ser, b=ser)
    with pytest.raises(ValueError, match="dataset=NAME"):
        open_series(tmp_path / "two.npz", length=N_PULSES)
    with open_series(tmp_path / "two.npz", dataset="b") as src:
        assert src.shape == ser.shape and src.is_complex
    # the v7.3 reader sees MATLAB's axis order, lazily
    save_mat(tmp_path / "x.mat", {"s": {"img": ser}}, v73=True)
    with open_series(tmp_path / "x.mat", dataset="s.img") as src:
        assert src.shape == ser.shape
        np.testing.assert_array_equal(src.read((3, slice(None), slice(0, 5))), ser[3, :, :5])
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(ValueError, match="unknown suffix"):
        open_series(tmp_path / "x.txt")


# ------------------------------------------------------------------------------- networks
class _OracleNet:
    """predict_parameters = exact dictionary matching (tests the network path's M0)."""

    def __init__(self, matcher, seq):
        self.matcher = matcher.matcher
        self.hparams = {"sequence": seq.to_dict()}

    def predict_parameters(self, signals):
        return self.matcher.match(signals)[:, :2]


def test_network_reconstructor_least_squares_m0(seq, phantoms, matcher_complex):
    t1, t2, m0, mask = phantoms["sphere"]
    ser = _series(t1, t2, m0, mask, seq)
    rec = maps.NetworkReconstructor(_OracleNet(matcher_complex, seq))
    assert rec.sequence == seq and rec.length == N_PULSES
    res = maps.reconstruct_series(ser, rec)
    _check_maps(res.t1_ms, res.t2_ms, res.m0, t1, t2, m0, mask, m0_tol=0.01)


class _TruthNet:
    """predict_parameters = one tissue's true T1/T2 for every voxel; trained (it says) on
    relative noise ``noise_std``."""

    def __init__(self, seq, t1_t2, noise_std):
        self.hparams = {"sequence": seq.to_dict(), "noise_std": noise_std}
        self.t1_t2 = torch.tensor([t1_t2], dtype=torch.float32)

    def predict_parameters(self, signals):
        return self.t1_t2.expand(len(signals), 2)


def _noisy_tissue(seq, rel_noise, seed=0):
    """``(N, T)`` complex64 fingerprints of T1 1000 / T2 80 ms with unit norm, a random phase
    each, and complex noise ``rel_noise[i]`` on the real and on the imaginary part."""
    from mrflight.efficiency import _measure

    d = simulate(seq, [1000.0], [80.0], dtype=torch.float64)
    return _measure(d.expand(len(rel_noise), -1), np.ones(1), np.asarray(rel_noise), seed)


def test_relative_noise_measures_the_noise_of_a_unit_norm_fingerprint(seq):
    d = simulate(seq, [1000.0], [80.0])
    levels = np.repeat([0.005, 0.02, 0.05], 200)
    est = maps.relative_noise(_noisy_tissue(seq, levels), d.expand(len(levels), -1)).numpy()
    for lev in (0.005, 0.02, 0.05):
        e = est[levels == lev]
        # the mean within 1.5 %; the spread that of 2T = 400 squared samples (5 %)
        assert abs(e.mean() / lev - 1) < 0.015, (lev, e.mean())
        assert 0.03 < e.std() / lev < 0.07, (lev, e.std())
    # proton density 0.5 under noise 0.01 (0.5 x a unit-norm one under 0.02) reads as 0.02
    half = (0.5 * _noisy_tissue(seq, np.full(200, 0.02))).to(torch.complex64)
    assert abs(maps.relative_noise(half, d.expand(200, -1)).mean().item() / 0.02 - 1) < 0.015
    with pytest.raises(ValueError, match="complex"):
        maps.relative_noise(_noisy_tissue(seq, levels[:3]).abs(), d.expand(3, -1))


def test_maps_warn_where_the_data_is_noisier_than_the_network_was_trained(tmp_path, seq):
    # half the voxels inside the training range [0.005, 0.01], half at 3x its top
    levels = np.repeat([0.008, 0.03], 32)
    np.save(tmp_path / "noisy.npy", _noisy_tissue(seq, levels).reshape(8, 8, -1).numpy())
    rec = maps.NetworkReconstructor(_TruthNet(seq, (1000.0, 80.0), [0.005, 0.01]))
    with pytest.warns(UserWarning, match=r"50 % of the 64 voxels are noisier than the "
                                         r"network's training range.*data.noise_std=\[0.005,"):
        files = maps.make_maps(tmp_path / "noisy.npy", rec, tmp_path / "out", options=OPTS,
                               mask=np.ones((8, 8), bool))
    side = json.loads(files["T1map.json"].read_text())
    rn = side["RelativeNoise"]
    assert rn["TrainingRange"] == [0.005, 0.01] and rn["Voxels"] == 64
    assert rn["FractionAboveTrainingRange"] == 0.5 and rn["FractionBelowTrainingRange"] == 0
    assert 0.0075 < rn["Percentile5"] < 0.0085 and 0.028 < rn["Percentile95"] < 0.032
    assert "noisier" in side["Warnings"][0]
    # a series inside the range (the same reconstructor: the count starts again)
    np.save(tmp_path / "clean.npy", _noisy_tissue(seq, np.full(64, 0.008)).reshape(8, 8, -1))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        files = maps.make_maps(tmp_path / "clean.npy", rec, tmp_path / "out2", options=OPTS,
                               mask=np.ones((8, 8), bool))
    side = json.loads(files["T1map.json"].read_text())
    assert "Warnings" not in side and side["RelativeNoise"]["Voxels"] == 64
    assert side["RelativeNoise"]["FractionAboveTrainingRange"] == 0


def _tiny_checkpoint(path, seq, input_mode="magnitude", **module_kw):
    import lightning as L

    from mrflight.regressor import MRFRegressor

    torch.manual_seed(0)
    module = MRFRegressor({"_target_": "mrflight.models.GRURegressor",
                           "input_length": len(seq), "hidden_size": 8,
                           "in_channels": 2 if input_mode == "complex" else 1},
                          sequence=seq.to_dict(), input_mode=input_mode, **module_kw)
    # an untrained net predicts about 0 (or negative) ms; steer its output layer to about
    # (1000, 100) ms so that the simulated fingerprint, hence M0, is defined
    last = [m for m in module.net.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(0.01)
        last.bias.copy_(torch.tensor([1000.0, 100.0]) / module.target_scale)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__}, path)
    return path


def test_maps_from_config_with_checkpoint_and_dictionary(tmp_path, seq, phantoms, dictionary):
    from omegaconf import OmegaConf

    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    nib.save(nib.Nifti1Image(ser, AFFINE), str(tmp_path / "brain.nii.gz"))
    ckpt = _tiny_checkpoint(tmp_path / "tiny.ckpt", seq)
    cfg = OmegaConf.create({"input": str(tmp_path / "brain.nii.gz"), "ckpt_path": str(ckpt),
                            "dictionary": None, "mask": None,
                            "paths": {"output_dir": str(tmp_path / "net")},
                            "maps": {"_target_": "mrflight.maps.MapOptions", "previews": False,
                                     "progress": False}})
    files = eval_entry.maps_from_config(cfg)
    t1_net = np.load(files["T1map.npy"])
    assert np.all(np.isnan(t1_net[~mask])) and np.all(np.isfinite(t1_net[mask]))
    assert np.all(t1_net[mask] >= 0)
    t2_net = np.load(files["T2map.npy"])
    assert np.all(np.abs(t1_net[mask] - 1000) < 100) and np.all(np.abs(t2_net[mask] - 100) < 20)
    m0_net = np.load(files["M0map.npy"])
    assert np.all(np.isfinite(m0_net[mask]) & (m0_net[mask] > 0))
    # M0 is the least-squares scale against the fingerprint simulated at the prediction
    vox = np.argwhere(mask)[:3]
    d = simulate(seq, torch.tensor(t1_net[tuple(vox.T)]), torch.tensor(t2_net[tuple(vox.T)]))
    s = torch.tensor(ser[tuple(vox.T)])
    expect = (d.conj() * s).sum(1).abs() / (d.abs() ** 2).sum(1)
    np.testing.assert_allclose(m0_net[tuple(vox.T)], expect.numpy(), rtol=1e-3)
    side = json.loads(files["T2map.json"].read_text())
    assert side["Checkpoint"] == str(ckpt) and side["Units"] == "s"
    assert side["EstimationMethod"] == "neural network regression"
    assert side["Network"] == "GRURegressor"  # the regressor, not the LightningModule
    assert side["SequenceLength"] == N_PULSES

    dictionary.save(tmp_path / "dict.h5")
    cfg.ckpt_path, cfg.dictionary = None, str(tmp_path / "dict.h5")
    cfg.paths.output_dir = str(tmp_path / "match")
    files = eval_entry.maps_from_config(cfg)
    _check_maps(np.load(files["T1map.npy"]), np.load(files["T2map.npy"]),
                np.load(files["M0map.npy"]), t1, t2, m0, mask)
    assert json.loads(files["T1map.json"].read_text())["ComplexMatching"] is True
    cfg.ckpt_path = str(ckpt)
    with pytest.raises(ValueError, match="exactly one of"):
        eval_entry.maps_from_config(cfg)


def test_dictionary_paper_checks_the_series_before_simulating(tmp_path, seq, phantoms,
                                                              dictionary, monkeypatch):
    """``dictionary=paper`` simulates 114 650 atoms (1.6 GB at 1750 pulses): a series of
    another length, or a B1 map that needs a B1 column, is refused before that (was after);
    the dictionary is cached in ``paths.cache_dir`` (was always the default cache)."""
    from omegaconf import OmegaConf

    cached_in = []

    def generate_stub(seq_, params, *, cache_dir=None, progress=True, **kw):
        cached_in.append(cache_dir)
        return dictionary

    monkeypatch.setattr("mrflight.dictionary.generate", generate_stub)
    t1, t2, m0, mask = phantoms["brain"]
    np.save(tmp_path / "s.npy", _series(t1, t2, m0, mask, seq))
    np.save(tmp_path / "tb1.npy", np.ones(t1.shape))
    cfg = OmegaConf.create({
        "input": str(tmp_path / "s.npy"), "ckpt_path": None, "dictionary": "paper",
        "mask": None, "b1map": None,
        "sequence": {"_target_": "mrflight.physics.sequence.oksuz2019", "n_pulses": 150},
        "paths": {"output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")},
        "maps": {"previews": False, "progress": False}})
    with pytest.raises(ValueError, match="no axis of the series .* sequence length 150"):
        eval_entry.maps_from_config(cfg)
    cfg.sequence.n_pulses, cfg.b1map = N_PULSES, str(tmp_path / "tb1.npy")
    with pytest.raises(ValueError, match="dictionary=paper has none.*maps.fit_iterations=15"):
        eval_entry.maps_from_config(cfg)
    assert cached_in == [] and not (tmp_path / "out").exists()
    cfg.b1map = None
    files = eval_entry.maps_from_config(cfg)
    assert cached_in == [str(tmp_path / "cache")]
    _check_maps(np.load(files["T1map.npy"]), np.load(files["T2map.npy"]),
                np.load(files["M0map.npy"]), t1, t2, m0, mask)


def test_a_magnitude_series_is_refused_by_a_network_trained_on_complex_data(tmp_path, seq,
                                                                           phantoms):
    """``python eval.py input=MAGNITUDE ckpt_path=COMPLEX_NET`` is refused before any map is
    written (the default GRU gave T1 maps off by -95 % from a magnitude series, with only a
    warning); the complex series of the same scan, and a magnitude network, are mapped."""
    from omegaconf import OmegaConf

    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    np.save(tmp_path / "mag.npy", np.abs(ser))
    np.save(tmp_path / "cplx.npy", ser)
    ckpt = _tiny_checkpoint(tmp_path / "complex.ckpt", seq, input_mode="complex")
    cfg = OmegaConf.create({"input": str(tmp_path / "mag.npy"), "ckpt_path": str(ckpt),
                            "dictionary": None, "mask": None,
                            "paths": {"output_dir": str(tmp_path / "out")},
                            "maps": {"_target_": "mrflight.maps.MapOptions", "previews": False,
                                     "progress": False}})
    with pytest.raises(ValueError, match=r"trained on complex fingerprints, but .*mag.npy is "
                                         r"real-valued .*pass the complex series"):
        eval_entry.maps_from_config(cfg)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    cfg.input = str(tmp_path / "cplx.npy")
    assert eval_entry.maps_from_config(cfg)["T1map.npy"].is_file()
    cfg.input, cfg.ckpt_path = str(tmp_path / "mag.npy"), str(
        _tiny_checkpoint(tmp_path / "magnitude.ckpt", seq))
    cfg.paths.output_dir = str(tmp_path / "out_mag")
    assert eval_entry.maps_from_config(cfg)["T1map.npy"].is_file()


def test_estimates_above_the_networks_training_range_are_counted_and_warned_about(
        tmp_path, seq, phantoms):
    """Voxels whose T2 estimate lies above the T2 range of the network's training prior (its
    run's ``data.t2_range``; CSF at 3 T) are counted in the sidecars and warned about, naming
    the fit (the default GRU gave CSF's T2 53 % too low, unflagged); a run without a saved
    range is not checked."""
    import shutil
    import warnings

    from omegaconf import OmegaConf

    t1, t2, m0, mask = phantoms["brain"]
    np.save(tmp_path / "scan.npy", _series(t1, t2, m0, mask, seq))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = _tiny_checkpoint(run / "checkpoints" / "epoch_000.ckpt", seq)  # ~(1000, 100) ms
    (run / "checkpoints" / "config.yaml").write_text(
        "data:\n  _target_: mrflight.data.SimulatedDataModule\n"
        "  t1_range: [50.0, 5000.0]\n  t2_range: [5.0, 60.0]\n")
    cfg = OmegaConf.create({"input": str(tmp_path / "scan.npy"), "ckpt_path": str(ckpt),
                            "dictionary": None, "mask": None,
                            "paths": {"output_dir": str(tmp_path / "out")},
                            "maps": {"_target_": "mrflight.maps.MapOptions", "previews": False,
                                     "progress": False}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = eval_entry.maps_from_config(cfg)
    side = json.loads(files["T2map.json"].read_text())
    above = side["EstimatesAboveTrainingRange"]
    assert above["TrainingRangeMs"] == {"t1": [50.0, 5000.0], "t2": [5.0, 60.0]}
    assert above["FractionT2Above"] == 1.0 and above["FractionT1Above"] == 0.0
    said = [str(w.message) for w in caught if "training range (T2 <= 60 ms)" in str(w.message)]
    assert said and "maps.fit_iterations=15" in said[0]
    assert said[0] in side["Warnings"]
    # no saved range (a checkpoint moved out of its run): nothing checked, nothing said
    shutil.move(str(ckpt), tmp_path / "alone.ckpt")
    cfg.ckpt_path, cfg.paths.output_dir = str(tmp_path / "alone.ckpt"), str(tmp_path / "out2")
    side = json.loads(eval_entry.maps_from_config(cfg)["T2map.json"].read_text())
    assert side["EstimatesAboveTrainingRange"] is None
    assert not any("training range (T2" in w for w in side.get("Warnings", []))


def _range_maps(tmp_path, seq, phantoms, ckpt, out) -> dict:
    """The T2 sidecar of maps of the brain phantom (tissue at about (1000, 100) ms for the
    steered tiny checkpoint) made by ``eval.py input=... ckpt_path=ckpt``."""
    import warnings

    from omegaconf import OmegaConf

    t1, t2, m0, mask = phantoms["brain"]
    if not (tmp_path / "scan.npy").is_file():
        np.save(tmp_path / "scan.npy", _series(t1, t2, m0, mask, seq))
    cfg = OmegaConf.create({"input": str(tmp_path / "scan.npy"), "ckpt_path": str(ckpt),
                            "dictionary": None, "mask": None,
                            "paths": {"output_dir": str(tmp_path / out)},
                            "maps": {"_target_": "mrflight.maps.MapOptions", "previews": False,
                                     "progress": False}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said in the sidecar's Warnings
        return json.loads(eval_entry.maps_from_config(cfg)["T2map.json"].read_text())


_WIDE_CONFIG = ("data:\n  _target_: mrflight.data.SimulatedDataModule\n"
                "  t1_range: [50.0, 5000.0]\n  t2_range: [5.0, 600.0]\n")


def test_the_checkpoints_recorded_training_range_flags_estimates_wherever_it_is_copied(
        tmp_path, seq, phantoms):
    """A checkpoint records its training range (``hparams["training_range"]``): maps flag the
    estimates above it from the checkpoint alone (copied out of its run folder, where no run
    config is found), and the recorded range wins over its run's saved config."""
    import shutil

    import mrflight

    recorded = {"t1": [50.0, 5000.0], "t2": [5.0, 60.0]}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = _tiny_checkpoint(run / "checkpoints" / "epoch_000.ckpt", seq,
                            training_range=recorded)  # estimates ~(1000, 100) ms
    assert mrflight.load_checkpoint(ckpt).hparams["training_range"] == recorded
    (run / "checkpoints" / "config.yaml").write_text(_WIDE_CONFIG)  # T2 up to 600: not flagged
    copied = tmp_path / "elsewhere" / "copied.ckpt"
    copied.parent.mkdir()
    shutil.copy(ckpt, copied)
    for i, path in enumerate((ckpt, copied)):
        side = _range_maps(tmp_path, seq, phantoms, path, f"out{i}")
        above = side["EstimatesAboveTrainingRange"]
        assert above["TrainingRangeMs"] == recorded, path
        assert above["FractionT2Above"] == 1.0 and above["FractionT1Above"] == 0.0
        assert any("training range (T2 <= 60 ms)" in w for w in side["Warnings"])
    # the library's reconstructor reads it from the module too
    rec = maps.NetworkReconstructor(mrflight.load_checkpoint(copied))
    assert rec.training_range == {"t1": (50.0, 5000.0), "t2": (5.0, 60.0)}


def test_an_old_checkpoint_without_a_recorded_range_loads_and_uses_its_runs_config(
        tmp_path, seq, phantoms):
    """A checkpoint written before the training range was recorded (no ``training_range``
    hyper-parameter) loads with the range ``None``; its maps take the range from its run's
    saved config as before, and copied out of the run folder nothing is checked."""
    import shutil

    import mrflight

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = _tiny_checkpoint(run / "checkpoints" / "epoch_000.ckpt", seq)
    ck = torch.load(ckpt, weights_only=True)
    ck["hyper_parameters"].pop("training_range", None)  # as written before it existed
    torch.save(ck, ckpt)
    (run / "checkpoints" / "config.yaml").write_text(_WIDE_CONFIG.replace("600.0", "60.0"))
    module = mrflight.load_checkpoint(ckpt)
    assert module.hparams["training_range"] is None
    assert maps.NetworkReconstructor(module).training_range is None
    above = _range_maps(tmp_path, seq, phantoms, ckpt, "in_run")["EstimatesAboveTrainingRange"]
    assert above["TrainingRangeMs"] == {"t1": [50.0, 5000.0], "t2": [5.0, 60.0]}
    assert above["FractionT2Above"] == 1.0
    shutil.move(str(ckpt), tmp_path / "alone.ckpt")
    side = _range_maps(tmp_path, seq, phantoms, tmp_path / "alone.ckpt", "alone")
    assert side["EstimatesAboveTrainingRange"] is None


def test_a_reused_fitted_reconstructor_counts_each_series_on_its_own(tmp_path, seq):
    """make_maps resets a reconstructor's records for every series, the fit's base included:
    the second series' sidecar counts its own voxels, not both series'."""
    import mrflight

    module = mrflight.load_checkpoint(_tiny_checkpoint(tmp_path / "tiny.ckpt", seq))
    rec = maps.FittedReconstructor(maps.NetworkReconstructor(
        module, training_range={"t1": (50.0, 5000.0), "t2": (5.0, 600.0)}), iterations=1)
    series = simulate(seq, [800.0, 1200.0, 400.0, 2000.0], [60.0, 90.0, 40.0, 200.0])
    np.save(tmp_path / "s.npy", series.reshape(2, 2, -1).numpy())
    for out in ("a", "b"):
        files = maps.make_maps(tmp_path / "s.npy", rec, tmp_path / out, options=OPTS,
                               mask=np.ones((2, 2), bool))
        side = json.loads(files["T1map.json"].read_text())
        assert side["EstimatesAboveTrainingRange"]["Voxels"] == 4


def test_eval_entry_point_makes_maps(tmp_path, seq, phantoms, dictionary):
    """``python eval.py input=... dictionary=...`` composes to maps_from_config (no subprocess)."""
    t1, t2, m0, mask = phantoms["brain"]
    np.save(tmp_path / "brain.npy", _series(t1, t2, m0, mask, seq))
    dictionary.save(tmp_path / "dict.h5")
    cfg = pipeline.compose_config(
        [f"input={tmp_path / 'brain.npy'}", f"dictionary={tmp_path / 'dict.h5'}",
         "maps.progress=false", "maps.previews=false"],
        output_dir=str(tmp_path / "run"), config_name="eval")
    files = pipeline.evaluate(cfg)
    assert files["T1map.nii.gz"].parent == tmp_path / "run"
    _check_maps(np.load(files["T1map.npy"]), np.load(files["T2map.npy"]),
                np.load(files["M0map.npy"]), t1, t2, m0, mask)


# ------------------------------------------------------------------------------- real input
def test_signed_real_series_is_refused(tmp_path, seq, phantoms, dictionary, matcher_magnitude):
    """The real part of complex data is not a magnitude: refused, never matched as one."""
    from omegaconf import OmegaConf

    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    np.save(tmp_path / "real.npy", ser.real.astype(np.float32))
    np.save(tmp_path / "mag.npy", np.abs(ser).astype(np.float32))
    dictionary.save(tmp_path / "dict.h5")
    cfg = OmegaConf.create({"input": str(tmp_path / "real.npy"), "ckpt_path": None,
                            "dictionary": str(tmp_path / "dict.h5"), "mask": None,
                            "paths": {"output_dir": str(tmp_path / "out")},
                            "maps": {"previews": False, "progress": False}})
    with pytest.raises(ValueError, match="negative values.*not a magnitude.*np.abs"):
        eval_entry.maps_from_config(cfg)
    assert not (tmp_path / "out").exists()
    # with a mask file (no first pass over the norms) too
    with pytest.raises(ValueError, match="negative values"):
        maps.reconstruct_series(tmp_path / "real.npy", matcher_magnitude, mask=mask)
    # complex matching of a magnitude series is refused; the magnitude itself is accepted
    cfg.input, cfg.maps.complex_matching = str(tmp_path / "mag.npy"), True
    with pytest.raises(ValueError, match="complex_matching=true needs a complex series"):
        eval_entry.maps_from_config(cfg)
    cfg.maps.complex_matching = None
    assert eval_entry.maps_from_config(cfg)["T1map.npy"].is_file()


def test_network_overflow_gives_nan_not_float_max(seq):
    class Overflow:
        def predict_parameters(self, signals):
            out = torch.full((len(signals), 2), 1000.0)
            out[0] = float("inf")
            out[1, 1] = -float("inf")
            return out

    rec = maps.NetworkReconstructor(Overflow(), seq, compute_m0=False)
    params, _ = rec(np.ones((3, N_PULSES), np.float32))
    assert np.isnan(params[0]).all() and params[1, 0] == 1000 and params[1, 1] == 0
    assert np.all(params[2] == 1000)


def _b1map_config(tmp_path, series: str, dictionary: str, **maps_options):
    """eval.py's maps config: ``tmp_path/series`` matched with ``tmp_path/dictionary`` at the
    measured B1 map ``tmp_path/tb1.npy``, into ``tmp_path/out``."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"input": str(tmp_path / series), "ckpt_path": None,
                             "dictionary": str(tmp_path / dictionary), "mask": None,
                             "b1map": str(tmp_path / "tb1.npy"),
                             "paths": {"output_dir": str(tmp_path / "out")},
                             "maps": {"_target_": "mrflight.maps.MapOptions", "previews": False,
                                      "progress": False, **maps_options}})


def test_b1map_restricts_matching_to_the_measured_b1(tmp_path, seq, phantoms, dictionary):
    """``eval.py input=... dictionary=B1DICT b1map=FILE``: every voxel is matched only at the
    dictionary's B1 nearest to its measured B1, which makes T1/T2 exact under a B1 field that
    a B1 = 1 dictionary would turn into bias; bad uses fail with a clear error."""

    t1, t2, m0, mask = phantoms["brain"]
    grid = np.asarray(dictionary.params)[:, :2]
    b1_values = np.round(np.arange(0.80, 1.20 + 1e-9, 0.05), 2)
    params = np.column_stack([np.repeat(grid, len(b1_values), 0), np.tile(b1_values, len(grid))])
    b1dict = generate(seq, params[:, :2], b1=params[:, 2], progress=False)
    # a smooth field across the image; the series is simulated at its nearest grid value
    field = np.broadcast_to(np.linspace(0.82, 1.18, t1.shape[1]), t1.shape).copy()
    nearest = b1_values[np.abs(field[..., None] - b1_values).argmin(-1)]
    ser = np.zeros(t1.shape + (len(seq),), np.complex64)
    fp = simulate(seq, torch.tensor(t1[mask]), torch.tensor(t2[mask]),
                  torch.tensor(nearest[mask]))
    ser[mask] = (fp * torch.tensor(m0[mask], dtype=torch.float32)[:, None]).numpy()
    ser[~mask] = 1e-3 * (1 + 1j)  # a background for the automatic mask to drop
    np.save(tmp_path / "b1.npy", ser)
    np.save(tmp_path / "tb1.npy", field)
    b1dict.save(tmp_path / "b1dict.h5")
    cfg = _b1map_config(tmp_path, "b1.npy", "b1dict.h5")
    files = eval_entry.maps_from_config(cfg)
    got1, got2 = np.load(files["T1map.npy"]), np.load(files["T2map.npy"])
    tb1 = np.load(files["TB1map.npy"])
    assert np.mean(got1[mask] == t1[mask].astype(np.float32)) >= 0.95
    assert np.mean(got2[mask] == t2[mask].astype(np.float32)) >= 0.95
    np.testing.assert_allclose(tb1[mask], nearest[mask], atol=1e-6)
    assert "measured" in json.loads(files["T1map.json"].read_text())["B1"]
    # without a B1 map the atoms live in the matcher only (not a second copy in the dictionary)
    assert maps.MatchingReconstructor.from_dictionary(b1dict).dictionary is None
    # a map in percent, a dictionary without B1, a network: clear errors
    cfg.b1map, cfg.paths.output_dir = str(tmp_path / "pct.npy"), str(tmp_path / "pct")
    np.save(tmp_path / "pct.npy", 100 * field)
    with pytest.raises(ValueError, match="ratio to nominal.*divide a map in percent"):
        eval_entry.maps_from_config(cfg)
    cfg.b1map = str(tmp_path / "tb1.npy")
    dictionary.save(tmp_path / "plain.h5")
    cfg.dictionary = str(tmp_path / "plain.h5")
    with pytest.raises(ValueError, match="needs a dictionary with a B1 column"):
        eval_entry.maps_from_config(cfg)
    cfg.dictionary, cfg.ckpt_path = None, str(tmp_path / "any.ckpt")
    with pytest.raises(ValueError, match="a network estimates B1 itself"):
        eval_entry.maps_from_config(cfg)


def test_fit_refines_maps_at_the_measured_b1(tmp_path, seq, phantoms, dictionary):
    """``maps.fit_iterations=K b1map=FILE``: matching on a B1 = 1 grid, then the
    maximum-likelihood fit of T1 and T2 at each voxel's measured (continuous) B1, lands on the
    truth, where matching alone is off the grid and biased by B1; a magnitude series is refused
    before any reading."""

    t1, t2, m0, mask = phantoms["brain"]
    field = np.broadcast_to(np.linspace(0.83, 1.17, t1.shape[1]), t1.shape).copy()
    ser = np.zeros(t1.shape + (len(seq),), np.complex64)
    fp = simulate(seq, torch.tensor(t1[mask]), torch.tensor(t2[mask]), torch.tensor(field[mask]))
    ser[mask] = (fp * torch.tensor(m0[mask], dtype=torch.float32)[:, None]).numpy()
    rng = np.random.default_rng(3)
    noise = NOISE * float(torch.linalg.vector_norm(fp, dim=1).mean())
    ser += (noise * (rng.standard_normal(ser.shape) + 1j * rng.standard_normal(ser.shape))
            ).astype(np.complex64)
    np.save(tmp_path / "s.npy", ser * np.complex64(np.exp(0.4j)))
    np.save(tmp_path / "tb1.npy", field)
    dictionary.save(tmp_path / "d.h5")
    cfg = _b1map_config(tmp_path, "s.npy", "d.h5", fit_iterations=20)
    files = eval_entry.maps_from_config(cfg)
    got = {k: np.load(files[f"{k}map.npy"]) for k in ("T1", "T2", "M0", "TB1")}
    mine = mask & np.isfinite(got["T1"])
    assert mine.sum() >= 0.95 * mask.sum()
    for name, truth in (("T1", t1), ("T2", t2), ("M0", m0)):
        rel = np.abs(got[name][mine] / truth[mine] - 1)
        assert np.median(rel) < 0.005 and np.mean(rel < 0.03) > 0.9, (name, np.median(rel))
    np.testing.assert_allclose(got["TB1"][mine], field[mine], rtol=1e-6)
    meta = json.loads(files["T1map.json"].read_text())
    assert meta["Fit"]["Iterations"] == 20 and "measured" in meta["Fit"]["B1"]
    # matching alone, at B1 = 1: grid values, biased by the field
    cfg.b1map, cfg.maps.fit_iterations = None, 0
    cfg.paths.output_dir = str(tmp_path / "plain")
    plain = np.load(eval_entry.maps_from_config(cfg)["T1map.npy"])
    err_plain = np.abs(plain[mine] / t1[mine] - 1).mean()
    err_fit = np.abs(got["T1"][mine] / t1[mine] - 1).mean()
    print(f"mean |T1 error|: matching at B1 = 1 {err_plain:.4f}, + fit at the measured B1 "
          f"{err_fit:.4f}")
    assert err_plain > 0.02 and err_fit < err_plain / 5
    # a magnitude series: refused with the reason
    np.save(tmp_path / "mag.npy", np.abs(ser))
    cfg.input, cfg.maps.fit_iterations = str(tmp_path / "mag.npy"), 20
    with pytest.raises(ValueError, match="real-valued .* Rician"):
        eval_entry.maps_from_config(cfg)
    for bad in (-1, 2.5, "many", True):
        with pytest.raises(ValueError, match="fit_iterations must be an integer"):
            maps.MapOptions(fit_iterations=bad)


def test_fitted_network_reconstructor_recovers_parameters_and_m0(seq):
    """A network's estimates (here the truth perturbed by 10-15 %) refined by the fit: T1, T2,
    B1 and M0 of noise-free fingerprints exactly; the noise record of the fitted voxels."""
    truth = torch.tensor([[900.0, 70.0, 0.9], [1400.0, 120.0, 1.1], [500.0, 40.0, 1.0]])
    m0 = np.array([0.5, 1.0, 2.0], np.float32)
    fp = simulate(seq, truth[:, 0], truth[:, 1], truth[:, 2]).numpy() * m0[:, None]

    class Net:
        def predict_parameters(self, signals):
            return truth * torch.tensor([1.1, 0.85, 1.1])

    rec = maps.FittedReconstructor(maps.NetworkReconstructor(Net(), seq, compute_m0=False), 40)
    params, got_m0 = rec(fp.astype(np.complex64) * np.complex64(np.exp(1j)))
    np.testing.assert_allclose(params, truth.numpy(), rtol=2e-4)
    np.testing.assert_allclose(got_m0, m0, rtol=2e-4)
    assert rec.describe()["Fit"]["B1"] == "fitted with T1 and T2"
    assert rec.noise_summary()["Voxels"] == 3
    with pytest.raises(ValueError, match="complex series"):
        rec(np.abs(fp))


def test_a_magnitude_series_into_a_complex_network_is_warned_and_the_sidecars_keep_it(
        tmp_path, seq):
    """The warning of predict_parameters points at the caller (not at torch's no_grad wrapper)
    and the maps' sidecars record it."""
    import warnings

    from mrflight.regressor import MRFRegressor

    net = {"_target_": "mrflight.models.ANNRegressor", "input_length": len(seq),
           "in_channels": 2, "n_outputs": 2, "hidden_sizes": [8]}
    module = MRFRegressor(net, target_scale_ms=[4000.0, 500.0], input_mode="complex",
                          sequence=seq.to_dict()).eval()
    series = simulate(seq, [800.0, 1200.0, 400.0, 2000.0], [60.0, 90.0, 40.0, 200.0]).abs()
    np.save(tmp_path / "mag.npy", series.reshape(2, 2, -1).numpy())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        files = maps.make_maps(tmp_path / "mag.npy", maps.NetworkReconstructor(module),
                               tmp_path / "out", options=OPTS, mask=np.ones((2, 2), bool))
    said = [w for w in caught if "trained on complex fingerprints" in str(w.message)]
    assert said and all("_contextlib" not in w.filename for w in said)
    side = json.loads(files["T1map.json"].read_text())
    assert any("trained on complex fingerprints" in w for w in side["Warnings"])


# ------------------------------------------------------------------------------- real-world files
def test_nifti_series_with_time_in_the_fifth_dimension(tmp_path, seq, phantoms, matcher_complex):
    """A ``(X, Y, Z, 1, T)`` NIfTI (as some converters write a series, with a vector intent)
    gives the maps of the ``(X, Y, Z, T)`` one; the maps do not inherit the input's intent."""
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)[:, :, None, None, :]
    img = nib.Nifti1Image(ser, AFFINE)
    img.header.set_intent("vector")
    nib.save(img, str(tmp_path / "five.nii"))
    files = maps.make_maps(tmp_path / "five.nii", matcher_complex, tmp_path / "out",
                           options=OPTS)
    t1_ms = np.load(files["T1map.npy"])
    assert t1_ms.shape == t1.shape + (1,)
    _check_maps(t1_ms[..., 0], np.load(files["T2map.npy"])[..., 0],
                np.load(files["M0map.npy"])[..., 0], t1, t2, m0, mask)
    out = nib.load(str(files["T1map.nii.gz"]))
    np.testing.assert_allclose(out.affine, AFFINE)
    assert out.header.get_intent()[0] == "none"
    assert json.loads(files["T1map.json"].read_text())["TimeAxis"] == 3


def test_mask_and_b1map_on_another_nifti_grid_are_refused(tmp_path, seq, phantoms):
    """A NIfTI mask or B1 map of the series' array shape but another position or orientation
    is refused (voxel i would not be voxel i); the same grid, a single slice's other
    thickness, and files without a stated orientation are accepted."""
    t1, t2, m0, mask = phantoms["brain"]
    nib.save(nib.Nifti1Image(_series(t1, t2, m0, mask, seq)[:, :, None], AFFINE),
             str(tmp_path / "s.nii"))
    flipped = AFFINE.copy()
    flipped[:3, 0] *= -1
    shifted = AFFINE.copy()
    shifted[2, 3] += 6.0  # two slices higher
    thick = AFFINE.copy()
    thick[2, 2] = 5.0  # the one slice's thickness: places nothing
    for name, affine, ok in (("same", AFFINE, True), ("thick", thick, True),
                             ("flipped", flipped, False), ("shifted", shifted, False)):
        for option, values in (("mask", mask.astype(np.uint8)), ("b1map", np.ones(t1.shape))):
            path = tmp_path / f"{option}_{name}.nii.gz"
            nib.save(nib.Nifti1Image(values[:, :, None], affine), str(path))
            if ok:
                arr = (maps.load_mask(path, t1.shape + (1,), AFFINE) if option == "mask" else
                       maps.masks.load_b1map(path, t1.shape + (1,), AFFINE))
                assert arr.shape == t1.shape + (1,)
            else:
                with pytest.raises(ValueError, match=rf"^{option}=.*{name}.* not on the series' "
                                                     r"voxel grid.*Resample"):
                    maps.reconstruct_series(tmp_path / "s.nii", _NeverCalled(),
                                            **{option: path})
    unknown = nib.Nifti1Image(mask.astype(np.uint8), None)  # no qform, no sform
    unknown.header.set_qform(None, code=0)
    unknown.header.set_sform(None, code=0)
    nib.save(unknown, str(tmp_path / "m_unknown.nii"))
    np.testing.assert_array_equal(
        maps.load_mask(tmp_path / "m_unknown.nii", t1.shape + (1,), AFFINE)[..., 0], mask)


def test_b1map_of_deviations_is_refused_and_b1_beyond_the_dictionary_warns(
        tmp_path, seq, phantoms, dictionary):
    """A B1 map of the deviation from nominal (in %, half of it negative) is refused with the
    conversion, not matched at its positive half; a measured B1 beyond the dictionary's B1
    values is matched at its edge with a warning (kept in the sidecars)."""
    t1, t2, m0, mask = phantoms["brain"]
    np.save(tmp_path / "s.npy", _series(t1, t2, m0, mask, seq))
    grid = np.asarray(dictionary.params)[:, :2]
    b1_values = np.array([0.9, 1.0, 1.1])
    generate(seq, np.repeat(grid, 3, 0), b1=np.tile(b1_values, len(grid)),
             progress=False).save(tmp_path / "b1dict.h5")
    deviation = np.broadcast_to(np.linspace(-8.0, 8.0, t1.shape[1]), t1.shape)
    np.save(tmp_path / "tb1.npy", deviation)
    cfg = _b1map_config(tmp_path, "s.npy", "b1dict.h5")
    with pytest.raises(ValueError, match=r"b1map=.*tb1.npy is negative in \d+ % of the voxels"
                                         r".*ratio = 1 \+ deviation / 100"):
        eval_entry.maps_from_config(cfg)
    assert not (tmp_path / "out").exists()
    np.save(tmp_path / "tb1.npy", np.where(mask, 1.6, 1.0))  # beyond 1.1 in the tissue
    with pytest.warns(RuntimeWarning, match=r"outside the dictionary's B1 range \[0.9, 1.1\]"):
        files = eval_entry.maps_from_config(cfg)
    np.testing.assert_allclose(np.load(files["TB1map.npy"])[mask], 1.1, rtol=1e-6)
    side = json.loads(files["T1map.json"].read_text())
    assert any("outside the dictionary's B1 range" in w for w in side["Warnings"])
    # tissue voxels without a B1 value are left out, and counted
    holes = np.ones(t1.shape)
    holes[tuple(np.argwhere(mask)[:3].T)] = np.nan
    np.save(tmp_path / "tb1.npy", holes)
    cfg.paths.output_dir = str(tmp_path / "holes")
    with pytest.warns(RuntimeWarning, match=r"^3 voxel\(s\) of the mask have no finite "
                                            r"positive B1 in b1map=\S*tb1.npy: they are left"):
        files = eval_entry.maps_from_config(cfg)
    assert np.load(files["mask.npy"]).sum() == np.isfinite(np.load(files["T1map.npy"])).sum()
    # a map without a value in the tissue, or without any (was "its median is nan: divide a
    # map in percent by 100")
    np.save(tmp_path / "tb1.npy", np.where(mask, np.nan, 1.0))
    cfg.paths.output_dir = str(tmp_path / "none")
    with pytest.raises(ValueError, match=r"b1map=\S*tb1.npy is NaN in every voxel of the mask"):
        eval_entry.maps_from_config(cfg)
    np.save(tmp_path / "tb1.npy", np.full(t1.shape, np.nan))
    with pytest.raises(ValueError, match=r"b1map=\S*tb1.npy has no finite positive value"):
        eval_entry.maps_from_config(cfg)


def test_nifti_spatial_axis_of_the_sequence_length_is_not_taken_for_time(tmp_path, seq,
                                                                        phantoms):
    """A NIfTI series of more time points (its last axis) than the sequence, with a spatial
    axis of the sequence length, is refused (not reconstructed along space); an explicit
    ``maps.time_axis`` is obeyed."""
    rng = np.random.default_rng(0)
    ser = (rng.standard_normal((N_PULSES, 3, 1, 250))
           + 1j * rng.standard_normal((N_PULSES, 3, 1, 250))).astype(np.complex64)
    nib.save(nib.Nifti1Image(ser, AFFINE), str(tmp_path / "long.nii"))
    with pytest.raises(ValueError, match=r"250 time points in its last axis.*sequence has 200"
                                         r".*maps.time_axis=0"):
        maps.reconstruct_series(tmp_path / "long.nii", _NeverCalled())
    with pytest.warns(RuntimeWarning, match="time axis at 0, not last"), \
            pytest.raises(AssertionError, match="reconstruction started"):
        maps.reconstruct_series(tmp_path / "long.nii", _NeverCalled(), time_axis=0,
                                mask=np.ones((3, 1, 250), bool))


def test_nifti_series_with_a_spatial_axis_of_the_sequence_length(tmp_path, seq, phantoms,
                                                                  matcher_complex):
    """A NIfTI series whose last axis and a spatial axis both have the sequence length (a
    matrix as long as the train) is read with time last, as NIfTI keeps it (was: "several
    axes [0, 3] ... set the time axis explicitly")."""
    t1, t2, m0, mask = phantoms["brain"]
    pad = lambda a: np.concatenate([a, np.zeros((N_PULSES - len(a),) + a.shape[1:], a.dtype)])
    t1, t2, m0, mask = (pad(a) for a in (t1, t2, m0, mask))
    nib.save(nib.Nifti1Image(_series(t1, t2, m0, mask, seq)[:, :, None], AFFINE),
             str(tmp_path / "wide.nii"))
    res = maps.reconstruct_series(tmp_path / "wide.nii", matcher_complex)
    assert res.time_axis == 3 and res.t1_ms.shape == t1.shape + (1,)
    _check_maps(res.t1_ms[..., 0], res.t2_ms[..., 0], res.m0[..., 0], t1, t2, m0, mask)


@pytest.mark.parametrize("unit", [1e-25, 1e21])
def test_maps_do_not_depend_on_the_unit_the_series_is_stored_in(seq, phantoms, matcher_complex,
                                                                unit):
    """float32 sums of squares overflow from values of about 1e19 and underflow below 1e-19: a
    series in such a unit gets the same mask and T1/T2 maps, and M0 in its unit."""
    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    ref = maps.reconstruct_series(ser, matcher_complex)
    res = maps.reconstruct_series((ser * np.float32(unit)).astype(np.complex64), matcher_complex)
    assert np.array_equal(res.mask, ref.mask)
    assert np.array_equal(res.t1_ms, ref.t1_ms, equal_nan=True)
    assert np.array_equal(res.t2_ms, ref.t2_ms, equal_nan=True)
    np.testing.assert_allclose(res.m0[ref.mask] / unit, ref.m0[ref.mask], rtol=1e-5)


@pytest.mark.parametrize("fmt", ["mat", "mat73"])
def test_mat_series_keeps_its_singleton_axes(tmp_path, seq, fmt):
    """A (X, Y, 1, T) series (one slice of a 3-D protocol) reads as it is in MATLAB, from a
    v7 file as from a v7.3 file (scipy's default squeeze would make it (X, Y, T))."""
    arr = np.ones((4, 5, 1, len(seq)), np.complex64)
    path = tmp_path / "series.mat"
    _write(path, arr, fmt)
    src = open_series(path, length=len(seq))
    try:
        assert tuple(src.shape) == arr.shape
    finally:
        src.close()
    assert load_mat(path)["TR"] == 4.3  # a scalar is still a scalar by default


def test_mat_scalars_and_vectors_are_not_taken_for_images(tmp_path, seq, phantoms):
    """MATLAB stores a scalar as 1 x 1 and a vector as 1 x N, and a v7 file now keeps those
    axes: a series beside its flip angles (1 x T), or a mask beside a threshold (1 x 1), is
    still the file's one image, as it was when scipy squeezed them."""
    import scipy.io

    t1, t2, m0, mask = phantoms["brain"]
    ser = _series(t1, t2, m0, mask, seq)
    scipy.io.savemat(tmp_path / "scan.mat", {"img": ser, "FA": np.ones(len(seq)), "TR": 4.3})
    src = open_series(tmp_path / "scan.mat", length=len(seq))
    try:
        assert src.name == "img" and tuple(src.shape) == ser.shape
    finally:
        src.close()
    scipy.io.savemat(tmp_path / "mask.mat", {"mask": mask.astype(np.uint8), "thr": 0.5})
    np.testing.assert_array_equal(maps.load_mask(tmp_path / "mask.mat", mask.shape), mask)
