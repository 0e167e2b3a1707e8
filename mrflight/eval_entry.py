"""From ``eval.py``'s Hydra config to typed calls: the only place that reads it.

:func:`mrflight.pipeline.evaluate` dispatches ``python eval.py`` to one of:

* :func:`maps_from_config` (``input=SERIES``): :class:`~mrflight.maps.MapOptions` from the
  ``maps`` node, the reconstructor (``ckpt_path=`` a trained network, or ``dictionary=`` a file
  or ``paper``) and :func:`mrflight.maps.make_maps`;
* :func:`export_from_config` (``export=onnx|torchscript``):
  :func:`mrflight.export.export_checkpoints`;
* :func:`evaluation_from_config` (otherwise): :class:`~mrflight.evaluation.EvalSettings` from
  the ``evaluation`` node, the runs under ``ckpt_path`` and :func:`mrflight.evaluation.evaluate`.

Checkpoints are found and chosen by :mod:`mrflight.checkpoints`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mrflight.config import instantiate, to_plain

__all__ = ["maps_from_config", "map_options", "map_reconstructor", "export_from_config",
           "evaluation_from_config", "eval_settings"]

log = logging.getLogger("mrflight")


def _cfg_get(cfg, key, default=None):
    try:
        val = cfg.get(key, default)
    except Exception:
        val = getattr(cfg, key, default)
    return default if val is None else val


def _typed(node, cls):
    """``cls`` built from a config node (its ``_target_``, else ``cls(**node)``; defaults for
    ``None``), checked: a bad value raises its own ``ValueError``, naming the setting, before
    any work."""
    from hydra.errors import InstantiationException

    if node is None:
        return cls()
    if "_target_" not in node:
        return cls(**to_plain(node))
    try:
        return instantiate(node, _convert_="all", _recursive_=False)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError):
            raise e.__cause__ from None
        raise


# ============================================================================ maps
def map_options(cfg):
    """The :class:`~mrflight.maps.MapOptions` of the config's ``maps`` node (defaults without)."""
    from mrflight.maps import MapOptions

    return _typed(_cfg_get(cfg, "maps"), MapOptions)


def _cfg_sequence(cfg):
    """``cfg.sequence`` built, or ``None`` (only built when needed: it may be incomplete)."""
    node = _cfg_get(cfg, "sequence")
    return None if node is None else instantiate(node, _convert_="all")


def map_reconstructor(cfg, options):
    """The reconstructor ``ckpt_path=`` or ``dictionary=`` names (exactly one of them)."""
    ckpt, dic = _cfg_get(cfg, "ckpt_path"), _cfg_get(cfg, "dictionary")
    if bool(ckpt) == bool(dic):
        raise ValueError("give exactly one of ckpt_path=CKPT (a trained network) or "
                         "dictionary=PATH (dictionary matching) with input=...")
    rec = (_network_reconstructor(cfg, ckpt, options) if ckpt
           else _matching_reconstructor(cfg, dic, options))
    complex_net = bool(ckpt) and rec.module.hparams.get("input_mode") == "complex"
    if options.fit_iterations or complex_net:
        from mrflight.series_io import open_series

        inp = _cfg_get(cfg, "input")
        with open_series(inp, dataset=options.dataset, length=rec.length) as src:
            magnitude = not src.is_complex
        if magnitude and complex_net:  # outside what the network learnt: its maps are far off
            raise ValueError(f"the network {ckpt} was trained on complex fingerprints, but "
                             f"{inp} is real-valued (a magnitude, which has lost the sign "
                             "changes and the noise model the network learnt): pass the "
                             "complex series, match it with a dictionary (dictionary=...), "
                             "or train a network with data.input_mode=magnitude")
        if magnitude:
            raise ValueError(f"maps.fit_iterations={options.fit_iterations} fits the "
                             f"complex signal model, but {inp} is real-valued (a "
                             "magnitude, whose Rician noise would bias the fit): pass the "
                             "complex series, or set maps.fit_iterations=0")
    if options.fit_iterations:
        from mrflight.maps import FittedReconstructor

        if ckpt:
            rec.compute_m0 = False  # the fit computes M0 at its own estimate
        rec = FittedReconstructor(rec, options.fit_iterations)
    return rec


def _network_reconstructor(cfg, ckpt, options):
    import mrflight
    from mrflight.checkpoints import checkpoint_sequence, single_checkpoint
    from mrflight.maps import NetworkReconstructor

    ckpt = single_checkpoint(ckpt)  # a training run dir: its best checkpoint
    module = mrflight.load_checkpoint(ckpt, map_location=options.device or "cpu")
    seq = checkpoint_sequence(module) or _cfg_sequence(cfg)
    return NetworkReconstructor(module, seq, compute_m0=options.compute_m0, source=ckpt,
                                training_range=_training_range(ckpt, module))


def _training_range(ckpt, module) -> dict | None:
    """The T1/T2 range (ms) the maps flag estimates above: the one the checkpoint records
    (``hparams["training_range"]``, its training data's: also for a checkpoint copied out of
    its run folder and for a run on a stored dictionary), else, for a checkpoint written
    before it was recorded, its run's saved ``data.t1_range`` and ``data.t2_range`` (fresh
    simulated data; the checkpoint still in its run folder), else ``None`` (not checked)."""
    from mrflight.checkpoints import read_run_config

    recorded = (getattr(module, "hparams", None) or {}).get("training_range")
    if recorded is not None:
        return recorded
    try:  # a run config naming code of its own is not read (maps do not need it)
        data = (read_run_config(ckpt)[1] or {}).get("data") or {}
        return {k: tuple(float(v) for v in data[f"{k}_range"]) for k in ("t1", "t2")}
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _matching_reconstructor(cfg, dic, options):
    from mrflight import dictionary as dmod
    from mrflight.maps import MatchingReconstructor

    inp = _cfg_get(cfg, "input")
    if str(dic) == "paper":
        seq = _cfg_sequence(cfg)
        if seq is None:
            raise ValueError("dictionary=paper needs a sequence config to simulate with")
        # what would refuse the series is checked before the 114 650 atoms are simulated
        is_complex = _series_is_complex(inp, options, len(seq))
        if _cfg_get(cfg, "b1map") and not options.fit_iterations:
            raise ValueError("b1map=FILE restricts matching to the measured B1, which needs a "
                             "dictionary with a B1 column (T1, T2, B1); dictionary=paper has "
                             "none: give dictionary=FILE with one, or add "
                             "maps.fit_iterations=15 to fit T1 and T2 at the measured B1 "
                             "(complex series)")
        paths = _cfg_get(cfg, "paths")
        cache = _cfg_get(paths, "cache_dir", True) if paths is not None else True
        d = dmod.generate(seq, dmod.paper_grid(), cache_dir=cache, progress=options.progress)
    else:
        d = dmod.load(str(dic))
        is_complex = _series_is_complex(inp, options, d.n_timepoints)
    cm = is_complex if options.complex_matching is None else bool(options.complex_matching)
    if cm and not is_complex:
        raise ValueError(f"maps.complex_matching=true needs a complex series, but {inp} is "
                         "real-valued (read as a magnitude): pass the complex series, or "
                         "drop maps.complex_matching")
    rec = MatchingReconstructor.from_dictionary(d, complex_matching=cm and is_complex,
                                                rank=options.rank,
                                                device=options.device or "cpu", source=dic,
                                                b1_restricted=bool(_cfg_get(cfg, "b1map")))
    if rec.sequence is None:  # only for the sidecar: the dictionary fixes the length
        try:
            seq = _cfg_sequence(cfg)
        except Exception:  # an incomplete sequence config must not stop matching
            seq = None
        rec.sequence = seq if seq is not None and len(seq) == rec.length else None
    return rec


def _series_is_complex(inp, options, length: int) -> bool:
    """Whether the series ``input=`` names is complex, once it is known to have a time axis of
    ``length`` points (else the error of :func:`mrflight.maps.blocks.plan_series`)."""
    from mrflight.maps.blocks import plan_series
    from mrflight.series_io import open_series

    with open_series(inp, dataset=options.dataset, length=length) as src:
        plan_series(src, length, options.time_axis, options.block_mb)
        return src.is_complex


def _output_dir(cfg) -> Path:
    paths = _cfg_get(cfg, "paths")
    if paths is not None and _cfg_get(paths, "output_dir"):
        return Path(str(_cfg_get(paths, "output_dir")))
    if _cfg_get(cfg, "output_dir"):
        return Path(str(_cfg_get(cfg, "output_dir")))
    return Path.cwd()


def maps_from_config(cfg) -> dict[str, Path]:
    """Body of ``python eval.py input=PATH ckpt_path=CKPT`` (or ``dictionary=PATH``).

    Reads from ``cfg``: ``input`` (the series), ``ckpt_path`` (a checkpoint or one run
    directory) or ``dictionary`` (a dictionary file, or ``paper`` for the paper's grid simulated
    with ``cfg.sequence`` and cached), ``mask`` (optional file), ``maps`` (a
    :class:`~mrflight.maps.MapOptions` node, optional), ``b1map`` (optional measured B1 map for
    matching with a (T1, T2, B1) dictionary), ``sequence`` (used only when the
    checkpoint/dictionary carries none), and the output folder ``paths.output_dir`` (else
    ``output_dir``, else the current directory).

    Returns:
        ``{name: path}`` of the files written.
    """
    from mrflight.fileio import output_folder
    from mrflight.maps import make_maps

    inp = _cfg_get(cfg, "input")
    if not inp:
        raise ValueError("input=PATH is required: the image series to reconstruct")
    options = map_options(cfg)
    b1map = _cfg_get(cfg, "b1map")
    if b1map and _cfg_get(cfg, "ckpt_path") and not options.fit_iterations:
        raise ValueError("b1map=FILE restricts dictionary matching to the measured B1 "
                         "(dictionary=PATH with a B1 column); a network estimates B1 itself "
                         "(its TB1map): drop b1map, match with a (T1, T2, B1) dictionary, or "
                         "add maps.fit_iterations=15 to fit T1 and T2 at the measured B1 from "
                         "the network's estimates (complex series)")
    rec = map_reconstructor(cfg, options)
    if b1map and not options.fit_iterations:
        rec.b1_values()  # a dictionary without a B1 column fails here, before any reading
    out_dir = output_folder(_output_dir(cfg), make=False)
    files = make_maps(inp, rec, out_dir, options=options, mask=_cfg_get(cfg, "mask"),
                      b1map=b1map)
    print(f"maps written to {out_dir}:")
    for name in sorted(files):
        print(f"  {files[name]}")
    return files


# ============================================================================ export
def export_from_config(cfg) -> list[Path]:
    """Body of ``python eval.py export=FORMAT ckpt_path=PATH``."""
    from mrflight.export import export_checkpoints
    from mrflight.fileio import output_folder

    files = export_checkpoints(cfg.get("ckpt_path"), str(cfg.export),
                               output_folder(str(cfg.paths.output_dir)))
    for f in files:
        log.info("exported %s", f)
    return files


# ============================================================================ evaluation
def eval_settings(node):
    """The :class:`~mrflight.evaluation.EvalSettings` of the ``evaluation`` node, checked."""
    from mrflight.evaluation import EvalSettings

    return _typed(node, EvalSettings)


def evaluation_from_config(cfg) -> list[dict]:
    """Body of ``python eval.py [ckpt_path=PATH]``: the metric rows written to ``metrics.json``
    (see :mod:`mrflight.evaluation`)."""
    import torch

    from mrflight import evaluation
    from mrflight.checkpoints import find_checkpoints, run_notes
    from mrflight.fileio import RUN_RESULTS, output_folder
    from mrflight.loggers import build_eval_loggers, eval_runs

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    settings = eval_settings(cfg.get("evaluation"))
    out_dir = output_folder(str(cfg.paths.output_dir), RUN_RESULTS)
    cache_dir = cfg.paths.get("cache_dir") if cfg.get("paths") else None

    def cfg_sequence():
        return instantiate(cfg.sequence)

    ckpt_path = cfg.get("ckpt_path")
    notes = []
    if ckpt_path:
        root = Path(str(ckpt_path)).expanduser()
        unloadable = {}  # {checkpoint: why it does not load}: a row missing from the table
        groups = evaluation.checkpoint_groups(find_checkpoints(root, unloadable), root,
                                              settings, cfg_sequence, cache_dir,
                                              None if root.is_file() else unloadable)
        evaluated = [r.ckpt for g in groups for r in g.runs]
        # failed or unfinished jobs, checkpoints that do not load: in the log and table.md
        notes = run_notes(root, evaluated, unloadable)
        if not evaluated:  # every checkpoint failed to load: nothing is written
            raise ValueError(f"ckpt_path={ckpt_path}: no checkpoint under {root} loads: "
                             + "; ".join(notes))
        for note in notes:
            log.warning("%s", note)
    else:
        groups = []
    if not groups:
        groups = [evaluation.matching_group(cfg_sequence(), settings)]

    def loggers(groups, settings_dict):
        return build_eval_loggers(cfg, eval_runs(groups), settings_dict)

    return evaluation.evaluate(groups, settings, out_dir, cache_dir, loggers, notes)
