"""The efficiency, off-grid B1 and robustness reports of a group's networks
(:mod:`mrflight.efficiency`)."""

from __future__ import annotations

import logging
import time

from mrflight.evaluation.methods import estimates_b1, estimators
from mrflight.evaluation.settings import EvalSettings
from mrflight.evaluation.testdata import Group

__all__ = ["bound_reports"]

log = logging.getLogger("mrflight")


def bound_reports(group: Group, settings: EvalSettings, figures: dict, cache_dir=None) -> dict:
    """The efficiency, off-grid B1 and robustness reports of a group's networks (and of
    (T1, T2, B1) matching, its dictionary cached in ``cache_dir``); every row holds the
    group's ``index`` as ``group``, its efficiency figure the group's ``tag``."""
    from mrflight import efficiency as eff
    from mrflight.phantoms import tissue_values

    est, noise = estimators(group, settings, cache_dir)
    if not est:
        return {}
    out: dict = {}
    with_b1 = any(estimates_b1(r.module) for r in group.runs)
    if settings.efficiency:
        t0 = time.perf_counter()
        pts = eff.efficiency_grid(b1=(0.8, 1.0, 1.2) if with_b1 else (1.0,))
        rows = eff.efficiency_report(group.seq, est, pts, settings.efficiency_noise_std,
                                     settings.efficiency_realizations, settings.noise_seed)
        out["efficiency"] = rows
        out["efficiency_summary"] = eff.summarise(rows)
        if settings.plots:
            from mrflight import plots

            figures[f"efficiency_{group.seq.name}{group.tag}"] = plots.efficiency_map(rows)
        log.info("efficiency report (%d points): %.1f s", len(pts), time.perf_counter() - t0)
    if settings.offgrid_b1:
        t0 = time.perf_counter()
        out["offgrid_b1"] = eff.offgrid_report(group.seq, est, settings.offgrid_b1_signals,
                                               0.01, settings.offgrid_seed)
        log.info("off-grid report with B1 and proton density (%d signals): %.1f s",
                 settings.offgrid_b1_signals, time.perf_counter() - t0)
    if settings.robustness:
        t0 = time.perf_counter()
        # tissues inside the default prior, off its edges (skull's T2 of 5 ms is its lower end)
        tis = {k: v for k, v in tissue_values().items()
               if 10 <= v["t2_ms"] <= 500 and v["t1_ms"] <= 4000}
        out["robustness"] = eff.robustness_report(
            group.seq, est, noise, tis, seed=settings.noise_seed,
            voxels=settings.tissue_voxels, tissue_noise_std=settings.tissue_noise_std)
        log.info("robustness report and tissue medians (%d tissues): %.1f s", len(tis),
                 time.perf_counter() - t0)
    for section in out.values():  # which group's test data and sequence, as the Table 1 rows
        for r in section:
            r["group"] = group.index
    return out
