"""Hydra callbacks: a multirun in which some jobs fail still runs the others and says which failed.

Inside a multirun, :func:`mrflight.pipeline.train` does not let one job's exception end the sweep:
it writes ``FAILED.txt`` (the error and its traceback) into that job's directory, atomically, and
returns ``None`` to the sweeper (Optuna records the trial as failed and goes on). At the end of
the sweep, :class:`FailureReport` collects those files into ``<sweep dir>/failures.json`` and
prints a summary; ``train.py`` then exits with status 3 (:data:`mrflight.errors.EXIT_FAILED_JOBS`).
A sweeper that gives up because its jobs failed (Optuna raises "No trials are completed yet" when
every trial failed) gets the same report, from :func:`end_stopped_multirun`, and status 3.

:class:`KeepRunConfig` keeps Hydra from writing over the ``.hydra/*.yaml`` of a run that is
resumed (``ckpt_path=...``): they describe how the run was started, and the resumed run's merged
config goes to ``checkpoints/config.yaml`` once its checkpoint has loaded
(:mod:`mrflight.resume`).

Configured in ``mrflight/configs/hydra/default.yaml``::

    hydra:
      callbacks:
        failure_report:
          _target_: mrflight.hydra_callbacks.FailureReport
        keep_run_config:
          _target_: mrflight.hydra_callbacks.KeepRunConfig
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mrflight.fileio import FAILED_FILE, read_failure

__all__ = ["FailureReport", "KeepRunConfig", "FAILED_FILE", "FAILURES_FILE", "LAST_FAILURES",
           "collect_failures", "end_stopped_multirun"]

#: written into the sweep dir at the end of a multirun
FAILURES_FILE = "failures.json"
#: the failed jobs of the last multirun in this process (read by :func:`mrflight.errors.run_cli`)
LAST_FAILURES: list[dict] = []


#: the ``FAILED.txt`` already in the sweep dir when the current multirun started
_BEFORE: dict | None = None
#: the sweep dir of a multirun under way (``None`` once it has ended)
_SWEEP_DIR: Path | None = None


def _failed_files(sweep_dir) -> dict[str, tuple[int, int, int, int]]:
    """Every ``FAILED.txt`` under ``sweep_dir`` and its identity (device, inode, size,
    modification time in ns): a file written again (atomically: a new inode) differs."""
    out = {}
    for f in Path(sweep_dir).glob(f"**/{FAILED_FILE}"):
        try:
            st = f.stat()
        except OSError:
            continue
        out[str(f)] = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    return out


def collect_failures(sweep_dir, before: dict | None = None) -> list[dict]:
    """``[{"job": subdir, "dir": path, "overrides": [...], "error": first line}]`` of a sweep;
    a sweep dir used again keeps the files of its earlier jobs, which are not this multirun's
    failures: with ``before`` (:func:`_failed_files` of the sweep dir when the multirun
    started), only the ``FAILED.txt`` written since, told by their identity and not by a clock
    (the modification time of a file on a network file system is the file server's clock,
    and the jobs' hosts' clocks need not agree with this host's)."""
    out = []
    root = Path(sweep_dir)
    before = before or {}
    now = _failed_files(root)
    for name in sorted(now):
        f = Path(name)
        if before.get(name) == now[name]:
            continue
        info = read_failure(f.parent) or {"error": "unreadable FAILED.txt"}
        job = f.parent.relative_to(root).as_posix()
        out.append({"job": job, "dir": str(f.parent), "overrides": info.get("overrides", []),
                    "error": info.get("error", "")})
    return sorted(out, key=lambda r: (len(r["job"]), r["job"]))


class FailureReport(Callback):
    """Write ``failures.json`` in the sweep dir and print which jobs failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _BEFORE, _SWEEP_DIR
        LAST_FAILURES.clear()
        _SWEEP_DIR = Path(config.hydra.sweep.dir)
        _BEFORE = _failed_files(_SWEEP_DIR)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _report_failures(Path(config.hydra.sweep.dir))


def end_stopped_multirun() -> list[dict]:
    """The failed jobs of a multirun whose sweeper raised before its end (Optuna's "No trials
    are completed yet" when every trial failed), reported as at a normal end (``failures.json``
    and the summary on stderr); ``[]`` when no multirun was under way."""
    return [] if _SWEEP_DIR is None else _report_failures(_SWEEP_DIR)


def _report_failures(sweep_dir: Path) -> list[dict]:
    global _SWEEP_DIR
    from mrflight.fileio import atomic_path

    _SWEEP_DIR = None
    failures = collect_failures(sweep_dir, before=_BEFORE) if sweep_dir.is_dir() else []
    LAST_FAILURES[:] = failures
    if sweep_dir.is_dir():
        with atomic_path(sweep_dir / FAILURES_FILE) as tmp:
            tmp.write_text(json.dumps({"n_failed": len(failures), "failed": failures},
                                      indent=2))
    if failures:
        lines = [f"{len(failures)} job(s) of the multirun failed (details in "
                 f"{sweep_dir / FAILURES_FILE}):"]
        for r in failures:
            lines.append(f"  job {r['job']} [{' '.join(r['overrides'])}]: {r['error']}")
        print("\n".join(lines), file=sys.stderr)
    return failures


def _maps_already_there(config: DictConfig) -> bool:
    """Whether ``config`` is ``eval.py input=SERIES`` into a folder that already holds maps of
    that series, which :func:`mrflight.maps.make_maps` refuses to overwrite."""
    inp = config.get("input")
    if not inp:
        return False
    from mrflight.maps.writers import check_outputs_free
    from mrflight.series_io import series_stem

    try:
        check_outputs_free(str(config.hydra.run.dir), series_stem(str(inp)),
                           bool((config.get("maps") or {}).get("previews", True)))
    except ValueError:
        return True
    return False


class KeepRunConfig(Callback):
    """A single ``train.py`` run with ``ckpt_path`` set (a resume), or one in a folder holding
    another run's results or maps (which it will refuse to overwrite), does not save
    ``.hydra/*.yaml``: those of the run already there stay as they were."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from omegaconf import open_dict, read_write

        from mrflight.fileio import held_results

        # eval.py has no train key: its ckpt_path names what it evaluates, not a run to resume
        resume = config.get("ckpt_path") not in (None, "") and config.get("train", False)
        if not resume and not held_results(str(config.hydra.run.dir)) \
                and not _maps_already_there(config):
            return
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.output_subdir = None
