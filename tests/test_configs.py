"""Every config group composes, and what it describes instantiates."""

from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mrflight.config import CONFIG_DIR, compose_config

GROUPS = ["sequence", "data", "model", "trainer", "callbacks", "logger", "paths", "experiment",
          "hparams_search", "debug"]


def options(group):
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def test_default_config_and_sequence(tmp_path):
    cfg = compose_config(output_dir=tmp_path)
    seq = instantiate(cfg.sequence)
    assert len(seq) == 1750 and seq.name == "oksuz2019"
    assert cfg.model._target_.endswith("GRURegressor") and cfg.seed == 12345
    # the default data: fresh simulated batches with B1 and a noise range
    assert cfg.data._target_.endswith("SimulatedDataModule")
    assert list(cfg.data.noise_std) == [0.005, 0.03] and list(cfg.data.b1_range) == [0.7, 1.3]
    assert list(cfg.data.targets) == ["t1", "t2", "b1"]
    assert cfg.paths.cache_dir.startswith(str(tmp_path / "cache"))
    # no early stopping on fresh data (it cannot be overfitted; the cosine decay ends the run)
    assert "early_stopping" not in cfg.callbacks
    assert set(cfg.logger) == {"csv", "wandb"}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(tmp_path, group):
    opts = options(group)
    assert opts, group
    for opt in opts:
        extra = ["data.path=x.h5"] if (group, opt) == ("data", "file") else []
        extra += ["sequence.path=x.csv"] if (group, opt) == ("sequence", "from_file") else []
        cfg = compose_config([f"{group}={opt}", *extra], output_dir=tmp_path,
                             return_hydra_config=group == "hparams_search")
        OmegaConf.to_container(cfg, resolve=group != "hparams_search")


@pytest.mark.parametrize("model", ["lstm", "gru", "ann", "cnn"])
def test_model_and_module_instantiate(tmp_path, model):
    from mrflight.models import Regressor

    cfg = compose_config([f"model={model}"], output_dir=tmp_path)
    net = instantiate(cfg.model, input_length=1750)
    assert isinstance(net, Regressor)
    module = instantiate(cfg.module, net={**OmegaConf.to_container(cfg.model),
                                          "input_length": 1750}, _recursive_=False)
    assert module.hparams.net["input_length"] == 1750 and module.hparams.lr == cfg.module.lr


@pytest.mark.parametrize("data", ["paper", "random"])
def test_data_instantiates(tmp_path, data):
    cfg = compose_config([f"data={data}", "sequence.n_pulses=50"], output_dir=tmp_path)
    dm = instantiate(cfg.data, sequence=instantiate(cfg.sequence))
    n = 114_000 if data == "paper" else 30_000
    assert len(dm.params) >= n and dm.noise_std == 0.01 and dm.input_length == 50


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp"])
def test_trainers_instantiate_on_cpu(tmp_path, trainer):
    cfg = compose_config([f"trainer={trainer}", "trainer.accelerator=cpu",
                          "trainer.devices=1"], output_dir=tmp_path)
    t = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert t.max_epochs == cfg.trainer.max_epochs


@pytest.mark.parametrize("logger", ["default", "csv", "none"])
def test_callbacks_and_loggers_instantiate(tmp_path, logger):
    cfg = compose_config([f"logger={logger}", "callbacks=[default,early_stopping]"],
                         output_dir=tmp_path)
    loggers = [instantiate(v) for v in (cfg.logger or {}).values()]
    assert len(loggers) == {"default": 2, "csv": 1, "none": 0}[logger]
    cbs = [instantiate(v) for v in cfg.callbacks.values()]
    assert cfg.callbacks.early_stopping.min_delta_rel == 0.005
    assert {type(c).__name__ for c in cbs} >= {"ModelCheckpoint", "RelativeEarlyStopping",
                                               "LearningRateMonitor", "ScatterPlot",
                                               "RichProgressBar"}


def test_debug_overfit_logs_within_its_one_batch_epochs(tmp_path):
    """debug=overfit trains one batch per epoch: with Lightning's log_every_n_steps of 50 every
    run of it warned that the epoch is shorter than the logging interval."""
    cfg = compose_config(["debug=overfit"], output_dir=tmp_path)
    assert cfg.trainer.log_every_n_steps <= cfg.trainer.overfit_batches


def test_experiment_oksuz2019_is_the_paper_protocol(tmp_path):
    cfg = compose_config(["experiment=oksuz2019"], output_dir=tmp_path)
    assert (cfg.data.n_train, cfg.data.n_test, cfg.data.batch_size) == (100000, 5000, 50)
    assert cfg.module.lr == 1e-4 and cfg.callbacks.early_stopping.patience == 100
    assert cfg.callbacks.early_stopping.min_delta_rel == 0.005


@pytest.mark.parametrize("launcher,target", [("slurm", "SlurmLauncher"),
                                             ("parallel", "JoblibLauncher")])
def test_launchers_compose(tmp_path, launcher, target):
    cfg = compose_config([f"hydra/launcher={launcher}"], output_dir=tmp_path,
                         return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_output_dirs_are_unique_per_job():
    raw = (Path(CONFIG_DIR) / "hydra" / "default.yaml").read_text()
    assert "%H-%M-%S-%f" in raw and "${hydra.job.num}" in raw


def test_renamed_targets_of_saved_run_configs_still_instantiate():
    """A run saved before ``lit.py`` became ``regressor.py`` names ``mrflight.lit.MRFRegressor``."""
    from mrflight.config import instantiate
    from mrflight.regressor import MRFRegressor

    built = instantiate({"_target_": "mrflight.lit.MRFRegressor", "_partial_": True})
    assert built.func is MRFRegressor
    # schedule files were read in physics before physics stopped importing the package
    from mrflight.sequence_files import from_file

    built = instantiate({"_target_": "mrflight.physics.sequence.from_file", "_partial_": True})
    assert built.func is from_file


def test_every_config_file_is_package_data():
    """compose_config and the entry points work from an installed package: every YAML file
    under mrflight/configs matches a package-data pattern of pyproject.toml."""
    import ast
    import fnmatch
    import re

    root = Path(CONFIG_DIR).parents[1]
    # the package-data line of pyproject.toml (tomllib needs Python 3.11; we support 3.10)
    line = re.search(r'^"mrflight" = (\[.*\])$', (root / "pyproject.toml").read_text(), re.M)
    patterns = ast.literal_eval(line.group(1))
    files = [p.relative_to(root / "mrflight").as_posix() for p in Path(CONFIG_DIR).rglob("*")
             if p.is_file()]
    assert len(files) > 40
    missing = [f for f in files if not any(fnmatch.fnmatch(f, pat) and f.count("/") ==
                                           pat.count("/") for pat in patterns)]
    assert not missing, missing
