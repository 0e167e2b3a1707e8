"""Maps of a whole series, voxel chunk by voxel chunk: :func:`reconstruct_series`.

A first pass over the blocks (:mod:`mrflight.maps.blocks`) computes the fingerprint norms for the
automatic mask (skipped with a mask file); a second pass reconstructs the masked voxels of every
block in chunks of ``chunk_voxels`` fingerprints. A series within one block is read once.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

from mrflight.maps.blocks import (
    BlockPlan,
    block_signals,
    check_real_block,
    plan_series,
    row_norms,
    unit_scaled,
)
from mrflight.maps.masks import _given, auto_mask, load_b1map, load_mask
from mrflight.maps.options import MapResult
from mrflight.series_io import SeriesSource, open_series

__all__ = ["reconstruct_series"]


def reconstruct_series(series, reconstructor, *, time_axis: int | None = None, mask=None,
                       mask_method: str = "snr", mask_fraction: float = 0.1,
                       chunk_voxels: int = 8192, block_mb: float = 256.0,
                       dataset: str | None = None, progress: bool = False,
                       b1map=None) -> MapResult:
    """Reconstruct T1, T2 and M0 maps of an image series, voxel chunk by voxel chunk.

    Args:
        series: a file path (see :func:`mrflight.series_io.open_series`), a
            :class:`~mrflight.series_io.SeriesSource`, or an array of shape ``space + (T,)`` in
            any axis order (2-D or 3-D space, complex or magnitude).
        reconstructor: a :class:`MatchingReconstructor`, a :class:`NetworkReconstructor`, or
            any callable ``(N, T) -> ((N, 2) ms, (N,) M0)`` with a ``length`` attribute (``T``).
        time_axis: the time axis (``None``: detected from ``reconstructor.length``).
        mask: a mask file or boolean array of the spatial shape (non-zero = reconstruct), or
            ``None`` for the automatic mask ``mask_method``.
        mask_method, mask_fraction: the automatic mask (:func:`auto_mask`).
        chunk_voxels: fingerprints per reconstructor call.
        block_mb: bound on one block read from the file, MB (complex64/float32).
        dataset: variable holding the series in multi-variable files.
        progress: show a rich progress bar advancing per slice.
        b1map: a measured B1 map (file or array on the spatial grid, ratio to nominal) passed
            to the reconstructor per voxel (``reconstructor(signals, b1=...)``); voxels where it
            is not finite are not reconstructed.

    Returns:
        :class:`MapResult` with the maps in the input's spatial shape (time axis removed).

    Raises:
        ValueError: a series that does not match the sequence length, a bad mask, etc.
    """
    length = int(reconstructor.length)
    own = False
    if isinstance(series, SeriesSource):
        src = series
    elif isinstance(series, (str, os.PathLike)):
        src, own = open_series(series, dataset=dataset, length=length), True
    else:
        src = SeriesSource(np.asarray(series))
    try:
        return _reconstruct(src, reconstructor, length, time_axis, mask, mask_method,
                            mask_fraction, int(chunk_voxels), float(block_mb), progress, b1map)
    finally:
        if own:
            src.close()


def _reconstruct(src, rec, length, time_axis, mask, mask_method, mask_fraction, chunk_voxels,
                 block_mb, progress, b1map=None) -> MapResult:
    plan = plan_series(src, length, time_axis, block_mb)
    last = len(src.shape) - 1
    if src.is_nifti and time_axis is None and plan.time_axis != last:
        # NIfTI keeps time in its last (4th) dimension: a spatial axis of the sequence length
        # beside a last axis of another length is a series that does not match the sequence
        raise ValueError(f"the NIfTI series {src.describe()} (shape {src.shape}) has "
                         f"{src.shape[last]} time points in its last axis, where NIfTI keeps "
                         f"time, but the sequence has {length}; only its spatial axis "
                         f"{plan.time_axis} has that length. Use the checkpoint or dictionary "
                         f"of the train the series was acquired with, or, if axis "
                         f"{plan.time_axis} really is time, set maps.time_axis={plan.time_axis}")
    if src.is_nifti and plan.time_axis != last:
        warnings.warn(f"the NIfTI series has its time axis at {plan.time_axis}, not last: the "
                      "affine of the maps may not describe their axes", RuntimeWarning,
                      stacklevel=3)
    # the series' voxel grid, that NIfTI masks and B1 maps must share (unknown when its
    # affine does not describe the spatial axes: not NIfTI, or time not last)
    grid = ((src.affine, src.header) if src.is_nifti and plan.time_axis == len(src.shape) - 1
            else (None, None))
    cache: dict[int, np.ndarray] | None = {} if plan.fits_one_block else None
    bar = _progress(progress)
    if bar is not None:
        bar.start()
    try:
        if mask is None:
            norm, dnorm = _norm_pass(src, plan, cache, bar)
            n_bad = int(np.count_nonzero(~np.isfinite(norm)))  # never in the automatic mask
            mask_arr, info = auto_mask(norm, mask_method, mask_fraction, diff_norm=dnorm,
                                       length=length,
                                       magnitude=not src.is_complex)  # Rician background
        else:
            norm, n_bad = None, 0
            mask_arr = load_mask(mask, plan.spatial_shape, *grid)
            info = {"Method": "file" if isinstance(mask, (str, os.PathLike)) else "array",
                    "Source": str(mask) if isinstance(mask, (str, os.PathLike)) else None}
        maps = _Maps(plan.spatial_shape, norm)
        b1 = None if b1map is None else load_b1map(b1map, plan.spatial_shape, *grid,
                                                   mask=mask_arr)
        if mask is None and not mask_arr.any():
            raise ValueError(f"the automatic mask (maps.mask_method={mask_method}) selects no "
                             "voxel of the series: try maps.mask_method=otsu or "
                             "maps.mask_method=none, or give mask=FILE")
        if info.get("LeftOutAboveNoise"):
            warnings.warn(_left_out_message(info["LeftOutAboveNoise"], info["Threshold"], length,
                                            src.is_complex), RuntimeWarning, stacklevel=3)
        if b1 is not None:
            named = _given("b1map", b1map)
            covered = mask_arr & np.isfinite(b1)
            if not covered.any():
                raise ValueError(f"{named} is NaN in every voxel of the mask: give a B1 map "
                                 "that covers the tissue")
            lost = int(mask_arr.sum() - covered.sum())
            if lost:
                warnings.warn(f"{lost} voxel(s) of the mask have no finite positive B1 in "
                              f"{named}: they are left out of the maps (NaN)", RuntimeWarning,
                              stacklevel=3)
            mask_arr = covered
        n_bad += _reconstruct_pass(src, rec, plan, mask_arr, maps, cache, chunk_voxels, bar, b1)
    finally:
        if bar is not None:
            bar.stop()
    if n_bad:
        which = "voxel(s) had" if mask is None else "masked voxel(s) had all-zero or"
        warnings.warn(f"{n_bad} {which} non-finite fingerprints; their maps are NaN",
                      RuntimeWarning, stacklevel=3)
    return maps.result(mask_arr, plan.time_axis, info)


def _left_out_message(n: int, threshold: float, length: int, is_complex: bool) -> str:
    """The warning of voxels the temporal-SNR mask left out although they stand above the
    noise (:func:`~mrflight.maps.masks.auto_mask`'s ``LeftOutAboveNoise``)."""
    # complex data: r = 1 + 1 / (2 T rel^2) for a fingerprint of relative noise rel
    reach = (f" (a fingerprint whose noise relative to its norm exceeds "
             f"{1.0 / np.sqrt(2.0 * length * (threshold - 1.0)):.3g} cannot pass it, so "
             "RelativeNoise does not see them)" if is_complex else "")
    return (f"the automatic mask (maps.mask_method=snr) left out about {n} voxels whose "
            f"fingerprints stand above the noise but below its threshold{reach}: low-SNR "
            "tissue (low proton density, a noisy scan) whose maps are NaN. To map them give "
            "mask=FILE (a mask of the tissue) or maps.mask_method=none")


def _progress(enabled: bool):
    from mrflight.progress import progress_bar

    return progress_bar() if enabled else None


def _norm_pass(src: SeriesSource, plan: BlockPlan, cache: dict | None, bar):
    """Maps of the fingerprint norms ``||s||`` and of their temporal differences ``||Δs||``
    (every block read once; kept in ``cache`` when it is not ``None``)."""
    norm = np.full(plan.spatial_shape, np.nan, np.float32)
    dnorm = np.full(plan.spatial_shape, np.nan, np.float32)
    task = bar.add_task("fingerprint norms", total=plan.n_slices) if bar else None
    last = -1
    for i, (k, idx, sp) in enumerate(plan.blocks):
        sig = block_signals(src, idx, plan.time_axis)
        if cache is not None:
            cache[i] = sig
        nb, db = row_norms(sig), row_norms(np.diff(sig, axis=1))
        norm[sp] = nb.reshape(norm[sp].shape)
        dnorm[sp] = db.reshape(norm[sp].shape)
        check_real_block(src, sig)
        if bar is not None and k != last:
            bar.update(task, completed=k + 1)
            last = k
    return norm, dnorm


class _Maps:
    """The maps being filled block by block (float32, NaN where not reconstructed)."""

    def __init__(self, shape: tuple, norm: np.ndarray | None) -> None:
        self.t1, self.t2, self.m0 = (np.full(shape, np.nan, np.float32) for _ in range(3))
        self.b1 = None  # created when the method returns a B1 column
        self.own_norm = norm is None  # a mask file: the norms of the reconstructed voxels
        self.norm = np.full(shape, np.nan, np.float32) if norm is None else norm

    def put(self, sp, size: int, sel: np.ndarray, nrm: np.ndarray, est: list) -> None:
        """Write one block: ``est`` = block-sized T1, T2, M0[, B1] at the voxels ``sel``."""
        bshape = self.t1[sp].shape
        self.t1[sp], self.t2[sp], self.m0[sp] = (e.reshape(bshape) for e in est[:3])
        if est[3] is not None:
            if self.b1 is None:
                self.b1 = np.full(self.t1.shape, np.nan, np.float32)
            self.b1[sp] = est[3].reshape(bshape)
        if self.own_norm:
            nb = np.full(size, np.nan, np.float32)
            nb[sel] = nrm
            self.norm[sp] = nb.reshape(bshape)

    def result(self, mask: np.ndarray, time_axis: int, info: dict) -> MapResult:
        final_mask = mask & np.isfinite(self.t1) & np.isfinite(self.t2)
        for arr in (self.t1, self.t2, self.m0) + (() if self.b1 is None else (self.b1,)):
            arr[~final_mask] = np.nan
        return MapResult(self.t1, self.t2, self.m0, final_mask, self.norm, time_axis, info,
                         self.b1)


def _reconstruct_pass(src, rec, plan: BlockPlan, mask: np.ndarray, maps: _Maps,
                      cache: dict | None, chunk_voxels: int, bar, b1=None) -> int:
    """Reconstruct the masked voxels of every block into ``maps``; returns how many masked
    voxels had all-zero or non-finite fingerprints."""
    task = bar.add_task("reconstructing slices", total=plan.n_slices) if bar else None
    n_bad = 0
    for i, (k, idx, sp) in enumerate(plan.blocks):
        mblk = mask[sp].reshape(-1)
        if mblk.any():
            sig = cache.pop(i, None) if cache is not None else None
            if sig is None:
                sig = block_signals(src, idx, plan.time_axis)
            sel, sig, nrm, bad = _usable(src, sig, mblk)
            n_bad += bad
            b1v = None if b1 is None else b1[sp].reshape(-1)[sel]
            maps.put(sp, mblk.size, sel, nrm,
                     _estimate(rec, sig, sel, mblk.size, chunk_voxels, b1v))
        if bar is not None:
            bar.update(task, completed=k + 1)
    return n_bad


def _usable(src: SeriesSource, sig: np.ndarray, mblk: np.ndarray):
    """The masked fingerprints of a block that can be reconstructed (finite, not all zero):
    ``(positions in the block, fingerprints, their norms, how many were dropped)``."""
    sel = np.flatnonzero(mblk)
    sig = sig[sel]
    finite = np.isfinite(sig).all(axis=1)
    nrm = row_norms(np.where(finite[:, None], sig, 0))
    good = finite & (nrm > 0)
    sel, sig = sel[good], sig[good]
    check_real_block(src, sig)
    return sel, sig, nrm[good], int((~good).sum())


def _estimate(rec, sig: np.ndarray, sel: np.ndarray, size: int, chunk_voxels: int,
              b1: np.ndarray | None = None) -> list:
    """Block-sized float32 T1, T2, M0 and B1 (``None`` when the method gives none) of the
    fingerprints ``sig`` at the block positions ``sel``, ``chunk_voxels`` per call (with the
    measured ``b1`` of those voxels when given)."""
    out = [np.full(size, np.nan, np.float32) for _ in range(4)]
    has_b1 = False
    for c in range(0, len(sel), chunk_voxels):
        chunk, e = unit_scaled(sig[c: c + chunk_voxels])  # M0 in the series' unit below
        p, a = rec(chunk) if b1 is None else rec(chunk, b1=b1[c: c + chunk_voxels])
        j = sel[c: c + chunk_voxels]
        out[0][j], out[1][j] = p[:, 0], p[:, 1]
        out[2][j] = np.ldexp(np.asarray(a, np.float64), e)
        if p.shape[1] > 2:
            has_b1 = True
            out[3][j] = p[:, 2]
    return out[:3] + [out[3] if has_b1 else None]
