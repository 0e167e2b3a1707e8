"""Per-call cost of ``simulate`` on small training batches, against batch size and threads.

Training on fresh simulated data calls ``simulate`` once per batch with new random atoms, so the
fixed cost of a call matters as much as the cost per atom. Each timed call draws a *new* batch
from the prior T1 ~ U[100, 4000] ms, T2 ~ U[10, min(T1, 500)] ms, B1 ~ U[0.7, 1.3] and simulates
it on the default 1750-pulse train (float32, CPU). Rows: batch size (16, 64, 256, 1024) x torch
threads (1, 2); columns per variant: the median wall time per call, the best (least disturbed)
wall time, and the median CPU time of the process per call (all threads; on a busy machine it
excludes the time spent waiting for a core, and it includes threads spinning idle), in ms.

Variants, each measured in a fresh subprocess:

* ``this``: this checkout, plain ``simulate(seq, t1, t2, b1)``;
* ``this+bounds``: this checkout with ``bounds=dict(t1_max=4000, t2_max=500, b1_range=(0.7,
  1.3))``, the way a training data module calls it;
* ``baseline``: another checkout given by ``--baseline DIR`` (e.g. an older commit checked out with
  ``git worktree add /tmp/old COMMIT``), plain call: before/after in the same run.

Usage::

    python benchmarks/simulate_batch.py                       # this checkout
    python benchmarks/simulate_batch.py --baseline /tmp/old   # and an older one for comparison
    python benchmarks/simulate_batch.py --quick               # fewer calls

The table is printed and written to ``benchmarks/results/simulate_batch.md``. Timings on a shared
machine vary; compare variants of the same run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS_DIR, machine_line, markdown_table, write_result  # noqa: E402

RESULTS = RESULTS_DIR / "simulate_batch.md"
SIZES = (16, 64, 256, 1024)
THREADS = (1, 2)
PRIOR = dict(t1_max=4000.0, t2_max=500.0, b1_range=(0.7, 1.3))


def _draw(rng, n):
    import numpy as np
    import torch

    t1 = rng.uniform(100, 4000, n)
    t2 = rng.uniform(10, np.minimum(t1, 500))
    b1 = rng.uniform(0.7, 1.3, n)
    return [torch.tensor(x, dtype=torch.float32) for x in (t1, t2, b1)]


def measure(bounds: bool, calls: int, seed: int = 0) -> list[dict]:
    """Time fresh-batch calls in this process (whatever ``mrflight`` it imports)."""
    import numpy as np
    import torch

    from mrflight.physics import oksuz2019, simulate

    seq = oksuz2019()
    kw = {"bounds": PRIOR} if bounds else {}
    rng = np.random.default_rng(seed)
    simulate(seq, *_draw(rng, 16), **kw)  # compile/load the kernel
    rows = []
    for threads in THREADS:
        torch.set_num_threads(threads)
        for n in SIZES:
            reps = max(3, calls * 16 // n) if n > 64 else calls
            simulate(seq, *_draw(rng, n), **kw)  # warm-up call of this size
            wall, cpu = [], []
            for _ in range(reps):
                batch = _draw(rng, n)
                t, c = time.perf_counter(), time.process_time()
                simulate(seq, *batch, **kw)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            rows.append({"threads": threads, "n": n, "wall": wall, "cpu": cpu})
    return rows


def _run_variant(src: Path, bounds: bool, calls: int, seed: int) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=str(src))
    code = (f"import sys, json; sys.path.insert(0, {str(HERE)!r}); import simulate_batch as s; "
            f"print(json.dumps(s.measure({bounds}, {calls}, {seed})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=str(src), check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, default=None,
                    help="another mrflight checkout to time the same way (before/after)")
    ap.add_argument("--quick", action="store_true", help="fewer calls per row")
    args = ap.parse_args(argv)
    calls = 8 if args.quick else 30
    rounds = 1 if args.quick else 3
    variants = {"this": (HERE.parent, False), "this+bounds": (HERE.parent, True)}
    if args.baseline is not None:
        variants = {"baseline": (args.baseline.resolve(), False), **variants}
    # rounds alternate the variants, so that a change of the machine's load hits all of them
    results: dict = {name: None for name in variants}
    for r in range(rounds):
        for name, (src, b) in variants.items():
            rows = _run_variant(src, b, max(1, calls // rounds), seed=r)
            if results[name] is None:
                results[name] = rows
            else:
                for acc, new in zip(results[name], rows):
                    acc["wall"] += new["wall"]
                    acc["cpu"] += new["cpu"]
    names = list(results)
    headers = ["threads", "batch"] + [f"{v} ms/call (median / best / CPU)" for v in names]
    body = []
    for i, row in enumerate(results[names[0]]):
        cells = []
        for v in names:
            w, c = results[v][i]["wall"], results[v][i]["cpu"]
            cells.append(f"{statistics.median(w) * 1e3:.2f} / {min(w) * 1e3:.2f} / "
                         f"{statistics.median(c) * 1e3:.2f}")
        body.append([row["threads"], row["n"]] + cells)
    text = (f"# simulate: per-call cost of fresh small batches\n\n{machine_line()}\n\n"
            f"Default train (1750 pulses), float32, CPU; a new random batch per call (T1 "
            f"100-4000 ms, T2 10-min(T1, 500) ms, B1 0.7-1.3); {calls} calls per row (fewer for "
            f"large batches) in {rounds} alternating round(s).\n"
            + (f"baseline: {args.baseline}\n" if args.baseline else "")
            + "\n" + markdown_table(headers, body) + "\n")
    print(text)
    write_result(RESULTS, text)
    return text


if __name__ == "__main__":
    main()
