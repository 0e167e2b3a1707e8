"""The heavy parts of the default ``eval.py`` at 1 and 2 torch threads, interleaved.

Times, at each thread count, in alternation (so that a change of machine load hits both):
exhaustive and SVD (rank 25) matching of ``--signals`` noisy fingerprints against ``--atoms``
atoms of the default 1750-pulse sequence, the Cramér–Rao bound of ``--bound`` signals, and a
default GRU's ``predict_parameters`` on the same signals. Median of ``--repeats`` rounds; the load
average is printed before and after (a loaded machine makes 2 threads slower than 1).

Usage::

    python benchmarks/eval_threads.py            # 20 000 atoms, 1000 signals, 3 rounds
    python benchmarks/eval_threads.py --quick

Prints a markdown table and writes ``benchmarks/results/eval_threads.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import load_average, machine_line, markdown_table, publish
from inference_speed import default_net


def _parts(n_atoms: int, n_signals: int, n_bound: int, n_pulses: int = 1750) -> dict:
    from mrflight.matching import DictionaryMatcher
    from mrflight.physics import add_noise, normalize, oksuz2019, simulate
    from mrflight.physics.crb import crb
    from mrflight.regressor import MRFRegressor

    seq = oksuz2019(n_pulses=n_pulses, lobe_length=min(250, n_pulses // 7))
    g = torch.Generator().manual_seed(0)
    t1 = 100 + 3900 * torch.rand(n_atoms, generator=g)
    t2 = torch.minimum(5 + 495 * torch.rand(n_atoms, generator=g), t1)
    atoms = normalize(simulate(seq, t1, t2))
    params = torch.stack([t1, t2], 1)
    signals = add_noise(atoms[:n_signals], 0.01, generator=g)
    exh = DictionaryMatcher(atoms, params)
    svd = DictionaryMatcher(atoms, params, rank=25)
    gru = MRFRegressor(default_net("gru", len(seq))).eval()
    return {
        "exhaustive matching": lambda: exh.match(signals),
        "SVD matching (rank 25)": lambda: svd.match(signals),
        "Cramér–Rao bound": lambda: crb(seq, t1[:n_bound], t2[:n_bound], 0.01),
        "GRU predict_parameters": lambda: gru.predict_parameters(signals),
    }


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--atoms", type=int, default=20000)
    p.add_argument("--signals", type=int, default=1000)
    p.add_argument("--bound", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    if a.quick:
        a.atoms, a.signals, a.bound, a.repeats = 2000, 200, 20, 1
    load_before = load_average()
    parts = _parts(a.atoms, a.signals, a.bound)
    times = {(name, th): [] for name in parts for th in (1, 2)}
    for fn in parts.values():
        fn()  # warm-up (kernel compilation, caches)
    for _ in range(a.repeats):
        for th in (1, 2):
            torch.set_num_threads(th)
            for name, fn in parts.items():
                t = time.perf_counter()
                fn()
                times[(name, th)].append(time.perf_counter() - t)
    load_after = load_average()
    rows = []
    for name in parts:
        t1, t2 = (statistics.median(times[(name, th)]) for th in (1, 2))
        rows.append([name, f"{t1:.3f}", f"{t2:.3f}", f"{t1 / t2:.2f}x"])
    total1 = sum(statistics.median(times[(n, 1)]) for n in parts)
    total2 = sum(statistics.median(times[(n, 2)]) for n in parts)
    rows.append(["total", f"{total1:.3f}", f"{total2:.3f}", f"{total1 / total2:.2f}x"])
    table = markdown_table(["part", "1 thread (s)", "2 threads (s)", "speed-up of 2 threads"],
                           rows)

    def fmt(la):
        return "n/a" if la is None else "{:.2f} / {:.2f} / {:.2f}".format(*la)

    text = (f"# eval.py's heavy parts at 1 and 2 threads\n\n- {machine_line()}\n"
            f"- {a.atoms} atoms x 1750 pulses, {a.signals} signals, bound on {a.bound}; median "
            f"of {a.repeats} interleaved rounds\n- load average (1/5/15 min) before: "
            f"{fmt(load_before)}, after: {fmt(load_after)}\n\n{table}\n")
    return publish("eval_threads.md", text)


if __name__ == "__main__":
    main()
