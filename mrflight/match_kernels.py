"""Candidate atoms of dictionary matching without the score matrix: every signal's best score and
every (signal, atom) pair whose score is within a margin of it.

Scores are those of :class:`~mrflight.matching.DictionaryMatcher`: ``<a, s>`` (real) or
``|<a, s>| = |sum conj(a_k) s_k|`` (complex), for signals ``s`` ``(n, K)`` and atoms ``a``
``(M, K)`` (an SVD basis makes ``K`` the rank, e.g. 25). On CUDA (or any device under
``TRITON_INTERPRET=1``) Triton kernels (:mod:`mrflight._match_triton`, imported lazily) compute
them tile by tile in registers; elsewhere, or without Triton, or with ``MRFLIGHT_NO_TRITON=1``, a
chunked pure-torch reference with the same semantics does.

``precision`` is the arithmetic of the float32 products: ``"ieee"`` (float32 FMAs), ``"tf32"``
(inputs rounded to TF32's 10 mantissa bits, tensor cores) or ``"tf32x3"`` (Triton's 3xTF32: each
input split into two TF32 parts, three products). The torch reference computes exactly these
(TF32 rounding emulated, round to nearest with ties away like ``cvt.rna.tf32.f32``), so a CPU run
shows the same errors as the GPU. Triton's interpreter ignores ``input_precision`` (float32).

Error bound (:func:`error_bound`), with ``u = 2^-24``, ``d = 2^-10`` (TF32 rounding, relative,
truncation-safe), ``k`` the real products per dot (``K``; complex ``2K``):
``|computed - exact| <= beta * ||s|| * ||a||`` where the accumulation of ``k`` products costs
``gamma_k ~ k u`` with round-to-nearest FMAs (ieee: Triton's FMA loop, ``enable_fp_fusion`` pinned
at every launch as Triton 3.10 turns it off by default; BLAS on the CPU) and
``2 k u`` on tensor cores (a factor 2 for their truncating, unspecified-order accumulation), times
``sum |s_j a_j| <= ||s|| ||a||`` (Cauchy-Schwarz), and

* ieee: ``beta = k u``;
* tf32: ``beta = 2 d + d^2 + 2 k u`` (each product of two rounded inputs is off by ``2d + d^2``);
* tf32x3: ``beta = 4 d^2 + 6 k u`` (``x = hi + lo + rho``, ``|rho| <= d^2 |x|``; the dropped
  ``lo*lo`` and ``rho`` terms total ``< 3.01 d^2``; ``3k`` products accumulated);
* complex: ``sqrt(2) beta`` (real and imaginary parts each within ``beta``), plus the rounding of
  the squared magnitude and of its square root.

:func:`candidate_pairs` turns this into a guarantee: with ``delta_i`` the bound for signal ``i``
(``||s_i|| max_j ||a_j||`` times ``beta``, with 1 % and ``8u`` of slack), the computed maximum
``R_i`` is within ``delta_i`` of the exact one ``E_i``, so every atom whose exact score is
``>= E_i - eps`` has a computed score ``>= R_i - eps - 2 delta_i``; the threshold is that, rounded
down to float32. The pairs returned are a superset of the pairs within ``eps`` of the exact
maximum of the *given* float32 inputs (a caller that re-scores a slightly different score, e.g.
atoms renormalised in float64, adds that difference to ``eps``).
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

from mrflight.physics._triton_glue import LazyKernel

__all__ = ["PRECISIONS", "error_bound", "row_max", "candidates", "candidate_pairs",
           "CandidatePairs", "pair_scores", "triton_available"]

PRECISIONS = ("ieee", "tf32x3", "tf32")
_U = 2.0 ** -24
_D = 2.0 ** -10
#: (BM signals, BN atoms, warps, pipeline stages) per program and tile: real, complex (two
#: accumulators); not tuned on a GPU
_TILES = {False: (128, 128, 8, 3), True: (128, 64, 8, 3)}
#: elements of one score block of the torch reference
_REF_BLOCK = 2 ** 22


class CandidatePairs(NamedTuple):
    """Result of :func:`candidate_pairs`: ``rows``/``cols`` (int64, sorted by row then atom),
    ``row_max`` ``(n,)`` float32 computed best scores, ``margin`` ``(n,)`` float64 (``eps`` plus
    twice the error bound: the pairs are those with computed score ``>= row_max - margin``)."""

    rows: torch.Tensor
    cols: torch.Tensor
    row_max: torch.Tensor
    margin: torch.Tensor


def error_bound(precision: str, k: int, complex_: bool = False) -> float:
    """``beta``: ``|computed - exact score| <= beta ||s|| ||a||`` for ``k`` (the rank ``K``)
    coefficients at ``precision`` (see the module docstring for the derivation)."""
    _check_precision(precision)
    terms = 2 * k if complex_ else k
    acc = 2 * terms * _U  # tensor cores
    beta = {"ieee": acc / 2, "tf32": 2 * _D + _D ** 2 + acc, "tf32x3": 4 * _D ** 2 + 3 * acc}
    out = beta[precision] * (math.sqrt(2.0) if complex_ else 1.0) + 8 * _U
    return 1.01 * out


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


# ---------------------------------------------------------------------------------- dispatch
_TRITON = LazyKernel("mrflight._match_triton")


def _kernels():
    """The Triton kernels module, or ``None`` (no triton, or ``MRFLIGHT_NO_TRITON=1``)."""
    return _TRITON.get()


def triton_available(device) -> bool:
    """Whether the Triton kernels serve tensors on ``device`` (CUDA, or any device under
    ``TRITON_INTERPRET=1``)."""
    interp = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")
    return (torch.device(device).type == "cuda" or interp) and _kernels() is not None


def _use_triton(device, backend: str | None) -> bool:
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    if backend == "triton" and not triton_available(device):
        raise ValueError(f"backend='triton' is not available on {device} (needs triton and "
                         "CUDA, or TRITON_INTERPRET=1); use backend=None or 'torch'")
    return backend == "triton" or (backend is None and triton_available(device))


def _split_inputs(s, a, complex_: bool):
    """float32 ``S`` ``(n, k)`` and atom matrices ``[A]`` or ``[A_re, A_im]`` ``(M, k)`` with
    ``Re <a, s> = S A_re^T``, ``Im <a, s> = S A_im^T`` (``k = 2K`` for complex)."""
    if s.ndim != 2 or a.ndim != 2 or s.shape[1] != a.shape[1]:
        raise ValueError(f"signals (n, K) and atoms (M, K) must share K, got {tuple(s.shape)} "
                         f"and {tuple(a.shape)}")
    if s.device != a.device:
        raise ValueError(f"signals are on {s.device} and atoms on {a.device}; move one")
    if complex_ != s.is_complex() or complex_ != a.is_complex():
        raise ValueError("complex_=True needs complex signals and atoms, complex_=False real "
                         f"ones; got {s.dtype} and {a.dtype}")
    if not complex_:
        return s.float(), [a.float()]
    s, a = s.to(torch.complex64), a.to(torch.complex64)
    return (torch.cat([s.real, s.imag], 1),
            [torch.cat([a.real, a.imag], 1), torch.cat([-a.imag, a.real], 1)])


# ---------------------------------------------------------------------- torch reference
def _round_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32 (10 mantissa bits, nearest, ties away; Inf/NaN kept)."""
    b = x.float().contiguous().view(torch.int32)
    r = (b + 0x1000) & -0x2000
    return torch.where((b & 0x7F800000) == 0x7F800000, b, r).view(torch.float32)


def _products(x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """``x @ y^T`` in float32 with the inputs treated as ``precision`` does."""
    from .matching import float32_matmul

    with float32_matmul(x.device, "ieee"):
        if precision == "ieee":
            return x @ y.T
        xh, yh = _round_tf32(x), _round_tf32(y)
        if precision == "tf32":
            return xh @ yh.T
        xl, yl = _round_tf32(x - xh), _round_tf32(y - yh)
        return (xl @ yh.T + xh @ yl.T) + xh @ yh.T


def _ref_scores(s, mats, precision):
    """Scores of a block (complex: squared magnitudes), float32, as the kernels compute them."""
    sc = _products(s, mats[0], precision)
    if len(mats) == 2:
        im = _products(s, mats[1], precision)
        sc = sc * sc + im * im
    return sc


def _ref_blocks(n: int, m: int):
    bm = max(1, min(m, _REF_BLOCK // max(1, min(n, 1024))))
    bs = max(1, min(n, _REF_BLOCK // bm))
    for i in range(0, n, bs):
        for j in range(0, m, bm):
            yield slice(i, i + bs), slice(j, j + bm)


def _ref_row_max(s, mats, precision):
    out = torch.full((s.shape[0],), -math.inf, dtype=torch.float32, device=s.device)
    for ri, cj in _ref_blocks(s.shape[0], mats[0].shape[0]):
        sc = _ref_scores(s[ri], [x[cj] for x in mats], precision)
        out[ri] = torch.maximum(out[ri], sc.amax(1))
    return out


def _ref_candidates(s, mats, thr, capacity, precision):
    rows, cols = [], []
    for ri, cj in _ref_blocks(s.shape[0], mats[0].shape[0]):
        sc = _ref_scores(s[ri], [x[cj] for x in mats], precision)
        r, c = torch.nonzero(sc >= thr[ri, None], as_tuple=True)
        rows.append((r + ri.start).int())
        cols.append((c + cj.start).int())
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int32, device=s.device)
    cols = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int32, device=s.device)
    return rows[:capacity], cols[:capacity], rows.numel()


# ------------------------------------------------------------------------- triton path
def _layout(s, mats, complex_, tiles, splits):
    """Padded signals ``(n, KP)``, atoms ``(P, KP, m_pad)`` (padded with copies of atom 0),
    the atoms per split and the tile sizes."""
    blocks = tiles or _TILES[complex_]
    bm, bn = blocks[:2]
    n, k = s.shape
    m = mats[0].shape[0]
    kp = max(16, 1 << (k - 1).bit_length())
    n_tiles = -(-m // bn)
    if splits is None:
        sms = (torch.cuda.get_device_properties(s.device).multi_processor_count
               if s.device.type == "cuda" else 1)
        splits = -(-2 * sms // -(-n // bm))  # about two programs per SM
    per_split = bn * -(-n_tiles // max(1, min(splits, n_tiles)))
    m_pad = per_split * -(-m // per_split)
    sp = torch.zeros(n, kp, dtype=torch.float32, device=s.device)
    sp[:, :k] = s
    ap = torch.zeros(len(mats), kp, m_pad, dtype=torch.float32, device=s.device)
    for p, x in enumerate(mats):
        ap[p, :k, :m] = x.T
        ap[p, :k, m:] = x[:1].T
    return sp, ap, dict(m_pad=m_pad, per_split=per_split, blocks=blocks, complex_=complex_)


def _f32_down(x: torch.Tensor) -> torch.Tensor:
    """float64 to the largest float32 not above it (so a threshold never moves up)."""
    y = x.float()
    return torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, -math.inf)), y)


# ------------------------------------------------------------------------------- public
def row_max(s: torch.Tensor, a: torch.Tensor, *, complex_: bool = False,
            precision: str = "ieee", backend: str | None = None, tiles=None,
            splits: int | None = None) -> torch.Tensor:
    """Every signal's best score over the atoms, without materialising the score matrix.

    Args:
        s: signals ``(n, K)``, float (real) or complex (``complex_=True``).
        a: atoms ``(M, K)``, same kind and device as ``s``.
        complex_: score ``|<a, s>|`` instead of ``<a, s>``.
        precision: ``"ieee"``, ``"tf32x3"`` or ``"tf32"`` (see :func:`error_bound`).
        backend: ``None`` (Triton where available, else torch), ``"triton"`` or ``"torch"``.
        tiles, splits: Triton tile sizes ``(BM, BN, warps, stages)`` and atom splits (tests,
            tuning; default: per kind, about two programs per SM).

    Returns:
        ``(n,)`` float32 (``-inf`` when there are no atoms).
    """
    _check_precision(precision)
    return _row_max(_prepare(s, a, complex_, backend, tiles, splits), precision)


class _Prepared(NamedTuple):
    """Inputs in the form the kernels (``lay``: padded layout) or the reference read."""

    sf: torch.Tensor
    mats: list
    complex_: bool
    lay: tuple | None  # (signals, atoms, layout keywords) for Triton, None for the reference


def _prepare(s, a, complex_, backend, tiles, splits) -> _Prepared:
    """Split and (for Triton) pad the inputs once, for any number of kernel passes."""
    sf, mats = _split_inputs(s, a, complex_)
    triton = sf.shape[0] > 0 and mats[0].shape[0] > 0 and _use_triton(s.device, backend)
    lay = _layout(sf, mats, complex_, tiles, splits) if triton else None
    return _Prepared(sf, mats, complex_, lay)


def _row_max(prep: _Prepared, precision: str) -> torch.Tensor:
    if prep.lay is None:
        out = _ref_row_max(prep.sf, prep.mats, precision)
    else:
        sp, ap, lay = prep.lay
        out = torch.full((sp.shape[0],), -math.inf, dtype=torch.float32, device=sp.device)
        _kernels().launch_row_max(sp, ap, out, precision=precision, **lay)
    return out.sqrt() if prep.complex_ else out


def _candidates(prep: _Prepared, threshold: torch.Tensor, capacity: int, precision: str):
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    sf, mats, complex_ = prep.sf, prep.mats, prep.complex_
    thr = threshold.to(device=sf.device, dtype=torch.float64).reshape(-1)
    if thr.numel() != sf.shape[0]:
        raise ValueError(f"threshold has {thr.numel()} values for {sf.shape[0]} signals")
    thr = _f32_down(thr.clamp_min(0) ** 2 if complex_ else thr)
    if prep.lay is None:
        rows, cols, total = _ref_candidates(sf, mats, thr, capacity, precision)
    else:
        sp, ap, lay = prep.lay
        rows, cols, total = _kernels().launch_candidates(sp, ap, thr, capacity,
                                                         m=mats[0].shape[0], precision=precision,
                                                         **lay)
        total = int(total)
        rows, cols = rows[:min(total, capacity)], cols[:min(total, capacity)]
    return rows, cols, max(0, total - capacity)


def candidates(s: torch.Tensor, a: torch.Tensor, threshold: torch.Tensor, *,
               complex_: bool = False, precision: str = "ieee", capacity: int,
               backend: str | None = None, tiles=None, splits: int | None = None):
    """Every pair ``(i, j)`` with ``score(i, j) >= threshold[i]`` (computed at ``precision``).

    Args:
        s, a, complex_, precision, backend, tiles, splits: as :func:`row_max`.
        threshold: ``(n,)`` per-signal thresholds in score units (rounded down to float32).
        capacity: pairs the output buffers hold.

    Returns:
        ``(rows, cols, overflow)``: int32 ``(min(found, capacity),)`` (Triton: in no particular
        order) and ``overflow`` (int) the pairs that did not fit; rerun with
        ``capacity + overflow`` to get them all.
    """
    _check_precision(precision)
    return _candidates(_prepare(s, a, complex_, backend, tiles, splits), threshold, capacity,
                       precision)


def candidate_pairs(s: torch.Tensor, a: torch.Tensor, eps: float, *, complex_: bool = False,
                    precision: str = "ieee", capacity: int | None = None,
                    max_pairs: int = 2 ** 28, backend: str | None = None, tiles=None,
                    splits: int | None = None) -> CandidatePairs:
    """A superset of the pairs whose exact score is within ``eps`` of their signal's exact best.

    Runs :func:`row_max`, then :func:`candidates` with ``threshold = row_max - eps - 2 delta``
    (``delta``: :func:`error_bound` times ``||s_i|| max_j ||a_j||``), retrying once with the
    exact capacity when the first guess (``capacity``, default ``8 n + 1024``) overflows.
    All-zero signals (every atom ties at 0) get no pairs.

    Args:
        s, a, complex_, precision, backend, tiles, splits: as :func:`row_max`.
        eps: the score margin (>= 0) in the scores' units.
        capacity: first guess of the number of pairs.
        max_pairs: refuse to allocate more pairs than this.

    Raises:
        ValueError: non-finite inputs, negative ``eps``, or more than ``max_pairs`` pairs.
    """
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(a).all())):
        raise ValueError("signals or atoms contain NaN or Inf; mask those out first")
    _check_precision(precision)
    prep = _prepare(s, a, complex_, backend, tiles, splits)  # once for both passes
    best = _row_max(prep, precision)
    n, m = s.shape[0], a.shape[0]
    a_norm = float(torch.linalg.vector_norm(a.to(torch.complex128 if complex_ else torch.float64),
                                            dim=1).max()) if m else 0.0
    nu = torch.linalg.vector_norm(s.to(torch.complex128 if complex_ else torch.float64), dim=1)
    margin = eps + 2 * (error_bound(precision, s.shape[1], complex_) * nu * a_norm + 1e-30)
    thr = torch.where(nu > 0, best.double() - margin, torch.full_like(margin, math.inf))
    cap = 8 * n + 1024 if capacity is None else capacity
    rows, cols, over = _candidates(prep, thr, cap, precision)
    if over:
        if cap + over > max_pairs:
            raise ValueError(f"{cap + over} candidate pairs exceed max_pairs={max_pairs}: "
                             "lower eps, use a more precise `precision`, match fewer signals "
                             "at once, or raise max_pairs")
        rows, cols, over = _candidates(prep, thr, cap + over, precision)
    key = torch.sort(rows.long() * m + cols.long()).values
    return CandidatePairs(key // max(m, 1), key % max(m, 1), best, margin)


def pair_scores(s: torch.Tensor, a: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, *,
                backend: str | None = None) -> torch.Tensor:
    """``<a_cols, s_rows>`` of every pair in float64 (complex128 for complex inputs).

    For float32 (complex64) inputs each product is exact in float64 and the sums are float64,
    so the result is within a few float64 roundings of the exact score of the given inputs
    whatever the device (used to re-score candidates). On CUDA one Triton kernel reads each
    pair's two rows once; elsewhere, and for float64 inputs, chunked torch.

    Args:
        s: ``(n, T)`` signals; a: ``(M, T)`` atoms (one dtype).
        rows, cols: ``(P,)`` integer indices into ``s`` and ``a``.
        backend: as :func:`row_max`.
    """
    if s.dtype != a.dtype:
        raise ValueError(f"pair_scores needs signals and atoms of one dtype, got {s.dtype} and "
                         f"{a.dtype}")
    cplx = s.is_complex()
    single = s.dtype in (torch.float32, torch.complex64)
    if single and _use_triton(s.device, backend):
        view = torch.view_as_real if cplx else (lambda x: x)
        out = _kernels().launch_pair_scores(view(s.contiguous()), view(a.contiguous()),
                                            rows.contiguous(), cols.contiguous(),
                                            complex_=cplx)
        return torch.view_as_complex(out) if cplx else out[:, 0].contiguous()
    hi = torch.complex128 if cplx else torch.float64
    out = torch.empty(len(rows), dtype=hi, device=s.device)
    # pairs per chunk: a few MB on a CPU; larger on a GPU (each chunk is a few launches)
    step = max(1, (2**19 if s.device.type != "cuda" else 2**24) // max(1, s.shape[1]))
    for k in range(0, len(rows), step):
        prod = a[cols[k: k + step]].conj().to(hi) * s[rows[k: k + step]].to(hi)
        torch.sum(prod, dim=1, out=out[k: k + step])
    return out
