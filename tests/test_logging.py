"""What a run prints when stdout is not a terminal (Slurm, nohup, CI): progress, once, clean."""

import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_plain_run_prints_epoch_lines_once_and_no_noise(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", MRFLIGHT_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("WANDB_SILENT", None)  # the run must be quiet by itself
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=tiny", "model=ann",
                        f"hydra.run.dir={out}"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    # progress without a terminal: one summary line per epoch, on stdout and in train.log
    epochs = [ln for ln in r.stdout.splitlines() if "] - epoch " in ln]
    assert len(epochs) == 2 and "epoch 2/2, step" in epochs[1], r.stdout[-3000:]
    assert "val loss" in epochs[1] and "val T1/T2 MAE" in epochs[1] and epochs[1].endswith(" s")
    log = (out / "train.log").read_text()
    assert sum(" - epoch " in ln for ln in log.splitlines()) == 2
    # the test metrics as a few lines, not Lightning's wide table; every metric in train.log
    assert "Test metric" not in text and "DataLoader 0" not in text
    table = r.stdout.split("test of the best checkpoint:\n", 1)[1].splitlines()
    assert table[0].split() == ["T1", "ms", "(MAE", "/", "RMSE)", "T2", "ms", "(MAE", "/",
                                "RMSE)"], table
    assert table[1].startswith("  test set ") and table[1].count(" / ") == 2, table
    assert "metrics: {" in log and "metrics: {" not in r.stdout
    # each Lightning message once (not bare and again in Hydra's format)
    assert "\nINFO: " not in "\n" + text
    messages = Counter(ln.split("] - ", 1)[1] for ln in text.splitlines() if "] - " in ln)
    assert max(messages.values()) == 1, messages.most_common(3)
    # nothing the user cannot act on
    for noise in ("Warning", "WARNING", "anonymous", "litlogger", "Tip:", "FLOPs",
                  "exists and is not empty", "LeafSpec", "it/s"):  # it/s: a progress bar
        assert noise not in text, (noise, text[-3000:])


def test_progress_without_a_terminal_is_periodic_log_lines(caplog):
    from mrflight.progress import LogProgress, progress_bar

    assert isinstance(progress_bar(), LogProgress)  # pytest captures stdout: not a TTY
    caplog.set_level(logging.INFO, logger="mrflight")
    with LogProgress("simulating dictionary", interval_s=0.0) as prog:
        task = prog.add_task("atoms", total=10)
        for n in (3, 6, 10, 10):
            prog.update(task, completed=n)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("simulating dictionary: atoms: 3/10 (30 %)")
    assert lines[-1].startswith("simulating dictionary: atoms: 10/10 (100 %)")
    assert len(lines) == 3  # completion reported once


def test_dictionary_generation_reports_progress_in_the_log(tmp_path, caplog):
    import torch

    from mrflight.dictionary import generate, random_params
    from mrflight.physics import oksuz2019

    caplog.set_level(logging.INFO, logger="mrflight")
    seq = oksuz2019(n_pulses=50, lobe_length=10)
    generate(seq, random_params(n=200, seed=0), cache_dir=None, progress=True)
    assert any("simulating dictionary" in r.getMessage() and "200/200" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert torch.get_num_threads() >= 1


@pytest.mark.parametrize("interactive", [True, False])
def test_epoch_summary_goes_to_the_log_file_only_under_a_progress_bar(tmp_path, monkeypatch,
                                                                      interactive):
    from mrflight import run_logging
    from mrflight.callbacks import EpochSummary

    monkeypatch.setattr(run_logging, "interactive", lambda: interactive)
    monkeypatch.setattr(logging.getLogger("mrflight"), "level", logging.INFO)
    root = logging.getLogger()
    fh = logging.FileHandler(tmp_path / "train.log")
    root.addHandler(fh)
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger("mrflight").addHandler(handler)
    try:
        import torch

        class T:  # the trainer attributes EpochSummary reads
            callback_metrics = {"val/loss": torch.tensor(0.5), "val/t1_mae_ms": torch.tensor(9.)}
            current_epoch, max_epochs, global_step = 0, 3, 10
            is_global_zero, sanity_checking = True, False
            progress_bar_callback = object()

        summary = EpochSummary()
        summary.on_validation_end(T(), None)
        summary.on_train_epoch_end(T(), None)
        # an epoch without validation (check_val_every_n_epoch=2, an epoch cut short by
        # max_steps) shows no validation metrics: the earlier epoch's are still in the trainer
        trainer = T()
        trainer.current_epoch, trainer.global_step = 1, 20
        summary.on_train_epoch_start(trainer, None)
        summary.on_train_epoch_end(trainer, None)
    finally:
        logging.getLogger("mrflight").removeHandler(handler)
        root.removeHandler(fh)
        fh.close()
    line = "epoch 1/3, step 10, val loss 0.5, val T1 MAE 9.0 ms"
    assert line in (tmp_path / "train.log").read_text()
    assert summary.lines[0].startswith(line)
    assert summary.lines[1].startswith("epoch 2/3, step 20, ") and "val" not in summary.lines[1]
    assert bool(seen) is not interactive  # the console handler sees it only without a bar


def test_warnings_shown_are_also_in_the_runs_log_file_once(tmp_path, monkeypatch):
    import warnings

    from mrflight.run_logging import configure_logging

    shown = []  # the console's showwarning (stderr), restored afterwards
    monkeypatch.setattr(warnings, "showwarning",
                        lambda *a: shown.append(warnings.formatwarning(*a[:4], line=a[5])))
    root = logging.getLogger()
    fh = logging.FileHandler(tmp_path / "eval.log")
    root.addHandler(fh)
    try:
        configure_logging()
        configure_logging()  # idempotent: still one record per warning
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("10 voxel(s) had non-finite fingerprints", RuntimeWarning,
                          stacklevel=1)
    finally:
        root.removeHandler(fh)
        fh.close()
    log = (tmp_path / "eval.log").read_text()
    assert log.count("RuntimeWarning: 10 voxel(s) had non-finite fingerprints (") == 1, log
    assert "warnings.warn(" not in log  # the message, not the source line it came from
    # still shown, once, without the source line it came from
    assert len(shown) == 1 and shown[0].endswith(
        "RuntimeWarning: 10 voxel(s) had non-finite fingerprints\n"), shown


def test_debug_overfit_shows_no_warning_the_user_cannot_act_on(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", MRFLIGHT_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "debug=overfit", "model=ann",
                        "trainer.max_epochs=1", "logger=none", f"hydra.run.dir={out}"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "shuffling" not in r.stdout + r.stderr  # Lightning turns it off and said so
