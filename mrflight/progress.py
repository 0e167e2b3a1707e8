"""Progress outside Lightning (dictionary generation, map reconstruction, evaluation).

On a terminal: one rich progress bar. Elsewhere (Slurm, nohup, CI, a pipe) a bar would print
nothing useful, so :func:`progress_bar` returns a :class:`LogProgress` with the same interface
that writes a log line through the ``mrflight`` logger (stdout and the run's log file) at most
every ``interval_s`` seconds and when a task completes.
"""

from __future__ import annotations

import logging
import time

__all__ = ["progress_bar", "LogProgress"]

log = logging.getLogger("mrflight")


class LogProgress:
    """The part of ``rich.progress.Progress`` mrflight uses, reporting as periodic log lines.

    Args:
        description: prefix of each line (``"{task.description}"``: the task's own).
        interval_s: least seconds between two lines of one task.
    """

    def __init__(self, description: str = "{task.description}", interval_s: float = 10.0):
        self.description = description
        self.interval_s = float(interval_s)
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        for task_id, t in self._tasks.items():
            if not t["done"] and t["completed"] > 0:
                self._emit(task_id, final=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0,
                 **_) -> int:
        task_id = len(self._tasks)
        now = time.monotonic()
        self._tasks[task_id] = {"description": description, "total": total,
                                "completed": completed, "start": now, "last": now,
                                "done": False}
        return task_id

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None,
               completed: float | None = None, advance: float | None = None, **_) -> None:
        t = self._tasks[task_id]
        if total is not None:
            t["total"] = total
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        if t["done"]:
            return
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if finished:
            self._emit(task_id, final=True)
        elif time.monotonic() - t["last"] >= self.interval_s:
            self._emit(task_id)

    def _emit(self, task_id: int, final: bool = False) -> None:
        t = self._tasks[task_id]
        now = time.monotonic()
        t["last"] = now
        total = t["total"]
        t["done"] = t["done"] or (final and total is not None and t["completed"] >= total)
        elapsed = now - t["start"]
        if "{task.description}" in self.description:
            label = self.description.replace("{task.description}", t["description"])
        else:
            label = f"{self.description}: {t['description']}"
        done = t["completed"]
        if total:
            frac = done / total
            eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
            log.info("%s: %d/%d (%.0f %%), %.1f s elapsed%s", label, done, total, 100 * frac,
                     elapsed, "" if t["done"] else f", ~{eta:.0f} s left")
        else:
            log.info("%s: %d, %.1f s elapsed", label, done, elapsed)


def progress_bar(description: str = "{task.description}", transient: bool = False):
    """A rich ``Progress`` (bar, count, elapsed and remaining time) on a terminal, else a
    :class:`LogProgress` writing periodic log lines."""
    from mrflight.run_logging import interactive

    if not interactive():
        return LogProgress(description)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=transient)
