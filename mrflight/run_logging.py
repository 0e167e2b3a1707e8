"""Console and log-file hygiene for ``train.py`` and ``eval.py``.

Hydra configures the root logger (a console handler and ``<output_dir>/<task>.log``). Lightning
adds its own console handler to the ``lightning`` logger at import, so each Lightning INFO line
appeared twice; :func:`configure_logging` removes those handlers (Lightning's records then reach
the console and the log file once, through Hydra's handlers), drops Lightning's product adverts
and silences warnings that a user cannot act on (listed in :data:`QUIET_WARNINGS`).

:func:`log_to_file` writes a record to the log file(s) only (used for the error that ends a run
and for the epoch summaries while a progress bar owns the terminal; every warning shown is also
written there); :func:`interactive` says
whether stdout is a terminal; :func:`test_table` is the few lines that end a training run.
"""

from __future__ import annotations

import logging
import re
import sys
import warnings

__all__ = ["configure_logging", "log_to_file", "interactive", "test_table", "QUIET_WARNINGS"]

log = logging.getLogger("mrflight")

#: ``(message regex, category)`` of library warnings no user can act on
QUIET_WARNINGS = (
    # torch deprecates LeafSpec; Lightning's pytree copy still builds one on every batch
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
    # debug=overfit: Lightning turns the training shuffle off itself and says so
    (r"You requested to overfit but enabled train dataloader shuffling", Warning),
)

_ADVERTS = ("💡 Tip:",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_ADVERTS)


def interactive() -> bool:
    """True when stdout is a terminal (progress bars); False under Slurm, nohup, CI, pipes."""
    try:
        return bool(sys.stdout.isatty())
    except (AttributeError, ValueError):
        return False


def configure_logging() -> None:
    """One line per Lightning message, no adverts, no warnings nobody can act on (idempotent)."""
    root = logging.getLogger()
    if root.handlers:
        # Hydra (or the user) configured the root: Lightning's own handlers only duplicate it
        for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning",
                     "lightning_fabric"):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
            lg.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        lg = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in lg.filters):
            lg.addFilter(_DropAdverts())
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    if not getattr(warnings.showwarning, "_to_log_file", False):
        warnings.showwarning = _also_to_log_file(warnings.showwarning)


def _also_to_log_file(show):
    """``warnings.showwarning`` that shows a warning as before (stderr) but without the source
    line it came from (a line of mrflight's or a library's code, nothing to act on), and writes
    it as one record into the run's log file(s): ``train.log`` and ``eval.log`` keep what the
    run warned of (a non-finite voxel, a series noisier than training)."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        show(message, category, filename, lineno, file, "" if line is None else line)
        if file is None:  # a warning printed to a file of the caller's is not the run's
            log_to_file(logging.WARNING, "%s: %s (%s:%s)", category.__name__, message,
                        filename, lineno, logger=logging.getLogger("py.warnings"))

    showwarning._to_log_file = True
    return showwarning


def _file_handlers() -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]


def log_to_file(level: int, msg: str, *args, exc_info=None, logger: logging.Logger = log) -> bool:
    """Write one record to the root logger's log files only (not the console).

    Returns:
        False when no log file is configured (nothing written).
    """
    handlers = _file_handlers()
    if not handlers or not logger.isEnabledFor(level):
        return False
    record = logger.makeRecord(logger.name, level, "(mrflight)", 0, msg, args, exc_info)
    for h in handlers:
        if record.levelno >= h.level:
            h.handle(record)
    return True


def quiet_fresh_checkpoint_dir(ckpt_dir) -> None:
    """Silence Lightning's "checkpoint directory exists and is not empty" warning, which the
    user cannot act on: ``checkpoints/`` holds the ``config.yaml`` mrflight wrote there first,
    and on a resume the run's own checkpoints (a run is never started in another run's folder,
    see :func:`mrflight.fileio.output_folder`)."""
    warnings.filterwarnings("ignore", message=rf"Checkpoint directory "
                            rf"{re.escape(str(ckpt_dir))} exists and is not empty")


_TEST_KEY = re.compile(r"^test(?:@([^/]+))?/([a-z0-9]+)_(mae|rmse)_([a-z]+)$")


def test_table(metrics: dict) -> str | None:
    """The test metrics (``test/t1_mae_ms``, ``test@0.01/b1_rmse_pct`` ...) as a few lines: one
    row for the test set (at its own noise, e.g. drawn per signal from the training range) and
    one per fixed noise level it was also tested at, MAE / RMSE of every parameter; ``None``
    without test metrics."""
    cells: dict = {}
    units: dict = {}
    for key, value in metrics.items():
        found = _TEST_KEY.match(key)
        if found:
            noise, name, stat, unit = found.groups()
            units.setdefault(name, "%" if unit == "pct" else unit)
            cells[(noise, name, stat)] = value
    if not cells:
        return None

    def num(v) -> str:
        return "-" if v is None else (f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}")

    noises = sorted({n for n, _, _ in cells}, key=lambda n: -1.0 if n is None else float(n))
    order = ("t1", "t2", "b1")  # the targets' order, others after them
    units = dict(sorted(units.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order
                                                       else len(order), kv[0])))
    head = ["", *(f"{n.upper()} {u} (MAE / RMSE)" for n, u in units.items())]
    rows = [head] + [["test set" if n is None else f"at noise {n}",
                      *(f"{num(cells.get((n, p, 'mae')))} / {num(cells.get((n, p, 'rmse')))}"
                        for p in units)] for n in noises]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  " + "   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                     for r in rows)
