"""The benchmark suite's shared helpers and smoke runs of its scripts on tiny sizes."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import eval_threads  # noqa: E402
import export_speed  # noqa: E402
import inference_speed  # noqa: E402
import match_kernels_speed  # noqa: E402
import training_speed  # noqa: E402


def test_timeit_is_the_median_after_warmup():
    calls = []
    delays = iter([0.0, 0.05, 0.001, 0.001, 0.05, 0.001])  # first is the warm-up

    def fn():
        calls.append(1)
        time.sleep(next(delays))

    t = common.timeit(fn, repeats=5, warmup=1)
    assert len(calls) == 6
    assert 0.0009 < t < 0.02  # the median ignores the two slow outliers
    with pytest.raises(ValueError, match="repeats"):
        common.timeit(fn, repeats=0)


def test_timeit_budget_stops_early():
    calls = []
    common.timeit(lambda: (calls.append(1), time.sleep(0.02)), repeats=100, warmup=0,
                  budget_s=0.05)
    assert 1 <= len(calls) <= 5


def test_markdown_table_and_rates():
    text = common.markdown_table(["a", "b"], [[1, "x|y"], [2.5, None]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | x/y |", "| 2.5 | None |"]
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        common.markdown_table(["a", "b"], [[1]])
    assert common.fmt_rate(1234567.8) == "1,234,568"
    assert common.fmt_rate(12.345) == "12.3"
    assert common.fmt_rate(None) == "n/a"
    assert common.fmt_rate(float("nan")) == "n/a"


def test_machine_line_and_gemm_rate():
    line = common.machine_line()
    assert f"{torch.get_num_threads()} threads" in line and "cores" in line
    assert common.cpu_model()
    rate = common.gemm_gflops(256, repeats=2)
    assert 0.1 < rate < 1e6  # GFLOP/s of any CPU made this century


def test_write_result_is_atomic_and_creates_folder(tmp_path):
    p = common.write_result(tmp_path / "sub" / "r.md", "hello\n")
    assert p.read_text() == "hello\n"
    assert [q.name for q in p.parent.iterdir()] == ["r.md"]


def test_flops_per_signal_counts_what_the_nets_compute():
    # the paper's GRU, hidden 100, 35 steps of 50 values: 3 gates x (50 + 100) x 100 x 2 per step
    # + fc
    gru = inference_speed.default_net("gru", rank=0, head_sizes=[], values_per_step=50)
    assert inference_speed.flops_per_signal(gru) == 35 * 2 * 3 * 100 * 150 + 2 * 100 * 2
    # the default: 18 steps of 100 values, + the projection on the rank-48 basis and back, + the
    # read-out layers (the last state, the noise level and the 48 coordinates of this one-channel
    # net: 149 inputs)
    head = 2 * ((101 + 48) * 256 + 256 * 256 + 256 * 2)
    gru = inference_speed.default_net("gru")
    assert inference_speed.flops_per_signal(gru) == (
        18 * 2 * 3 * 100 * 200 + 2 * 2 * 1750 * 48 + head)
    lstm = inference_speed.default_net("lstm")
    assert inference_speed.flops_per_signal(lstm) == (
        18 * 2 * 4 * 100 * 200 + 2 * 2 * 1750 * 48 + head)
    ann = inference_speed.default_net("ann")
    assert inference_speed.flops_per_signal(ann) == 2 * (1750 * 300 + 300 * 300 + 300 * 2)


def test_time_to_accuracy_from_a_run_dir(tmp_path):
    run = tmp_path / "run"
    (run / "csv").mkdir(parents=True)
    rows = ["epoch,step,val/t1_mae_ms,test/t1_mae_ms,test/t2_mae_ms"]
    for e, v in enumerate([300.0, 120.0, 60.0, 54.0, 51.0, 50.0]):
        rows.append(f"{e},{e * 10},{v},,")
        rows.append(f"{e},{e * 10 + 5},,,")
    rows.append("5,60,,50.5,15.1")
    (run / "csv" / "metrics.csv").write_text("\n".join(rows) + "\n")
    (run / "train.log").write_text(
        "[2026-11-25 19:15:46,889][lightning][INFO] - GPU available: False, used: False\n"
        "[2026-11-25 19:21:46,889][lightning][INFO] - `Trainer.fit` stopped: max_epochs\n")
    t = training_speed.time_to_accuracy(run)
    assert t["epoch"] == 3 and t["epochs"] == 6  # 54 <= 1.1 x 50 = 55, 60 is not
    assert t["fit_s"] == pytest.approx(360.0)
    assert t["wall_s"] == pytest.approx(360.0 * 4 / 6)
    assert t["test/t1_mae_ms"] == 50.5
    assert training_speed.time_to_accuracy(run / "csv" / "metrics.csv")["epoch"] == 3
    with pytest.raises(ValueError, match="run-dir"):
        training_speed.time_to_accuracy(tmp_path / "nowhere")
    line = training_speed.tta_line({"tta": None, "run_dir": None})
    assert "n/a (pass --run-dir)" in line


def test_inference_and_training_scripts_run_on_tiny_sizes(tmp_path):
    inf = inference_speed.measure(models=("gru", "ann"), batch_sizes=(8,), threads=(1,),
                                  latency_calls=3, repeats=1, input_length=100, predict_n=16)
    assert [r["model"] for r in inf["rows"]] == ["gru", "ann"]
    for r in inf["rows"]:
        assert r["best_rate"] > 0 and r["latency_ms"] > 0 and 0 < r["fraction"]
    text = inference_speed.report(inf)
    assert "| GRU |" in text and "1 thr, batch 8" in text
    tr = training_speed.measure(models=("ann",), steps=2, batch_size=8, input_length=100)
    assert tr["rows"][0]["samples_per_s"] > 0 and tr["threads"] == 1
    assert "n/a (pass --run-dir)" in training_speed.report(tr)
    assert "`python benchmarks/training_speed.py --models ann`" in training_speed.report(tr)


def test_inference_speed_report_names_the_command_that_made_it(tmp_path):
    """The README's `inference_speed.py --models gru --batch-sizes ... --threads 2` runs wrote
    'Command: `python benchmarks/inference_speed.py`', without the options they were run with."""
    argv = ["--models", "ann", "--batch-sizes", "8", "--threads", "1", "--latency-calls", "2",
            "--repeats", "1", "--input-length", "100", "--out", str(tmp_path / "inf.md")]
    text = inference_speed.main(argv)
    assert f"Command: `python benchmarks/inference_speed.py {' '.join(argv)}`" in text


def test_summary_rows_apply_the_targets():
    import run_all

    match = {"n": 100, "m": 1000, "t_len": 300, "rank": 25,
             "rows": [("gemm", 1.0, None), ("exhaustive", 1.4, 1.0), ("svd", 0.1, 0.99),
                      ("loop", 50.0, None)]}
    rows = run_all.summary_rows(None, match, None, None, None)
    status = {r[1].split(",")[0]: r[-1] for r in rows}
    assert status["exhaustive"] == "met"  # 1.4x floor <= 1.5x
    assert status["SVD rank 25"] == "met"  # 14x faster
    match["rows"][1] = ("exhaustive", 1.6, 1.0)
    rows = run_all.summary_rows(None, match, None, None, None)
    assert {r[1].split(",")[0]: r[-1] for r in rows}["exhaustive"] == "NOT met"


@pytest.mark.slow
def test_run_all_quick_writes_one_summary(tmp_path):
    import run_all

    out = tmp_path / "summary.md"
    text = run_all.main(["--quick", "--out", str(out)])
    written = out.read_text()
    assert written.startswith(text)
    for area in ("| EPG |", "| matching |", "| inference |", "| training |", "| memory |"):
        assert area in text
    assert "n/a (pass --run-dir)" in text
    assert "## Inference speed" in written  # each section's own table follows the summary


def test_export_and_eval_thread_scripts_run_on_tiny_sizes():
    rows = export_speed.measure(("ann",), n=32, repeats=1, input_length=100)
    assert rows[0]["ort"] > 0 and rows[0]["torch"] > 0 and rows[0]["max_rel_diff"] < 1e-4
    parts = eval_threads._parts(200, 20, 4, n_pulses=70)
    assert set(parts) == {"exhaustive matching", "SVD matching (rank 25)", "Cramér–Rao bound",
                          "GRU predict_parameters"}
    for fn in parts.values():
        fn()


def test_bayes_floor_posterior_mean_is_near_the_bound_on_a_coarse_grid(monkeypatch, tmp_path):
    import bayes_floor

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bayes_floor, "publish", lambda name, text: text)
    text = bayes_floor.main(["--smoke", "--efficiency", "3", "--log", "--median", "--tissues",
                             "5", "--mle"])
    assert "Efficiency grid" in text and "Largest tissue-median errors" in text
    tissue_part = text.split("Largest tissue-median errors")[1]
    assert "| maximum likelihood" in tissue_part and "oracle" not in tissue_part
    for name in ("| posterior mean", "| exp of the posterior mean of log", "| posterior median",
                 "| maximum likelihood (matching + fit)", "| fit started at the truth"):
        row = next(line for line in text.splitlines() if line.startswith(name))
        t1_ratio, t2_ratio = float(row.split("|")[3]), float(row.split("|")[5])
        # a coarse grid and 200 pulses: not efficient, but a posterior mean, not noise
        assert 0.3 < t1_ratio < 3 and 0.3 < t2_ratio < 3


def test_fit_speed_smoke_counts_the_simulations(monkeypatch):
    import fit_speed

    import mrflight.physics.fit as fitmod

    jac = fitmod.simulate_jacobian
    monkeypatch.setattr(fit_speed, "publish", lambda name, text: text)
    text = fit_speed.main(["--smoke"])
    assert fitmod.simulate_jacobian is jac  # the counter is taken out again
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 0.0025")]
    assert [r[2].strip() for r in rows] == ["start", "fit, max_iter 2", "fit, max_iter 5"]
    sims = [float(r[3]) for r in rows[1:]]
    # one simulation at the start and at most one per iteration
    assert 1 < sims[0] <= 3 and sims[0] <= sims[1] <= 6
    assert all(np.isfinite(float(r[c])) for r in rows for c in (4, 5, 6, 7))


def test_bayes_floor_log_estimator_is_the_geometric_posterior_mean():
    """exp(E[log p]) <= E[p] for every signal and parameter (Jensen), both agree with a
    weighted average computed here from the same atoms' likelihoods, and the posterior median
    lies in the cell of their weighted median."""
    import bayes_floor
    import numpy as np

    from mrflight import efficiency as eff
    from mrflight.physics import oksuz2019, simulate

    seq = oksuz2019(n_pulses=100, lobe_length=20)
    grid = bayes_floor.prior_grid(8, 7, 3)
    pm = bayes_floor.PosteriorMean(seq, grid, rank=10, sigma=0.02)
    p = torch.tensor([[900.0, 80.0, 1.1], [300.0, 30.0, 0.9]], dtype=torch.float64)
    y = eff._measure(simulate(seq, p[:, 0], p[:, 1], p[:, 2], dtype=torch.float64), np.ones(1),
                     0.02, 0)
    mean, geo = pm(y), pm(y, stat="log")
    assert np.all(geo <= mean * (1 + 1e-9)) and np.all(geo > 0)
    yp = (y.to(torch.complex128) @ pm.basis.conj()).to(torch.complex64)
    ll = (yp @ pm.atoms.mH).abs().to(torch.float64) ** 2 / (2 * pm.sigma2)
    w = torch.softmax(ll, dim=1)
    np.testing.assert_allclose(mean, (w @ pm.grid).numpy(), rtol=1e-5)
    np.testing.assert_allclose(geo, (w @ pm.grid.log()).exp().numpy(), rtol=1e-5)
    # the posterior median lies in the cell of the discrete weighted median of each marginal
    # (at noise 0.3 the posteriors spread over many atoms)
    pm = bayes_floor.PosteriorMean(seq, grid, rank=10, sigma=0.3)
    p = torch.tensor([[900.0, 80.0, 1.1], [300.0, 30.0, 0.9], [2000.0, 200.0, 1.0]],
                     dtype=torch.float64)
    y = eff._measure(simulate(seq, p[:, 0], p[:, 1], p[:, 2], dtype=torch.float64), np.ones(1),
                     0.3, 1)
    yp = (y.to(torch.complex128) @ pm.basis.conj()).to(torch.complex64)
    w = torch.softmax((yp @ pm.atoms.mH).abs().to(torch.float64) ** 2 / (2 * pm.sigma2), dim=1)
    assert (w.max(1).values < 0.5).all()
    med = pm(y, stat="median")
    for j in range(3):
        values = np.unique(grid[:, j])
        mass = np.array([w[:, grid[:, j] == v].sum(1).numpy() for v in values]).T
        lv = np.log(values)
        edges = np.concatenate([[1.5 * lv[0] - 0.5 * lv[1]], (lv[1:] + lv[:-1]) / 2,
                                [1.5 * lv[-1] - 0.5 * lv[-2]]])
        for r in range(len(y)):
            u = int(np.argmax(np.cumsum(mass[r]) >= 0.5))
            assert edges[u] - 1e-9 <= np.log(med[r, j]) <= edges[u + 1] + 1e-9
    with pytest.raises(ValueError, match="stat"):
        pm(y, stat="mode")


def test_match_kernels_speed_counts_pairs_on_tiny_sizes():
    """The candidate-search benchmark on the CPU (torch reference): signals keep at least their
    best atom, and looser precisions keep at least as many on average."""
    r = match_kernels_speed.measure(20, 7, False, 1e-6, "cpu", repeats=1, grid_step=400,
                                    pulses=60)
    assert r["m"] == len(range(0, 114650, 400)) and r["n"] == 20
    means = [x["per_signal"][0] for x in r["rows"]]
    assert means[0] >= 1
    assert means == sorted(means)  # ieee, tf32x3, tf32: growing margins
    assert "| ieee |" in match_kernels_speed.report(r, smoke=False)


def test_maps_accuracy_runs_the_maps_command_on_a_scan_with_known_truth(tmp_path, capsys):
    """benchmarks/maps_accuracy.py: the scan, the README's maps command (here with a dictionary
    of the scan's own tissues, so its maps are exact but for noise), the per-tissue table."""
    import maps_accuracy

    from mrflight import dictionary
    from mrflight.phantoms import brain_phantom
    from mrflight.physics import Sequence

    seq = Sequence(10 + 50 * np.abs(np.sin(np.linspace(0, 3, 120))), tr_ms=8.0, te_ms=2.0,
                   name="short")
    ph = brain_phantom(16)
    tissues = np.unique(np.stack([ph.t1_ms[ph.mask], ph.t2_ms[ph.mask]], 1), axis=0)
    b1 = np.round(np.arange(0.8, 1.2 + 1e-9, 0.01), 2)
    params = np.array([(a, b, c) for a, b in tissues for c in b1])
    dictionary.generate(seq, params[:, :2], b1=params[:, 2]).save(tmp_path / "dict.h5")
    maps_accuracy.main(["--dictionary", str(tmp_path / "dict.h5"), "--size", "16",
                        "--slices", "2", "--noise", "0.001", "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert "| white matter |" in out and "| CSF |" in out
    assert "affine and voxel grid as the input's: yes" in out
    assert (tmp_path / "run" / "maps" / "scan_T1map.nii.gz").is_file()
    row = next(line for line in out.splitlines() if line.startswith("| grey matter"))
    t1_median = float(row.split("|")[4].split()[0])
    assert abs(t1_median) < 0.5  # % of the truth: the dictionary holds the tissue's values
