"""The floor of MSE training: the posterior mean under the training prior, against the bound.

A network trained with the mean squared error on fresh samples of a prior learns (at best) the
posterior mean of the parameters under that prior. This script computes that estimator by brute
force on the continuous B1/proton-density test set of ``eval.py`` (``offgrid_b1``: T1 uniform in
[100, 4000] ms, T2 in [10, min(T1, 500)] ms, B1 0.8-1.2, proton density 0.5-1.0, a random
phase, noise 0.01): a (T1, T2, B1) grid dense in the default ``data=simulated`` prior (T1
log-spaced in [50, 5000] ms, T2 in [5, min(T1, 600)] ms, B1 uniform in [0.7, 1.3]), the
likelihood of every atom with the complex scale integrated out (flat prior) at the true noise
level, atoms compressed to a rank-60 SVD basis. Its RMSE over the RMS bound is the best a
network trained on this prior can reach on that set (the "oracle" knows the noise level;
networks infer it from the data); ``--efficiency K`` adds its medians over eval.py's efficiency
grid. ``--log`` adds the floor of ``module.loss=log`` (the exponential of the posterior mean of
the logarithms), ``--median`` the floor of ``module.loss=l1`` (the posterior median, the same
for every monotone transform of the parameters), ``--tissues V`` the largest tissue-median
error of eval.py's robustness table (BrainWeb tissues at proton density 0.5, 0.75 and 1.0,
noise 0.01, ``V`` voxels each). ``--mle`` adds what the likelihood alone gives, with no prior:
the maximum-likelihood estimate (eval.py's (T1, T2, B1) dictionary matching, then
:func:`mrflight.physics.fit.fit` from the matched atom: the fine grid finds the basin of the
global minimum) and the fit started at the truth (an oracle: the likelihood's minimum nearest the
truth, which no estimator can know to pick).

    python benchmarks/bayes_floor.py            # ~3 min on 2 CPU cores, ~3 GB
    python benchmarks/bayes_floor.py --efficiency 60   # + eval.py's efficiency grid, 60 draws
                                                       #   per point (~7 min)
    python benchmarks/bayes_floor.py --log --efficiency 60 --tissues 500   # both floors (~16 min)
    python benchmarks/bayes_floor.py --median --tissues 500       # the posterior median (~11 min)
    python benchmarks/bayes_floor.py --median --efficiency 60     # (~10 min)
    python benchmarks/bayes_floor.py --mle --efficiency 60        # + the likelihood's (~12 min)
    python benchmarks/bayes_floor.py --smoke    # seconds: a coarse grid, 50 signals
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
import torch
from common import machine_line, markdown_table, publish

from mrflight import efficiency as eff
from mrflight.models.subspace import subspace_basis
from mrflight.phantoms import tissue_values
from mrflight.physics import oksuz2019, simulate
from mrflight.physics.fit import fit
from mrflight.transforms import preprocess


def prior_grid(n_t1: int, n_t2: int, n_b1: int) -> np.ndarray:
    """``(M, 3)`` atoms: log-spaced T1 in [50, 5000], T2 in [5, 600] (T2 <= T1), B1 linear in
    [0.7, 1.3]: uniform weights on it are the log-uniform (T1, T2) x uniform B1 prior."""
    t1 = np.geomspace(50.0, 5000.0, n_t1)
    t2 = np.geomspace(5.0, 600.0, n_t2)
    b1 = np.linspace(0.7, 1.3, n_b1)
    pairs = [(a, b) for a in t1 for b in t2 if b <= a]
    return np.array([(a, b, c) for a, b in pairs for c in b1])


class PosteriorMean:
    """Posterior estimates of (T1, T2, B1) of complex signals at known noise ``sigma``: the
    mean (``stat="mean"``), the exponential of the posterior mean of (log T1, log T2, log B1)
    (``"log"``) or the posterior median of each parameter (``"median"``: the marginal's CDF over
    the grid's values, each value's weight spread over its cell between log-midpoints)."""

    STATS = ("mean", "log", "median")

    def __init__(self, seq, grid: np.ndarray, rank: int, sigma: float, block: int = 20000):
        self.grid = torch.from_numpy(grid)
        self.log_grid = self.grid.log()
        self.sigma2 = float(sigma) ** 2
        # the subspace model's basis of the same prior (phase-aligned FISP fingerprints are real)
        self.basis = subspace_basis(seq, rank, "complex", t1_range=(50.0, 5000.0),
                                    t2_range=(5.0, 600.0), b1_range=(0.7, 1.3),
                                    n_atoms=min(20000, 4 * len(grid))).to(torch.complex128)
        self.atoms = torch.cat([self._project(self._atoms(seq, grid[i:i + block]))
                                for i in range(0, len(grid), block)])
        # per parameter: each atom's index among its distinct values, and the log edges of
        # those values' cells (one more edge than values)
        self.index, self.edges = [], []
        for j in range(grid.shape[1]):
            v, idx = np.unique(grid[:, j], return_inverse=True)
            lv = np.log(v)
            mid = (lv[1:] + lv[:-1]) / 2
            first = lv[:1] - (mid[:1] - lv[:1]) if len(v) > 1 else lv[:1]
            last = lv[-1:] + (lv[-1:] - mid[-1:]) if len(v) > 1 else lv[-1:]
            self.index.append(torch.from_numpy(idx.reshape(-1)))
            self.edges.append(np.concatenate([first, mid, last]))

    @staticmethod
    def _atoms(seq, p: np.ndarray) -> torch.Tensor:
        x = simulate(seq, *(torch.from_numpy(p[:, j]) for j in range(3)), dtype=torch.float64)
        return preprocess(x, "complex")[:, 0].to(torch.float64)

    def _project(self, z: torch.Tensor) -> torch.Tensor:
        a = z.to(torch.complex128) @ self.basis
        return (a / torch.linalg.vector_norm(a, dim=1, keepdim=True)).to(torch.complex64)

    def __call__(self, y: torch.Tensor, rows: int = 1000, stat: str = "mean") -> np.ndarray:
        if stat not in self.STATS:
            raise ValueError(f"stat must be one of {self.STATS}, got {stat!r}")
        return np.concatenate([self._estimate(y[i:i + rows], stat)
                               for i in range(0, len(y), rows)])

    def _log_likelihoods(self, y: torch.Tensor):
        """Blocks of ``(n, atoms)`` log-likelihoods up to a constant: |<a, y>|^2 / (2 sigma^2),
        the complex scale integrated out, with the block's first atom index."""
        yp = (y.to(torch.complex128) @ self.basis.conj()).to(torch.complex64)
        for i in range(0, len(self.atoms), 50000):
            ll = ((yp @ self.atoms[i:i + 50000].mH).abs() ** 2).to(torch.float64)
            yield i, ll / (2 * self.sigma2)

    def _estimate(self, y: torch.Tensor, stat: str) -> np.ndarray:
        n = len(y)
        top = torch.full((n,), -1e30, dtype=torch.float64)
        z = torch.zeros(n, dtype=torch.float64)
        if stat == "median":  # the posterior mass of every distinct value of every parameter
            acc = [torch.zeros(n, len(e) - 1, dtype=torch.float64) for e in self.edges]
        else:
            grid = self.log_grid if stat == "log" else self.grid
            acc = [torch.zeros(n, 3, dtype=torch.float64)]
        for i, ll in self._log_likelihoods(y):
            new_top = torch.maximum(top, ll.max(1).values)
            w, shrink = torch.exp(ll - new_top[:, None]), torch.exp(top - new_top)
            z = z * shrink + w.sum(1)
            for j, a in enumerate(acc):
                a *= shrink[:, None]
                if stat == "median":
                    a.index_add_(1, self.index[j][i:i + w.shape[1]], w)
                else:
                    a += w @ grid[i:i + w.shape[1]]
            top = new_top
        if stat != "median":
            mean = acc[0] / z[:, None]
            return (mean.exp() if stat == "log" else mean).numpy()
        out = np.empty((n, len(acc)))
        for j, a in enumerate(acc):
            cdf = np.concatenate([np.zeros((n, 1)), np.cumsum((a / z[:, None]).numpy(), 1)], 1)
            for r in range(n):  # the CDF is piecewise linear in log p across each value's cell
                out[r, j] = np.exp(np.interp(0.5, cdf[r], self.edges[j]))
        return out


class TruthStart:
    """The fit started at the truth: an oracle that knows, for each report, the true
    parameters of its signals (looked up by the number of signals)."""

    def __init__(self, seq, truths: dict[int, np.ndarray]):
        self.seq, self.truths = seq, truths

    def __call__(self, y: torch.Tensor) -> np.ndarray:
        return fit(self.seq, y, self.truths[len(y)], max_iter=30).numpy()


def maximum_likelihood(seq, y: torch.Tensor, matcher) -> np.ndarray:
    """(T1, T2, B1) matching, then the fit from the matched atom."""
    return fit(seq, y, matcher(y), max_iter=30).numpy()


def worst_tissues(seq, estimators: dict, voxels: int) -> list[list[str]]:
    """Per estimator the largest |tissue median error| of T1 and T2 (eval.py's robustness
    table: BrainWeb tissues with T2 in [10, 500] ms, proton density 0.5, 0.75, 1.0, noise 0.01)."""
    tissues = {k: v for k, v in tissue_values().items()
               if 10 <= v["t2_ms"] <= 500 and v["t1_ms"] <= 4000}
    rows = [r for r in eff.robustness_report(seq, estimators, {}, tissues, n=100, seed=0,
                                             voxels=voxels)
            if r["condition"] == "tissue_pd"]
    out = []
    for name in estimators:
        mine = [r for r in rows if r["method"] == name]
        cells = []
        for q in ("t1", "t2"):
            r = max(mine, key=lambda r: abs(r[f"{q}_median_error_pct"]))
            cells.append(f"{r[f'{q}_median_error_pct']:+.1f} % ({r['tissue']}, PD {r['pd']})")
        out.append([name, *cells])
    return out


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a coarse grid and 50 signals")
    ap.add_argument("--efficiency", type=int, default=0, metavar="K",
                    help="also the medians over eval.py's efficiency grid, K draws per point")
    ap.add_argument("--log", action="store_true",
                    help="also the floor of module.loss=log (exp of the posterior mean of logs)")
    ap.add_argument("--median", action="store_true",
                    help="also the floor of module.loss=l1 (the posterior median)")
    ap.add_argument("--tissues", type=int, default=0, metavar="V",
                    help="also the largest tissue-median errors, V voxels per tissue and PD")
    ap.add_argument("--mle", action="store_true",
                    help="also the maximum-likelihood fit, from matching and from the truth")
    args = ap.parse_args(argv)
    seq = oksuz2019(n_pulses=200, lobe_length=40) if args.smoke else oksuz2019()
    sizes, n = ((20, 16, 5), 50) if args.smoke else ((140, 120, 41), 2000)
    t0 = time.perf_counter()
    pm = PosteriorMean(seq, prior_grid(*sizes), rank=20 if args.smoke else 60, sigma=0.01)
    est = {"posterior mean": pm}
    if args.log:
        est["exp of the posterior mean of log"] = functools.partial(pm, stat="log")
    if args.median:
        est["posterior median"] = functools.partial(pm, rows=200, stat="median")
    pts = eff.efficiency_grid(b1=(0.8, 1.0, 1.2))
    if args.mle:
        from mrflight.evaluation.methods import b1_matching

        est["maximum likelihood (matching + fit)"] = functools.partial(
            maximum_likelihood, seq, matcher=b1_matching(seq))
        est["fit started at the truth (oracle)"] = TruthStart(seq, {
            n: eff.offgrid_params(n, 11)[0],
            len(pts) * args.efficiency: np.repeat(pts, args.efficiency, 0)})
    rows = eff.offgrid_report(seq, est, n, 0.01, seed=11)
    table = [[r["method"], f"{r['t1_rmse_ms']:.1f}", f"{r['t1_rmse_over_crb']:.3f}",
              f"{r['t2_rmse_ms']:.1f}", f"{r['t2_rmse_over_crb']:.3f}",
              f"{r['b1_rmse_pct']:.2f}", f"{r['b1_rmse_over_crb']:.3f}"] for r in rows]
    text = (f"# The floor of MSE training: posterior mean under the training prior\n\n"
            f"{machine_line()}; {len(pm.grid)} atoms, {n} signals of eval.py's continuous "
            f"B1/proton-density set, {time.perf_counter() - t0:.0f} s\n\n"
            + markdown_table(["method", "T1 RMSE ms", "T1 x CRB", "T2 RMSE ms", "T2 x CRB",
                              "B1 RMSE %", "B1 x CRB"], table))
    if args.efficiency:
        summ = eff.summarise(eff.efficiency_report(seq, est, pts, 0.01, args.efficiency,
                                                   seed=7))
        text += ("\n\nEfficiency grid (eval.py's 192 points, noise 0.01, "
                 f"{args.efficiency} draws per point), median over the grid\n\n"
                 + markdown_table(["method", "T1 std/CRB", "T1 RMSE/CRB", "T2 std/CRB",
                                   "T2 RMSE/CRB", "B1 std/CRB", "B1 RMSE/CRB"],
                                  [[r["method"]] + [f"{r[f'{q}_{m}_median']:.3f}"
                                                    for q in ("t1", "t2", "b1")
                                                    for m in ("std_over_crb", "rmse_over_crb")]
                                   for r in summ]))
    if args.tissues:
        text += (f"\n\nLargest tissue-median errors ({args.tissues} voxels per tissue and "
                 "proton density 0.5 / 0.75 / 1.0, noise 0.01)\n\n"
                 + markdown_table(["method", "T1", "T2"],
                                  worst_tissues(seq, {k: v for k, v in est.items()
                                                      if not isinstance(v, TruthStart)},
                                                args.tissues)))
    return publish("bayes_floor_smoke.md" if args.smoke else "bayes_floor.md", text)


if __name__ == "__main__":
    main()
