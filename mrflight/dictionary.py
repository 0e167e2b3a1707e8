"""MRF dictionaries: parameter grids, simulation with an on-disk cache, and file I/O.

A :class:`Dictionary` holds simulated fingerprints (*atoms*, complex, shape ``(M, T)``) and the
tissue parameters they were simulated for (``(M, P)``, T1 and T2 in ms first), together with the
parameter names, their units, the pulse train (``Sequence.to_dict()``) and free-form metadata.

Parameter grids (all return ``np.ndarray`` float64 of shape ``(M, 2)``: T1 ms, T2 ms):

* :func:`paper_grid` -- the grid of Oksuz et al. 2019 (about 115 000 atoms).
* :func:`regular_grid` -- a linear or logarithmic T1 x T2 mesh.
* :func:`random_params` -- uniform or log-uniform random draws with a seed.

:func:`generate` simulates a dictionary with :func:`mrflight.physics.simulate` and, optionally,
caches it on disk (keyed by the sequence, the parameters, B1, precision, truncation tolerance and
``EPG_VERSION``; written atomically and verified by a SHA-256 checksum on every load).

:func:`generate_to_file` streams a dictionary larger than memory to an ``.h5`` file chunk by
chunk (same file as ``save(generate(...))``), and :func:`open_h5` reads such a file lazily.

:func:`save` / :func:`load` read and write ``.h5`` (HDF5), ``.npz`` and MATLAB ``.mat`` (v7 and
v7.3) files; see :func:`save` for the layouts.

Parameter columns are identified by their names, never by position: a file whose columns are
``("T2", "T1")`` is reordered to T1, T2 (then B1, then any other column) when it is loaded, so
every consumer (matching, maps, training on a file) can take ``params[:, :2]`` as T1, T2 in ms.

References:
    Oksuz I, et al. Magnetic resonance fingerprinting using recurrent neural networks.
    ISBI 2019 (dictionary grid). Ma D, et al. Magnetic resonance fingerprinting. Nature 2013
    (the ``dict.D`` / ``dict.lut`` / ``dict.normD`` MATLAB layout).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mrflight.fileio import atomic_path, damaged_error, load_mat, remove_stale_temp_files, save_mat
from mrflight.physics import EPG_VERSION, Sequence, simulate
from mrflight.physics.epg import DEFAULT_TOL, truncation_rate

__all__ = [
    "Dictionary",
    "paper_grid",
    "regular_grid",
    "random_params",
    "generate",
    "generate_to_file",
    "open_h5",
    "save",
    "load",
    "default_cache_dir",
    "cache_key",
    "FORMATS",
]

#: file formats understood by :func:`save` / :func:`load` (by extension)
FORMATS = ("h5", "npz", "mat")
_EXT = {".h5": "h5", ".hdf5": "h5", ".hdf": "h5", ".npz": "npz", ".mat": "mat"}
#: layout version written into .h5/.npz files (bump when the layout changes)
_LAYOUT_VERSION = 1
#: rows hashed / checked per block, to keep memory bounded on paper-size dictionaries
_BLOCK_ROWS = 8192


# --------------------------------------------------------------------------------------------
# parameter grids
# --------------------------------------------------------------------------------------------

def _arange_incl(start: float, stop: float, step: float) -> np.ndarray:
    n = int(round((stop - start) / step))
    return start + step * np.arange(n + 1, dtype=np.float64)


def _pairs(t1: np.ndarray, t2: np.ndarray, t2_le_t1: bool) -> np.ndarray:
    g1, g2 = np.meshgrid(t1, t2, indexing="ij")
    out = np.stack([g1.ravel(), g2.ravel()], axis=1)
    if t2_le_t1:
        out = out[out[:, 1] <= out[:, 0]]
    return np.ascontiguousarray(out, dtype=np.float64)


def paper_grid() -> np.ndarray:
    """The T1/T2 dictionary grid of Oksuz et al. 2019.

    T1 = 0:2:500, 500:5:1000, 1000:10:2000, 2000:50:4000 ms (inclusive ends, the duplicated
    values at the joins kept once: 491 values); T2 = 0:1:100, 100:2:500 ms (301 values); only
    pairs with T2 <= T1 are kept.

    Zero entries: with T2 = 0 the transverse magnetisation has decayed completely at every echo
    (TE > 0), so the fingerprint is identically zero and cannot be normalised (nor matched).
    Every atom with T2 = 0 is therefore dropped -- and with it T1 = 0, whose only partner under
    T2 <= T1 is T2 = 0. The smallest entries are T1 = 2 ms and T2 = 1 ms. 114 650 atoms remain
    (the paper's "about 115 000").

    Returns:
        ``np.ndarray`` float64, shape ``(114650, 2)``: columns T1 ms, T2 ms, sorted by T1 then T2.

    References:
        Oksuz I, et al. Magnetic resonance fingerprinting using recurrent neural networks.
        ISBI 2019, section 3.
    """
    t1 = np.unique(np.round(np.concatenate([
        _arange_incl(0, 500, 2), _arange_incl(500, 1000, 5),
        _arange_incl(1000, 2000, 10), _arange_incl(2000, 4000, 50),
    ]), 9))
    t2 = np.unique(np.round(np.concatenate([_arange_incl(0, 100, 1),
                                            _arange_incl(100, 500, 2)]), 9))
    out = _pairs(t1, t2, t2_le_t1=True)
    return np.ascontiguousarray(out[out[:, 1] > 0])


def _positive(name: str, value, allow_zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not np.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {bound} number (ms), got {value!r}")
    return v


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not float(value).is_integer() or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def regular_grid(
    t1_min: float = 10.0,
    t1_max: float = 4000.0,
    n_t1: int = 100,
    t2_min: float = 2.0,
    t2_max: float = 500.0,
    n_t2: int = 100,
    spacing: str = "linear",
    t2_le_t1: bool = True,
) -> np.ndarray:
    """A regular T1 x T2 mesh, linear or logarithmic in each axis.

    Args:
        t1_min, t1_max: T1 range, ms, ends included (``t1_min`` >= 0; > 0 for ``"log"``).
        n_t1: number of T1 values (1 gives ``t1_min`` alone).
        t2_min, t2_max: T2 range, ms, ends included. ``t2_min`` must be > 0: T2 = 0 gives an
            all-zero fingerprint that cannot be normalised (see :func:`paper_grid`).
        n_t2: number of T2 values.
        spacing: ``"linear"`` (``np.linspace``) or ``"log"`` (``np.geomspace``).
        t2_le_t1: keep only pairs with T2 <= T1 (the physical constraint).

    Returns:
        ``np.ndarray`` float64, shape ``(M, 2)``: T1 ms, T2 ms, sorted by T1 then T2;
        ``M <= n_t1 * n_t2``.

    Raises:
        ValueError: a bad argument (named in the message), or no pair left with T2 <= T1.
    """
    if spacing not in ("linear", "log"):
        raise ValueError(f"spacing must be 'linear' or 'log', got {spacing!r}")
    log = spacing == "log"
    t1_min = _positive("t1_min", t1_min, allow_zero=not log)
    t1_max = _positive("t1_max", t1_max, allow_zero=not log)
    t2_min = _positive("t2_min", t2_min)
    t2_max = _positive("t2_max", t2_max)
    n_t1, n_t2 = _count("n_t1", n_t1), _count("n_t2", n_t2)
    for lo, hi, a, b in ((t1_min, t1_max, "t1_min", "t1_max"), (t2_min, t2_max, "t2_min",
                                                                 "t2_max")):
        if hi < lo:
            raise ValueError(f"{b}={hi} is below {a}={lo}: swap them")
    space = np.geomspace if log else np.linspace
    t1 = space(t1_min, t1_max, n_t1) if n_t1 > 1 else np.array([t1_min])
    t2 = space(t2_min, t2_max, n_t2) if n_t2 > 1 else np.array([t2_min])
    out = _pairs(t1, t2, bool(t2_le_t1))
    if len(out) == 0:
        raise ValueError(
            f"no (T1, T2) pair with T2 <= T1: t2_min={t2_min} exceeds t1_max={t1_max}; "
            "lower t2_min, raise t1_max, or pass t2_le_t1=False"
        )
    return out


def _range(name: str, value, log: bool) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high) in ms, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo <= 0 or hi < lo:
        raise ValueError(
            f"{name} must satisfy 0 < low <= high (ms), got {value!r}"
            + (" (log-uniform draws need low > 0)" if log else "")
        )
    return lo, hi


def random_params(
    n: int,
    t1_range=(2.0, 4000.0),
    t2_range=(1.0, 500.0),
    distribution: str = "uniform",
    seed: int = 0,
    t2_le_t1: bool = True,
) -> np.ndarray:
    """Random T1/T2 pairs, uniform or log-uniform in each parameter, reproducible by ``seed``.

    With ``t2_le_t1`` the draws are rejection-sampled: pairs with T2 > T1 are discarded and
    drawn again, so the result is the joint distribution restricted to T2 <= T1 and has exactly
    ``n`` rows.

    Args:
        n: number of pairs.
        t1_range: ``(low, high)`` T1 bounds, ms, ``0 < low <= high``.
        t2_range: ``(low, high)`` T2 bounds, ms, ``0 < low <= high`` (T2 = 0 would give an
            all-zero fingerprint).
        distribution: ``"uniform"`` or ``"log-uniform"`` (uniform in log T1 and log T2).
        seed: seed of a ``numpy.random.default_rng`` stream; the same seed gives the same pairs.
        t2_le_t1: enforce T2 <= T1.

    Returns:
        ``np.ndarray`` float64, shape ``(n, 2)``: T1 ms, T2 ms, in draw order.

    Raises:
        ValueError: a bad argument, or ranges with no (or almost no) pair with T2 <= T1.
    """
    n = _count("n", n)
    if distribution not in ("uniform", "log-uniform"):
        raise ValueError(f"distribution must be 'uniform' or 'log-uniform', got {distribution!r}")
    log = distribution == "log-uniform"
    r1, r2 = _range("t1_range", t1_range, log), _range("t2_range", t2_range, log)
    if isinstance(seed, bool) or not float(seed).is_integer():
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if t2_le_t1 and r2[0] >= r1[1] and not (r2[0] == r2[1] == r1[1]):
        raise ValueError(
            f"t2_range={r2} lies entirely above t1_range={r1}: no pair has T2 <= T1; "
            "lower t2_range or pass t2_le_t1=False"
        )
    rng = np.random.default_rng(int(seed))

    def draw(lo, hi, k):
        if log:
            return np.exp(rng.uniform(np.log(lo), np.log(hi), k))
        return rng.uniform(lo, hi, k)

    out = np.empty((0, 2))
    for _ in range(10_000):
        k = max(2 * (n - len(out)), 64)
        batch = np.stack([draw(*r1, k), draw(*r2, k)], axis=1)
        if t2_le_t1:
            batch = batch[batch[:, 1] <= batch[:, 0]]
        out = np.concatenate([out, batch])[:n]
        if len(out) == n:
            return np.ascontiguousarray(out, dtype=np.float64)
    raise ValueError(
        f"t1_range={r1} and t2_range={r2} overlap too little: almost no draw has T2 <= T1"
    )


# --------------------------------------------------------------------------------------------
# the container
# --------------------------------------------------------------------------------------------

_TIME_UNITS = {"": 1.0, "unknown": 1.0, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3,
               "seconds": 1e3}


def _param_kind(name: str, unit: str) -> tuple[str | None, float]:
    """``("t1" | "t2" | "b1" | None, factor to ms or to a ratio)`` of a named column.

    Case-insensitive; ``T1``, ``t1_ms``, ``T1 (ms)``, ``t1_s`` (seconds), ``B1``, ``b1+`` ...
    """
    n = re.sub(r"[\s\[\]()\-]+", "_", str(name).strip().lower()).strip("_")
    m = re.fullmatch(r"(t1|t2)(?:_?(ms|msec|s|sec))?", n)
    if m:
        u = m.group(2) or str(unit).strip().lower()
        if u not in _TIME_UNITS:
            raise ValueError(f"parameter {name!r} has unit {unit!r}: T1 and T2 must be in ms "
                             "(or s, converted to ms)")
        return m.group(1), _TIME_UNITS[u]
    if re.fullmatch(r"b1(?:\+|_?(?:rel|ratio|scale|factor|map))?", n):
        return "b1", 1.0
    return None, 1.0


def _default_names(p: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and units of ``p`` unnamed columns: T1 ms, T2 ms, then B1, then ``param_4``..."""
    names = ("t1_ms", "t2_ms", "b1", *(f"param_{i + 1}" for i in range(3, p)))[:p]
    units = ("ms", "ms", "1", *("unknown",) * max(0, p - 3))[:p]
    return names, units


def _canonical_columns(names, units, params: np.ndarray):
    """Reorder the columns to T1 (ms), T2 (ms)[, B1][, others in their order], by name.

    Returns:
        ``(names, units, params)`` with canonical names ``t1_ms``, ``t2_ms``, ``b1`` and times
        converted to ms.

    Raises:
        ValueError: no (or several) T1 or T2 column, or a T1/T2 unit that is not a time.
    """
    kinds = [_param_kind(n, u) for n, u in zip(names, units)]
    where: dict[str, int] = {}
    for i, (k, _) in enumerate(kinds):
        if k is None:
            continue
        if k in where:
            raise ValueError(f"param_names {list(names)} name {k.upper()} twice (columns "
                             f"{where[k]} and {i}); give each parameter one column")
        where[k] = i
    if "t1" not in where or "t2" not in where:
        raise ValueError(f"param_names {list(names)} do not name a T1 and a T2 column: name "
                         "them t1_ms and t2_ms (case-insensitive; T1, t1, t1_ms or t1_s in "
                         "seconds are understood), and b1 for a B1 column")
    order = [where["t1"], where["t2"]] + ([where["b1"]] if "b1" in where else [])
    order += [i for i in range(len(names)) if i not in order]
    canon = {"t1": ("t1_ms", "ms"), "t2": ("t2_ms", "ms"), "b1": ("b1", "1")}
    out_names, out_units, cols = [], [], []
    for i in order:
        k, factor = kinds[i]
        n, u = canon[k] if k else (str(names[i]), str(units[i]))
        out_names.append(n)
        out_units.append(u)
        cols.append(params[:, i] * factor if factor != 1.0 else params[:, i])
    if order == list(range(len(names))) and all(f == 1.0 for _, f in kinds):
        out_params = params
    else:
        out_params = np.ascontiguousarray(np.stack(cols, axis=1))
    return tuple(out_names), tuple(out_units), out_params


def _blocks(n: int, step: int = _BLOCK_ROWS):
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
        units: units of the ``P`` columns (default ``("ms", "ms")``; ``"1"`` for a B1 factor).
        sequence: the pulse train as ``Sequence.to_dict()`` (``None`` if unknown).
        meta: JSON-serialisable metadata (simulation settings, source file, ...).
        basis: optional temporal SVD basis, shape ``(T, k)`` (written as ``V`` in ``.mat``).

    Raises:
        ValueError: empty, non-finite or mismatched arrays, names or units; no column named
            T1 or T2.
    """

    atoms: np.ndarray
    params: np.ndarray
    param_names: tuple[str, ...] = ("t1_ms", "t2_ms")
    units: tuple[str, ...] = ("ms", "ms")
    sequence: dict | None = None
    meta: dict = field(default_factory=dict)
    basis: np.ndarray | None = None

    def __post_init__(self) -> None:
        atoms = np.asarray(self.atoms)
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
        self.atoms = np.ascontiguousarray(atoms)
        params = np.asarray(self.params, dtype=np.float64)
        if params.ndim == 1:
            params = params[:, None]
        if params.ndim != 2 or params.shape[0] != atoms.shape[0]:
            raise ValueError(
                f"params must have shape (M, P) with M = {atoms.shape[0]} rows (one per atom), "
                f"got {params.shape}"
            )
        if not np.all(np.isfinite(params)):
            raise ValueError("params contains NaN or Inf values")
        self.params = np.ascontiguousarray(params)
        self.param_names = tuple(str(s) for s in self.param_names)
        self.units = tuple(str(s) for s in self.units)
        p = params.shape[1]
        if len(self.param_names) != p or len(self.units) != p:
            raise ValueError(
                f"param_names ({len(self.param_names)}) and units ({len(self.units)}) must "
                f"name each of the {p} parameter columns"
            )
        self.param_names, self.units, self.params = _canonical_columns(
            self.param_names, self.units, self.params)
        for sl in _blocks(len(self.atoms)):
            if not np.all(np.isfinite(self.atoms[sl])):
                raise ValueError("atoms contains NaN or Inf values")
        if self.sequence is not None and not isinstance(self.sequence, dict):
            raise ValueError("sequence must be a dict from Sequence.to_dict() or None")
        self.meta = dict(self.meta or {})
        if self.basis is not None:
            basis = np.asarray(self.basis)
            if basis.ndim != 2 or basis.shape[0] != atoms.shape[1] or basis.size == 0:
                raise ValueError(
                    f"basis must have shape (T, k) with T = {atoms.shape[1]}, got {basis.shape}"
                )
            self.basis = np.ascontiguousarray(basis)

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
        for sl in _blocks(len(self)):
            out[sl] = np.linalg.norm(self.atoms[sl], axis=1)
        return out

    def get_sequence(self) -> Sequence | None:
        """The :class:`~mrflight.physics.Sequence` the atoms were simulated with, if stored."""
        return None if self.sequence is None else Sequence.from_dict(self.sequence)

    def save(self, path, format: str | None = None, **kwargs) -> None:
        """Same as :func:`save` (``save(self, path, ...)``)."""
        save(self, path, format=format, **kwargs)

    @classmethod
    def load(cls, path, **kwargs) -> Dictionary:
        """Same as :func:`load`."""
        return load(path, **kwargs)


# --------------------------------------------------------------------------------------------
# generation and caching
# --------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``$MRFLIGHT_CACHE_DIR/dictionaries`` if that variable is set, else
    ``~/.cache/mrflight/dictionaries``."""
    root = os.environ.get("MRFLIGHT_CACHE_DIR")
    root = Path(root).expanduser() if root else Path.home() / ".cache" / "mrflight"
    return root / "dictionaries"


def _check_params(params) -> np.ndarray:
    p = np.asarray(params, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or p.shape[0] == 0:
        raise ValueError(f"params must have shape (M, 2) (T1 ms, T2 ms) with M >= 1, "
                         f"got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("params must be finite and non-negative (T1, T2 in ms)")
    return np.ascontiguousarray(p, dtype="<f8")


def _check_b1(b1, m: int):
    if b1 is None:
        return None
    b = np.asarray(b1, dtype=np.float64)
    if b.ndim > 1 or (b.ndim == 1 and b.shape[0] not in (1, m)):
        raise ValueError(f"b1 must be None, a scalar, or shape (M,) = ({m},), got {b.shape}")
    if not np.all(np.isfinite(b)) or np.any(b < 0):
        raise ValueError("b1 must be finite and non-negative (a flip-angle scale factor)")
    if b.ndim == 1 and b.shape[0] == 1:
        b = b.reshape(())
    return np.array(b, dtype="<f8")  # (ascontiguousarray would turn a 0-d array into 1-d)


def cache_key(seq: Sequence, params, b1=None, dtype=torch.float32, tol=DEFAULT_TOL) -> str:
    """The cache key of a dictionary: SHA-256 over everything that changes the atoms.

    Hashes the sequence fingerprint, the parameter bytes (float64, little-endian), B1, the
    precision, the truncation tolerance, ``EPG_VERSION`` and the cache layout version.
    """
    p = _check_params(params)
    b = _check_b1(b1, len(p))
    h = hashlib.sha256()
    h.update(f"mrflight-dictionary/{_LAYOUT_VERSION}/epg{EPG_VERSION}/".encode())
    h.update(seq.fingerprint().encode())
    h.update(repr(p.shape).encode())
    h.update(p.tobytes())
    h.update(b"b1:none" if b is None else repr(b.shape).encode() + b.tobytes())
    h.update(f"/{dtype}/{float(tol)!r}".encode())
    return h.hexdigest()[:32]


def _progress_bar(total: int, enabled: bool):
    """A context manager yielding a ``callback(n_done)`` (or ``None`` when disabled)."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def bar():
        from mrflight.progress import progress_bar

        with progress_bar("simulating dictionary", transient=True) as prog:
            task = prog.add_task("atoms", total=total)
            yield lambda n: prog.update(task, completed=int(n))

    return bar()


def _layout(p: np.ndarray, b, dtype, tol):
    """Parameter names, units, parameter table (B1 as a third column when per atom) and meta."""
    names, units, out_params = ("t1_ms", "t2_ms"), ("ms", "ms"), p
    meta = {"epg_version": EPG_VERSION, "tol": float(tol), "dtype": str(dtype).split(".")[-1],
            "b1": None if b is None or b.ndim == 1 else float(b), "generator": "mrflight"}
    if b is not None and b.ndim == 1:
        names, units = names + ("b1",), units + ("1",)
        out_params = np.concatenate([p, b[:, None]], axis=1)
    return names, units, out_params, meta


def generate(
    seq: Sequence,
    params,
    *,
    b1=None,
    cache_dir=None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    tol: float = DEFAULT_TOL,
) -> Dictionary:
    """Simulate a dictionary with :func:`mrflight.physics.simulate`, optionally cached on disk.

    Args:
        seq: the pulse train.
        params: ``(M, 2)`` T1 and T2 in ms (e.g. :func:`paper_grid`).
        b1: flip-angle scale: ``None`` (1), a scalar (stored in ``meta["b1"]``), or shape
            ``(M,)`` (appended to the parameters as a third column ``"b1"``, unit ``"1"``).
        cache_dir: ``None`` or ``False``: no cache. ``True``: :func:`default_cache_dir`
            (``$MRFLIGHT_CACHE_DIR/dictionaries`` or ``~/.cache/mrflight/dictionaries``).
            A path: that folder. The file is ``<cache_dir>/<cache_key>.h5``; it is written
            atomically with a SHA-256 checksum of the payload and verified on load; a corrupt or
            truncated file is reported with a ``RuntimeWarning`` and rebuilt, never used.
            Temporary files that killed writers left in the folder are removed
            (:func:`mrflight.fileio.remove_stale_temp_files`).
        progress: show a progress bar (rich) while simulating.
        dtype: simulation precision, ``torch.float32`` (complex64 atoms) or ``torch.float64``.
        tol: EPG truncation tolerance passed to ``simulate``.

    Returns:
        A :class:`Dictionary` with complex atoms ``(M, T)``, ``sequence=seq.to_dict()`` and the
        simulation settings in ``meta``.

    Memory: the atoms are held once (complex64: 8 bytes per sample, 1.6 GB for the paper grid
    with 1750 pulses) plus ``simulate``'s transient real buffer (half that); no float64 copy.
    """
    if not isinstance(seq, Sequence):
        raise ValueError(f"seq must be a mrflight.physics.Sequence, got {type(seq).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    p = _check_params(params)
    b = _check_b1(b1, len(p))
    if cache_dir is None or cache_dir is False:
        path = None
    else:
        folder = default_cache_dir() if cache_dir is True else Path(cache_dir).expanduser()
        remove_stale_temp_files(folder)  # what killed writers left (up to GBs per file)
        key = cache_key(seq, p, b, dtype, tol)
        path = folder / f"{key}.h5"
        if path.exists():
            try:
                d = load(path, verify=True, require_checksum=True)
                if d.meta.get("cache_key") != key or not np.array_equal(d.params[:, :2], p):
                    raise ValueError("its key or parameters do not match the request")
                return d
            except Exception as e:  # noqa: BLE001 - any damage means: rebuild
                warnings.warn(f"dictionary cache {path} is corrupt or unreadable ({e}); "
                              "rebuilding it", RuntimeWarning, stacklevel=2)

    with _progress_bar(len(p), progress) as cb:
        t1 = torch.from_numpy(p[:, 0].astype(np.float64))
        t2 = torch.from_numpy(p[:, 1].astype(np.float64))
        bt = None if b is None else torch.from_numpy(np.array(b, dtype=np.float64))
        atoms = simulate(seq, t1, t2, bt, dtype=dtype, tol=tol, progress=cb)
    atoms = atoms.detach().cpu().numpy()  # shares memory with the tensor: no copy

    names, units, out_params, meta = _layout(p, b, dtype, tol)
    d = Dictionary(atoms, out_params.astype(np.float64), names, units, seq.to_dict(), meta)
    zero = int(np.sum(d.norms() == 0))
    if zero:
        warnings.warn(f"{zero} of {len(d)} atoms are identically zero (T2 ~ 0 at TE > 0) and "
                      "cannot be normalised; drop them from params", RuntimeWarning,
                      stacklevel=2)
    if path is not None:
        d.meta["cache_key"] = key
        try:
            save(d, path, format="h5")
        except OSError as e:
            warnings.warn(f"could not write the dictionary cache {path}: {e}", RuntimeWarning,
                          stacklevel=2)
    return d


def generate_to_file(
    seq: Sequence,
    params,
    path,
    *,
    b1=None,
    chunk_atoms: int = 8192,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    tol: float = DEFAULT_TOL,
) -> Path:
    """Simulate a dictionary chunk by chunk straight into an ``.h5`` file (bounded memory).

    The file has the layout of ``save(generate(seq, params, b1=b1, dtype=dtype, tol=tol),
    path)`` (same datasets, attributes and SHA-256 checksum, computed as the chunks stream by),
    so :func:`load` and :func:`open_h5` read it, but only ``chunk_atoms`` fingerprints are ever
    in memory: use it for dictionaries larger than RAM. With ``chunk_atoms >= M`` the atoms are
    bit-identical to :func:`generate`'s; with smaller chunks they differ from them only by EPG
    truncation, at the level of ``tol`` (the truncation rate is fixed from the whole grid, but
    the SIMD kernel shares one state count among 16 neighbouring atoms of a chunk, so an atom
    may keep a few more states than in one big call, never fewer). The HDF5 dataset ``atoms`` is
    pre-allocated and filled chunk by chunk in a temporary file beside ``path`` that is renamed
    to ``path`` at the end (:func:`mrflight.fileio.atomic_path`): a killed run leaves any older
    file at ``path`` untouched and never a partial one.

    Args:
        seq: the pulse train.
        params: ``(M, 2)`` T1 and T2 in ms.
        path: destination ``.h5`` file.
        b1: as in :func:`generate`.
        chunk_atoms: fingerprints simulated and written per chunk (memory: about
            ``chunk_atoms * T * 12`` bytes in float32).
        progress: show a progress bar.
        dtype: ``torch.float32`` (complex64 atoms) or ``torch.float64``.
        tol: EPG truncation tolerance.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: bad sequence, parameters, B1, chunk size, dtype or a non-``.h5`` path.
    """
    import h5py

    if not isinstance(seq, Sequence):
        raise ValueError(f"seq must be a mrflight.physics.Sequence, got {type(seq).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(chunk_atoms, bool) or not isinstance(chunk_atoms, (int, np.integer)) \
            or chunk_atoms < 1:
        raise ValueError(f"chunk_atoms must be a positive integer, got {chunk_atoms!r}")
    path = Path(path)
    if _format(path, None) != "h5":
        raise ValueError(f"generate_to_file writes HDF5: give a .h5 path, got {path}")
    p = _check_params(params)
    b = _check_b1(b1, len(p))
    m, t = len(p), len(seq)
    cdtype = np.dtype(np.complex64 if dtype == torch.float32 else np.complex128)
    names, units, out_params, meta = _layout(p, b, dtype, tol)
    out_params = np.ascontiguousarray(out_params, dtype="<f8")
    header = {k: _json(v, k) for k, v in {"param_names": list(names), "units": list(units),
                                          "sequence": seq.to_dict(), "meta": meta}.items()}
    # the truncation rate depends on the parameter range: fix it from the whole grid so every
    # chunk keeps the states ``generate`` would keep (identical atoms, not just within tol)
    rate = truncation_rate(seq, tol, float(p[:, 1].max()), float(p[:, 0].max()),
                           (1.0, 1.0) if b is None else (float(b.min()), float(b.max())))
    h = hashlib.sha256()  # the same stream as _checksum, fed chunk by chunk
    h.update(f"{cdtype.str}{(m, t)}{out_params.shape}".encode())
    zero = 0
    with atomic_path(path) as tmp, _progress_bar(m, progress) as cb:
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("atoms", shape=(m, t), dtype=cdtype)
            for start in range(0, m, int(chunk_atoms)):
                sl = slice(start, min(start + int(chunk_atoms), m))
                bt = None if b is None else torch.from_numpy(
                    np.array(b if b.ndim == 0 else b[sl], dtype=np.float64))
                chunk = simulate(seq, torch.from_numpy(p[sl, 0].copy()),
                                 torch.from_numpy(p[sl, 1].copy()), bt, dtype=dtype,
                                 tol=tol, _rate=rate).detach().cpu().numpy()
                chunk = np.ascontiguousarray(chunk, dtype=cdtype)
                if not np.all(np.isfinite(chunk.view(chunk.real.dtype))):
                    raise ValueError("simulation produced NaN or Inf atoms")
                ds[sl] = chunk
                h.update(chunk.view(np.uint8))
                zero += int(np.sum(~np.any(chunk != 0, axis=1)))
                del chunk
                if cb is not None:
                    cb(sl.stop)
            f.create_dataset("params", data=out_params)
            h.update(out_params.view(np.uint8))
            h.update(_json(header, "header").encode())
            for k, v in header.items():
                f.attrs[k] = v
            f.attrs["format"] = "mrflight-dictionary"
            f.attrs["layout_version"] = _LAYOUT_VERSION
            f.attrs["sha256"] = h.hexdigest()
    if zero:
        warnings.warn(f"{zero} of {m} atoms are identically zero (T2 ~ 0 at TE > 0) and "
                      "cannot be normalised; drop them from params", RuntimeWarning,
                      stacklevel=2)
    return path


def open_h5(path, *, verify: bool = False):
    """Open an ``.h5`` dictionary lazily: a context manager yielding ``(atoms, params, header)``.

    ``atoms`` is the ``h5py.Dataset`` ``(M, T)`` (slice it to read rows: nothing is read until
    then), ``params`` the ``(M, P)`` float64 array (columns reordered by name to T1, T2 in
    ms[, B1], as :func:`load` does) and ``header`` a dict with ``param_names``,
    ``units``, ``sequence`` and ``meta``. For dictionaries larger than memory (see
    :func:`generate_to_file`); :class:`mrflight.matching.DictionaryMatcher` needs the atoms in
    memory, so match against row blocks or an SVD-compressed copy.

    Args:
        path: an ``.h5`` file written by :func:`save` or :func:`generate_to_file`.
        verify: check the SHA-256 checksum first, reading the atoms block by block.

    Raises:
        ValueError: missing or unreadable file, missing datasets, or a checksum mismatch.
    """
    import contextlib

    import h5py

    path = Path(path)
    if _format(path, None) != "h5":
        raise ValueError(f"open_h5 reads .h5 dictionaries, got {path}")
    if not path.is_file():
        raise ValueError(f"dictionary file {path} does not exist")

    @contextlib.contextmanager
    def opened():
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise damaged_error(path, e, "h5 dictionary") from None
        with f:
            if "atoms" not in f or "params" not in f:
                raise ValueError(f"{path} has no 'atoms'/'params' datasets")
            attrs = {k: (f.attrs[k].decode() if isinstance(f.attrs[k], bytes)
                         else str(f.attrs[k]))
                     for k in ("param_names", "units", "sequence", "meta", "sha256")
                     if k in f.attrs}
            atoms, params = f["atoms"], f["params"][()]
            header = {k: attrs.get(k, "null") for k in ("param_names", "units", "sequence",
                                                        "meta")}
            if verify:
                digest = attrs.get("sha256")
                if digest is None:
                    raise ValueError(f"{path} has no checksum")
                if "basis" in f:
                    raise ValueError(f"{path}: verify=True does not support a stored basis; "
                                     "use load()")
                hh = hashlib.sha256()
                hh.update(f"{atoms.dtype.str}{atoms.shape}{params.shape}".encode())
                for sl in _blocks(atoms.shape[0]):
                    hh.update(np.ascontiguousarray(atoms[sl]).view(np.uint8))
                hh.update(np.ascontiguousarray(params, dtype="<f8").view(np.uint8))
                hh.update(_json(header, "header").encode())
                if hh.hexdigest() != digest:
                    raise ValueError(f"{path} is corrupt: its SHA-256 checksum does not match")
            header = {k: json.loads(v) for k, v in header.items()}
            p = params.shape[1]
            names = header["param_names"] or _default_names(p)[0]
            units = header["units"] or _default_names(p)[1]
            header["param_names"], header["units"], params = _canonical_columns(
                names, units, np.asarray(params, dtype=np.float64))
            header["param_names"], header["units"] = (list(header["param_names"]),
                                                      list(header["units"]))
            yield atoms, params, header

    return opened()


# --------------------------------------------------------------------------------------------
# file I/O
# --------------------------------------------------------------------------------------------

def _format(path: Path, format: str | None) -> str:
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


def _header(d: Dictionary) -> dict:
    return {"param_names": list(d.param_names), "units": list(d.units),
            "sequence": d.sequence, "meta": d.meta}


def _json(obj, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serialisable to be saved: {e}") from None


def _checksum(atoms: np.ndarray, params: np.ndarray, basis, header_json: str) -> str:
    """SHA-256 of the payload, hashed blockwise from the arrays' memory (no copies)."""
    h = hashlib.sha256()
    h.update(f"{atoms.dtype.str}{atoms.shape}{params.shape}".encode())
    for sl in _blocks(len(atoms)):
        h.update(np.ascontiguousarray(atoms[sl]).view(np.uint8))
    h.update(np.ascontiguousarray(params, dtype="<f8").view(np.uint8))
    if basis is not None:
        h.update(f"{basis.dtype.str}{basis.shape}".encode())
        h.update(np.ascontiguousarray(basis).view(np.uint8))
    h.update(header_json.encode())
    return h.hexdigest()


def save(dictionary: Dictionary, path, format: str | None = None, *,
         mat_version: str = "7") -> None:
    """Write a dictionary to ``.h5``, ``.npz`` or ``.mat``, atomically.

    The file appears complete or not at all (written beside ``path`` and renamed): a killed
    write leaves any older file at ``path`` untouched.

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
        path: destination; the extension picks the format unless ``format`` is given.
        format: ``"h5"``, ``"npz"`` or ``"mat"`` (default: from the extension).
        mat_version: ``"7"`` or ``"7.3"`` (``.mat`` only).

    Raises:
        ValueError: unknown extension/format or version, or metadata that is not JSON.
    """
    if not isinstance(dictionary, Dictionary):
        raise ValueError(f"dictionary must be a Dictionary, got {type(dictionary).__name__}")
    path = Path(path)
    fmt = _format(path, format)
    if str(mat_version) not in ("7", "7.3"):
        raise ValueError(f"mat_version must be '7' or '7.3', got {mat_version!r}")
    d = dictionary
    header = {k: _json(v, k) for k, v in _header(d).items()}
    if fmt == "h5":
        import h5py

        digest = _checksum(d.atoms, d.params, d.basis, _json(header, "header"))
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("atoms", data=d.atoms)
                f.create_dataset("params", data=d.params)
                if d.basis is not None:
                    f.create_dataset("basis", data=d.basis)
                for k, v in header.items():
                    f.attrs[k] = v
                f.attrs["format"] = "mrflight-dictionary"
                f.attrs["layout_version"] = _LAYOUT_VERSION
                f.attrs["sha256"] = digest
    elif fmt == "npz":
        digest = _checksum(d.atoms, d.params, d.basis, _json(header, "header"))
        arrays = {"atoms": d.atoms, "params": d.params,
                  "param_names": np.array(d.param_names, dtype=str),
                  "units": np.array(d.units, dtype=str),
                  "sequence": np.array(header["sequence"]), "meta": np.array(header["meta"]),
                  "layout_version": np.array(_LAYOUT_VERSION), "sha256": np.array(digest)}
        if d.basis is not None:
            arrays["basis"] = d.basis
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    else:
        norms = d.norms()
        safe = np.where(norms > 0, norms, 1).astype(norms.dtype)
        normalised = np.empty_like(d.atoms)
        for sl in _blocks(len(d)):
            normalised[sl] = d.atoms[sl] / safe[sl, None]
        s = {"D": normalised, "normD": norms, "lut": d.params,
             "param_names": ",".join(d.param_names), "units": ",".join(d.units),
             "sequence": header["sequence"], "meta": header["meta"]}
        if d.basis is not None:
            s["V"] = d.basis
        save_mat(path, {"dict": s}, v73=str(mat_version) == "7.3")


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
        path: a ``.h5``, ``.npz`` or ``.mat`` file.
        verify: check the SHA-256 checksum when the file has one (``.h5``/``.npz``).
        require_checksum: fail if the file has no checksum (used for the cache).

    Returns:
        The :class:`Dictionary`.

    Raises:
        ValueError: missing file, unknown extension, truncated or damaged file (the message
            names it), checksum mismatch, missing/empty/mismatched arrays, or parameter names
            without T1 and T2.
    """
    path = Path(path)
    fmt = _format(path, None)
    if not path.is_file():
        raise ValueError(f"dictionary file {path} does not exist")
    if fmt == "mat":
        return _load_mat(path)
    try:
        if fmt == "h5":
            import h5py

            with h5py.File(path, "r") as f:
                if "atoms" not in f or "params" not in f:
                    raise ValueError(f"{path} has no 'atoms'/'params' datasets")
                atoms, params = f["atoms"][()], f["params"][()]
                basis = f["basis"][()] if "basis" in f else None
                attrs = {k: f.attrs[k] for k in ("param_names", "units", "sequence", "meta",
                                                  "sha256") if k in f.attrs}
        else:
            with np.load(path, allow_pickle=False) as z:
                if "atoms" not in z.files or "params" not in z.files:
                    raise ValueError(f"{path} has no 'atoms'/'params' arrays")
                atoms, params = z["atoms"], z["params"]
                basis = z["basis"] if "basis" in z.files else None
                attrs = {k: _json(list(_split(z[k].item() if z[k].ndim == 0 else z[k])), k)
                         for k in ("param_names", "units") if k in z.files}
                attrs.update({k: str(z[k]) for k in ("sequence", "meta", "sha256")
                              if k in z.files})
    except ValueError:
        raise
    except Exception as e:  # h5py/zipfile raise OSError, KeyError, BadZipFile, ...
        raise damaged_error(path, e, f"{fmt} dictionary") from None
    attrs = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in attrs.items()}
    digest = attrs.pop("sha256", None)
    if digest is None and require_checksum:
        raise ValueError(f"{path} has no checksum")
    if verify and digest is not None:
        header = {k: attrs.get(k, "null") for k in ("param_names", "units", "sequence", "meta")}
        if _checksum(atoms, params, basis, _json(header, "header")) != digest:
            raise ValueError(f"{path} is corrupt: its SHA-256 checksum does not match")
    params = np.asarray(params)
    p = params.shape[1] if params.ndim == 2 else 1
    names = json.loads(attrs.get("param_names", "null")) or _default_names(p)[0]
    units = json.loads(attrs.get("units", "null")) or (
        _default_names(p)[1] if len(names) == p else ("",) * len(names))
    return Dictionary(atoms, params, tuple(names), tuple(units),
                      json.loads(attrs.get("sequence", "null")),
                      json.loads(attrs.get("meta", "null")) or {}, basis)


def _find_dict(data: dict, path: Path) -> dict:
    if "D" in data and "lut" in data:
        return data
    for v in data.values():
        if isinstance(v, dict) and "D" in v and "lut" in v:
            return v
    raise ValueError(f"{path} holds no dictionary: need variables 'D' and 'lut' at top level "
                     f"or in a struct (found {sorted(data)})")


def _load_mat(path: Path) -> Dictionary:
    s = _find_dict(load_mat(path), path)
    D, lut = np.asarray(s["D"]), np.asarray(s["lut"], dtype=np.float64)
    if D.size == 0 or lut.size == 0:
        raise ValueError(f"{path}: D and lut must be non-empty")
    names = _split(s.get("param_names"))
    units = _split(s.get("units"))
    p = len(names) if names else None
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
    if "normD" in s:
        norm = np.asarray(s["normD"]).reshape(-1).astype(D.real.dtype)
        if norm.size != D.shape[0]:
            raise ValueError(f"{path}: normD has {norm.size} values for {D.shape[0]} atoms")
        D = D * norm[:, None]
    n_p = lut.shape[1]
    if not names:
        names = _default_names(n_p)[0]
    if not units:
        units = _default_names(n_p)[1] if len(names) == n_p else ("",) * len(names)
    seq = s.get("sequence")
    meta = s.get("meta")
    meta = json.loads(meta) if isinstance(meta, str) and meta else {"source": str(path)}
    V = s.get("V")
    return Dictionary(D, lut, tuple(names), tuple(units),
                      json.loads(seq) if isinstance(seq, str) and seq else None, meta,
                      None if V is None else _column(np.asarray(V)))


def _split(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",")) if v else ()
    return tuple(str(x) for x in np.asarray(v).ravel())



def _column(v: np.ndarray) -> np.ndarray:
    return v[:, None] if v.ndim == 1 else v
