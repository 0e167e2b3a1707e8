"""EPG simulation speed: mrflight against epyg and a straightforward NumPy EPG, and the floor.

Simulates the paper's dictionary grid (114 650 T1/T2 atoms, T2 <= T1) for the default
1750-pulse train and prints a markdown table (also written to
``benchmarks/results/epg_speed.md``):

* mrflight ``simulate`` (float32 and float64; median of 3 after a warm-up), CUDA when available;
* the ``epyg`` package (pip ``epyg``; operator objects per pulse), timed on a few atoms and
  extrapolated per atom;
* a straightforward NumPy per-atom EPG (all states up to T), a few atoms, extrapolated;
* the estimated floor: ~20 flops per atom, state and pulse, summed over the state counts
  mrflight really uses, divided by the measured float32 GEMM rate of this machine.

Usage::

    python benchmarks/epg_speed.py            # full grid (~1 minute on 2 cores)
    python benchmarks/epg_speed.py --quick    # every 20th atom, fewer reference atoms
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from common import RESULTS_DIR, gemm_gflops, machine_line, timeit, write_result  # benchmarks/

from mrflight.physics import _ckernel, oksuz2019, simulate
from mrflight.physics.truncation import DEFAULT_TOL, states_needed, truncation_rate

RESULTS = RESULTS_DIR / "epg_speed.md"


def grid(quick: bool) -> np.ndarray:
    try:
        from mrflight.dictionary import paper_grid

        g = paper_grid()
    except ImportError:  # build inline: T1 0:2:500, 500:5:1000, 1000:10:2000, 2000:50:4000
        t1 = np.unique(np.concatenate([np.arange(0, 501, 2), np.arange(500, 1001, 5),
                                       np.arange(1000, 2001, 10), np.arange(2000, 4001, 50)]))
        t2 = np.unique(np.concatenate([np.arange(0, 101, 1), np.arange(100, 501, 2)]))
        a, b = np.meshgrid(t1, t2, indexing="ij")
        g = np.stack([a.ravel(), b.ravel()], 1).astype(np.float64)
        g = g[(g[:, 1] <= g[:, 0]) & (g[:, 1] > 0)]
    if quick:
        keep = np.zeros(len(g), bool)
        keep[::20] = True
        keep[np.argmax(g[:, 1])] = keep[np.argmax(g[:, 0])] = True  # keep the range's corners
        g = g[keep]
    return g


def numpy_epg(seq, t1: float, t2: float) -> np.ndarray:
    """Straightforward per-atom EPG: complex F+, F-, Z arrays of T+1 states, no truncation."""
    T = len(seq)
    fp = np.zeros(T + 1, complex)
    fm = np.zeros(T + 1, complex)
    z = np.zeros(T + 1, complex)
    z[0] = 1 - (1 + seq.inversion_efficiency) * np.exp(-seq.ti_ms / t1) if seq.inversion else 1
    sig = np.zeros(T, complex)
    for n in range(T):
        a, ph = np.deg2rad(seq.flip_angle_deg[n]), np.deg2rad(seq.phase_deg[n])
        e = np.exp(1j * ph)
        c2, s2, sa, ca = np.cos(a / 2) ** 2, np.sin(a / 2) ** 2, np.sin(a), np.cos(a)
        fp, fm, z = (c2 * fp + e * e * s2 * fm - 1j * e * sa * z,
                     s2 / (e * e) * fp + c2 * fm + 1j / e * sa * z,
                     -0.5j / e * sa * fp + 0.5j * e * sa * fm + ca * z)
        sig[n] = 1j * fp[0] * np.exp(-seq.te_ms / t2)
        e1, e2 = np.exp(-seq.tr_ms[n] / t1), np.exp(-seq.tr_ms[n] / t2)
        fp, fm, z = fp * e2, fm * e2, z * e1
        z[0] += 1 - e1
        fp = np.concatenate([[np.conj(fm[1])], fp[:-1]])
        fm = np.concatenate([fm[1:], [0.0]])
    return sig


def epyg_epg(seq, t1: float, t2: float) -> np.ndarray:
    """The same train with the epyg package's operators (Transform, Epsilon, Shift).

    epyg's RF rotation has the opposite handedness (the signal is ``i`` times ours; magnitudes
    agree). The state vector is allocated for all T states up front: letting epyg grow it
    (``initial_size=256`` with auto-grow and compaction) changed the 1750-pulse signal by up to
    4e-2 in our check.
    """
    from epyg import EpyG, Operators

    z0 = 1 - (1 + seq.inversion_efficiency) * np.exp(-seq.ti_ms / t1) if seq.inversion else 1
    state = EpyG.epg(initial_size=len(seq) + 2, m0=z0)  # no regrowth (see note)
    shift = Operators.Shift()
    sig = np.zeros(len(seq), complex)
    relax = {}
    for n in range(len(seq)):
        Operators.Transform(np.deg2rad(seq.flip_angle_deg[n]),
                            np.deg2rad(seq.phase_deg[n])).apply(state)
        sig[n] = state.get_f(0) * np.exp(-seq.te_ms / t2)
        tr = seq.tr_ms[n]
        if tr not in relax:
            relax[tr] = Operators.Epsilon(tr / t1, tr / t2)
        relax[tr].apply(state)
        shift.apply(state)
    return sig


def measure(quick: bool = False, n_ref: int | None = None, pulses: int | None = None,
            repeats: int = 3) -> dict:
    """Time mrflight (CPU float32/float64, CUDA when available), the references and the floor.

    Args:
        quick: every 20th atom of the paper grid.
        n_ref: atoms simulated by the epyg and NumPy references (default 5, quick 2).
        pulses: shorten the train to this many pulses (tests); None: the full 1750.
        repeats: timed repeats of mrflight (median) after a warm-up.

    Returns:
        ``{"rows": [(name, atoms timed, s for the grid, atoms/s)], "errs": [...], "n_atoms",
        "floor_s", "flops", "gflops", "rate", "k", "seq"}``.
    """
    n_ref = n_ref or (2 if quick else 5)
    seq = oksuz2019(n_pulses=pulses) if pulses else oksuz2019()
    g = grid(quick)
    t1 = torch.from_numpy(g[:, 0].copy())
    t2 = torch.from_numpy(g[:, 1].copy())
    n = len(g)
    rows = []

    # mrflight, CPU: warm-up compiles the kernel and verifies the truncation rate for this range
    simulate(seq, t1, t2)
    for dt, label in ((torch.float32, "float32"), (torch.float64, "float64")):
        s = timeit(lambda dt=dt: simulate(seq, t1, t2, dtype=dt), repeats=repeats, warmup=0)
        rows.append((f"mrflight CPU {label}" + (" (C kernel)" if _ckernel.kernel() else ""),
                     n, s, n / s))
    if torch.cuda.is_available():
        c1, c2 = t1.cuda(), t2.cuda()
        s = timeit(lambda: simulate(seq, c1, c2), repeats=repeats, warmup=1, device="cuda")
        rows.append(("mrflight CUDA float32", n, s, n / s))
        del c1, c2

    # references on a few atoms spread over the range, extrapolated; their magnitudes are
    # checked against mrflight's untruncated float64 EPG (max abs difference, units of M0)
    pick = np.linspace(0, n - 1, n_ref).astype(int)
    exact = simulate(seq, t1[pick], t2[pick], dtype=torch.float64, tol=1e-300).abs().numpy()
    mine = simulate(seq, t1, t2).abs()[pick].numpy()
    errs = [float(np.abs(mine - exact).max())] * (len(rows))
    for name, fn in (("NumPy per-atom EPG (all T states)", numpy_epg), ("epyg", epyg_epg)):
        try:
            t = time.perf_counter()
            sig = np.stack([fn(seq, g[i, 0], g[i, 1]) for i in pick])
            s = (time.perf_counter() - t) / n_ref
        except ImportError:
            continue
        rows.append((name, n_ref, s * n, 1 / s))
        errs.append(float(np.abs(np.abs(sig) - exact).max()))

    # the floor: ~20 flops per atom, state and pulse over the state counts actually used
    rate = truncation_rate(seq, DEFAULT_TOL, float(g[:, 1].max()), float(g[:, 0].max()))
    k = states_needed(g[:, 1], float(seq.tr_ms.min()), len(seq), DEFAULT_TOL, rate)
    steps = np.minimum(np.arange(1, len(seq) + 1)[None, :], k[:, None]).sum()
    flops = 20.0 * steps
    gf = gemm_gflops()
    return {"rows": rows, "errs": errs, "n_atoms": n, "floor_s": flops / (gf * 1e9),
            "flops": flops, "gflops": gf, "rate": rate, "k": k, "seq": seq, "n_ref": n_ref}


def report(r: dict, quick: bool = False) -> str:
    """The markdown report of :func:`measure`'s result."""
    rows, errs, n, seq, k = r["rows"], r["errs"], r["n_atoms"], r["seq"], r["k"]
    base = rows[0][3]
    flops, gf, floor_s = r["flops"], r["gflops"], r["floor_s"]
    lines = [
        "# EPG simulation speed",
        "",
        f"Machine: {machine_line()}.",
        f"Train: {seq.name}, {len(seq)} pulses; grid: {n} atoms (paper grid"
        f"{', every 20th atom' if quick else ''}); tol {DEFAULT_TOL}, "
        f"truncation rate {r['rate']:.3g}, mean states kept {k.mean():.1f} (max {k.max()}).",
        "",
        "| method | atoms timed | time for the grid (s) | atoms/s | mrflight float32 speed-up "
        "| max abs error (M0) |",
        "|---|---|---|---|---|---|",
    ]
    for (name, na, s, aps), e in zip(rows, errs + [float("nan")] * len(rows)):
        lines.append(f"| {name} | {na} | {s:.3g} | {aps:,.0f} | {base / aps:,.1f}x | {e:.1e} |")
    lines.append(f"| floor: {flops / 1e9:.1f} GFLOP at {gf:.1f} GFLOP/s (float32 GEMM) | - | "
                 f"{floor_s:.3g} | {n / floor_s:,.0f} | {base / (n / floor_s):.2f}x | - |")
    lines += ["", "Speed-up = mrflight float32 atoms/s divided by the row's atoms/s; "
              "epyg and NumPy rows are extrapolated from the atoms timed. Error: max |magnitude| "
              f"difference from the untruncated float64 EPG on the {r['n_ref']} reference atoms "
              "(mrflight rows: the default tol=1e-3 float32 result). Times: median of "
              "3 after a warm-up."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="every 20th grid atom (smoke run)")
    ap.add_argument("--ref-atoms", type=int, default=None,
                    help="atoms for the epyg/NumPy references (default 5, quick 2)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    text = report(measure(args.quick, args.ref_atoms), args.quick)
    print(text)
    write_result(args.out, text)
    print(f"written to {args.out}")
    return text


if __name__ == "__main__":
    main()
