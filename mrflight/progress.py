"""The one rich progress bar used outside Lightning (dictionary generation, map reconstruction)."""

from __future__ import annotations


def progress_bar(description: str = "{task.description}", transient: bool = False):
    """A ``rich.progress.Progress`` with description, bar, count, elapsed and remaining time."""
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
