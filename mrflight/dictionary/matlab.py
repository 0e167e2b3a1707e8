"""Dictionaries as MATLAB ``.mat`` files (v7 or v7.3): one struct ``dict`` in the layout MRF
code expects -- ``dict.D`` (M x T, complex, each row L2-normalised), ``dict.normD`` (M x 1, the
norms), ``dict.lut`` (M x P, parameter rows), optional ``dict.V`` (T x k basis),
``dict.param_names``/``dict.units`` (comma-separated) and ``dict.sequence``/``dict.meta`` (JSON).
Foreign files need ``D`` and ``lut`` at top level or inside a struct.

References:
    Ma D, et al. Magnetic resonance fingerprinting. Nature 2013 (the ``dict.D`` / ``dict.lut``
    / ``dict.normD`` layout).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mrflight.dictionary.columns import names_and_units, split_names
from mrflight.dictionary.core import Dictionary, blocks
from mrflight.fileio import load_mat, save_mat


def save_mat_dictionary(d: Dictionary, path: Path, header: dict[str, str], v73: bool,
                        replace: bool) -> None:
    """Write ``d`` as the struct ``dict`` (``header``: the JSON strings of sequence and meta;
    ``replace``: replace a file at ``path``)."""
    norms = d.norms()
    safe = np.where(norms > 0, norms, 1).astype(norms.dtype)
    normalised = np.empty_like(d.atoms)
    for sl in blocks(len(d)):
        normalised[sl] = d.atoms[sl] / safe[sl, None]
    s = {"D": normalised, "normD": norms, "lut": d.params,
         "param_names": ",".join(d.param_names), "units": ",".join(d.units),
         "sequence": header["sequence"], "meta": header["meta"]}
    if d.basis is not None:
        s["V"] = d.basis
    save_mat(path, {"dict": s}, v73=v73, replace=replace)


def load_mat_dictionary(path: Path) -> Dictionary:
    """Read a ``.mat`` dictionary, ours or foreign (see :func:`mrflight.dictionary.load`)."""
    s = _find_dict(load_mat(path), path)
    D, lut = np.asarray(s["D"]), np.asarray(s["lut"], dtype=np.float64)
    if D.size == 0 or lut.size == 0:
        raise ValueError(f"{path}: D and lut must be non-empty")
    names = split_names(s.get("param_names"))
    units = split_names(s.get("units"))
    D, lut = _atoms_by_rows(D, lut, len(names) if names else None, path)
    if "normD" in s:
        norm = np.asarray(s["normD"]).reshape(-1).astype(D.real.dtype)
        if norm.size != D.shape[0]:
            raise ValueError(f"{path}: normD has {norm.size} values for {D.shape[0]} atoms")
        D = D * norm[:, None]
    names, units = names_and_units(names, units, lut.shape[1])
    seq = s.get("sequence")
    meta = s.get("meta")
    meta = json.loads(meta) if isinstance(meta, str) and meta else {"source": str(path)}
    V = s.get("V")
    return Dictionary(D, lut, names, units,
                      json.loads(seq) if isinstance(seq, str) and seq else None, meta,
                      None if V is None else _column(np.asarray(V)))


def _find_dict(data: dict, path: Path) -> dict:
    if "D" in data and "lut" in data:
        return data
    for v in data.values():
        if isinstance(v, dict) and "D" in v and "lut" in v:
            return v
    raise ValueError(f"{path} holds no dictionary: need variables 'D' and 'lut' at top level "
                     f"or in a struct (found {sorted(data)})")


def _atoms_by_rows(D: np.ndarray, lut: np.ndarray, p: int | None, path: Path):
    """``D`` as (M, T) and ``lut`` as (M, P), whichever way round the file stored them
    (``p``: the number of parameter names, if any)."""
    # scipy squeezes singleton dimensions: restore (M, T) and (M, P)
    if D.ndim == 1:
        D = D[None, :] if (lut.ndim == 1 and (p is None or lut.size == p)) else D[:, None]
    if lut.ndim == 1:
        lut = lut[None, :] if D.shape[0] == 1 and lut.size != 1 else lut[:, None]
    if D.ndim != 2 or lut.ndim != 2:
        raise ValueError(f"{path}: D and lut must be 2-D, got {D.shape} and {lut.shape}")
    if lut.shape[0] != D.shape[0]:
        if lut.shape[1] == D.shape[0]:
            lut = lut.T
        elif lut.shape[0] == D.shape[1]:
            D = D.T
        elif lut.shape[1] == D.shape[1]:
            D, lut = D.T, lut.T
        else:
            raise ValueError(f"{path}: D {D.shape} and lut {lut.shape} do not describe the "
                             "same number of atoms")
    return D, lut


def _column(v: np.ndarray) -> np.ndarray:
    return v[:, None] if v.ndim == 1 else v
