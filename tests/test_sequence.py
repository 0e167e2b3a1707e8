"""Pulse-train builders, schedule files and the Hydra sequence configs."""

from __future__ import annotations

import glob
import os
import warnings

import numpy as np
import pytest

from mrflight.fileio import save_mat
from mrflight.physics import Sequence, jiang2015, oksuz2019, simulate
from mrflight.sequence_files import from_file

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "mrflight", "configs")


def test_oksuz2019_default():
    seq = oksuz2019()
    assert len(seq) == 1750 and seq.name == "oksuz2019"
    assert np.all(seq.tr_ms == 4.3) and np.all(seq.phase_deg == 0)
    assert seq.inversion and seq.inversion_efficiency == 1.0
    # 5-70 degrees: smallest value just above the 5 deg floor, the 70 deg peak reached
    assert 5.0 <= seq.flip_angle_deg.min() < 5.5
    assert 69.9 < seq.flip_angle_deg.max() <= 70.0
    # 7 lobes of 250 pulses with the documented peaks
    peaks = seq.flip_angle_deg.reshape(7, 250).max(axis=1)
    assert np.allclose(peaks, [60, 35, 70, 45, 25, 55, 40], atol=0.01)
    assert seq.te_ms < seq.tr_ms.min()


def test_oksuz2019_options_and_errors():
    seq = oksuz2019(n_pulses=300, tr_ms=5.0, lobe_length=100, lobe_peaks_deg=(20.0,))
    assert len(seq) == 300 and np.all(seq.tr_ms == 5.0)
    assert np.allclose(seq.flip_angle_deg[:100], seq.flip_angle_deg[100:200])
    with pytest.raises(ValueError):
        oksuz2019(n_pulses=0)
    with pytest.raises(ValueError):
        oksuz2019(lobe_peaks_deg=(2.0,))


def test_jiang2015():
    seq = jiang2015()
    assert len(seq) == 1000
    assert np.isclose(seq.tr_ms.min(), 11.67003, atol=1e-4)
    assert np.isclose(seq.tr_ms.max(), 14.33035, atol=1e-4)
    assert np.isclose(seq.tr_ms.sum(), 13129, atol=1.0)  # 13.129 s
    assert int((seq.flip_angle_deg == 0).sum()) == 40
    assert np.all(seq.flip_angle_deg[199:209] == 0) and np.all(seq.flip_angle_deg[828:839] == 0)
    assert seq.te_ms == 1.908 and seq.ti_ms == 18.0 and seq.inversion
    assert 69.0 < seq.flip_angle_deg.max() <= 70.0


def test_shipped_jiang_equals_shared(shared_data):
    ref = np.genfromtxt(os.path.join(shared_data, "jiang2015_fisp_schedule.csv"), delimiter=",",
                        names=True)
    seq = jiang2015()
    assert np.array_equal(seq.flip_angle_deg, ref["flip_angle_deg"])
    assert np.array_equal(seq.tr_ms, ref["tr_ms"])
    assert np.array_equal(seq.phase_deg, ref["phase_deg"])
    assert seq.te_ms == float(ref["te_ms"][0])


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "data", "*_schedule.csv"))))
def test_every_shared_schedule_loads(path, shared_data):
    table = np.genfromtxt(path, delimiter=",", names=True)
    te = table["te_ms"][np.isfinite(table["te_ms"])]
    if te.size and te.min() != te.max():  # one TE per train: a varying column must be refused
        with pytest.raises(ValueError, match="te_ms varies"):
            from_file(path, tr_ms=12.0)
        seq = from_file(path, tr_ms=12.0, te_ms=float(te[0]))
    else:
        seq = from_file(path, tr_ms=12.0)
    assert len(seq) == len(table)
    assert np.array_equal(seq.flip_angle_deg, table["flip_angle_deg"])
    tr = table["tr_ms"]
    assert np.array_equal(seq.tr_ms, np.where(np.isnan(tr), 12.0, tr))
    assert np.array_equal(seq.phase_deg, np.nan_to_num(table["phase_deg"]))
    x = simulate(seq, [900.0, 1500.0], [60.0, 100.0])
    assert np.isfinite(x.abs().numpy()).all() and float(x.abs().max()) > 1e-3


def _train(n=50):
    rng = np.random.default_rng(1)
    return (rng.uniform(5, 70, n), rng.choice([0.0, 180.0], n), rng.uniform(8, 12, n),
            np.full(n, 2.5))


def _check(seq, fa, ph, tr, te=2.5):
    assert np.array_equal(seq.flip_angle_deg, fa)
    assert np.array_equal(seq.phase_deg, ph)
    assert np.array_equal(seq.tr_ms, tr)
    assert seq.te_ms == te


@pytest.mark.parametrize("header", [True, False])
def test_from_file_csv_txt(tmp_path, header):
    fa, ph, tr, te = _train()
    table = np.column_stack([fa, ph, tr, te])
    csv = tmp_path / "s.csv"
    np.savetxt(csv, table, delimiter=",", fmt="%.17g",
               header="flip_angle_deg,phase_deg,tr_ms,te_ms" if header else "", comments="")
    _check(from_file(csv), fa, ph, tr)
    txt = tmp_path / "s.txt"
    np.savetxt(txt, table, fmt="%.17g")
    seq = from_file(txt, ti_ms=30.0, inversion_efficiency=0.8, name="mine")
    _check(seq, fa, ph, tr)
    assert seq.ti_ms == 30.0 and seq.inversion_efficiency == 0.8 and seq.name == "mine"
    # flip angles only: TR must be given
    one = tmp_path / "fa.txt"
    np.savetxt(one, fa, fmt="%.17g")
    with pytest.raises(ValueError, match="tr_ms"):
        from_file(one)
    _check(from_file(one, tr_ms=7.0, te_ms=2.5), fa, np.zeros(50), np.full(50, 7.0))


def test_from_file_npy(tmp_path):
    fa, ph, tr, te = _train()
    p = tmp_path / "s.npy"
    np.save(p, np.column_stack([fa, ph, tr, te]))
    _check(from_file(p), fa, ph, tr)
    np.save(p, fa)
    assert np.array_equal(from_file(p, tr_ms=9.0).flip_angle_deg, fa)
    np.save(p, np.zeros((3, 3, 3)))
    with pytest.raises(ValueError):
        from_file(p, tr_ms=9.0)
    # 2 or 3 unnamed columns are ambiguous (phase or TR?), as in a text file without a header
    np.save(p, np.column_stack([fa, tr, np.full_like(fa, te)]))
    with pytest.raises(ValueError, match="3 columns, which a .npy cannot name"):
        from_file(p)
    np.save(p, fa * (1 + 1j))
    with pytest.raises(ValueError, match="expected real numbers"):
        from_file(p, tr_ms=9.0)


@pytest.mark.parametrize("v73", [False, True])
def test_from_file_mat(tmp_path, v73):
    fa, ph, tr, _ = _train()
    p = tmp_path / f"s{int(v73)}.mat"
    save_mat(p, {"FA": fa, "PH": ph, "TR": tr, "TE": np.array(2.5)}, v73=v73)
    _check(from_file(p), fa, ph, tr)
    save_mat(p, {"something": fa}, v73=v73)
    with pytest.raises(ValueError, match="flip"):
        from_file(p, tr_ms=9.0)


@pytest.mark.parametrize("v73", [False, True])
def test_from_file_mat_reads_a_train_inside_a_struct(tmp_path, v73):
    """imr-framework keeps its train as the fields of a struct (``method.VariableFlip``, ...),
    the names the aliases list: they are found there as at top level."""
    fa, ph, tr, _ = _train()
    p = tmp_path / f"m{int(v73)}.mat"
    save_mat(p, {"method": {"VariableFlip": fa, "VariablePhase": ph, "VariableTR": tr,
                            "VariableTE": np.full(50, 2.5)}}, v73=v73)
    _check(from_file(p), fa, ph, tr)
    save_mat(p, {"a": {"FA": fa, "TR": tr}, "b": {"FA": fa, "TR": tr}}, v73=v73)
    with pytest.raises(ValueError, match="each hold a flip-angle"):
        from_file(p)


@pytest.mark.parametrize("change, slip", [
    ({"flip_angle_deg": "rad"}, "radians"),
    ({"phase_deg": "rad"}, "every RF phase is within 3.142 degrees"),
    ({"tr_ms": 0.0043, "te_ms": 0.002}, "the longest TR is 0.0043 ms"),
    ({"ti_ms": 0.02}, "TI is 0.02 ms"),
])
def test_a_train_in_radians_or_seconds_is_warned_about(change, slip):
    """Flip angles in radians (57x too small), TR or TI in seconds (1000x too short) would be
    simulated without a word; a train whose numbers are impossible in degrees and ms warns."""
    base = oksuz2019(n_pulses=100)
    args = {"flip_angle_deg": base.flip_angle_deg, "phase_deg": 0.0, "tr_ms": 4.3,
            "te_ms": 2.0, "ti_ms": 20.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the train in degrees and ms is silent
        Sequence(**args)
        Sequence(base.flip_angle_deg, 180.0 * (np.arange(100) % 2), 4.3, 2.0, ti_ms=0.0)
    for k, v in change.items():
        args[k] = v
    if change.get("flip_angle_deg") == "rad":
        args["flip_angle_deg"] = np.deg2rad(base.flip_angle_deg)
    if change.get("phase_deg") == "rad":
        args["phase_deg"] = np.pi * (np.arange(100) % 2)
    with pytest.warns(UserWarning, match=slip):
        Sequence(**args)


def test_a_tr_in_seconds_under_the_default_te_is_named_in_the_error(tmp_path):
    """TR in seconds with the default TE of 2 ms failed as 'te_ms=2.0 is longer than the
    shortest TR 0.005' before the seconds warning was reached: the error names the slip."""
    p = tmp_path / "s.csv"
    p.write_text("FA,TR\n10,0.005\n20,0.005\n")
    with pytest.raises(ValueError, match=r"shortest TR 0.005 \(TR in seconds\? TR and TE"):
        from_file(p)
    with pytest.raises(ValueError, match=r"shortest TR 1.0$"):
        Sequence([10.0, 20.0], 0.0, 1.0, 2.0)


def test_a_train_in_radians_is_warned_about_once_not_again_by_the_simulator():
    """The simulator's check of the train (changed in place?) repeated the constructor's
    warning, pointing into mrflight's own code."""
    with pytest.warns(UserWarning, match="radians") as record:
        seq = Sequence(np.deg2rad(np.linspace(10, 60, 50)), 0.0, 5.0, 2.0)
        simulate(seq, [800.0, 1200.0], [60.0, 90.0])
    assert len([w for w in record if "radians" in str(w.message)]) == 1
    seq.flip_angle_deg[:] = np.deg2rad(np.linspace(10, 70, 50))  # changed in place: checked
    with pytest.warns(UserWarning, match="radians"):
        simulate(seq, 800.0, 60.0)


def test_bad_files_raise(tmp_path):
    cases = {
        "empty.csv": "",
        "comments.csv": "# nothing here\n\n",
        "header_only.csv": "flip_angle_deg,tr_ms\n",
        "ragged.csv": "10,5\n20\n30,5\n",
        "text.csv": "10,5\nabc,5\n",
        "nan.csv": "flip_angle_deg,tr_ms\n10,5\n,5\n",
    }
    for name, text in cases.items():
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(ValueError):
            from_file(p, tr_ms=5.0)
    with pytest.raises(ValueError, match="does not exist"):
        from_file(tmp_path / "missing.csv")
    (tmp_path / "x.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="unsupported"):
        from_file(tmp_path / "x.json")


def test_a_header_name_not_understood_is_refused(tmp_path):
    """A misnamed column (``rf_phase_deg``, ``tr_s``) was left out without a word: the train
    ran with phase 0 (or the ``tr_ms`` given) instead of the file's values."""
    p = tmp_path / "s.csv"
    p.write_text("flip_angle_deg,rf_phase_deg,tr_ms\n10,0,5\n20,180,5\n")
    with pytest.raises(ValueError, match="'rf_phase_deg' not understood; name the columns"):
        from_file(p)
    p.write_text("FA,TR_s\n10,0.005\n20,0.005\n")
    with pytest.raises(ValueError, match="'TR_s' not understood"):
        from_file(p, tr_ms=5.0)
    p.write_text("FA,PH,TR,\n10,0,5,\n20,180,5,\n")  # a trailing comma: an unnamed column
    assert np.array_equal(from_file(p).phase_deg, [0.0, 180.0])


def test_quoted_header_names_are_read_as_the_names(tmp_path):
    """A header written with quotes (a spreadsheet's or pandas' CSV export) is understood."""
    p = tmp_path / "s.csv"
    p.write_text('"FA","PH",\'TR\'\n10,0,5\n20,180,5\n')
    s = from_file(p)
    assert np.array_equal(s.phase_deg, [0.0, 180.0]) and np.array_equal(s.tr_ms, [5.0, 5.0])


def test_sequence_validation_and_roundtrip():
    with pytest.raises(ValueError, match="tr_ms"):
        Sequence([10.0, 20.0], 0.0, [5.0, -1.0])
    with pytest.raises(ValueError, match="phase_deg"):
        Sequence([10.0, 20.0], [0.0], 5.0)
    with pytest.raises(ValueError, match="flip_angle_deg"):
        Sequence([], 0.0, 5.0)
    with pytest.raises(ValueError, match="te_ms"):
        Sequence([10.0], 0.0, 5.0, te_ms=6.0)
    with pytest.raises(ValueError, match="inversion_efficiency"):
        Sequence([10.0], 0.0, 5.0, inversion_efficiency=1.5)
    seq = jiang2015()
    back = Sequence.from_dict(seq.to_dict())
    assert back == seq and back.fingerprint() == seq.fingerprint()
    other = Sequence.from_dict({**seq.to_dict(), "ti_ms": 19.0})
    assert other != seq


@pytest.mark.parametrize("name", ["oksuz2019", "jiang2015", "from_file"])
def test_hydra_sequence_configs(name, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(os.path.join(CONFIGS, "sequence", f"{name}.yaml"))
    if name == "from_file":
        fa, ph, tr, te = _train()
        p = tmp_path / "s.csv"
        np.savetxt(p, np.column_stack([fa, ph, tr, te]), delimiter=",", fmt="%.17g")
        cfg.path = str(p)
        seq = instantiate(cfg)
        _check(seq, fa, ph, tr)
    else:
        seq = instantiate(cfg)
        assert seq == {"oksuz2019": oksuz2019, "jiang2015": jiang2015}[name]()
    assert isinstance(seq, Sequence)


def test_a_sequence_keeps_its_own_arrays_and_checks_a_train_changed_in_place():
    fa = np.linspace(10, 60, 50)
    seq = Sequence(fa, tr_ms=10.0)
    fa *= 0.8  # the caller's array: not the sequence's
    assert seq == Sequence(np.linspace(10, 60, 50), tr_ms=10.0)
    seq.flip_angle_deg[0] = np.nan  # its own, changed in place: checked before simulating
    with pytest.raises(ValueError, match="changed since it was made.*flip_angle_deg contains NaN"):
        simulate(seq, 800.0, 60.0)
    seq = oksuz2019(n_pulses=100)
    seq.tr_ms[:] = -1.0
    with pytest.raises(ValueError, match="tr_ms must be positive"):
        simulate(seq, 800.0, 60.0)
    with pytest.raises(ValueError, match="zero for every pulse"):
        Sequence(np.zeros(20))
    with pytest.raises(ValueError, match="n_pulses must be a positive integer, got 100.5"):
        oksuz2019(n_pulses=100.5)
    with pytest.raises(ValueError, match="tol must be a number in"):
        simulate(oksuz2019(n_pulses=100), 800.0, 60.0, tol="1e-3")
