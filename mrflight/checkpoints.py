"""Checkpoints of training runs: finding them, choosing the best, loading them safely, saving them.

A training run directory (``paths.output_dir``) holds ``checkpoints/`` with the best epochs
(``epoch_NNN.ckpt``, written by the monitoring ``ModelCheckpoint``), ``last.ckpt`` (rewritten
after every epoch: what ``ckpt_path=last`` resumes from) and ``config.yaml`` (the resolved config
of the run); Hydra's ``.hydra/config.yaml`` sits beside it.

* :func:`read_checkpoint` loads a checkpoint with ``torch.load(weights_only=True)``: tensors and
  plain Python values only, so a crafted file cannot run code while it is read; a truncated,
  foreign or crafted file raises one ``ValueError`` naming it.
* :func:`best_checkpoint` picks the best checkpoint of one run by the score its
  ``ModelCheckpoint`` recorded in it (``current_score`` of the monitored metric, in that
  callback's mode), else a ``NAME=VALUE`` metric in the file name, else the latest epoch; files
  that do not load are skipped with a warning, ``last.ckpt`` is used only when nothing else loads;
  :func:`ranked_checkpoints` is the whole order (``eval.py`` over a folder falls back along it
  when the best does not load as a network).
* :func:`find_checkpoints` gives the best checkpoint of every run under a directory (a run dir,
  a multirun dir, a folder of multiruns): only ``checkpoints/`` folders of runs (beside a
  ``config.yaml``) are considered, hidden and logger folders are skipped and the search is
  bounded in depth and size.
* :func:`resume_checkpoint` resolves ``ckpt_path`` of ``train.py`` (``last``, a run dir, a file)
  and checks that the file loads before anything is written.
* :class:`AtomicCheckpointIO` makes Lightning write every checkpoint through
  :func:`mrflight.fileio.atomic_path`: a crash or a full disk never leaves a truncated ``.ckpt``.
"""

from __future__ import annotations

import ast
import logging
import os
import re
import warnings
from pathlib import Path

from lightning.pytorch.plugins.io import TorchCheckpointIO

from mrflight.fileio import FAILED_FILE, FINISHED, read_failure

__all__ = ["read_checkpoint", "best_checkpoint", "ranked_checkpoints", "find_checkpoints",
           "find_runs", "single_checkpoint", "run_notes", "resume_checkpoint", "unstarted_run",
           "run_dir_of", "run_config_path", "read_run_config", "run_config_targets",
           "checkpoint_sequence", "checkpoint_score", "state_dict_mismatch", "AtomicCheckpointIO",
           "scheduler_class", "CHECKPOINT_DIR", "MAX_SEARCH_DEPTH"]

log = logging.getLogger("mrflight")

#: the folder of a run that holds its checkpoints
CHECKPOINT_DIR = "checkpoints"
#: a run's saved config, in the order they are read
RUN_CONFIGS = (f"{CHECKPOINT_DIR}/config.yaml", ".hydra/config.yaml")
#: how deep :func:`find_runs` looks below the directory it is given (multirun/DATE/TIME/JOB: 3)
MAX_SEARCH_DEPTH = 4
#: how many folders :func:`find_runs` visits before it gives up
MAX_SEARCH_DIRS = 20000
#: folders of a run that never hold other runs
_SKIP = {"wandb", "csv", "figures", "tensorboard", "__pycache__"}


def read_checkpoint(path, map_location="cpu") -> dict:
    """Load a Lightning checkpoint safely: tensors and plain Python values only.

    Args:
        path: a ``.ckpt`` file.
        map_location: where tensors go (``torch.load``'s argument).

    Returns:
        The checkpoint dict (``state_dict``, ``hyper_parameters``, ``callbacks``, ``epoch``...).

    Raises:
        ValueError: ``path`` is missing or a directory, or the file is truncated, not a
            checkpoint, or holds pickled objects other than tensors and plain values (refused:
            unpickling them could run code).

    References:
        PyTorch, ``torch.load(weights_only=True)`` (the restricted unpickler).
    """
    import pickle

    import torch

    p = Path(str(path)).expanduser()
    if p.is_dir():
        raise ValueError(_directory_message(p))
    if not p.is_file():
        raise ValueError(f"checkpoint {str(path)!r} does not exist; give a .ckpt file "
                         "written by train.py (RUN/checkpoints/*.ckpt)")
    if not _is_torch_file(p):
        raise ValueError(f"file {str(path)!r} is not a PyTorch checkpoint (neither the zip archive "
                         "nor the pickle that torch.save writes): give a .ckpt file written by "
                         "train.py (RUN/checkpoints/*.ckpt)")
    try:
        ck = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"checkpoint {str(path)!r} holds objects other than tensors and plain "
                         "values and was refused (unpickling them could run code): "
                         f"{_refused_reason(e)}. Load only checkpoints you trust and that "
                         "mrflight wrote") from None
    except Exception as e:  # noqa: BLE001 - zip/EOF/key errors of a damaged or foreign file
        raise ValueError(f"checkpoint {str(path)!r} is not a readable mrflight checkpoint "
                         f"({type(e).__name__}: {_first_sentence(e)}); is it truncated (a full "
                         "disk or a killed copy), or from another program?") from None
    if not isinstance(ck, dict) or not isinstance(ck.get("state_dict"), dict):
        raise ValueError(f"checkpoint {str(path)!r} is not a Lightning checkpoint (no "
                         "state_dict): give a .ckpt written by train.py")
    return ck


#: how the files ``torch.save`` writes begin: a zip archive, or (``_use_new_zipfile_serialization
#: =False``) a pickle whose first object is torch's magic number (a pickled 10-byte long)
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _is_torch_file(p: Path) -> bool:
    """Whether ``p`` begins as a file of ``torch.save`` does (an empty or unreadable file
    counts: torch.load reports it)."""
    try:
        with open(p, "rb") as f:
            head = f.read(32)
    except OSError:
        return True
    return not head or head.startswith(_ZIP_MAGIC) or (head[:1] == b"\x80"
                                                       and _LEGACY_MAGIC in head)


def _refused_reason(e: BaseException) -> str:
    """What torch's restricted unpickler refused (the object it names), without torch's advice
    to load the file with ``weights_only=False`` or to allowlist the object."""
    text = str(e)
    named = re.search(r"GLOBAL (\S+)", text)
    if named:
        return f"it names {named.group(1)}"
    lines = [ln.split("WeightsUnpickler error:")[-1].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and "weights_only" not in ln
             and not ln.startswith(("Weights only load failed", "Check the documentation"))]
    return lines[-1] if lines else type(e).__name__


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _first_sentence(e: BaseException) -> str:
    """The first sentence of the error's first line: not the advice torch adds to a damaged
    zip archive's error ("This is an internal miniz error. If you are seeing ...")."""
    first, *rest = re.split(r"(?<=\.)\s+(?=[A-Z])", _first_line(e), maxsplit=1)
    return first.rstrip(".") if rest else first


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape "
                            r"torch\.Size\((\[.*?\])\) from checkpoint, the shape in current "
                            r"model is torch\.Size\((\[.*?\])\)")


def state_dict_mismatch(e: BaseException, n: int = 3) -> str:
    """The ``RuntimeError`` of ``load_state_dict(strict=True)`` in one line: the first ``n``
    missing and unexpected keys and the first size mismatch (else the error's first line)."""
    text, parts = str(e), []
    for kind in ("Missing", "Unexpected"):
        found = re.search(kind + r" key\(s\) in state_dict: (.*)", text)
        keys = re.findall(r'"([^"]+)"', found.group(1)) if found else []
        if keys:
            parts.append(f"{kind.lower()} keys {', '.join(keys[:n])}{_more(len(keys) - n)}")
    sizes = _SIZE_MISMATCH.findall(text)
    if sizes:
        key, saved, model = sizes[0]
        parts.append(f"{key} has shape {saved} in the checkpoint, {model} in the model"
                     f"{_more(len(sizes) - 1, ' size mismatches')}")
    return "; ".join(parts) or _first_line(e)


def _more(count: int, what: str = "") -> str:
    return f" (+{count} more{what})" if count > 0 else ""


def _directory_message(p: Path) -> str:
    found = [c for d in (p, p / CHECKPOINT_DIR) for c in _checkpoint_files(d)]
    if not found:
        return (f"checkpoint {str(p)!r} is a directory with no .ckpt file: give a checkpoint "
                "file (a training run keeps them in RUN/checkpoints/)")
    try:
        hint = f"e.g. {best_checkpoint(p)} (the best of this run)"
    except ValueError:
        hint = "one of " + ", ".join(c.name for c in found)
    return f"checkpoint {str(p)!r} is a directory, not a checkpoint file: give a .ckpt file, {hint}"


# -------------------------------------------------------------------------------- run layout
def run_dir_of(ckpt: Path) -> Path:
    """The run directory of a checkpoint (the parent of its ``checkpoints/`` folder)."""
    ckpt = Path(ckpt)
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else ckpt.parent


def run_config_path(run_dir) -> Path | None:
    """The saved config of a run (``checkpoints/config.yaml``, else ``.hydra/config.yaml``)."""
    for rel in RUN_CONFIGS:
        c = Path(run_dir) / rel
        if c.is_file():
            return c
    return None


def read_run_config(ckpt) -> tuple[Path, dict | None]:
    """The run directory of a checkpoint and its saved config (:func:`run_config_path`, as an
    unresolved dict), or ``None``. The ``_target_``s of its ``sequence`` and ``data`` (what
    evaluation builds from it) must be among :func:`run_config_targets`: a run folder may come
    from anywhere, and a prefix check is not enough (``mrflight.fileio.np.load`` resolves to
    ``numpy.load``, and ``mrflight.fileio.save_mat`` writes any file).

    Raises:
        ValueError: a ``sequence`` or ``data`` node names another ``_target_``.
    """
    from omegaconf import OmegaConf

    from mrflight.config import to_plain

    run_dir = run_dir_of(ckpt)
    c = run_config_path(run_dir)
    if c is None:
        return run_dir, None
    rcfg = to_plain(OmegaConf.load(c), resolve=False)
    allowed = run_config_targets()
    for node in ("sequence", "data"):
        _check_targets(rcfg.get(node), f"{c}: {node}", allowed[node])
    return run_dir, rcfg


def run_config_targets() -> dict[str, frozenset[str]]:
    """``{node: the _target_ paths a run's saved node may name}``: the sequence builders
    (``sequence``), the data modules and their grids (``data``), under their public path, their
    module path and any path of earlier versions (:data:`mrflight.config._MOVED`)."""
    from mrflight import data, dictionary, sequence_files
    from mrflight.config import _MOVED
    from mrflight.physics import sequence

    objects = {
        "sequence": {"mrflight.physics.sequence.oksuz2019": sequence.oksuz2019,
                     "mrflight.physics.sequence.jiang2015": sequence.jiang2015,
                     "mrflight.physics.oksuz2019": sequence.oksuz2019,
                     "mrflight.physics.jiang2015": sequence.jiang2015,
                     "mrflight.sequence_files.from_file": sequence_files.from_file},
        "data": {"mrflight.data.FingerprintDataModule": data.FingerprintDataModule,
                 "mrflight.data.SimulatedDataModule": data.SimulatedDataModule,
                 "mrflight.dictionary.paper_grid": dictionary.paper_grid,
                 "mrflight.dictionary.regular_grid": dictionary.regular_grid,
                 "mrflight.dictionary.random_params": dictionary.random_params},
    }
    out = {}
    for node, named in objects.items():
        paths = set(named) | {f"{o.__module__}.{o.__qualname__}" for o in named.values()}
        paths |= {old for old, new in _MOVED.items() if new in paths}
        out[node] = frozenset(paths)
    return out


def _check_targets(node, where: str, allowed: frozenset[str]) -> None:
    if isinstance(node, dict):
        t = node.get("_target_")
        if t is not None and str(t) not in allowed:
            raise ValueError(f"{where} names {t!r}: only mrflight's "
                             f"{where.rpartition(': ')[2]} builders are built from a run's "
                             f"saved config ({', '.join(sorted(allowed))})")
        for v in node.values():
            _check_targets(v, where, allowed)
    elif isinstance(node, list):
        for v in node:
            _check_targets(v, where, allowed)


def checkpoint_sequence(module):
    """The training :class:`~mrflight.physics.Sequence` a loaded checkpoint carries
    (``hparams["sequence"]``, a ``Sequence`` or its ``to_dict()``), or ``None``."""
    from mrflight.physics import Sequence

    hp = getattr(module, "hparams", None)
    if hp is None:
        return None
    try:
        val = hp.get("sequence") if hasattr(hp, "get") else getattr(hp, "sequence", None)
    except Exception:
        val = None
    if isinstance(val, Sequence):
        return val
    if val is not None and hasattr(val, "keys") and "flip_angle_deg" in val:
        d = {k: (list(v) if not isinstance(v, (str, int, float, bool)) else v)
             for k, v in dict(val).items()}
        return Sequence.from_dict(d)
    return None


def _checkpoint_files(folder: Path) -> list[Path]:
    try:
        return sorted(c for c in folder.glob("*.ckpt") if c.is_file()
                      and not c.name.startswith("."))
    except OSError:
        return []


def _ckpt_folder(path: Path) -> Path:
    """``path`` itself when it holds checkpoints, else its ``checkpoints/`` folder."""
    return path if _checkpoint_files(path) else path / CHECKPOINT_DIR


#: the log a training job writes into its folder (Hydra's job log, ``hydra.job.name: train``)
TRAIN_LOG = "train.log"


def _is_job(d: Path) -> bool:
    """``d`` is the folder of a training job (its log, or the ``FAILED.txt`` of a multirun)."""
    return (d / TRAIN_LOG).is_file() or (d / FAILED_FILE).is_file()


def find_runs(root, max_depth: int = MAX_SEARCH_DEPTH, jobs: bool = False) -> list[Path]:
    """Training runs under ``root``: folders with ``checkpoints/*.ckpt`` and a saved config
    (with ``jobs=True`` also the folders of training jobs without a checkpoint: failed, or not
    past their first epoch).

    The search does not enter runs, hidden folders or logger folders (``wandb``, ``csv``...),
    goes at most ``max_depth`` levels below ``root`` and stops with a ValueError after
    :data:`MAX_SEARCH_DIRS` folders (a home directory given by mistake).
    """
    root = Path(str(root)).expanduser()
    runs, visited, seen = [], 0, set()
    # symbolic links to runs (a folder gathering runs from elsewhere) are followed; a folder
    # reached twice (a link to a run also under root, a link loop) is searched once
    for here, dirs, _ in os.walk(root, followlinks=True):
        visited += 1
        if visited > MAX_SEARCH_DIRS:
            raise ValueError(f"ckpt_path={root}: searched {MAX_SEARCH_DIRS} folders without "
                             "finishing; give a run or multirun directory")
        d, real = Path(here), Path(here).resolve()
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        depth = len(d.relative_to(root).parts)
        if ((_checkpoint_files(d / CHECKPOINT_DIR) and run_config_path(d) is not None)
                or (jobs and _is_job(d))):
            runs.append(d)
            dirs[:] = []
            continue
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x not in _SKIP
                         and x != CHECKPOINT_DIR) if depth < max_depth else []
    return sorted(runs)


# -------------------------------------------------------------------------------- choosing
_NAME_METRIC = re.compile(r"(?:^|[-_])([A-Za-z][\w/]*?)="
                          r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


def checkpoint_score(ck: dict, name: str = "") -> tuple[str, str, float] | None:
    """``(monitor, mode, value)`` recorded in a loaded checkpoint, or ``None``.

    The score is the ``current_score`` that the monitoring ``ModelCheckpoint`` stored in its
    callback state when it wrote this file (its own score: Lightning sets it before saving), with
    the mode read from the callback's state key; failing that, a ``NAME=VALUE`` metric in the file
    ``name`` (mode ``min``).
    """
    import math

    for key, state in (ck.get("callbacks") or {}).items():
        if not (isinstance(key, str) and key.startswith("ModelCheckpoint")
                and isinstance(state, dict)):
            continue
        monitor, value = state.get("monitor"), state.get("current_score")
        if not monitor or value is None:
            continue
        try:
            mode = ast.literal_eval(key[len("ModelCheckpoint"):]).get("mode", "min")
        except (ValueError, SyntaxError, AttributeError):
            mode = "min"
        value = float(value)
        if math.isfinite(value):
            return str(monitor), str(mode), value
    found = _NAME_METRIC.findall(Path(name).stem) if name else []
    found = [(k, v) for k, v in found if k not in ("epoch", "step")]
    if found:
        return found[-1][0], "min", float(found[-1][1])
    return None


def best_checkpoint(path, warn: bool = True, unloadable: dict | None = None) -> Path:
    """The best loadable checkpoint of one run (a run dir or its ``checkpoints/`` folder): the
    first of :func:`ranked_checkpoints`.

    Raises:
        ValueError: no checkpoint of the run loads.
    """
    return ranked_checkpoints(path, warn, unloadable)[0]


def ranked_checkpoints(path, warn: bool = True, unloadable: dict | None = None) -> list[Path]:
    """The readable checkpoints of one run (a run dir or its ``checkpoints/`` folder), best
    first.

    Ranked by the recorded score (:func:`checkpoint_score`) in the callback's mode (of the
    monitor the newest scored file records); then the others by epoch and step, newest first;
    ``last*.ckpt`` at the end (its recorded score is not its own). Files that do not read are
    left out, with a warning (``warn``), and added to ``unloadable`` (``{file: error}``) where
    it is given.

    Raises:
        ValueError: no checkpoint of the run reads (one error naming each file).
    """
    folder = _ckpt_folder(Path(str(path)).expanduser())
    files = _checkpoint_files(folder)
    if not files:
        raise ValueError(f"ckpt_path={path}: no .ckpt file in {folder}")
    ranked, last, bad = [], [], []
    for f in files:
        try:
            ck = read_checkpoint(f)
        except ValueError as e:
            bad.append(f"{f.name} ({e})")
            if unloadable is not None:
                unloadable[f] = str(e)
            continue
        order = (int(ck.get("epoch", -1) or -1), int(ck.get("global_step", -1) or -1))
        if f.stem.startswith("last"):
            last.append((order, f))
            continue
        ranked.append((checkpoint_score(ck, f.name), order, f))
        del ck
    if not (ranked or last):  # one error naming each file (no warning saying it first)
        raise ValueError(f"ckpt_path={path}: no checkpoint in {folder} loads ({'; '.join(bad)})")
    if bad and warn:
        warnings.warn(f"skipped checkpoints of {folder} that do not load: {'; '.join(bad)}",
                      RuntimeWarning, stacklevel=3)
    scored = [r for r in ranked if r[0] is not None]
    best = []
    if scored:
        monitor, mode = max(scored, key=lambda r: r[1])[0][:2]  # as the newest one records
        sign = -1.0 if mode == "max" else 1.0
        best = sorted((r for r in scored if r[0][0] == monitor),
                      key=lambda r: (sign * r[0][2], tuple(-x for x in r[1])))
    rest = sorted((r for r in ranked if r not in best), key=lambda r: r[1], reverse=True)
    return ([r[2] for r in best + rest]
            + [f for _, f in sorted(last, key=lambda r: r[0], reverse=True)])


def find_checkpoints(path, unloadable: dict | None = None) -> list[Path]:
    """The checkpoints to evaluate under ``path``: one per run, its best.

    Args:
        path: a ``.ckpt`` file (returned as is), a run directory or its ``checkpoints/`` folder
            (its best checkpoint, even without a saved config), or a directory of runs (a
            multirun): the best checkpoint of every run found by :func:`find_runs`.
        unloadable: where given, the checkpoints found that do not load are added to it
            (``{file: error}``, for :func:`run_notes`) instead of being warned about.

    Raises:
        ValueError: ``path`` does not exist or holds no run with a loadable checkpoint (naming
            each run and why its checkpoints do not load).
    """
    p = Path(str(path)).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise ValueError(f"ckpt_path={path}: no such file or directory; give a .ckpt file, "
                         "a run folder (outputs/DATE/TIME) or a multirun folder")
    if _checkpoint_files(_ckpt_folder(p)):
        return [best_checkpoint(p, warn=unloadable is None, unloadable=unloadable)]
    runs = find_runs(p)
    if not runs:
        notes = run_notes(p)  # a sweep whose jobs all failed: say so, not just "no run"
        if notes:
            raise ValueError(f"ckpt_path={path}: no training run under {p} has a checkpoint "
                             f"to evaluate: {'; '.join(notes)}")
        raise ValueError(f"ckpt_path={path}: no training run under {p} (a run is a folder with "
                         f"{CHECKPOINT_DIR}/*.ckpt beside a config.yaml, searched "
                         f"{MAX_SEARCH_DEPTH} levels deep)")
    out, bad, skipped = [], {}, []
    for r in runs:
        try:
            out.append(best_checkpoint(r, warn=unloadable is None, unloadable=bad))
        except ValueError as e:
            skipped.append(f"run {r} skipped: {e}")
    if not out:  # one error naming each run (no warnings saying it first)
        raise ValueError(f"ckpt_path={path}: no run under {p} has a checkpoint that loads: "
                         + "; ".join(run_notes(p, [], bad)))
    if unloadable is None:
        for msg in skipped:
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    if unloadable is not None:
        unloadable.update(bad)
    return out


def run_notes(path, evaluated: list | None = None,
              unloadable: dict | None = None) -> list[str]:
    """What an evaluation of ``path`` (as :func:`find_checkpoints` takes it) must say about
    the training jobs under it that did not finish and the checkpoints that do not load: one
    line per job without a checkpoint (not evaluated: its ``FAILED.txt`` error, or none yet),
    per run whose best checkpoint is evaluated although it failed or has no ``metrics.json``
    (still training, or stopped), per run left out because its checkpoint does not load, and
    per run evaluated from another checkpoint than its best because that one does not load.

    Args:
        evaluated: the checkpoints evaluated (``None``: the best of every run whose
            checkpoints load).
        unloadable: ``{checkpoint: error}`` of the checkpoints found that do not load
            (:func:`find_checkpoints`, :func:`mrflight.evaluation.checkpoint_groups`).
    """
    p = Path(str(path)).expanduser()
    if p.is_file():
        dirs = [run_dir_of(p)]
    elif _checkpoint_files(_ckpt_folder(p)):
        dirs = [run_dir_of(_checkpoint_files(_ckpt_folder(p))[0])]
    elif p.is_dir():
        dirs = find_runs(p, jobs=True)
    else:
        dirs = []
    unloadable = {Path(f): " ".join(str(e).split()) for f, e in (unloadable or {}).items()}
    dirs = sorted(set(dirs) | {run_dir_of(f) for f in unloadable})
    notes = []
    for d in dirs:
        rel = d.relative_to(p) if d.is_relative_to(p) else d
        name = d if str(rel) == "." else rel
        error = (read_failure(d) or {}).get("error")
        bad = {f: e for f, e in unloadable.items() if run_dir_of(f) == d}
        used = [c for c in evaluated or [] if run_dir_of(Path(c)) == d]
        if bad and not used:
            others = [c.name for c in _checkpoint_files(_ckpt_folder(d)) if c not in bad]
            notes.append(f"run {name}: not evaluated, {_not_loading(bad, d)}"
                         + (f" (the job failed: {error})" if error else "")
                         + "; fix that and evaluate the run again"
                         + (f", or evaluate another of its checkpoints ({', '.join(others)}) "
                            "with ckpt_path=FILE" if others else ""))
            continue
        if _is_job(d) and not (d / FINISHED).is_file():  # not a loose checkpoint's folder
            if not _checkpoint_files(d / CHECKPOINT_DIR):
                why = (f"the job failed ({error})" if error else f"no checkpoint (still in "
                       f"its first epoch, or it stopped or failed before that ended: see its "
                       f"{TRAIN_LOG})")
                notes.append(f"run {name}: not evaluated, {why}")
            elif error:
                notes.append(f"run {name}: failed ({error}); its best checkpoint before the "
                             "failure is evaluated")
            else:
                notes.append(f"run {name}: not finished (no {FINISHED}: still training, or "
                             "stopped); its best checkpoint so far is evaluated")
        if bad:
            notes.append(f"run {name}: {_not_loading(bad, d)}; "
                         f"{_relative(Path(used[0]), d)}, its best checkpoint that loads, is "
                         "evaluated instead")
    return notes


def _not_loading(bad: dict, run_dir: Path) -> str:
    """``FILE does not load (ERROR)``, or ``N checkpoints do not load: FILE (ERROR); ...``."""
    files = [f"{_relative(f, run_dir)} ({e})" for f, e in sorted(bad.items())]
    if len(files) == 1:
        ((f, e),) = bad.items()
        return f"{_relative(f, run_dir)} does not load ({e})"
    return f"{len(files)} checkpoints do not load: {'; '.join(files)}"


def _relative(f: Path, folder: Path) -> Path:
    return f.relative_to(folder) if f.is_relative_to(folder) else f


def single_checkpoint(path) -> str:
    """The one checkpoint ``path`` names: a ``.ckpt`` file (``path`` as given), or the best of
    one run directory.

    Raises:
        ValueError: as :func:`find_checkpoints`, or ``path`` holds several runs.
    """
    if not Path(str(path)).expanduser().is_dir():
        return str(path)
    found = find_checkpoints(path)
    if len(found) > 1:
        listed = ", ".join(map(str, found))
        raise ValueError(f"ckpt_path={path} holds several runs ({listed}); give one "
                         "checkpoint or run directory for maps")
    return str(found[0])


# -------------------------------------------------------------------------------- resuming
def resume_checkpoint(ckpt_path, output_dir) -> tuple[Path, dict] | None:
    """Resolve and read the checkpoint ``train.py`` resumes from.

    Args:
        ckpt_path: ``None``/``""`` (no resume), ``"last"`` (``last.ckpt`` of ``output_dir``), a
            run directory or checkpoints folder (its ``last.ckpt``), or a ``.ckpt`` file.
        output_dir: this run's output directory.

    Returns:
        ``(path, checkpoint dict)`` or ``None``.

    Raises:
        ValueError: nothing to resume from, or the file does not load (truncated, crafted...).
    """
    if ckpt_path in (None, ""):
        return None
    p = Path(str(output_dir)) if str(ckpt_path) == "last" else Path(str(ckpt_path)).expanduser()
    if p.is_dir():
        for cand in (p / CHECKPOINT_DIR / "last.ckpt", p / "last.ckpt"):
            if cand.is_file():
                p = cand
                break
        else:
            raise ValueError(_no_last_message(ckpt_path, p))
    if not p.is_file():
        raise ValueError(f"ckpt_path={ckpt_path}: {p} does not exist")
    return p, read_checkpoint(p)


def _no_last_message(ckpt_path, p: Path) -> str:
    """Why ``p`` (a folder) has nothing to resume from, and what to do instead."""
    found = _checkpoint_files(p / CHECKPOINT_DIR)
    if found:  # the disk filled before last.ckpt was written, or save_last was turned off
        return (f"ckpt_path={ckpt_path}: no last.ckpt in {p / CHECKPOINT_DIR}: give one of its "
                f"checkpoints, e.g. ckpt_path={found[-1]}")
    if (p / "eval.log").is_file() and not (p / RUN_CONFIGS[0]).is_file():
        return (f"ckpt_path={ckpt_path}: {p} is an eval.py output folder (eval.log), not a "
                "training run: set hydra.run.dir to the folder of the run to resume (the one "
                f"with {CHECKPOINT_DIR}/last.ckpt)")
    if (p / FINISHED).is_file():
        return (f"ckpt_path={ckpt_path}: the run in {p} has finished and its checkpoints are "
                "gone: there is nothing to resume; start a new run in another hydra.run.dir")
    if (p / RUN_CONFIGS[0]).is_file():
        return (f"ckpt_path={ckpt_path}: the run in {p} stopped before its first epoch ended "
                f"and has no checkpoint to resume from: start it again from the beginning with "
                f"hydra.run.dir={p} ckpt_path=last")
    return (f"ckpt_path={ckpt_path}: no last.ckpt in {p} or {p}/{CHECKPOINT_DIR} "
            "(to resume, set hydra.run.dir to the interrupted run's directory; a run stopped "
            "before it saved anything there starts again without ckpt_path)")


def unstarted_run(ckpt_path, output_dir) -> Path | None:
    """The run folder ``output_dir`` when ``ckpt_path=last`` finds its run stopped before its
    first checkpoint (its ``checkpoints/config.yaml``, no ``.ckpt``; a job preempted in its first
    epoch and requeued): that run starts again from the beginning, with its saved config."""
    out = Path(str(output_dir))
    if str(ckpt_path) != "last" or not (out / RUN_CONFIGS[0]).is_file() \
            or (out / FINISHED).is_file():  # a finished run whose checkpoints are gone
        return None
    return None if _checkpoint_files(out / CHECKPOINT_DIR) or _checkpoint_files(out) else out


def scheduler_class(target: str):
    """The learning-rate scheduler class named by ``target`` (a checkpoint's hyperparameters).

    Only classes of ``torch.optim.lr_scheduler`` are accepted: a checkpoint names its scheduler
    as text, and importing an arbitrary name from a file could run anything.

    Raises:
        ValueError: ``target`` is not a scheduler of ``torch.optim.lr_scheduler``.
    """
    import torch.optim.lr_scheduler as sched

    prefix = "torch.optim.lr_scheduler."
    name = str(target)[len(prefix):] if str(target).startswith(prefix) else ""
    cls = getattr(sched, name, None) if name and "." not in name else None
    bases = tuple(c for c in (getattr(sched, "LRScheduler", None),
                              getattr(sched, "ReduceLROnPlateau", None)) if c is not None)
    if not (isinstance(cls, type) and issubclass(cls, bases)):
        allowed = sorted(n for n, c in vars(sched).items() if isinstance(c, type)
                         and issubclass(c, bases) and not n.startswith("_")
                         and n not in ("LRScheduler", "_LRScheduler"))
        raise ValueError(f"scheduler {target!r} is not allowed: give a class of "
                         f"torch.optim.lr_scheduler ({', '.join(allowed)})")
    return cls


# -------------------------------------------------------------------------------- saving
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing through :func:`mrflight.fileio.atomic_path`.

    The checkpoint goes to a hidden temporary file beside the destination, is fsynced and
    renamed: a crash or a full disk leaves the previous file, never a truncated one, and a full
    disk raises ``OSError(ENOSPC)`` naming the checkpoint. ``train.py`` gives it to the Trainer
    (``plugins``) unless the trainer config sets its own.
    """

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        """The checkpoint, its ``ModelCheckpoint`` state following a run folder moved or copied
        since (:func:`_follow_moved_folder`)."""
        kw = {} if map_location is None else {"map_location": map_location}
        ck = super().load_checkpoint(path, weights_only=weights_only, **kw)
        _follow_moved_folder(ck, Path(path).parent)
        return ck

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        from mrflight.fileio import atomic_path

        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options=storage_options)


def _follow_moved_folder(ck: dict, folder: Path) -> None:
    """Point the ``ModelCheckpoint`` states of ``ck`` at ``folder`` (the checkpoint's own
    folder) where they name another folder whose files are in this one: the run folder was
    moved or copied. Lightning would otherwise keep the old folder's best checkpoint (a
    resumed test then fails with the file not found, or tests the old copy's file) and reload
    nothing else of the state (the best score, the kept checkpoints)."""
    here = os.path.realpath(folder)
    for key, state in (ck.get("callbacks") or {}).items():
        if not (str(key).startswith("ModelCheckpoint") and isinstance(state, dict)):
            continue
        old = state.get("dirpath")
        best = state.get("best_model_path")
        if not old or os.path.realpath(old) == here or not best \
                or not (Path(here) / Path(best).name).is_file():
            continue

        def moved(p, old=old):
            return str(Path(here) / Path(p).name) if p and Path(p).parent == Path(old) else p

        state["dirpath"] = here
        for name in ("best_model_path", "kth_best_model_path", "last_model_path"):
            if state.get(name):
                state[name] = moved(state[name])
        if isinstance(state.get("best_k_models"), dict):
            state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items()}
