"""The README's set-up commands are what CI runs, and they are enough for the default tests."""

import importlib.util
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    spec = importlib.util.spec_from_file_location("readme_commands",
                                                  ROOT / ".ci" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.commands((ROOT / "README.md").read_text(encoding="utf-8"))


def test_ci_runs_the_readme_commands():
    cmds = _readme_commands()
    # the install steps of the first command, without its training step
    assert cmds["install"] == 'pip install torch==2.13.0 && pip install -e ".[dev]"'
    assert cmds["test"] == "python -m pytest -q"
    spec = importlib.util.spec_from_file_location("readme_commands",
                                                  ROOT / ".ci" / "readme_commands.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run runs these two lines literally (and checks them against the README first) ...
    assert mod.ci_commands(ci) == cmds
    assert "readme_commands.py check .ci/run" in ci
    # ... and installs nothing else
    assert len(re.findall(r"^\s*(python -m )?pip install", ci, flags=re.M)) == 1


def test_dev_extra_holds_what_the_default_tests_import():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    dev = " ".join(extras["dev"])
    for pkg in ("pytest", "hypothesis", "hydra-optuna-sweeper", "hydra-joblib-launcher",
                "hydra-submitit-launcher", "onnx", "onnxruntime"):
        assert re.search(rf"(^| ){re.escape(pkg)}([<>=; ]|$)", dev), pkg
    # and they are importable here, so no default test skips for want of them
    for mod in ("hydra_plugins.hydra_optuna_sweeper", "hydra_plugins.hydra_joblib_launcher",
                "hydra_plugins.hydra_submitit_launcher", "onnx", "onnxruntime"):
        assert importlib.util.find_spec(mod) is not None, mod


def test_readme_names_the_kernel_cache_the_code_uses(monkeypatch, tmp_path):
    from mrflight.physics import _ckernel

    text = " ".join((ROOT / "README.md").read_text().split())
    assert ("`$MRFLIGHT_CACHE_DIR/kernels` when that variable is set, else "
            "`$XDG_CACHE_HOME/mrflight/kernels` when that one is, else "
            "`~/.cache/mrflight/kernels`") in text
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _ckernel.cache_dir() == tmp_path / "kernels"
    monkeypatch.delenv("MRFLIGHT_CACHE_DIR")
    assert _ckernel.cache_dir() == tmp_path / "xdg" / "mrflight" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _ckernel.cache_dir() == Path.home() / ".cache" / "mrflight" / "kernels"
