"""The block planner: which blocks of a series are read, in which order, within a memory bound."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mrflight.maps.masks import detect_time_axis
from mrflight.series_io import SeriesSource

__all__ = ["BlockPlan", "plan_series", "plan_blocks", "iter_blocks", "block_signals",
           "check_real_block", "unit_scaled", "row_norms"]


@dataclass
class BlockPlan:
    """How a series is read: its time axis, spatial shape and blocks.

    Attributes:
        time_axis: the time axis of the series.
        spatial_shape: the series' shape without the time axis.
        n_slices: slices along the slowest spatial axis (1 for 2-D space).
        blocks: ``(slice_number, index, spatial_index)`` of every block, in reading order.
        fits_one_block: the whole series is within one block's bound: its blocks are kept
            after the first pass (the mask) and the file is read once.
    """

    time_axis: int
    spatial_shape: tuple
    n_slices: int
    blocks: list
    fits_one_block: bool


def plan_series(src: SeriesSource, length: int, time_axis: int | None,
                block_mb: float) -> BlockPlan:
    """The :class:`BlockPlan` of a series for a sequence of ``length`` time points, with blocks
    of at most ``block_mb`` MB (complex64/float32)."""
    shape = src.shape
    if time_axis is None and src.is_nifti and shape[-1] == length:
        time_axis = -1  # NIfTI keeps time last: a spatial axis of that length is not time
    t_ax = detect_time_axis(shape, length, time_axis)
    itemsize = 8 if src.is_complex else 4
    spatial, slice_axis, row_axis, rows = plan_blocks(shape, t_ax, src.order, itemsize,
                                                      block_mb * 2**20)
    total_bytes = itemsize * int(np.prod(shape, dtype=np.int64))
    return BlockPlan(t_ax, tuple(shape[a] for a in spatial),
                     shape[slice_axis] if slice_axis is not None else 1,
                     list(iter_blocks(shape, t_ax, slice_axis, row_axis, rows)),
                     total_bytes <= block_mb * 2**20)


def plan_blocks(shape, time_axis: int, order: str, itemsize: int, block_bytes: float):
    """Slice axis, row axis and rows per block for a series."""
    spatial = [a for a in range(len(shape)) if a != time_axis]
    slow = spatial if order == "C" else spatial[::-1]
    slice_axis = slow[0] if len(spatial) == 3 else None
    row_axis = slow[1] if len(spatial) == 3 else slow[0]
    per_row = itemsize * shape[time_axis]
    for a in spatial:
        if a not in (slice_axis, row_axis):
            per_row *= shape[a]
    rows = int(max(1, min(shape[row_axis], block_bytes // max(per_row, 1))))
    return spatial, slice_axis, row_axis, rows


def iter_blocks(shape, time_axis, slice_axis, row_axis, rows):
    """Yield ``(slice_number, index, spatial_index)`` for every block."""
    n_slices = shape[slice_axis] if slice_axis is not None else 1
    for k in range(n_slices):
        for r0 in range(0, shape[row_axis], rows):
            idx = [slice(None)] * len(shape)
            if slice_axis is not None:
                idx[slice_axis] = k
            idx[row_axis] = slice(r0, min(r0 + rows, shape[row_axis]))
            sp = tuple(idx[a] for a in range(len(shape)) if a != time_axis)
            yield k, tuple(idx), sp


def block_signals(src: SeriesSource, idx, time_axis: int) -> np.ndarray:
    """Read a block and return it as ``(n_voxels, T)`` in the spatial C order of the block."""
    blk = src.read(idx)
    t_pos = time_axis - sum(isinstance(i, int) for i in idx[:time_axis])
    blk = np.moveaxis(blk, t_pos, -1)
    return blk.reshape(-1, blk.shape[-1])


def check_real_block(src: SeriesSource, sig: np.ndarray) -> None:
    """A real-valued series must be a magnitude: refuse a block with negative values."""
    if src.is_complex or not sig.size:
        return
    from mrflight.matching import check_magnitude

    finite = np.isfinite(sig)  # non-finite voxels are excluded from the maps anyway
    low = sig.min() if finite.all() else (sig[finite].min() if finite.any() else 0.0)
    check_magnitude(float(low), f"the series {src.describe()}")


def unit_scaled(sig: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every fingerprint (row) divided by the power of two just above its largest magnitude,
    and the powers' exponents ``e`` (undo with ``np.ldexp(x, e)``).

    Exact in floating point, and a scaled fingerprint's values are below 1 in magnitude: sums
    of squares in single precision neither overflow (values from about 1e19 on) nor underflow
    (below about 1e-19), whatever unit the series is stored in. Non-finite rows are unscaled.
    """
    with np.errstate(invalid="ignore"):
        _, e = np.frexp(np.abs(sig).max(axis=1, initial=0.0))
    sig = np.ascontiguousarray(sig)
    real = sig.view(sig.real.dtype) if np.iscomplexobj(sig) else sig
    return np.ldexp(real, -e[:, None]).view(sig.dtype), e


def row_norms(sig: np.ndarray) -> np.ndarray:
    """float32 L2 norm of every row of ``sig``, exact for values of any magnitude; NaN or inf
    for a row with such a value. Rows whose plain norm is outside ``[1e-15, 1e15]`` (where a
    single-precision sum of squares may have under- or overflowed) are computed again from
    :func:`unit_scaled` fingerprints; the others, nearly always all, are not copied."""
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        n = np.linalg.norm(sig, axis=1).astype(np.float32)
        redo = ~((n >= 1e-15) & (n <= 1e15))
        if redo.any():
            scaled, e = unit_scaled(sig[redo])
            n[redo] = np.ldexp(np.linalg.norm(scaled, axis=1).astype(np.float64), e)
    return n
