"""Run the Triton matching kernels (:mod:`mrflight._match_triton`) through Triton's interpreter on
CPU tensors and compare them with a float64 brute force; print the results as one JSON line.

Used by ``tests/test_match_kernels.py`` in a subprocess (``TRITON_INTERPRET=1`` must be set before
triton is imported and must not leak into the test session); ``--cuda`` runs the same checks on
a GPU at larger sizes. The interpreter's ``tl.dot`` computes float32 whatever the precision, so
there ``tf32`` checks the margins' logic, not TF32 rounding (the torch reference emulates that).
"""

from __future__ import annotations

import json
import os
import sys

# only when run as a script: the tests import ``case`` and ``exact`` from here, and the variable
# must not leak into their session (it would send every later Triton call to the interpreter)
if __name__ == "__main__" and "--cuda" not in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from mrflight import match_kernels as mk  # noqa: E402

#: small tiles and several atom splits exercise masks, splits and atomics (every case); the
#: default tiles (larger than the interpreter's 37 signals) run for rank 7
SMALL, DEFAULT = ((16, 32, 4, 1), 3), (None, None)
#: 0: only the exact best (or exact ties) must be kept; 3e-3: whole near-duplicate clusters
EPS = (0.0, 3e-3)


def case(complex_: bool, rank: int, kind: str, n: int, m: int, seed: int = 0):
    """Unit-norm atoms and noisy copies of some of them as signals: ``random`` atoms, or
    ``near`` duplicates (clusters of atoms within ~1e-6 of each other)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.complex128 if complex_ else torch.float64
    if kind == "random":
        a = torch.randn(m, rank, generator=g, dtype=dt)
    else:
        base = torch.randn(-(-m // 12), rank, generator=g, dtype=dt).repeat_interleave(12, 0)[:m]
        a = base + 1e-6 * torch.randn(m, rank, generator=g, dtype=dt)
    a = a / torch.linalg.vector_norm(a, dim=1, keepdim=True)
    pick = torch.randint(0, m, (n,), generator=g)
    s = 0.7 * a[pick] + 0.02 * torch.randn(n, rank, generator=g, dtype=dt)
    low = torch.complex64 if complex_ else torch.float32
    return s.to(low), a.to(low)


def exact(s, a, complex_):
    """float64 scores of the float32 inputs."""
    hi = torch.complex128 if complex_ else torch.float64
    sc = s.to(hi) @ a.to(hi).conj().T
    return sc.abs() if complex_ else sc


def check(s, a, complex_, precision, device, tiles, splits) -> dict:
    """Worst row-max error over its bound, missing pairs (superset), pairs too far from the best
    (soundness), duplicates, and the raw candidates' overflow accounting."""
    s, a = s.to(device), a.to(device)
    kw = dict(complex_=complex_, precision=precision, backend="triton", tiles=tiles,
              splits=splits)
    ex = exact(s, a, complex_).cpu()
    top = ex.amax(1)
    nu = torch.linalg.vector_norm(s.cpu().to(ex.dtype if not complex_ else torch.complex128),
                                  dim=1).real
    delta = mk.error_bound(precision, s.shape[1], complex_) * nu * float(
        torch.linalg.vector_norm(a.cpu().to(torch.complex128), dim=1).max())
    rm = mk.row_max(s, a, **kw).cpu().double()
    out = {"row_max_err_over_bound": float(((rm - top).abs() / delta).max()),
           "missing": 0, "too_far": 0, "duplicates": 0, "unsorted": 0, "pairs": 0}
    for eps in EPS:
        cp = mk.candidate_pairs(s, a, eps, capacity=3, **kw)  # 3: forces the retry
        got = set(zip(cp.rows.tolist(), cp.cols.tolist()))
        want = set(map(tuple, torch.nonzero(ex >= (top - eps)[:, None]).tolist()))
        out["missing"] += len(want - got)
        r, c = cp.rows.cpu(), cp.cols.cpu()
        out["too_far"] += int((ex[r, c] < top[r] - cp.margin.cpu()[r] - 2 * delta[r]).sum())
        out["duplicates"] += len(r) - len(got)
        key = r * a.shape[0] + c
        out["unsorted"] += int((key[1:] <= key[:-1]).sum())
        out["pairs"] += len(r)
    thr = rm - 1e-3
    full = mk.candidates(s, a, thr, capacity=10 ** 6, **kw)
    part = mk.candidates(s, a, thr, capacity=5, **kw)
    out["overflow_accounting_ok"] = (full[2] == 0 and len(part[0]) == min(5, len(full[0]))
                                     and len(part[0]) + part[2] == len(full[0]))
    return out


def main() -> None:
    cuda = "--cuda" in sys.argv
    device = "cuda" if cuda else "cpu"
    n, m = (3001, 20011) if cuda else (37, 301)
    results = {}
    for complex_ in (False, True):
        for rank in (25, 7):
            for kind in ("random", "near"):
                s, a = case(complex_, rank, kind, n, m)
                for precision in (("ieee", "tf32x3") if cuda else ("ieee", "tf32")):
                    configs = [DEFAULT] if cuda else [SMALL, DEFAULT] if rank == 7 else [SMALL]
                    for t, (tiles, splits) in enumerate(configs):
                        name = f"{'complex' if complex_ else 'real'}-r{rank}-{kind}-{precision}"
                        name += f"-t{t}"
                        results[name] = check(s, a, complex_, precision, device, tiles, splits)
    results["pair_scores"] = pair_score_errors(device, 60 if cuda else 7)
    print(json.dumps(results))


def pair_score_errors(device: str, length_scale: int) -> dict:
    """Largest relative error of :func:`mk.pair_scores` (the float64 re-scoring of pairs) against
    float64 products of the same float32 inputs, real and complex, lengths not multiples of
    the kernel's step (``T`` up to ``length_scale * 29``)."""
    out = {}
    for complex_ in (False, True):
        for t in (1, 29, length_scale * 29):
            g = torch.Generator().manual_seed(t)
            dt = torch.complex64 if complex_ else torch.float32
            s = torch.randn(23, t, generator=g, dtype=dt).to(device)
            a = torch.randn(41, t, generator=g, dtype=dt).to(device)
            rows = torch.randint(0, 23, (57,), generator=g).to(device)
            cols = torch.randint(0, 41, (57,), generator=g).to(device)
            got = mk.pair_scores(s, a, rows, cols, backend="triton")
            hi = torch.complex128 if complex_ else torch.float64
            ref = (a[cols].to(hi).conj() * s[rows].to(hi)).sum(1)
            scale = (a[cols].abs().double() * s[rows].abs().double()).sum(1)
            out[f"{'complex' if complex_ else 'real'}-T{t}"] = float(
                ((got - ref).abs() / scale).max())
    return out


if __name__ == "__main__":
    main()
