"""The :class:`Dictionary` container: simulated fingerprints and their tissue parameters."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from mrflight.dictionary.columns import canonical_columns
from mrflight.physics import Sequence

__all__ = ["Dictionary"]

#: rows hashed / checked per block, to keep memory bounded on paper-size dictionaries
BLOCK_ROWS = 8192


def blocks(n: int, step: int = BLOCK_ROWS):
    """Slices of ``step`` rows covering ``range(n)``."""
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


@dataclass
class Dictionary:
    """Simulated fingerprints and the parameters they belong to.

    Args:
        atoms: fingerprints, complex, shape ``(M, T)``, in units of M0 (not normalised).
            ``np.complex64`` or ``np.complex128``; real input is cast to the matching complex
            type.
        params: parameters of every atom, float64, shape ``(M, P)``.
        param_names: names of the ``P`` columns (default ``("t1_ms", "t2_ms")``). The columns
            are reordered by name to T1, T2 (ms)[, B1][, others]: ``("T2", "T1")`` columns are
            swapped, names are made canonical (``t1_ms``, ``t2_ms``, ``b1``; case-insensitive,
            ``T1``/``t1``/``t1_ms`` understood, ``t1_s`` or unit ``"s"`` converted to ms).
        units: units of the ``P`` columns (default ``("ms", "ms")``; ``"1"`` for a B1 factor,
            ``"%"`` for B1 in percent, converted to a factor). A unit in a name (``t1_s``) and
            the unit given must agree.
        sequence: the pulse train as ``Sequence.to_dict()`` (``None`` if unknown).
        meta: JSON-serialisable metadata (simulation settings, source file, ...).
        basis: optional temporal SVD basis, shape ``(T, k)`` (written as ``V`` in ``.mat``).

    Raises:
        ValueError: empty, non-finite or mismatched arrays, names or units; no column named
            T1 or T2; a unit that is not a time (T1, T2), a ratio or percent (B1), or that
            disagrees with the name.
    """

    atoms: np.ndarray
    params: np.ndarray
    param_names: tuple[str, ...] = ("t1_ms", "t2_ms")
    units: tuple[str, ...] = ("ms", "ms")
    sequence: dict | None = None
    meta: dict = field(default_factory=dict)
    basis: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.atoms = _as_atoms(self.atoms)
        self.params = _as_params(self.params, len(self.atoms))
        self.param_names = tuple(str(s) for s in self.param_names)
        self.units = tuple(str(s) for s in self.units)
        p = self.params.shape[1]
        if len(self.param_names) != p or len(self.units) != p:
            raise ValueError(
                f"param_names ({len(self.param_names)}) and units ({len(self.units)}) must "
                f"name each of the {p} parameter columns"
            )
        self.param_names, self.units, self.params = canonical_columns(
            self.param_names, self.units, self.params)
        _warn_unit_slips(self.t1_ms, self.t2_ms)
        for sl in blocks(len(self.atoms)):
            if not np.all(np.isfinite(self.atoms[sl])):
                raise ValueError("atoms contains NaN or Inf values")
        if self.sequence is not None and not isinstance(self.sequence, dict):
            raise ValueError("sequence must be a dict from Sequence.to_dict() or None")
        self.meta = dict(self.meta or {})
        if self.basis is not None:
            self.basis = _as_basis(self.basis, self.atoms.shape[1])

    def __len__(self) -> int:
        return int(self.atoms.shape[0])

    def __repr__(self) -> str:
        seq = self.sequence.get("name") if self.sequence else None
        return (f"Dictionary(M={len(self)}, T={self.n_timepoints}, params={self.param_names}, "
                f"units={self.units}, dtype={self.atoms.dtype}, sequence={seq!r})")

    @property
    def n_timepoints(self) -> int:
        """T, the number of time points of every atom."""
        return int(self.atoms.shape[1])

    @property
    def t1_ms(self) -> np.ndarray:
        """T1 of every atom, ms, shape ``(M,)``."""
        return self.params[:, self.param_names.index("t1_ms")]

    @property
    def t2_ms(self) -> np.ndarray:
        """T2 of every atom, ms, shape ``(M,)``."""
        return self.params[:, self.param_names.index("t2_ms")]

    def norms(self) -> np.ndarray:
        """L2 norm of every atom, shape ``(M,)``, float of the atoms' precision (blockwise)."""
        out = np.empty(len(self), dtype=self.atoms.real.dtype)
        for sl in blocks(len(self)):
            out[sl] = np.linalg.norm(self.atoms[sl], axis=1)
        return out

    def get_sequence(self) -> Sequence | None:
        """The :class:`~mrflight.physics.Sequence` the atoms were simulated with, if stored."""
        return None if self.sequence is None else Sequence.from_dict(self.sequence)

    def save(self, path, format: str | None = None, **kwargs) -> None:
        """Same as :func:`~mrflight.dictionary.save` (``save(self, path, ...)``)."""
        from mrflight.dictionary.files import save

        save(self, path, format=format, **kwargs)

    @classmethod
    def load(cls, path, **kwargs) -> Dictionary:
        """Same as :func:`~mrflight.dictionary.load`."""
        from mrflight.dictionary.files import load

        return load(path, **kwargs)


#: a T1 column whose largest value is below this many ms is almost surely in seconds (no ms
#: dictionary stops at 20 ms; no seconds dictionary goes past 20 s)
_SECONDS_T1_MAX_MS = 20.0


def _warn_unit_slips(t1: np.ndarray, t2: np.ndarray) -> None:
    """Warn (``UserWarning``) where the T1/T2 columns look like seconds or like each other's:
    matching would silently return T1 and T2 1000x too small, or swapped."""
    t1_max = float(t1.max())
    if 0 < t1_max < _SECONDS_T1_MAX_MS:
        warnings.warn(
            f"the dictionary's T1 values are at most {t1_max:.4g} ms: are they in seconds? "
            "Give their units (units=('s', 's'), or names 't1_s', 't2_s'; a .mat file's "
            "dict.units = 's,s') and they are converted to ms", UserWarning, stacklevel=4)
    swapped = float(np.mean(t2 > t1))
    if swapped > 0.5:
        warnings.warn(
            f"T2 exceeds T1 in {100 * swapped:.0f} % of the dictionary's atoms: are the T1 and "
            "T2 columns swapped? Name them (param_names, e.g. ('t2_ms', 't1_ms')) and they are "
            "put in order", UserWarning, stacklevel=4)


def _as_atoms(atoms) -> np.ndarray:
    """``atoms`` as a C-contiguous complex64/complex128 ``(M, T)`` array (real input cast)."""
    atoms = np.asarray(atoms)
    if atoms.ndim != 2 or atoms.size == 0:
        raise ValueError(
            f"atoms must be a non-empty 2-D array (M atoms, T time points), "
            f"got shape {atoms.shape}"
        )
    if atoms.dtype.kind in "biu":
        atoms = atoms.astype(np.float64)
    if atoms.dtype.kind == "f":
        atoms = atoms.astype(np.complex64 if atoms.dtype == np.float32 else np.complex128)
    if atoms.dtype not in (np.complex64, np.complex128):
        raise ValueError(f"atoms must be complex64/complex128 (or real), got {atoms.dtype}")
    return np.ascontiguousarray(atoms)


def _as_params(params, m: int) -> np.ndarray:
    """``params`` as a finite C-contiguous float64 ``(m, P)`` array (a vector is one column)."""
    params = np.asarray(params, dtype=np.float64)
    if params.ndim == 1:
        params = params[:, None]
    if params.ndim != 2 or params.shape[0] != m:
        raise ValueError(
            f"params must have shape (M, P) with M = {m} rows (one per atom), "
            f"got {params.shape}"
        )
    if not np.all(np.isfinite(params)):
        raise ValueError("params contains NaN or Inf values")
    return np.ascontiguousarray(params)


def _as_basis(basis, t: int) -> np.ndarray:
    basis = np.asarray(basis)
    if basis.ndim != 2 or basis.shape[0] != t or basis.size == 0:
        raise ValueError(f"basis must have shape (T, k) with T = {t}, got {basis.shape}")
    return np.ascontiguousarray(basis)
