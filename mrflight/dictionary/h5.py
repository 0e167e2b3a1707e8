"""The ``.h5`` dictionary layout: its header attributes, and :func:`open_h5` (lazy reading).

Datasets ``atoms`` (M, T) complex and ``params`` (M, P) float64, optional ``basis`` (T, k);
file attributes ``param_names``, ``units``, ``sequence`` and ``meta`` (JSON strings),
``format = "mrflight-dictionary"``, ``layout_version`` and ``sha256`` (see
:mod:`mrflight.dictionary.layout`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from mrflight.dictionary.columns import canonical_columns, names_and_units
from mrflight.dictionary.layout import (
    HEADER_KEYS,
    LAYOUT_VERSION,
    check_checksum,
    stored_format,
    stored_header,
)
from mrflight.fileio import damaged_error

__all__ = ["open_h5"]


def write_header(f, header: dict[str, str], sha256: str) -> None:
    """Write the header attributes, the format tag, the layout version and the checksum."""
    for k, v in header.items():
        f.attrs[k] = v
    f.attrs["format"] = "mrflight-dictionary"
    f.attrs["layout_version"] = LAYOUT_VERSION
    f.attrs["sha256"] = sha256


def require_datasets(f, path: Path) -> None:
    if "atoms" not in f or "params" not in f:
        raise ValueError(f"{path} has no 'atoms'/'params' datasets")


def read_attrs(f) -> dict[str, str]:
    """The header attributes and the checksum present in ``f``, as text."""
    return {k: (f.attrs[k].decode() if isinstance(f.attrs[k], bytes) else str(f.attrs[k]))
            for k in (*HEADER_KEYS, "sha256") if k in f.attrs}


def open_h5(path, *, verify: bool = False):
    """Open an ``.h5`` dictionary lazily: a context manager yielding ``(atoms, params, header)``.

    ``atoms`` is the ``h5py.Dataset`` ``(M, T)`` (slice it to read rows: nothing is read until
    then), ``params`` the ``(M, P)`` float64 array (columns reordered by name to T1, T2 in
    ms[, B1], as :func:`~mrflight.dictionary.load` does) and ``header`` a dict with
    ``param_names``, ``units``, ``sequence`` and ``meta``. For dictionaries larger than memory
    (see :func:`~mrflight.dictionary.generate_to_file`);
    :class:`mrflight.matching.DictionaryMatcher` needs the atoms in memory, so match against row
    blocks or an SVD-compressed copy.

    Args:
        path: an ``.h5`` file written by :func:`~mrflight.dictionary.save` or
            :func:`~mrflight.dictionary.generate_to_file`.
        verify: check the SHA-256 checksum first, reading the atoms block by block.

    Raises:
        ValueError: missing or unreadable file, missing datasets, or a checksum mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dictionary file {path} does not exist")
    fmt = stored_format(path)
    if fmt != "h5":
        raise ValueError(f"open_h5 reads .h5 dictionaries and {path} is a .{fmt} file: use "
                         "mrflight.dictionary.load")
    return _opened(path, verify)


@contextlib.contextmanager
def _opened(path: Path, verify: bool):
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise damaged_error(path, e, "h5 dictionary") from None
    with f:
        require_datasets(f, path)
        attrs = read_attrs(f)
        atoms, params = f["atoms"], f["params"][()]
        header = stored_header(attrs)
        if verify:
            if "sha256" not in attrs:
                raise ValueError(f"{path} has no checksum")
            if "basis" in f:
                raise ValueError(f"{path}: verify=True does not support a stored basis; "
                                 "use load()")
            check_checksum(path, attrs["sha256"], atoms, params, None, header)
        yield (atoms, *_decoded(params, header))


def _decoded(params: np.ndarray, header: dict[str, str]) -> tuple[np.ndarray, dict]:
    """The parameters in canonical column order and the decoded header."""
    header = {k: json.loads(v) for k, v in header.items()}
    p = params.shape[1]
    names, units = names_and_units(header["param_names"], header["units"], p)
    names, units, params = canonical_columns(names, units, np.asarray(params, dtype=np.float64))
    header["param_names"], header["units"] = list(names), list(units)
    return params, header
