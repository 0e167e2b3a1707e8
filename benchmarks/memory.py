"""Peak memory of dictionary generation and matching at the paper's size.

Every workload runs in a fresh subprocess that reports its own peak resident set size
(``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` would include the parent's peak, inherited
at exec) and wall time, so the figures do not include this
script's memory:

* baseline: ``import mrflight`` and torch (what every process pays);
* generation in memory: ``mrflight.dictionary.generate`` of the paper grid (114 650 atoms) for
  the 1750-pulse train (complex64 atoms: 1.6 GB);
* streamed generation: ``mrflight.dictionary.generate_to_file`` of the same grid in chunks of
  8192 atoms (the atoms never all in memory);
* exhaustive and SVD (rank 25) matching of 5000 noisy signals against the dictionary loaded from
  that file.

Usage::

    python benchmarks/memory.py            # paper size (~1 min, ~6 GB of RAM, 1.6 GB of disk)
    python benchmarks/memory.py --quick    # 300 pulses and every 20th atom: a smoke run

Writes ``benchmarks/results/memory.md`` (``memory_quick.md`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_line, markdown_table, publish  # noqa: E402

GIB = 2**30

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
what, quick, folder = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
import numpy as np, torch
torch.set_num_threads(2)
from mrflight import dictionary
from mrflight.physics import oksuz2019, add_noise
seq = oksuz2019(n_pulses=300) if quick else oksuz2019()
grid = dictionary.paper_grid()[::20] if quick else dictionary.paper_grid()
path = folder + "/paper.h5"
t0 = time.perf_counter()
if what == "baseline":
    pass
elif what == "generate":
    d = dictionary.generate(seq, grid, progress=False)
elif what == "stream":
    dictionary.generate_to_file(seq, grid, path, chunk_atoms=8192, progress=False)
else:
    from mrflight.matching import DictionaryMatcher
    d = dictionary.load(path)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(d), 5000, replace=False)
    clean = torch.from_numpy(d.atoms[idx])
    noisy = add_noise(clean, 0.01, generator=torch.Generator().manual_seed(0))
    m = DictionaryMatcher(d.atoms, d.params, rank=25 if what == "svd" else None)
    del d
    est = m.match(noisy)
    assert torch.isfinite(est).all()
seconds = time.perf_counter() - t0
# VmHWM (peak RSS of this process image): ru_maxrss of a child started by vfork/exec inherits
# the parent's peak (Linux records the old mm's high-water mark at exec), so it is the fallback
try:
    peak_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
except (OSError, StopIteration):
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
print("RESULT " + json.dumps({"peak_kib": peak_kib, "seconds": seconds,
                              "atoms": int(len(grid)), "T": len(seq)}))
"""

WORKLOADS = (
    ("baseline", "baseline (import mrflight, torch)"),
    ("generate", "dictionary generation in memory (generate)"),
    ("stream", "streamed generation to .h5 (generate_to_file, 8192-atom chunks)"),
    ("match", "exhaustive matching, 5000 signals (dictionary loaded)"),
    ("svd", "SVD rank-25 matching, 5000 signals (dictionary loaded)"),
)


def measure(quick: bool = False) -> list[dict]:
    """Run every workload in its own subprocess; rows with label, atoms, T, peak_gib, seconds."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for what, label in WORKLOADS:
            out = subprocess.run([sys.executable, "-c", _CHILD, what, "1" if quick else "0",
                                  folder], check=True, capture_output=True, text=True).stdout
            info = json.loads(out.split("RESULT ", 1)[1])
            info.update(workload=what, label=label, peak_gib=info["peak_kib"] * 1024 / GIB)
            rows.append(info)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small smoke run")
    args = ap.parse_args()
    rows = measure(args.quick)
    base = rows[0]["peak_gib"]
    table = markdown_table(
        ["workload", "atoms x T", "peak RSS (GiB)", "above baseline (GiB)", "time (s)"],
        [[r["label"], f"{r['atoms']:,} x {r['T']}", f"{r['peak_gib']:.2f}",
          "-" if r["workload"] == "baseline" else f"{r['peak_gib'] - base:.2f}",
          f"{r['seconds']:.1f}"] for r in rows])
    atoms_gib = rows[1]["atoms"] * rows[1]["T"] * 8 / GIB
    text = (f"# Peak memory: dictionary generation and matching\n\n"
            f"`python benchmarks/memory.py{' --quick' if args.quick else ''}` on "
            f"{machine_line()}; every workload in a fresh subprocess, peak = VmHWM.\n\n"
            f"{table}\n\nThe complex64 atoms alone take {atoms_gib:.2f} GiB.\n")
    publish("memory_quick.md" if args.quick else "memory.md", text)


if __name__ == "__main__":
    main()
