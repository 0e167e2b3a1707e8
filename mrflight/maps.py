"""T1, T2 and M0 maps from a reconstructed MRF image series (one image per time point).

The pipeline, for a series of shape ``space + (T,)`` in any axis order (2-D or 3-D space):

1. **Read lazily** (:mod:`mrflight.series_io`): NIfTI, ``.npy``/``.npz``, MATLAB v7/v7.3, HDF5.
   The whole series is never held in memory: it is read slice by slice (along the spatial axis
   that is slowest on disk) and, within a slice, in blocks of rows of at most ``block_mb`` MB,
   each converted to complex64 (complex data) or float32 (magnitude data). The automatic mask
   needs a first pass over the file (the norms), so a large file is read twice; a series that
   fits in one block is read once. Large ``.nii.gz`` series are slow to read block by block
   (gzip has no random access: every block decompresses from the start of the file unless the
   ``indexed_gzip`` package is installed, which nibabel then uses); prefer ``.nii`` there.
2. **Time axis**: the axis whose length equals the sequence length ``T`` (or ``time_axis`` when
   given). No axis of that length, or several, stops the run with a message naming ``T`` and
   the shape found.
3. **Mask**: a file (non-zero voxels), or automatic, from a first pass that computes for every
   voxel the fingerprint norm ``||s||`` and the norm of its temporal differences ``||Δs||``:
   ``"snr"`` (default) keeps voxels whose temporal SNR ratio ``r = 2 ||s||^2 / ||Δs||^2``
   exceeds ``1 + 5 sqrt(3 / T)``. For white noise ``r`` is 1 (the differences of white noise
   have twice its power) with a relative spread of about ``sqrt(3 / T)``; for a fingerprint
   ``r`` is about ``1 + SNR^2`` because MRF signals change slowly from one TR to the next. The
   threshold is scale-free and does not depend on how much of the image is tissue or on the
   tissue mix (for a magnitude series, whose Rician background noise has a smooth mean, the
   noise ratio is ``2 / (2 - pi / 2) = 4.66`` and the threshold is scaled by it; the magnitude
   SNR must then be correspondingly higher). It assumes smooth fingerprints: a train with
   pulse-to-pulse phase cycling (e.g. alternating bSSFP phases) needs ``"otsu"`` or a mask
   file. ``"otsu"`` puts the threshold at Otsu's between-class-variance optimum of the
   histogram of ``log ||s||`` (fine at high SNR; at per-frame SNR near 1 it can split tissues
   instead of tissue from background);
   ``"fraction"`` keeps ``||s|| > mask_fraction * p99`` (``p99``: the 99th percentile of the
   norms, a robust maximum); ``"none"`` keeps every voxel. All-zero and non-finite fingerprints
   are always excluded. Voxels outside the mask are NaN in every map.
4. **Reconstruct** the masked voxels in chunks of ``chunk_voxels`` fingerprints with a
   :class:`MatchingReconstructor` (dictionary matching; M0 is the matcher's least-squares scale
   of the best atom) or a :class:`NetworkReconstructor` (a trained regressor's
   ``predict_parameters``; M0 is the least-squares scale between the measured fingerprint and
   the fingerprint simulated with :func:`mrflight.physics.simulate` at the predicted T1 and T2,
   ``M0 = |<d, s>| / <d, d>``).
5. **Write** (:func:`write_maps`) into the output folder, for an input ``<stem>.<ext>``:
   ``<stem>_T1map.nii.gz`` and ``<stem>_T2map.nii.gz`` in **seconds** (the BIDS unit),
   ``<stem>_M0map.nii.gz`` (input intensity per unit of simulated fingerprint, i.e. arbitrary
   units), ``<stem>_mask.nii.gz``, a JSON sidecar beside every map (method, checkpoint or
   dictionary, sequence, units, mask, mrflight version), the same maps as ``.npy`` in **ms**
   (``<stem>_T1map_ms.npy``, ``<stem>_T2map_ms.npy``, ``<stem>_M0map.npy``, ``<stem>_mask.npy``,
   with the input's spatial shape and axis order) and PNG previews (Fuderer-processed lipari for
   T1 over 0-3000 ms, navia for T2 over 0-300 ms, via :func:`mrflight.plots.relaxation_colormap`;
   up to 9 slices of a 3-D map).
   A NIfTI input's affine and header are kept (the data type becomes float32); other inputs get
   an identity affine. Every file is written atomically.

Negative network outputs (possible for an untrained or extrapolating regressor) are clipped to 0
ms: a negative relaxation time is not a physical value; non-finite outputs give NaN voxels.

Real-valued series are magnitude images: a real series with a negative value (e.g. the real part
of complex data) is refused with a message saying what to pass instead (the complex series, or
its magnitude ``np.abs(x)``), and ``maps.complex_matching=true`` needs a complex series.

References:
    Ma et al., Magnetic resonance fingerprinting, Nature 2013 (matching and the M0 scale);
    Oksuz et al., Magnetic resonance fingerprinting using recurrent neural networks, ISBI 2019;
    Otsu, A threshold selection method from gray-level histograms, IEEE TSMC 1979 (``"otsu"``);
    Gorgolewski et al., The brain imaging data structure (BIDS), Sci Data 2016 (file names, units).
"""

from __future__ import annotations

import gzip
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import mrflight
from mrflight.config import instantiate, to_plain
from mrflight.fileio import atomic_path
from mrflight.physics import Sequence, simulate
from mrflight.series_io import SeriesSource, open_series, series_stem

__all__ = [
    "MapOptions",
    "MapResult",
    "MatchingReconstructor",
    "NetworkReconstructor",
    "detect_time_axis",
    "otsu_threshold",
    "auto_mask",
    "least_squares_m0",
    "reconstruct_series",
    "write_maps",
    "make_maps",
    "run_maps",
]

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

    def __post_init__(self) -> None:
        if self.mask_method not in MASK_METHODS:
            raise ValueError(f"mask_method must be one of {MASK_METHODS}, got "
                             f"{self.mask_method!r}")
        if not (0 < float(self.mask_fraction) < 1):
            raise ValueError(f"mask_fraction must lie in (0, 1), got {self.mask_fraction}")
        if int(self.chunk_voxels) < 1:
            raise ValueError(f"chunk_voxels must be a positive integer, got {self.chunk_voxels}")
        if not float(self.block_mb) > 0:
            raise ValueError(f"block_mb must be positive, got {self.block_mb}")


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


# ============================================================================ reconstructors
def _to_torch(signals: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(signals)).to(device)


def least_squares_m0(measured: torch.Tensor, simulated: torch.Tensor) -> torch.Tensor:
    """Least-squares scale between measured and simulated fingerprints: ``|<d, s>| / <d, d>``.

    Args:
        measured: ``(N, T)`` complex or real fingerprints ``s``.
        simulated: ``(N, T)`` complex fingerprints ``d`` in units of M0 (``simulate``'s output);
            taken in magnitude when ``measured`` is real.

    Returns:
        ``(N,)`` float32, ``M0 = |sum conj(d) s| / sum |d|^2`` (the magnitude of the complex
        least-squares factor: a global receive phase does not change it); NaN where ``d = 0``.
    """
    d = simulated
    if not measured.is_complex():
        d = d.abs() if d.is_complex() else d
    d = d.to(measured.device)
    if measured.is_complex():
        d = d.to(measured.dtype)
        num = (d.conj() * measured).sum(-1).abs()
    else:
        num = (d.to(measured.dtype) * measured).sum(-1).abs()
    den = (d.abs() ** 2).sum(-1)
    out = num / den
    return torch.where(den > 0, out, torch.full_like(out, float("nan"))).float()


class MatchingReconstructor:
    """Dictionary matching of voxel fingerprints.

    Args:
        matcher: a :class:`mrflight.matching.DictionaryMatcher`.
        sequence: the sequence of the dictionary (for the sidecar; may be ``None``).
        source: the dictionary file (for the sidecar).
    """

    method = "dictionary matching"

    def __init__(self, matcher, sequence: Sequence | None = None, source=None) -> None:
        self.matcher = matcher
        self.sequence = sequence
        self.source = None if source is None else str(source)
        self.length = int(matcher.length)

    @classmethod
    def from_dictionary(cls, dictionary, *, complex_matching: bool = False, rank=None,
                        device=None, source=None) -> MatchingReconstructor:
        """Build a matcher from a :class:`mrflight.dictionary.Dictionary`."""
        from mrflight.matching import DictionaryMatcher

        matcher = DictionaryMatcher(dictionary.atoms, dictionary.params, rank=rank,
                                    complex_matching=complex_matching, device=device)
        seq = dictionary.get_sequence() if hasattr(dictionary, "get_sequence") else None
        return cls(matcher, seq, source)

    def __call__(self, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T)`` fingerprints -> (``(N, P)`` T1, T2 in ms[, B1], ``(N,)`` M0), float32
        numpy; B1 where the dictionary has a third (B1) column."""
        params, m0 = self.matcher.match(_to_torch(signals, self.matcher.device), return_m0=True)
        return (params[:, :3].float().cpu().numpy(),
                m0.abs().float().cpu().numpy())

    def describe(self) -> dict:
        return {"EstimationMethod": self.method,
                "Dictionary": self.source,
                "DictionaryAtoms": int(self.matcher.n_atoms),
                "MatchingRank": self.matcher.rank,
                "ComplexMatching": bool(self.matcher.complex_matching),
                "M0Method": "least-squares scale of the best-matching atom: <d, s> / <d, d>"}


class NetworkReconstructor:
    """A trained regressor (``predict_parameters``) plus the least-squares M0.

    Args:
        module: an object with ``predict_parameters(signals (N, T)) -> (N, 2)`` T1, T2 in ms
            (the LightningModule from :func:`mrflight.load_checkpoint`).
        sequence: the training sequence (needed for M0 and to check the series length); default
            ``module.hparams["sequence"]`` when present.
        compute_m0: simulate the fingerprint at the predicted T1/T2 to estimate M0 (else M0 NaN).
        source: the checkpoint path (for the sidecar).
    """

    method = "neural network regression"

    def __init__(self, module, sequence: Sequence | None = None, compute_m0: bool = True,
                 source=None) -> None:
        self.module = module
        if sequence is None:
            sequence = _sequence_from_hparams(module)
        if sequence is None:
            raise ValueError("the network carries no training sequence (hparams['sequence']); "
                             "pass sequence=... so the series length and M0 can be checked")
        self.sequence = sequence
        self.length = len(sequence)
        self.compute_m0 = bool(compute_m0)
        self.source = None if source is None else str(source)
        if hasattr(module, "eval"):
            module.eval()

    def _device(self):
        dev = getattr(self.module, "device", None)
        if dev is None:
            try:
                dev = next(self.module.parameters()).device
            except (AttributeError, StopIteration):
                dev = torch.device("cpu")
        return dev

    @torch.no_grad()
    def __call__(self, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T)`` fingerprints -> (``(N, P)`` T1, T2 in ms[, B1], ``(N,)`` M0), float32
        numpy; B1 (ratio to nominal) for networks that estimate it."""
        s = _to_torch(signals, self._device())
        pred = self.module.predict_parameters(s)
        pred = torch.as_tensor(pred).detach().float().cpu()[:, :3].clamp_min(0.0)
        pred[~torch.isfinite(pred)] = float("nan")  # an overflowed output is no estimate
        params = pred.numpy()
        if not self.compute_m0:
            return params, np.full(len(params), np.nan, np.float32)
        ok = torch.isfinite(pred).all(1)
        m0 = torch.full((len(pred),), float("nan"))
        if bool(ok.any()):
            b1 = pred[ok, 2] if pred.shape[1] > 2 else None
            sim = simulate(self.sequence, pred[ok, 0], pred[ok, 1], b1)
            m0[ok] = least_squares_m0(s[ok.to(s.device)].cpu(), sim)
        return params, m0.numpy()

    def describe(self) -> dict:
        return {"EstimationMethod": self.method,
                "Checkpoint": self.source,
                "Network": type(_network(self.module)).__name__,
                "M0Method": ("least-squares scale |<d, s>| / <d, d> between the measured "
                             "fingerprint s and the EPG fingerprint d simulated at the predicted "
                             "T1, T2" if self.compute_m0 else "not computed")}


def _network(module):
    """The regressor inside a LightningModule (``.net``), else the module itself."""
    for attr in ("net", "model"):
        inner = getattr(module, attr, None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return module


def _sequence_from_hparams(module) -> Sequence | None:
    hp = getattr(module, "hparams", None)
    if hp is None:
        return None
    for key in ("sequence", "sequence_dict", "seq"):
        try:
            val = hp.get(key) if hasattr(hp, "get") else getattr(hp, key, None)
        except Exception:
            val = None
        if isinstance(val, Sequence):
            return val
        if val is not None and hasattr(val, "keys") and "flip_angle_deg" in val:
            d = {k: (list(v) if not isinstance(v, (str, int, float, bool)) else v)
                 for k, v in dict(val).items()}
            return Sequence.from_dict(d)
    return None


# ============================================================================ axes, mask
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
            raise ValueError(f"time_axis={time_axis} is out of range for shape {shape}")
        ax %= len(shape)
        if shape[ax] != length:
            raise ValueError(f"time_axis={time_axis} has {shape[ax]} points but the sequence has "
                             f"{length}; the series (shape {shape}) does not match the sequence "
                             f"-- use the sequence the series was acquired with")
        return ax
    hits = [i for i, s in enumerate(shape) if s == length]
    if not hits:
        raise ValueError(f"no axis of the series (shape {shape}) has the sequence length "
                         f"{length}: the series does not match the sequence -- use the sequence "
                         f"(or checkpoint/dictionary) the series was acquired with")
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
        return valid & (ratio > thr), {
            "Method": "temporal SNR: 2 ||s||^2 / ||diff(s)||^2 > 1 + 5 sqrt(3 / T) (about 1 for "
                      "white noise, 1 + SNR^2 for a smooth fingerprint)",
            "Threshold": float(thr)}
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


def _load_mask(mask, spatial_shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(mask, (str, os.PathLike)):
        p = Path(mask)
        if p.name.lower().endswith((".nii", ".nii.gz")):
            import nibabel as nib

            arr = np.asarray(nib.load(str(p)).dataobj)
        else:
            with open_series(p) as src:
                arr = src.read(tuple(slice(None) for _ in src.shape))
    else:
        arr = np.asarray(mask)
    arr = np.asarray(arr)
    if arr.shape != spatial_shape:
        squeezed = arr.reshape([s for s in arr.shape if s != 1])
        want = [s for s in spatial_shape if s != 1]
        if list(squeezed.shape) != want:
            raise ValueError(f"mask has shape {arr.shape} but the series' spatial shape is "
                             f"{spatial_shape}; give a mask of the image grid")
        arr = squeezed.reshape(spatial_shape)
    arr = np.nan_to_num(arr.real if np.iscomplexobj(arr) else arr.astype(np.float64))
    return arr != 0


# ============================================================================ reading in blocks
def _plan(shape, time_axis: int, order: str, itemsize: int, block_bytes: float):
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


def _iter_blocks(shape, time_axis, slice_axis, row_axis, rows):
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


def _block_signals(src: SeriesSource, idx, time_axis: int) -> np.ndarray:
    """Read a block and return it as ``(n_voxels, T)`` in the spatial C order of the block."""
    blk = src.read(idx)
    t_pos = time_axis - sum(isinstance(i, int) for i in idx[:time_axis])
    blk = np.moveaxis(blk, t_pos, -1)
    return blk.reshape(-1, blk.shape[-1])


def _check_real_block(src: SeriesSource, sig: np.ndarray) -> None:
    """A real-valued series must be a magnitude: refuse a block with negative values."""
    if src.is_complex or not sig.size:
        return
    from mrflight.matching import check_magnitude

    finite = np.isfinite(sig)  # non-finite voxels are excluded from the maps anyway
    low = sig.min() if finite.all() else (sig[finite].min() if finite.any() else 0.0)
    check_magnitude(float(low), f"the series {src.describe()}")


def _progress(enabled: bool):
    from mrflight.progress import progress_bar

    return progress_bar() if enabled else None


# ============================================================================ reconstruction
def reconstruct_series(series, reconstructor, *, time_axis: int | None = None, mask=None,
                       mask_method: str = "snr", mask_fraction: float = 0.1,
                       chunk_voxels: int = 8192, block_mb: float = 256.0,
                       dataset: str | None = None, progress: bool = False) -> MapResult:
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
                            mask_fraction, int(chunk_voxels), float(block_mb), progress)
    finally:
        if own:
            src.close()


def _reconstruct(src, rec, length, time_axis, mask, mask_method, mask_fraction, chunk_voxels,
                 block_mb, progress) -> MapResult:
    shape = src.shape
    t_ax = detect_time_axis(shape, length, time_axis)
    if src.is_nifti and t_ax != len(shape) - 1:
        warnings.warn(f"the NIfTI series has its time axis at {t_ax}, not last: the affine of the "
                      "maps may not describe their axes", RuntimeWarning, stacklevel=3)
    itemsize = 8 if src.is_complex else 4
    spatial, slice_axis, row_axis, rows = _plan(shape, t_ax, src.order, itemsize,
                                                block_mb * 2**20)
    sshape = tuple(shape[a] for a in spatial)
    n_slices = shape[slice_axis] if slice_axis is not None else 1
    norm = np.full(sshape, np.nan, np.float32)
    dnorm = np.full(sshape, np.nan, np.float32)
    non_negative = not src.is_complex  # a magnitude series (checked): Rician background noise
    t1 = np.full(sshape, np.nan, np.float32)
    t2 = np.full(sshape, np.nan, np.float32)
    m0 = np.full(sshape, np.nan, np.float32)
    b1 = None  # created when the method returns a B1 column
    blocks = list(_iter_blocks(shape, t_ax, slice_axis, row_axis, rows))
    total_bytes = itemsize * int(np.prod(shape, dtype=np.int64))
    cache: dict[int, np.ndarray] | None = {} if total_bytes <= block_mb * 2**20 else None

    bar = _progress(progress)
    if bar is not None:
        bar.start()
    try:
        if mask is None:
            task = bar.add_task("fingerprint norms", total=n_slices) if bar else None
            last = -1
            for i, (k, idx, sp) in enumerate(blocks):
                sig = _block_signals(src, idx, t_ax)
                if cache is not None:
                    cache[i] = sig
                with np.errstate(invalid="ignore", over="ignore"):
                    nb = np.linalg.norm(sig, axis=1).astype(np.float32)
                    db = np.linalg.norm(np.diff(sig, axis=1), axis=1).astype(np.float32)
                norm[sp] = nb.reshape(norm[sp].shape)
                dnorm[sp] = db.reshape(norm[sp].shape)
                _check_real_block(src, sig)
                if bar is not None and k != last:
                    bar.update(task, completed=k + 1)
                    last = k
            mask_arr, info = auto_mask(norm, mask_method, mask_fraction, diff_norm=dnorm,
                                       length=length, magnitude=non_negative)
        else:
            mask_arr = _load_mask(mask, sshape)
            info = {"Method": "file" if isinstance(mask, (str, os.PathLike)) else "array",
                    "Source": str(mask) if isinstance(mask, (str, os.PathLike)) else None}
        task = bar.add_task("reconstructing slices", total=n_slices) if bar else None
        n_bad = 0
        for i, (k, idx, sp) in enumerate(blocks):
            mblk = mask_arr[sp].reshape(-1)
            if mblk.any():
                sig = cache.pop(i, None) if cache is not None else None
                if sig is None:
                    sig = _block_signals(src, idx, t_ax)
                sel = np.flatnonzero(mblk)
                sig = sig[sel]
                finite = np.isfinite(sig).all(axis=1)
                with np.errstate(invalid="ignore", over="ignore"):
                    nrm = np.linalg.norm(np.where(finite[:, None], sig, 0), axis=1)
                good = finite & (nrm > 0)
                n_bad += int((~good).sum())
                sel, sig = sel[good], sig[good]
                _check_real_block(src, sig)
                out_t1 = np.full(mblk.size, np.nan, np.float32)
                out_t2 = out_t1.copy()
                out_m0 = out_t1.copy()
                out_b1 = out_t1.copy()
                for c in range(0, len(sel), chunk_voxels):
                    p, a = rec(sig[c: c + chunk_voxels])
                    j = sel[c: c + chunk_voxels]
                    out_t1[j], out_t2[j], out_m0[j] = p[:, 0], p[:, 1], a
                    if p.shape[1] > 2:
                        if b1 is None:
                            b1 = np.full(sshape, np.nan, np.float32)
                        out_b1[j] = p[:, 2]
                bshape = t1[sp].shape
                t1[sp] = out_t1.reshape(bshape)
                t2[sp] = out_t2.reshape(bshape)
                m0[sp] = out_m0.reshape(bshape)
                if b1 is not None:
                    b1[sp] = out_b1.reshape(bshape)
                if mask is not None:
                    nb = np.full(mblk.size, np.nan, np.float32)
                    nb[sel] = nrm[good]
                    norm[sp] = nb.reshape(bshape)
            if bar is not None:
                bar.update(task, completed=k + 1)
    finally:
        if bar is not None:
            bar.stop()
    if n_bad:
        warnings.warn(f"{n_bad} masked voxel(s) had all-zero or non-finite fingerprints; their "
                      "maps are NaN", RuntimeWarning, stacklevel=3)
    final_mask = mask_arr & np.isfinite(t1) & np.isfinite(t2)
    for arr in (t1, t2, m0) + (() if b1 is None else (b1,)):
        arr[~final_mask] = np.nan
    return MapResult(t1, t2, m0, final_mask, norm, t_ax, info, b1)


# ============================================================================ writing
def _write_bytes(dest: Path, data: bytes) -> None:
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def _save_nifti(dest: Path, data: np.ndarray, affine, header, image_class) -> None:
    import nibabel as nib

    vol = np.asarray(data)
    if vol.dtype == bool:
        vol = vol.astype(np.uint8)
    else:
        vol = vol.astype(np.float32)
    while vol.ndim < 3:
        vol = vol[..., None]
    if header is not None:
        hdr = header.copy()
        hdr.set_data_dtype(vol.dtype)
        cls = image_class or nib.Nifti1Image
        img = cls(vol, affine, header=hdr)
        img.header.set_slope_inter(1.0, 0.0)
    else:
        img = nib.Nifti1Image(vol, np.eye(4) if affine is None else affine)
        img.header.set_xyzt_units("mm")
    finite = vol[np.isfinite(vol)] if vol.dtype.kind == "f" else vol
    img.header["cal_min"] = float(finite.min()) if finite.size else 0.0
    img.header["cal_max"] = float(finite.max()) if finite.size else 0.0
    raw = img.to_bytes()
    if dest.name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=6, mtime=0)
    _write_bytes(dest, raw)


def _save_npy(dest: Path, arr: np.ndarray) -> None:
    with atomic_path(dest) as tmp, open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


def _save_json(dest: Path, obj: dict) -> None:
    _write_bytes(dest, (json.dumps(obj, indent=2, default=str) + "\n").encode())


#: display levels of the previews, ms (those of :func:`mrflight.plots.parameter_maps`)
PREVIEW_LEVELS_MS = {"T1": (0.0, 3000.0), "T2": (0.0, 300.0)}


def _cmap_and_values(kind: str, v: np.ndarray):
    """Colour map, norm and display values for a preview (Fuderer-processed lipari/navia)."""
    from matplotlib.colors import Normalize

    if kind in PREVIEW_LEVELS_MS:
        lo, hi = PREVIEW_LEVELS_MS[kind]
        try:
            from mrflight.plots import relaxation_colormap

            cmap = relaxation_colormap(kind, lo, hi)
            return cmap, cmap.norm, cmap.prepare
        except ImportError:  # plots not available: plain lipari/navia
            from cmcrameri import cm

            cmap = {"T1": cm.lipari, "T2": cm.navia}[kind].with_extremes(bad="black")
            return cmap, Normalize(lo, hi), lambda x: x
    import matplotlib.pyplot as plt

    if kind == "B1":  # ratio to nominal: a fixed diverging scale centred on 1
        return (plt.get_cmap("RdBu_r").with_extremes(bad="black"), Normalize(0.6, 1.4),
                lambda x: x)
    fin = v[np.isfinite(v)]
    hi = float(np.percentile(fin, 99)) if fin.size else 1.0
    return (plt.get_cmap("gray").with_extremes(bad="black"), Normalize(0.0, hi if hi > 0 else 1.0),
            lambda x: x)


def _save_preview(dest: Path, vol: np.ndarray, kind: str, unit: str, title: str,
                  nifti_like: bool) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    v = np.asarray(vol, dtype=np.float32)
    while v.ndim < 3:
        v = v[..., None]
    n = v.shape[2]
    picks = np.unique(np.linspace(0, n - 1, min(n, 9)).round().astype(int))
    cols = int(np.ceil(np.sqrt(len(picks))))
    rows = int(np.ceil(len(picks) / cols))
    cmap, norm, prepare = _cmap_and_values(kind, v)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols + 0.8, 3 * rows), squeeze=False)
    im = None
    for ax in axes.ravel():
        ax.axis("off")
    for ax, z in zip(axes.ravel(), picks):
        sl = prepare(v[:, :, z])
        im = ax.imshow(sl.T if nifti_like else sl, origin="lower" if nifti_like else "upper",
                       cmap=cmap, norm=norm, interpolation="nearest")
        if len(picks) > 1:
            ax.set_title(f"slice {z}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=unit)
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write_maps(result: MapResult, out_dir, stem: str, *, source: SeriesSource | None = None,
               metadata: dict | None = None, previews: bool = True) -> dict[str, Path]:
    """Write the maps as NIfTI (seconds), ``.npy`` (ms), JSON sidecars and PNG previews.

    Args:
        result: the maps from :func:`reconstruct_series`.
        out_dir: the output folder (created).
        stem: file name stem (``<stem>_T1map.nii.gz`` ...).
        source: the input series; its NIfTI affine and header are kept when it has them.
        metadata: extra sidecar entries (method, checkpoint/dictionary, sequence ...).
        previews: also write PNG previews.

    Returns:
        ``{name: path}`` of every file written (keys like ``"T1map.nii.gz"``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = header = image_class = None
    if source is not None and source.is_nifti:
        affine, header, image_class = source.affine, source.header, source.image_class
    base = {
        "Software": "mrflight",
        "SoftwareVersion": mrflight.__version__,
        "SourceFile": None if source is None or source.path is None else str(source.path),
        "TimeAxis": int(result.time_axis),
        "Mask": result.mask_info,
        "MaskedVoxels": int(result.mask.sum()),
        "AffineFrom": "input NIfTI" if header is not None else "identity (input is not NIfTI)",
    }
    base.update(metadata or {})
    written: dict[str, Path] = {}
    maps = {
        "T1map": (result.t1_ms, "s", 1e-3, "ms", f"{stem}_T1map_ms.npy"),
        "T2map": (result.t2_ms, "s", 1e-3, "ms", f"{stem}_T2map_ms.npy"),
        "M0map": (result.m0, "arbitrary", 1.0, "arbitrary", f"{stem}_M0map.npy"),
    }
    if result.b1 is not None:  # BIDS TB1map: the flip-angle scale, ratio to nominal
        maps["TB1map"] = (result.b1, "1", 1.0, "ratio", f"{stem}_TB1map.npy")
    for suffix, (arr_ms, unit, scale, npy_unit, npy_name) in maps.items():
        nii = out / f"{stem}_{suffix}.nii.gz"
        _save_nifti(nii, arr_ms * scale, affine, header, image_class)
        written[f"{suffix}.nii.gz"] = nii
        npy = out / npy_name
        _save_npy(npy, arr_ms.astype(np.float32))
        written[f"{suffix}.npy"] = npy
        side = dict(base)
        side.update({"MapType": suffix, "Units": unit, "NumpyFile": npy_name,
                     "NumpyUnits": npy_unit,
                     "Description": {"T1map": "longitudinal relaxation time T1",
                                     "T2map": "transverse relaxation time T2",
                                     "M0map": "proton density scale M0 (input intensity per "
                                              "unit of simulated fingerprint)",
                                     "TB1map": "flip-angle scale B1 (actual / nominal flip "
                                               "angle)"}[suffix],
                     "BackgroundValue": "NaN"})
        js = out / f"{stem}_{suffix}.json"
        _save_json(js, side)
        written[f"{suffix}.json"] = js
        if previews:
            png = out / f"{stem}_{suffix}.png"
            kind = {"M0map": "M0", "TB1map": "B1"}.get(suffix, suffix[:2])
            _save_preview(png, arr_ms, kind, npy_unit, f"{stem} {suffix[:2]} ({npy_unit})",
                          header is not None)
            written[f"{suffix}.png"] = png
    mask_nii = out / f"{stem}_mask.nii.gz"
    _save_nifti(mask_nii, result.mask, affine, header, image_class)
    written["mask.nii.gz"] = mask_nii
    mask_npy = out / f"{stem}_mask.npy"
    _save_npy(mask_npy, result.mask)
    written["mask.npy"] = mask_npy
    return written


def _sequence_meta(seq: Sequence | None, length: int) -> dict:
    if seq is None:
        return {"SequenceName": None, "SequenceLength": int(length)}
    return {"SequenceName": seq.name, "SequenceLength": len(seq),
            "SequenceFingerprint": seq.fingerprint(),
            "RepetitionTime_ms": [float(seq.tr_ms.min()), float(seq.tr_ms.max())],
            "EchoTime_ms": float(seq.te_ms),
            "FlipAngle_deg": [float(seq.flip_angle_deg.min()), float(seq.flip_angle_deg.max())]}


def make_maps(input_path, reconstructor, out_dir, *, options: MapOptions | None = None,
              mask=None, stem: str | None = None) -> dict[str, Path]:
    """Read a series file, reconstruct it and write every output (the plain-Python entry point).

    Args:
        input_path: the image series file.
        reconstructor: :class:`MatchingReconstructor` or :class:`NetworkReconstructor`.
        out_dir: output folder.
        options: :class:`MapOptions` (default options when ``None``).
        mask: a mask file/array, or ``None`` for the automatic mask.
        stem: output name stem (default: the input's name without suffix).

    Returns:
        ``{name: path}`` of the files written.
    """
    opt = options or MapOptions()
    with open_series(input_path, dataset=opt.dataset, length=reconstructor.length) as src:
        result = reconstruct_series(src, reconstructor, time_axis=opt.time_axis, mask=mask,
                                    mask_method=opt.mask_method, mask_fraction=opt.mask_fraction,
                                    chunk_voxels=opt.chunk_voxels, block_mb=opt.block_mb,
                                    progress=opt.progress)
        meta = dict(reconstructor.describe())
        meta.update(_sequence_meta(getattr(reconstructor, "sequence", None),
                                   reconstructor.length))
        meta["InputShape"] = list(src.shape)
        meta["InputComplex"] = bool(src.is_complex)
        return write_maps(result, out_dir, stem or series_stem(input_path), source=src,
                          metadata=meta, previews=opt.previews)


# ============================================================================ config glue
def _as_dict(node) -> dict:
    return {} if node is None else dict(to_plain(node))


def _cfg_get(cfg, key, default=None):
    try:
        val = cfg.get(key, default)
    except Exception:
        val = getattr(cfg, key, default)
    return default if val is None else val


def run_maps(cfg) -> dict[str, Path]:
    """Body of ``python eval.py input=PATH ckpt_path=CKPT`` (or ``dictionary=PATH``).

    Reads from ``cfg``: ``input`` (the series), ``ckpt_path`` or ``dictionary`` (a dictionary
    file, or ``paper`` for the paper's grid simulated with ``cfg.sequence`` and cached),
    ``mask`` (optional file), ``maps`` (a :class:`MapOptions` node, optional), ``sequence``
    (used only when the checkpoint/dictionary carries none), and the output folder
    ``paths.output_dir`` (else ``output_dir``, else the current directory).

    Returns:
        ``{name: path}`` of the files written.
    """
    inp = _cfg_get(cfg, "input")
    if not inp:
        raise ValueError("input=PATH is required: the image series to reconstruct")
    opts = _as_dict(_cfg_get(cfg, "maps"))
    opts.pop("_target_", None)
    options = MapOptions(**opts)
    ckpt, dic = _cfg_get(cfg, "ckpt_path"), _cfg_get(cfg, "dictionary")
    if bool(ckpt) == bool(dic):
        raise ValueError("give exactly one of ckpt_path=CKPT (a trained network) or "
                         "dictionary=PATH (dictionary matching) with input=...")
    def cfg_sequence() -> Sequence | None:  # only built when needed (it may be incomplete)
        node = _cfg_get(cfg, "sequence")
        return None if node is None else instantiate(node, _convert_="all")

    device = options.device or "cpu"
    if ckpt:
        if Path(str(ckpt)).expanduser().is_dir():  # a training run dir: its best checkpoint
            from mrflight.checkpoints import find_checkpoints

            found = find_checkpoints(ckpt)
            if len(found) > 1:
                listed = ", ".join(map(str, found))
                raise ValueError(f"ckpt_path={ckpt} holds several runs ({listed}); give one "
                                 "checkpoint or run directory for maps")
            ckpt = str(found[0])
        module = mrflight.load_checkpoint(str(ckpt), map_location=device)
        seq = _sequence_from_hparams(module) or cfg_sequence()
        rec = NetworkReconstructor(module, seq, compute_m0=options.compute_m0, source=ckpt)
    else:
        from mrflight import dictionary as dmod

        if str(dic) == "paper":
            seq = cfg_sequence()
            if seq is None:
                raise ValueError("dictionary=paper needs a sequence config to simulate with")
            d = dmod.generate(seq, dmod.paper_grid(), cache_dir=True,
                              progress=options.progress)
        else:
            d = dmod.load(str(dic))
        with open_series(inp, dataset=options.dataset, length=d.n_timepoints) as src:
            is_complex = src.is_complex
        cm = is_complex if options.complex_matching is None else bool(options.complex_matching)
        if cm and not is_complex:
            raise ValueError(f"maps.complex_matching=true needs a complex series, but {inp} is "
                             "real-valued (read as a magnitude): pass the complex series, or "
                             "drop maps.complex_matching")
        rec = MatchingReconstructor.from_dictionary(d, complex_matching=cm and is_complex,
                                                    rank=options.rank, device=device,
                                                    source=dic)
        if rec.sequence is None:  # only for the sidecar: the dictionary fixes the length
            try:
                seq = cfg_sequence()
            except Exception:  # an incomplete sequence config must not stop matching
                seq = None
            rec.sequence = seq if seq is not None and len(seq) == rec.length else None
    out_dir = _output_dir(cfg)
    files = make_maps(inp, rec, out_dir, options=options, mask=_cfg_get(cfg, "mask"))
    print(f"maps written to {out_dir}:")
    for name in sorted(files):
        print(f"  {files[name]}")
    return files


def _output_dir(cfg) -> Path:
    paths = _cfg_get(cfg, "paths")
    if paths is not None and _cfg_get(paths, "output_dir"):
        return Path(str(_cfg_get(paths, "output_dir")))
    if _cfg_get(cfg, "output_dir"):
        return Path(str(_cfg_get(cfg, "output_dir")))
    return Path.cwd()


def options_dict(options: MapOptions) -> dict:
    """The options as a plain dict (for logs)."""
    return asdict(options)
