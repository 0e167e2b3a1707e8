"""One evaluation from typed inputs: :func:`evaluate`."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mrflight.evaluation.bound_reports import bound_reports
from mrflight.evaluation.protocol import evaluate_group
from mrflight.evaluation.report import flat_metrics, log_to_loggers, write_outputs
from mrflight.evaluation.settings import EvalSettings
from mrflight.evaluation.testdata import build_group_data

__all__ = ["evaluate"]

log = logging.getLogger("mrflight")

#: the report sections of :func:`mrflight.evaluation.bound_reports.bound_reports`
_REPORTS = ("efficiency", "efficiency_summary", "offgrid_b1", "robustness")


def evaluate(groups: list, settings: EvalSettings, out_dir: Path, cache_dir=None,
             make_loggers=None, notes: list[str] | None = None) -> list[dict]:
    """Evaluate every group (:func:`~mrflight.evaluation.runs.checkpoint_groups` or
    :func:`~mrflight.evaluation.runs.matching_group`) and write the outputs into ``out_dir``.

    Args:
        cache_dir: the dictionary cache of the eval grid.
        make_loggers: ``(groups, settings dict) -> loggers`` that receive the table, figures
            and metrics (``None``: no loggers).
        notes: the training jobs left out or not finished and the checkpoints that do not
            load (:func:`mrflight.checkpoints.run_notes`): ``metrics.json``'s
            ``info.run_notes`` and a list at the top of ``table.md``.

    Returns:
        The metric rows written to ``metrics.json``.
    """
    rows, figures, arrays, infos, reports = [], {}, {}, [], []
    load_start = _load_average()
    for i, g in enumerate(groups):
        t0 = time.perf_counter()
        build_group_data(g, g.data_cfg, settings, cache_dir)
        which = f"group {i} of {len(groups)}, " if len(groups) > 1 else ""
        log.info("test data for %s%s (%d points; %s): %.1f s", which, g.seq.name, len(g.seq),
                 g.description["data"], time.perf_counter() - t0)
        rows += evaluate_group(g, settings, figures, arrays)
        infos.append({"group": g.index, **g.description})
        reports.append(bound_reports(g, settings, figures, cache_dir))
    extra = {k: [r for rep in reports for r in rep.get(k, [])] for k in _REPORTS}
    info = {**_info(settings, infos, load_start), "run_notes": list(notes or []),
            "runs": [r.summary(g.index) for g in groups for r in g.runs]}
    files = write_outputs(out_dir, rows, info, figures, arrays, extra)
    _log(make_loggers(groups, asdict(settings)) if make_loggers else [], rows, figures,
         out_dir / "table.md")
    log.info("evaluation written to %s (%d files)", out_dir, len(files))
    print((out_dir / "table.md").read_text())
    return rows


def _info(settings: EvalSettings, groups: list[dict], load_start) -> dict:
    """``metrics.json``'s ``info``: the groups, settings and the machine the times come from."""
    import mrflight

    return {"groups": groups, "settings": asdict(settings),
            "latency_repeats": settings.latency_repeats, "device": settings.device,
            "threads": torch.get_num_threads(), "bound_signals": settings.bound_signals,
            "cores": os.cpu_count(), "load_average_start": load_start,
            "load_average_end": _load_average(),
            "bound_kind": "magnitude" if settings.bound_magnitude else "complex",
            "complex_matching": settings.complex_matching,
            "mrflight_version": mrflight.__version__}


def _load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (``None`` where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _log(loggers: list, rows: list[dict], figures: dict, table_md: Path) -> None:
    """Log to the loggers, finish them (the errors in the W&B run summary too) and close the
    figures."""
    import matplotlib.pyplot as plt

    from mrflight.loggers import finish_loggers

    try:
        log_to_loggers(loggers, rows, figures, table_md.read_text())
    finally:
        finish_loggers(loggers, flat_metrics(rows))
        for name, fig in figures.items():
            if not name.startswith("_"):
                plt.close(fig)
