"""Pulse trains read from user files: ``.csv``/``.txt``, ``.npy`` and MATLAB ``.mat``.

Kept out of :mod:`mrflight.physics` (which imports nothing of the package) because ``.mat``
files are read by :func:`mrflight.fileio.load_mat`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mrflight.fileio import load_mat
from mrflight.physics.sequence import Sequence

__all__ = ["from_file"]

_COLUMNS = ("flip_angle_deg", "phase_deg", "tr_ms", "te_ms")
#: column / variable names understood in schedule files (case-insensitive)
_ALIASES = {
    "flip_angle_deg": ("flip_angle_deg", "fa", "fa_deg", "flip", "flip_angle", "variableflip"),
    "phase_deg": ("phase_deg", "ph", "phase", "rf_phase", "variablephase"),
    "tr_ms": ("tr_ms", "tr", "variabletr"),
    "te_ms": ("te_ms", "te", "variablete"),
}
_CANONICAL = {a: col for col, names in _ALIASES.items() for a in names}


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise ValueError(f"schedule file {path} is not UTF-8 text (byte {e.object[e.start]:#04x} "
                         f"at offset {e.start}): save it as UTF-8 or plain ASCII") from None


def _load_table(path: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """Read a schedule file into named columns and a label of every row (for messages).

    Raises:
        ValueError: ragged, non-numeric, undecodable or ambiguous data, a duplicated column or
            a header name that is not understood.
    """
    suffix = path.suffix.lower()
    if suffix in (".csv", ".txt"):
        numbered = [(i + 1, ln) for i, ln in enumerate(_read_text(path).splitlines())
                    if ln.strip() and not ln.lstrip().startswith("#")]
        if not numbered:
            raise ValueError(f"flip-angle file {path} is empty")
        delim = "," if "," in numbered[0][1] else None
        first = numbered[0][1].split(delim)
        header = None
        try:
            [float(x) for x in first]
        except ValueError:
            header = [h.strip().strip("\"'").strip() for h in first]  # "FA","TR" as FA,TR
            numbered = numbered[1:]
        rows, labels = [], []
        for line, ln in numbered:
            cells = [c.strip() for c in ln.split(delim)]
            try:
                rows.append([float(c) if c else np.nan for c in cells])
            except ValueError as e:
                raise ValueError(
                    f"flip-angle file {path}, line {line}: non-numeric ({e})"
                ) from None
            labels.append(f"line {line}")
        if not rows:
            raise ValueError(f"flip-angle file {path} has a header but no data rows")
        width = {len(r) for r in rows}
        if len(width) != 1:
            raise ValueError(f"flip-angle file {path} is ragged: rows have {sorted(width)} columns")
        table = np.asarray(rows, dtype=np.float64)
        if header is None:
            if table.shape[1] in (2, 3):
                raise ValueError(
                    f"flip-angle file {path} has {table.shape[1]} columns and no header: is the "
                    "second column the RF phase or the TR? Add a header line naming the "
                    "columns, e.g. 'flip_angle_deg,tr_ms' or 'flip_angle_deg,phase_deg,tr_ms' "
                    "(a file without a header must have 1 column, the flip angles, or 4: "
                    f"{', '.join(_COLUMNS)})")
            names = list(_COLUMNS[: table.shape[1]])
        else:
            names = header
        if len(names) != table.shape[1]:
            raise ValueError(f"flip-angle file {path}: header has {len(names)} names for "
                             f"{table.shape[1]} columns")
        unknown = [n for n in names if n and n.strip().lower() not in _CANONICAL]
        if unknown:  # a misnamed phase or TR column would be left out without a word
            raise ValueError(
                f"flip-angle file {path}: column(s) {', '.join(map(repr, unknown))} not "
                f"understood; name the columns {', '.join(_COLUMNS)} (any case; FA, PH, TR, "
                "TE are understood; times in ms, angles in degrees), or remove the column(s)")
        out: dict[str, np.ndarray] = {}
        where: dict[str, int] = {}
        for i, n in enumerate(names):
            col = _CANONICAL.get(n.strip().lower(), n)
            if col in where:
                raise ValueError(f"flip-angle file {path}: column {col!r} appears twice "
                                 f"(header names {names[where[col]]!r} and {n!r}); keep one")
            where[col] = i
            out[col] = table[:, i]
        return out, labels
    if suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
        labels = [f"row {i}" for i in range(len(arr))] if arr.ndim else []
        if np.iscomplexobj(arr) or arr.dtype.kind not in "biuf":
            raise ValueError(f"{path}: expected real numbers (degrees, ms), got dtype "
                             f"{arr.dtype}")
        if arr.ndim == 1:
            return {"flip_angle_deg": arr.astype(np.float64)}, labels
        if arr.ndim == 2 and arr.shape[1] in (2, 3):  # as for a text file without a header
            raise ValueError(
                f"{path} has {arr.shape[1]} columns, which a .npy cannot name: is the second "
                "the RF phase or the TR? Save 1 column (the flip angles) or all 4 "
                f"({', '.join(_COLUMNS)}), or write a .csv with a header")
        if arr.ndim == 2 and arr.shape[1] <= 4:
            return ({n: arr[:, i].astype(np.float64) for i, n in
                     enumerate(_COLUMNS[: arr.shape[1]])}, labels)
        raise ValueError(f"{path}: expected shape (T,) or (T, <=4) columns "
                         f"{_COLUMNS}, got {arr.shape}")
    if suffix == ".mat":
        data = load_mat(path)
        out = _mat_columns(data)
        if "flip_angle_deg" not in out:
            # a struct holding the train (imr-framework's method.VariableFlip, ...)
            inner = {k: _mat_columns(v) for k, v in data.items() if isinstance(v, dict)}
            inner = {k: v for k, v in inner.items() if "flip_angle_deg" in v}
            if len(inner) > 1:
                raise ValueError(f"{path}: the structs {sorted(inner)} each hold a flip-angle "
                                 "field; keep the train in one of them")
            out = next(iter(inner.values()), out)
        if "flip_angle_deg" not in out:
            raise ValueError(f"{path}: no flip-angle variable found; expected one of "
                             f"{_ALIASES['flip_angle_deg']} (any case), at top level or in a "
                             f"struct, found {sorted(data)}")
        return out, [f"element {i + 1}" for i in range(len(out["flip_angle_deg"]))]
    raise ValueError(f"unsupported schedule file type {suffix!r} for {path}; "
                     "use .csv, .txt, .npy or .mat")


def _mat_columns(data: dict) -> dict[str, np.ndarray]:
    """The train's columns among the variables (or struct fields) of a ``.mat`` file."""
    out = {}
    lower = {k.lower(): k for k in data}
    for col, names in _ALIASES.items():
        for n in names:
            if n in lower and not isinstance(data[lower[n]], dict):
                out[col] = np.asarray(data[lower[n]], dtype=np.float64).ravel()
                break
    return out


def _column(path: Path, cols: dict, name: str, labels: list[str]) -> np.ndarray | None:
    """A column with every entry finite; ``None`` when absent or entirely empty."""
    col = cols.get(name)
    if col is None or col.size == 0 or np.all(np.isnan(col)):
        return None
    bad = np.flatnonzero(~np.isfinite(col))
    if bad.size:
        i = int(bad[0])
        where = labels[i] if i < len(labels) else f"row {i}"
        what = "empty or NaN" if np.isnan(col[i]) else "infinite"
        raise ValueError(f"{path}, {where}: {name} is {what} ({bad.size} such entries); give "
                         f"every pulse a finite {name}")
    return col


def from_file(
    path: str | Path,
    tr_ms: float | None = None,
    te_ms: float | None = None,
    inversion: bool = True,
    ti_ms: float = 20.0,
    inversion_efficiency: float = 1.0,
    name: str | None = None,
) -> Sequence:
    """Load a pulse train from ``.csv``/``.txt`` (columns flip_angle_deg, phase_deg, tr_ms,
    te_ms; header optional), ``.npy`` (``(T,)`` flip angles, ``(T, 1)`` or ``(T, 4)`` columns)
    or ``.mat`` (variables ``FA``/``flip_angle_deg``, ``PH``, ``TR``, ``TE``, at top level or
    as the fields of one struct, e.g. imr-framework's ``method.VariableFlip``; v7 or v7.3).

    Args:
        path: the file (UTF-8 or ASCII; a byte-order mark is ignored). Angles in degrees,
            times in ms. Column names are case-insensitive (``FA``, ``PH``, ``TR``, ``TE`` are
            understood); a file without a header has 1 column (flip angles) or 4 (in the order
            above). Every entry of a column must be finite: an empty cell is an error (a column
            left entirely empty counts as absent: phase 0, TR from ``tr_ms``, TE from ``te_ms``).
        tr_ms: TR used when the file has no TR column (required then).
        te_ms: TE (one value: mrflight simulates one echo time); default the file's TE column,
            which must then be constant, else 2 ms.
        inversion, ti_ms, inversion_efficiency: the inversion preparation (not in the file).
        name: label; default the file stem.

    Raises:
        ValueError: a missing, undecodable, ragged or non-numeric file, a headerless file or
            a ``.npy`` with 2 or 3 columns, a complex ``.npy``, a duplicated column, a header
            name that is not understood (a misnamed phase column would read as phase 0),
            empty/NaN/infinite entries (the row is named), a varying TE column, or no
            flip-angle column (the columns found are listed).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"schedule file {path} does not exist")
    cols, labels = _load_table(path)
    fa = _column(path, cols, "flip_angle_deg", labels)
    if fa is None:
        raise ValueError(f"{path} has no flip_angle_deg column (columns found: "
                         f"{', '.join(map(repr, cols)) or 'none'}); name the columns "
                         f"{', '.join(_COLUMNS)} (any case; FA, PH, TR, TE are understood)")
    phase = _column(path, cols, "phase_deg", labels)
    tr = _column(path, cols, "tr_ms", labels)
    if tr is None:
        if tr_ms is None:
            read = ", ".join(cols)
            raise ValueError(f"{path} has no tr_ms column (its columns were read as {read}): "
                             "pass tr_ms=, or add a tr_ms column")
        tr = tr_ms
    if te_ms is None:
        te = _column(path, cols, "te_ms", labels)
        if te is not None and te.min() != te.max():
            raise ValueError(f"{path}: te_ms varies ({te.min():g}..{te.max():g} ms); mrflight "
                             "assumes one TE for the whole train: pass te_ms= to choose one")
        te_ms = 2.0 if te is None else float(te[0])
    return Sequence(fa, 0.0 if phase is None else phase, tr, te_ms, inversion=inversion,
                    ti_ms=ti_ms, inversion_efficiency=inversion_efficiency,
                    name=name or path.stem)
