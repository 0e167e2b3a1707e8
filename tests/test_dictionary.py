"""Tests of mrflight.dictionary: grids, generation, cache integrity, file formats, atomic writes."""

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch

import mrflight.dictionary as md
from mrflight.dictionary import (
    Dictionary,
    generate,
    load,
    paper_grid,
    random_params,
    regular_grid,
    save,
)
from mrflight.physics import oksuz2019, simulate

CONFIGS = Path(__file__).resolve().parents[1] / "mrflight" / "configs" / "grid"


@pytest.fixture(scope="module")
def seq():
    return oksuz2019(n_pulses=100)


@pytest.fixture(scope="module")
def small(seq):
    return generate(seq, regular_grid(20, 3000, 8, 5, 400, 6), progress=False)


# ---------------------------------------------------------------------------------- grids

def test_paper_grid_matches_the_published_ranges():
    g = paper_grid()
    assert g.dtype == np.float64 and g.shape == (114650, 2)
    t1, t2 = g[:, 0], g[:, 1]
    # independent count: T1 values and T2 values as written in the paper, T2 <= T1, no zeros
    t1v = np.unique(np.r_[0:501:2, 500:1001:5, 1000:2001:10, 2000:4001:50]).astype(float)
    t2v = np.unique(np.r_[0:101:1, 100:501:2]).astype(float)
    assert len(t1v) == 491 and len(t2v) == 301
    expected = sum(int(np.sum((t2v > 0) & (t2v <= a))) for a in t1v)
    assert len(g) == expected
    assert np.all(t2 <= t1) and np.all(t2 > 0) and np.all(t1 > 0)
    assert (t1.min(), t1.max(), t2.min(), t2.max()) == (2.0, 4000.0, 1.0, 500.0)
    assert set(np.unique(t1)) == set(t1v[1:]) and set(np.unique(t2)) == set(t2v[1:])
    assert len(np.unique(g, axis=0)) == len(g)
    # steps: 2 ms below 500, 5 ms to 1000, 10 ms to 2000, 50 ms above
    d = np.diff(np.unique(t1))
    u = np.unique(t1)[1:]
    assert set(d[u <= 500]) == {2} and set(d[(u > 500) & (u <= 1000)]) == {5}
    assert set(d[(u > 1000) & (u <= 2000)]) == {10} and set(d[u > 2000]) == {50}


def test_regular_grid_linear_and_log():
    g = regular_grid(100, 1000, 10, 10, 1000, 5, spacing="linear", t2_le_t1=False)
    assert g.shape == (50, 2)
    np.testing.assert_allclose(np.unique(g[:, 0]), np.linspace(100, 1000, 10))
    lg = regular_grid(10, 1000, 3, 1, 100, 3, spacing="log")
    np.testing.assert_allclose(np.unique(lg[:, 0]), [10, 100, 1000])
    # T2 <= T1 drops (10, 100) only from the 3 x 3 mesh
    assert len(lg) == 8 and np.all(lg[:, 1] <= lg[:, 0])
    ratios = np.diff(np.log(np.unique(regular_grid(5, 5000, 7, spacing="log")[:, 0])))
    np.testing.assert_allclose(ratios, ratios[0])


@pytest.mark.parametrize("kwargs, name", [
    ({"t2_min": 0}, "t2_min"), ({"n_t1": 0}, "n_t1"), ({"spacing": "cubic"}, "spacing"),
    ({"t1_min": 0, "spacing": "log"}, "t1_min"), ({"t1_min": 500, "t1_max": 100}, "t1_max"),
    ({"t1_max": 5, "t2_min": 10, "t1_min": 1}, "t2_min"),
])
def test_regular_grid_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        regular_grid(**kwargs)


def test_random_params_ranges_seed_and_constraint():
    a = random_params(5000, (100, 3000), (10, 400), seed=3)
    assert a.shape == (5000, 2) and a.dtype == np.float64
    assert np.all((a[:, 0] >= 100) & (a[:, 0] <= 3000) & (a[:, 1] >= 10) & (a[:, 1] <= 400))
    assert np.all(a[:, 1] <= a[:, 0])
    np.testing.assert_array_equal(a, random_params(5000, (100, 3000), (10, 400), seed=3))
    assert not np.allclose(a, random_params(5000, (100, 3000), (10, 400), seed=4))
    # rejection sampling: T2 <= T1 really binds here (T1 from 10 to 400 overlaps T2)
    b = random_params(4000, (10, 400), (10, 400), seed=0)
    assert np.all(b[:, 1] <= b[:, 0]) and len(b) == 4000
    # conditional on T2 <= T1 the larger T1 are favoured: mean T1 = 10 + 2/3 * 390
    assert abs(b[:, 0].mean() - (10 + 2 / 3 * 390)) < 8


def test_random_params_log_uniform_is_uniform_in_log():
    a = random_params(20000, (10, 10000), (1, 1000), "log-uniform", seed=1, t2_le_t1=False)
    assert a[:, 0].min() >= 10 and a[:, 0].max() <= 10000
    u = (np.log(a[:, 0]) - np.log(10)) / np.log(1000)  # should be U(0, 1)
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / len(u)
    np.testing.assert_allclose(hist, 0.1, atol=0.012)
    # plain uniform differs: most draws lie in the top decade
    v = random_params(20000, (10, 10000), (1, 1000), "uniform", seed=1, t2_le_t1=False)
    assert np.mean(v[:, 0] > 1000) > 0.85


@pytest.mark.parametrize("kwargs, name", [
    ({"n": 0}, "n"), ({"n": 5, "distribution": "normal"}, "distribution"),
    ({"n": 5, "t2_range": (0, 10)}, "t2_range"), ({"n": 5, "t1_range": (5,)}, "t1_range"),
    ({"n": 5, "t1_range": (1, 5), "t2_range": (10, 20)}, "t2_range"),
])
def test_random_params_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        random_params(**kwargs)


@pytest.mark.parametrize("name, direct", [
    ("paper", paper_grid),
    ("regular", regular_grid),
    ("random", lambda: random_params(30000, (10.0, 4000.0), (2.0, 500.0))),
])
def test_grid_configs_instantiate_the_constructors(name, direct):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    np.testing.assert_array_equal(instantiate(cfg), direct())


# ---------------------------------------------------------------------------------- container

def test_dictionary_validates_its_arrays():
    a = np.ones((3, 4), np.complex64)
    with pytest.raises(ValueError, match="atoms"):
        Dictionary(np.ones((0, 4), np.complex64), np.ones((0, 2)))
    with pytest.raises(ValueError, match="params"):
        Dictionary(a, np.ones((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        Dictionary(a, np.array([[1, 1], [np.nan, 1], [1, 1]]))
    a2 = a.copy()
    a2[1, 2] = np.inf
    with pytest.raises(ValueError, match="atoms"):
        Dictionary(a2, np.ones((3, 2)))
    with pytest.raises(ValueError, match="units"):
        Dictionary(a, np.ones((3, 2)), units=("ms",))
    d = Dictionary(a.real.astype(np.float32), np.ones((3, 2)))
    assert d.atoms.dtype == np.complex64 and len(d) == 3


def test_generate_equals_simulate_and_records_the_sequence(seq, small):
    p = small.params
    ref = simulate(seq, p[:, 0], p[:, 1]).numpy()
    np.testing.assert_array_equal(small.atoms, ref)
    assert small.atoms.dtype == np.complex64 and small.atoms.shape == (len(p), 100)
    assert small.get_sequence() == seq and small.units == ("ms", "ms")
    assert small.meta["epg_version"] and small.meta["tol"] == 1e-3
    # a per-atom B1 becomes a third parameter column
    b1 = np.linspace(0.7, 1.2, len(p))
    d = generate(seq, p, b1=b1, progress=True)
    assert d.param_names == ("t1_ms", "t2_ms", "b1") and d.units == ("ms", "ms", "1")
    np.testing.assert_array_equal(d.params[:, 2], b1)
    np.testing.assert_array_equal(d.atoms, simulate(seq, p[:, 0], p[:, 1], b1).numpy())


def test_generate_warns_about_zero_atoms(seq):
    with pytest.warns(RuntimeWarning, match="identically zero"):
        d = generate(seq, np.array([[100.0, 0.0], [100.0, 50.0]]), progress=False)
    assert d.norms()[0] == 0 and d.norms()[1] > 0


def test_generate_rejects_bad_params(seq):
    with pytest.raises(ValueError, match="params"):
        generate(seq, np.ones((4, 3)), progress=False)
    with pytest.raises(ValueError, match="b1"):
        generate(seq, np.ones((4, 2)), b1=np.ones(3), progress=False)


def test_b1_in_percent_becomes_a_ratio_and_other_units_are_refused(tmp_path):
    a = np.ones((2, 5), complex)
    d = Dictionary(a, [[800, 60, 100], [1200, 90, 57]], ("t1", "t2", "b1"), ("ms", "ms", "%"))
    assert d.units == ("ms", "ms", "1")
    assert d.params[:, 2].tolist() == [1.0, 0.57]  # divided by 100: exactly 0.57
    named = Dictionary(a, [[800, 60, 90], [1200, 90, 110]], ("t1", "t2", "B1 (%)"),
                       ("ms", "ms", ""))
    assert named.param_names[2] == "b1" and named.params[:, 2].tolist() == [0.9, 1.1]
    for unit in ("1", "ratio", "", "unknown"):
        ratio = Dictionary(a, [[800, 60, 0.9], [1200, 90, 1.1]], ("t1", "t2", "b1"),
                           ("ms", "ms", unit))
        assert ratio.params[:, 2].tolist() == [0.9, 1.1]
    with pytest.raises(ValueError, match="'deg'.*B1 must be a ratio.*units"):
        Dictionary(a, [[800, 60, 1], [1200, 90, 1]], ("t1", "t2", "b1"), ("ms", "ms", "deg"))
    # a foreign file in percent is read as a ratio
    np.savez(tmp_path / "pct.npz", atoms=a, params=np.array([[800, 60, 80], [1200, 90, 120]]),
             param_names=np.array(["T1", "T2", "B1"]), units=np.array(["ms", "ms", "%"]))
    assert load(tmp_path / "pct.npz").params[:, 2].tolist() == [0.8, 1.2]


@pytest.mark.parametrize("names, units, bad", [
    (("t1_s", "t2"), ("ms", "ms"), "'t1_s' has unit 'ms' but its name says 's'"),
    (("t1", "T2 (ms)"), ("ms", "s"), r"'T2 \(ms\)' has unit 's' but its name says 'ms'"),
    (("t1", "t2", "b1_pct"), ("ms", "ms", "1"), "'b1_pct' has unit '1' but its name says 'pct'"),
])
def test_a_unit_in_the_name_must_agree_with_the_given_unit(names, units, bad):
    p = np.array([[800, 60, 90], [1200, 90, 110]])[:, :len(names)]
    with pytest.raises(ValueError, match=bad + ".*make param_names and units agree"):
        Dictionary(np.ones((2, 5), complex), p, names, units)


def test_the_unit_in_the_name_applies_when_the_unit_agrees_or_is_left_out():
    a = np.ones((2, 5), complex)
    for unit in ("", "unknown", "sec", "s"):
        d = Dictionary(a, [[0.8, 60], [1.2, 90]], ("t1_s", "t2"), (unit, "ms"))
        assert d.t1_ms.tolist() == [800.0, 1200.0]
    for unit in ("", "%", "percent"):
        d = Dictionary(a, [[800, 60, 90], [1200, 90, 110]], ("t1", "t2", "b1_pct"),
                       ("ms", "ms", unit))
        assert d.params[:, 2].tolist() == [0.9, 1.1]


# ---------------------------------------------------------------------------------- I/O

FORMATS = [("d.h5", {}), ("d.npz", {}), ("d.mat", {}), ("d73.mat", {"mat_version": "7.3"})]


@pytest.mark.parametrize("name, kwargs", FORMATS)
def test_round_trip_preserves_everything(tmp_path, small, name, kwargs):
    b1 = np.linspace(0.8, 1.1, len(small))
    d = Dictionary(small.atoms, np.c_[small.params, b1], ("t1_ms", "t2_ms", "b1"),
                   ("ms", "ms", "1"), small.sequence, dict(small.meta, note="x"),
                   basis=np.linalg.svd(small.atoms, full_matrices=False)[2][:3].conj().T)
    save(d, tmp_path / name, **kwargs)
    e = load(tmp_path / name)
    exact = not name.endswith(".mat")  # .mat stores normalised D and normD: 1-ulp rounding
    if exact:
        np.testing.assert_array_equal(e.atoms, d.atoms)
    else:
        np.testing.assert_allclose(e.atoms, d.atoms, rtol=2e-7, atol=1e-7)
    assert e.atoms.dtype == np.complex64
    np.testing.assert_array_equal(e.params, d.params)
    np.testing.assert_allclose(e.basis, d.basis, rtol=1e-6)
    assert e.param_names == d.param_names and e.units == d.units
    assert e.sequence == d.sequence and e.meta == d.meta
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


@pytest.mark.parametrize("v73", [False, True])
def test_mat_layout_is_the_matlab_convention(tmp_path, small, v73):
    save(small, tmp_path / "d.mat", mat_version="7.3" if v73 else "7")
    if v73:
        with h5py.File(tmp_path / "d.mat") as f:
            # MATLAB column-major: HDF5 holds the transpose of an M x T matrix
            assert f["dict/D"].shape == (100, len(small))
            assert f["dict/lut"].shape == (2, len(small))
            assert f["dict/normD"].shape == (1, len(small))
        with open(tmp_path / "d.mat", "rb") as f:
            assert f.read(10) == b"MATLAB 7.3"
        return
    s = scipy.io.loadmat(tmp_path / "d.mat", squeeze_me=True)["dict"]
    D, lut, normD = s["D"].item(), s["lut"].item(), s["normD"].item()
    assert D.shape == (len(small), 100) and lut.shape == (len(small), 2)
    np.testing.assert_allclose(np.linalg.norm(D, axis=1), 1, rtol=1e-6)
    np.testing.assert_allclose(normD, small.norms(), rtol=1e-6)
    assert s["units"].item() == "ms,ms" and s["param_names"].item() == "t1_ms,t2_ms"


@pytest.mark.parametrize("v73", [False, True])
def test_load_reads_foreign_mat_files(tmp_path, small, v73):
    from mrflight.fileio import save_mat

    D, lut = small.atoms, small.params
    # top level, transposed (T x M and P x M, as some MATLAB code keeps them), real lut
    save_mat(tmp_path / "a.mat", {"D": D.T, "lut": lut.T}, v73=v73)
    a = load(tmp_path / "a.mat")
    np.testing.assert_allclose(a.atoms, D, rtol=1e-6)
    np.testing.assert_array_equal(a.params, lut)
    assert a.units == ("ms", "ms") and a.param_names == ("t1_ms", "t2_ms")
    # inside a struct of another name, normalised D with its norms
    n = np.linalg.norm(D, axis=1)
    save_mat(tmp_path / "b.mat", {"mydict": {"D": D / n[:, None], "lut": lut, "normD": n}},
             v73=v73)
    b = load(tmp_path / "b.mat")
    np.testing.assert_allclose(b.atoms, D, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("fmt", ["mat", "npz", "h5"])
def test_a_file_with_names_and_no_units_takes_the_units_of_its_names(tmp_path, small, fmt):
    """Names without units got the default units by position: a B1 column first was given
    'ms' and t1_s 'ms', and the file was refused for units it never stated."""
    from mrflight.fileio import save_mat

    b1 = np.linspace(0.8, 1.2, len(small))
    lut = np.c_[b1, small.params / 1000]  # B1, T1 s, T2 s
    names = ["B1", "t1_s", "t2_s"]
    f = tmp_path / f"d.{fmt}"
    if fmt == "mat":
        save_mat(f, {"dict": {"D": small.atoms, "lut": lut, "param_names": ",".join(names)}},
                 v73=False)
    elif fmt == "npz":
        np.savez(f, atoms=small.atoms, params=lut, param_names=np.array(names))
    else:
        with h5py.File(f, "w") as h:
            h["atoms"], h["params"] = small.atoms, lut
            h.attrs["param_names"] = '["B1", "t1_s", "t2_s"]'
    d = load(f)
    assert d.param_names == ("t1_ms", "t2_ms", "b1") and d.units == ("ms", "ms", "1")
    np.testing.assert_allclose(d.params, np.c_[small.params, b1], rtol=1e-12)
    if fmt == "h5":
        with md.open_h5(f, verify=False) as (_, params, header):
            np.testing.assert_allclose(params, d.params, rtol=1e-12)
            assert header["units"] == ["ms", "ms", "1"]


def test_a_dictionary_in_seconds_or_with_swapped_columns_is_warned_about(tmp_path, small):
    """A foreign lut in seconds (no units) or with T2 before T1 (no names) was taken as T1, T2
    in ms: every match 1000x too small, or T1 and T2 swapped, without a word."""
    from mrflight.fileio import save_mat

    D, lut = small.atoms, small.params
    save_mat(tmp_path / "s.mat", {"D": D, "lut": lut / 1000}, v73=False)
    with pytest.warns(UserWarning, match="at most 3 ms: are they in seconds"):
        load(tmp_path / "s.mat")
    save_mat(tmp_path / "w.mat", {"D": D, "lut": lut[:, ::-1].copy()}, v73=False)
    with pytest.warns(UserWarning, match="T2 exceeds T1 in 100 % .* swapped"):
        load(tmp_path / "w.mat")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # units or names given: converted or reordered, silent
        save_mat(tmp_path / "u.mat", {"dict": {"D": D, "lut": lut / 1000, "units": "s,s"}},
                 v73=False)
        np.testing.assert_allclose(load(tmp_path / "u.mat").params, lut)
        save_mat(tmp_path / "n.mat", {"dict": {"D": D, "lut": lut[:, ::-1].copy(),
                                               "param_names": "T2,T1"}}, v73=False)
        np.testing.assert_array_equal(load(tmp_path / "n.mat").params, lut)
        Dictionary(D, lut)
    with pytest.warns(UserWarning, match="in seconds"):
        Dictionary(D, lut / 1000)


def test_load_and_save_errors(tmp_path, small):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nope.h5")
    with pytest.raises(ValueError, match="extension"):
        save(small, tmp_path / "d.txt")
    (tmp_path / "x.foo").write_text("1")
    with pytest.raises(ValueError, match="extension"):
        load(tmp_path / "x.foo")
    with pytest.raises(ValueError, match="mat_version"):
        save(small, tmp_path / "d.mat", mat_version="6")
    scipy.io.savemat(tmp_path / "e.mat", {"D": np.zeros((0, 5)), "lut": np.zeros((0, 2))})
    with pytest.raises(ValueError, match="non-empty"):
        load(tmp_path / "e.mat")
    scipy.io.savemat(tmp_path / "m.mat", {"D": np.ones((4, 5)), "lut": np.ones((3, 2))})
    with pytest.raises(ValueError, match="same number of atoms"):
        load(tmp_path / "m.mat")
    scipy.io.savemat(tmp_path / "n.mat", {"X": np.ones((4, 5))})
    with pytest.raises(ValueError, match="'D' and 'lut'"):
        load(tmp_path / "n.mat")
    (tmp_path / "bad.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(ValueError, match="not a readable"):
        load(tmp_path / "bad.h5")


@pytest.mark.parametrize("fmt, kwargs", [("h5", {}), ("npz", {}), ("mat", {}),
                                         ("mat", {"mat_version": "7.3"})])
def test_load_reads_the_format_from_the_file_not_its_name(tmp_path, small, fmt, kwargs):
    save(small, tmp_path / "plain", format=fmt, **kwargs)  # no extension
    np.testing.assert_allclose(load(tmp_path / "plain").atoms, small.atoms, rtol=1e-6)
    save(small, tmp_path / f"d.{fmt}", **kwargs)
    for wrong in ("h5", "npz", "mat"):  # renamed to another extension
        moved = tmp_path / f"moved.{wrong}"
        moved.write_bytes((tmp_path / f"d.{fmt}").read_bytes())
        e = load(moved)
        np.testing.assert_allclose(e.atoms, small.atoms, rtol=1e-6)
        np.testing.assert_array_equal(e.params, small.params)
    # a .mat file that is HDF5 without MATLAB's header is still read as MATLAB v7.3
    with h5py.File(tmp_path / "bare.mat", "w") as f:
        f["D"], f["lut"] = small.atoms.real.T, small.params.T
    np.testing.assert_array_equal(load(tmp_path / "bare.mat").params, small.params)


def test_open_h5_reads_an_h5_file_by_its_content(tmp_path, small):
    from mrflight.dictionary import open_h5

    save(small, tmp_path / "plain", format="h5")
    with open_h5(tmp_path / "plain", verify=True) as (atoms, params, _):
        np.testing.assert_array_equal(atoms[:3], small.atoms[:3])
    save(small, tmp_path / "plain2", format="npz")
    with pytest.raises(ValueError, match="npz file: use mrflight.dictionary.load"):
        open_h5(tmp_path / "plain2")


def test_format_errors_suggest_what_exists(tmp_path, small):
    with pytest.raises(ValueError, match="format='npz' disagrees.*x.h5: name the file x.npz"):
        save(small, tmp_path / "x.h5", format="npz")
    assert not (tmp_path / "x.h5").exists()
    (tmp_path / "notes").write_text("hello")
    with pytest.raises(ValueError, match="notes is not a dictionary file") as e:
        load(tmp_path / "notes")
    assert "format=" not in str(e.value)  # load has no such argument
    with pytest.raises(ValueError, match="pass format="):  # save has
        save(small, tmp_path / "y")


def test_save_never_replaces_a_file_unasked(tmp_path, small):
    mine = tmp_path / "mine.h5"
    mine.write_text("a user's unrelated file")
    with pytest.raises(ValueError, match=f"{mine} already exists: pass overwrite=True"):
        save(small, mine)
    with pytest.raises(ValueError, match="already exists"):
        small.save(mine)
    assert mine.read_text() == "a user's unrelated file"
    save(small, mine, overwrite=True)
    np.testing.assert_array_equal(load(mine).atoms, small.atoms)
    small.save(mine, overwrite=True)
    # read-only: refused even with overwrite=True (os.replace would replace it regardless)
    locked = tmp_path / "locked.npz"
    save(small, locked)
    before = locked.read_bytes()
    locked.chmod(0o444)
    with pytest.raises(ValueError, match="locked.npz is read-only.*chmod u\\+w"):
        save(Dictionary(small.atoms[:3], small.params[:3]), locked, overwrite=True)
    assert locked.read_bytes() == before
    # a dangling link is not replaced either
    (tmp_path / "link.h5").symlink_to(tmp_path / "elsewhere.h5")
    with pytest.raises(ValueError, match="already exists"):
        save(small, tmp_path / "link.h5")


def test_save_refuses_a_folder_and_a_missing_folder(tmp_path, small):
    (tmp_path / "out").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'out'} is a folder: give a file in it"):
        save(small, tmp_path / "out")
    with pytest.raises(ValueError, match="its folder .*ouy does not exist"):
        save(small, tmp_path / "ouy" / "d.h5")  # mistyped: not made
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out"]
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="its folder .*f is a file"):
        save(small, tmp_path / "f" / "d.h5")


# ---------------------------------------------------------------------------------- cache

@pytest.fixture
def counted(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return simulate(*args, **kwargs)

    monkeypatch.setattr(md.generation, "simulate", counting)
    return calls


def test_cache_hit_skips_simulation(tmp_path, seq, counted):
    p = regular_grid(50, 2000, 6, 10, 300, 5)
    a = generate(seq, p, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.glob("*.h5"))
    assert len(counted) == 1 and len(files) == 1
    b = generate(seq, p, cache_dir=tmp_path, progress=False)
    assert len(counted) == 1
    np.testing.assert_array_equal(a.atoms, b.atoms)
    np.testing.assert_array_equal(a.params, b.params)
    # anything that changes the atoms misses the cache
    generate(seq, p, cache_dir=tmp_path, progress=False, tol=1e-4)
    generate(seq, p, cache_dir=tmp_path, progress=False, b1=0.9)
    generate(seq, p, cache_dir=tmp_path, progress=False, dtype=torch.float64)
    generate(oksuz2019(n_pulses=101), p, cache_dir=tmp_path, progress=False)
    generate(seq, p[:-1], cache_dir=tmp_path, progress=False)
    assert len(counted) == 6 and len(list(tmp_path.glob("*.h5"))) == 6


def test_default_cache_dir_follows_the_environment(tmp_path, seq, monkeypatch, counted):
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "c"))
    assert md.default_cache_dir() == tmp_path / "c" / "dictionaries"
    p = regular_grid(50, 2000, 3, 10, 300, 3)
    generate(seq, p, cache_dir=True, progress=False)
    generate(seq, p, cache_dir=True, progress=False)
    assert len(counted) == 1 and len(list((tmp_path / "c" / "dictionaries").glob("*.h5"))) == 1


@pytest.mark.parametrize("env", ["set", "xdg", "both", "unset"])
def test_paths_config_names_the_default_cache_dir(tmp_path, monkeypatch, env):
    """MRFLIGHT_CACHE_DIR, else XDG_CACHE_HOME/mrflight (the cache folder users and clusters
    set for every tool), else ~/.cache/mrflight: the same in Python and in the config."""
    from omegaconf import OmegaConf

    from mrflight.physics import _ckernel

    monkeypatch.delenv("MRFLIGHT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    if env in ("set", "both"):
        monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "c"))
    if env in ("xdg", "both"):
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    expect = {"set": tmp_path / "c", "both": tmp_path / "c", "xdg": tmp_path / "xdg" / "mrflight",
              "unset": Path.home() / ".cache" / "mrflight"}[env]
    cfg = OmegaConf.load(CONFIGS.parent / "paths" / "default.yaml")
    assert Path(cfg.cache_dir).expanduser() == md.default_cache_dir() == expect / "dictionaries"
    assert md.default_cache_dir().parent == _ckernel.cache_dir().parent


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _flip_middle(path: Path):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid: mid + 4] = bytes(b ^ 0xFF for b in data[mid: mid + 4])
    path.write_bytes(bytes(data))


def _flip_header(path: Path):
    data = bytearray(path.read_bytes())
    data[0:8] = b"\x00" * 8
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip_middle, _flip_header])
def test_corrupt_cache_is_detected_warned_and_rebuilt(tmp_path, seq, counted, damage):
    p = regular_grid(50, 2000, 8, 10, 300, 8)
    a = generate(seq, p, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.h5")
    damage(path)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        b = generate(seq, p, cache_dir=tmp_path, progress=False)
    assert len(counted) == 2  # rebuilt, not used
    np.testing.assert_array_equal(a.atoms, b.atoms)
    # the rebuilt cache is sound again: a silent hit
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = generate(seq, p, cache_dir=tmp_path, progress=False)
    assert len(counted) == 2
    np.testing.assert_array_equal(a.atoms, c.atoms)


def test_checksum_catches_a_flipped_sample(tmp_path, small):
    save(small, tmp_path / "d.h5")
    with h5py.File(tmp_path / "d.h5", "r+") as f:  # a valid HDF5 file with one changed value
        f["atoms"][3, 7] = f["atoms"][3, 7] * 1.0001
    with pytest.raises(ValueError, match="checksum"):
        load(tmp_path / "d.h5")
    assert load(tmp_path / "d.h5", verify=False).atoms[3, 7] != small.atoms[3, 7]


def test_cache_keys_and_checksums_are_pinned(tmp_path):
    """Values computed by mrflight before the dictionary package split (issue #12): existing
    caches, .h5/.npz files and v7.3 .mat files must keep their keys and verify."""
    from mrflight.dictionary import cache_key, open_h5
    from mrflight.fileio import load_mat, save_mat

    s = oksuz2019(n_pulses=10)
    p = np.array([[100.0, 10.0], [800.0, 60.0], [1500.0, 120.5]])
    assert cache_key(s, p) == "0f0cff40900b5e022f255d68ddef72f5"
    assert cache_key(s, p, b1=np.array([0.9, 1.0, 1.1]), dtype=torch.float64,
                     tol=1e-4) == "c08f2e8aaa5ff6f716f5c522e09cf04c"
    assert cache_key(s, p, b1=0.95) == "75061cf5461abbe97005e412e96d1e8c"
    m, t = 5, 4
    atoms = (np.arange(m * t).reshape(m, t) * (0.5 - 0.25j)).astype(np.complex64)
    params = np.array([[100.0 + 10 * i, 10.0 + i, 0.9 + 0.05 * i] for i in range(m)])
    d = Dictionary(atoms, params, ("T1", "T2", "B1"), ("ms", "ms", "1"), {"name": "x"},
                   {"k": 1}, np.eye(t, 2))
    save(d, tmp_path / "d.h5")
    save(d, tmp_path / "d.npz")
    save(Dictionary(atoms, params[:, :2]), tmp_path / "e.h5")
    with_basis = "f7676c15b42c0cffa41151ff669d44d8bec8a29e50c3e52440dae26866422eb0"
    with h5py.File(tmp_path / "d.h5", "r") as f:
        assert f.attrs["sha256"] == with_basis
    assert str(np.load(tmp_path / "d.npz")["sha256"]) == with_basis
    with h5py.File(tmp_path / "e.h5", "r") as f:
        assert f.attrs["sha256"] == ("31a42ff2e45f2762a995e0a7fde8fd960b18d12eab6b0db82c3b890f"
                                     "314bb561")
    with open_h5(tmp_path / "e.h5", verify=True) as (_, got, _):
        np.testing.assert_array_equal(got, params[:, :2])
    save_mat(tmp_path / "m.mat", {"s": {"D": atoms, "name": "ab", "lut": params},
                                  "x": np.arange(3)}, v73=True)
    with h5py.File(tmp_path / "m.mat", "r") as f:
        assert f.attrs["mrflight_sha256"] == ("61f8d16a28f669bd815cafcea621e473584182f04d5c66af"
                                              "6edd781d609f8ce8")
    np.testing.assert_array_equal(load_mat(tmp_path / "m.mat")["s"]["D"], atoms)


# ---------------------------------------------------------------------------------- atomicity

def test_failed_write_leaves_the_old_file(tmp_path, small, monkeypatch):
    old = Dictionary(small.atoms[:5], small.params[:5], sequence=small.sequence)
    for name in ("d.h5", "d.npz", "d.mat"):
        save(old, tmp_path / name)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(h5py.Group, "create_dataset", boom)
    monkeypatch.setattr(np, "savez", boom)
    monkeypatch.setattr(scipy.io, "savemat", boom)
    for name in ("d.h5", "d.npz", "d.mat"):
        with pytest.raises(OSError, match="disk full"):
            save(small, tmp_path / name, overwrite=True)
    monkeypatch.undo()
    for name in ("d.h5", "d.npz", "d.mat"):
        e = load(tmp_path / name)
        assert len(e) == 5
        np.testing.assert_allclose(e.atoms, old.atoms, rtol=1e-6)
    assert not list(tmp_path.glob(".*tmp"))


def test_killed_writer_process_leaves_the_old_file(tmp_path, small):
    target = tmp_path / "big.h5"
    old = Dictionary(small.atoms[:5], small.params[:5])
    save(old, target)
    ready = tmp_path / "ready"
    # the child writes a 40 MB dictionary and is killed before the rename (blocked in fsync)
    script = textwrap.dedent(f"""
        import os, time, numpy as np
        from mrflight.dictionary import Dictionary, save
        def stall(fd):
            open({str(ready)!r}, "w").close()
            time.sleep(60)
        os.fsync = stall
        m = 20000
        d = Dictionary(np.ones((m, 250), np.complex64), np.ones((m, 2)))
        save(d, {str(target)!r}, overwrite=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not ready.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the writer never reached its fsync"
        tmp_files = list(tmp_path.glob(".big.h5.*"))
        assert tmp_files and tmp_files[0].stat().st_size > 10_000_000  # it was mid-write
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    e = load(target)
    assert len(e) == 5
    np.testing.assert_array_equal(e.atoms, old.atoms)


def test_a_cache_file_another_process_stored_meanwhile_is_kept(tmp_path, seq, monkeypatch):
    """Two processes building one cache entry: the second to finish keeps the first's file
    (the same dictionary) instead of replacing it under its readers; a damaged file is still
    replaced (test_corrupt_cache_is_detected_warned_and_rebuilt)."""
    p = regular_grid(50, 2000, 4, 10, 300, 4)
    first = generate(seq, p, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.glob("*.h5")
    inode, before = path.stat().st_ino, path.read_bytes()
    # the second process looked before the first had stored: it found no cache
    monkeypatch.setattr(md.generation, "load_cached", lambda *a: None)
    monkeypatch.setattr(Path, "exists", lambda self: False if self == path else
                        os.path.lexists(self))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could not write the cache" warning either
        second = generate(seq, p, cache_dir=tmp_path, progress=False)
    monkeypatch.undo()
    np.testing.assert_array_equal(first.atoms, second.atoms)
    assert path.stat().st_ino == inode and path.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [path]  # no temporary file left
