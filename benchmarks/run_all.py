"""The whole benchmark suite in one command: one table, written to results/summary.md.

Runs, in one process on one machine (each figure next to its comparison, measured in the same
run; medians of several repeats after a warm-up):

* EPG (``epg_speed``): atoms/s on the paper grid, next to epyg, a NumPy EPG and the flop floor;
* matching (``matching_speed``): signals/s of exhaustive and SVD rank-25 matching against the
  paper grid, next to the paper's per-signal loop and the GEMM floor, and the % of noise-free
  atoms recovered exactly;
* inference (``inference_speed``): batched signals/s and batch-1 latency of the four models, with
  the fraction of the GEMM floor, against the paper's time per signal;
* training (``training_speed``): samples/s per model, and time to reach the default model's
  accuracy from a finished run (``--run-dir``);
* memory (``memory``): peak resident memory of dictionary generation and of matching at the
  paper's size, each in a fresh subprocess.

Usage::

    python benchmarks/run_all.py                      # full suite (about 10 minutes, 2 cores)
    python benchmarks/run_all.py --quick              # smoke run (< 2 minutes)
    python benchmarks/run_all.py --run-dir outputs/2026-11-25/19-15-38-525824

Prints the summary table and writes ``benchmarks/results/summary.md`` (``summary_quick.md`` with
``--quick``); every section's own table is appended below the summary.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, fmt_rate, machine_line, markdown_table, write_result  # benchmarks/

HERE = Path(__file__).resolve().parent
def memory_rows(quick: bool = False) -> list[dict]:
    """Peak resident memory of generation and matching: ``benchmarks/memory.py``'s rows.

    Each workload runs in a fresh subprocess that reports its own peak (VmHWM), so the size of
    this process (which ran everything else) does not leak into the figures.
    """
    import memory  # benchmarks/memory.py

    return memory.measure(quick=quick)


def _status(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "NOT met")


def summary_rows(epg: dict | None, match: dict | None, inf: dict | None, train: dict | None,
                 mem: list[dict] | None) -> list[list[str]]:
    """The rows of the one summary table (area, measurement, mrflight, comparison, ratio,
    target, status)."""
    rows: list[list[str]] = []
    if epg:
        n = epg["n_atoms"]
        by = {r[0]: r for r in epg["rows"]}
        cpu = epg["rows"][0]
        ref = {k.split()[0]: v for k, v in by.items() if not k.startswith("mrflight")}
        ep = ref.get("epyg")
        npy = ref.get("NumPy")
        rows.append(["EPG", f"{n:,} atoms x {len(epg['seq'])} pulses, CPU float32",
                     f"{fmt_rate(cpu[3])} atoms/s ({cpu[2]:.2f} s)",
                     f"epyg {fmt_rate(ep[3])} atoms/s" if ep else "epyg not installed",
                     f"{cpu[3] / ep[3]:,.0f}x" if ep else "-",
                     "grid <= 6 s, >= 1000x epyg",
                     _status(cpu[2] <= 6 * n / 114650 and (ep is None or cpu[3] / ep[3] >= 1000))])
        if npy:
            rows.append(["EPG", "vs straightforward NumPy EPG", f"{fmt_rate(cpu[3])} atoms/s",
                         f"NumPy {fmt_rate(npy[3])} atoms/s", f"{cpu[3] / npy[3]:,.0f}x", "-",
                         "-"])
        floor_rate = n / epg["floor_s"]
        rows.append(["EPG", "vs flop floor (20 flops/state/pulse at GEMM rate)",
                     f"{fmt_rate(cpu[3])} atoms/s", f"floor {fmt_rate(floor_rate)} atoms/s",
                     f"{cpu[3] / floor_rate:.0%} of floor", "-", "-"])
        for r in epg["rows"]:
            if "CUDA" in r[0]:
                rows.append(["EPG", "CUDA float32", f"{fmt_rate(r[3])} atoms/s ({r[2]:.3f} s)",
                             f"CPU {fmt_rate(cpu[3])} atoms/s", f"{r[3] / cpu[3]:.0f}x",
                             "grid < 0.5 s (H100)", _status(r[2] < 0.5 * n / 114650)])
    if match:
        n = match["n"]
        t = {name: s for name, s, _ in match["rows"]}
        ex = {name: e for name, _, e in match["rows"]}
        names = [r[0] for r in match["rows"]]
        gemm, exh, svd, loop = (t[k] for k in names)
        where = f"{n:,} signals vs {match['m']:,} atoms x {match['t_len']}"
        rows.append(["matching", f"exhaustive, {where}", f"{fmt_rate(n / exh)} signals/s",
                     f"GEMM floor {fmt_rate(n / gemm)} signals/s", f"{exh / gemm:.2f}x floor",
                     "<= 1.5x floor", _status(exh <= 1.5 * gemm)])
        rows.append(["matching", f"SVD rank {match['rank']}", f"{fmt_rate(n / svd)} signals/s",
                     f"exhaustive {fmt_rate(n / exh)} signals/s", f"{exh / svd:.1f}x faster",
                     ">= 10x exhaustive", _status(exh / svd >= 10)])
        rows.append(["matching", "vs the paper's per-signal loop",
                     f"{fmt_rate(n / exh)} signals/s",
                     f"loop {fmt_rate(n / loop)} signals/s", f"{loop / exh:.0f}x", "-", "-"])
        rows.append(["matching", "noise-free atoms recovered exactly",
                     f"exhaustive {100 * ex[names[1]]:.2f} %, SVD {100 * ex[names[2]]:.2f} %",
                     "-", "-", "-", "-"])
    if inf:
        from inference_speed import LATENCY_TARGET_MS, PAPER_MS, TARGETS

        for r in inf["rows"]:
            paper = 1e3 / PAPER_MS[r["model"]]
            tgt = TARGETS[r["model"]]
            rows.append([
                "inference", f"{r['model'].upper()} batched (batch {r['best_batch']}, "
                f"{r['best_threads']} thr)", f"{fmt_rate(r['best_rate'])} signals/s",
                f"paper {fmt_rate(paper)} signals/s; floor {fmt_rate(r['floor_rate'])}",
                f"{r['best_rate'] / paper:,.0f}x paper; {r['fraction']:.0%} of floor",
                "-" if tgt is None else f">= {tgt:,} signals/s",
                _status(None if tgt is None else r["best_rate"] >= tgt)])
            rows.append([
                "inference", f"{r['model'].upper()} latency, batch 1",
                f"{r['latency_ms']:.3f} ms", f"paper {PAPER_MS[r['model']]:g} ms/signal",
                f"{PAPER_MS[r['model']] / r['latency_ms']:,.0f}x", f"<= {LATENCY_TARGET_MS:g} ms",
                _status(r["latency_ms"] <= LATENCY_TARGET_MS)])
            if "cuda_rate" in r:
                rows.append(["inference", f"{r['model'].upper()} CUDA batched",
                             f"{fmt_rate(r['cuda_rate'])} signals/s",
                             f"CPU {fmt_rate(r['best_rate'])}",
                             f"{r['cuda_rate'] / r['best_rate']:.0f}x",
                             "> 1M signals/s (GRU, H100)" if r["model"] == "gru" else "-",
                             _status(r["cuda_rate"] > 1e6) if r["model"] == "gru" else "-"])
    if train:
        for r in train["rows"]:
            rows.append(["training", f"{r['model'].upper()} (batch {r['batch_size']}, "
                         f"{train['threads']} thr)", f"{fmt_rate(r['samples_per_s'])} samples/s",
                         "-", "-", "-", "-"])
        t = train["tta"]
        if t is None:
            rows.append(["training", "time to the default GRU's accuracy",
                         "n/a (pass --run-dir)", "paper: not reported", "-", "-", "-"])
        else:
            wall = "n/a" if t["wall_s"] is None else f"{t['wall_s'] / 60:.1f} min"
            rows.append(["training", "time to the default GRU's accuracy (val T1 MAE <= 1.1x "
                         "final)", f"{wall} (epoch {t['epoch'] + 1}/{t['epochs']})",
                         f"final val T1 MAE {t['final']:.1f} ms"
                         + ("" if t["fit_s"] is None else f", fit {t['fit_s'] / 60:.1f} min"),
                         "-", "-", "-"])
    if mem:
        for r in mem:
            rows.append(["memory", f"{r['label']}, {r['atoms']:,} atoms x {r['T']}",
                         f"{r['peak_gib']:.2f} GiB peak RSS ({r['seconds']:.1f} s)", "-", "-",
                         "< 4 GiB", _status(r["peak_gib"] < 4)])
    return rows


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small sizes, few repeats")
    ap.add_argument("--run-dir", default=None,
                    help="a finished default training run (for the time to accuracy)")
    ap.add_argument("--skip", nargs="*", default=[], help="sections to leave out",
                    choices=["epg", "matching", "inference", "training", "memory"])
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    ap.add_argument("--out", default=None,
                    help="default results/summary.md (--quick: results/summary_quick.md, so "
                         "that a smoke run never replaces a full run's table)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(RESULTS_DIR / ("summary_quick.md" if args.quick else "summary.md"))
    q = args.quick
    t0 = time.perf_counter()
    load_before = machine_line()
    sections = {}
    epg = match = inf = train = mem = None
    if "epg" not in args.skip:
        import epg_speed

        epg = epg_speed.measure(quick=q)
        sections["epg"] = epg_speed.report(epg, q)
    if "matching" not in args.skip:
        import matching_speed

        match = matching_speed.measure(quick=q)
        sections["matching"] = matching_speed.report(match, q)
    if "inference" not in args.skip:
        import inference_speed

        inf = inference_speed.measure(quick=q, compile=args.compile)
        sections["inference"] = inference_speed.report(inf, q)
    if "training" not in args.skip:
        import training_speed

        train = training_speed.measure(quick=q, run_dir=args.run_dir)
        sections["training"] = training_speed.report(train, q)
    if "memory" not in args.skip:
        mem = memory_rows(q)
    rows = summary_rows(epg, match, inf, train, mem)
    cmd = "python benchmarks/run_all.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    lines = [
        "# mrflight benchmark summary"
        + (" (quick: small sizes, NOT the paper-size figures)" if q else ""),
        "",
        f"- machine at start: {load_before}",
        f"- machine at end: {machine_line()}",
        f"- CUDA: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        f"- command: `{cmd}`; total {time.perf_counter() - t0:.0f} s",
        "",
        markdown_table(["area", "measurement", "mrflight", "comparison", "ratio", "target",
                        "status"], rows),
        "",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    detail = "\n".join(s.replace("\n# ", "\n## ").replace("# ", "## ", 1)
                       for s in sections.values())
    write_result(args.out, text + "\n" + detail)
    print(f"written to {args.out}")
    return text


if __name__ == "__main__":
    main()
