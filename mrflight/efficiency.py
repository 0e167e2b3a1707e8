"""Statistical efficiency and robustness of estimators, measured against the Cramér–Rao bound.

Three protocols, each a function of *estimators* (callables mapping complex fingerprints
``(N, T)`` to parameters ``(N, P)``: T1 ms, T2 ms[, B1]) so networks and dictionary matching
are measured the same way:

* :func:`efficiency_report`: a fixed grid of test points (T1 x T2 [x B1]); at each point
  ``n_realizations`` noise draws (with a random global phase each) of the same fingerprint;
  per estimator and parameter the bias, the standard deviation, the RMSE and their ratios to the
  bound at that point. An efficient unbiased estimator has ``std/CRB = RMSE/CRB = 1``.
* :func:`offgrid_report`: continuous random tissues with B1, proton density and a global phase
  per signal: RMSE against the RMS of the per-signal bound (the summary the README quotes).
* :func:`robustness_report`: the same estimators where they were not trained: noise at half the
  lowest and twice the highest training level, B1 at 0.8 and 1.2, and tissue-like voxels of
  proton density 0.5 to 1.0 (tissue medians against truth).

The bound is that of the noise model used throughout mrflight (the complex fingerprint is
L2-normalised, scaled by the proton density, given a global phase, and complex Gaussian noise of
std ``noise_std`` is added to the real and imaginary parts), with T1, T2 and B1 unknown and the
complex scale (proton density and phase) as nuisance parameters
(:func:`mrflight.physics.crb` with ``estimate_b1=True, phase_nuisance=True``).

References:
    Zhao et al., Optimal experiment design for MRF: Cramér-Rao bound meets spin dynamics, IEEE
    TMI 2019 (the bound for MRF). Mao, Flassbeck, Assländer, Bias-reduced neural networks for
    parameter estimation in quantitative MRI, 2023 (bias and std against the bound on a grid).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from mrflight.physics import Sequence, crb, simulate

__all__ = ["efficiency_grid", "efficiency_report", "offgrid_report", "robustness_report",
           "PARAM_NAMES", "summarise"]

#: parameter names and units of the estimator columns
PARAM_NAMES = (("t1", "ms"), ("t2", "ms"), ("b1", "ratio"))

Estimator = Callable[[torch.Tensor], np.ndarray]


def efficiency_grid(t1_ms=None, t2_ms=None, b1=(1.0,)) -> np.ndarray:
    """Test points: every (T1, T2, B1) of the given values with T2 <= T1.

    Defaults: 8 T1 values log-spaced in [300, 3500] ms and 8 T2 values in [15, 280] ms (all
    64 pairs satisfy T2 <= T1).

    Returns:
        float64 ``(G, 3)``: T1 ms, T2 ms, B1.
    """
    t1 = np.geomspace(300.0, 3500.0, 8) if t1_ms is None else np.asarray(t1_ms, float)
    t2 = np.geomspace(15.0, 280.0, 8) if t2_ms is None else np.asarray(t2_ms, float)
    pts = [(a, b, c) for a in t1 for b in t2 for c in np.atleast_1d(b1) if b <= a]
    if not pts:
        raise ValueError("the efficiency grid is empty: choose T2 values <= the T1 values")
    return np.asarray(pts, dtype=np.float64)


def _bound(seq: Sequence, params: np.ndarray, noise_std) -> np.ndarray:
    """``(N, 3)`` bound on T1, T2 (ms) and B1 at ``noise_std`` (scalar or ``(N,)``)."""
    b = crb(seq, torch.from_numpy(params[:, 0]), torch.from_numpy(params[:, 1]), 1.0,
            b1=torch.from_numpy(params[:, 2]), estimate_b1=True, phase_nuisance=True)
    return b.cpu().numpy() * np.asarray(noise_std, dtype=np.float64).reshape(-1, 1)


def _measure(clean: torch.Tensor, amplitude: np.ndarray, noise_std, seed: int) -> torch.Tensor:
    """Normalised fingerprints times ``amplitude``, a random global phase, complex noise."""
    g = torch.Generator().manual_seed(int(seed))
    x = clean.to(torch.complex128)
    x = x / torch.linalg.vector_norm(x, dim=1, keepdim=True)
    n = x.shape[0]
    phase = torch.rand(n, generator=g, dtype=torch.float64) * (2 * math.pi)
    amp = torch.as_tensor(amplitude, dtype=torch.float64).reshape(-1)
    x = x * torch.polar(amp.expand(n), phase)[:, None]
    std = torch.as_tensor(noise_std, dtype=torch.float64).reshape(-1, 1)
    noise = torch.complex(torch.randn(x.shape, generator=g, dtype=torch.float64),
                          torch.randn(x.shape, generator=g, dtype=torch.float64))
    return (x + std * noise).to(torch.complex64)


def _columns(pred: np.ndarray) -> list[int]:
    return list(range(min(pred.shape[1], 3)))


def efficiency_report(seq: Sequence, estimators: dict[str, Estimator], points: np.ndarray,
                      noise_std: float = 0.01, n_realizations: int = 200,
                      seed: int = 0) -> list[dict]:
    """Bias, std and RMSE of every estimator at every test point, against the bound there.

    Args:
        seq: the pulse train.
        estimators: name -> callable ``(N, T) complex -> (N, P)`` (T1 ms, T2 ms[, B1]).
        points: ``(G, 3)`` test points (see :func:`efficiency_grid`).
        noise_std: noise std relative to the unit-norm fingerprint.
        n_realizations: noise draws per point (>= 2).
        seed: seed of the noise and phases.

    Returns:
        One row per (estimator, point): ``method``, ``t1_ms``, ``t2_ms``, ``b1``,
        ``noise_std``, ``n``, and per estimated parameter ``q``: ``q_bias``, ``q_std``,
        ``q_rmse``, ``q_crb``, ``q_std_over_crb``, ``q_rmse_over_crb`` (ms for T1/T2, ratio
        for B1).
    """
    if int(n_realizations) < 2:
        raise ValueError(f"n_realizations must be >= 2, got {n_realizations}")
    k = int(n_realizations)
    pts = np.asarray(points, dtype=np.float64)
    clean = simulate(seq, torch.from_numpy(pts[:, 0]), torch.from_numpy(pts[:, 1]),
                     torch.from_numpy(pts[:, 2]), dtype=torch.float64)
    bound = _bound(seq, pts, noise_std)
    signals = _measure(clean.repeat_interleave(k, 0), np.ones(1), noise_std, seed)
    rows = []
    for name, est in estimators.items():
        pred = np.asarray(est(signals), dtype=np.float64).reshape(len(pts), k, -1)
        for g, p in enumerate(pts):
            row = {"method": name, "t1_ms": p[0], "t2_ms": p[1], "b1": p[2],
                   "noise_std": float(noise_std), "n": k}
            for j in _columns(pred[g]):
                q = PARAM_NAMES[j][0]
                e = pred[g, :, j] - p[j]  # NaN estimates give NaN rows: never dropped
                bias, std = float(e.mean()), float(e.std(ddof=1))
                rmse = float(np.sqrt(np.mean(e ** 2)))
                c = float(bound[g, j])
                row.update({f"{q}_bias": bias, f"{q}_std": std, f"{q}_rmse": rmse,
                            f"{q}_crb": c,
                            f"{q}_std_over_crb": std / c if c > 0 and math.isfinite(c) else None,
                            f"{q}_rmse_over_crb": rmse / c if c > 0 and math.isfinite(c)
                            else None})
            rows.append(row)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Median (and 90th percentile) over the grid of std/CRB and RMSE/CRB per estimator."""
    out = []
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        row = {"method": name, "points": len(mine)}
        for q, _ in PARAM_NAMES:
            for m in ("std_over_crb", "rmse_over_crb"):
                v = np.array([r[f"{q}_{m}"] for r in mine if r.get(f"{q}_{m}") is not None],
                             dtype=float)
                if v.size:
                    row[f"{q}_{m}_median"] = float(np.median(v))
                    row[f"{q}_{m}_p90"] = float(np.percentile(v, 90))
        out.append(row)
    return out


def offgrid_params(n: int, seed: int = 0, t1_range=(100.0, 4000.0), t2_range=(10.0, 500.0),
                   b1_range=(0.8, 1.2), pd_range=(0.5, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Continuous test tissues: uniform T1, T2 uniform in ``[t2_low, min(T1, t2_high)]``, B1,
    proton density. Returns ``(params (n, 3), pd (n,))``."""
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(*t1_range, n)
    t2 = rng.uniform(t2_range[0], np.minimum(t1, t2_range[1]))
    b1 = rng.uniform(*b1_range, n)
    pd = rng.uniform(*pd_range, n)
    return np.stack([t1, t2, b1], 1), pd


def offgrid_report(seq: Sequence, estimators: dict[str, Estimator], n: int = 2000,
                   noise_std: float = 0.01, seed: int = 0, **ranges) -> list[dict]:
    """RMSE of every estimator on continuous tissues with B1, proton density and phase.

    Each signal is ``pd * x / ||x|| * exp(i phi) + noise`` (noise std ``noise_std``), so its
    noise relative to the fingerprint is ``noise_std / pd``. The bound is computed per signal at
    that relative noise, with T1, T2, B1 and the complex scale unknown; the ``crb`` row holds the
    RMS of the per-signal bounds, and every row its ``q_rmse_over_crb`` against it.

    Returns:
        One row per estimator plus a ``crb`` row: ``q_mae``, ``q_rmse`` (ms; B1 in %),
        ``q_rmse_over_crb``.
    """
    params, pd = offgrid_params(n, seed, **ranges)
    clean = simulate(seq, torch.from_numpy(params[:, 0]), torch.from_numpy(params[:, 1]),
                     torch.from_numpy(params[:, 2]), dtype=torch.float64)
    signals = _measure(clean, pd, noise_std, seed + 1)
    bound = _bound(seq, params, noise_std / pd)
    fin = np.isfinite(bound).all(1)
    rms_bound = np.sqrt(np.mean(bound[fin] ** 2, axis=0))
    base = {"test_set": "offgrid_b1_pd", "noise_std": noise_std, "n_signals": int(n),
            "pd_range": list(ranges.get("pd_range", (0.5, 1.0)))}
    rows = []
    for name, est in estimators.items():
        pred = np.asarray(est(signals), dtype=np.float64)
        row = {"method": name, **base}
        for j in _columns(pred):
            q, unit = PARAM_NAMES[j]
            f = 100.0 if q == "b1" else 1.0
            e = (pred[fin, j] - params[fin, j]) * f  # NaN estimates give NaN: never dropped
            sfx = "pct" if q == "b1" else "ms"
            row[f"{q}_mae_{sfx}"] = float(np.mean(np.abs(e)))
            row[f"{q}_rmse_{sfx}"] = float(np.sqrt(np.mean(e ** 2)))
            row[f"{q}_rmse_over_crb"] = float(np.sqrt(np.mean(e ** 2)) / (f * rms_bound[j]))
        rows.append(row)
    crb_row = {"method": "crb", **base, "n_signals": int(fin.sum())}
    for j, (q, _) in enumerate(PARAM_NAMES):
        f = 100.0 if q == "b1" else 1.0
        sfx = "pct" if q == "b1" else "ms"
        crb_row[f"{q}_rmse_{sfx}"] = float(f * rms_bound[j])
        crb_row[f"{q}_rmse_over_crb"] = 1.0
    rows.append(crb_row)
    return rows


def robustness_report(seq: Sequence, estimators: dict[str, Estimator],
                      train_noise: dict[str, tuple[float, float]], tissues: dict[str, dict],
                      n: int = 1000, seed: int = 0, pd_values=(0.5, 0.75, 1.0),
                      voxels: int = 2000, tissue_noise_std: float | None = 0.01) -> list[dict]:
    """Each estimator where it was not trained.

    * ``noise_low`` / ``noise_high``: continuous tissues (B1 = 1, proton density 1) at half the
      estimator's lowest and twice its highest training noise;
    * ``b1_0.8`` / ``b1_1.2``: the same tissues at B1 0.8 and 1.2, at the geometric mean of the
      training noise range;
    * ``tissue_pd``: ``voxels`` voxels of each tissue at each proton density, B1 = 1, absolute
      noise ``tissue_noise_std`` (None: the geometric mean of the training range), so the noise
      relative to the fingerprint is up to twice that: the tissue medians of T1 and T2 against
      truth, in %. The median of ``voxels`` estimates has a sampling error of about
      ``1.25 std / sqrt(voxels)`` (0.5 % of T2 for fat at proton density 0.5, noise 0.01 and
      2000 voxels), well below the 3 % such medians are held to.

    Args:
        train_noise: estimator name -> ``(low, high)`` training noise std.
        tissues: name -> ``{"t1_ms": .., "t2_ms": ..}``.

    Returns:
        Rows ``{method, condition, noise_std, b1, t1_rmse_ms, t2_rmse_ms, ...}`` and, for
        ``tissue_pd``, one row per (method, tissue, pd) with ``t1_median_error_pct`` and
        ``t2_median_error_pct``.
    """
    rng = np.random.default_rng(seed)
    t1 = rng.uniform(100.0, 4000.0, n)
    t2 = rng.uniform(10.0, np.minimum(t1, 500.0))
    rows = []
    cache: dict = {}

    def clean_of(b1: float) -> torch.Tensor:
        if b1 not in cache:
            cache[b1] = simulate(seq, torch.from_numpy(t1), torch.from_numpy(t2), b1,
                                 dtype=torch.float64)
        return cache[b1]

    names = list(tissues)
    tis = np.array([[tissues[k]["t1_ms"], tissues[k]["t2_ms"]] for k in names], dtype=float)
    tis_clean = simulate(seq, torch.from_numpy(tis[:, 0]), torch.from_numpy(tis[:, 1]),
                         dtype=torch.float64)
    for name, est in estimators.items():
        lo, hi = train_noise.get(name, (0.01, 0.01))
        mid = math.sqrt(lo * hi)
        conds = [("noise_low", lo / 2, 1.0), ("noise_high", 2 * hi, 1.0),
                 ("b1_0.8", mid, 0.8), ("b1_1.2", mid, 1.2)]
        for ci, (cond, std, b1) in enumerate(conds):
            sig = _measure(clean_of(b1), np.ones(1), std, seed + 10 + ci)
            pred = np.asarray(est(sig), dtype=np.float64)
            row = {"method": name, "condition": cond, "noise_std": std, "b1": b1, "n": n}
            for j, (q, true) in enumerate((("t1", t1), ("t2", t2))):
                e = pred[:, j] - true
                row[f"{q}_rmse_ms"] = float(np.sqrt(np.mean(e ** 2)))
                row[f"{q}_bias_pct"] = float(100 * np.median(e / true))
            if pred.shape[1] > 2:
                row["b1_rmse_pct"] = float(100 * np.sqrt(np.mean((pred[:, 2] - b1) ** 2)))
            rows.append(row)
        tstd = mid if tissue_noise_std is None else float(tissue_noise_std)
        for pi, pd in enumerate(pd_values):
            x = tis_clean.repeat_interleave(voxels, 0)
            sig = _measure(x, np.full(1, pd), tstd, seed + 100 + pi)
            pred = np.asarray(est(sig), dtype=np.float64).reshape(len(names), voxels, -1)
            for ti, tname in enumerate(names):
                med = np.median(pred[ti], axis=0)  # NaN where an estimate failed
                rows.append({
                    "method": name, "condition": "tissue_pd", "tissue": tname, "pd": pd,
                    "noise_std": tstd, "voxels": voxels,
                    "t1_true_ms": tis[ti, 0], "t2_true_ms": tis[ti, 1],
                    "t1_median_error_pct": float(100 * (med[0] / tis[ti, 0] - 1)),
                    "t2_median_error_pct": float(100 * (med[1] / tis[ti, 1] - 1)),
                })
    return rows
