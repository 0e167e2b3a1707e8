"""Maps of one series file, read, reconstructed and written: :func:`make_maps`."""

from __future__ import annotations

import warnings
from pathlib import Path

from mrflight.maps.options import MapOptions
from mrflight.maps.reconstruct import reconstruct_series
from mrflight.maps.writers import check_outputs_free, write_maps
from mrflight.physics import Sequence
from mrflight.series_io import open_series, series_stem

__all__ = ["make_maps"]


def _sequence_meta(seq: Sequence | None, length: int) -> dict:
    if seq is None:
        return {"SequenceName": None, "SequenceLength": int(length)}
    return {"SequenceName": seq.name, "SequenceLength": len(seq),
            "SequenceFingerprint": seq.fingerprint(),
            "RepetitionTime_ms": [float(seq.tr_ms.min()), float(seq.tr_ms.max())],
            "EchoTime_ms": float(seq.te_ms),
            "FlipAngle_deg": [float(seq.flip_angle_deg.min()), float(seq.flip_angle_deg.max())]}


def make_maps(input_path, reconstructor, out_dir, *, options: MapOptions | None = None,
              mask=None, stem: str | None = None, b1map=None) -> dict[str, Path]:
    """Read a series file, reconstruct it and write every output (the plain-Python entry point).

    Args:
        input_path: the image series file.
        reconstructor: :class:`MatchingReconstructor` or :class:`NetworkReconstructor`.
        out_dir: output folder.
        options: :class:`MapOptions` (default options when ``None``).
        mask: a mask file/array, or ``None`` for the automatic mask.
        stem: output name stem (default: the input's name without suffix).
        b1map: a measured B1 map on the series' grid (file or array, ratio to nominal): matching
            is restricted to the dictionary's B1 nearest to it in every voxel.

    Returns:
        ``{name: path}`` of the files written.

    Raises:
        ValueError: bad input, or ``out_dir`` already holds a file the maps would be written to
            (checked before any work: nothing is overwritten).
    """
    opt = options or MapOptions()
    stem = stem or series_stem(input_path)
    check_outputs_free(out_dir, stem, opt.previews)
    if hasattr(reconstructor, "reset_noise"):
        reconstructor.reset_noise()
    with open_series(input_path, dataset=opt.dataset, length=reconstructor.length) as src:
        with warnings.catch_warnings(record=True) as caught:  # kept in the sidecars too
            warnings.simplefilter("always")
            result = reconstruct_series(src, reconstructor, time_axis=opt.time_axis, mask=mask,
                                        mask_method=opt.mask_method,
                                        mask_fraction=opt.mask_fraction,
                                        chunk_voxels=opt.chunk_voxels, block_mb=opt.block_mb,
                                        progress=opt.progress, b1map=b1map)
        once: dict = {}  # each message once, as outside the recording
        for w in caught:
            once.setdefault((str(w.message), w.category), w)
        for w in once.values():
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        said = [m for m, cat in once if issubclass(cat, RuntimeWarning)]
        meta = dict(reconstructor.describe())
        for check in ("noise_warning", "range_warning"):
            warning = getattr(reconstructor, check, lambda: None)()
            if warning:
                warnings.warn(warning, stacklevel=2)
                said.append(warning)
        if said:
            meta["Warnings"] = said
        meta.update(_sequence_meta(getattr(reconstructor, "sequence", None),
                                   reconstructor.length))
        meta["InputShape"] = list(src.shape)
        meta["InputComplex"] = bool(src.is_complex)
        return write_maps(result, out_dir, stem, source=src, metadata=meta,
                          previews=opt.previews)
