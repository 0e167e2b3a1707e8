"""Installation as users do it: where the C kernel is built (read-only homes, ``CC`` with
arguments, no compiler), what the source distribution carries, and the commands of a wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import warnings
from pathlib import Path

import pytest

from mrflight.physics import _ckernel

ROOT = Path(__file__).resolve().parents[1]
needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="needs a C compiler")


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """``kernel()`` not tried yet in this process, a private temporary directory under tmp_path."""
    monkeypatch.setattr(_ckernel, "_lib", False)
    monkeypatch.delenv("MRFLIGHT_NO_KERNEL", raising=False)
    monkeypatch.setattr(_ckernel.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return tmp_path


def _unwritable_cache(monkeypatch, tmp_path) -> Path:
    """A cache root that cannot be created (below a plain file), even for root."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("MRFLIGHT_CACHE_DIR", str(tmp_path / "file" / "cache"))
    return tmp_path / "file" / "cache"


@needs_cc
def test_kernel_is_built_in_a_private_temp_folder_when_the_cache_is_read_only(monkeypatch,
                                                                              fresh_kernel):
    """A read-only home (cluster nodes, containers) kept the kernel away: 13x slower."""
    _unwritable_cache(monkeypatch, fresh_kernel)
    with pytest.warns(RuntimeWarning, match="cannot be written.*set MRFLIGHT_CACHE_DIR"):
        lib = _ckernel.kernel()
    assert lib is not None
    private = fresh_kernel / "tmp" / f"mrflight-{_ckernel.os.getuid()}"
    assert (private.stat().st_mode & 0o777) == 0o700
    assert [p.name for p in (private / "kernels").iterdir()] == [_ckernel.kernel_path().name]


def test_a_temp_folder_others_may_write_is_refused(monkeypatch, fresh_kernel):
    """Another user could plant a library there, which this process would then load."""
    _unwritable_cache(monkeypatch, fresh_kernel)
    shared = fresh_kernel / "tmp" / f"mrflight-{_ckernel.os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.warns(RuntimeWarning) as rec:
        assert _ckernel.kernel() is None
    msg = str(rec[-1].message)
    assert "not a private folder" in msg and "MRFLIGHT_CACHE_DIR" in msg
    assert not (shared / "kernels").exists()


@needs_cc
def test_cc_may_carry_arguments(monkeypatch, tmp_path):
    """``CC="ccache gcc"`` / ``CC="gcc -std=gnu11"`` is how build environments name compilers."""
    cc = shutil.which("cc") or shutil.which("gcc")
    monkeypatch.setenv("CC", f"{cc} -Wno-unused-variable")
    dest = tmp_path / "epg_test.so"
    _ckernel._compile(dest)
    assert dest.exists()


@pytest.mark.parametrize("cc, words", [("/nonexistent/cc", ["/nonexistent/cc", "CC"]),
                                       (None, ["no C compiler", "install", "CC"])])
def test_a_missing_compiler_is_named_with_the_fix(monkeypatch, tmp_path, cc, words):
    if cc is None:
        monkeypatch.delenv("CC", raising=False)
        monkeypatch.setenv("PATH", str(tmp_path))
    else:
        monkeypatch.setenv("CC", cc)
    with pytest.raises(RuntimeError) as e:
        _ckernel._compile(tmp_path / "epg_test.so")
    assert all(w in str(e.value) for w in words), str(e.value)


def _build_backend():
    """setuptools' build backend, when it is as new as pyproject.toml's build-system asks."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    build_meta = pytest.importorskip("setuptools.build_meta")
    import setuptools

    need = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    spec = next(Requirement(r).specifier for r in need if r.startswith("setuptools"))
    if setuptools.__version__ not in spec:
        pytest.skip(f"setuptools {setuptools.__version__} here; the build needs {spec}")
    return build_meta


def test_sdist_carries_the_entry_scripts_and_the_test_suite(monkeypatch, tmp_path):
    """``pip download``/``python -m build --sdist`` users need train.py, eval.py and a test
    suite that runs (conftest.py, the helpers the tests import, the files they read); the
    build is free of setuptools deprecations (the license table form ends in 2027)."""
    build_meta = _build_backend()
    from setuptools import SetuptoolsDeprecationWarning

    egg_info = ROOT / "mrflight.egg-info"
    had_egg_info = egg_info.exists()
    monkeypatch.chdir(ROOT)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            name = build_meta.build_sdist(str(tmp_path))
    finally:
        if not had_egg_info:
            shutil.rmtree(egg_info, ignore_errors=True)
    deprecated = [str(w.message) for w in caught
                  if issubclass(w.category, SetuptoolsDeprecationWarning)]
    assert not deprecated, deprecated
    with tarfile.open(tmp_path / name) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    read_by_tests = {str(p.relative_to(ROOT)) for d in ("tests", "benchmarks")
                     for p in (ROOT / d).glob("*.py")} | {".ci/run", ".ci/readme_commands.py"}
    missing = sorted(({"train.py", "eval.py", "MANIFEST.in"} | read_by_tests) - names)
    assert not missing, f"not in the sdist: {missing}"


def _console_scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})


def test_an_installed_wheel_has_the_train_and_eval_commands():
    """train.py and eval.py are not in the wheel: without console scripts, an installed
    mrflight could not use the configs it ships."""
    assert _console_scripts() == {"mrflight-train": "mrflight.cli:train",
                                  "mrflight-eval": "mrflight.cli:evaluate"}


def test_mrflight_train_runs_from_any_folder_with_the_shipped_configs(tmp_path):
    """The console script's function, run outside the checkout: the configs are found beside
    the package, and the run is named ``train`` (``train.log``) as with ``python train.py``."""
    module, func = _console_scripts()["mrflight-train"].split(":")
    run = tmp_path / "run"
    code = (f"import sys; from {module} import {func} as main; sys.argv = ['mrflight-train', "
            f"'debug=tiny', 'trainer.max_epochs=1', 'logger=none', 'test=false', "
            f"'~callbacks.rich_progress_bar', 'hydra.run.dir={run}']; main()")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MRFLIGHT_CACHE_DIR=str(tmp_path / "cache"),
               WANDB_MODE="offline")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (run / "train.log").exists() and (run / "checkpoints").is_dir()
