"""eval.py's evaluation (mrflight.evaluation through pipeline.evaluate) on tiny checkpoints: every
output file with finite values, rows computed (not copied), checkpoint discovery, the run's own
test split held out of the matching dictionary, no import cycle between evaluation and maps."""

import csv
import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from omegaconf import open_dict

from mrflight.checkpoints import find_checkpoints
from mrflight.evaluation import EvalSettings
from mrflight.pipeline import compose_config, evaluate, train

FAST = ["evaluation.n_test=40", "evaluation.bound_signals=6", "evaluation.latency_repeats=3",
        "evaluation.tissue_voxels=100",
        "evaluation.noise_levels=[0.01,0.02]", "evaluation.svd_rank=10"]


def _cfg(overrides, out, name):
    cfg = compose_config(overrides, output_dir=out, config_name=name)
    with open_dict(cfg):
        cfg.paths.cache_dir = None
    return cfg


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A multirun-like folder with one tiny trained ANN run (100 pulses, 600 atoms, 1 epoch)."""
    root = tmp_path_factory.mktemp("multirun")
    cfg = _cfg(["debug=tiny", "model=ann", "logger=none", "trainer.max_epochs=1"],
               root / "0", "train")
    train(cfg)
    return root


def _rows(out):
    return json.loads((out / "metrics.json").read_text())["rows"]


def test_eval_writes_every_output_with_finite_values(tiny_run, tmp_path):
    out = tmp_path / "eval"
    rows = evaluate(_cfg([f"ckpt_path={tiny_run}", "evaluation.phantom_size=32", *FAST],
                         out, "eval"))
    assert rows == _rows(out)
    methods = {r["method"] for r in rows}
    assert methods == {"ann", "matching", "matching_svd", "crb"}
    keys = {(r["test_set"], r["noise_std"]) for r in rows}
    assert keys == {(s, n) for s in ("paper", "offgrid") for n in (0.01, 0.02)}
    for r in rows:
        for q in ("t1_mae_ms", "t1_rmse_ms", "t2_mae_ms", "t2_rmse_ms", "t1_rmse_over_crb",
                  "t2_rmse_over_crb"):
            assert np.isfinite(r[q]) and r[q] > 0, (r["method"], q)
        assert r["t1_rmse_ms"] >= r["t1_mae_ms"] * 0.999
        if r["method"] != "crb":
            assert r["ms_per_signal"] > 0 and r["latency_ms_mean"] > 0
            assert r["latency_ms_std"] >= 0 and r["latency_repeats"] == 3
    # the bound scales with the noise
    crb = {(r["test_set"], r["noise_std"]): r["t1_rmse_ms"] for r in rows if r["method"] == "crb"}
    assert crb[("paper", 0.02)] == pytest.approx(2 * crb[("paper", 0.01)], rel=1e-6)
    # every file
    for name in ("table.md", "table.csv"):
        assert (out / name).stat().st_size > 0
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert figs == sorted(["scatter_paper_noise0.01.png", "scatter_offgrid_noise0.01.png",
                           "error_vs_t1_t2_paper_noise0.01.png",
                           "error_vs_t1_t2_offgrid_noise0.01.png",
                           "phantom_brain.png", "phantom_nist.png",
                           "efficiency_oksuz2019.png"])
    for name in ("brain", "nist"):
        z = np.load(out / "phantoms" / f"{name}.npz")
        mask = z["mask"]
        assert "ms" in str(z["units"])
        for key in ("ann_0_t1_ms", "matching_t2_ms", "matching_svd_t1_ms"):
            assert np.isfinite(z[key][mask]).all() and np.isnan(z[key][~mask]).all()
    assert not list(out.rglob("*.tmp"))
    # the bound reports: the network and (T1, T2, B1) dictionary matching against the bound
    from mrflight.evaluation.methods import B1_MATCHING

    metrics = json.loads((out / "metrics.json").read_text())
    off = {r["method"]: r for r in metrics["offgrid_b1"]}
    assert set(off) == {"ann [0]", B1_MATCHING, "crb"}
    for q in ("t1", "t2", "b1"):  # matching on a fine grid: near the bound, never below it
        assert 0.9 < off[B1_MATCHING][f"{q}_rmse_over_crb"] < 4, (q, off[B1_MATCHING])
    assert {r["method"] for r in metrics["efficiency_summary"]} == {"ann [0]", B1_MATCHING}
    assert {r["method"] for r in metrics["robustness"]} >= {"ann [0]", B1_MATCHING}
    tissue = [r for r in metrics["robustness"] if r["condition"] == "tissue_pd"]
    assert tissue and all(r["voxels"] == 100 and r["noise_std"] == 0.01 for r in tissue)
    # the table: our rows computed from metrics.json, the paper's rows marked as reference
    md = (out / "table.md").read_text()
    ann = next(r for r in rows if r["method"] == "ann" and r["test_set"] == "paper")
    assert f"{ann['t1_mae_ms']:.2f}" in md
    assert "GRU (reference) | 101.81 | 103.25 | 58.91 | 73.66 | 14" in md
    mine = [r for r in tissue if r["method"] == "ann [0]"]
    w1, w2 = (max(abs(r[f"{q}_median_error_pct"]) for r in mine) for q in ("t1", "t2"))
    assert f"| ANN (DRONE) [0] | {w1:.2f} | {w2:.2f} |" in md  # the largest tissue median errors
    # the robustness table says at which noise each kind of method is tested
    assert ("a method without a training noise (matching) as if trained at 0.01: at 0.005 and "
            "0.02") in md
    with open(out / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert sum(r["source"].endswith("(reference)") for r in table) == 5
    assert sum(r["source"] == "mrflight" for r in table) == len(rows)


def test_rows_are_computed_not_copied(tiny_run, tmp_path):
    ckpt = find_checkpoints(tiny_run)[0]
    run2 = tmp_path / "perturbed"
    shutil.copytree(ckpt.parent.parent, run2)
    ck2 = run2 / "checkpoints" / ckpt.name
    state = torch.load(ck2, map_location="cpu", weights_only=False)
    gen = torch.Generator().manual_seed(0)
    for k, v in state["state_dict"].items():
        if v.is_floating_point() and k.startswith("net."):
            state["state_dict"][k] = v + 0.2 * torch.randn(v.shape, generator=gen)
    torch.save(state, ck2)
    small = [*FAST, "evaluation.phantoms=[]", "evaluation.plots=false",
             "evaluation.test_sets=[paper]", "evaluation.bound=false"]
    a = _rows_of(evaluate(_cfg([f"ckpt_path={ckpt}", *small], tmp_path / "a", "eval")))
    b = _rows_of(evaluate(_cfg([f"ckpt_path={ck2}", *small], tmp_path / "b", "eval")))
    # same test signals and noise for every method: matching is identical, the network is not
    for key in a:
        if key[0] == "ann":
            assert a[key]["t1_mae_ms"] != pytest.approx(b[key]["t1_mae_ms"], rel=1e-3)
        else:
            assert a[key]["t1_mae_ms"] == b[key]["t1_mae_ms"]
            assert a[key]["t2_rmse_ms"] == b[key]["t2_rmse_ms"]


def test_fit_adds_each_estimator_refined_by_the_likelihood(tiny_run, tmp_path):
    """evaluation.fit=true: every estimator of the bound reports also followed by the
    maximum-likelihood fit (its arithmetic is tested in test_fit.py)."""
    from mrflight.evaluation.methods import B1_MATCHING, FIT_SUFFIX

    small = [*FAST, "evaluation.phantoms=[]", "evaluation.plots=false",
             "evaluation.test_sets=[paper]", "evaluation.bound=false", "evaluation.fit=true",
             "evaluation.efficiency_realizations=4", "evaluation.offgrid_b1_signals=300",
             "evaluation.tissue_voxels=20"]
    out = tmp_path / "fit"
    evaluate(_cfg([f"ckpt_path={tiny_run}", *small], out, "eval"))
    metrics = json.loads((out / "metrics.json").read_text())
    names = {"ann [0]", B1_MATCHING}
    names |= {n + FIT_SUFFIX for n in names}
    assert {r["method"] for r in metrics["efficiency_summary"]} == names
    assert {r["method"] for r in metrics["robustness"]} == names
    off = {r["method"]: r for r in metrics["offgrid_b1"]}
    assert set(off) == names | {"crb"}
    fitted, matched = off[B1_MATCHING + FIT_SUFFIX], off[B1_MATCHING]
    for q in ("t1", "t2", "b1"):  # computed from the fitted estimates, not the start's
        assert np.isfinite(fitted[f"{q}_rmse_over_crb"]) and fitted[f"{q}_rmse_over_crb"] > 0
        assert fitted[f"{q}_rmse_ms" if q != "b1" else "b1_rmse_pct"] != matched[
            f"{q}_rmse_ms" if q != "b1" else "b1_rmse_pct"]
    with pytest.raises(ValueError, match="fit_iterations"):
        EvalSettings(fit_iterations=0)


def test_a_fitted_method_starts_from_the_same_calls_estimates():
    """NAME and then NAME + fit on the same signals estimate once; new signals, again."""
    from mrflight.evaluation.methods import _Remembered

    calls = []
    est = _Remembered(lambda s: calls.append(len(s)) or np.asarray(s) * 2)
    x, y = torch.ones(3), torch.ones(3)
    assert est(x) is est(x) and calls == [3]
    est(y)
    assert calls == [3, 3]


def _rows_of(rows):
    return {(r["method"], r["test_set"], r["noise_std"]): r for r in rows}


def test_a_network_is_evaluated_on_its_own_sequence_when_the_schedule_file_changed(tmp_path,
                                                                                 caplog):
    """A run trained with sequence=from_file: the sequence stored in its checkpoint is the one
    evaluated, with one warning naming the file, when the file is edited or moved since."""
    import logging

    sched = tmp_path / "sched.csv"
    fa = 5 + 40 * np.abs(np.sin(np.arange(100) / 12))
    np.savetxt(sched, np.c_[fa, np.full(100, 5.0)], delimiter=",",
               header="flip_angle_deg,tr_ms", comments="")
    cfg = _cfg(["debug=tiny", "model=ann", "logger=none", "trainer.max_epochs=1", "test=false"],
               tmp_path / "runs" / "a", "train")
    with open_dict(cfg):
        cfg.sequence = {"_target_": "mrflight.sequence_files.from_file", "path": str(sched)}
    train(cfg)
    shutil.copytree(tmp_path / "runs" / "a", tmp_path / "runs" / "b")  # a sweep of two runs
    small = [*FAST, "evaluation.phantoms=[]", "evaluation.plots=false", "evaluation.bound=false",
             "evaluation.test_sets=[paper]", "evaluation.noise_levels=[0.01]",
             "evaluation.efficiency=false", "evaluation.offgrid_b1=false",
             "evaluation.robustness=false", f"ckpt_path={tmp_path / 'runs'}"]

    def errors(out):
        rows = evaluate(_cfg(small, tmp_path / out, "eval"))
        return {(r["method"], r["run"]): (r["t1_mae_ms"], r["t2_rmse_ms"]) for r in rows}

    caplog.set_level(logging.WARNING, logger="mrflight")
    before = errors("e0")
    assert {("ann", "a"), ("ann", "b"), ("matching", "")} <= set(before)
    assert "sched.csv" not in caplog.text
    np.savetxt(sched, np.c_[fa / 2, np.full(100, 5.0)], delimiter=",",
               header="flip_angle_deg,tr_ms", comments="")  # flip angles halved after training
    caplog.clear()
    assert errors("e1") == before
    warned = [r.getMessage() for r in caplog.records if str(sched) in r.getMessage()]
    assert len(warned) == 1 and "flip_angle_deg" in warned[0], caplog.text  # once per sweep
    sched.rename(tmp_path / "moved.csv")
    caplog.clear()
    assert errors("e2") == before
    warned = [r.getMessage() for r in caplog.records if str(sched) in r.getMessage()]
    assert len(warned) == 1 and "does not exist" in warned[0], caplog.text


def test_failed_estimates_are_not_dropped_from_the_errors():
    """A method that returns NaN on its hardest signals must not get smaller errors than
    on all of them: its errors and RMSE/bound ratios become NaN, with the count."""
    from mrflight.evaluation.methods import errors
    from mrflight.evaluation.protocol import _Bound

    rng = np.random.default_rng(0)
    true = rng.uniform(100, 1000, (50, 2))
    pred = true + rng.normal(0, 10, (50, 2))
    pred[:5] += 500.0  # five bad estimates
    full = errors(pred, true)
    assert full["n_nonfinite"] == 0
    np.testing.assert_allclose(full["t1_mae_ms"], np.abs(pred - true)[:, 0].mean())
    np.testing.assert_allclose(full["t2_rmse_ms"], np.sqrt(((pred - true)[:, 1] ** 2).mean()))
    failed = pred.copy()
    failed[:5, 0] = np.nan  # the same method failing there instead
    e = errors(failed, true)
    assert e["n_nonfinite"] == 5
    assert all(np.isnan(e[k]) for k in ("t1_mae_ms", "t1_rmse_ms", "t2_mae_ms", "t2_rmse_ms"))
    b = _Bound(np.arange(50), np.ones((50, 2)), 10.0)
    assert np.isfinite(b.ratio(pred, true, 0)) and np.isnan(b.ratio(failed, true, 0))


def test_no_checkpoint_evaluates_matching_and_bound(tmp_path):
    out = tmp_path / "nockpt"
    rows = evaluate(_cfg(["sequence.n_pulses=100", "sequence.lobe_length=20", *FAST,
                          "evaluation.phantoms=[nist]", "evaluation.phantom_size=32",
                          "evaluation.grid={_target_:mrflight.dictionary.regular_grid,"
                          "n_t1:40,n_t2:30}"],
                         out, "eval"))
    assert {r["method"] for r in rows} == {"matching", "matching_svd", "crb"}
    by = _rows_of(rows)
    # more noise, larger error (same test atoms)
    for m in ("matching", "matching_svd"):
        assert by[(m, "paper", 0.02)]["t1_rmse_ms"] > by[(m, "paper", 0.01)]["t1_rmse_ms"]
    assert (out / "phantoms" / "nist.npz").is_file()
    assert (out / "figures" / "phantom_nist.png").is_file()


def test_eval_grid_holds_its_test_atoms_out_of_the_matching_dictionary():
    from mrflight.evaluation import Group, build_group_data
    from mrflight.physics import oksuz2019

    s = EvalSettings(n_test=30, grid={"_target_": "mrflight.dictionary.regular_grid",
                                      "n_t1": 20, "n_t2": 20})
    g = Group(oksuz2019(n_pulses=50, lobe_length=10), "k", [])
    build_group_data(g, None, s, None)
    test = {tuple(p) for p in g.test["paper"][0]}
    dic = {tuple(p) for p in g.dictionary_params.numpy()}
    assert len(test) == 30 and not (test & dic)
    assert len(dic) == g.description["dictionary_atoms"] and g.description["held_out_atoms"] == 30
    off = g.test["offgrid"][0]
    assert len(off) == 30 and (off[:, 1] <= off[:, 0]).all()


def test_checkpoint_evaluation_holds_out_the_runs_own_test_split(tiny_run):
    """The test atoms of a checkpoint's evaluation are exactly the test split its data module
    made in training (reproduced from the run's saved data config), none of them in the
    matching dictionary."""
    from mrflight.config import instantiate
    from mrflight.evaluation import build_group_data, checkpoint_groups

    ckpts = find_checkpoints(tiny_run)
    settings = EvalSettings(n_test=1000, phantoms=[])  # more than the split: all of it
    (g,) = checkpoint_groups(ckpts, tiny_run, settings, lambda: None)
    assert g.data_cfg is not None and [r.ckpt for r in g.runs] == ckpts
    build_group_data(g, g.data_cfg, settings, None)
    # the data module of the training run, built from the training config (not the saved one)
    cfg = _cfg(["debug=tiny", "model=ann", "logger=none", "trainer.max_epochs=1"],
               tiny_run / "0", "train")
    dm = instantiate(cfg.data, sequence=instantiate(cfg.sequence), progress=False)
    dm.setup("test")
    split = dm.test_set.params_ms.numpy()
    test = g.test["paper"][0]
    assert len(split) == 100
    assert sorted(map(tuple, test.astype(np.float32))) == sorted(map(tuple, split))
    dic = {tuple(p) for p in g.dictionary_params.numpy()}
    assert not ({tuple(p) for p in test} & dic)
    assert len(dic) == 600 - len(split)


def test_evaluation_and_maps_do_not_import_each_other():
    """Module-level imports over mrflight/: no import cycle anywhere, and mrflight.evaluation*
    and mrflight.maps* do not import each other."""
    import ast
    from pathlib import Path

    import mrflight

    root = Path(mrflight.__file__).parent
    graph = {}
    for f in root.rglob("*.py"):
        parts = f.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.parse(f.read_text()).body:  # module level only
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d.startswith("mrflight")}

    def family(name):
        for fam in ("mrflight.evaluation", "mrflight.maps"):
            if name == fam or name.startswith(fam + "."):
                return fam
        return None

    def reachable(start):
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d in graph and d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    for name in graph:  # no module of the package is in an import cycle (the README's Layout)
        assert name not in reachable(name), (name, "is in an import cycle")
        fam = family(name)
        if fam is None:
            continue
        other = {"mrflight.evaluation": "mrflight.maps", "mrflight.maps": "mrflight.evaluation"}
        reach = reachable(name)
        assert not any(family(d) == other[fam] for d in reach), (name, "imports", other[fam])
        assert name not in reach, (name, "is in an import cycle")
    # the package's modules each import only what they need: not Hydra configs
    assert not any("mrflight.eval_entry" in graph[n] for n in graph if family(n))


def test_find_checkpoints(tiny_run, tmp_path):
    """eval.py, maps and export find checkpoints only through mrflight.checkpoints (tested in
    tests/test_checkpoints.py)."""
    import mrflight.evaluation
    import mrflight.maps

    assert not hasattr(mrflight.evaluation, "find_checkpoints")
    assert not hasattr(mrflight.maps, "find_checkpoints")
    found = find_checkpoints(tiny_run)
    assert found == [tiny_run / "0" / "checkpoints" / "epoch_000.ckpt"]
    assert find_checkpoints(found[0]) == found
    with pytest.raises(ValueError, match="no such"):
        find_checkpoints(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.ckpt").write_bytes(b"x")  # not a run: never loaded
    with pytest.raises(ValueError, match="no checkpoint in .* loads"):
        find_checkpoints(tmp_path / "junk")


def test_settings_validation():
    with pytest.raises(ValueError, match="noise_levels"):
        EvalSettings(noise_levels=[])
    with pytest.raises(ValueError, match="noise_levels"):
        EvalSettings(noise_levels=[-0.1])
    with pytest.raises(ValueError, match="test_sets"):
        EvalSettings(test_sets=["train"])
    with pytest.raises(ValueError, match="latency_repeats"):
        EvalSettings(latency_repeats=1)
    with pytest.raises(ValueError, match="evaluation.batch_size must be an integer >= 1"):
        EvalSettings(batch_size=0)
    assert EvalSettings(noise_levels=[0.005, 0.01, 0.02]).plot_noise_std == 0.01
    # one value, as the command line gives it (evaluation.noise_levels=0.01): a list of one
    one = EvalSettings(noise_levels=0.01, test_sets="paper", phantoms="brain")
    assert (one.noise_levels, one.test_sets, one.phantoms) == ([0.01], ["paper"], ["brain"])


def test_table_states_threads_and_machine_load(tmp_path):
    from mrflight.evaluation.tables import table_md

    info = {"threads": 1, "cores": 2, "latency_repeats": 3, "device": "cpu",
            "load_average_start": [3.5, 2.0, 1.0], "load_average_end": [1.2, 1.0, 1.0]}
    text = table_md([], info)
    assert "(1 threads); machine load (1-min load average) 3.50 at the start and 1.20 at the " \
           "end, on 2 cores (more runnable threads than cores" in text
    # measured default (benchmarks/eval_threads.py): one thread
    assert compose_config(output_dir=tmp_path, config_name="eval").threads == 1


def test_runs_of_a_sweep_over_training_settings_share_one_group():
    """A sweep over the training noise (or batch size, loader workers) has one test split: one
    group, so matching and the bound are evaluated once, not once per run with the same rows."""
    from mrflight.evaluation.testdata import data_key
    from mrflight.physics import oksuz2019

    seq = oksuz2019(n_pulses=100)
    run = {"_target_": "mrflight.data.FingerprintDataModule", "params": {"n": 600},
           "split_seed": 0, "n_test": 100, "noise_std": 0.005, "batch_size": 32}
    other = {**run, "noise_std": 0.02, "batch_size": 64, "num_workers": 2}
    assert data_key(seq, run, 0) == data_key(seq, other, 0)
    assert data_key(seq, run, 0) != data_key(seq, {**run, "split_seed": 1}, 0)
    assert data_key(seq, run, 0) != data_key(oksuz2019(n_pulses=120), run, 0)
    sim = {"_target_": "mrflight.data.SimulatedDataModule", "noise_std": [0.005, 0.03]}
    assert data_key(seq, sim, 0) == data_key(seq, {**sim, "noise_std": 0.01}, 0)


def test_efficiency_reports_are_the_errors_of_estimators_of_known_error():
    """The bias (estimate - truth: its sign), std, RMSE, their ratios to the bound (std over
    the std bound, not variances) and B1 in % of the three bound reports, for estimators whose
    errors are set here, against sums written out and the bound from crb() itself."""
    from mrflight import efficiency as eff
    from mrflight.evaluation.protocol import _Bound
    from mrflight.physics import crb, oksuz2019

    seq = oksuz2019(n_pulses=100, lobe_length=20)
    approx = lambda v: pytest.approx(v, rel=1e-9, abs=1e-12)  # noqa: E731
    # efficiency_report: k draws per point, the estimate truth + bias + spread * z
    pts = np.array([[800.0, 60.0, 1.0], [1500.0, 150.0, 0.9]])
    k = 6
    z = np.array([-1.5, -0.5, 0.0, 0.5, 1.0, 0.5])
    z -= z.mean()
    bias, spread = np.array([30.0, -4.0, 0.02]), np.array([10.0, 2.0, 0.01])

    def known(signals):
        assert len(signals) == len(pts) * k  # the points' draws, in order
        return np.repeat(pts, k, axis=0) + bias + np.tile(z, len(pts))[:, None] * spread

    rows = eff.efficiency_report(seq, {"known": known}, pts, noise_std=0.01, n_realizations=k)
    bound = crb(seq, pts[:, 0], pts[:, 1], 0.01, b1=pts[:, 2], estimate_b1=True,
                phase_nuisance=True).numpy()
    assert len(rows) == len(pts)
    for g, r in enumerate(rows):
        for j, q in enumerate(("t1", "t2", "b1")):
            e = bias[j] + z * spread[j]
            std, rmse = spread[j] * z.std(ddof=1), np.sqrt(np.mean(e ** 2))
            assert r[f"{q}_bias"] == approx(bias[j]) and r[f"{q}_std"] == approx(std)
            assert r[f"{q}_rmse"] == approx(rmse)
            assert r[f"{q}_crb"] == pytest.approx(bound[g, j], rel=1e-6)
            assert r[f"{q}_std_over_crb"] == pytest.approx(std / bound[g, j], rel=1e-6)
            assert r[f"{q}_rmse_over_crb"] == pytest.approx(rmse / bound[g, j], rel=1e-6)
    # offgrid_report: every signal off by off * w (MAE |off| mean|w|, RMSE |off| rms(w)),
    # against the RMS of the per-signal bound at the noise relative to its proton density
    n = 12
    params, pd = eff.offgrid_params(n, seed=0)
    w = np.linspace(-1.0, 2.0, n)
    off = np.array([20.0, -5.0, 0.03])
    rows = eff.offgrid_report(seq, {"known": lambda s: params + w[:, None] * off}, n=n,
                              noise_std=0.01, seed=0)
    b = crb(seq, params[:, 0], params[:, 1], 1.0, b1=params[:, 2], estimate_b1=True,
            phase_nuisance=True).numpy() * (0.01 / pd)[:, None]
    assert np.isfinite(b).all()
    rms_bound = np.sqrt(np.mean(b ** 2, axis=0))
    mine, bound_row = rows
    assert mine["method"] == "known" and bound_row["method"] == "crb"
    for j, (q, unit, f) in enumerate((("t1", "ms", 1.0), ("t2", "ms", 1.0), ("b1", "pct", 100.0))):
        rmse = abs(off[j]) * np.sqrt(np.mean(w ** 2))
        assert mine[f"{q}_mae_{unit}"] == approx(f * abs(off[j]) * np.mean(np.abs(w)))
        assert mine[f"{q}_rmse_{unit}"] == approx(f * rmse)
        assert mine[f"{q}_rmse_over_crb"] == pytest.approx(rmse / rms_bound[j], rel=1e-6)
        assert bound_row[f"{q}_rmse_{unit}"] == pytest.approx(f * rms_bound[j], rel=1e-6)
    # robustness_report: T1 10 % high, T2 5 % low everywhere; B1 0.1 high
    n, voxels = 16, 4
    rng = np.random.default_rng(0)  # the report's tissues: drawn as it draws them
    t1 = rng.uniform(100.0, 4000.0, n)
    t2 = rng.uniform(10.0, np.minimum(t1, 500.0))
    tissues = {"wm": {"t1_ms": 800.0, "t2_ms": 70.0}, "csf": {"t1_ms": 3000.0, "t2_ms": 400.0}}
    tis = np.array([[800.0, 70.0], [3000.0, 400.0]])

    def biased(signals):
        truth = np.stack([t1, t2], 1) if len(signals) == n else np.repeat(tis, voxels, axis=0)
        return np.concatenate([truth * [1.1, 0.95], np.full((len(truth), 1), 9.0)], 1)

    rows = eff.robustness_report(seq, {"biased": biased}, {"biased": (0.01, 0.02)}, tissues,
                                 n=n, pd_values=(1.0,), voxels=voxels)
    cond = {r["condition"]: r for r in rows if r["condition"] != "tissue_pd"}
    assert set(cond) == {"noise_low", "noise_high", "b1_0.8", "b1_1.2"}
    for r in cond.values():
        assert r["t1_bias_pct"] == approx(10.0) and r["t2_bias_pct"] == approx(-5.0)
        assert r["t1_rmse_ms"] == approx(np.sqrt(np.mean((0.1 * t1) ** 2)))
        assert r["t2_rmse_ms"] == approx(np.sqrt(np.mean((0.05 * t2) ** 2)))
        assert r["b1_rmse_pct"] == approx(100 * abs(9.0 - r["b1"]))
    tissue = [r for r in rows if r["condition"] == "tissue_pd"]
    assert [r["tissue"] for r in tissue] == ["wm", "csf"]
    for r in tissue:
        assert r["t1_median_error_pct"] == approx(10.0)
        assert r["t2_median_error_pct"] == approx(-5.0)
    # eval.py's RMSE/bound: RMSE over the RMS bound, on the finite bound rows, not variances
    unit = np.array([[1.0, 2.0], [3.0, 4.0], [np.inf, 1.0], [2.0, 2.0]])
    true = np.zeros((4, 2))
    pred = np.array([[5.0, 1.0], [-15.0, 2.0], [1e6, 3.0], [30.0, -4.0]])
    ratio = _Bound(np.arange(4), unit, 10.0).ratio(pred, true, 0)
    expect = np.sqrt(np.mean([25.0, 225.0, 900.0])) / np.sqrt(np.mean([100.0, 900.0, 400.0]))
    assert ratio == approx(expect) and abs(expect - 1) > 0.05


class _ConstantNet:
    """A stand-in for a trained network: T1 1000 ms, T2 80 ms (B1 1) for every fingerprint."""

    hparams = {"noise_std": 0.01}

    def __init__(self, targets=("t1", "t2")):
        self.targets = targets

    def predict_parameters(self, signals, batch_size=None):
        out = torch.tensor([[1000.0, 80.0, 1.0][:len(self.targets)]])
        return out.expand(len(signals), -1).clone()


def _tiny_settings(**kw):
    return EvalSettings(**{
        "n_test": 30, "noise_levels": [0.01], "test_sets": ["paper"], "latency_repeats": 2,
        "phantoms": [], "svd_rank": None, "bound_signals": 5, "efficiency_realizations": 2,
        "offgrid_b1": False, "robustness": False, "matching_b1": False,
        "grid": {"_target_": "mrflight.dictionary.regular_grid", "n_t1": 20, "n_t2": 20},
        **kw})


def test_groups_of_one_evaluation_are_told_apart(tmp_path):
    """Runs on two sequences (or test splits) in one evaluation: each group's rows, matching,
    bound, figures and report rows say which group they are; nothing of the first group is
    replaced by the second's (W&B summary keys, the efficiency figure) or mixed into its
    table blocks."""
    from mrflight.evaluation import Run, matching_group
    from mrflight.evaluation import evaluate as run_evaluation
    from mrflight.evaluation.report import flat_metrics
    from mrflight.physics import oksuz2019

    s = _tiny_settings()
    groups = [matching_group(oksuz2019(n_pulses=n, lobe_length=10), s) for n in (50, 80)]
    for g, label in zip(groups, ("a", "b")):
        g.runs.append(Run(tmp_path / f"{label}.ckpt", None, _ConstantNet(), "gru", label))
    out = tmp_path / "eval"
    rows = run_evaluation(groups, s, out)
    assert [(r["group"], r["method"]) for r in rows] == [
        (g, m) for g in (0, 1) for m in ("gru", "matching", "crb")]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["group"] for r in metrics["rows"]] == [r["group"] for r in rows]
    assert [d["group"] for d in metrics["info"]["groups"]] == [0, 1]
    # table.md: one block per group, each with its own matching and bound rows
    md = (out / "table.md").read_text()
    blocks = md.split("## Group ")[1:]
    assert [b.split(",")[0] for b in blocks] == ["0", "1"]
    for g, block in enumerate(blocks):
        mine = {r["method"]: r for r in rows if r["group"] == g}
        assert f"| dictionary matching (exhaustive) | {mine['matching']['t1_mae_ms']:.2f} |" \
               in block
        assert (f"| Cramér–Rao bound (magnitude data, B1 = 1 known) | "
                f"{mine['crb']['t1_mae_ms']:.2f} |") in block
        assert block.count("dictionary matching (exhaustive)") == 1
    with open(out / "table.csv") as f:
        table = [r for r in csv.DictReader(f) if r["source"] == "mrflight"]
    assert [r["group"] for r in table] == ["0", "0", "0", "1", "1", "1"]
    # the W&B summary keeps every row's errors (the second group's used to replace the first's)
    flat = flat_metrics(rows)
    assert len(flat) == 4 * len(rows)
    assert flat["eval/paper/0.01/matching (group 0)/t1_rmse_ms"] == rows[1]["t1_rmse_ms"]
    # the bound reports: every row's group, one efficiency figure per group
    assert sorted(p.name for p in (out / "figures").glob("efficiency_*.png")) == [
        "efficiency_oksuz2019.png", "efficiency_oksuz2019_1.png"]
    assert {(r["method"], r["group"]) for r in metrics["efficiency_summary"]} == {
        ("gru [a]", 0), ("gru [b]", 1)}
    # named as in Table 1 (the keys of metrics.json stay lowercase)
    assert "| GRU [a] (group 0) | " in md and "| GRU [b] (group 1) | " in md
    # one group: no group labels
    one = run_evaluation(groups[:1], s, tmp_path / "one")
    assert "Group" not in (tmp_path / "one" / "table.md").read_text()
    assert "eval/paper/0.01/matching/t1_rmse_ms" in flat_metrics(one)


def test_jobs_of_a_sweep_that_did_not_finish_are_named(tiny_run, tmp_path, caplog):
    """A multirun with a failed job (no checkpoint), a job that failed after writing one and a
    job still training: the first is named as not evaluated, the others as evaluated from
    their best checkpoint so far, in the log, metrics.json and table.md; a finished run gets
    no note."""
    import logging

    from mrflight.hydra_callbacks import FAILED_FILE

    caplog.set_level(logging.WARNING, logger="mrflight")
    sweep = tmp_path / "sweep"
    run = find_checkpoints(tiny_run)[0].parent.parent
    for job in ("0", "2", "3"):
        shutil.copytree(run, sweep / job)
        (sweep / job / "train.log").write_text("")
    (sweep / "1").mkdir()
    (sweep / "1" / "train.log").write_text("")
    (sweep / "1" / FAILED_FILE).write_text(json.dumps({"error": "data.noise_std must be "
                                                       "finite", "overrides": []}))
    for job in ("2", "3"):
        (sweep / job / "metrics.json").unlink()
    (sweep / "3" / FAILED_FILE).write_text(json.dumps({"error": "loss is NaN"}))
    small = [*FAST, "evaluation.phantoms=[]", "evaluation.plots=false",
             "evaluation.test_sets=[paper]", "evaluation.bound=false",
             "evaluation.noise_levels=[0.01]", "evaluation.efficiency=false",
             "evaluation.offgrid_b1=false", "evaluation.robustness=false"]
    out = tmp_path / "eval"
    rows = evaluate(_cfg([f"ckpt_path={sweep}", *small], out, "eval"))
    assert sorted(r["run"] for r in rows if r["method"] == "ann") == ["0", "2", "3"]
    notes = json.loads((out / "metrics.json").read_text())["info"]["run_notes"]
    assert notes == [
        "run 1: not evaluated, the job failed (data.noise_std must be finite)",
        "run 2: not finished (no metrics.json: still training, or stopped); its best "
        "checkpoint so far is evaluated",
        "run 3: failed (loss is NaN); its best checkpoint before the failure is evaluated"]
    md = (out / "table.md").read_text()
    assert all(f"  - {n}" in md for n in notes)
    assert [r.getMessage() for r in caplog.records if "run " in r.getMessage()] == notes
    # one run given directly, and a finished one
    from mrflight.checkpoints import run_notes

    assert run_notes(sweep / "2") == [f"run {sweep / '2'}: " + notes[1].split(": ", 1)[1]]
    assert run_notes(sweep / "0") == [] and run_notes(find_checkpoints(sweep / "0")[0]) == []


_SMALL = [*FAST, "evaluation.phantoms=[]", "evaluation.plots=false",
          "evaluation.test_sets=[paper]", "evaluation.bound=false",
          "evaluation.noise_levels=[0.01]", "evaluation.efficiency=false",
          "evaluation.offgrid_b1=false", "evaluation.robustness=false"]


def _damaged_sweep(run, sweep, kinds):
    """Copies of ``run`` as jobs 0, 1 ... of ``sweep``, each checkpoint damaged as ``kinds``
    says: ``ok``, ``truncated`` (every file), ``nan`` (a NaN weight), ``foreign`` (a network
    that is not mrflight's), ``best_truncated`` and ``best_nan`` (only epoch_000.ckpt;
    last.ckpt loads)."""
    for job, kind in enumerate(kinds):
        d = shutil.copytree(run, sweep / str(job))
        for f in sorted((d / "checkpoints").glob("*.ckpt")):
            best = f.name == "epoch_000.ckpt"
            if kind == "truncated" or (kind == "best_truncated" and best):
                f.write_bytes(f.read_bytes()[:300])
            elif kind in ("nan", "foreign") or (kind == "best_nan" and best):
                ck = torch.load(f, weights_only=True)
                if kind in ("nan", "best_nan"):
                    next(v for v in ck["state_dict"].values() if v.is_floating_point())[0] = \
                        float("nan")
                else:
                    ck["hyper_parameters"]["net"] = {"_target_": "mypkg.Net"}
                torch.save(ck, f)


def test_a_checkpoint_of_a_sweep_that_does_not_load_is_named_not_dropped(tiny_run, tmp_path,
                                                                         caplog, monkeypatch):
    """A run whose checkpoint is found but does not load (truncated, NaN weights, a network
    that is not mrflight's) is named with the file and why, like a job that did not finish:
    in the log, at the top of table.md and in metrics.json; the other runs are evaluated (a
    truncated file was only a warning on stderr and its row silently missing; a NaN or a
    foreign network stopped the whole evaluation). A run whose best checkpoint does not load
    is evaluated from the best that does, and says so."""
    import logging

    caplog.set_level(logging.WARNING, logger="mrflight")
    sweep = tmp_path / "sweep"
    run = find_checkpoints(tiny_run)[0].parent.parent
    _damaged_sweep(run, sweep, ["ok", "truncated", "nan", "foreign", "best_truncated",
                                "best_nan"])
    out = tmp_path / "eval"
    from mrflight.evaluation import runs as eval_runs

    fell_back, fallbacks = [], eval_runs._fallbacks

    def recorded(ck, unloadable):
        fell_back.append(ck.parent.parent.name)
        return fallbacks(ck, unloadable)

    monkeypatch.setattr(eval_runs, "_fallbacks", recorded)
    rows = evaluate(_cfg([f"ckpt_path={sweep}", *_SMALL], out, "eval"))
    # a run's other checkpoints are read only where its best did not load as a network
    assert fell_back == ["2", "3", "5"]
    assert sorted(r["run"] for r in rows if r["method"] == "ann") == ["0", "4", "5"]
    info = json.loads((out / "metrics.json").read_text())["info"]
    assert [r["checkpoint"] for r in info["runs"]] == [
        str(sweep / "0" / "checkpoints" / "epoch_000.ckpt"),
        str(sweep / "4" / "checkpoints" / "last.ckpt"),
        str(sweep / "5" / "checkpoints" / "last.ckpt")]
    notes = info["run_notes"]
    assert len(notes) == 5 and all("\n" not in n for n in notes), notes
    truncated = ("is not a readable mrflight checkpoint (RuntimeError: PytorchStreamReader "
                 "failed reading zip archive: failed finding central directory); is it "
                 "truncated (a full disk or a killed copy), or from another program?")
    assert notes[0] == (
        f"run 1: not evaluated, 2 checkpoints do not load: checkpoints/epoch_000.ckpt "
        f"(checkpoint '{sweep}/1/checkpoints/epoch_000.ckpt' {truncated}); "
        f"checkpoints/last.ckpt (checkpoint '{sweep}/1/checkpoints/last.ckpt' {truncated}); "
        "fix that and evaluate the run again")
    diverged = ("has NaN or infinite weights (net.net.1.weight): its training diverged; use a "
                "checkpoint of an earlier epoch, or train again with a lower module.lr")
    # the best does not load as a network: the next in rank order is tried (here as bad)
    assert notes[1] == (
        f"run 2: not evaluated, 2 checkpoints do not load: checkpoints/epoch_000.ckpt "
        f"(checkpoint '{sweep}/2/checkpoints/epoch_000.ckpt' {diverged}); "
        f"checkpoints/last.ckpt (checkpoint '{sweep}/2/checkpoints/last.ckpt' {diverged}); "
        "fix that and evaluate the run again")
    assert notes[2].startswith("run 3: not evaluated, 2 checkpoints do not load: "
                               "checkpoints/epoch_000.ckpt (network 'mypkg.Net' is not an "
                               "mrflight regressor: ")
    assert "eval.py trust=[mypkg.Net]" in notes[2]
    assert notes[3] == (
        f"run 4: checkpoints/epoch_000.ckpt does not load (checkpoint "
        f"'{sweep}/4/checkpoints/epoch_000.ckpt' {truncated}); checkpoints/last.ckpt, its best "
        "checkpoint that loads, is evaluated instead")
    assert notes[4] == (
        f"run 5: checkpoints/epoch_000.ckpt does not load (checkpoint "
        f"'{sweep}/5/checkpoints/epoch_000.ckpt' {diverged}); checkpoints/last.ckpt, its best "
        "checkpoint that loads, is evaluated instead")
    md = (out / "table.md").read_text()
    assert all(f"  - {n}\n" in md for n in notes)
    assert md.index("  - run 1: not evaluated") < md.index("## Test set")
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("run ")] == notes


def test_an_evaluation_none_of_whose_checkpoints_loads_names_each_and_writes_nothing(
        tiny_run, tmp_path):
    """Every checkpoint of a sweep fails to load: one error naming each run, its files and why;
    the output folder keeps what it held (an earlier table.md) and gets no metrics.json."""
    sweep = tmp_path / "sweep"
    run = find_checkpoints(tiny_run)[0].parent.parent
    _damaged_sweep(run, sweep, ["truncated", "nan"])
    out = tmp_path / "eval"
    out.mkdir()
    (out / "table.md").write_text("an earlier table\n")
    with pytest.raises(ValueError) as err:
        evaluate(_cfg([f"ckpt_path={sweep}", *_SMALL], out, "eval"))
    msg = str(err.value)
    assert msg.startswith(f"ckpt_path={sweep}: no checkpoint under {sweep} loads: run 0: not "
                          "evaluated, 2 checkpoints do not load: checkpoints/epoch_000.ckpt ("), msg
    # the best has NaN weights, and so has the next one tried (last.ckpt)
    assert (f"; run 1: not evaluated, 2 checkpoints do not load: checkpoints/epoch_000.ckpt "
            f"(checkpoint '{sweep}/1/checkpoints/epoch_000.ckpt' has NaN or infinite weights"
            ) in msg, msg
    assert f"checkpoints/last.ckpt (checkpoint '{sweep}/1/checkpoints/last.ckpt' has NaN" in msg
    assert (out / "table.md").read_text() == "an earlier table\n"
    assert sorted(f.name for f in out.iterdir()) == ["table.md"]
    # the files of every run fail to be read: find_checkpoints names each (it did not)
    # (one error, not a warning per run saying the same first)
    _damaged_sweep(run, tmp_path / "again", ["truncated", "truncated"])
    with warnings.catch_warnings(), pytest.raises(
            ValueError, match=r"no run under .* has a checkpoint that loads: run 0: "
            r"not evaluated, .*; run 1: not evaluated, 2 checkpoints do not load: "
            r"checkpoints/epoch_000.ckpt"):
        warnings.simplefilter("error")
        find_checkpoints(tmp_path / "again")


def test_table_says_which_bound_its_ratios_are_against(tmp_path):
    """Table 1's RMSE/CRB holds every method of a block to one bound, with B1 known (B1 = 1):
    its bound row says so, and a network that estimates B1 (which cannot reach it) is named."""
    from mrflight.evaluation import Run, matching_group
    from mrflight.evaluation import evaluate as run_evaluation
    from mrflight.physics import crb, oksuz2019

    s = _tiny_settings(efficiency=False)
    g = matching_group(oksuz2019(n_pulses=50, lobe_length=10), s)
    g.runs += [Run(tmp_path / "a.ckpt", None, _ConstantNet(("t1", "t2", "b1")), "gru", "a"),
               Run(tmp_path / "b.ckpt", None, _ConstantNet(), "ann", "b")]
    rows = run_evaluation([g], s, tmp_path / "eval")
    (bound,) = [r for r in rows if r["method"] == "crb"]
    assert bound["bound"] == "magnitude data, B1 = 1 known"
    md = (tmp_path / "eval" / "table.md").read_text()
    assert "| Cramér–Rao bound (magnitude data, B1 = 1 known) |" in md
    assert ("- GRU [a] estimates B1 as well, so it is held to a bound with B1 known" in md
            and "ANN (DRONE) [b] estimate" not in md)
    # the bound of the row is the one with B1 known: below the bound with B1 unknown in T2
    params = g.test["paper"][0]
    sel = np.sort(np.random.default_rng(s.noise_seed + 1000).choice(len(params), 5, False))
    t1, t2 = torch.from_numpy(params[sel, 0]), torch.from_numpy(params[sel, 1])
    known = crb(g.seq, t1, t2, 0.01, magnitude=True).numpy()
    unknown = crb(g.seq, t1, t2, 0.01, magnitude=True, estimate_b1=True).numpy()
    assert bound["t2_rmse_ms"] == pytest.approx(np.sqrt(np.mean(known[:, 1] ** 2)), rel=1e-6)
    assert np.sqrt(np.mean(unknown[:, 1] ** 2)) > 1.05 * bound["t2_rmse_ms"]


def test_table_says_which_run_of_a_sweep_each_row_is(tiny_run, tmp_path):
    """The rows of a sweep are named by their job folder (ANN [0], ANN [1]): table.md and
    metrics.json say what each was trained with (its training noise and the overrides the
    runs do not share), read from the run's .hydra/overrides.yaml."""
    run = find_checkpoints(tiny_run)[0].parent.parent
    sweep = tmp_path / "sweep"
    for job, noise in (("0", 0.005), ("1", 0.02)):
        shutil.copytree(run, sweep / job)
        (sweep / job / ".hydra").mkdir(exist_ok=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(
            f"- debug=tiny\n- model=ann\n- data.noise_std={noise}\n")
    small = [*FAST, "evaluation.phantoms=[]", "evaluation.plots=false",
             "evaluation.test_sets=[paper]", "evaluation.bound=false",
             "evaluation.noise_levels=[0.01]", "evaluation.efficiency=false",
             "evaluation.offgrid_b1=false", "evaluation.robustness=false"]
    out = tmp_path / "eval"
    evaluate(_cfg([f"ckpt_path={sweep}", *small], out, "eval"))
    runs = json.loads((out / "metrics.json").read_text())["info"]["runs"]
    trained = torch.load(find_checkpoints(run)[0], weights_only=True)["hyper_parameters"]
    noise = trained["noise_std"]
    assert [(r["run"], r["overrides"][-1], r["training_noise_std"]) for r in runs] == [
        ("0", "data.noise_std=0.005", noise), ("1", "data.noise_std=0.02", noise)]
    md = (out / "table.md").read_text()
    assert f"  - ANN (DRONE) [0]: training noise {noise:g}; `data.noise_std=0.005`\n" in md
    assert f"  - ANN (DRONE) [1]: training noise {noise:g}; `data.noise_std=0.02`\n" in md


def test_an_evaluation_killed_while_writing_its_figures_can_be_run_again(tmp_path, monkeypatch):
    """``metrics.json`` marks a finished evaluation (a folder holding it is refused), so it is
    written last: killed while writing a figure, the folder holds no ``metrics.json`` and the
    same command writes it all (before, it looked finished and a rerun was refused)."""
    import matplotlib.pyplot as plt

    from mrflight import plots
    from mrflight.evaluation.report import write_outputs
    from mrflight.fileio import RUN_RESULTS, output_folder

    save = plots.save_figure

    def killed(fig, path):
        raise KeyboardInterrupt

    figures = {"scatter": plt.figure()}
    monkeypatch.setattr(plots, "save_figure", killed)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(tmp_path, [], {}, figures, {})
    assert not (tmp_path / "metrics.json").exists()
    output_folder(str(tmp_path), RUN_RESULTS)  # not refused: the rerun goes ahead
    monkeypatch.setattr(plots, "save_figure", save)
    files = write_outputs(tmp_path, [], {}, figures, {})
    assert {"metrics.json", "figures/scatter.png"} <= set(files)
    with pytest.raises(ValueError, match="metrics.json"):
        output_folder(str(tmp_path), RUN_RESULTS)
    plt.close("all")
