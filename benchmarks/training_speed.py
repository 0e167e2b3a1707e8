"""Training speed of the four regressors, and time to reach the default model's accuracy.

* samples/s per model: ``--steps`` optimisation steps (forward, MSE loss, backward, Adam step) of
  :class:`mrflight.regressor.MRFRegressor` around each default net
  (``mrflight/configs/model/<name>.yaml``,
  ``input_length=1750``) at the default batch size (256), on synthetic complex fingerprints with
  fresh complex noise and the training preprocessing (``add_noise`` then ``preprocess``) in every
  step, as the data module does; torch threads as in ``mrflight/configs/train.yaml`` (1) unless
  ``--threads`` is given. Median step time after warm-up steps.
* time to accuracy: read the ``csv/metrics.csv`` (and ``train.log``) of a finished training run
  given with ``--run-dir``, and report the epoch, and the wall time, at which the validation T1
  MAE first fell below 1.1x its final value (wall time from the fit's start and end in
  ``train.log``, spread evenly over the epochs). Without ``--run-dir`` it reports
  "n/a (pass --run-dir)".

Usage::

    python benchmarks/training_speed.py [--run-dir outputs/DATE/TIME] [--quick]

Prints a markdown table and writes ``benchmarks/results/training_speed.md``.
"""

from __future__ import annotations

import argparse
import csv
import re
import statistics
import time
from datetime import datetime
from pathlib import Path

import torch
from common import RESULTS_DIR, fmt_rate, machine_line, markdown_table, write_result  # benchmarks/
from inference_speed import MODELS, default_net

from mrflight.physics import add_noise
from mrflight.regressor import MRFRegressor
from mrflight.transforms import preprocess


def train_rate(name: str, steps: int = 200, batch_size: int = 256, warmup: int = 3,
               budget_s: float = 60.0, input_length: int = 1750, noise_std: float = 0.01,
               device: str = "cpu") -> dict:
    """Samples/s of training the default ``name`` model (median step time after ``warmup``).

    Stops early once ``budget_s`` seconds of timed steps were spent (reports the steps done).
    """
    torch.manual_seed(0)
    module = MRFRegressor(default_net(name, input_length), lr=3e-3).to(device).train()
    opt = torch.optim.Adam(module.parameters(), lr=3e-3)
    clean = torch.polar(torch.rand(batch_size, input_length) + 0.1,
                        torch.rand(batch_size, input_length)).to(device)
    target = torch.rand(batch_size, 2, device=device)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        x = preprocess(add_noise(clean, noise_std, generator=gen), "magnitude")
        loss = module.loss_fn(module.net(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    times, start = [], time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        if time.perf_counter() - start > budget_s:
            break
    med = statistics.median(times)
    return {"model": name, "samples_per_s": batch_size / med, "step_ms": 1e3 * med,
            "steps": len(times), "batch_size": batch_size}


_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[,.]\d+)\]")


def _stamp(line: str) -> datetime | None:
    m = _STAMP.match(line)
    return datetime.strptime(m.group(1).replace(",", "."), "%Y-%m-%d %H:%M:%S.%f") if m else None


def time_to_accuracy(run_dir: str | Path, factor: float = 1.1,
                     metric: str = "val/t1_mae_ms") -> dict:
    """Epoch and wall time at which ``metric`` first fell below ``factor`` x its final value.

    Args:
        run_dir: a training run directory (holding ``csv/metrics.csv`` and ``train.log``), or
            the ``metrics.csv`` file itself.
        factor: the threshold relative to the final value.
        metric: the column of ``metrics.csv``.

    Returns:
        dict with ``epoch`` (0-based), ``epochs`` (logged), ``final``, ``value``, ``threshold``,
        ``fit_s`` (fit wall time from ``train.log``, or None), ``wall_s`` (``fit_s`` x
        (epoch + 1) / epochs, or None), and the test MAEs when logged.

    Raises:
        ValueError: no ``metrics.csv`` or no ``metric`` values in it.
    """
    p = Path(run_dir)
    csv_path = p if p.is_file() else p / "csv" / "metrics.csv"
    if not csv_path.is_file():
        raise ValueError(f"--run-dir {str(run_dir)!r}: no csv/metrics.csv there (pass a training "
                         "run directory of train.py with the csv logger)")
    vals: dict[int, float] = {}
    tests: dict[str, float] = {}
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get(metric):
                vals[int(float(row["epoch"]))] = float(row[metric])
            for k in ("test/t1_mae_ms", "test/t2_mae_ms"):
                if row.get(k):
                    tests[k] = float(row[k])
    if not vals:
        raise ValueError(f"{csv_path} has no {metric!r} values")
    epochs = sorted(vals)
    final = vals[epochs[-1]]
    threshold = factor * final
    hit = next(e for e in epochs if vals[e] <= threshold)
    fit_s = None
    log = (csv_path.parent.parent if p.is_file() else p) / "train.log"
    if log.is_file():
        start = end = None
        for line in log.read_text(errors="replace").splitlines():
            s = _stamp(line)
            if s is None:
                continue
            if start is None and ("GPU available" in line or "logger" in line):
                start = s
            if "Trainer.fit" in line and "stopped" in line:
                end = s
        if start and end:
            fit_s = (end - start).total_seconds()
    n = epochs[-1] + 1
    return {"epoch": hit, "epochs": n, "final": final, "value": vals[hit],
            "threshold": threshold, "fit_s": fit_s,
            "wall_s": None if fit_s is None else fit_s * (hit + 1) / n, **tests}


def measure(quick: bool = False, models=MODELS, steps: int | None = None,
            batch_size: int = 256, threads: int | None = 1, run_dir: str | None = None,
            input_length: int = 1750) -> dict:
    """Training samples/s per model and, with ``run_dir``, the time to accuracy."""
    steps = steps or (3 if quick else 200)
    start_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        rows = [train_rate(m, steps=steps, batch_size=batch_size, warmup=1 if quick else 3,
                           budget_s=5.0 if quick else 60.0, input_length=input_length)
                for m in models]
    finally:
        used = torch.get_num_threads()
        torch.set_num_threads(start_threads)
    tta = None
    if run_dir:
        tta = time_to_accuracy(run_dir)
    return {"rows": rows, "threads": used, "tta": tta, "run_dir": run_dir,
            "batch_size": batch_size, "models": list(models)}


def tta_line(r: dict) -> str:
    """One sentence on the time to accuracy (or how to get it)."""
    t = r["tta"]
    if t is None:
        return "Time to reach the default GRU's accuracy: n/a (pass --run-dir)."
    wall = "n/a (no train.log)" if t["wall_s"] is None else f"{t['wall_s'] / 60:.1f} min"
    fit = "" if t["fit_s"] is None else f" of a {t['fit_s'] / 60:.1f} min fit"
    test = ""
    if "test/t1_mae_ms" in t:
        test = (f"; final test MAE T1 {t['test/t1_mae_ms']:.1f} ms, "
                f"T2 {t.get('test/t2_mae_ms', float('nan')):.1f} ms")
    return (f"Time to accuracy ({r['run_dir']}): val T1 MAE first <= 1.1 x final "
            f"({t['final']:.1f} ms) at epoch {t['epoch'] + 1} of {t['epochs']} "
            f"({t['value']:.1f} ms), {wall}{fit}{test}.")


def report(r: dict, quick: bool = False) -> str:
    body = [[row["model"].upper(), fmt_rate(row["samples_per_s"]), f"{row['step_ms']:.1f}",
             row["steps"]] for row in r["rows"]]
    lines = [
        f"# Training speed{' (quick)' if quick else ''}",
        "",
        f"- machine: {machine_line()}; training with {r['threads']} torch thread(s)",
        f"- batch {r['batch_size']}, input 1750 points, MRFRegressor + Adam, fresh noise and "
        "preprocessing in every step; median step time after warm-up steps",
        "",
        markdown_table(["model", "samples/s", "ms/step", "steps timed"], body),
        "",
        tta_line(r),
        "",
        f"Command: `python benchmarks/training_speed.py{' --quick' if quick else ''}"
        f"{' --models ' + ' '.join(r['models']) if tuple(r['models']) != MODELS else ''}"
        f"{' --run-dir ' + str(r['run_dir']) if r['run_dir'] else ''}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 steps per model")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per model (200)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (mrflight/configs/train.yaml default: 1; 0 = leave as is)")
    ap.add_argument("--run-dir", default=None, help="a finished training run directory")
    ap.add_argument("--out", default=str(RESULTS_DIR / "training_speed.md"))
    args = ap.parse_args(argv)
    r = measure(args.quick, args.models, args.steps, args.batch_size, args.threads or None,
                args.run_dir)
    text = report(r, args.quick)
    print(text)
    write_result(args.out, text)
    return text


if __name__ == "__main__":
    main()
