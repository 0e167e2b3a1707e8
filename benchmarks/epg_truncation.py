"""Accuracy of the EPG state truncation: error vs untruncated and states kept, per sequence.

For every shipped sequence (``oksuz2019``, ``jiang2015``) and the corners of the paper's range
(T1 in {20, 500, 4000} ms, T2 in {2, 100, 500} ms with T2 <= T1, B1 in {0.7, 1, 1.3}), simulates
in float64 at ``tol`` 1e-2, 1e-3 and 1e-4 and compares with the untruncated EPG (K = T states):
the maximum relative L2 error of the normalised magnitude fingerprint (the quantity ``tol``
bounds), the verified truncation rate, and the mean and maximum state counts. Prints a markdown
table and writes it to ``benchmarks/results/epg_truncation.md``.

Usage::

    python benchmarks/epg_truncation.py
"""

from __future__ import annotations

from pathlib import Path

import torch

from mrflight.fileio import atomic_path
from mrflight.physics import jiang2015, oksuz2019, simulate
from mrflight.physics.truncation import states_needed, truncation_rate

RESULTS = Path(__file__).resolve().parent / "results" / "epg_truncation.md"
TOLS = (1e-2, 1e-3, 1e-4)
CORNERS = [(t1, t2, b1) for t1 in (20.0, 500.0, 4000.0) for t2 in (2.0, 100.0, 500.0)
           for b1 in (0.7, 1.0, 1.3) if t2 <= t1]


def nmag(x: torch.Tensor) -> torch.Tensor:
    m = x.abs()
    return m / m.norm(dim=-1, keepdim=True)


def main() -> None:
    t1, t2, b1 = (torch.tensor(c, dtype=torch.float64) for c in zip(*CORNERS))
    lines = [
        "# EPG truncation accuracy",
        "",
        f"{len(CORNERS)} atoms at the corners of the paper range (T1 20-4000 ms, T2 2-500 ms, "
        "T2 <= T1, B1 0.7-1.3), float64. Error: max relative L2 error of the normalised "
        "magnitude fingerprint against the untruncated EPG (K = T).",
        "",
        "| sequence | T | tol | rate | states (mean / max of the corners) | max error "
        "| worst atom (T1, T2, B1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for seq in (oksuz2019(), jiang2015()):
        full = nmag(simulate(seq, t1, t2, b1, dtype=torch.float64, tol=1e-300, _rate=1.0))
        for tol in TOLS:
            x = nmag(simulate(seq, t1, t2, b1, dtype=torch.float64, tol=tol))
            err = (x - full).norm(dim=-1)
            rate = truncation_rate(seq, tol, float(t2.max()), float(t1.max()),
                                   (float(b1.min()), float(b1.max())))
            k = states_needed(t2.numpy(), float(seq.tr_ms.min()), len(seq), tol, rate)
            w = int(err.argmax())
            lines.append(
                f"| {seq.name} | {len(seq)} | {tol:g} | {rate:.3g} | {k.mean():.0f} / {k.max()} "
                f"| {float(err.max()):.2e} | ({CORNERS[w][0]:g}, {CORNERS[w][1]:g}, "
                f"{CORNERS[w][2]:g}) |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(RESULTS) as tmp:
        tmp.write_text(text)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
