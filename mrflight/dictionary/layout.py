"""The layout of dictionary files: the format of each extension and, besides the arrays of an
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
#: (by extension)
FORMATS = ("h5", "npz", "mat")
_EXT = {".h5": "h5", ".hdf5": "h5", ".hdf": "h5", ".npz": "npz", ".mat": "mat"}
#: layout version written into .h5/.npz files (bump when the layout changes)
LAYOUT_VERSION = 1
#: the header entries, each stored as a JSON string
HEADER_KEYS = ("param_names", "units", "sequence", "meta")


def file_format(path: Path, format: str | None) -> str:
    """``"h5"``, ``"npz"`` or ``"mat"``: ``format`` if given, else from ``path``'s extension."""
    if format is not None:
        f = str(format).lower().lstrip(".")
        f = {"hdf5": "h5", "hdf": "h5"}.get(f, f)
        if f not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
        return f
    f = _EXT.get(path.suffix.lower())
    if f is None:
        raise ValueError(
            f"unknown dictionary file extension {path.suffix!r} in {path}: use .h5, .npz or "
            ".mat, or pass format="
        )
    return f


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
