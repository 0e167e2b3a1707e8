"""The outputs of an evaluation: ``metrics.json``, the tables, figures and phantom arrays
(written atomically), and the same through the configured loggers."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from mrflight.evaluation.tables import (
    COLUMNS,
    group_label,
    reports_md,
    several_groups,
    table_csv,
    table_md,
)
from mrflight.fileio import FINISHED, atomic_path

__all__ = ["write_outputs", "log_to_loggers", "flat_metrics", "clean_json"]

log = logging.getLogger("mrflight")


def clean_json(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean_json(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return clean_json(obj.item())
    return obj


def write_outputs(out_dir: Path, rows: list[dict], info: dict, figures: dict,
                  arrays: dict, extra: dict | None = None) -> dict[str, Path]:
    """Write table.md, table.csv, figures/*.png, arrays and, last, metrics.json atomically.

    ``metrics.json`` marks a finished evaluation (a folder holding it is not written into
    again), so it comes last: an evaluation killed while writing its figures can be run again.
    ``extra``: the efficiency, off-grid B1 and robustness reports (lists of rows), written as
    keys of ``metrics.json`` beside ``rows`` and as sections of ``table.md``.
    """
    extra = {k: v for k, v in (extra or {}).items() if v}
    from mrflight import plots

    out_dir = Path(out_dir)
    files = {}

    def write_text(name, text):
        with atomic_path(out_dir / name) as tmp:
            Path(tmp).write_text(text)
        files[name] = out_dir / name

    write_text("table.md", table_md(rows, info) + reports_md(extra))
    write_text("table.csv", table_csv(rows))
    for name, fig in figures.items():
        if name.startswith("_"):
            continue
        path = out_dir / "figures" / f"{name}.png"
        plots.save_figure(fig, path)
        files[f"figures/{name}.png"] = path
    for name, payload in arrays.items():
        path = out_dir / name
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez_compressed(f, **payload)
        files[name] = path
    write_text(FINISHED, json.dumps(clean_json(
        {"units": {"*_ms": "ms", "noise_std": "relative to the unit-norm fingerprint",
                   "latency": "single-signal call, mean and std over latency_repeats calls"},
         "info": info, "rows": rows, **extra}), indent=2) + "\n")
    return files


def log_to_loggers(loggers, rows, figures, table_md) -> None:
    if not loggers:
        return
    from mrflight import plots

    cols = [c for c in COLUMNS if c != "checkpoint"]
    data = [[clean_json(r.get(c)) for c in cols] for r in rows]
    for lg in loggers:
        if hasattr(lg, "log_table"):
            lg.log_table(key="eval/table", columns=cols, data=data)
        if hasattr(lg, "log_text"):
            try:
                lg.log_text(key="eval/table_md", columns=["markdown"], data=[[table_md]])
            except Exception as e:  # noqa: BLE001 - optional extra
                log.debug("log_text failed: %s", e)
        if hasattr(lg, "log_image"):
            for name, fig in figures.items():
                if not name.startswith("_"):
                    lg.log_image(key=f"eval/{name}", images=[plots.figure_to_array(fig)])
        if hasattr(lg, "log_metrics"):
            lg.log_metrics(flat_metrics(rows))
        if hasattr(lg, "save"):
            lg.save()


def flat_metrics(rows) -> dict:
    """``{"eval/<test set>/<noise>/<method>[run]/<metric>": value}`` of the finite errors
    (``<method>[run] (group N)`` where the rows come from several groups)."""
    flat = {}
    several = several_groups(rows)
    for r in rows:
        pre = f"eval/{r['test_set']}/{r['noise_std']:g}/{r['method']}"
        pre += (f"[{r['run']}]" if r["run"] else "") + group_label(r, several)
        for q in ("t1_mae_ms", "t1_rmse_ms", "t2_mae_ms", "t2_rmse_ms"):
            if r[q] is not None and math.isfinite(r[q]):
                flat[f"{pre}/{q}"] = r[q]
    return flat
