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
3. **Mask**: a file (non-zero voxels of a 0/1, boolean or label mask; values between 0 and 1
   and an all-zero mask are refused), or automatic, from a first pass that computes for every
   voxel the fingerprint norm ``||s||`` and the norm of its temporal differences ``||Δs||``:
   ``"snr"`` (default) keeps voxels whose temporal SNR ratio ``r = 2 ||s||^2 / ||Δs||^2``
   exceeds ``1 + 5 sqrt(3 / T)``. For white noise ``r`` is 1 (the differences of white noise
   have twice its power) with a standard deviation of ``sqrt(0.5 / T)`` (complex data; the
   threshold lies 12 of them above it); for a fingerprint ``r`` is about ``1 + SNR^2``
   (complex: ``1 + 1 / (2 T rel^2)`` at noise ``rel`` relative to the fingerprint norm, so
   tissue noisier than ``rel = 0.037`` at ``T = 1750`` cannot pass) because MRF signals change
   slowly from one TR to the next. Voxels left out although their ``r`` stands more than 3
   standard deviations above the noise (low-SNR tissue) are counted (``LeftOutAboveNoise`` in
   the sidecars) and, beyond 5 % of the mask, warned about, naming ``mask=FILE``. The
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
   are always excluded (a warning counts the non-finite ones). Voxels outside the mask are NaN
   in every map.
4. **Reconstruct** the masked voxels in chunks of ``chunk_voxels`` fingerprints with a
   :class:`MatchingReconstructor` (dictionary matching; M0 is the matcher's least-squares scale
   of the best atom) or a :class:`NetworkReconstructor` (a trained regressor's
   ``predict_parameters``; M0 is the least-squares scale between the measured fingerprint and
   the fingerprint simulated with :func:`mrflight.physics.simulate` at the predicted T1 and T2,
   ``M0 = |<d, s>| / <d, d>``). With ``maps.fit_iterations=K`` (complex series) either is
   followed by a :class:`FittedReconstructor`: the maximum-likelihood fit of T1, T2 (and B1, or
   at the measured B1 of ``b1map=FILE``) started at its estimates, ``K`` Levenberg-Marquardt
   iterations per voxel (:func:`mrflight.physics.fit.fit`), M0 at the fitted parameters.
5. **Write** (:func:`write_maps`) into the output folder, which must hold none of the files
   below (checked before any reconstruction, so a mask or B1 map named like an output, e.g.
   ``<stem>_mask.nii.gz``, is never overwritten), for an input ``<stem>.<ext>``:
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

Modules: :mod:`~mrflight.maps.options` (:class:`MapOptions`, :class:`MapResult`),
:mod:`~mrflight.maps.masks` (time axis, masks), :mod:`~mrflight.maps.reconstructors`,
:mod:`~mrflight.maps.blocks` (the block planner), :mod:`~mrflight.maps.reconstruct`
(:func:`reconstruct_series`), :mod:`~mrflight.maps.writers` (:func:`write_maps`) and
:mod:`~mrflight.maps.make` (:func:`make_maps`). The package takes typed options only; ``eval.py
input=...`` builds them from its Hydra config in :mod:`mrflight.eval_entry`.
"""

from mrflight.maps.make import make_maps
from mrflight.maps.masks import auto_mask, detect_time_axis, load_mask, otsu_threshold
from mrflight.maps.options import MASK_METHODS, MapOptions, MapResult
from mrflight.maps.reconstruct import reconstruct_series
from mrflight.maps.reconstructors import (
    FittedReconstructor,
    MatchingReconstructor,
    NetworkReconstructor,
    least_squares_m0,
    relative_noise,
)
from mrflight.maps.writers import write_maps

__all__ = [
    "MASK_METHODS",
    "MapOptions",
    "MapResult",
    "FittedReconstructor",
    "MatchingReconstructor",
    "NetworkReconstructor",
    "detect_time_axis",
    "otsu_threshold",
    "auto_mask",
    "load_mask",
    "least_squares_m0",
    "relative_noise",
    "reconstruct_series",
    "write_maps",
    "make_maps",
]
