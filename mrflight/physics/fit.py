"""Maximum-likelihood fit of T1, T2 (and B1) to complex fingerprints, from a starting estimate.

Under the noise model used throughout mrflight (complex Gaussian noise of equal std on the real
and imaginary parts) the maximum-likelihood estimate minimises ``||y - c x(T1, T2, B1)||^2``
over the parameters and the complex scale ``c`` (proton density and phase). :func:`fit` solves
this with Levenberg-Marquardt on the variable-projection form (``c`` eliminated in closed form,
Golub and Pereyra 1973; Kaufman's Jacobian), ``log T1`` and ``log T2`` as the variables, one
call of :func:`mrflight.physics.simulate_jacobian` (the fused value-and-tangent kernel) per
iteration. Started from a network's estimate it lands in the likelihood's nearest minimum: the
estimator whose spread approaches the Cramér-Rao bound as the noise falls, with no prior and no
training noise level in it.

References:
    Golub, Pereyra, The differentiation of pseudo-inverses and nonlinear least squares problems
    whose variables separate, SIAM J Numer Anal 1973. Kaufman, A variable projection method for
    solving separable nonlinear least squares problems, BIT 1975.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from ._inputs import _check_tol
from .checks import count
from .jacobian import simulate_jacobian
from .sequence import Sequence

__all__ = ["fit", "DEFAULT_FIT_BOUNDS"]

#: the box the fit stays in (ms, ms, ratio to nominal); T2 is also kept <= T1
DEFAULT_FIT_BOUNDS = {"t1": (20.0, 8000.0), "t2": (2.0, 3000.0), "b1": (0.5, 1.5)}


def _as_complex(signals) -> torch.Tensor:
    x = signals if torch.is_tensor(signals) else torch.as_tensor(np.asarray(signals))
    if x.ndim == 1:
        x = x.unsqueeze(0)
    if x.ndim != 2:
        raise ValueError(f"signals must have shape (N, T), got {tuple(x.shape)}")
    if not x.is_complex():
        raise ValueError(
            "fit needs complex fingerprints: magnitude data carry Rician noise, which a "
            "least-squares fit of the magnitude would turn into a bias. Reconstruct complex "
            "images (or keep the phase) and fit those")
    return x.to(torch.complex128)


def _check_bounds(bounds) -> dict:
    out = dict(DEFAULT_FIT_BOUNDS)
    for k, v in (bounds or {}).items():
        if k not in out:
            raise ValueError(f"fit bounds take the keys {sorted(out)}, got {k!r}")
        try:
            lo, hi = (float(a) for a in v)
        except (TypeError, ValueError):
            raise ValueError(f"fit bounds[{k!r}] must be a pair (low, high), got {v!r}") from None
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"fit bounds[{k!r}] must be (low, high) with 0 < low < high, "
                             f"got {v!r}")
        out[k] = (lo, hi)
    return out


def _warn_start_in_seconds(p0: torch.Tensor) -> None:
    """Warn when every finite start has T1 below the fit's lowest T1: starts in seconds (or
    swapped columns) would be clamped to the box and fitted from there without a word."""
    t1 = p0[:, 0][torch.isfinite(p0[:, 0]) & (p0[:, 0] > 0)]
    low = DEFAULT_FIT_BOUNDS["t1"][0]
    if t1.numel() and float(t1.max()) < low:
        warnings.warn(f"every start T1 in init is below {low:g} ms (the largest is "
                      f"{float(t1.max()):.4g}): init is T1, T2 in ms (seconds? multiply by "
                      "1000)", UserWarning, stacklevel=3)


def _projected(seq, y, u, b1_fixed, wrt, tol, bounds):
    """Cost, gradient and Gauss-Newton matrix of the variable-projection problem at ``u``
    (``log T1, log T2[, B1]``), and the complex scale."""
    t1, t2 = u[:, 0].exp(), u[:, 1].exp()
    b1 = u[:, 2] if "b1" in wrt else b1_fixed
    x, jac = simulate_jacobian(seq, t1, t2, b1, wrt=wrt, tol=tol, device=y.device,
                               bounds=bounds)
    x, jac = x.to(y.device), jac.to(y.device)
    # derivatives by the variables: d/dlog T = T d/dT
    scale = torch.stack([t1, t2] + ([torch.ones_like(t1)] if "b1" in wrt else []), 1)
    jac = jac * scale[:, None, :].to(jac.dtype)
    xx = (x.conj() * x).real.sum(1)
    c = (x.conj() * y).sum(1) / xx
    r = y - c[:, None] * x
    cost = (r.conj() * r).real.sum(1)
    # Kaufman: the residual's Jacobian is -c P_perp J, P_perp projecting out x
    xj = (x.conj()[:, :, None] * jac).sum(1) / xx[:, None]
    jperp = jac - x[:, :, None] * xj[:, None, :]
    a = (c.abs() ** 2)[:, None, None] * (jperp.conj().transpose(1, 2) @ jperp).real
    g = (c.conj()[:, None] * (jac.conj().transpose(1, 2) @ r[:, :, None])[:, :, 0]).real
    return cost, g, a, c * xx.sqrt()  # the scale of the unit-norm fingerprint


def _clamp(u, lo, hi):
    u = torch.maximum(torch.minimum(u, hi), lo)
    u[:, 1] = torch.minimum(u[:, 1], u[:, 0])  # T2 <= T1
    return u


def fit(seq: Sequence, signals, init, *, estimate_b1: bool = True, b1=None,
        max_iter: int = 20, bounds: dict | None = None, chunk_size: int = 1024,
        tol: float = 1e-4, xtol: float = 1e-4, return_scale: bool = False):
    """Maximum-likelihood T1, T2 (and B1) of complex fingerprints, started from ``init``.

    Args:
        seq: the pulse train the fingerprints were acquired with.
        signals: complex ``(N, T)`` (or ``(T,)``) fingerprints at any scale and global phase
            (numpy or torch; computed where a torch tensor lies: the C kernel on the CPU, the
            Triton kernel on CUDA).
        init: ``(N, 2)`` T1, T2 (ms) or ``(N, 3)`` T1, T2, B1 starting estimates, e.g. a
            network's :meth:`~mrflight.regressor.MRFRegressor.predict_parameters`. Rows with a
            non-finite value are returned as NaN; a start outside ``bounds`` (a T1 or T2 of 0
            or below too) starts at the box's edge.
        estimate_b1: fit B1 as well (from ``init``'s third column, else from ``b1`` or 1);
            ``False`` keeps B1 fixed at ``b1`` (default 1), e.g. a measured B1 map (an
            ``init`` with a B1 column then needs ``b1``: its column is not used).
        b1: B1 (ratio to nominal), a scalar or ``(N,)``.
        max_iter: Levenberg-Marquardt iterations (one value-and-Jacobian simulation each).
        xtol: a signal stops once a kept step changes no parameter by more than this (relative
            for T1 and T2, absolute for B1): 1e-4 is far below any bound at MRF's SNR.
        bounds: ``{"t1": (lo, hi), "t2": (lo, hi), "b1": (lo, hi)}`` replacing entries of
            :data:`DEFAULT_FIT_BOUNDS`; the estimate stays inside them and at T2 <= T1.
        chunk_size: signals fitted at once (memory: about 100 kB per signal for 1750 pulses).
        tol: truncation tolerance of the simulation.
        return_scale: also return the fitted complex scale ``c`` (``signals ~ c x / ||x||``
            with ``x`` the simulated fingerprint): ``|c|`` is the proton density map's value.

    Returns:
        float64 ``(N, P)`` on the CPU, ``P = 3`` with ``estimate_b1`` else 2 (T1 ms, T2 ms[,
        B1]); with ``return_scale`` also complex128 ``(N,)``.

    Raises:
        ValueError: real (magnitude) signals, NaN or Inf in them, shapes that do not match,
            bad bounds or ``max_iter < 1``; an ``(N, 3)`` ``init`` with ``estimate_b1=False``
            and no ``b1``. All-zero signals get NaN, with a warning; starts whose T1 are all
            below 20 ms (seconds?) get a warning.
    """
    if not isinstance(seq, Sequence):
        raise ValueError(f"seq must be a Sequence (Sequence.from_dict(d) for a dict), got "
                         f"{type(seq).__name__}")
    _check_tol(tol)
    _check_tol(xtol, "xtol")
    y_all = _as_complex(signals)
    if y_all.shape[1] != len(seq):
        raise ValueError(f"signals have {y_all.shape[1]} time points but the sequence "
                         f"{seq.name!r} has {len(seq)}")
    n = y_all.shape[0]
    bad = ~torch.isfinite(torch.view_as_real(y_all)).all(-1).all(1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"signals hold NaN or Inf values ({int(bad.sum())} signal(s), e.g. rows "
                         f"{rows}): leave those voxels out (a mask) before fitting")
    zero = ~(y_all != 0).any(1).cpu()
    if bool(zero.any()):
        warnings.warn(f"{int(zero.sum())} all-zero signal(s) cannot be fitted: their parameters "
                      "are NaN", RuntimeWarning, stacklevel=2)
    p0 = torch.as_tensor(np.asarray(init) if not torch.is_tensor(init) else init)
    p0 = p0.detach().to("cpu", torch.float64, copy=True)
    if p0.ndim == 1:
        p0 = p0.unsqueeze(0)
    if p0.ndim != 2 or p0.shape[0] != n or p0.shape[1] not in (2, 3):
        raise ValueError(f"init must have shape (N, 2) or (N, 3) with N = {n} signals, got "
                         f"{tuple(p0.shape)}")
    max_iter = count(max_iter, "max_iter")
    box = _check_bounds(bounds)
    wrt = ("t1", "t2", "b1") if estimate_b1 else ("t1", "t2")
    b1_in = torch.ones(n, dtype=torch.float64) if b1 is None else \
        torch.as_tensor(b1, dtype=torch.float64).detach().cpu().reshape(-1)
    if b1_in.numel() not in (1, n):
        raise ValueError(f"b1 must be a scalar or have one value per signal ({n}), got "
                         f"{b1_in.numel()} values")
    b1_in = b1_in.expand(n).clone()
    chunk_size = count(chunk_size, "chunk_size")
    if estimate_b1 and p0.shape[1] == 3:
        b1_in = p0[:, 2].clone()
    if not estimate_b1 and p0.shape[1] == 3 and b1 is None:
        raise ValueError("init has a B1 column but estimate_b1=False and no b1 was given: "
                         "pass b1=init[:, 2] to hold B1 at those values, or init[:, :2] to "
                         "hold it at 1 (the third column would otherwise be ignored)")
    _warn_start_in_seconds(p0)
    lo = torch.tensor([math.log(box["t1"][0]), math.log(box["t2"][0]), box["b1"][0]],
                      dtype=torch.float64)[:len(wrt)]
    hi = torch.tensor([math.log(box["t1"][1]), math.log(box["t2"][1]), box["b1"][1]],
                      dtype=torch.float64)[:len(wrt)]
    truncation = {"t1_max": box["t1"][1], "t2_max": box["t2"][1], "b1_range": box["b1"]}
    out = torch.full((n, len(wrt)), float("nan"), dtype=torch.float64)
    scale_out = torch.full((n,), complex("nan"), dtype=torch.complex128)
    ok = torch.isfinite(p0).all(1) & torch.isfinite(b1_in) & ~zero
    # a start of T1 or T2 <= 0 is outside the box like any other: it starts at the box's edge
    p0[:, :2] = p0[:, :2].clamp_min(torch.finfo(torch.float64).tiny)
    idx = ok.nonzero().flatten()
    dev = y_all.device
    for s in range(0, idx.numel(), int(chunk_size)):
        rows = idx[s: s + int(chunk_size)]
        y = y_all[rows.to(dev)]
        u = torch.stack([p0[rows, 0].log(), p0[rows, 1].log()]
                        + ([b1_in[rows]] if estimate_b1 else []), 1)
        u = _clamp(u, lo, hi).to(dev)
        fixed = None if estimate_b1 else b1_in[rows].to(dev)
        u, c = _levenberg_marquardt(seq, y, u, fixed, wrt, tol, truncation, lo.to(dev),
                                    hi.to(dev), int(max_iter), float(xtol))
        est = u.cpu().clone()
        est[:, :2] = est[:, :2].exp()
        out[rows] = est
        scale_out[rows] = c.cpu()
    return (out, scale_out) if return_scale else out


def _levenberg_marquardt(seq, y, u, b1_fixed, wrt, tol, truncation, lo, hi, max_iter, xtol):
    """Per-signal Levenberg-Marquardt: a step is kept only where it lowers the cost."""
    cost, g, a, c = _projected(seq, y, u, b1_fixed, wrt, tol, truncation)
    lam = torch.full_like(cost, 1e-3)
    active = torch.ones_like(cost, dtype=torch.bool)
    eye = torch.eye(u.shape[1], dtype=u.dtype, device=u.device)
    for _ in range(max_iter):
        act = active.nonzero().flatten()
        if act.numel() == 0:
            break
        diag = torch.diagonal(a[act], dim1=1, dim2=2).clamp_min(1e-300)
        damped = a[act] + lam[act, None, None] * diag[:, :, None] * eye
        step = torch.linalg.solve(damped, g[act][:, :, None])[:, :, 0]
        trial = _clamp(u[act] + step, lo, hi)
        fixed = None if b1_fixed is None else b1_fixed[act]
        t_cost, t_g, t_a, t_c = _projected(seq, y[act], trial, fixed, wrt, tol, truncation)
        better = t_cost < cost[act]
        keep = act[better]
        moved = (trial[better] - u[keep]).abs().amax(1)
        u[keep], cost[keep], g[keep], a[keep], c[keep] = (
            trial[better], t_cost[better], t_g[better], t_a[better], t_c[better])
        lam[keep] = (lam[keep] / 3).clamp_min(1e-9)
        worse = act[~better]
        lam[worse] = lam[worse] * 4
        active[keep[moved < xtol]] = False
        active[worse[lam[worse] > 1e6]] = False
    return u, c
