"""Writing maps: NIfTI (seconds), ``.npy`` (ms), JSON sidecars and PNG previews, atomically."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

import mrflight
from mrflight.fileio import atomic_path
from mrflight.maps.options import MapResult
from mrflight.series_io import SeriesSource

__all__ = ["write_maps", "check_outputs_free", "PREVIEW_LEVELS_MS"]


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
        hdr.set_intent("none", (), "")  # a map: not the input's vector/time-series intent
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
    # values above the display range are drawn in the top colour: say so with an arrow
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8, label=unit,
                 extend="both" if kind == "B1" else "max")
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=150)
    plt.close(fig)


#: the maps: (NIfTI unit, scale from the map to it, ``.npy`` unit, ``.npy`` name after the stem)
_MAPS = {"T1map": ("s", 1e-3, "ms", "T1map_ms.npy"),
         "T2map": ("s", 1e-3, "ms", "T2map_ms.npy"),
         "M0map": ("arbitrary", 1.0, "arbitrary", "M0map.npy"),
         "TB1map": ("1", 1.0, "ratio", "TB1map.npy")}  # BIDS: flip-angle scale, ratio to nominal


def _map_names(stem: str, suffix: str, previews: bool) -> dict[str, str]:
    """``{key: file name}`` of one map (``suffix``: a key of ``_MAPS``, or ``"mask"``)."""
    if suffix == "mask":
        return {"mask.nii.gz": f"{stem}_mask.nii.gz", "mask.npy": f"{stem}_mask.npy"}
    names = {f"{suffix}.nii.gz": f"{stem}_{suffix}.nii.gz",
             f"{suffix}.npy": f"{stem}_{_MAPS[suffix][3]}",
             f"{suffix}.json": f"{stem}_{suffix}.json"}
    if previews:
        names[f"{suffix}.png"] = f"{stem}_{suffix}.png"
    return names


def check_outputs_free(out_dir, stem: str, previews: bool = True) -> None:
    """Refuse an output folder that already holds a file the maps of ``stem`` could be written
    to (a B1 map or mask of the same name given as input, an earlier run's maps): nothing is
    overwritten.

    Raises:
        ValueError: listing those files, naming ``paths.output_dir`` and the fix.
    """
    out = Path(out_dir)
    taken = [name for suffix in (*_MAPS, "mask")
             for name in _map_names(stem, suffix, previews).values() if (out / name).exists()]
    if taken:
        raise ValueError(f"paths.output_dir={out} already holds {', '.join(taken)}, which the "
                         "maps would overwrite: give another paths.output_dir (each run gets a "
                         "new one by default)")


def write_maps(result: MapResult, out_dir, stem: str, *, source: SeriesSource | None = None,
               metadata: dict | None = None, previews: bool = True) -> dict[str, Path]:
    """Write the maps as NIfTI (seconds), ``.npy`` (ms), JSON sidecars and PNG previews, into
    a folder that holds none of their files (:func:`check_outputs_free`).

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
    check_outputs_free(out_dir, stem, previews)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    affine = header = image_class = None
    if source is not None and source.is_nifti:
        affine, header, image_class = source.affine, source.header, source.image_class
    nifti = (affine, header, image_class)
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
    arrays = {"T1map": result.t1_ms, "T2map": result.t2_ms, "M0map": result.m0,
              "TB1map": result.b1}
    for suffix, arr in arrays.items():
        if arr is not None:
            written.update(_write_map(out, stem, suffix, arr, base, nifti, previews))
    names = {k: out / n for k, n in _map_names(stem, "mask", previews).items()}
    _save_nifti(names["mask.nii.gz"], result.mask, *nifti)
    _save_npy(names["mask.npy"], result.mask)
    return {**written, **names}


_DESCRIPTIONS = {"T1map": "longitudinal relaxation time T1",
                 "T2map": "transverse relaxation time T2",
                 "M0map": "proton density scale M0 (input intensity per unit of simulated "
                          "fingerprint)",
                 "TB1map": "flip-angle scale B1 (actual / nominal flip angle)"}


def _write_map(out: Path, stem: str, suffix: str, arr_ms: np.ndarray, base: dict,
               nifti: tuple, previews: bool) -> dict[str, Path]:
    """One map (in ms, or its own unit: see ``_MAPS``) as NIfTI, ``.npy``, JSON sidecar and
    preview."""
    unit, scale, npy_unit, _ = _MAPS[suffix]
    written = {k: out / n for k, n in _map_names(stem, suffix, previews).items()}
    _save_nifti(written[f"{suffix}.nii.gz"], arr_ms * scale, *nifti)
    _save_npy(written[f"{suffix}.npy"], arr_ms.astype(np.float32))
    side = dict(base)
    side.update({"MapType": suffix, "Units": unit,
                 "NumpyFile": written[f"{suffix}.npy"].name,
                 "NumpyUnits": npy_unit, "Description": _DESCRIPTIONS[suffix],
                 "BackgroundValue": "NaN"})
    _save_json(written[f"{suffix}.json"], side)
    if previews:
        kind = {"M0map": "M0", "TB1map": "B1"}.get(suffix, suffix[:2])
        how = base.get("EstimationMethod", "")
        what = base.get("Network") or base.get("Dictionary")
        how = f"{how} ({what})" if how and what else how
        _save_preview(written[f"{suffix}.png"], arr_ms, kind, npy_unit,
                      f"{stem} {suffix[:-3]} ({npy_unit})" + (f"\n{how}" if how else ""),
                      nifti[1] is not None)
    return written
