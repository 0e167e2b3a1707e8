"""The tables of an evaluation: ``table.md`` (Table 1 layout, with the paper's rows as a
reference, and the efficiency/robustness sections) and ``table.csv``."""

from __future__ import annotations

import csv
import io
import math

__all__ = ["PAPER_TABLE1", "COLUMNS", "table_md", "table_csv", "reports_md", "several_groups",
           "group_label"]

#: Oksuz et al. 2019, Table 1 (MAE / RMSE in ms, time per signal in ms), as reported
PAPER_TABLE1 = [
    {"method": "ann", "label": "ANN", "t1_mae_ms": 113.22, "t1_rmse_ms": 119.94,
     "t2_mae_ms": 67.16, "t2_rmse_ms": 86.63, "ms_per_signal": 18.0},
    {"method": "cnn", "label": "1D CNN", "t1_mae_ms": 108.98, "t1_rmse_ms": 112.38,
     "t2_mae_ms": 64.57, "t2_rmse_ms": 113.22, "ms_per_signal": 14.0},
    {"method": "matching", "label": "inner product", "t1_mae_ms": 212.13,
     "t1_rmse_ms": 213.83, "t2_mae_ms": 163.14, "t2_rmse_ms": 83.60, "ms_per_signal": 127.0},
    {"method": "lstm", "label": "LSTM", "t1_mae_ms": 107.89, "t1_rmse_ms": 109.36,
     "t2_mae_ms": 62.20, "t2_rmse_ms": 81.11, "ms_per_signal": 15.0},
    {"method": "gru", "label": "GRU", "t1_mae_ms": 101.81, "t1_rmse_ms": 103.25,
     "t2_mae_ms": 58.91, "t2_rmse_ms": 73.66, "ms_per_signal": 14.0},
]

_LABELS = {"lstm": "LSTM", "gru": "GRU", "ann": "ANN (DRONE)", "cnn": "1D CNN",
           "matching": "dictionary matching (exhaustive)", "matching_svd": "SVD matching",
           "crb": "Cramér–Rao bound"}


COLUMNS = ["method", "run", "group", "test_set", "noise_std", "n_signals", "t1_mae_ms",
           "t1_rmse_ms", "t2_mae_ms", "t2_rmse_ms", "ms_per_signal", "latency_ms_mean",
           "latency_ms_std", "latency_repeats", "t1_rmse_over_crb", "t2_rmse_over_crb",
           "sequence", "dictionary_atoms", "checkpoint"]


def _row_label(method: str, run: str) -> str:
    """A method's name in Table 1: ``GRU [run]``."""
    return _LABELS.get(method, method) + (f" [{run}]" if run else "")


def _key_label(key: str) -> str:
    """A key of the bound reports (``gru [run]``, ``gru + fit``, ``crb``) named as in Table 1
    (``GRU [run]``, ``GRU + fit``, ``Cramér–Rao bound``); keys Table 1 does not have
    (``matching (T1, T2, B1)``) as they are."""
    method = key.split(" [")[0].split(" + ")[0]
    return _LABELS.get(method, method) + key[len(method):]


def _noise(v) -> str:
    """A training noise level (``0.01``) or range (``0.005-0.03``); ``?`` where not recorded."""
    if isinstance(v, (list, tuple)):
        return "-".join(f"{x:g}" for x in v)
    return "?" if v is None else f"{v:g}"


def _fmt(v, nd=2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _load_note(info: dict) -> str:
    """How busy the machine was while the times were taken."""
    a, b = info.get("load_average_start"), info.get("load_average_end")
    if not a or not b:
        return ""
    cores = info.get("cores")
    note = (f"; machine load (1-min load average) {a[0]:.2f} at the start and {b[0]:.2f} at the "
            f"end, on {cores} cores")
    if cores and max(a[0], b[0]) > cores:
        note += " (more runnable threads than cores: the times are upper bounds)"
    return note


def several_groups(rows: list[dict]) -> bool:
    """Rows of more than one group (runs on other sequences or test data): the tables then name
    every row's group, since matching, the bound and the test signals differ between them."""
    return len({r.get("group", 0) for r in rows}) > 1


def group_label(r: dict, several: bool) -> str:
    """`` (group N)`` after a method's name where rows of several groups share a table."""
    return f" (group {r.get('group', 0)})" if several else ""


def _preamble(info: dict) -> list[str]:
    """What the table's numbers are: the groups' data, timing, bound and matching notes."""
    lines = ["# mrflight evaluation", ""]
    groups = info.get("groups", [])
    for d in groups:
        which = ""
        if len(groups) > 1:
            g = d.get("group", 0)
            which = (f"group {g} (figures and phantoms without a suffix): " if not g else
                     f"group {g} (figures and phantoms `*_{g}`): ")
        lines.append(f"- {which}sequence `{d['sequence']}` ({d['n_timepoints']} points); data: "
                     f"{d['data']}; training dictionary for matching: {d['dictionary_atoms']} "
                     f"atoms (the {d['held_out_atoms']} held-out test atoms removed)")
    if len(groups) > 1:
        lines.append("- each group has its own test signals, matching dictionary and bound: "
                     "compare methods within a group")
    b1_nets = [_row_label(*m) for d in groups for m in d.get("b1_networks", [])]
    if b1_nets:
        lines.append(f"- {', '.join(b1_nets)} estimate{'s' if len(b1_nets) == 1 else ''} B1 "
                     "as well, so {} held to a bound with B1 known (the same bound for every "
                     "row of a block) that {} cannot reach; the efficiency and off-grid B1 "
                     "reports below hold every method to the bound with B1 unknown".format(
                         *(("it is", "it") if len(b1_nets) == 1 else ("they are", "they"))))
    runs = info.get("runs") or []
    if len(runs) > 1:  # a sweep: what tells its rows apart
        common = set.intersection(*(set(r["overrides"]) for r in runs))
        lines.append("- the evaluated runs (training noise; the overrides they do not share):")
        for r in runs:
            own = " ".join(o for o in r["overrides"] if o not in common)
            lines.append(f"  - {_row_label(r['method'], r['run'])}"
                         f"{group_label(r, len(groups) > 1)}: training noise "
                         f"{_noise(r['training_noise_std'])}" + (f"; `{own}`" if own else ""))
    if info.get("run_notes"):
        lines.append("- training runs that did not finish or whose checkpoint does not load:")
        lines += [f"  - {n}" for n in info["run_notes"]]
    lines += [
        "- time/signal: batched wall time of the whole test set divided by its size; latency: "
        "one signal per call, mean ± std over "
        f"{info.get('latency_repeats')} calls (different signals), on {info.get('device')} "
        f"({info.get('threads')} threads){_load_note(info)}",
        "- Cramér–Rao bound (crb): RMSE column = RMS of the per-signal bound on std(T1), "
        "std(T2) over "
        + ("all test signals" if info.get("bound_signals") is None else
           f"a random subset of {info.get('bound_signals')} test signals")
        + f" ({info.get('bound_kind')} data); MAE column = "
        "sqrt(2/pi) x mean bound; RMSE/CRB = a method's RMSE on the same signals over that RMS "
        "bound (< 1 is possible for biased estimators, e.g. at low SNR near the grid's edges)",
        ("- matching compares complex fingerprints (|<d, s>|)" if info.get("complex_matching")
         else "- matching compares magnitude fingerprints (the paper's baseline); the magnitude "
         "of a noisy sample is Rician-biased once the per-sample SNR, about 1 / (noise std x "
         "sqrt(T)), nears 1, which dominates its error at the higher noise levels "
         "(evaluation.complex_matching=true matches complex data instead)"),
        "",
    ]
    return lines


def table_md(rows: list[dict], info: dict) -> str:
    """``table.md``: one Table 1 block per test set and noise level (of each group, where
    there are several), then the paper's rows."""
    lines = _preamble(info)
    header = ("| method | T1 MAE (ms) | T1 RMSE (ms) | T2 MAE (ms) | T2 RMSE (ms) | "
              "time/signal (ms, batched) | latency (ms, single signal, mean ± std) | "
              "T1 RMSE/CRB | T2 RMSE/CRB |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    several = several_groups(rows)
    keys = list(dict.fromkeys((r.get("group", 0), r["test_set"], r["noise_std"]) for r in rows))
    names = {"paper": "paper (held-out grid atoms)", "offgrid": "off-grid (continuous random)"}
    for g, ts, std in keys:
        block = [r for r in rows if (r.get("group", 0), r["test_set"], r["noise_std"])
                 == (g, ts, std)]
        lines += [f"## {f'Group {g}, t' if several else 'T'}est set: {names.get(ts, ts)}, "
                  f"noise std {std:g}, {max(r['n_signals'] for r in block)} signals", "",
                  header, sep]
        for r in block:
            label = _row_label(r["method"], r["run"]) + (f" ({r['bound']})" if r.get("bound")
                                                          else "")
            lat = ("–" if r["latency_ms_mean"] is None else
                   f"{r['latency_ms_mean']:.3f} ± {r['latency_ms_std']:.3f}")
            lines.append(f"| {label} | {_fmt(r['t1_mae_ms'])} | {_fmt(r['t1_rmse_ms'])} | "
                         f"{_fmt(r['t2_mae_ms'])} | {_fmt(r['t2_rmse_ms'])} | "
                         f"{_fmt(r['ms_per_signal'], 3)} | {lat} | "
                         f"{_fmt(r['t1_rmse_over_crb'])} | {_fmt(r['t2_rmse_over_crb'])} |")
        lines.append("")
    lines += ["## Reference: Oksuz et al. 2019, Table 1 (as reported, not recomputed)", "",
              "Their sequence, noise level and hardware; time per signal on their machine.", "",
              "| method | T1 MAE (ms) | T1 RMSE (ms) | T2 MAE (ms) | T2 RMSE (ms) | "
              "time/signal (ms) |", "|---|---|---|---|---|---|"]
    for r in PAPER_TABLE1:
        lines.append(f"| {r['label']} (reference) | {r['t1_mae_ms']:.2f} | {r['t1_rmse_ms']:.2f}"
                     f" | {r['t2_mae_ms']:.2f} | {r['t2_rmse_ms']:.2f} | "
                     f"{r['ms_per_signal']:.0f} |")
    return "\n".join(lines) + "\n"


def table_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["source"] + COLUMNS)
    for r in rows:
        w.writerow(["mrflight"] + ["" if r.get(c) is None else r.get(c) for c in COLUMNS])
    for r in PAPER_TABLE1:
        ref = {**{c: "" for c in COLUMNS}, **{k: v for k, v in r.items() if k in COLUMNS}}
        ref["test_set"] = "paper"
        w.writerow(["Oksuz et al. 2019 Table 1 (reference)"] + [ref[c] for c in COLUMNS])
    return buf.getvalue()


def reports_md(extra: dict) -> str:
    """Markdown sections of the efficiency, off-grid B1 and robustness reports (a method's
    name followed by its group where rows of several groups are reported)."""
    several = several_groups([r for v in extra.values() for r in (v or [])])

    def who(r):
        return _key_label(r["method"]) + group_label(r, several)

    parts = []
    if extra.get("efficiency_summary"):
        parts.append("\n## Efficiency: median over the T1-T2(-B1) grid of std/CRB and RMSE/CRB"
                     "\n\n| method | points | T1 std/CRB | T1 RMSE/CRB | T2 std/CRB | T2 RMSE/CRB"
                     " | B1 std/CRB | B1 RMSE/CRB |\n|---|---|---|---|---|---|---|---|")
        for r in extra["efficiency_summary"]:
            cells = [_fmt(r.get(f"{q}_{m}_median")) for q in ("t1", "t2", "b1")
                     for m in ("std_over_crb", "rmse_over_crb")]
            parts.append(f"| {who(r)} | {r['points']} | " + " | ".join(cells) + " |")
    if extra.get("offgrid_b1"):
        parts.append("\n## Continuous tissues with B1 0.8-1.2, proton density 0.5-1.0, random "
                     "phase (noise 0.01)\n\n| method | T1 RMSE ms | T1 RMSE/CRB | T2 RMSE ms | "
                     "T2 RMSE/CRB | B1 RMSE % | B1 RMSE/CRB |\n|---|---|---|---|---|---|---|")
        for r in extra["offgrid_b1"]:
            parts.append(f"| {who(r)} | {_fmt(r.get('t1_rmse_ms'))} | "
                         f"{_fmt(r.get('t1_rmse_over_crb'))} | {_fmt(r.get('t2_rmse_ms'))} | "
                         f"{_fmt(r.get('t2_rmse_over_crb'))} | {_fmt(r.get('b1_rmse_pct'))} | "
                         f"{_fmt(r.get('b1_rmse_over_crb'))} |")
    rob = extra.get("robustness") or []
    if rob:
        parts.append("\n## Robustness: conditions outside training\n\nEach network at half "
                     "its lowest and twice its highest training noise (`noise_low`, "
                     "`noise_high`) and at B1 0.8 and 1.2 at the geometric mean of its training "
                     "noise; a method without a training noise (matching) as if trained at "
                     "0.01: at 0.005 and 0.02, and at B1 0.8 and 1.2 at 0.01. Continuous "
                     "tissues, proton density 1.\n\n| method | condition | "
                     "noise | B1 | T1 RMSE ms | T1 median bias % | T2 RMSE ms | T2 median bias % "
                     "|\n|---|---|---|---|---|---|---|---|")
        for r in rob:
            if r["condition"] != "tissue_pd":
                parts.append(f"| {who(r)} | {r['condition']} | {r['noise_std']:.4g} | "
                             f"{r['b1']:g} | {_fmt(r['t1_rmse_ms'])} | {_fmt(r['t1_bias_pct'])} "
                             f"| {_fmt(r['t2_rmse_ms'])} | {_fmt(r['t2_bias_pct'])} |")
        tis = [r for r in rob if r["condition"] == "tissue_pd"]
        if tis:
            parts.append(_tissue_table(tis, who))
    return "\n".join(parts) + ("\n" if parts else "")


def _tissue_table(rows: list[dict], who) -> str:
    """The tissue medians at each proton density, then the largest error of each method
    (``who(row)``: its name in the table)."""
    r0 = rows[0]
    lines = [f"\nTissue medians of {r0.get('voxels', '?')} voxels per tissue and proton density "
             f"(B1 1, absolute noise {r0['noise_std']:.4g}, random phase)\n\n| method | tissue "
             "| proton density | T1 median error % | T2 median error % |\n|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {who(r)} | {r['tissue']} | {r['pd']:g} | "
                     f"{_fmt(r['t1_median_error_pct'])} | {_fmt(r['t2_median_error_pct'])} |")
    lines.append("\nLargest tissue median error over tissues and proton densities\n\n| method | "
                 "T1 max abs % | T2 max abs % |\n|---|---|---|")
    for name in dict.fromkeys(who(r) for r in rows):
        mine = [r for r in rows if who(r) == name]
        worst = [max((abs(v) for r in mine if math.isfinite(v := r[f"{q}_median_error_pct"])),
                     default=math.nan) for q in ("t1", "t2")]
        lines.append(f"| {name} | {_fmt(worst[0])} | {_fmt(worst[1])} |")
    return "\n".join(lines)
