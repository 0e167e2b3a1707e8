"""The time axis and the mask of a series: :func:`detect_time_axis`, :func:`auto_mask` (temporal
SNR, Otsu, fraction of the 99th-percentile norm), :func:`otsu_threshold`, mask files
(:func:`load_mask`) and measured B1 maps (:func:`load_b1map`), both on the series' grid."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mrflight.maps.options import MASK_METHODS
from mrflight.series_io import open_series

__all__ = ["detect_time_axis", "otsu_threshold", "auto_mask", "load_mask", "load_b1map"]


def detect_time_axis(shape: tuple[int, ...], length: int, time_axis: int | None = None) -> int:
    """The time axis of a series of ``shape`` for a sequence of ``length`` time points.

    Args:
        shape: the series shape (2 to 4 axes: 1-3 spatial plus time).
        length: the sequence length ``T``.
        time_axis: a given axis (negative allowed) that is checked instead of detected.

    Returns:
        The non-negative index of the time axis.

    Raises:
        ValueError: wrong number of axes, a given axis of the wrong length, no axis of length
            ``T``, or several (ambiguous; the message says how to set ``time_axis``).
    """
    shape = tuple(int(s) for s in shape)
    if not 2 <= len(shape) <= 4:
        raise ValueError(f"the series has shape {shape}; expected 2-D or 3-D space plus one time "
                         f"axis (3 or 4 axes; 2 for a list of voxels)")
    if time_axis is not None:
        ax = int(time_axis)
        if not -len(shape) <= ax < len(shape):
            raise ValueError(f"maps.time_axis={time_axis} is out of range for shape {shape}")
        ax %= len(shape)
        if shape[ax] != length:
            raise ValueError(f"maps.time_axis={time_axis} has {shape[ax]} points but the "
                             f"sequence has {length}; the series (shape {shape}) does not match "
                             "the sequence -- use the checkpoint or dictionary (or, for "
                             "dictionary=paper, the sequence=) of the train the series was "
                             "acquired with")
        return ax
    hits = [i for i, s in enumerate(shape) if s == length]
    if not hits:
        raise ValueError(f"no axis of the series (shape {shape}) has the sequence length "
                         f"{length}: the series does not match the sequence -- use the "
                         "checkpoint or dictionary (or, for dictionary=paper, the sequence=) of "
                         "the train the series was acquired with")
    if len(hits) > 1:
        raise ValueError(f"several axes {hits} of the series (shape {shape}) have the sequence "
                         f"length {length}; set the time axis explicitly (maps.time_axis=N)")
    return hits[0]


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of finite values (maximum between-class variance).

    The histogram (``bins`` bins) spans ``[min, p99.9]`` so that a few very large values do not
    squeeze the rest into one bin; when the criterion is flat across an empty gap between the two
    classes, the middle of the gap is returned.

    References:
        Otsu N, A threshold selection method from gray-level histograms, IEEE TSMC 1979;9:62.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite value to threshold: nothing to mask")
    lo, hi = float(v.min()), float(np.percentile(v, 99.9))
    if not hi > lo:
        hi = float(v.max())
        if not hi > lo:
            return lo
    hist, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centers)
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = m / w0
        mu1 = (m[-1] - m) / w1
        between = w0 * w1 * (mu0 - mu1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    # across an empty gap between the classes the criterion is flat: take the gap's middle
    best = np.flatnonzero(between >= between.max())
    k = (int(best[0]) + int(best[-1])) // 2
    return float(edges[k + 1])


def auto_mask(norm: np.ndarray, method: str = "snr", fraction: float = 0.1,
              diff_norm: np.ndarray | None = None, length: int | None = None,
              magnitude: bool = False) -> tuple[np.ndarray, dict]:
    """Mask from the fingerprint norms (see the module docstring).

    Args:
        norm: map of L2 norms ``||s||`` of the fingerprints (NaN/0 for unusable voxels).
        method: ``"snr"``, ``"otsu"``, ``"fraction"`` or ``"none"``.
        fraction: for ``"fraction"``: keep ``norm > fraction * percentile(norm, 99)``.
        diff_norm: for ``"snr"``: map of ``||s[1:] - s[:-1]||`` (the temporal differences).
        length: for ``"snr"``: the number of time points ``T``.
        magnitude: for ``"snr"``: the series is a magnitude (non-negative) series, whose
            background noise is Rician: its mean ``sigma sqrt(pi / 2)`` is smooth in time, so
            ``r`` of pure noise is ``2 / (2 - pi / 2) = 4.66`` instead of 1 and the threshold is
            scaled by that factor.

    Returns:
        ``(mask, info)`` with ``info`` the method and threshold (written into the sidecars).
    """
    valid = np.isfinite(norm) & (norm > 0)
    if method == "none":
        return valid, {"Method": "none (all non-zero finite fingerprints)"}
    if not valid.any():
        raise ValueError("every fingerprint of the series is zero or non-finite")
    if method == "snr":
        if diff_norm is None or length is None:
            raise ValueError("mask_method='snr' needs diff_norm and length")
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = 2.0 * norm.astype(np.float64) ** 2 / diff_norm.astype(np.float64) ** 2
        thr = 1.0 + 5.0 * np.sqrt(3.0 / max(int(length), 2))
        if magnitude:
            thr *= 2.0 / (2.0 - np.pi / 2.0)
        ratio = np.where(np.isfinite(ratio), ratio, np.inf)  # diff 0: a noise-free fingerprint
        mask = valid & (ratio > thr)
        return mask, {
            "Method": "temporal SNR: 2 ||s||^2 / ||diff(s)||^2 > 1 + 5 sqrt(3 / T) (about 1 for "
                      "white noise, 1 + SNR^2 for a smooth fingerprint)",
            "Threshold": float(thr),
            "LeftOutAboveNoise": _left_out_above_noise(ratio[valid & ~mask], int(mask.sum()),
                                                       max(int(length), 2), magnitude)}
    if method == "otsu":
        thr = float(np.exp(otsu_threshold(np.log(norm[valid]))))
        desc = "Otsu threshold on the logarithm of the fingerprint L2 norm"
    elif method == "fraction":
        p99 = float(np.percentile(norm[valid], 99))
        thr = fraction * p99
        desc = f"fingerprint L2 norm > {fraction} x its 99th percentile ({p99:.6g})"
    else:
        raise ValueError(f"mask_method must be one of {MASK_METHODS}, got {method!r}")
    return valid & (norm > thr), {"Method": desc, "Threshold": thr}


def _given(option: str, value) -> str:
    """How an error names a file (``mask=FILE``) or an array (the argument: ``mask``)."""
    return f"{option}={value}" if isinstance(value, (str, os.PathLike)) else option


def _coded(header) -> bool:
    """Whether a NIfTI header states its orientation (a qform or sform code above 0)."""
    try:
        return int(header["sform_code"]) > 0 or int(header["qform_code"]) > 0
    except (KeyError, TypeError, ValueError):
        return True  # not a NIfTI-1/2 header: trust its affine


def _check_grid(what: str, option: str, value, src, affine, header) -> None:
    """Refuse a NIfTI ``src`` (mask or B1 map) whose affine places its voxels elsewhere than
    the NIfTI series' (``affine``, ``header``): equal array shapes do not make equal grids (a
    B1 map of another slab, orientation or field of view). Files without a stated orientation
    (qform and sform codes 0) cannot be compared and are taken as they are."""
    if affine is None or not src.is_nifti or not (_coded(src.header) and
                                                  (header is None or _coded(header))):
        return
    try:  # voxel of the series -> voxel of the file: the identity on the same grid
        between = np.linalg.inv(src.affine) @ np.asarray(affine, dtype=np.float64)
    except np.linalg.LinAlgError:
        between = None
    # only the axes along which the file has more than one voxel (and the origin) count: the
    # spacing of a single slice (or the time column of an (X, Y, T) series) places nothing
    extent = tuple(src.shape[:3]) + (1,) * max(0, 3 - len(src.shape))
    cols = [a for a in range(3) if extent[a] > 1] + [3]
    if between is None or not np.allclose(between[:, cols], np.eye(4)[:, cols], rtol=0.0,
                                          atol=1e-3):
        shift = (float("nan") if between is None
                 else float(np.abs(between[:3, 3]).max()))
        raise ValueError(f"{option}={value} is not on the series' voxel grid: its NIfTI affine "
                         f"differs from the input's (up to {shift:.3g} voxels apart, or another "
                         f"orientation or voxel size), so voxel i of the {what} is not voxel i "
                         f"of the series. Resample it onto the series' grid first (e.g. "
                         f"nibabel.processing.resample_from_to, FSL flirt -applyxfm, ANTs)")


def _spatial(what: str, option: str, value, spatial_shape: tuple[int, ...],
             affine=None, header=None) -> np.ndarray:
    """A file (read as :func:`open_series` reads series, errors naming ``option``) or array of
    the series' spatial shape (singleton axes may differ). With the NIfTI series' ``affine``
    (and ``header``), a NIfTI file must lie on the same voxel grid (:func:`_check_grid`)."""
    if isinstance(value, (str, os.PathLike)):
        with open_series(Path(value), option=option, what=what) as src:
            _check_grid(what, option, value, src, affine, header)
            arr = src.read(tuple(slice(None) for _ in src.shape))
    else:
        arr = np.asarray(value)
    if arr.shape != spatial_shape:
        squeezed = arr.reshape([s for s in arr.shape if s != 1])
        want = [s for s in spatial_shape if s != 1]
        if list(squeezed.shape) != want:
            raise ValueError(f"{_given(option, value)} has shape {arr.shape} but the series' "
                             f"spatial shape is {spatial_shape}; give a {what} of the image grid")
        arr = squeezed.reshape(spatial_shape)
    return arr.real if np.iscomplexobj(arr) else arr.astype(np.float64)


def _left_out_above_noise(ratio: np.ndarray, kept: int, length: int, magnitude: bool) -> int:
    """About how many voxels the temporal-SNR mask left out although their ratio ``r`` stands
    clearly above white noise (low-SNR tissue): the count above 3 standard deviations of the
    noise's ``r``, less twice what noise alone puts there (0 when that excess is within its
    spread or under 5 % of the ``kept`` voxels).

    The noise's ``r`` has mean 1 and standard deviation ``sqrt(0.5 / T)`` for complex data (the
    numerator and the differences are correlated: ``Var log r = (1 + 1.5 - 2) / T``), and, for
    a magnitude, mean 4.66 and a relative standard deviation of about ``sqrt(2.3 / T)``
    (measured); the mask's threshold ``1 + 5 sqrt(3 / T)`` lies 12 (complex) and 5.7
    (magnitude) of those standard deviations above the noise.
    """
    mean = 2.0 / (2.0 - np.pi / 2.0) if magnitude else 1.0
    sd = mean * np.sqrt((2.3 if magnitude else 0.5) / length)
    above = int(np.count_nonzero(ratio > mean + 3.0 * sd))
    expected = 2.0 * 0.00135 * ratio.size  # twice the normal tail beyond 3 sd
    excess = above - expected
    if excess <= max(0.05 * kept, 5.0 * np.sqrt(expected), 20.0):
        return 0
    return int(round(excess))


def load_mask(mask, spatial_shape: tuple[int, ...], affine=None, header=None) -> np.ndarray:
    """A mask file or array on the series' grid as booleans (non-zero = reconstruct).

    Args:
        affine, header: the NIfTI series' affine and header (``None`` otherwise): a NIfTI mask
            must then lie on the same voxel grid.

    Raises:
        ValueError: wrong shape, another NIfTI grid, values strictly between 0 and 1 (a
            probability or an interpolated mask: ``!= 0`` would keep all of it), or no voxel
            selected.
    """
    arr = np.nan_to_num(_spatial("mask", "mask", mask, spatial_shape, affine, header))
    frac = arr[(arr > 0) & (arr < 1)]
    if frac.size:
        raise ValueError(f"{_given('mask', mask)} holds values between 0 and 1 (e.g. "
                         f"{frac.flat[0]:g}), not a 0/1 mask: give a 0/1 or boolean mask, e.g. "
                         "thresholded (np.save('mask.npy', m > 0.5))")
    if not arr.any():
        raise ValueError(f"{_given('mask', mask)} selects no voxel (it is all zero): give a "
                         "mask that is 1 where maps are wanted, or leave mask= out for the "
                         "automatic mask")
    return arr != 0


#: largest fraction of the reconstructed voxels whose measured B1 may be negative
B1_NEGATIVE_TOLERANCE = 0.1


def load_b1map(b1map, spatial_shape: tuple[int, ...], affine=None, header=None,
               mask: np.ndarray | None = None) -> np.ndarray:
    """A measured B1 map (file or array; the flip-angle scale, ratio to nominal, BIDS
    ``TB1map``) on the series' grid, float64; NaN where it is not finite or not positive.

    Args:
        affine, header: the NIfTI series' affine and header (``None`` otherwise): a NIfTI B1
            map must then lie on the same voxel grid.
        mask: the voxels to be reconstructed: a ratio is never negative there, so more than
            :data:`B1_NEGATIVE_TOLERANCE` of them below 0 is a map of the deviation from
            nominal (in % or as a fraction), refused.

    Raises:
        ValueError: wrong shape, another NIfTI grid, no finite positive value, or values
            that are not ratios (median outside 0.2-3: a map in percent or in degrees must be
            converted first; negative in the tissue: a deviation from nominal).
    """
    raw = _spatial("B1 map", "b1map", b1map, spatial_shape, affine, header)
    if mask is not None:
        with np.errstate(invalid="ignore"):
            vals = raw[np.asarray(mask, bool) & np.isfinite(raw) & (raw != 0)]
        neg = float((vals < 0).mean()) if vals.size else 0.0
        if neg > B1_NEGATIVE_TOLERANCE:
            raise ValueError(f"{_given('b1map', b1map)} is negative in {100 * neg:.0f} % of the "
                             "voxels to reconstruct, but the flip-angle scale (ratio to "
                             "nominal) is positive: a map of the deviation from nominal must be "
                             "converted first (ratio = 1 + deviation / 100 for one in percent, "
                             "1 + deviation for a fraction)")
    arr = np.where(np.isfinite(raw) & (raw > 0), raw, np.nan)
    if not np.isfinite(arr).any():
        raise ValueError(f"{_given('b1map', b1map)} has no finite positive value: give a map of "
                         "the flip-angle scale (ratio to nominal) that covers the tissue")
    med = float(np.nanmedian(arr))
    if not 0.2 <= med <= 3.0:
        raise ValueError(f"{_given('b1map', b1map)} should hold the flip-angle scale as a "
                         f"ratio to nominal (about 0.5-1.5), but its median is {med:g}: divide a "
                         "map in percent by 100 (or convert a map of flip angles by the nominal "
                         "angle)")
    return arr
