"""Training end to end on tiny data: pipeline, checkpoints, early stopping, W&B, multirun."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

import mrflight
from mrflight.callbacks import RelativeEarlyStopping
from mrflight.pipeline import compose_config, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["debug=tiny", "~callbacks.rich_progress_bar", "++trainer.enable_progress_bar=false"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def run(tmp_path, *overrides, logger="none"):
    out = tmp_path / "run"
    cfg = compose_config([*TINY, f"logger={logger}", *overrides], output_dir=out)
    return train(cfg), out, cfg


@pytest.mark.parametrize("model", ["lstm", "gru", "ann", "cnn", "subspace"])
def test_every_model_fast_dev_run(tmp_path, model):
    # debug=tiny keeps the data small; fast_dev_run on top (a second debug= would replace tiny)
    metric, out, _ = run(tmp_path, f"model={model}", "++trainer.fast_dev_run=true")
    assert metric is not None and np.isfinite(metric)
    assert (out / "checkpoints" / "config.yaml").is_file()


def test_fast_dev_run_is_not_warned_of_a_cut_schedule(tmp_path, caplog):
    """debug=fast_dev_run: Lightning sets trainer.max_steps=1 itself, so the warning that
    max_steps cuts the learning-rate schedule named a setting the user never gave."""
    import logging

    caplog.set_level(logging.WARNING, logger="mrflight")
    run(tmp_path, "model=ann", "++trainer.fast_dev_run=true")
    assert not [r for r in caplog.records if "max_steps" in r.getMessage()]


def test_a_run_stopped_before_its_first_validation_ends_without_an_error(tmp_path, caplog):
    """+trainer.max_steps (or trainer.max_time) within the first epoch: no validation ran, and
    the run ended with 'error: optimized_metric='val/loss' was not logged' and no
    metrics.json, though it trained and tested as asked."""
    import logging

    caplog.set_level(logging.WARNING, logger="mrflight")
    metric, out, _ = run(tmp_path, "model=ann", "+trainer.max_steps=2")
    assert metric is None
    assert any("before its first validation" in r.getMessage() for r in caplog.records)
    # no epoch finished, no checkpoint: the folder stays an unfinished run that ckpt_path=last
    # starts again (README), not a finished one
    assert not (out / "metrics.json").exists()
    metric, out, _ = run(tmp_path, "model=ann", "ckpt_path=last", "+trainer.max_steps=-1")
    assert metric is not None and (out / "metrics.json").is_file()


def test_tiny_model_overfits_a_small_set(tmp_path):
    torch.manual_seed(0)
    from mrflight.data import FingerprintDataModule
    from mrflight.dictionary import random_params
    from mrflight.physics import oksuz2019
    from mrflight.regressor import MRFRegressor

    seq = oksuz2019(n_pulses=100, lobe_length=20)
    dm = FingerprintDataModule(seq, params=random_params(120, seed=1), n_test=20, batch_size=20,
                               noise_std=0.0, progress=False)
    dm.setup()
    module = MRFRegressor({"_target_": "mrflight.models.ANNRegressor", "input_length": 100,
                           "hidden_sizes": [64, 64]}, lr=3e-3)
    batch = dm.on_after_batch_transfer(next(iter(dm.train_dataloader())), 0)
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = module.loss_fn(module.net(batch.signal), batch.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.02 * losses[0]


def test_training_metrics_are_the_epochs_mae_and_rmse(tmp_path):
    """train/t1_mae_ms ... are the MAE and RMSE over every training sample of the epoch (summed
    per step, batches of unequal size weighted by their samples); lr 1e-30 keeps the net fixed so
    that they can be recomputed after the fit."""
    from mrflight.data import FingerprintDataModule
    from mrflight.dictionary import random_params
    from mrflight.physics import oksuz2019
    from mrflight.regressor import MRFRegressor

    torch.manual_seed(0)
    seq = oksuz2019(n_pulses=100, lobe_length=20)
    dm = FingerprintDataModule(seq, params=random_params(150, seed=1), n_test=20, batch_size=32,
                               noise_std=0.0, progress=False)
    module = MRFRegressor({"_target_": "mrflight.models.ANNRegressor", "input_length": 100,
                           "hidden_sizes": [16]}, lr=1e-30)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    errs = []
    with torch.no_grad():
        for batch in dm.train_dataloader():
            batch = dm.on_after_batch_transfer(batch, 0)
            errs.append(module.to_params(module.net(batch.signal)) - batch.params_ms)
    err = torch.cat(errs).double()
    assert len(errs) > 1 and err.shape[0] % 32  # a short last batch
    got = trainer.callback_metrics
    for i, p in enumerate(("t1", "t2")):
        assert got[f"train/{p}_mae_ms"].item() == pytest.approx(err[:, i].abs().mean().item(),
                                                                 rel=1e-5)
        assert got[f"train/{p}_rmse_ms"].item() == pytest.approx(
            err[:, i].square().mean().sqrt().item(), rel=1e-5)


def test_evaluation_metrics_and_b1_in_percent_are_the_errors_of_every_sample(tmp_path):
    """val/..., val@0.01/... and test/... are the MAE and RMSE over the whole evaluation set
    (eval batches of unequal size), train/... over every training sample of the epoch, and
    B1's in % of nominal (100 x the ratio) everywhere; lr 1e-30 keeps the net fixed so that
    they can be recomputed after the fit (the batches are functions of (seed, epoch, index))."""
    from mrflight.data import SimulatedDataModule
    from mrflight.physics import oksuz2019
    from mrflight.regressor import MRFRegressor

    torch.manual_seed(0)
    seq = oksuz2019(n_pulses=100, lobe_length=20)
    dm = SimulatedDataModule(seq, targets=["t1", "t2", "b1"], batch_size=16,
                             batches_per_epoch=3, n_val=40, n_test=40, eval_noise_levels=[0.01],
                             eval_batch_size=16, num_workers=0, progress=False, seed=5)
    module = MRFRegressor({"_target_": "mrflight.models.ANNRegressor", "input_length": 100,
                           "n_outputs": 3, "hidden_sizes": [16]}, lr=1e-30,
                          targets=["t1", "t2", "b1"], target_scale_ms=[2000.0, 500.0, 2.0])
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    got = dict(trainer.callback_metrics)
    for per_set in trainer.test(module, datamodule=dm, verbose=False):  # one per test set
        got.update(per_set)

    def expect(prefix, err):
        err = err.double() * torch.tensor([1.0, 1.0, 100.0], dtype=torch.float64)
        for i, (p, u) in enumerate((("t1", "ms"), ("t2", "ms"), ("b1", "pct"))):
            assert float(got[f"{prefix}/{p}_mae_{u}"]) == pytest.approx(
                err[:, i].abs().mean().item(), rel=1e-5), (prefix, p)
            assert float(got[f"{prefix}/{p}_rmse_{u}"]) == pytest.approx(
                err[:, i].square().mean().sqrt().item(), rel=1e-5), (prefix, p)

    def errors(signals, params_ms):
        with torch.no_grad():
            return module.to_params(module.net(signals)) - params_ms

    train = [dm.train_set[(0, i)] for i in range(3)]
    expect("train", torch.cat([errors(b.signal, b.params_ms) for b in train]))
    for split in ("val", "test"):
        for name, s in zip(("", "@0.01"), dm.fixed_sets(split)["sets"]):
            err = errors(s.signals, s.params_ms)
            assert err.shape[0] % 16  # a short last batch
            assert float(err[:, 2].abs().mean()) > 0.01  # B1 errors not trivially zero
            expect(split + name, err)


def test_checkpoint_round_trip_and_predict_parameters(tmp_path):
    _, out, _ = run(tmp_path, "model=gru", "logger=csv")
    ckpts = sorted((out / "checkpoints").glob("epoch_*.ckpt"))
    assert ckpts and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "csv" / "metrics.csv").is_file() and (out / "metrics.json").is_file()
    assert (out / "figures" / "scatter_test.png").is_file()
    a = mrflight.load_checkpoint(ckpts[0])
    b = mrflight.load_checkpoint(ckpts[0])
    assert not a.training and a.hparams.sequence["name"] == "oksuz2019"
    assert a.hparams.net["_target_"].endswith("GRURegressor")
    from mrflight.physics import Sequence, simulate

    seq = Sequence.from_dict(a.hparams.sequence)
    sig = simulate(seq, torch.tensor([800.0, 1500.0]), torch.tensor([60.0, 120.0]))
    p = a.predict_parameters(sig)
    assert p.shape == (2, 2) and p.dtype == torch.float32
    assert torch.equal(p, b.predict_parameters(sig))
    # complex, magnitude, numpy, any scale: the same preprocessing
    assert torch.allclose(p, a.predict_parameters(sig.abs().numpy() * 37.0), atol=1e-4)
    assert torch.allclose(p[0], a.predict_parameters(sig[0])[0], atol=1e-4)
    # the module's forward on the preprocessed input gives the same
    from mrflight.data import preprocess

    assert torch.allclose(p, a(preprocess(sig)), atol=1e-5)
    with pytest.raises(ValueError, match=r"\(N, 100\).*oksuz2019"):
        a.predict_parameters(torch.ones(2, 99))
    with pytest.raises(ValueError, match="NaN or Inf"):
        a.predict_parameters(torch.full((1, 100), float("nan")))
    with pytest.warns(RuntimeWarning, match="all-zero"):
        z = a.predict_parameters(torch.cat([sig, torch.zeros(1, 100, dtype=sig.dtype)]))
    assert torch.isnan(z[2]).all() and torch.allclose(z[:2], p, atol=1e-5)


def test_resume_from_last(tmp_path):
    _, out, _ = run(tmp_path, "trainer.max_epochs=1", "test=false", "optimized_metric=val/loss")
    first = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    _, out2, _ = run(tmp_path, "trainer.max_epochs=2", "ckpt_path=last", "test=false")
    assert out2 == out
    second = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["epoch"] == 0 and second["epoch"] == 1
    assert second["global_step"] == 2 * first["global_step"]
    with pytest.raises(ValueError, match="does not exist"):
        run(tmp_path, "ckpt_path=/nonexistent/x.ckpt")


@pytest.mark.parametrize("option,kind", [("enable_progress_bar", "ProgressBar"),
                                         ("enable_checkpointing", "ModelCheckpoint")])
def test_trainer_options_that_turn_a_callback_off_leave_it_out(tmp_path, monkeypatch, option,
                                                                kind):
    """trainer.enable_progress_bar=false (on a terminal) and trainer.enable_checkpointing=false
    stopped the run with Lightning's MisconfigurationException and its traceback, since the
    default callbacks hold a progress bar and checkpoints; they now leave them out."""
    from lightning.pytorch import callbacks

    from mrflight import pipeline

    monkeypatch.setattr(pipeline, "interactive", lambda: True)  # the progress bar is kept
    cfg = compose_config(["debug=tiny", f"+trainer.{option}=false"], output_dir=tmp_path)
    trainer = pipeline._build_trainer(cfg, [])
    assert not any(isinstance(c, getattr(callbacks, kind)) for c in trainer.callbacks)
    other = callbacks.ModelCheckpoint if kind == "ProgressBar" else callbacks.RichProgressBar
    assert any(isinstance(c, other) for c in trainer.callbacks)  # the other one is kept


@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_without_callbacks_the_checkpoint_is_in_the_runs_checkpoints_folder(tmp_path, logger):
    """callbacks=none left Lightning's own checkpoint in the first logger's folder (csv/,
    mrflight/RUN_ID/checkpoints/), where eval.py and ckpt_path found no checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from mrflight import pipeline

    cfg = compose_config(["debug=tiny", "callbacks=none", f"logger={logger}"],
                         output_dir=tmp_path)
    trainer = pipeline._build_trainer(cfg, pipeline.build_loggers(cfg))
    saving = [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert [str(c.dirpath) for c in saving] == [str(tmp_path / "checkpoints")]


def test_weight_ema_refuses_a_decay_outside_0_1():
    from mrflight.callbacks import WeightEMA

    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="callbacks.ema.decay"):
            WeightEMA(decay=decay)


def test_wandb_offline_writes_a_run_directory(tmp_path, monkeypatch):
    """... and nothing outside it: no copy of the checkpoint in W&B's artifact staging folder
    (a model artifact only with logger.wandb.log_model=true, as in Lightning)."""
    data = tmp_path / "wandb_data"
    monkeypatch.setenv("WANDB_DATA_DIR", str(data))
    _, out, _ = run(tmp_path, "logger=default", "model=ann")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    import wandb

    assert wandb.run is None  # finished at the end of the job
    assert (out / "csv" / "metrics.csv").is_file()
    staged = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
    assert not staged, staged


@pytest.mark.parametrize("override,match", [
    ("data.noise_std=-0.1", "noise_std"),
    ("data.batch_size=0", "batch_size"),
    ("data.n_test=5000", "only"),
    ("module.lr=0", "lr"),
])
def test_bad_config_values_fail_clearly(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, override)


def test_unknown_model_lists_the_available_ones(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="(?s)Available options.*gru.*lstm"):
        compose_config(["model=transformer"])


class _Scripted(L.LightningModule):
    """Logs a prescribed val/loss per epoch."""

    def __init__(self, values):
        super().__init__()
        self.values = values
        self.w = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, i):
        return (self.w * batch[0]).sum()

    def validation_step(self, batch, i):
        self.log("val/loss", float(self.values[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(1, 1)))

    val_dataloader = train_dataloader


def _stopped_after(values, rel, patience):
    cb = RelativeEarlyStopping(monitor="val/loss", min_delta_rel=rel, patience=patience)
    t = L.Trainer(max_epochs=len(values), callbacks=[cb], logger=False,
                  enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0)
    t.fit(_Scripted(values))
    return t.current_epoch, float(cb.best_score)


def test_relative_early_stopping_counts_only_relative_improvements():
    flat = [1.0] + [0.996] * 10  # one 0.4 % step, then a plateau
    # at 0.5 % the step does not count: 3 epochs without improvement after epoch 0 -> 4 run
    assert _stopped_after(flat, 0.005, 3) == (4, 1.0)
    # at 0.3 % it counts: the plateau starts one epoch later
    assert _stopped_after(flat, 0.003, 3) == (5, pytest.approx(0.996))
    # a steady 0.4 %/epoch drift improves by > 0.5 % on the best every two epochs: no stop
    drift = [0.996 ** k for k in range(12)]
    epochs, best = _stopped_after(drift, 0.005, 3)
    assert epochs == 12 and best == pytest.approx(drift[10], rel=1e-6)
    # relative, not absolute: 1000 -> 994 (0.6 %) counts; 991, 990 (< 0.5 % of 994), 992 do not
    assert _stopped_after([1000.0, 994.0, 991.0, 990.0, 992.0, 985.0], 0.005, 3) == (5, 994.0)


def _sub(args, cwd, timeout=600):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _check_jobs(sweep: Path, n: int):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == n
    for j in jobs:
        assert (j / "checkpoints" / "last.ckpt").is_file() and (j / "metrics.json").is_file()
    return jobs


def test_multirun_two_models_subprocess(tmp_path):
    sweep = tmp_path / "sweep"
    r = _sub(["-m", "model=ann,cnn", *TINY, "trainer.max_epochs=1", "logger=csv",
              f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_jobs(sweep, 2)
    assert not list(tmp_path.glob("outputs"))


def test_optuna_sweep_runs(tmp_path):
    # the README's `hparams_search=optuna`, two one-epoch trials (the sweeper is in .[dev])
    optuna = tmp_path / "optuna"
    r = _sub(["hparams_search=optuna", *TINY, "logger=csv",
              "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
              "trainer.max_epochs=1", f"hydra.sweep.dir={optuna}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_jobs(optuna, 2)
    assert "best_value" in (optuna / "optimization_results.yaml").read_text()


@pytest.mark.slow
def test_multirun_four_models_and_sweeps(tmp_path):
    sweep = tmp_path / "models"
    r = _sub(["-m", "model=lstm,gru,ann,cnn", *TINY, "logger=default",
              f"hydra.sweep.dir={sweep}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    for j in _check_jobs(sweep, 4):
        assert len(list((j / "wandb").glob("offline-run-*"))) == 1
    basic = tmp_path / "basic"
    r = _sub(["hparams_search=basic", *TINY, "logger=csv", "model.hidden_size=8",
              "module.lr=1e-3", "data.noise_std=0.005,0.02", "trainer.max_epochs=1",
              f"hydra.sweep.dir={basic}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_jobs(basic, 2)
    optuna = tmp_path / "optuna"
    r = _sub(["hparams_search=optuna", *TINY, "logger=csv", "hydra.sweeper.n_trials=2",
              "hydra.sweeper.sampler.n_startup_trials=2", "trainer.max_epochs=1",
              f"hydra.sweep.dir={optuna}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    _check_jobs(optuna, 2)
    assert (optuna / "optimization_results.yaml").is_file()


SIM_SMALL = ["data=simulated", "sequence.n_pulses=100", "sequence.lobe_length=20",
             "data.batches_per_epoch=4", "data.n_val=32", "data.n_test=32", "data.batch_size=16",
             "data.num_workers=0", "model.hidden_size=8", "trainer.max_epochs=2",
             "~callbacks.rich_progress_bar", "++trainer.enable_progress_bar=false"]


@pytest.mark.slow
@pytest.mark.parametrize("data", [TINY, SIM_SMALL], ids=["stored", "simulated"])
def test_ddp_on_cpu_two_processes(tmp_path, data):
    out = tmp_path / "ddp"
    r = _sub(["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", *data,
              "logger=csv", f"hydra.run.dir={out}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "metrics.json").is_file()
    ck = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["epoch"] == 1
    if data is SIM_SMALL:  # every rank trains every batch of its own stream: 4 steps per epoch
        assert ck["global_step"] == 8


@pytest.mark.slow
def test_ddp_metrics_are_those_of_one_process(tmp_path):
    """A test set split across 2 ranks (201 signals: shares of 101 and 100) gives the metrics
    of one process on the same weights: each signal scored once (no padding repeats) and the
    loss weighted by the signals of each share."""
    args = [*(a for a in SIM_SMALL if not a.startswith("model.")), "model=ann",
            "data.n_test=201", "train=false", "optimized_metric=null", "logger=csv"]
    got = {}
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    for n, trainer in ((1, ["trainer=cpu"]), (2, ddp)):
        out = tmp_path / f"p{n}"
        r = _sub([*trainer, *args, f"hydra.run.dir={out}"], tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        got[n] = json.loads((out / "metrics.json").read_text())
    assert "test/loss" in got[1] and "test/t1_mae_ms" in got[1]
    for k, v in got[1].items():
        if isinstance(v, float):
            assert got[2][k] == pytest.approx(v, rel=1e-5), k


def test_predict_parameters_precision_modes():
    """bf16 autocast really runs in bfloat16 (outputs differ from fp32 by bf16 rounding, ~1e-2
    relative at most), fp32/tf32 agree on the CPU, and a bad mode names the choices."""
    from mrflight.regressor import MRFRegressor

    torch.manual_seed(0)
    module = MRFRegressor({"_target_": "mrflight.models.ANNRegressor", "input_length": 100,
                           "hidden_sizes": [64, 64]})
    sig = torch.rand(300, 100)
    p32 = module.predict_parameters(sig)
    assert torch.equal(p32, module.predict_parameters(sig, precision="tf32"))  # no TF32 on CPU
    pbf = module.predict_parameters(sig, precision="bf16", batch_size=64)
    assert pbf.dtype == torch.float32 and not torch.equal(pbf, p32)
    assert float((pbf - p32).norm() / p32.norm()) < 2e-2
    with pytest.raises(ValueError, match="precision must be one of"):
        module.predict_parameters(sig, precision="fp8")
    with pytest.raises(ValueError, match="needs the model on a CUDA GPU"):
        module.predict_parameters(sig, precision="fp16")


def test_predict_parameters_refuses_a_signed_real_signal_as_the_matcher_does():
    """Real input is read as a magnitude: the real part of complex data (negative values) is
    refused with the advice, not silently made a magnitude."""
    from mrflight.regressor import MRFRegressor

    module = MRFRegressor({"_target_": "mrflight.models.ANNRegressor", "input_length": 100,
                           "hidden_sizes": [8]})
    sig = torch.randn(4, 100, dtype=torch.complex64)
    assert torch.isfinite(module.predict_parameters(sig.abs())).all()
    with pytest.raises(ValueError, match="negative values in the real-valued signals.*np.abs"):
        module.predict_parameters(sig.real)


def test_sweep_score_is_the_best_checkpoints_not_the_last_epochs(tmp_path):
    """With an lr high enough for val/loss to rise again, the sweeper gets the score of the
    checkpoint that is tested and evaluated (the best), not the last epoch's."""
    import json

    metric, out, _ = run(tmp_path, "model=ann", "module.lr=0.05", "module.scheduler=null",
                         "trainer.max_epochs=4", "optimized_metric=val/loss", logger="csv")
    saved = json.loads((out / "metrics.json").read_text())
    scores = [float(r["val/loss"]) for r in csv.DictReader(open(out / "csv" / "metrics.csv"))
              if r.get("val/loss")]
    assert len(scores) == 4 and scores[-1] > min(scores)  # the case the test is about
    assert metric == saved["best/val/loss"] == pytest.approx(min(scores), rel=1e-6)
    assert saved["val/loss"] == pytest.approx(scores[-1], rel=1e-6)


def test_evaluation_loss_is_weighted_by_batch_size_and_keeps_nan():
    """The val/test loss is the mean over signals (batches weighted by their sizes, summed
    over DDP ranks as floats), and a NaN loss is reported, not dropped."""
    from mrflight.regressor import WeightedMean

    m = WeightedMean()
    m.update(torch.tensor(0.5), 3)
    m.update(torch.tensor(1.0), 2)
    assert float(m.compute()) == pytest.approx(0.7)
    m.update(torch.tensor(float("nan")), 1)
    assert math.isnan(float(m.compute()))


def test_train_false_tests_the_initial_weights_of_any_model(tmp_path, monkeypatch):
    """``train=false`` tests the seeded initial weights: with the default GRU (whose basis is
    fitted when training starts) and the default optimized_metric (a validation metric no fit
    logged), it writes the test metrics instead of failing; it refuses a ckpt_path it would
    not read."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    args = [a for a in SIM_SMALL if not a.startswith("model.")]
    out = tmp_path / "run"
    assert train(compose_config([*args, "model=gru", "train=false", "logger=none"],
                                output_dir=out)) is None
    metrics = json.loads((out / "metrics.json").read_text())
    assert math.isfinite(metrics["test/t1_mae_ms"]) and "val/loss" not in metrics
    with pytest.raises(ValueError, match="train=false tests the network's initial"):
        train(compose_config([*args, "train=false", f"ckpt_path={out}", "logger=none"],
                             output_dir=tmp_path / "again"))
