"""Parameter grids: T1/T2 pairs (``np.ndarray`` float64, shape ``(M, 2)``, T1 ms, T2 ms).

* :func:`paper_grid` -- the grid of Oksuz et al. 2019 (about 115 000 atoms).
* :func:`regular_grid` -- a linear or logarithmic T1 x T2 mesh.
* :func:`random_params` -- uniform or log-uniform random draws with a seed.
"""

from __future__ import annotations

import numpy as np

from mrflight.physics.checks import count, is_number

__all__ = ["paper_grid", "regular_grid", "random_params"]


def _arange_incl(start: float, stop: float, step: float) -> np.ndarray:
    n = int(round((stop - start) / step))
    return start + step * np.arange(n + 1, dtype=np.float64)


def _pairs(t1: np.ndarray, t2: np.ndarray, t2_le_t1: bool) -> np.ndarray:
    g1, g2 = np.meshgrid(t1, t2, indexing="ij")
    out = np.stack([g1.ravel(), g2.ravel()], axis=1)
    if t2_le_t1:
        out = out[out[:, 1] <= out[:, 0]]
    return np.ascontiguousarray(out, dtype=np.float64)


def paper_grid() -> np.ndarray:
    """The T1/T2 dictionary grid of Oksuz et al. 2019.

    T1 = 0:2:500, 500:5:1000, 1000:10:2000, 2000:50:4000 ms (inclusive ends, the duplicated
    values at the joins kept once: 491 values); T2 = 0:1:100, 100:2:500 ms (301 values); only
    pairs with T2 <= T1 are kept.

    Zero entries: with T2 = 0 the transverse magnetisation has decayed completely at every echo
    (TE > 0), so the fingerprint is identically zero and cannot be normalised (nor matched).
    Every atom with T2 = 0 is therefore dropped -- and with it T1 = 0, whose only partner under
    T2 <= T1 is T2 = 0. The smallest entries are T1 = 2 ms and T2 = 1 ms. 114 650 atoms remain
    (the paper's "about 115 000").

    Returns:
        ``np.ndarray`` float64, shape ``(114650, 2)``: columns T1 ms, T2 ms, sorted by T1 then T2.

    References:
        Oksuz I, et al. Magnetic resonance fingerprinting using recurrent neural networks.
        ISBI 2019, section 3.
    """
    t1 = np.unique(np.round(np.concatenate([
        _arange_incl(0, 500, 2), _arange_incl(500, 1000, 5),
        _arange_incl(1000, 2000, 10), _arange_incl(2000, 4000, 50),
    ]), 9))
    t2 = np.unique(np.round(np.concatenate([_arange_incl(0, 100, 1),
                                            _arange_incl(100, 500, 2)]), 9))
    out = _pairs(t1, t2, t2_le_t1=True)
    return np.ascontiguousarray(out[out[:, 1] > 0])


def _positive(name: str, value, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {bound} number (ms), got {value!r}")
    return v


def regular_grid(
    t1_min: float = 10.0,
    t1_max: float = 4000.0,
    n_t1: int = 100,
    t2_min: float = 2.0,
    t2_max: float = 500.0,
    n_t2: int = 100,
    spacing: str = "linear",
    t2_le_t1: bool = True,
) -> np.ndarray:
    """A regular T1 x T2 mesh, linear or logarithmic in each axis.

    Args:
        t1_min, t1_max: T1 range, ms, ends included (``t1_min`` >= 0; > 0 for ``"log"``).
        n_t1: number of T1 values (1 gives ``t1_min`` alone).
        t2_min, t2_max: T2 range, ms, ends included. ``t2_min`` must be > 0: T2 = 0 gives an
            all-zero fingerprint that cannot be normalised (see :func:`paper_grid`).
        n_t2: number of T2 values.
        spacing: ``"linear"`` (``np.linspace``) or ``"log"`` (``np.geomspace``).
        t2_le_t1: keep only pairs with T2 <= T1 (the physical constraint).

    Returns:
        ``np.ndarray`` float64, shape ``(M, 2)``: T1 ms, T2 ms, sorted by T1 then T2;
        ``M <= n_t1 * n_t2``.

    Raises:
        ValueError: a bad argument (named in the message), or no pair left with T2 <= T1.
    """
    if spacing not in ("linear", "log"):
        raise ValueError(f"spacing must be 'linear' or 'log', got {spacing!r}")
    log = spacing == "log"
    t1_min = _positive("t1_min", t1_min, allow_zero=not log)
    t1_max = _positive("t1_max", t1_max, allow_zero=not log)
    t2_min = _positive("t2_min", t2_min)
    t2_max = _positive("t2_max", t2_max)
    n_t1, n_t2 = count(n_t1, "n_t1"), count(n_t2, "n_t2")
    for lo, hi, a, b in ((t1_min, t1_max, "t1_min", "t1_max"), (t2_min, t2_max, "t2_min",
                                                                 "t2_max")):
        if hi < lo:
            raise ValueError(f"{b}={hi} is below {a}={lo}: swap them")
    space = np.geomspace if log else np.linspace
    t1 = space(t1_min, t1_max, n_t1) if n_t1 > 1 else np.array([t1_min])
    t2 = space(t2_min, t2_max, n_t2) if n_t2 > 1 else np.array([t2_min])
    out = _pairs(t1, t2, bool(t2_le_t1))
    if len(out) == 0:
        raise ValueError(
            f"no (T1, T2) pair with T2 <= T1: t2_min={t2_min} exceeds t1_max={t1_max}; "
            "lower t2_min, raise t1_max, or pass t2_le_t1=False"
        )
    return out


def _range(name: str, value, log: bool) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) in ms, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0 or hi < lo:
        raise ValueError(
            f"{name} must satisfy 0 < low <= high (ms), got {value!r}"
            + (" (log-uniform draws need low > 0)" if log else "")
        )
    return lo, hi


def random_params(
    n: int,
    t1_range=(2.0, 4000.0),
    t2_range=(1.0, 500.0),
    distribution: str = "uniform",
    seed: int = 0,
    t2_le_t1: bool = True,
) -> np.ndarray:
    """Random T1/T2 pairs, uniform or log-uniform in each parameter, reproducible by ``seed``.

    With ``t2_le_t1`` the draws are rejection-sampled: pairs with T2 > T1 are discarded and
    drawn again, so the result is the joint distribution restricted to T2 <= T1 and has exactly
    ``n`` rows.

    Args:
        n: number of pairs.
        t1_range: ``(low, high)`` T1 bounds, ms, ``0 < low <= high``.
        t2_range: ``(low, high)`` T2 bounds, ms, ``0 < low <= high`` (T2 = 0 would give an
            all-zero fingerprint).
        distribution: ``"uniform"`` or ``"log-uniform"`` (uniform in log T1 and log T2).
        seed: seed of a ``numpy.random.default_rng`` stream; the same seed gives the same pairs.
        t2_le_t1: enforce T2 <= T1.

    Returns:
        ``np.ndarray`` float64, shape ``(n, 2)``: T1 ms, T2 ms, in draw order.

    Raises:
        ValueError: a bad argument, or ranges with no (or almost no) pair with T2 <= T1.
    """
    n = count(n, "n")
    if distribution not in ("uniform", "log-uniform"):
        raise ValueError(f"distribution must be 'uniform' or 'log-uniform', got {distribution!r}")
    log = distribution == "log-uniform"
    r1, r2 = _range("t1_range", t1_range, log), _range("t2_range", t2_range, log)
    if not is_number(seed, whole=True):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if t2_le_t1 and r2[0] >= r1[1] and not (r2[0] == r2[1] == r1[1]):
        raise ValueError(
            f"t2_range={r2} lies entirely above t1_range={r1}: no pair has T2 <= T1; "
            "lower t2_range or pass t2_le_t1=False"
        )
    return _rejection_sample(np.random.default_rng(int(seed)), n, r1, r2, log, t2_le_t1)


def _uniform(rng: np.random.Generator, lo: float, hi: float, k: int, log: bool) -> np.ndarray:
    if log:
        return np.exp(rng.uniform(np.log(lo), np.log(hi), k))
    return rng.uniform(lo, hi, k)


def _rejection_sample(rng, n: int, r1, r2, log: bool, t2_le_t1: bool) -> np.ndarray:
    """``n`` pairs drawn in batches, those with T2 > T1 discarded when ``t2_le_t1``."""
    out = np.empty((0, 2))
    for _ in range(10_000):
        k = max(2 * (n - len(out)), 64)
        batch = np.stack([_uniform(rng, *r1, k, log), _uniform(rng, *r2, k, log)], axis=1)
        if t2_le_t1:
            batch = batch[batch[:, 1] <= batch[:, 0]]
        out = np.concatenate([out, batch])[:n]
        if len(out) == n:
            return np.ascontiguousarray(out, dtype=np.float64)
    raise ValueError(
        f"t1_range={r1} and t2_range={r2} overlap too little: almost no draw has T2 <= T1"
    )
