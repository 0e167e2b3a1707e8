"""One readable line instead of a traceback when a command-line run gets bad input.

``train.py`` and ``eval.py`` run their Hydra ``main`` through :func:`run_cli`: a bad config value,
an unknown config option (``model=transformer``), a malformed override or a missing file ends the
process with exit status 2 and a single line on stderr::

    error: unknown model 'transformer': choose model= one of ann, cnn, gru, lstm

naming the argument and the fix; so does a full disk (``error: no space left on device writing
PATH: free space or set paths.output_dir``). Any other exception (a real bug) keeps its
traceback. Set
``MRFLIGHT_DEBUG=1`` (or Hydra's own ``HYDRA_FULL_ERROR=1``) to see the full traceback of a bad
input too.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable

__all__ = ["run_cli", "guard", "one_line", "EXIT_USAGE", "EXIT_FAILED_JOBS"]

#: exit status of a run stopped by bad input (a config value, an option, a file)
EXIT_USAGE = 2
#: exit status of a multirun in which some jobs failed (the others finished)
EXIT_FAILED_JOBS = 3


def _usage_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException)


def _is_usage(e: BaseException) -> bool:
    """Bad input, or a full disk: reported in one line."""
    return isinstance(e, _usage_errors()) or _disk_full(e)


def _disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno == errno.ENOSPC


def _root(e: BaseException) -> BaseException:
    """Hydra wraps constructor errors (InstantiationException): report the constructor's own."""
    from hydra.errors import InstantiationException

    seen = set()
    while isinstance(e, InstantiationException) and e.__cause__ is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__
    return e


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line (config-group errors rephrased with their options)."""
    from hydra.errors import MissingConfigException

    e = _root(e)
    if _disk_full(e):
        where = f" writing {e.filename}" if e.filename else ""
        return f"no space left on device{where}: free space or set paths.output_dir"
    if isinstance(e, MissingConfigException) and e.options and e.missing_cfg_file:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        if group:
            label = {"model": "model", "sequence": "sequence"}.get(group, f"{group} option")
            return (f"unknown {label} {name!r}: choose {group}= one of "
                    f"{', '.join(sorted(e.options))}")
    msg = str(e).strip() or type(e).__name__
    parts = [" ".join(line.split()) for line in msg.splitlines()]
    text = "; ".join(p for p in parts if p)
    text = text.replace("; Set the environment variable HYDRA_FULL_ERROR=1 for a complete "
                        "stack trace.", "")
    if isinstance(e, FileNotFoundError) and getattr(e, "filename", None):
        text = f"file not found: {e.filename}"
    return text


_DEBUG_AT_START: bool | None = None


def _debug() -> bool:
    if _DEBUG_AT_START is not None:  # run_cli sets HYDRA_FULL_ERROR itself: use the user's
        return _DEBUG_AT_START
    return any(os.environ.get(v, "") not in ("", "0", "false", "False")
               for v in ("MRFLIGHT_DEBUG", "HYDRA_FULL_ERROR"))


def _report(e: BaseException) -> None:
    print(f"error: {one_line(e)}", file=sys.stderr)
    sys.stderr.flush()


def guard(task: Callable) -> Callable:
    """Decorate a Hydra task function (under ``@hydra.main``): bad input -> one line, exit 2.

    Catching here, inside the job, keeps Hydra from adding its own "Error executing job" report.
    In a multirun, :func:`mrflight.pipeline.train` records failures itself, so nothing reaches
    this handler there and a bad job does not stop the sweep.
    """
    import functools

    @functools.wraps(task)
    def wrapped(cfg):
        try:
            return task(cfg)
        except Exception as e:
            if _debug() or not _is_usage(_root(e)):
                raise
            _report(e)
            raise SystemExit(EXIT_USAGE) from None

    return wrapped


def run_cli(main: Callable[[], object]) -> None:
    """Run a ``@hydra.main`` function; bad input exits 2 with ``error: <one line>`` on stderr.

    Hydra is asked to re-raise (``HYDRA_FULL_ERROR=1`` in this process) so that composition
    errors reach this handler instead of Hydra's multi-line report. A multirun in which some
    jobs failed (see :mod:`mrflight.hydra_callbacks`) exits with status 3 after all jobs ran.
    """
    global _DEBUG_AT_START
    debug = _DEBUG_AT_START = _debug()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as e:
        if debug or not _is_usage(_root(e)):
            raise
        _report(e)
        sys.exit(EXIT_USAGE)
    from mrflight import hydra_callbacks

    if hydra_callbacks.LAST_FAILURES:
        sys.exit(EXIT_FAILED_JOBS)
