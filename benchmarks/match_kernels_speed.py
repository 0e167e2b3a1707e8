"""SVD-basis candidate search (:mod:`mrflight.match_kernels`) against the torch scan.

For noisy signals of the paper's grid projected on a rank-``r`` SVD basis (coefficients scaled
to unit norm, so scores and ``eps`` are relative), times per precision :func:`row_max`,
:func:`candidates` (at a threshold of ``row_max - margin``) and the whole
:func:`candidate_pairs`, next to the torch scan that materialises the scores (a float32 matmul and
an ``amax`` per block of signals, in IEEE and in TF32); reports the candidate pairs per signal
(mean, median, 99th percentile, max) and the margin (``eps`` plus twice the error bound).

Usage::

    python benchmarks/match_kernels_speed.py            # CUDA: 65 536 signals x 114 650 atoms
    python benchmarks/match_kernels_speed.py --complex  # complex matching
    python benchmarks/match_kernels_speed.py --smoke    # CPU, tiny, Triton interpreter (times
                                                        # mean nothing; checks the script)

Prints a markdown table and writes ``benchmarks/results/match_kernels_speed[_smoke].md``.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial

if "--smoke" in sys.argv:  # must precede the first import of triton
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from common import machine_line, markdown_table, publish, timeit  # noqa: E402  benchmarks/

from mrflight import match_kernels as mk  # noqa: E402
from mrflight.dictionary import paper_grid  # noqa: E402
from mrflight.matching import float32_matmul, svd_basis  # noqa: E402
from mrflight.physics import add_noise, oksuz2019, simulate  # noqa: E402


def svd_data(n_signals: int, rank: int, complex_: bool, device, grid_step: int = 1,
             pulses: int | None = None, noise_std: float = 0.01, seed: int = 0):
    """Unit-norm SVD coefficients of the paper grid's atoms ``(M, r)`` and of noisy copies of
    randomly drawn atoms ``(n, r)`` (magnitudes unless ``complex_``)."""
    seq = oksuz2019(n_pulses=pulses) if pulses else oksuz2019()
    grid = torch.from_numpy(paper_grid()[::grid_step])
    x = simulate(seq, grid[:, 0], grid[:, 1], device=device)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, x.shape[0], (n_signals,), generator=g)
    noisy = add_noise(x[pick].cpu(), noise_std, generator=g).to(device)
    atoms = x if complex_ else x.abs()
    sig = noisy if complex_ else noisy.abs()
    basis = svd_basis(atoms / torch.linalg.vector_norm(atoms, dim=1, keepdim=True), rank)[0]

    def unit(v):
        c = v @ basis.conj()
        return c / torch.linalg.vector_norm(c, dim=1, keepdim=True)

    return unit(sig), unit(atoms)


def torch_scan(s, a, complex_: bool, mode: str, block: int = 2 ** 30) -> torch.Tensor:
    """The best score per signal from materialised score blocks (``block`` elements each)."""
    rows = max(1, block // a.shape[0])
    out = []
    with float32_matmul(s.device, mode):
        for i in range(0, s.shape[0], rows):
            sc = s[i: i + rows] @ (a.mH if complex_ else a.T)
            out.append((sc.abs() if complex_ else sc).amax(1))
    return torch.cat(out)


def _precision_row(s, a, eps: float, precision: str, complex_: bool, repeats: int,
                   device) -> dict:
    """Times of one precision and its candidate pairs per signal."""
    kw = dict(complex_=complex_, precision=precision)
    try:
        cp = mk.candidate_pairs(s, a, eps, **kw)
    except ValueError as e:  # e.g. TF32's margin keeps hundreds of millions of pairs
        return {"precision": precision, "error": str(e).split(":")[0]}
    per = torch.bincount(cp.rows, minlength=s.shape[0]).double().cpu()
    thr, cap = cp.row_max.double() - cp.margin, len(cp.rows)
    return {
        "precision": precision,
        "row_max": timeit(lambda: mk.row_max(s, a, **kw), repeats, device=device),
        "candidates": timeit(lambda: mk.candidates(s, a, thr, capacity=cap, **kw), repeats,
                             device=device),
        "pairs_total": timeit(lambda: mk.candidate_pairs(s, a, eps, capacity=cap, **kw),
                              repeats, device=device),
        "per_signal": (float(per.mean()), float(per.median()), float(per.quantile(0.99)),
                       int(per.max())),
        "margin": float(cp.margin.max()),
    }


def measure(n_signals: int, rank: int, complex_: bool, eps: float, device, repeats: int = 5,
            grid_step: int = 1, pulses: int | None = None,
            precisions=mk.PRECISIONS) -> dict:
    """Times (s) and candidate counts per precision, and the torch scan's times."""
    s, a = svd_data(n_signals, rank, complex_, device, grid_step, pulses)
    rows = [_precision_row(s, a, eps, p, complex_, repeats, device) for p in precisions]
    scan = {m: timeit(partial(torch_scan, s, a, complex_, m), repeats, device=device)
            for m in ("ieee", "tf32")}
    return {"rows": rows, "scan": scan, "n": s.shape[0], "m": a.shape[0], "rank": rank,
            "complex": complex_, "eps": eps, "device": torch.device(device),
            "backend": "triton" if mk.triton_available(device) else "torch reference",
            "repeats": repeats}


def report(r: dict, smoke: bool) -> str:
    kind = "complex |<a, s>|" if r["complex"] else "real <a, s>"
    head = [f"# SVD candidate search{' (smoke: CPU, Triton interpreter; times mean nothing)' if smoke else ''}",  # noqa: E501
            "", f"- machine: {machine_line(r['device'])}; backend: {r['backend']}",
            f"- {r['n']} signals x {r['m']} atoms, rank {r['rank']}, {kind}, eps {r['eps']:g} "
            f"(unit-norm coefficients); median of {r['repeats']} after a warm-up",
            f"- torch scan (scores materialised, matmul + amax): IEEE {r['scan']['ieee']:.4f} s, "
            f"TF32 {r['scan']['tf32']:.4f} s", ""]
    table = markdown_table(
        ["precision", "row_max (s)", "candidates (s)", "candidate_pairs (s)",
         "pairs/signal mean / median / p99 / max", "margin"],
        [[x["precision"], f"{x['row_max']:.4f}", f"{x['candidates']:.4f}",
          f"{x['pairs_total']:.4f}", " / ".join(f"{v:g}" for v in x["per_signal"]),
          f"{x['margin']:.3g}"] if "error" not in x else
         [x["precision"], "", "", "", x["error"], ""] for x in r["rows"]])
    cmd = "python benchmarks/match_kernels_speed.py" + (" --smoke" if smoke else "") + (
        " --complex" if r["complex"] else "")
    return "\n".join(head) + "\n" + table + f"\n\nCommand: `{cmd}`\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, Triton interpreter")
    ap.add_argument("--complex", action="store_true", help="complex matching")
    ap.add_argument("--n-signals", type=int, default=65536)
    ap.add_argument("--rank", type=int, default=25)
    ap.add_argument("--eps", type=float, default=1e-6, help="score margin (relative)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    if args.smoke:
        r = measure(64, args.rank, args.complex, args.eps, "cpu", repeats=1, grid_step=200,
                    pulses=100)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke to check the script on the CPU")
        r = measure(args.n_signals, args.rank, args.complex, args.eps, "cuda", args.repeats)
    name = "match_kernels_speed" + ("_complex" if args.complex else "")
    return publish(name + ("_smoke.md" if args.smoke else ".md"), report(r, args.smoke))


if __name__ == "__main__":
    main()
