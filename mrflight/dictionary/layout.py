"""The layout of dictionary files: the format of each extension and of each file's first bytes
and, besides the arrays of an
``.h5``/``.npz`` file, its JSON header (parameter names, units, sequence, meta), its layout
version and the SHA-256 checksum of its payload.

The checksum is fed, in this order: the atoms' dtype and shape and the parameters' shape (as
text), the atoms row block by row block, the parameters as little-endian float64, the optional
basis (dtype and shape as text, then its bytes), and the JSON of the header. It is computed the
same way whether the atoms are in memory (:func:`payload_checksum`), streamed to a file
(:func:`mrflight.dictionary.generate_to_file`) or read back from one
(:func:`mrflight.dictionary.open_h5`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mrflight.dictionary.core import blocks
from mrflight.fileio import Digest

#: file formats understood by :func:`~mrflight.dictionary.save` / :func:`~mrflight.dictionary.load`
FORMATS = ("h5", "npz", "mat")
_EXT = {".h5": "h5", ".hdf5": "h5", ".hdf": "h5", ".npz": "npz", ".mat": "mat"}
#: the first bytes of each format: HDF5, zip (``.npz``), MATLAB v5/v7 and v7.3 (HDF5 behind a
#: 512-byte text header)
_SIGNATURES = ((b"\x89HDF\r\n\x1a\n", "h5"), (b"PK\x03\x04", "npz"), (b"MATLAB 5.0", "mat"),
               (b"MATLAB 7.3", "mat"))
#: layout version written into .h5/.npz files (bump when the layout changes)
LAYOUT_VERSION = 1
#: the header entries, each stored as a JSON string
HEADER_KEYS = ("param_names", "units", "sequence", "meta")


def file_format(path: Path, format: str | None) -> str:
    """``"h5"``, ``"npz"`` or ``"mat"`` of a file to write: ``format`` if given, else from
    ``path``'s extension.

    Raises:
        ValueError: an unknown format or extension, or a format that disagrees with the
            extension (``format="npz"`` for ``x.h5``).
    """
    ext = _EXT.get(path.suffix.lower())
    if format is not None:
        f = str(format).lower().lstrip(".")
        f = {"hdf5": "h5", "hdf": "h5"}.get(f, f)
        if f not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        if ext is not None and ext != f:
            raise ValueError(f"format={format!r} disagrees with the extension of {path}: name "
                             f"the file {path.with_suffix('.' + f).name} or leave out format=")
        return f
    if ext is None:
        raise ValueError(
            f"unknown dictionary file extension {path.suffix!r} in {path}: use .h5, .npz or "
            ".mat, or pass format="
        )
    return ext


def stored_format(path: Path) -> str:
    """``"h5"``, ``"npz"`` or ``"mat"`` of the existing file ``path``, told by its first bytes
    (a file saved with another extension or none is read by what it holds), else by its
    extension (a damaged file: its reader reports it). An HDF5 ``.mat`` file without an
    ``atoms`` dataset is MATLAB v7.3 (written without MATLAB's 512-byte header).

    Raises:
        ValueError: neither the first bytes nor the extension tell a format.
    """
    with open(path, "rb") as fh:
        head = fh.read(16)
    found = next((f for sig, f in _SIGNATURES if head.startswith(sig)), None)
    ext = _EXT.get(path.suffix.lower())
    if found == "h5" and ext == "mat" and not _holds_atoms(path):
        return "mat"
    if found is None and ext is None:
        raise ValueError(f"{path} is not a dictionary file: its extension {path.suffix!r} is "
                         "none of .h5, .npz, .mat and it holds no HDF5, npz or MATLAB data; "
                         "give a file written by mrflight.dictionary.save or a MATLAB .mat file")
    return found or ext


def _holds_atoms(path: Path) -> bool:
    """True when the HDF5 file ``path`` has an ``atoms`` dataset (False when unreadable)."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "atoms" in f
    except OSError:
        return False


def to_json(obj, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable to be saved: {e}") from None


def header_json(param_names, units, sequence, meta) -> dict[str, str]:
    """The header as stored: each entry a JSON string."""
    values = (list(param_names), list(units), sequence, meta)
    return {k: to_json(v, k) for k, v in zip(HEADER_KEYS, values)}


def stored_header(attrs: dict) -> dict[str, str]:
    """The header of a file's attributes (``"null"`` for a missing entry), as checksummed."""
    return {k: attrs.get(k, "null") for k in HEADER_KEYS}


class PayloadDigest:
    """The payload checksum fed as the atoms go by (written or read in row blocks)."""

    def __init__(self, atoms_dtype, atoms_shape, params_shape) -> None:
        self._digest = Digest().text(
            f"{np.dtype(atoms_dtype).str}{tuple(atoms_shape)}{tuple(params_shape)}")

    def rows(self, block: np.ndarray) -> None:
        """Feed the next rows of atoms."""
        self._digest.array(block)

    def finish(self, params: np.ndarray, basis, header: dict[str, str]) -> str:
        """Feed the parameters, the basis (or ``None``) and the header; the hex digest."""
        self._digest.array(params, "<f8")
        if basis is not None:
            self._digest.text(f"{basis.dtype.str}{basis.shape}").array(basis)
        return self._digest.text(to_json(header, "header")).hexdigest()


def payload_checksum(atoms, params: np.ndarray, basis, header: dict[str, str]) -> str:
    """SHA-256 of the payload, hashed blockwise (``atoms``: an array or an ``h5py`` dataset)."""
    digest = PayloadDigest(atoms.dtype, atoms.shape, params.shape)
    for sl in blocks(len(atoms)):
        digest.rows(atoms[sl])
    return digest.finish(params, basis, header)


def check_checksum(path, expected: str, atoms, params, basis, header: dict[str, str]) -> None:
    """Raise if the payload does not match the checksum ``expected`` stored in ``path``."""
    if payload_checksum(atoms, params, basis, header) != expected:
        raise ValueError(f"{path} is corrupt: its SHA-256 checksum does not match")
