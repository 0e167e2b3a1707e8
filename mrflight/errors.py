"""One readable line instead of a traceback when a command-line run gets bad input.

``train.py`` and ``eval.py`` run their Hydra ``main`` through :func:`run_cli`: a bad config value,
an unknown config option (``model=transformer``), a malformed override or a missing file ends the
process with exit status 2 and a single line on stderr::

    error: unknown model 'transformer': choose model= one of ann, cnn, gru, lstm

naming the argument and the fix; so does a full disk (``error: no space left on device writing
PATH: free space or set paths.output_dir``). A run stopped by Ctrl-C or SIGTERM (a cluster's
preemption or time limit) ends with one line saying how to resume it, and the exit status of a
process the signal ended (130, 143), never 0. Any other exception (a real bug) keeps its
traceback. Set
``MRFLIGHT_DEBUG=1`` (or Hydra's own ``HYDRA_FULL_ERROR=1``) to see the full traceback of a bad
input too.

A mistyped key (``trainer.max_epoch=3``) or a group the command does not have (``python eval.py
model=gru``) gets the close names of the composed config (:func:`override_hint`) instead of
Hydra's "append with +" advice. An error inside the run (after Hydra created its output
directory) is also written, with its traceback, into the run's log file (``train.log``).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable

__all__ = [
    "run_cli", "guard", "one_line", "root_cause", "override_hint", "EXIT_USAGE", "EXIT_FAILED_JOBS",
]

#: exit status of a run stopped by bad input (a config value, an option, a file)
EXIT_USAGE = 2
#: exit status of a multirun in which some jobs failed (the others finished)
EXIT_FAILED_JOBS = 3


def _usage_errors() -> tuple[type[BaseException], ...]:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    return (ValueError, FileNotFoundError, HydraException, OmegaConfBaseException)


def _is_usage(e: BaseException) -> bool:
    """Bad input, a full disk, or W&B online without a login or its server: one line."""
    return (isinstance(e, _usage_errors()) or _disk_full(e) or _wandb_unreachable(e)
            or _lightning_setting(e))


def _lightning_setting(e: BaseException) -> bool:
    """Lightning's error for a trainer setting it cannot use (``trainer.limit_val_batches=0.5``
    of a one-batch set, ``trainer.gradient_clip_algorithm=bogus``, ``trainer.max_time=abc``):
    its message names the setting and the values it takes (Lightning is not imported here)."""
    return any(c.__name__ == "MisconfigurationException"
               and c.__module__.startswith(("lightning", "pytorch_lightning"))
               for c in type(e).__mro__)


def _wandb_unreachable(e: BaseException) -> bool:
    """W&B's own errors of an online run: no API key, a rejected one, its server unreachable
    (wandb is not imported for this)."""
    return (type(e).__module__.startswith("wandb.errors")
            and type(e).__name__ in ("UsageError", "AuthenticationError", "CommError"))


def _disk_full(e: BaseException) -> bool:
    from mrflight.fileio import DISK_FULL

    return isinstance(e, OSError) and e.errno in DISK_FULL


def _lightning_teardown(e: BaseException) -> bool:
    """Lightning's teardown after a fit that failed before its data loader started raises its
    own error ("Please call `iter(combined_loader)` first.") while handling the real one."""
    return (isinstance(e, RuntimeError) and "iter(combined_loader)` first" in str(e)
            and e.__context__ is not None)


def root_cause(e: BaseException) -> BaseException:
    """The error to report: a constructor's own error rather than Hydra's wrapper
    (InstantiationException), the failure itself rather than Lightning's teardown error."""
    from hydra.errors import InstantiationException

    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, InstantiationException) and e.__cause__ is not None:
            e = e.__cause__
        elif _lightning_teardown(e):
            e = e.__context__
        else:
            break
    return e


def _shipped_options(group: str) -> list[str]:
    """The options of config group ``group`` in ``mrflight/configs/`` (none for a bad name)."""
    from mrflight.config import CONFIG_DIR

    folder = CONFIG_DIR / group
    if not group or ".." in folder.parts or not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line (config-group errors rephrased with their options)."""
    from hydra.errors import MissingConfigException

    e = root_cause(e)
    if _disk_full(e):
        where = f" writing {e.filename}" if e.filename else ""
        what = "no space left on device" if e.errno == errno.ENOSPC else "disk quota exceeded"
        return f"{what}{where}: free space or set paths.output_dir"
    if isinstance(e, MissingConfigException) and e.missing_cfg_file:
        group, _, name = str(e.missing_cfg_file).rpartition("/")
        # an item of a list (callbacks=[default,x]): Hydra names no options, so the shipped ones
        options = e.options or _shipped_options(group)
        if group and options:
            label = {"model": "model", "sequence": "sequence"}.get(group, f"{group} option")
            return (f"unknown {label} {name!r}: choose {group}= one of "
                    f"{', '.join(sorted(options))}")
    msg = str(e).strip() or type(e).__name__
    if _wandb_unreachable(e):
        mode = os.environ.get("WANDB_MODE", "online")
        msg = (f"W&B (WANDB_MODE={mode}): {msg.rstrip('.')}; log in (wandb login, or "
               "WANDB_API_KEY), or run offline (WANDB_MODE=offline, the default; wandb sync "
               "uploads later), or use logger=csv")
    parts = [" ".join(line.split()) for line in msg.splitlines()]
    text = "; ".join(p for p in parts if p)
    text = text.replace("; Set the environment variable HYDRA_FULL_ERROR=1 for a complete "
                        "stack trace.", "")
    if isinstance(e, FileNotFoundError) and getattr(e, "filename", None):
        text = f"file not found: {e.filename}"
    return text


_DEBUG_AT_START: bool | None = None
#: set beside the ``HYDRA_FULL_ERROR=1`` that :func:`run_cli` sets itself, which the processes
#: it starts inherit (the other DDP ranks run the script again): theirs is not the user's
_OWN_FULL_ERROR = "MRFLIGHT_SET_HYDRA_FULL_ERROR"


def _debug() -> bool:
    if _DEBUG_AT_START is not None:  # run_cli sets HYDRA_FULL_ERROR itself: use the user's
        return _DEBUG_AT_START
    names = ["MRFLIGHT_DEBUG"] + ([] if os.environ.get(_OWN_FULL_ERROR) else ["HYDRA_FULL_ERROR"])
    return any(os.environ.get(v, "") not in ("", "0", "false", "False") for v in names)


_CONFIG_NAME: str | None = None


def _flat_keys(node, prefix: str = "") -> list[str]:
    from omegaconf import DictConfig

    out = []
    for k in node.keys() if isinstance(node, DictConfig) else ():
        key = f"{prefix}{k}"
        out.append(key)
        try:
            child = node._get_node(k)
        except Exception:  # noqa: BLE001
            continue
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            out += _flat_keys(child, key + ".")
    return out


def _primary_groups(config_name: str) -> list[str]:
    """Config groups in the defaults list of ``mrflight/configs/<config_name>.yaml`` (hydra "
    "excluded)."""
    import yaml

    from mrflight.config import CONFIG_DIR

    defaults = yaml.safe_load((CONFIG_DIR / f"{config_name}.yaml").read_text()).get("defaults", [])
    keys = [next(iter(d)) for d in defaults if isinstance(d, dict)]
    return [k for k in keys if k != "hydra" and not k.startswith("override ")]


def override_hint(e: BaseException, config_name: str | None, argv=None) -> str | None:
    """A one-line message for a Hydra override of a key or group the config does not have.

    ``trainer.max_epoch=3`` -> ``unknown key 'trainer.max_epoch': did you mean
    trainer.max_epochs? ...`` (difflib on the dotted keys of the config composed with the other
    overrides); ``model=gru`` on ``eval.py`` -> the groups eval accepts. ``None`` when ``e`` is
    not such an error.
    """
    import difflib
    import re

    m = re.match(r"Could not override '([^']+)'\.", str(root_cause(e)))
    if not m or not config_name:
        return None
    key = m.group(1)
    script = f"{config_name}.py"
    if "No match in the defaults list" in str(e):
        groups = _primary_groups(config_name)
        close = difflib.get_close_matches(key, groups, n=3, cutoff=0.6)
        msg = f"{script} has no config group {key!r}"
        if close:
            msg += f": did you mean {' or '.join(close)}?"
        msg += f" ({script} accepts {', '.join(groups)})"
        if config_name == "eval" and key in _primary_groups("train"):
            msg += (f"; {key}= is a train.py option: eval.py reads each run's {key} from the "
                    "config saved beside its checkpoint")
        return msg
    from mrflight.config import compose_config

    argv = sys.argv[1:] if argv is None else list(argv)
    others = [a for a in argv if "=" in a and not a.startswith("-")
              and a.split("=", 1)[0].lstrip("+~") != key]
    # the config as chosen: with the other overrides, else with their group choices alone (a
    # second bad key), else the defaults (where the key may exist under another data option)
    groups_only = [a for a in others if "." not in a.split("=", 1)[0]]
    cfg = None
    for attempt in (others, groups_only, []):
        try:
            cfg = compose_config(attempt, config_name=config_name)
            break
        except Exception:  # noqa: BLE001 - another bad override: fall back to the defaults
            continue
    keys = _flat_keys(cfg) if cfg is not None else []
    parent = key.rpartition(".")[0]
    siblings = [k for k in keys if k.rpartition(".")[0] == parent]
    leaf = key.rpartition(".")[2]
    by_leaf = {k.rpartition(".")[2]: k for k in siblings}
    close = [by_leaf[c] for c in difflib.get_close_matches(leaf, list(by_leaf), n=2, cutoff=0.75)]
    if not close:  # misplaced in another node: compare whole dotted keys
        close = difflib.get_close_matches(key, keys, n=2, cutoff=0.85)
    if not close:  # misplaced: the same name one level elsewhere (scheduler=null)
        close = sorted(k for k in keys if k.rpartition(".")[2] == leaf)[:2]
    # the key itself is never its own suggestion (the fallback config may have it under
    # another config-group option than the one chosen)
    # (nor a _target_: data.targets -> data._target_ is a near spelling, never the intent)
    close = [c for c in close if c != key and not c.endswith("_target_")]
    given = {a.split("=", 1)[0].lstrip("+~"): a.split("=", 1)[1] for a in argv if "=" in a}
    if key not in given:  # not typed: a sweep's parameter (hydra.sweeper.params)
        sweep = (f"hparams_search={given['hparams_search']}" if "hparams_search" in given
                 else "the sweep")
        near = f" (close: {' or '.join(close)})" if close else ""
        which = (" (model=gru or model=lstm)" if key == "model.hidden_size" else "")
        return (f"{sweep} sweeps {key} (hydra.sweeper.params), which this config does not "
                f"have{near}: choose options that have it{which}, or sweep keys of your own "
                "on the command line (python train.py -m KEY=A,B)")
    value = given.get(key, "VALUE")
    msg = f"unknown key {key!r}"
    if close:
        msg += f": did you mean {' or '.join(close)}?"
    elif parent and siblings:
        names = sorted(k.rpartition(".")[2] for k in siblings if not k.endswith("._target_"))
        msg += f" ({parent} has: {', '.join(names)})"
    return msg + f" (to add a new key on purpose: +{key}={value})"


def _report(e: BaseException) -> None:
    hint = None
    try:
        hint = override_hint(e, _CONFIG_NAME)
    except Exception:  # noqa: BLE001 - a hint must never hide the error itself
        hint = None
    msg = hint or one_line(e)
    print(f"error: {msg}", file=sys.stderr)
    sys.stderr.flush()
    _to_log_file(e, msg)


def _to_log_file(e: BaseException, msg: str) -> None:
    """The error and its traceback into the run's log file (when Hydra opened one)."""
    import logging
    import traceback

    from mrflight.run_logging import log_to_file

    log_to_file(logging.ERROR, "error: %s\n%s", msg, "".join(traceback.format_exception(e)))


def _stop_signal(e: BaseException) -> int | None:
    """The signal that stopped the task, if one did: SIGINT (``KeyboardInterrupt``, or the
    ``sys.exit(1)`` Lightning turns it into during a fit or test) or SIGTERM
    (Lightning's ``SIGTERMException``, raised at the step after the signal: a ``SystemExit``
    without a code, which would end the process with status 0 as if the run had finished)."""
    if isinstance(e, KeyboardInterrupt) or _lightning_ctrl_c(e):
        return int(signal.SIGINT)
    lightning_errors = sys.modules.get("lightning.pytorch.utilities.exceptions")
    if lightning_errors is not None and isinstance(e, lightning_errors.SIGTERMException):
        return int(signal.SIGTERM)
    return None


def exit_status(e: BaseException) -> int:
    """The status a command ends with when ``e`` ends it: 128 + the signal for a run stopped by
    SIGINT or SIGTERM, :data:`EXIT_USAGE` for bad input, a ``SystemExit``'s own code, else 1."""
    signum = _stop_signal(e)
    if signum is not None:
        return 128 + signum
    if isinstance(e, SystemExit):
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    return EXIT_USAGE if isinstance(e, Exception) and _is_usage(root_cause(e)) else 1


def _lightning_ctrl_c(e: BaseException) -> bool:
    """Lightning ends a fit or test stopped by Ctrl-C with its own ``sys.exit(1)``, raised while
    handling the ``KeyboardInterrupt`` (which is then its context)."""
    return isinstance(e, SystemExit) and isinstance(e.__context__, KeyboardInterrupt)


#: what sends each signal that stops a run
_SENDERS = {signal.SIGINT: "Ctrl-C",
            signal.SIGTERM: "kill, or a cluster's preemption or time limit"}


def _report_stop(e: BaseException, signum: int, cfg) -> None:
    """``error: stopped by SIGTERM (...)`` on stderr and in the log file, with how to go on."""
    msg = (f"stopped by {signal.Signals(signum).name} ({_SENDERS[signum]}): "
           f"{_how_to_go_on(cfg)}")
    print(f"error: {msg}", file=sys.stderr)
    sys.stderr.flush()
    _to_log_file(e, msg)


def command(task: str) -> str:
    """The command line that runs ``task`` (``"train"``, ``"eval"``) the way the user runs this
    one: ``mrflight-train`` under an installed console script, else ``python train.py``."""
    scripts = ("mrflight-train", "mrflight-eval")
    installed = os.path.basename(sys.argv[0] if sys.argv else "") in scripts
    return f"mrflight-{task}" if installed else f"python {task}.py"


def _how_to_go_on(cfg) -> str:
    """A training run resumes from its ``last.ckpt``, or starts again from its saved config;
    anything else runs again."""
    from pathlib import Path

    try:
        out, task = Path(str(cfg.paths.output_dir)), cfg.get("task_name")
    except Exception:  # noqa: BLE001 - a config without paths: no folder to name
        return "run the command again"
    if task != "train":
        return f"run the command again (the files in {out} are whole, but some may be missing)"
    from mrflight.checkpoints import CHECKPOINT_DIR, RUN_CONFIGS

    sweep = _sweep_dir()
    if sweep is not None:  # the jobs after this one have not run either
        return (f"go on with the sweep: run the same command again with "
                f"hydra.sweep.dir={sweep} ckpt_path=last (its finished jobs are kept, this "
                f"one resumes from its last finished epoch or starts again, the rest start)")
    resume = f"with {command('train')} hydra.run.dir={out} ckpt_path=last"
    if (out / CHECKPOINT_DIR / "last.ckpt").is_file():
        return f"resume it from its last finished epoch {resume}"
    if (out / RUN_CONFIGS[0]).is_file():
        return f"no epoch had finished: start it again from the beginning {resume}"
    return "nothing of the run was saved yet: run the same command again"


def _sweep_dir() -> str | None:
    """The sweep dir of the multirun under way (the job folder's parent, as resolved when the
    job started: a launcher in another process resolves ``${now:...}`` again), else None."""
    from pathlib import Path

    from mrflight.config import hydra_config

    hc = hydra_config()
    if hc is None or str(hc.mode) != "RunMode.MULTIRUN":
        return None
    out = Path(str(hc.runtime.output_dir))
    return str(out.parent) if out.name == str(hc.sweep.subdir) else str(hc.sweep.dir)


def guard(task: Callable) -> Callable:
    """Decorate a Hydra task function (under ``@hydra.main``): bad input -> one line, exit 2;
    a run stopped by SIGINT or SIGTERM -> one line with how to go on, exit 128 + the signal.

    Catching here, inside the job, keeps Hydra from adding its own "Error executing job" report.
    In a multirun, :func:`mrflight.pipeline.train` records failures itself, so nothing reaches
    this handler there and a bad job does not stop the sweep.
    """
    import functools

    @functools.wraps(task)
    def wrapped(cfg):
        from mrflight.run_logging import configure_logging

        configure_logging()
        try:
            return task(cfg)
        except (Exception, KeyboardInterrupt, SystemExit) as e:
            signum = _stop_signal(e)
            if signum is not None:  # one line, and the status of a process the signal ended
                _report_stop(e, signum, cfg)
                raise SystemExit(exit_status(e)) from None
            if isinstance(e, SystemExit):
                raise
            usage = isinstance(e, Exception) and _is_usage(root_cause(e))
            if usage and not _debug():  # bad input or a full disk: one line, exit 2
                _report(e)
                raise SystemExit(EXIT_USAGE) from None
            # a bug (or --debug): logged, re-raised
            _to_log_file(e, one_line(e) if usage
                         else f"{type(root_cause(e)).__name__}: {one_line(e)}")
            raise

    return wrapped


def run_cli(main: Callable[[], object], config_name: str | None = None) -> None:
    """Run a ``@hydra.main`` function; bad input exits 2 with ``error: <one line>`` on stderr.

    Hydra is asked to re-raise (``HYDRA_FULL_ERROR=1`` in this process) so that composition
    errors reach this handler instead of Hydra's multi-line report. A multirun in which some
    jobs failed (see :mod:`mrflight.hydra_callbacks`) exits with status 3 after all jobs ran,
    or once its sweeper stopped because they failed.

    Args:
        main: the ``@hydra.main`` function.
        config_name: its primary config (``"train"``, ``"eval"``), for :func:`override_hint`.
    """
    global _DEBUG_AT_START, _CONFIG_NAME
    debug = _DEBUG_AT_START = _debug()
    _CONFIG_NAME = config_name
    if os.environ.get("HYDRA_FULL_ERROR", "") in ("", "0", "false", "False"):
        os.environ[_OWN_FULL_ERROR] = "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from mrflight import hydra_callbacks

    try:
        main()
    except Exception as e:
        failed = hydra_callbacks.end_stopped_multirun()
        if failed and not debug:  # the sweeper gave up because its jobs failed
            print(f"error: the sweep stopped after {len(failed)} failed job(s), listed above "
                  f"(the sweeper: {one_line(e)}); fix what they report and run it again",
                  file=sys.stderr)
            sys.exit(EXIT_FAILED_JOBS)
        if debug or not _is_usage(root_cause(e)):
            raise
        _report(e)
        sys.exit(EXIT_USAGE)

    if hydra_callbacks.LAST_FAILURES:
        sys.exit(EXIT_FAILED_JOBS)
