"""Saving and loading dictionaries: ``.h5`` (HDF5), ``.npz`` and MATLAB ``.mat`` (v7, v7.3)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mrflight.dictionary.columns import names_and_units, split_names
from mrflight.dictionary.core import Dictionary
from mrflight.dictionary.h5 import read_attrs, require_datasets, write_header
from mrflight.dictionary.layout import (
    LAYOUT_VERSION,
    check_checksum,
    file_format,
    header_json,
    payload_checksum,
    stored_format,
    stored_header,
    to_json,
)
from mrflight.dictionary.matlab import load_mat_dictionary, save_mat_dictionary
from mrflight.fileio import atomic_path, damaged_error

__all__ = ["save", "load"]


def save(dictionary: Dictionary, path, format: str | None = None, *,
         mat_version: str = "7", overwrite: bool = False) -> None:
    """Write a dictionary to ``.h5``, ``.npz`` or ``.mat``, atomically.

    The file appears complete or not at all (written beside ``path`` and renamed): a killed
    write leaves any older file at ``path`` untouched. An existing file is replaced only with
    ``overwrite=True`` (and never a read-only one); the folder must exist (a mistyped folder is
    an error, not made).

    Layouts:

    * ``.h5`` (HDF5, h5py): datasets ``atoms`` (M, T) complex and ``params`` (M, P) float64,
      optional ``basis`` (T, k); file attributes ``param_names``, ``units``, ``sequence`` and
      ``meta`` (JSON strings), ``format = "mrflight-dictionary"``, ``layout_version`` and
      ``sha256`` (checksum of the payload, verified by :func:`load`).
    * ``.npz`` (numpy, no pickles): arrays ``atoms``, ``params``, optional ``basis``,
      ``param_names`` and ``units`` (string arrays), ``sequence`` and ``meta`` (JSON strings),
      ``sha256``.
    * ``.mat`` (MATLAB v7 via scipy, or v7.3/HDF5 with ``mat_version="7.3"``, needed above
      2 GB): one struct ``dict`` in the layout MRF code expects --
      ``dict.D`` (M x T, complex, each row L2-normalised), ``dict.normD`` (M x 1, the norms, so
      the simulated atoms are ``D .* normD``), ``dict.lut`` (M x P, parameter rows),
      ``dict.V`` (T x k SVD basis, when the dictionary has one), ``dict.param_names`` and
      ``dict.units`` (comma-separated strings, e.g. ``'t1_ms,t2_ms'`` and ``'ms,ms'``),
      ``dict.sequence`` and ``dict.meta`` (JSON text; ``jsondecode`` in MATLAB).

    Args:
        dictionary: the :class:`Dictionary`.
        path: destination file, in an existing folder; the extension picks the format.
        format: ``"h5"``, ``"npz"`` or ``"mat"``, for a path without one of their extensions
            (default: from the extension; it must agree with a known extension).
        mat_version: ``"7"`` or ``"7.3"`` (``.mat`` only).
        overwrite: replace a file already at ``path`` (default: refuse).

    Raises:
        ValueError: unknown extension/format or version, a format that disagrees with the
            extension, metadata that is not JSON; ``path`` is a folder, its folder does not
            exist, or it exists (without ``overwrite=True``, or read-only).
    """
    if not isinstance(dictionary, Dictionary):
        raise ValueError(f"dictionary must be a Dictionary, got {type(dictionary).__name__}")
    path = Path(path)
    check_destination(path, overwrite)
    fmt = file_format(path, format)
    if str(mat_version) not in ("7", "7.3"):
        raise ValueError(f"mat_version must be '7' or '7.3', got {mat_version!r}")
    d = dictionary
    header = header_json(d.param_names, d.units, d.sequence, d.meta)
    if fmt == "h5":
        _save_h5(d, path, header, overwrite)
    elif fmt == "npz":
        _save_npz(d, path, header, overwrite)
    else:
        save_mat_dictionary(d, path, header, v73=str(mat_version) == "7.3", replace=overwrite)


def check_destination(path: Path, overwrite: bool) -> None:
    """Refuse a ``path`` whose writing would lose what is there or make a mistyped folder
    (a file that appears there while the new one is written is kept too: the writers pass
    ``replace=overwrite`` to :func:`~mrflight.fileio.atomic_path`)."""
    if path.is_dir():
        raise ValueError(f"path {path} is a folder: give a file in it, e.g. "
                         f"{path / ('dictionary' + (path.suffix or '.h5'))}")
    if not path.parent.is_dir():
        what = "is a file" if path.parent.exists() else "does not exist"
        raise ValueError(f"path {path}: its folder {path.parent} {what}; correct the path, or "
                         "make the folder first")
    if not (path.exists() or path.is_symlink()):
        return
    if not overwrite:
        raise ValueError(f"path {path} already exists: pass overwrite=True to replace it, or "
                         "give another path")
    if path.exists() and (not os.access(path, os.W_OK) or not path.stat().st_mode & 0o222):
        raise ValueError(f"path {path} is read-only: give another path, or make it writable "
                         "(chmod u+w) to replace it")


def _save_h5(d: Dictionary, path: Path, header: dict[str, str], replace: bool) -> None:
    import h5py

    digest = payload_checksum(d.atoms, d.params, d.basis, header)
    with atomic_path(path, replace=replace) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("atoms", data=d.atoms)
            f.create_dataset("params", data=d.params)
            if d.basis is not None:
                f.create_dataset("basis", data=d.basis)
            write_header(f, header, digest)


def _save_npz(d: Dictionary, path: Path, header: dict[str, str], replace: bool) -> None:
    digest = payload_checksum(d.atoms, d.params, d.basis, header)
    arrays = {"atoms": d.atoms, "params": d.params,
              "param_names": np.array(d.param_names, dtype=str),
              "units": np.array(d.units, dtype=str),
              "sequence": np.array(header["sequence"]), "meta": np.array(header["meta"]),
              "layout_version": np.array(LAYOUT_VERSION), "sha256": np.array(digest)}
    if d.basis is not None:
        arrays["basis"] = d.basis
    with atomic_path(path, replace=replace) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def load(path, *, verify: bool = True, require_checksum: bool = False) -> Dictionary:
    """Read a dictionary written by :func:`save`, or a foreign ``.mat`` dictionary.

    A foreign ``.mat`` file (v7 or v7.3) needs ``D`` (atoms, M x T or T x M) and ``lut``
    (parameters, M x P or P x M), at top level or inside a struct. If ``normD`` is present, ``D``
    is taken as normalised and the atoms are ``D .* normD``. In every format the parameter
    columns are matched by name (``param_names``, case-insensitive) and reordered to T1, T2 in
    ms[, B1] (see :class:`Dictionary`); a file without ``param_names`` (e.g. a ``.npz`` with
    only ``atoms`` and ``params``) is taken as T1 ms, T2 ms[, B1][, ``param_4``, ...] by column
    count. A MATLAB v7.3 file written by mrflight is checked against its SHA-256 checksum.

    Args:
        path: a ``.h5``, ``.npz`` or ``.mat`` file (the format is told by the file's first
            bytes, so a file saved under another extension or none is read too).
        verify: check the SHA-256 checksum when the file has one (``.h5``/``.npz``).
        require_checksum: fail if the file has no checksum (used for the cache).

    Returns:
        The :class:`Dictionary`.

    Raises:
        ValueError: missing file, unknown format, truncated or damaged file (the message
            names it), checksum mismatch, missing/empty/mismatched arrays, parameter names
            without T1 and T2, or units not understood or at odds with the names.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dictionary file {path} "
                         + ("is not a file" if path.exists() else "does not exist"))
    fmt = stored_format(path)
    if fmt == "mat":
        return load_mat_dictionary(path)
    try:
        atoms, params, basis, attrs = (_read_h5 if fmt == "h5" else _read_npz)(path)
    except ValueError:
        raise
    except Exception as e:  # h5py/zipfile raise OSError, KeyError, BadZipFile, ...
        raise damaged_error(path, e, f"{fmt} dictionary") from None
    digest = attrs.pop("sha256", None)
    if digest is None and require_checksum:
        raise ValueError(f"{path} has no checksum")
    if verify and digest is not None:
        check_checksum(path, digest, atoms, params, basis, stored_header(attrs))
    params = np.asarray(params)
    p = params.shape[1] if params.ndim == 2 else 1
    names, units = names_and_units(json.loads(attrs.get("param_names", "null")),
                                   json.loads(attrs.get("units", "null")), p)
    return Dictionary(atoms, params, names, units, json.loads(attrs.get("sequence", "null")),
                      json.loads(attrs.get("meta", "null")) or {}, basis)


def _read_h5(path: Path):
    """``(atoms, params, basis or None, attributes as text)`` of an ``.h5`` file."""
    import h5py

    with h5py.File(path, "r") as f:
        require_datasets(f, path)
        atoms, params = f["atoms"][()], f["params"][()]
        basis = f["basis"][()] if "basis" in f else None
        return atoms, params, basis, read_attrs(f)


def _read_npz(path: Path):
    """``(atoms, params, basis or None, header and checksum as text)`` of an ``.npz`` file."""
    with np.load(path, allow_pickle=False) as z:
        if "atoms" not in z.files or "params" not in z.files:
            raise ValueError(f"{path} has no 'atoms'/'params' arrays")
        atoms, params = z["atoms"], z["params"]
        basis = z["basis"] if "basis" in z.files else None
        attrs = {k: to_json(list(split_names(z[k].item() if z[k].ndim == 0 else z[k])), k)
                 for k in ("param_names", "units") if k in z.files}
        attrs.update({k: str(z[k]) for k in ("sequence", "meta", "sha256") if k in z.files})
    return atoms, params, basis, attrs
