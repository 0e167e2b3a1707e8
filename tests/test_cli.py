"""The command lines: bad input ends with one readable line; a failed multirun job is reported.

Every case here fails before training starts (config composition or config checks), so each
subprocess takes a few seconds (mostly imports).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["debug=tiny", "logger=none", "~callbacks.rich_progress_bar",
        "++trainer.enable_progress_bar=false"]


def _run(script, args, tmp_path, **env_extra):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true",
               MRFLIGHT_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("MRFLIGHT_DEBUG", None)
    env.update(env_extra)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(r) -> str:
    """The run failed with exactly one ``error: ...`` line and no traceback."""
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "Error executing job" not in out, out[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert r.stderr.rstrip().splitlines()[-1] == errors[0]  # the last thing the user sees
    return errors[0]


@pytest.mark.parametrize("override,expect", [
    ("model=transformer", ["unknown model 'transformer'", "model=", "ann, cnn, gru, lstm"]),
    ("sequence=fisp9000", ["unknown sequence 'fisp9000'", "jiang2015", "oksuz2019"]),
    ("callbacks=[default,earlystopping]",  # an item of a list: Hydra names no options
     ["unknown callbacks option 'earlystopping'", "callbacks=", "early_stopping, ema"]),
    ("data.noise_std=-0.5", ["data.noise_std", ">= 0", "-0.5"]),
    ("data.batch_size=0", ["data.batch_size", "positive integer", "got 0"]),
    ("data.n_test=5000", ["data.n_test=5000", "only 600", "lower data.n_test"]),
    ("trainer.max_epochs=many", ["trainer.max_epochs", "integer"]),
    ("data.nosie_std=0.1", ["data.nosie_std"]),
])
def test_train_bad_input_exits_with_one_clear_line(tmp_path, override, expect):
    r = _run("train.py", [*TINY, override, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    line = _one_error_line(r)
    for piece in expect:
        assert piece in line, line
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()  # nothing trained


def test_debug_env_shows_the_traceback(tmp_path):
    r = _run("train.py", [*TINY, "data.batch_size=0", f"hydra.run.dir={tmp_path / 'run'}"],
             tmp_path, MRFLIGHT_DEBUG="1")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "ValueError: data.batch_size" in r.stderr


def test_eval_bad_input_exits_with_one_clear_line(tmp_path):
    r = _run("eval.py", ["sequence=fisp9000", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert "unknown sequence 'fisp9000'" in _one_error_line(r)
    r = _run("eval.py", ["ckpt_path=" + str(tmp_path / "missing.ckpt"),
                         f"hydra.run.dir={tmp_path / 'run2'}"], tmp_path)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]


def test_multirun_with_a_failing_job_finishes_the_others_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    r = _run("train.py", ["-m", *TINY, "trainer.max_epochs=1", "model=ann",
                          "data.noise_std=0.01,-1,0.02", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    # the good jobs ran to the end
    for job in ("0", "2"):
        assert (sweep / job / "metrics.json").is_file()
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert not (sweep / job / "FAILED.txt").exists()
    failed = json.loads((sweep / "1" / "FAILED.txt").read_text())
    assert "data.noise_std" in failed["error"] and "Traceback" in failed["traceback"]
    report = json.loads((sweep / "failures.json").read_text())
    assert report["n_failed"] == 1 and [f["job"] for f in report["failed"]] == ["1"]
    assert "data.noise_std=-1" in report["failed"][0]["overrides"]
    assert "1 job(s) of the multirun failed" in r.stderr and "data.noise_std=-1" in r.stderr


def test_multirun_without_failures_exits_zero_and_writes_an_empty_report(tmp_path):
    sweep = tmp_path / "sweep"
    r = _run("train.py", ["-m", *TINY, "model=ann", "trainer.max_epochs=1",
                          f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((sweep / "failures.json").read_text()) == {"n_failed": 0, "failed": []}


@pytest.mark.parametrize("args,expect", [
    (["optimized_metric=val/nope"], ["optimized_metric='val/nope'", "val/loss", "val/t1_mae_ms"]),
    (["ckpt_path=trunc.ckpt"], ["trunc.ckpt", "truncated"]),
])
def test_late_or_raw_errors_are_one_line_before_any_work(tmp_path, args, expect):
    import torch

    torch.save({"state_dict": {"w": torch.zeros(1000)}}, tmp_path / "whole.ckpt")
    (tmp_path / "trunc.ckpt").write_bytes((tmp_path / "whole.ckpt").read_bytes()[:500])
    r = _run("train.py", [*TINY, *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    line = _one_error_line(r)
    for piece in expect:
        assert piece in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training


@pytest.mark.parametrize("name,overrides,expect", [
    ("train", ["threads=-1"], "threads must be a positive integer .* got -1"),
    ("train", ["threads=0"], "threads must be a positive integer"),
    ("eval", ["threads=-1"], "threads must be a positive integer"),
    ("train", ["seed=abc"], "seed must be an integer .*got 'abc'"),
    ("train", ["seed=-1"], "seed must be an integer from 0 to 2\\*\\*32 - 1 .*got -1"),
    ("train", ["module.weight_decay=-0.1"], "module.weight_decay must be a number >= 0 .*-0.1"),
    ("train", ["module.bias_weight=0.5"], "module.bias_weight=0.5 .* one draw, so it does "
     "nothing: add data.realizations=K"),
    ("train", ["data=file"], "debug=tiny sets data.params .*data=paper or data=random"),
    ("train", ["data=file", "data.path=d.h5"], "debug=tiny sets data.params"),
    ("train", ["trainer.max_epochs=-1"], "T_max must be a positive number .*scheduler=null"),
    ("train", ["+trainer.accumulate_grad_batches=0"],
     "trainer.accumulate_grad_batches must be a positive integer .*got 0"),
    ("train", ["+trainer.limit_train_batches=0"], "trains nothing .*use train=false"),
    ("train", ["data=simulated"], "data.params and data.n_train .*not to data=simulated"),
])
def test_config_checks_name_the_setting(tmp_path, name, overrides, expect):
    from mrflight.pipeline import check_config, check_runtime, compose_config

    extra = ["debug=tiny"] if name == "train" else []
    cfg = compose_config([*extra, *overrides], output_dir=tmp_path, config_name=name)
    with pytest.raises(ValueError, match=expect):
        (check_config if name == "train" else check_runtime)(cfg)


@pytest.mark.parametrize("metric", ["test/loss", "test/t1_mae_ms", "test@0.01/t2_rmse_ms"])
def test_a_sweep_cannot_optimise_a_test_metric(tmp_path, metric):
    """Hyperparameters chosen on the test set would make its numbers optimistic."""
    from mrflight.pipeline import check_metric, compose_config

    cfg = compose_config(["debug=tiny", f"optimized_metric={metric}"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="test metric.*validation metric"):
        check_metric(cfg, None)
    check_metric(compose_config(["debug=tiny"], output_dir=tmp_path), None)  # val/loss


@pytest.mark.parametrize("overrides,expect", [
    (["callbacks=[default,early_stopping]", "callbacks.early_stopping.monitor=val/t1_mae"],
     r"callbacks.early_stopping.monitor='val/t1_mae' is not a metric this module logs while "
     r"training: choose one of .*val/t1_mae_ms"),
    (["callbacks.model_checkpoint.monitor=test/loss"],
     "callbacks.model_checkpoint.monitor='test/loss' is not a metric this module logs while"),
    (["+trainer.limit_val_batches=0"],
     "trainer.limit_val_batches=0 turns validation off, but optimized_metric=val/loss, "
     "callbacks.model_checkpoint.monitor=val/loss need it: add optimized_metric=null "
     "~callbacks.model_checkpoint, or validate"),
])
def test_monitored_metrics_are_checked_before_training(tmp_path, overrides, expect):
    """A callback monitoring a metric that is never logged stopped the run with Lightning's
    traceback after its first epoch (early stopping), and without validation the run trained
    and tested, then failed without its metrics.json (optimized_metric not logged)."""
    from mrflight.pipeline import check_metric, compose_config
    from mrflight.regressor import MRFRegressor

    module = MRFRegressor({"_target_": "mrflight.models.ANNRegressor", "input_length": 10,
                           "n_outputs": 2})
    cfg = compose_config(["debug=tiny", *overrides], output_dir=tmp_path)
    with pytest.raises(ValueError, match=expect):
        check_metric(cfg, module)
    fixed = ["debug=tiny", "+trainer.limit_val_batches=0", "optimized_metric=null",
             "~callbacks.model_checkpoint"]
    check_metric(compose_config(fixed, output_dir=tmp_path), module)


def test_a_gpu_trainer_without_a_gpu_is_refused_before_the_run(tmp_path, monkeypatch):
    """trainer=gpu (the README's GPU commands) on a machine whose torch sees no GPU: one line
    naming trainer=cpu, from the config checks (not Lightning's MisconfigurationException with
    a traceback and exit status 1)."""
    import torch

    from mrflight.pipeline import check_config, compose_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    for extra in (["trainer=gpu"], ["trainer=ddp"], ["trainer.accelerator=cuda"]):
        cfg = compose_config(["debug=tiny", *extra], output_dir=tmp_path)
        with pytest.raises(ValueError, match="needs a GPU, but torch sees none.*trainer=cpu"):
            check_config(cfg)
    for extra in ([], ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]):
        check_config(compose_config(["debug=tiny", *extra], output_dir=tmp_path))


def test_a_gpu_trainer_without_a_gpu_is_one_error_line(tmp_path):
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU: trainer=gpu would train")
    line = _one_error_line(_run("train.py", [*TINY, "trainer=gpu"], tmp_path))
    assert "needs a GPU" in line and "trainer=cpu" in line, line


@pytest.mark.parametrize("script,override,expect", [
    ("train.py", "trainer.max_epoch=3", "did you mean trainer.max_epochs?"),
    ("eval.py", "ckpt_paht=x", "did you mean ckpt_path?"),
    ("eval.py", "model=gru", "model= is a train.py option"),
    ("train.py", "scheduler=null", "did you mean module.scheduler?"),
])
def test_mistyped_key_suggests_the_close_name(tmp_path, script, override, expect):
    line = _one_error_line(_run(script, [override], tmp_path))
    assert expect in line, line
    assert "To append to your config" not in line


def test_a_swept_key_the_model_lacks_names_the_sweep(tmp_path):
    """hparams_search=basic sweeps model.hidden_size, which model=ann does not have: the line
    names the sweep, not a key the user never typed with '+model.hidden_size=VALUE'."""
    line = _one_error_line(_run("train.py", ["hparams_search=basic", "model=ann", *TINY,
                                             f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path))
    assert "hparams_search=basic sweeps model.hidden_size" in line, line
    assert "model=gru" in line and "+model.hidden_size" not in line, line


def _help_groups(text: str) -> dict[str, set]:
    block = text.split("Config groups")[1].split("\n\n")[0].splitlines()[1:]
    out = {}
    for ln in block:
        group, opts = ln.split(None, 1)
        out[group] = {o.split()[0] for o in opts.split(", ")}
    return out


def test_help_is_short_and_lists_the_groups_each_command_accepts(tmp_path):
    from mrflight.config import CONFIG_DIR
    from mrflight.errors import _primary_groups

    for script, name in (("train.py", "train"), ("eval.py", "eval")):
        r = _run(script, ["--help"], tmp_path)
        assert r.returncode == 0 and "Common commands" in r.stdout, r.stdout + r.stderr
        groups = _help_groups(r.stdout)
        for group, opts in groups.items():  # every listed option exists, and every file is listed
            assert opts == {p.stem for p in (CONFIG_DIR / group).glob("*.yaml")}, group
        accepted = set(_primary_groups(name)) - {"paths"}
        assert set(groups) - {"hydra/launcher"} == accepted, (name, set(groups))
    assert "model" not in _help_groups(r.stdout)  # eval's help


def test_failed_run_writes_the_error_into_its_log(tmp_path):
    out = tmp_path / "run"
    r = _run("train.py", [*TINY, "data.noise_std=-1", f"hydra.run.dir={out}"], tmp_path)
    line = _one_error_line(r)
    log = (out / "train.log").read_text()
    assert line in log and "Traceback" in log  # the traceback in the log, not on the console


def test_a_run_folder_is_never_overwritten_by_another_command(tmp_path):
    """Another training run (without ckpt_path) or an evaluation in a run's folder would
    overwrite its checkpoints, metrics and logs: refused, and the folder stays as it was; an
    output folder that is a file, and an export over an earlier export, are refused too."""
    run = tmp_path / "run"
    r = _run("train.py", [*TINY, "model=ann", "trainer.max_epochs=1", "test=false",
                          f"hydra.run.dir={run}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert (run / ".hydra" / "config.yaml") in files
    for script, args in (("train.py", [*TINY, f"hydra.run.dir={run}"]),
                         ("eval.py", [f"ckpt_path={run}", f"hydra.run.dir={run}"])):
        line = _one_error_line(_run(script, args, tmp_path))
        for piece in (str(run), "already holds the results of another run", "checkpoints"):
            assert piece in line, line
    assert files == {p: p.read_bytes() for p in run.rglob("*")
                     if p.is_file() and p.suffix != ".log"}
    (tmp_path / "afile").write_text("mine")
    line = _one_error_line(_run("eval.py", ["export=onnx", f"ckpt_path={run}",
                                            f"paths.output_dir={tmp_path / 'afile'}"], tmp_path))
    assert "is a file, not a folder" in line and (tmp_path / "afile").read_text() == "mine"
    export = ["export=onnx", f"ckpt_path={run}", f"paths.output_dir={tmp_path / 'exp'}"]
    r = _run("eval.py", export, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (onnx,) = (tmp_path / "exp").glob("*.onnx")
    before = onnx.read_bytes()
    assert "would overwrite" in _one_error_line(_run("eval.py", export, tmp_path))
    assert onnx.read_bytes() == before


@pytest.mark.parametrize("args,expect", [
    (["input=scan.npy", "export=onnx"], "separate commands"),
    (["dictionary=d.h5", "mask=m.npy"], "dictionary= and mask= apply to maps"),
    (["b1map=b1.nii.gz"], "b1map= applies to maps of an image series: add input="),
])
def test_eval_refuses_options_it_would_ignore(tmp_path, args, expect):
    assert expect in _one_error_line(_run("eval.py", args, tmp_path))


def test_overfit_debug_runs_on_stored_data_and_refuses_fresh_batches(tmp_path):
    from mrflight.pipeline import check_config, compose_config

    cfg = compose_config(["debug=overfit"], output_dir=tmp_path)
    check_config(cfg)
    assert cfg.data._target_.endswith("FingerprintDataModule") and cfg.data.noise_std == 0
    cfg = compose_config(["debug=overfit", "data=simulated"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="overfit_batches .*data=random or data=paper"):
        check_config(cfg)


def test_a_setting_its_constructor_does_not_take_is_named_with_the_fix(tmp_path):
    """debug=tiny shortens the built-in train (sequence.n_pulses): with a schedule file that
    setting is named, with how to remove it, instead of a TypeError from deep in Hydra."""
    (tmp_path / "s.csv").write_text("flip_angle_deg,tr_ms\n10,12\n20,12\n")
    r = _run("train.py", [*TINY, "sequence=from_file", f"sequence.path={tmp_path / 's.csv'}",
                          f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    line = _one_error_line(r)
    for piece in ("sequence.n_pulses is not a setting of mrflight.sequence_files.from_file",
                  "~sequence.n_pulses"):
        assert piece in line, line


def test_optuna_sweep_goes_on_past_a_failing_trial(tmp_path):
    """A failed trial is a failed Optuna trial, not the end of the study (a nan return value
    made Optuna raise and end the sweep)."""
    sweep = tmp_path / "sweep"
    r = _run("train.py", ["hparams_search=optuna", *TINY, "trainer.max_epochs=1",
                          "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=3",
                          "data.noise_std=choice(-1,0.01)", f"hydra.sweep.dir={sweep}"],
             tmp_path)
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    report = json.loads((sweep / "failures.json").read_text())
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1", "2"] and 1 <= report["n_failed"] <= 2  # every trial ran
    assert "data.noise_std=-1" in report["failed"][0]["overrides"]
    assert (sweep / "optimization_results.yaml").is_file()


def test_optuna_sweep_whose_every_trial_failed_lists_them(tmp_path):
    """With no completed trial Optuna's sweeper raises "No trials are completed yet" before the
    multirun ends: the failed jobs are still reported (failures.json, the summary, status 3)
    and the last line says why the sweep stopped, not only Optuna's words."""
    sweep = tmp_path / "sweep"
    r = _run("train.py", ["hparams_search=optuna", *TINY, "trainer.max_epochs=1",
                          "hydra.sweeper.n_trials=2", "data.batch_size=-5",
                          f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    report = json.loads((sweep / "failures.json").read_text())
    assert report["n_failed"] == 2
    assert all("data.batch_size must be a positive integer" in f["error"]
               for f in report["failed"])
    last = r.stderr.rstrip().splitlines()[-1]
    assert last.startswith("error: the sweep stopped after 2 failed job(s), listed above"), last
    assert "No trials are completed yet" in last
    assert "job 1 [" in r.stderr


def test_a_sweep_folder_used_again_reports_only_its_own_failures(tmp_path):
    """A job folder that holds results is refused (nothing overwritten); an earlier job's
    FAILED.txt is not counted as a failure of the new multirun."""
    sweep = tmp_path / "sweep"
    base = ["-m", *TINY, "trainer.max_epochs=1", "model=ann", f"hydra.sweep.dir={sweep}"]
    assert _run("train.py", [*base, "data.noise_std=0.01,-1"], tmp_path).returncode == 3
    ckpt = (sweep / "0" / "checkpoints" / "last.ckpt").read_bytes()
    r = _run("train.py", [*base, "data.noise_std=0.02,0.01"], tmp_path)
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    report = json.loads((sweep / "failures.json").read_text())
    assert [f["job"] for f in report["failed"]] == ["0"]  # refused: it holds job 0's results
    assert "already holds the results of another run" in report["failed"][0]["error"]
    assert (sweep / "0" / "checkpoints" / "last.ckpt").read_bytes() == ckpt
    assert (sweep / "1" / "metrics.json").is_file()  # the earlier failure's folder ran


def test_an_interrupted_sweep_goes_on_with_ckpt_path_last(tmp_path):
    """The same sweep command with ``ckpt_path=last``: a finished job is kept as it is (its
    score returned, nothing rewritten), a job that had not started starts; no job fails."""
    sweep = tmp_path / "sweep"
    base = ["-m", *TINY, "trainer.max_epochs=1", "model=ann", f"hydra.sweep.dir={sweep}"]
    assert _run("train.py", [*base, "seed=1"], tmp_path).returncode == 0  # job 1: never ran
    done = {f: (sweep / "0" / f).read_bytes() for f in ("metrics.json", "checkpoints/last.ckpt",
                                                         "checkpoints/config.yaml")}
    r = _run("train.py", [*base, "seed=1,2", "ckpt_path=last"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert {f: (sweep / "0" / f).read_bytes() for f in done} == done
    assert "job 0: its run in" in r.stdout and "kept as it is" in r.stdout
    assert (sweep / "1" / "metrics.json").is_file()
    assert not list(sweep.glob("*/FAILED.txt"))
    # a finished job the command gives other settings (an Optuna trial drawn anew) is refused,
    # not reported with the score of the run that is there
    r = _run("train.py", [*base, "seed=5,2", "ckpt_path=last"], tmp_path)
    assert r.returncode == 3, (r.stdout + r.stderr)[-3000:]
    report = json.loads((sweep / "failures.json").read_text())
    assert [f["job"] for f in report["failed"]] == ["0"], report
    assert "holds a finished run with other settings (seed: 1 -> 5)" in report["failed"][0]["error"]
    assert {f: (sweep / "0" / f).read_bytes() for f in done} == done


def test_a_sweep_stopped_by_a_signal_says_how_to_go_on_with_the_sweep(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from mrflight import config, errors

    sweep = tmp_path / "multirun" / "2026-11-28" / "12-00-00-000001"
    hc = SimpleNamespace(mode="RunMode.MULTIRUN", runtime=SimpleNamespace(output_dir=sweep / "1"),
                         sweep=SimpleNamespace(dir="multirun/${now:%H-%M-%S-%f}", subdir="1"))
    monkeypatch.setattr(config, "hydra_config", lambda: hc)
    cfg = OmegaConf.create({"paths": {"output_dir": str(sweep / "1")}, "task_name": "train"})
    msg = errors._how_to_go_on(cfg)  # the jobs after job 1 have not run: the sweep goes on
    assert msg.startswith(f"go on with the sweep: run the same command again with "
                          f"hydra.sweep.dir={sweep} ckpt_path=last"), msg


def test_only_rank_0_checks_the_run_folder(tmp_path, monkeypatch):
    """Under DDP the other processes start in the folder rank 0 has begun writing (its
    checkpoints/config.yaml): they must not refuse it (the slow two-process DDP test runs it)."""
    from mrflight import pipeline

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "config.yaml").write_text("seed: 1\n")
    cfg = pipeline.compose_config(["debug=tiny", "logger=none"], output_dir=out)
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ValueError, match="already holds the results of another run"):
        pipeline._prepare_run(cfg, resuming=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert pipeline._prepare_run(cfg, resuming=False) == out


def test_failures_are_reported_whatever_the_clocks_of_the_jobs_hosts(tmp_path):
    """A job on another host (the slurm launcher) writes FAILED.txt on a shared file system,
    whose modification time is the file server's clock: one a few seconds behind this host's
    dropped the failure (failures.json empty, exit status 0). The multirun's failures are the
    files that were not there, as they are, when it started; an earlier multirun's are not."""
    import time

    from omegaconf import OmegaConf

    from mrflight.hydra_callbacks import FAILED_FILE, LAST_FAILURES, FailureReport

    sweep = tmp_path / "sweep"
    for job in ("0", "1", "2"):
        (sweep / job).mkdir(parents=True)
    old = sweep / "2" / FAILED_FILE  # an earlier multirun's failure in the same sweep dir
    old.write_text(json.dumps({"error": "earlier", "overrides": ["x=2"]}))
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}})
    report = FailureReport()
    report.on_multirun_start(cfg)
    skewed = time.time() - 30  # the file server's clock 30 s behind this host's
    for job in ("0", "1"):
        f = sweep / job / FAILED_FILE
        f.write_text(json.dumps({"error": f"boom {job}", "overrides": [f"x={job}"]}))
        os.utime(f, (skewed, skewed))
    report.on_multirun_end(cfg)
    assert [(r["job"], r["error"]) for r in LAST_FAILURES] == [("0", "boom 0"), ("1", "boom 1")]
    saved = json.loads((sweep / "failures.json").read_text())
    assert saved["n_failed"] == 2 and [r["job"] for r in saved["failed"]] == ["0", "1"]


def _hydra_subdir(run_dir, **cfg) -> str | None:
    """Where Hydra would save ``.hydra/*.yaml`` for a run of ``cfg`` in ``run_dir`` once
    :class:`~mrflight.hydra_callbacks.KeepRunConfig` has seen it (``None``: not saved)."""
    from omegaconf import OmegaConf

    from mrflight.hydra_callbacks import KeepRunConfig

    conf = OmegaConf.create({**cfg, "hydra": {"run": {"dir": str(run_dir)},
                                              "output_subdir": ".hydra"}})
    KeepRunConfig().on_run_start(conf)
    return conf.hydra.output_subdir


def test_a_refused_maps_run_keeps_the_folders_hydra_config(tmp_path):
    """``eval.py input=SERIES`` into a folder that already holds that series' maps is refused
    by the maps; the ``.hydra/*.yaml`` there, how those maps were made, are kept (the refused
    run wrote its own over them); other series' maps there, or none, do not stop them."""
    maps_run = {"input": "data/scan.nii.gz", "ckpt_path": None, "maps": {"previews": False}}
    (tmp_path / "scan_T1map_ms.npy").touch()
    assert _hydra_subdir(tmp_path, **maps_run) is None
    assert _hydra_subdir(tmp_path, **{**maps_run, "input": "data/other.npy"}) == ".hydra"
    assert _hydra_subdir(tmp_path / "fresh", **maps_run) == ".hydra"


def test_eval_with_a_checkpoint_saves_its_hydra_config(tmp_path):
    """``eval.py ckpt_path=RUN`` (an evaluation, or maps of a network) saves its ``.hydra/``
    like any new run (it was taken for a resume of ``train.py``, which keeps the resumed
    run's, and saved none); a resume still saves none."""
    assert _hydra_subdir(tmp_path / "maps", input="scan.nii.gz", ckpt_path="runs/x") == ".hydra"
    assert _hydra_subdir(tmp_path / "eval", ckpt_path="runs/x") == ".hydra"
    assert _hydra_subdir(tmp_path / "resume", ckpt_path="last", train=True) is None


@pytest.mark.parametrize("experiment", ["bound", "bound_cpu"])
def test_debug_tiny_does_not_silently_replace_an_experiments_simulated_data(tmp_path, experiment):
    """debug=tiny's data=random wins over the experiment's data=simulated: named, with a short
    run of the experiment that works (it failed on a setting of the other data module)."""
    from mrflight.pipeline import check_config, compose_config

    cfg = compose_config([f"experiment={experiment}", "debug=tiny"], output_dir=tmp_path)
    choices = {"experiment": experiment, "debug": "tiny", "data": "random"}
    with pytest.raises(ValueError, match=f"experiment={experiment} trains on data=simulated, "
                                         "but debug=tiny replaces it with data=random"):
        check_config(cfg, choices)
    cfg = compose_config(["experiment=oksuz2019", "debug=tiny"], output_dir=tmp_path)
    check_config(cfg, {"experiment": "oksuz2019", "debug": "tiny", "data": "random"})


def test_an_unknown_key_is_never_its_own_suggestion(tmp_path):
    """data.batches_per_epoch under debug=tiny (data=random) with a second unknown key: the
    suggestion came from the default data=simulated, where the key exists."""
    line = _one_error_line(_run("train.py", ["experiment=bound_cpu", "debug=tiny",
                                             "data.batches_per_epoch=10", "data.n_val=200"],
                                tmp_path))
    assert "did you mean data.batches_per_epoch" not in line, line
    assert "data has: batch_size" in line, line


def test_a_nested_setting_is_named_with_its_own_target(tmp_path):
    from mrflight.pipeline import _build_data_and_module, compose_config

    cfg = compose_config(["debug=tiny", "data=paper", "grid@data.params=regular"],
                         output_dir=tmp_path)
    with pytest.raises(ValueError, match="data.params.t1_min is not a setting of "
                                         "mrflight.dictionary.grids.random_params"):
        _build_data_and_module(cfg)


def test_the_crb_loss_refuses_noise_free_data(tmp_path):
    """The bound of noise-free data is 0: the loss was divided by the clamp (about 1e11)."""
    from mrflight.pipeline import _build_data_and_module, compose_config

    cfg = compose_config(["debug=tiny", "module.loss=crb", "data.noise_std=0"],
                         output_dir=tmp_path)
    with pytest.raises(ValueError, match="module.loss=crb .*0 without noise"):
        _build_data_and_module(cfg)


def test_a_b1_target_needs_a_b1_range(tmp_path):
    """data.b1_range=null with the default targets [t1, t2, b1] trained a constant B1 output."""
    from mrflight.data import SimulatedDataModule
    from mrflight.physics import oksuz2019

    seq = oksuz2019(n_pulses=100, lobe_length=20)
    with pytest.raises(ValueError, match="data.targets includes b1 but data.b1_range=null"):
        SimulatedDataModule(sequence=seq, b1_range=None)
    assert SimulatedDataModule(sequence=seq, b1_range=None, targets=["t1", "t2"]).targets == \
        ("t1", "t2")


def test_a_data_error_is_reported_not_lightnings_teardown_error_after_it():
    """A fit whose data fails before the loader starts: Lightning's teardown then raises "Please
    call `iter(combined_loader)` first." while handling it; the user is told the data's error."""
    import lightning as L
    import torch
    from torch.utils.data import DataLoader, IterableDataset

    from mrflight.errors import _is_usage, one_line, root_cause

    class Failing(IterableDataset):
        def __iter__(self):
            raise ValueError("noise_std must be >= 0: got -1")

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            return self.layer(batch).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), 0.1)

    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(Exception) as info:
        trainer.fit(Tiny(), DataLoader(Failing(), batch_size=None))
    assert isinstance(root_cause(info.value), ValueError)
    assert one_line(info.value) == "noise_std must be >= 0: got -1"
    assert _is_usage(root_cause(info.value))


@pytest.mark.parametrize("overrides,expect", [
    (["+trainer.gradient_clip_val=1", "+trainer.gradient_clip_algorithm=bogus"],
     "`gradient_clip_algorithm` bogus is invalid. Allowed algorithms: ['value', 'norm']."),
    (["trainer.max_time=abc"], "`Timer(duration='abc')` is not a valid duration. Expected a "
                               "string in the format DD:HH:MM:SS."),
])
def test_a_trainer_setting_lightning_refuses_is_one_line(tmp_path, overrides, expect):
    """Lightning's MisconfigurationException names the setting and the values it takes; it
    was reported as a bug, with a traceback and exit status 1."""
    from mrflight.config import instantiate
    from mrflight.errors import _is_usage, one_line, root_cause
    from mrflight.pipeline import compose_config

    cfg = compose_config(["debug=tiny", *overrides], output_dir=tmp_path)
    with pytest.raises(Exception) as info:
        instantiate(cfg.trainer, logger=False)
    assert _is_usage(root_cause(info.value))
    assert one_line(info.value) == expect


def test_wandb_online_without_a_login_is_one_error_line(tmp_path):
    """WANDB_MODE=online with no API key (or no route to W&B's server) is the user's setting,
    not a bug: one line naming the mode and the ways out, no traceback."""
    env = {"WANDB_MODE": "online", "HOME": str(tmp_path), "WANDB_API_KEY": "",
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config")}
    r = _run("train.py", [*TINY, "logger=default", f"hydra.run.dir={tmp_path / 'run'}"],
             tmp_path, **env)
    line = _one_error_line(r)
    assert "WANDB_MODE=online" in line and "wandb login" in line and "WANDB_MODE=offline" in line


def test_processes_a_run_starts_keep_its_one_line_errors(monkeypatch):
    """run_cli sets HYDRA_FULL_ERROR=1 for Hydra; the other DDP ranks, which run the script
    again, inherit it and took it for the user's --debug: a bad value gave rank 1 a traceback."""
    from mrflight import errors, hydra_callbacks

    monkeypatch.setattr(hydra_callbacks, "LAST_FAILURES", [])
    for name in ("HYDRA_FULL_ERROR", "MRFLIGHT_DEBUG", errors._OWN_FULL_ERROR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(errors, "_DEBUG_AT_START", None)
    errors.run_cli(lambda: None, "train")
    assert os.environ["HYDRA_FULL_ERROR"] == "1"
    monkeypatch.setattr(errors, "_DEBUG_AT_START", None)  # a rank's process, this environment
    assert not errors._debug()
    monkeypatch.delenv(errors._OWN_FULL_ERROR)  # the user's own HYDRA_FULL_ERROR=1 still counts
    assert errors._debug()
