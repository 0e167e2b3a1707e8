"""Triton kernels of :mod:`mrflight.match_kernels`: the best score of every signal and the
(signal, atom) pairs above a per-signal threshold, tile by tile, never writing the score matrix.

Layout (prepared by :mod:`mrflight.match_kernels`): signals ``S`` ``(n, KP)`` row-major, atoms
transposed ``(P, KP, m_pad)`` (``P = 1`` real; ``P = 2`` complex: the real and imaginary parts of
``<a, s>`` are ``S @ A[0]`` and ``S @ A[1]`` with ``S = [Re s, Im s]``, ``A[0] = [Re a, Im a]^T``,
``A[1] = [-Im a, Re a]^T``), ``K`` zero-padded to ``KP`` (a power of two >= 16, as ``tl.dot``
needs). Complex kernels work with the squared magnitude (no square root per score).

Grid: ``(row blocks of BM signals, splits of the atoms)``; a program loads its ``BM`` signals once
and loops over its share of the atoms ``BN`` at a time. The row maximum is merged across splits
with one ``atomic_max`` per signal and program; candidates go to flat buffers through one
``atomic_add`` on a global int64 counter per tile that has any (their slots in the tile follow a
per-row and a per-block prefix sum, so one tile's pairs are contiguous and ordered).

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors
through Triton's interpreter, whose ``tl.dot`` is a float32 ``numpy.matmul`` whatever
``input_precision`` says (triton 3.x ``interpreter.create_dot``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["launch_row_max", "launch_candidates", "launch_pair_scores"]


@triton.jit
def _tile(s, a_ptr, k, cols, m_pad, KP: tl.constexpr, COMPLEX: tl.constexpr,
          PREC: tl.constexpr):
    """Scores of a tile: ``S A`` (real), or ``|S A|^2`` from two products (complex)."""
    a = tl.load(a_ptr + k[:, None] * m_pad + cols[None, :])
    sc = tl.dot(s, a, input_precision=PREC)
    if COMPLEX:
        a2 = tl.load(a_ptr + (k[:, None] + KP) * m_pad + cols[None, :])
        im = tl.dot(s, a2, input_precision=PREC)
        sc = sc * sc + im * im
    return sc


@triton.jit
def _load_signals(s_ptr, pid, n, BM: tl.constexpr, KP: tl.constexpr):
    rows = pid * BM + tl.arange(0, BM)
    k = tl.arange(0, KP)
    s = tl.load(s_ptr + rows[:, None] * KP + k[None, :], mask=rows[:, None] < n, other=0.0)
    return rows, k, s


@triton.jit
def _row_max_kernel(s_ptr, a_ptr, out_ptr, n, m_pad, per_split, KP: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, COMPLEX: tl.constexpr,
                    PREC: tl.constexpr):
    rows, k, s = _load_signals(s_ptr, tl.program_id(0), n, BM, KP)
    best = tl.full([BM], -float("inf"), tl.float32)
    start = tl.program_id(1) * per_split
    # atoms are padded with copies of atom 0 up to m_pad: no column mask needed for a maximum
    for j0 in range(start, start + per_split, BN):
        sc = _tile(s, a_ptr, k, j0 + tl.arange(0, BN), m_pad, KP, COMPLEX, PREC)
        best = tl.maximum(best, tl.max(sc, axis=1))
    tl.atomic_max(out_ptr + rows, best, mask=rows < n)


@triton.jit
def _candidates_kernel(s_ptr, a_ptr, thr_ptr, rows_ptr, cols_ptr, count_ptr, n, m, m_pad,
                       per_split, capacity, KP: tl.constexpr, BM: tl.constexpr,
                       BN: tl.constexpr, COMPLEX: tl.constexpr, PREC: tl.constexpr):
    rows, k, s = _load_signals(s_ptr, tl.program_id(0), n, BM, KP)
    thr = tl.load(thr_ptr + rows, mask=rows < n, other=float("inf"))
    start = tl.program_id(1) * per_split
    for j0 in range(start, start + per_split, BN):
        cols = j0 + tl.arange(0, BN)
        sc = _tile(s, a_ptr, k, cols, m_pad, KP, COMPLEX, PREC)
        hit = (sc >= thr[:, None]) & (cols[None, :] < m)
        h = hit.to(tl.int32)
        per_row = tl.sum(h, axis=1)
        total = tl.sum(per_row, axis=0)
        if total > 0:
            base = tl.atomic_add(count_ptr, total.to(tl.int64))
            before = (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(h, axis=1) - 1
            pos = base + before.to(tl.int64)
            ok = hit & (pos < capacity)
            tl.store(rows_ptr + pos, tl.broadcast_to(rows[:, None], [BM, BN]), mask=ok)
            tl.store(cols_ptr + pos, tl.broadcast_to(cols[None, :], [BM, BN]), mask=ok)


def launch_row_max(s, a, out, *, m_pad, per_split, blocks, complex_, precision):
    """``out`` (float32, filled with -inf) gets every signal's best score (complex: squared)."""
    bm, bn, warps, stages = blocks
    grid = (triton.cdiv(s.shape[0], bm), m_pad // per_split)
    _row_max_kernel[grid](s, a, out, s.shape[0], m_pad, per_split, KP=s.shape[1], BM=bm, BN=bn,
                          COMPLEX=complex_, PREC=precision, num_warps=warps, num_stages=stages,
                          enable_fp_fusion=True)


def launch_candidates(s, a, thr, capacity, *, m, m_pad, per_split, blocks, complex_, precision):
    """Pairs with score >= ``thr`` (complex: squared magnitude): ``(rows, cols, total)``, int32
    buffers of ``capacity`` pairs (the first ``min(total, capacity)`` written), ``total`` the
    number of pairs found (a 0-d int64 tensor)."""
    bm, bn, warps, stages = blocks
    dev = s.device
    rows = torch.empty(max(capacity, 1), dtype=torch.int32, device=dev)
    cols = torch.empty(max(capacity, 1), dtype=torch.int32, device=dev)
    count = torch.zeros(1, dtype=torch.int64, device=dev)
    grid = (triton.cdiv(s.shape[0], bm), m_pad // per_split)
    _candidates_kernel[grid](s, a, thr, rows, cols, count, s.shape[0], m, m_pad, per_split,
                             capacity, KP=s.shape[1], BM=bm, BN=bn, COMPLEX=complex_,
                             PREC=precision, num_warps=warps, num_stages=stages,
                             enable_fp_fusion=True)
    return rows, cols, count[0]


@triton.jit
def _pair_scores_kernel(s_ptr, a_ptr, rows_ptr, cols_ptr, out_ptr, n_pairs, length, s_row,
                        a_row, COMPLEX: tl.constexpr, BP: tl.constexpr, BT: tl.constexpr):
    """float64 ``<a_col, s_row>`` of ``BP`` pairs per program: float32 inputs, their products
    exact in float64, summed in float64 (complex: interleaved (re, im), ``conj(a) s``)."""
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    pm = p < n_pairs
    r = tl.load(rows_ptr + p, mask=pm, other=0).to(tl.int64)
    c = tl.load(cols_ptr + p, mask=pm, other=0).to(tl.int64)
    re = tl.zeros([BP], tl.float64)
    im = tl.zeros([BP], tl.float64)
    W: tl.constexpr = 2 if COMPLEX else 1
    for t0 in range(0, length, BT):
        t = t0 + tl.arange(0, BT)
        m = pm[:, None] & (t < length)[None, :]
        so = r[:, None] * s_row + W * t[None, :]
        ao = c[:, None] * a_row + W * t[None, :]
        sr = tl.load(s_ptr + so, mask=m, other=0.0).to(tl.float64)
        ar = tl.load(a_ptr + ao, mask=m, other=0.0).to(tl.float64)
        if COMPLEX:
            si = tl.load(s_ptr + so + 1, mask=m, other=0.0).to(tl.float64)
            ai = tl.load(a_ptr + ao + 1, mask=m, other=0.0).to(tl.float64)
            re += tl.sum(ar * sr + ai * si, axis=1)
            im += tl.sum(ar * si - ai * sr, axis=1)
        else:
            re += tl.sum(ar * sr, axis=1)
    tl.store(out_ptr + 2 * p, re, mask=pm)
    tl.store(out_ptr + 2 * p + 1, im, mask=pm)


def launch_pair_scores(s, a, rows, cols, *, complex_):
    """``(P, 2)`` float64 (real, imaginary) scores of the pairs ``(rows, cols)`` of float32
    ``s`` ``(n, T)`` and ``a`` ``(M, T)`` (complex: their ``view_as_real``, ``(., T, 2)``)."""
    out = torch.empty(len(rows), 2, dtype=torch.float64, device=s.device)
    if len(rows):
        bp, bt = 16, 128
        length = s.shape[1]
        _pair_scores_kernel[(triton.cdiv(len(rows), bp),)](
            s, a, rows, cols, out, len(rows), length, s.stride(0), a.stride(0),
            COMPLEX=complex_, BP=bp, BT=bt, num_warps=4, enable_fp_fusion=True)
    return out
