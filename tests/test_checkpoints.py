"""Checkpoints and resuming: nothing is lost, nothing a checkpoint holds can run code.

Resume takes the run's own config and continues its logs; last.ckpt is the last finished epoch;
the best checkpoint is chosen by the score recorded in it and never a file that does not load;
checkpoints are written atomically (a full disk leaves the previous file and one error line);
stale temporary files of killed writers are removed; crafted checkpoints are refused.
"""

import csv
import errno
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import mrflight
from mrflight import checkpoints
from mrflight.checkpoints import best_checkpoint, find_checkpoints, read_checkpoint
from mrflight.fileio import remove_stale_temp_files
from mrflight.pipeline import compose_config, train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["~callbacks.rich_progress_bar", "++trainer.enable_progress_bar=false",
         "~callbacks.scatter_plot"]
TINY = ["debug=tiny", "logger=none", *QUIET]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def _cli(script, args, cwd):
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("MRFLIGHT_DEBUG", None)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _error_line(r) -> str:
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().splitlines()[-1] == errors[0], r.stderr[-3000:]
    return errors[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A run started from the command line: tiny ANN, one epoch, CSV log (and .hydra/)."""
    base = tmp_path_factory.mktemp("cli")
    run = base / "run"
    r = _cli("train.py", ["debug=tiny", "model=ann", "trainer.max_epochs=1", "logger=csv",
                          "test=false", *QUIET, f"hydra.run.dir={run}"], base)
    assert r.returncode == 0, r.stderr[-3000:]
    return run


def _copy(run, dest) -> Path:
    shutil.copytree(run, dest)
    return dest


def _csv_rows(run):
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------------

def test_resume_without_the_original_overrides_uses_the_runs_config(cli_run, tmp_path):
    run = _copy(cli_run, tmp_path / "run")
    hydra_cfg = (run / ".hydra" / "config.yaml").read_bytes()
    rows_before = _csv_rows(run)
    assert {r["epoch"] for r in rows_before if r["val/loss"]} == {"0"}
    # the README's command: no debug=tiny, no model=ann (the defaults would be the paper grid
    # and a GRU, whose weights do not fit)
    r = _cli("train.py", [f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_epochs=2",
                          "test=false"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "exists and is not empty" not in r.stdout + r.stderr  # its own checkpoints
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["epoch"] == 1
    assert last["hyper_parameters"]["net"]["_target_"].endswith("ANNRegressor")
    saved = yaml.safe_load((run / "checkpoints" / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 2  # the new override on top of the run's config
    # the cosine schedule spanned the run (T_max 1): it spans the longer one and goes on from
    # eta_min, instead of rising again past its old T_max (to 3e-3 after epoch 1)
    first_sched = read_checkpoint(cli_run / "checkpoints" / "last.ckpt")["lr_schedulers"][0]
    assert first_sched["T_max"] == 1 and first_sched["_last_lr"][0] == pytest.approx(1e-5)
    assert saved["module"]["scheduler"]["T_max"] == 2
    assert last["lr_schedulers"][0]["T_max"] == 2
    assert last["lr_schedulers"][0]["_last_lr"][0] == pytest.approx(1e-5)
    assert saved["data"]["params"]["n"] == 600 and saved["sequence"]["n_pulses"] == 100
    assert saved["model"]["_target_"].endswith("ANNRegressor")
    assert (run / ".hydra" / "config.yaml").read_bytes() == hydra_cfg  # how it was started
    # item: the CSV log continues (epoch 0 rows kept once, epoch 1 appended)
    rows = _csv_rows(run)
    val_epochs = [r["epoch"] for r in rows if r["val/loss"]]
    assert val_epochs == ["0", "1"]
    assert rows[:len(rows_before) - 1] == rows_before[:len(rows_before) - 1]
    steps = [int(r["step"]) for r in rows if r["train/loss_step"]]
    assert steps == sorted(steps) and len(steps) == len(set(steps))
    # a T_max the command sets is the one the resumed schedule uses
    r = _cli("train.py", [f"hydra.run.dir={run}", "ckpt_path=last", "trainer.max_epochs=3",
                          "module.scheduler.T_max=7", "test=false"], tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert read_checkpoint(run / "checkpoints" / "last.ckpt")["lr_schedulers"][0]["T_max"] == 7


def test_resume_refuses_overrides_that_change_the_model_and_writes_nothing(cli_run, tmp_path):
    run = _copy(cli_run, tmp_path / "run")
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    line = _error_line(_cli("train.py", [f"hydra.run.dir={run}", "ckpt_path=last", "model=gru",
                                         "data.noise_std=0.05", "sequence.n_pulses=120"],
                            tmp_path))
    for key in ("model._target_", "data.noise_std", "sequence.n_pulses", "new run"):
        assert key in line, line
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert after == files


def test_resume_refuses_a_saved_config_that_builds_other_code(cli_run, tmp_path):
    # a run folder from elsewhere: its saved config must not build what the command does not
    run = _copy(cli_run, tmp_path / "run")
    payload = tmp_path / "payload.npy"
    np.save(payload, np.array([print], dtype=object), allow_pickle=True)
    saved = yaml.safe_load((run / "checkpoints" / "config.yaml").read_text())
    saved["callbacks"]["x"] = {"_target_": "mrflight.fileio.np.load", "file": str(payload),
                               "allow_pickle": True}
    (run / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(saved))
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    line = _error_line(_cli("train.py", [f"ckpt_path={run}", "trainer.max_epochs=2",
                                         f"hydra.run.dir={tmp_path / 'new'}", "test=false"],
                            tmp_path))
    assert "callbacks.x names 'mrflight.fileio.np.load'" in line, line
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.suffix != ".log"}
    assert after == files
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_resume_in_python_refuses_another_model(tmp_path):
    out = tmp_path / "run"
    train(compose_config([*TINY, "model=ann", "trainer.max_epochs=1", "test=false"],
                         output_dir=out))
    before = (out / "checkpoints" / "config.yaml").read_bytes()
    with pytest.raises(ValueError, match="model._target_.*new run"):
        train(compose_config([*TINY, "model=gru", "ckpt_path=last"], output_dir=out))
    # another loss: val/loss, which picks the best checkpoint, would change its unit mid-run
    with pytest.raises(ValueError, match="module.loss: 'l1' -> 'mse'.*or loss"):
        train(compose_config([*TINY, "model=ann", "module.loss=mse", "ckpt_path=last"],
                             output_dir=out))
    assert (out / "checkpoints" / "config.yaml").read_bytes() == before


def test_last_ckpt_is_the_last_epoch_even_when_the_metric_does_not_improve(tmp_path):
    out = tmp_path / "run"
    # mode=max on a decreasing loss: only epoch 0 is "best", yet last.ckpt must follow
    train(compose_config([*TINY, "model=ann", "trainer.max_epochs=3", "test=false",
                          "callbacks.model_checkpoint.mode=max", "module.loss=mse"],
                         output_dir=out))
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["epoch"] == 2
    assert sorted(p.name for p in (out / "checkpoints").glob("*.ckpt")) == [
        "epoch_000.ckpt", "last.ckpt"]


# --------------------------------------------------------------------------------------------
# choosing checkpoints
# --------------------------------------------------------------------------------------------

_KEY = ("ModelCheckpoint{'monitor': 'val/loss', 'mode': '%s', 'every_n_train_steps': 0, "
        "'every_n_epochs': 1, 'train_time_interval': None}")


def _fake(path: Path, epoch: int, score: float | None, mode: str = "min") -> Path:
    cbs = {} if score is None else {_KEY % mode: {"monitor": "val/loss",
                                                  "current_score": torch.tensor(score)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "epoch": epoch, "global_step": 10 * epoch,
                "callbacks": cbs}, path)
    return path


def test_best_checkpoint_is_chosen_by_the_recorded_score_not_the_newest(tmp_path):
    d = tmp_path / "run" / "checkpoints"
    best = _fake(d / "epoch_010.ckpt", 10, 0.10)
    _fake(d / "epoch_011.ckpt", 11, 0.20)  # newer, worse
    _fake(d / "epoch_009.ckpt", 9, 0.30)
    trunc = d / "epoch_012.ckpt"  # newest and "best" by its name, but truncated (disk full)
    trunc.write_bytes(_fake(tmp_path / "x.ckpt", 12, 0.01).read_bytes()[:300])
    _fake(d / "last.ckpt", 12, 0.2)
    with pytest.warns(RuntimeWarning, match="epoch_012.ckpt"):
        assert best_checkpoint(tmp_path / "run") == best
    # the mode recorded by the callback is used
    m = tmp_path / "max" / "checkpoints"
    _fake(m / "epoch_001.ckpt", 1, 0.5, "max")
    hi = _fake(m / "epoch_002.ckpt", 2, 0.9, "max")
    _fake(m / "epoch_003.ckpt", 3, 0.7, "max")
    assert best_checkpoint(m) == hi
    # no score recorded: a NAME=VALUE in the file name, else the latest epoch
    n = tmp_path / "names" / "checkpoints"
    good = _fake(n / "epoch=4-val_loss=0.120.ckpt", 4, None)
    _fake(n / "epoch=5-val_loss=0.300.ckpt", 5, None)
    assert best_checkpoint(n) == good
    # only last.ckpt loads: it is used
    o = tmp_path / "only_last" / "checkpoints"
    (o).mkdir(parents=True)
    (o / "epoch_001.ckpt").write_bytes(b"truncated")
    last = _fake(o / "last.ckpt", 3, None)
    with pytest.warns(RuntimeWarning):
        assert best_checkpoint(o) == last
    # nothing loads: one error naming each file, not a warning saying the same before it
    (o / "last.ckpt").write_bytes(b"truncated")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="no checkpoint in .* loads .*epoch_001.*last"):
            best_checkpoint(o)


def test_find_checkpoints_takes_the_best_of_each_run_and_nothing_else(tmp_path):
    root = tmp_path / "multirun"
    runs = []
    for job, scores in (("0", (0.3, 0.1)), ("1", (0.05, 0.2))):
        d = root / "2026-01-01" / "10-00-00" / job
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "config.yaml").write_text("model: {}\n")
        for e, s in enumerate(scores):
            _fake(d / "checkpoints" / f"epoch_{e:03d}.ckpt", e, s)
        _fake(d / "checkpoints" / "last.ckpt", 1, None)
        runs.append(d)
    _fake(root / "stray" / "checkpoints" / "epoch_000.ckpt", 0, 0.0)  # no config: not a run
    _fake(root / "2026-01-01" / ".trash" / "checkpoints" / "epoch_000.ckpt", 0, 0.0)
    _fake(root / "a" / "b" / "c" / "d" / "e" / "checkpoints" / "epoch_000.ckpt", 0, 0.0)
    (root / "a" / "b" / "c" / "d" / "e" / "config.yaml").write_text("{}")
    found = find_checkpoints(root)
    assert found == [runs[0] / "checkpoints" / "epoch_001.ckpt",
                     runs[1] / "checkpoints" / "epoch_000.ckpt"]
    # a run dir or its checkpoints folder: its best, even without a config
    assert find_checkpoints(root / "stray") == [root / "stray/checkpoints/epoch_000.ckpt"]
    assert find_checkpoints(runs[1] / "checkpoints") == [found[1]]
    with pytest.raises(ValueError, match="no such"):
        find_checkpoints(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no training run"):
        find_checkpoints(tmp_path / "empty")


def test_a_folder_of_links_to_runs_finds_each_run_once(tmp_path):
    """Runs gathered with symbolic links (ln -s outputs/DATE/TIME picked/) were not searched:
    'no training run under picked'. A run linked twice, or a link loop, is searched once."""
    run = tmp_path / "outputs" / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("model: {}\n")
    _fake(run / "checkpoints" / "epoch_000.ckpt", 0, 0.1)
    picked = tmp_path / "picked"
    picked.mkdir()
    (picked / "again").symlink_to(run)
    (picked / "best").symlink_to(run)
    (picked / "loop").symlink_to(picked)
    assert find_checkpoints(picked) == [picked / "again" / "checkpoints" / "epoch_000.ckpt"]


def test_a_sweep_whose_jobs_all_failed_is_named_as_such(tmp_path):
    """eval.py on a multirun in which no job got a checkpoint says why, job by job (it said
    only that there was no training run under the folder)."""
    from mrflight.hydra_callbacks import FAILED_FILE

    sweep = tmp_path / "sweep"
    for job in ("0", "1"):
        (sweep / job).mkdir(parents=True)
        (sweep / job / "train.log").write_text("")
    (sweep / "0" / FAILED_FILE).write_text('{"error": "data.noise_std must be finite"}')
    with pytest.raises(ValueError, match=re.escape(
            f"ckpt_path={sweep}: no training run under {sweep} has a checkpoint to evaluate: "
            "run 0: not evaluated, the job failed (data.noise_std must be finite); run 1: not "
            "evaluated, no checkpoint (still in its first epoch, or it stopped or failed before "
            "that ended: see its train.log)")):
        find_checkpoints(sweep)


def test_checkpoints_that_do_not_load_are_collected_for_the_run_notes(tmp_path):
    """eval.py collects the checkpoints that do not load (instead of warnings on stderr only)
    and names each in its run notes: a run left out, and a run evaluated from the best of its
    checkpoints that does load."""
    import warnings

    from mrflight.checkpoints import run_notes

    root = tmp_path / "sweep"
    for job in ("0", "1", "2"):
        (root / job / ".hydra").mkdir(parents=True)
        (root / job / ".hydra" / "config.yaml").write_text("model: {}\n")
        _fake(root / job / "checkpoints" / "epoch_000.ckpt", 0, 0.3)
        _fake(root / job / "checkpoints" / "epoch_001.ckpt", 1, 0.1)
    for f in [*(root / "1" / "checkpoints").glob("*.ckpt"), root / "2/checkpoints/epoch_001.ckpt"]:
        f.write_bytes(f.read_bytes()[:300])
    unloadable = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # collected, not warned about
        found = find_checkpoints(root, unloadable)
    assert found == [root / "0/checkpoints/epoch_001.ckpt", root / "2/checkpoints/epoch_000.ckpt"]
    assert sorted(unloadable) == [root / "1/checkpoints/epoch_000.ckpt",
                                  root / "1/checkpoints/epoch_001.ckpt",
                                  root / "2/checkpoints/epoch_001.ckpt"]
    why = "is not a readable mrflight checkpoint (RuntimeError: PytorchStreamReader failed"
    assert all(why in e and "miniz" not in e for e in unloadable.values()), unloadable
    notes = run_notes(root, found, unloadable)
    assert len(notes) == 2, notes
    assert re.fullmatch(r"run 1: not evaluated, 2 checkpoints do not load: "
                        r"checkpoints/epoch_000\.ckpt \(checkpoint '.*/1/checkpoints/"
                        r"epoch_000\.ckpt' .*\); checkpoints/epoch_001\.ckpt \(.*\); fix that "
                        r"and evaluate the run again", notes[0]), notes[0]
    assert notes[1] == (f"run 2: checkpoints/epoch_001.ckpt does not load "
                        f"({unloadable[root / '2/checkpoints/epoch_001.ckpt']}); "
                        "checkpoints/epoch_000.ckpt, its best checkpoint that loads, is "
                        "evaluated instead")
    assert run_notes(root) == []  # without them: only the jobs that did not finish


def test_load_checkpoint_of_a_directory_says_which_file_to_give(tmp_path):
    _fake(tmp_path / "run" / "checkpoints" / "epoch_001.ckpt", 1, 0.2)
    best = _fake(tmp_path / "run" / "checkpoints" / "epoch_002.ckpt", 2, 0.1)
    with pytest.raises(ValueError, match=f"is a directory.*{best}"):
        mrflight.load_checkpoint(tmp_path / "run")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="directory with no .ckpt"):
        mrflight.load_checkpoint(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------
# disk full, atomic checkpoints, stale temporary files
# --------------------------------------------------------------------------------------------

def test_disk_full_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch,
                                                                    capsys):
    import lightning.fabric.plugins.io.torch_io as torch_io

    from mrflight.errors import guard

    real, calls = torch_io._atomic_save, []

    def full_disk(checkpoint, path):
        calls.append(path)
        if len(calls) <= 2:  # epoch 0 (best and last) fits
            return real(checkpoint, path)
        with open(path, "wb") as f:  # half written, then the disk is full
            f.write(b"PK\x03\x04" + b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch_io, "_atomic_save", full_disk)
    out = tmp_path / "run"
    cfg = compose_config([*TINY, "model=ann", "trainer.max_epochs=3", "test=false",
                          "callbacks.model_checkpoint.save_top_k=-1"], output_dir=out)
    with pytest.raises(SystemExit) as e:
        guard(train)(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no space left on device writing ")
    assert str(out / "checkpoints") in err[-1] and "paths.output_dir" in err[-1]
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.suffix == ".ckpt")
    assert ckpts == ["epoch_000.ckpt", "last.ckpt"]  # no truncated file, no temporary file
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert read_checkpoint(out / "checkpoints" / "last.ckpt")["epoch"] == 0


def test_stale_temporary_files_are_removed_when_the_cache_is_opened(tmp_path):
    from mrflight import dictionary
    from mrflight.physics.sequence import oksuz2019

    cache = tmp_path / "cache2"
    cache.mkdir()
    from mrflight.fileio import _host

    host = _host()  # the host name and PID namespace writers put in the name
    bare = socket.gethostname().split(".")[0]
    if os.path.exists("/proc/self/ns/pid"):  # Linux: a pid names a writer in its namespace
        ns = os.readlink("/proc/self/ns/pid").split("[")[1].rstrip("]")
        assert host == f"{bare}-pid{ns}"
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    dead = p.pid
    names = {
        f".KEY.h5.{dead}@{host}.abcd1234.h5.tmp": False,        # writer gone: removed
        ".OLD.h5.abcd_123.h5.tmp": False,                       # no writer, 2 h old: removed
        f".RUN.h5.{os.getpid()}@{host}.zzzz9999.h5.tmp": True,  # this process: kept
        f".FAR.h5.{dead}@otherhost.qqqq0000.h5.tmp": True,      # another host, fresh: kept
        # the same host name in another PID namespace (a container sharing the folder): its
        # process ids are not ours, so a fresh file is kept
        f".BOX.h5.{dead}@{bare}-pid1.rrrr1111.h5.tmp": True,
        ".NEW.h5.abcd_123.h5.tmp": True,                        # no writer, fresh: kept
        "KEY.h5": True,                                         # not a temporary file
        ".hidden_user_file": True,
    }
    two_hours_ago = time.time() - 7200
    for n in names:
        (cache / n).write_bytes(b"x" * 10)
    for n in (".OLD.h5.abcd_123.h5.tmp", "KEY.h5", ".hidden_user_file"):
        os.utime(cache / n, (two_hours_ago, two_hours_ago))
    seq = oksuz2019(n_pulses=20, lobe_length=5)
    dictionary.generate(seq, dictionary.random_params(n=5, seed=0), cache_dir=cache,
                        progress=False)
    for n, kept in names.items():
        assert (cache / n).exists() == kept, n
    assert remove_stale_temp_files(cache, max_age_s=0) != []  # the fresh ones are old now


def test_two_runs_started_at_once_in_one_folder_do_not_both_write_it(tmp_path):
    """Two runs started in the same folder at the same time (the same hydra.run.dir twice, a
    job started again while it still runs) both found it without results and both wrote it:
    one's test metrics came from the other's checkpoint, their rows interleaved in
    metrics.csv. A run holds a lock on its folder while it runs: the second is refused before
    writing anything, and once the first has ended (or died) the folder is free again."""
    from mrflight.fileio import LOCK_FILE, lock_folder

    out = tmp_path / "run"
    out.mkdir()
    first = lock_folder(out)  # a run under way in this folder (another process, another host)
    assert first is not None
    try:
        cfg = compose_config([*TINY, "model=ann", "trainer.max_epochs=1", "test=false"],
                             output_dir=out)
        with pytest.raises(ValueError, match="being written by another run") as e:
            train(cfg)
        assert str(out) in str(e.value) and "hydra.run.dir" in str(e.value)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        first.close()
    train(cfg)  # the folder is free once that run has ended
    assert (out / "checkpoints" / "last.ckpt").is_file()
    again = lock_folder(out)  # and the finished run holds no lock (a joblib worker goes on)
    assert again is not None
    again.close()


def test_atomic_path_names_the_file_when_the_disk_is_full(tmp_path):
    from mrflight.fileio import atomic_path

    dest = tmp_path / "metrics.json"
    with pytest.raises(OSError) as e, atomic_path(dest):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(dest)
    assert list(tmp_path.iterdir()) == []


def test_a_full_quota_is_reported_as_a_full_disk_naming_the_file(tmp_path, capsys):
    from omegaconf import OmegaConf

    from mrflight.errors import guard
    from mrflight.fileio import atomic_path

    dest = tmp_path / "metrics.json"

    def write(cfg):
        with atomic_path(dest) as tmp:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp))

    with pytest.raises(SystemExit) as e:
        guard(write)(OmegaConf.create({}))
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: disk quota exceeded writing {dest}: free space or set paths.output_dir")
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# checkpoints from untrusted sources
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("MRFLIGHT_CACHE_DIR", str(out.parent / "cache"))
    try:
        train(compose_config([*TINY, "model=ann", "trainer.max_epochs=1", "test=false"],
                             output_dir=out))
    finally:
        mp.undo()
    return out / "checkpoints" / "last.ckpt"


def test_a_stored_dictionary_runs_checkpoints_record_its_train_splits_range(real_ckpt):
    """A run on a stored dictionary (debug=tiny: random atoms, a FingerprintDataModule whose
    config has no t1_range) records the smallest and largest T1 and T2 of its train split, not
    of its validation or test split, in its checkpoints: maps flag the estimates above it."""
    from omegaconf import OmegaConf

    from mrflight.config import instantiate

    cfg = OmegaConf.load(real_ckpt.parent / "config.yaml")
    assert "t1_range" not in cfg.data
    dm = instantiate(cfg.data, sequence=instantiate(cfg.sequence), progress=False)
    _, params, _, splits = dm.load_splits()
    train = params[splits["train"]]
    want = {"t1": [train[:, 0].min(), train[:, 0].max()],
            "t2": [train[:, 1].min(), train[:, 1].max()]}
    for ckpt in sorted(real_ckpt.parent.glob("*.ckpt")):
        got = read_checkpoint(ckpt)["hyper_parameters"]["training_range"]
        assert got.keys() == want.keys(), ckpt
        for k in want:
            np.testing.assert_allclose(got[k], [float(v) for v in want[k]], rtol=1e-6)
            # the stored values' shortest decimals, as a user reads them in the sidecars
            assert [repr(v) for v in got[k]] == [str(np.float32(v)) for v in want[k]], got[k]
    assert mrflight.load_checkpoint(real_ckpt).hparams["training_range"] == got


def test_a_checkpoint_naming_another_callable_is_refused(real_ckpt, tmp_path):
    marker = tmp_path / "pwned"
    ck = torch.load(real_ckpt, weights_only=True)
    ck["hyper_parameters"]["net"] = {"_target_": "os.system", "command": f"touch {marker}"}
    bad = tmp_path / "crafted.ckpt"
    torch.save(ck, bad)
    with pytest.raises(ValueError, match="'os.system' is not an mrflight regressor"):
        mrflight.load_checkpoint(bad)
    assert not marker.exists()
    # eval.py / maps load through the same function
    with pytest.raises(ValueError, match="not an mrflight regressor"):
        from mrflight.models import build_net

        build_net({"_target_": "subprocess.run", "args": ["touch", str(marker)]})
    assert not marker.exists()
    # a scheduler named by the checkpoint: only torch.optim.lr_scheduler classes
    with pytest.raises(ValueError, match="not allowed"):
        checkpoints.scheduler_class("os.system")
    assert checkpoints.scheduler_class("torch.optim.lr_scheduler.StepLR").__name__ == "StepLR"


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_payload_in_a_checkpoint_is_not_run(real_ckpt, tmp_path):
    marker = tmp_path / "pwned"
    ck = torch.load(real_ckpt, weights_only=True)
    ck["hyper_parameters"]["noise_std"] = _Payload(marker)
    bad = tmp_path / "payload.ckpt"
    torch.save(ck, bad)
    with pytest.raises(ValueError, match="refused"):
        mrflight.load_checkpoint(bad)
    with pytest.raises(ValueError, match="refused"):  # resume reads it the same way
        checkpoints.resume_checkpoint(str(bad), tmp_path)
    assert not marker.exists()
    # the file is not chosen as a run's best either
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    shutil.copy(bad, run / "epoch_009.ckpt")
    shutil.copy(real_ckpt, run / "epoch_001.ckpt")
    with pytest.warns(RuntimeWarning, match="epoch_009"):
        assert best_checkpoint(run) == run / "epoch_001.ckpt"
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_named_as_such_not_refused(real_ckpt, tmp_path):
    """Random bytes or a .npy array: 'not a PyTorch checkpoint'; a real checkpoint holding a
    pickled object: refused, naming the object. Never torch's advice to load unsafely."""
    rng = np.random.default_rng(0)
    (tmp_path / "random.ckpt").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    np.save(tmp_path / "array.npy", np.zeros(10))
    for name in ("random.ckpt", "array.npy"):
        with pytest.raises(ValueError) as err:
            mrflight.load_checkpoint(tmp_path / name)
        msg = str(err.value)
        assert f"{name}' is not a PyTorch checkpoint" in msg and "refused" not in msg, msg
        assert "weights_only" not in msg and "Re-running" not in msg, msg
    marker = tmp_path / "pwned"
    ck = torch.load(real_ckpt, weights_only=True)
    ck["hyper_parameters"]["noise_std"] = _Payload(marker)
    for legacy in (False, True):  # the zip archive, and the old pickle format of torch.save
        bad = tmp_path / f"payload_{legacy}.ckpt"
        torch.save(ck, bad, _use_new_zipfile_serialization=not legacy)
        with pytest.raises(ValueError, match=r"refused .*: it names \S+\.system\. ") as err:
            read_checkpoint(bad)
        assert "weights_only" not in str(err.value) and "allowlist" not in str(err.value)
    assert not marker.exists()
    line = _error_line(_cli("eval.py", [f"ckpt_path={tmp_path / 'array.npy'}"], tmp_path))
    assert "array.npy' is not a PyTorch checkpoint" in line and "weights_only" not in line


def test_resume_into_a_model_the_checkpoint_does_not_fit_names_the_keys(real_ckpt, tmp_path):
    lone = tmp_path / "lone.ckpt"  # no saved config beside it: resumed with the given config
    shutil.copy(real_ckpt, lone)
    with pytest.raises(ValueError, match=r"does not fit the configured model \(missing keys "
                                         r"net\.\S+, .* \(\+\d+ more\); unexpected keys net\."):
        train(compose_config([*TINY, "model=gru", f"ckpt_path={lone}"],
                             output_dir=tmp_path / "gru"))
    with pytest.raises(ValueError, match=r"does not fit the configured model \(net\.\S+ has "
                                         r"shape \[\d+, 100\] in the checkpoint, \[\d+, 120\] "
                                         r"in the model"):
        train(compose_config([*TINY, "model=ann", "sequence.n_pulses=120", f"ckpt_path={lone}"],
                             output_dir=tmp_path / "longer"))


def test_every_checkpoint_mrflight_writes_loads_with_weights_only(real_ckpt):
    for f in real_ckpt.parent.glob("*.ckpt"):
        ck = torch.load(f, weights_only=True)  # raises on any pickled object
        assert "mrflight_random_state" in ck["callbacks"]
    module = mrflight.load_checkpoint(real_ckpt)
    x = torch.rand(3, 100)
    assert torch.isfinite(module.predict_parameters(x)).all()


def test_a_diverged_checkpoint_is_refused_not_turned_into_nan_estimates(real_ckpt, tmp_path):
    """NaN weights (a run that diverged) are an error naming the file, for eval.py, maps and
    export alike (all load through load_checkpoint), not NaN maps or a NaN ONNX model."""
    from mrflight.export import export_checkpoints

    ck = torch.load(real_ckpt, weights_only=True)
    name = next(k for k, v in ck["state_dict"].items() if v.is_floating_point())
    ck["state_dict"][name][0] = float("nan")
    bad = tmp_path / "run" / "checkpoints" / "epoch_004.ckpt"
    bad.parent.mkdir(parents=True)
    torch.save(ck, bad)
    msg = re.escape(f"'{bad}' has NaN or infinite weights ({name}): its training diverged")
    with pytest.raises(ValueError, match=msg):
        mrflight.load_checkpoint(bad)
    with pytest.raises(ValueError, match=msg):
        export_checkpoints(bad.parent.parent, "torchscript", tmp_path / "out")
    assert not list(tmp_path.glob("out/*.pt"))


def test_eval_refuses_a_run_config_that_builds_other_code(real_ckpt, tmp_path):
    from mrflight.checkpoints import read_run_config

    run = tmp_path / "run"
    shutil.copytree(real_ckpt.parent.parent, run)
    cfg = yaml.safe_load((run / "checkpoints" / "config.yaml").read_text())
    cfg["sequence"] = {"_target_": "os.system", "command": "true"}
    (run / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="'os.system'.*only mrflight"):
        read_run_config(run / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("node, target", [
    ("sequence", "mrflight.fileio.np.load"),       # resolves to numpy.load (pickles: code)
    ("sequence", "mrflight.fileio.save_mat"),      # an mrflight function that writes any file
    ("data", "mrflight.pipeline.os.makedirs"),
])
def test_eval_refuses_a_run_config_that_reaches_other_code_through_mrflight(
        real_ckpt, tmp_path, monkeypatch, node, target):
    from mrflight.checkpoints import read_run_config

    run = tmp_path / "run"
    shutil.copytree(real_ckpt.parent.parent, run)
    payload = tmp_path / "payload.npy"
    np.save(payload, np.array([print], dtype=object), allow_pickle=True)
    cfg = yaml.safe_load((run / "checkpoints" / "config.yaml").read_text())
    cfg[node] = {"_target_": target, "file": str(payload), "allow_pickle": True}
    (run / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=f"{node} names '{target}'"):
        read_run_config(run / "checkpoints" / "last.ckpt")
    # the shipped configs' targets still load
    cfg[node] = yaml.safe_load((real_ckpt.parent / "config.yaml").read_text())[node]
    (run / "checkpoints" / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert read_run_config(run / "checkpoints" / "last.ckpt")[1][node] == cfg[node]


def test_every_shipped_sequence_and_data_target_is_allowed_in_a_run_config():
    from mrflight.checkpoints import run_config_targets
    from mrflight.config import CONFIG_DIR

    allowed = run_config_targets()
    found = {"sequence": set(), "data": set()}
    for group, node in (("sequence", "sequence"), ("data", "data"), ("grid", "data")):
        for f in (CONFIG_DIR / group).glob("*.yaml"):
            found[node] |= set(re.findall(r"_target_:\s*(\S+)", f.read_text()))
    for node in found:
        assert found[node] and found[node] <= allowed[node], (node, found[node] - allowed[node])


# --------------------------------------------------------------------------------------------
# devices
# --------------------------------------------------------------------------------------------

def test_an_unusable_cuda_device_is_a_clear_error(real_ckpt):
    from mrflight.matching import DictionaryMatcher
    from mrflight.physics import oksuz2019, simulate

    if torch.cuda.is_available():
        device, match = f"cuda:{torch.cuda.device_count()}", "does not exist"
    elif torch.version.cuda is None:
        device, match = "cuda", "CUDA is not available in this torch build: use device=cpu"
    else:
        device, match = "cuda", "no CUDA GPU is usable"
    seq = oksuz2019(n_pulses=20, lobe_length=5)
    with pytest.raises(ValueError, match=match):
        simulate(seq, 1000.0, 100.0, device=device)
    atoms = simulate(seq, torch.tensor([800.0, 1200.0]), torch.tensor([50.0, 90.0]))
    with pytest.raises(ValueError, match=match):
        DictionaryMatcher(atoms, np.array([[800.0, 50.0], [1200.0, 90.0]]), device=device)
    with pytest.raises(ValueError, match=match):
        mrflight.load_checkpoint(real_ckpt, map_location=device)
    from omegaconf import OmegaConf

    from mrflight.eval_entry import maps_from_config

    cfg = OmegaConf.create({"input": "scan.nii.gz", "ckpt_path": str(real_ckpt),
                            "dictionary": None, "mask": None, "paths": {"output_dir": "x"},
                            "maps": {"device": device, "progress": False}})
    with pytest.raises(ValueError, match=match):
        maps_from_config(cfg)


USER_NET = '''
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, input_length, in_channels=1, n_outputs=2, hidden=8):
        super().__init__()
        self.input_length, self.in_channels = input_length, in_channels
        self.n_outputs, self.hidden = n_outputs, hidden
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(input_length * in_channels, hidden),
                                  nn.ReLU(), nn.Linear(hidden, n_outputs))

    def forward(self, x):
        return self.body(x)
'''


def test_a_users_own_model_trains_and_loads_once_trusted(tmp_path, monkeypatch):
    """A model of the user's own (their module, their config dir) trains with train.py; a
    checkpoint naming it is refused until trusted, with the way to trust it, which works."""
    from mrflight.models import base, trust
    from mrflight.pipeline import evaluate

    (tmp_path / "user_nets.py").write_text(USER_NET)
    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "tiny.yaml").write_text("_target_: user_nets.TinyNet\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(base, "_TRUSTED", {})
    out = tmp_path / "run"
    train(compose_config([*TINY, f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                          "model=tiny", "trainer.max_epochs=1", "test=false"], output_dir=out))
    ckpt = out / "checkpoints" / "last.ckpt"
    monkeypatch.setattr(base, "_TRUSTED", {})  # a new process: eval.py, a notebook
    with pytest.raises(ValueError, match=re.escape("eval.py trust=[user_nets.TinyNet]")):
        mrflight.load_checkpoint(ckpt)
    with pytest.raises(ValueError, match="not an nn.Module class"):
        trust("os.system")
    trust("user_nets.TinyNet")
    assert type(mrflight.load_checkpoint(ckpt).net).__name__ == "TinyNet"
    monkeypatch.setattr(base, "_TRUSTED", {})
    cfg = compose_config([f"ckpt_path={out}", "trust=[user_nets.TinyNet]",
                          "evaluation.test_sets=[paper]", "evaluation.n_test=50",
                          "evaluation.noise_levels=[0.01]", "evaluation.svd_rank=null",
                          "evaluation.phantoms=[]", "evaluation.plots=false",
                          "evaluation.efficiency=false", "evaluation.offgrid_b1=false",
                          "evaluation.robustness=false", "evaluation.matching_b1=false",
                          "evaluation.latency_repeats=2"],
                         output_dir=tmp_path / "eval", config_name="eval")
    rows = evaluate(cfg)
    assert any(r.get("method") == "tinynet" for r in rows)


@pytest.mark.parametrize("value, paths", [("user_nets.TinyNet", ["user_nets.TinyNet"]),
                                          (["a.Net", "b.Net"], ["a.Net", "b.Net"]),
                                          ([], []), (None, [])])
def test_trust_takes_a_list_or_one_class_path(value, paths):
    """``trust=user_nets.TinyNet`` (no brackets) is that one class, not its letters."""
    from omegaconf import OmegaConf

    from mrflight.pipeline import _trusted_paths

    assert _trusted_paths(OmegaConf.create({"trust": value}).trust) == paths


@pytest.mark.parametrize("value", [5, [5], {"a": "b.C"}])
def test_trust_of_no_class_paths_is_one_error(value):
    from omegaconf import OmegaConf

    from mrflight.pipeline import _trusted_paths

    with pytest.raises(ValueError, match=r"^trust=.*give the class paths.*trust=\[mymodels"):
        _trusted_paths(OmegaConf.create({"trust": value}).trust)
