"""W&B, read back from offline runs: flat config, names, groups, tags, summary, eval linkage,
and the W&B sweep config."""

import datetime as dt
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf, open_dict

from mrflight.config import CONFIG_DIR, compose_config
from mrflight.loggers import flat_config, read_offline_run, run_group, run_name
from mrflight.pipeline import evaluate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["debug=tiny", "model=ann", "trainer.max_epochs=2"]


def test_flat_config_is_short_and_has_what_a_dashboard_filters_by(tmp_path):
    cfg = compose_config(["model=gru", "data.noise_std=0.02"], output_dir=tmp_path)
    flat = flat_config(cfg)
    assert {"model": "gru", "hidden_size": 100, "lr": 0.003, "batch_size": 256,
            "noise_std": 0.02, "sequence": "oksuz2019", "seed": 12345, "targets": "t1,t2,b1",
            "loss": "l1", "rank": 48, "head_sizes": "256x256"}.items() <= flat.items()
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert len(json.dumps(flat)) < 1000
    cfg = compose_config(["model=ann"], output_dir=tmp_path)
    with open_dict(cfg):
        cfg.data.noise_std = [0.005, 0.02]  # a noise range
    flat = flat_config(cfg)
    assert flat["hidden_sizes"] == "300x300" and "hidden_size" not in flat
    assert (flat["noise_std_min"], flat["noise_std_max"]) == (0.005, 0.02)


def test_run_names_are_readable_and_unique():
    now = dt.datetime(2026, 11, 26, 3, 12, 45)
    flat = {"model": "gru", "hidden_size": 100, "lr": 0.003, "noise_std": 0.01}
    assert run_name(flat, now=now) == "gru-h100-lr3e-3-1126-031245"
    assert run_name({**flat, "noise_std": 0.02, "lr": 1e-4}, now=now) == \
        "gru-h100-lr1e-4-n2e-2-1126-031245"
    assert run_group(flat, now=now) == "gru-2026-11-26"


def test_two_multiruns_started_in_one_second_are_two_groups():
    from types import SimpleNamespace

    def hc(folder):
        return SimpleNamespace(mode="RunMode.MULTIRUN", sweep=SimpleNamespace(dir=folder))

    flat = {"model": "gru", "hparams_search": "optuna"}
    first = run_group(flat, hc("multirun/2026-11-26/03-12-45-123456"))
    assert first == "optuna-2026-11-26-03-12-45-123456"
    assert run_group(flat, hc("multirun/2026-11-26/03-12-45-654321")) != first


def test_wandb_sweep_config_drives_train_py_with_hydra_overrides(tmp_path):
    sweep = yaml.safe_load((CONFIG_DIR / "wandb_sweep.yaml").read_text())
    assert (ROOT / sweep["program"]).is_file() and sweep["metric"]["name"] == "val/loss"
    cmd = sweep["command"]
    assert cmd[:3] == ["${env}", "python", "${program}"] and cmd[-1] == "${args_no_hyphens}"
    fixed = [c for c in cmd[3:-1]]
    for key, spec in sweep["parameters"].items():
        values = spec.get("values") or [spec["min"], spec["max"]]
        for v in values:
            # what the agent runs: python train.py logger=default key=value (no hyphens)
            cfg = compose_config([*fixed, f"{key}={v}"], output_dir=tmp_path)
            assert OmegaConf.select(cfg, key) == pytest.approx(v), key
            assert "wandb" in cfg.logger
    # the metric it optimises is one the module logs
    assert compose_config(output_dir=tmp_path).optimized_metric == sweep["metric"]["name"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    """A two-job multirun (hidden sizes) with W&B offline."""
    tmp = tmp_path_factory.mktemp("wb")
    sweep = tmp / "multirun" / "2026-11-26" / "03-12-45-123456"
    env = dict(os.environ, WANDB_MODE="offline", MRFLIGHT_CACHE_DIR=str(tmp / "cache"))
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *TINY,
                        "model.hidden_sizes=[8,8],[16,16]", "logger=default",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep


def test_sweep_runs_have_a_flat_config_names_a_group_and_a_summary(sweep_dir):
    runs = [read_offline_run(sweep_dir / j / "wandb") for j in ("0", "1")]
    assert len({r["name"] for r in runs}) == 2
    for r, h in zip(runs, ("8x8", "16x16")):
        assert re.fullmatch(rf"ann-h{h}-lr3e-3-\d{{4}}-\d{{6}}-j\d", r["name"]), r["name"]
        assert r["group"] == "multirun-2026-11-26-03-12-45-123456"
        assert "ann" in r["tags"] and r["job_type"] == "train"
        cfg = r["config"]
        assert cfg["model"] == "ann" and cfg["hidden_sizes"] == h and cfg["lr"] == 0.003
        assert not any(isinstance(v, (dict, list)) for v in cfg.values())  # flat
        assert len(json.dumps(cfg)) < 2000  # no pulse arrays
        s = r["summary"]
        assert "best/val/loss" in s and "test/t1_mae_ms" in s and s["epochs"] == 2
        assert "val/scatter/filenames" in r["history_keys"]  # per-epoch validation figure
    # the CSV logger gets the same flat config
    hp = yaml.safe_load((sweep_dir / "0" / "csv" / "hparams.yaml").read_text())
    assert hp["model"] == "ann" and "sequence" in hp and not isinstance(hp["sequence"], dict)


def test_a_run_file_still_being_written_reads_up_to_its_last_whole_record(sweep_dir, tmp_path):
    """W&B's service may still be writing when the file is read: a chunk cut short or torn (its
    checksum fails) ends the reading there instead of raising a protobuf DecodeError."""
    full_file = next((sweep_dir / "0" / "wandb").glob("offline-run-*/*.wandb"))
    data = full_file.read_bytes()
    full = read_offline_run(full_file.parent)
    cut_dir = tmp_path / "offline-run-cut"
    cut_dir.mkdir()
    seen_name = False
    for cut in [*range(7, len(data), max(1, len(data) // 300)), len(data) - 1]:
        (cut_dir / "run-cut.wandb").write_bytes(data[:cut])
        r = read_offline_run(cut_dir)
        assert r["config"].items() <= full["config"].items(), cut
        assert r["history_keys"] <= full["history_keys"], cut
        seen_name |= r.get("name") == full["name"]
    assert seen_name  # the early records are read from a file cut short
    # a torn chunk (a byte of the first record never reached the disk) ends the reading at it
    torn = bytearray(data)
    torn[7 + 7] ^= 0xFF
    (cut_dir / "run-cut.wandb").write_bytes(bytes(torn))
    assert read_offline_run(cut_dir) == {"config": {}, "summary": {}, "history_keys": set()}


def test_eval_run_joins_the_group_of_the_runs_it_evaluates(sweep_dir, tmp_path, wandb_record):
    out = tmp_path / "eval"
    cfg = compose_config([f"ckpt_path={sweep_dir}", "logger=wandb", "evaluation.n_test=30",
                          "evaluation.noise_levels=[0.01]", "evaluation.phantoms=[]",
                          "evaluation.plots=false", "evaluation.bound=false",
                          "evaluation.latency_repeats=2", "evaluation.test_sets=[paper]",
                          "evaluation.svd_rank=5"], output_dir=out, config_name="eval")
    with open_dict(cfg):
        cfg.paths.cache_dir = None
    evaluate(cfg)
    key = "eval/paper/0.01/matching/t1_mae_ms"
    r = wandb_record(out / "wandb", lambda r: "name" in r and key in r["summary"])
    assert r["group"] == "multirun-2026-11-26-03-12-45-123456" and r["job_type"] == "eval"
    assert r["name"].startswith("eval-ann-")
    assert len(r["config"]["checkpoints"]) == 2 and len(r["config"]["evaluated_runs"]) == 2
    assert any(k.startswith("eval/table/") for k in r["history_keys"])  # a wandb.Table
    assert "eval/paper/0.01/matching/t1_mae_ms" in r["summary"]
