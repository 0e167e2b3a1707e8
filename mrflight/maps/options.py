"""Options and results of series maps: :class:`MapOptions` (how a series is read, masked and
reconstructed) and :class:`MapResult` (the maps of one series)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mrflight.physics.checks import is_number

__all__ = ["MASK_METHODS", "MapOptions", "MapResult"]

MASK_METHODS = ("snr", "otsu", "fraction", "none")


# ============================================================================ options
@dataclass
class MapOptions:
    """How a series is read, masked and reconstructed (``mrflight/configs/maps/default.yaml``).

    Args:
        time_axis: index of the time axis (negative counts from the end), or ``None`` to detect
            it as the one axis whose length equals the sequence length.
        dataset: variable/dataset holding the series in ``.npz``/``.mat``/``.h5`` files with
            several arrays (HDF5 path or MATLAB ``struct.field``); ``None``: the only candidate.
        mask_method: ``"snr"``, ``"otsu"``, ``"fraction"`` or ``"none"`` (used when no mask file
            is given; see the module docstring).
        mask_fraction: threshold of ``"fraction"`` relative to the 99th-percentile norm.
        chunk_voxels: fingerprints reconstructed per call (bounds the matcher/network memory).
        block_mb: bound on the size of one block read from the file (complex64/float32), MB.
        complex_matching: dictionary matching on complex fingerprints (``|<d, s>|``);
            ``None`` (default): when the series is complex. ``True`` with a real-valued
            (magnitude) series is an error.
        rank: SVD rank for matching (``None``: exhaustive).
        compute_m0: also estimate M0 for network reconstructions (costs one EPG simulation per
            voxel; matching gets M0 for free).
        previews: write PNG previews.
        progress: show a per-slice progress bar.
        device: where the matcher or network runs (``"cpu"``, ``"cuda"``; ``None``: CPU).
        fit_iterations: refine every voxel's estimate by the maximum-likelihood fit of T1, T2
            (and B1) started there, with this many Levenberg-Marquardt iterations
            (:class:`~mrflight.maps.reconstructors.FittedReconstructor`; complex series only);
            0: no fit.
    """

    time_axis: int | None = None
    dataset: str | None = None
    mask_method: str = "snr"
    mask_fraction: float = 0.1
    chunk_voxels: int = 8192
    block_mb: float = 256.0
    complex_matching: bool | None = None
    rank: int | None = None
    compute_m0: bool = True
    previews: bool = True
    progress: bool = True
    device: str | None = None
    fit_iterations: int = 0

    def __post_init__(self) -> None:
        try:
            whole = (not isinstance(self.fit_iterations, bool)
                     and float(self.fit_iterations).is_integer() and self.fit_iterations >= 0)
        except (TypeError, ValueError, OverflowError):
            whole = False
        if not whole:
            raise ValueError(f"maps.fit_iterations must be an integer >= 0 (0: no fit), got "
                             f"{self.fit_iterations!r}")
        self.fit_iterations = int(self.fit_iterations)
        if self.mask_method not in MASK_METHODS:
            raise ValueError(f"maps.mask_method must be one of {', '.join(MASK_METHODS)}, got "
                             f"{self.mask_method!r}")
        if not (is_number(self.mask_fraction) and 0 < float(self.mask_fraction) < 1):
            raise ValueError(f"maps.mask_fraction must lie in (0, 1), got {self.mask_fraction!r}")
        if not (is_number(self.chunk_voxels, whole=True) and float(self.chunk_voxels) >= 1):
            raise ValueError(f"maps.chunk_voxels must be a positive integer, got "
                             f"{self.chunk_voxels!r}")
        if not (is_number(self.block_mb) and float(self.block_mb) > 0):
            raise ValueError(f"maps.block_mb must be positive (MB), got {self.block_mb!r}")
        if self.rank is not None and not (is_number(self.rank, whole=True)
                                          and float(self.rank) >= 1):
            raise ValueError(f"maps.rank must be a positive integer (the SVD rank for matching) "
                             f"or null for exhaustive matching, got {self.rank!r}")
        if self.time_axis is not None and not is_number(self.time_axis, whole=True):
            raise ValueError(f"maps.time_axis must be an axis index (an integer; -1: the last "
                             f"axis) or null to find it from the sequence length, got "
                             f"{self.time_axis!r}")
        self.time_axis = None if self.time_axis is None else int(self.time_axis)
        self.chunk_voxels = int(self.chunk_voxels)
        self.rank = None if self.rank is None else int(self.rank)
        if self.device is not None:
            from mrflight.physics._device import check_device

            try:
                check_device(self.device)
            except ValueError as e:
                raise ValueError(f"maps.device={self.device!r} cannot be used ({e}): set "
                                 "maps.device=cpu or leave it null") from None


@dataclass
class MapResult:
    """Maps of one series, in the input's spatial shape and axis order (time axis removed).

    Attributes:
        t1_ms, t2_ms: float32 maps, ms; NaN outside the mask.
        m0: float32 map, input intensity per unit of simulated fingerprint; NaN outside the mask.
        mask: bool map of the reconstructed voxels.
        norm: float32 map of the fingerprint L2 norms (NaN where not computed).
        time_axis: the time axis of the input.
        mask_info: how the mask was made (method, threshold).
        b1: float32 map of the flip-angle scale (ratio to nominal) where the method estimates
            it (a network trained with B1 as a target, a dictionary with a B1 column), else
            ``None``; NaN outside the mask.
    """

    t1_ms: np.ndarray
    t2_ms: np.ndarray
    m0: np.ndarray
    mask: np.ndarray
    norm: np.ndarray
    time_axis: int
    mask_info: dict = field(default_factory=dict)
    b1: np.ndarray | None = None
