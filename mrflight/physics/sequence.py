"""MRF acquisition schedules: flip-angle, RF-phase and TR trains.

A :class:`Sequence` is a plain container of per-pulse arrays (degrees and milliseconds) plus the
inversion preparation. Builders construct the trains this project ships:

* :func:`oksuz2019` -- the default train: 1750 pulses at TR 4.3 ms (Oksuz et al. 2019) with flip
  angles in repeating half-sine lobes between 5 and 70 degrees, after an adiabatic inversion.
* :func:`jiang2015` -- the published FISP-MRF schedule of Jiang et al. 2015 (1000 pulses,
  sinusoidal lobes, TR 11.67-14.33 ms), shipped as a CSV file in ``schedules/``.
* :func:`from_file` -- a train loaded from ``.csv``, ``.txt``, ``.npy`` or ``.mat``.

Only torch and numpy are imported here (plus scipy/h5py lazily for ``.mat`` files).
"""

from __future__ import annotations

import hashlib
import math
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["Sequence", "oksuz2019", "jiang2015", "from_file", "SCHEDULE_DIR"]

SCHEDULE_DIR = Path(str(resources.files("mrflight.physics") / "schedules"))


def _as_train(name: str, value, n: int | None) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        if n is None:
            raise ValueError(f"{name} must be a 1-D train when the length is not known")
        arr = np.full(n, float(arr))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per pulse), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: a sequence needs at least one pulse")
    if n is not None and arr.size != n:
        raise ValueError(f"{name} has {arr.size} values but the flip-angle train has {n} pulses")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf values")
    return arr


class Sequence:
    """An MRF pulse train for a FISP (gradient-spoiled, unbalanced) readout.

    Args:
        flip_angle_deg: nominal flip angle of every pulse, degrees, shape ``(T,)``.
        phase_deg: RF phase of every pulse, degrees, ``(T,)`` or a scalar (default 0).
        tr_ms: repetition time starting with every pulse, ms, ``(T,)`` or a scalar.
        te_ms: echo time after every pulse, ms (one value for the whole train).
        inversion: whether an inversion pulse precedes the train.
        ti_ms: delay from the inversion to the first pulse, ms.
        inversion_efficiency: fraction of the inversion; ``Mz = -efficiency`` right after it
            (1 is a perfect adiabatic inversion).
        name: a label stored with the sequence (for file names and logs).

    Attributes:
        flip_angle_deg, phase_deg, tr_ms: ``np.ndarray`` of shape ``(T,)`` (float64).
        te_ms, ti_ms, inversion_efficiency: ``float``. inversion: ``bool``.
    """

    def __init__(
        self,
        flip_angle_deg,
        phase_deg=0.0,
        tr_ms=4.3,
        te_ms: float = 2.0,
        inversion: bool = True,
        ti_ms: float = 20.0,
        inversion_efficiency: float = 1.0,
        name: str = "custom",
    ) -> None:
        self.flip_angle_deg = _as_train("flip_angle_deg", flip_angle_deg, None)
        n = self.flip_angle_deg.size
        self.phase_deg = _as_train("phase_deg", phase_deg, n)
        self.tr_ms = _as_train("tr_ms", tr_ms, n)
        if np.any(self.tr_ms <= 0):
            raise ValueError("tr_ms must be positive for every pulse")
        self.te_ms = float(te_ms)
        if not math.isfinite(self.te_ms) or self.te_ms < 0:
            raise ValueError(f"te_ms must be a finite non-negative number, got {te_ms}")
        if np.any(self.te_ms > self.tr_ms):
            raise ValueError(
                f"te_ms={self.te_ms} is longer than the shortest TR {self.tr_ms.min()}"
            )
        self.inversion = bool(inversion)
        self.ti_ms = float(ti_ms)
        if not math.isfinite(self.ti_ms) or self.ti_ms < 0:
            raise ValueError(f"ti_ms must be a finite non-negative number, got {ti_ms}")
        self.inversion_efficiency = float(inversion_efficiency)
        if not 0.0 <= self.inversion_efficiency <= 1.0:
            raise ValueError(
                f"inversion_efficiency must lie in [0, 1], got {inversion_efficiency}"
            )
        self.name = str(name)

    def __len__(self) -> int:
        return int(self.flip_angle_deg.size)

    def __repr__(self) -> str:
        return (
            f"Sequence(name={self.name!r}, T={len(self)}, "
            f"FA={self.flip_angle_deg.min():.1f}-{self.flip_angle_deg.max():.1f} deg, "
            f"TR={self.tr_ms.min():.2f}-{self.tr_ms.max():.2f} ms, TE={self.te_ms} ms, "
            f"inversion={self.inversion}, TI={self.ti_ms} ms)"
        )

    @property
    def real_phases(self) -> bool:
        """True when every RF phase is a multiple of 180 degrees (real EPG arithmetic suffices)."""
        r = np.mod(self.phase_deg, 180.0)
        return bool(np.all((r < 1e-9) | (r > 180.0 - 1e-9)))

    def to_dict(self) -> dict:
        """A JSON/YAML-friendly description (lists, floats) that :meth:`from_dict` restores."""
        return {
            "flip_angle_deg": self.flip_angle_deg.tolist(),
            "phase_deg": self.phase_deg.tolist(),
            "tr_ms": self.tr_ms.tolist(),
            "te_ms": self.te_ms,
            "inversion": self.inversion,
            "ti_ms": self.ti_ms,
            "inversion_efficiency": self.inversion_efficiency,
            "name": self.name,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Sequence:
        return cls(**d)

    def fingerprint(self) -> str:
        """A hash of everything that changes the simulated signal (used for cache keys)."""
        h = hashlib.sha256()
        for arr in (self.flip_angle_deg, self.phase_deg, self.tr_ms):
            h.update(np.ascontiguousarray(arr, dtype="<f8").tobytes())
        h.update(
            repr((self.te_ms, self.inversion, self.ti_ms, self.inversion_efficiency)).encode()
        )
        return h.hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and self.fingerprint() == other.fingerprint()

    __hash__ = None  # mutable arrays inside


def oksuz2019(
    n_pulses: int = 1750,
    tr_ms: float = 4.3,
    te_ms: float = 2.0,
    lobe_length: int = 250,
    lobe_peaks_deg: tuple[float, ...] = (60.0, 35.0, 70.0, 45.0, 25.0, 55.0, 40.0),
    min_flip_deg: float = 5.0,
    ti_ms: float = 20.0,
    inversion_efficiency: float = 1.0,
) -> Sequence:
    """The default train: the paper's length and TR with repeating half-sine flip-angle lobes.

    Pulse ``n`` lies in lobe ``j = n // lobe_length`` at phase ``u = (n % lobe_length + 0.5) /
    lobe_length``; its flip angle is ``min_flip + (peak_j - min_flip) * sin(pi * u)``, so every lobe
    rises smoothly from ``min_flip`` to its peak and back, and the peaks cycle through
    ``lobe_peaks_deg`` (7 lobes of 250 pulses for the default 1750 pulses, 5-70 degrees). Varying
    peak heights give T1/T2 sensitivity; the repetition gives the recurrent models the repeated
    pattern the paper relies on. An adiabatic inversion (efficiency 1) precedes the train by TI.

    References:
        Oksuz et al., Magnetic resonance fingerprinting using recurrent neural networks, ISBI 2019
        (1750 time points, TR 4.3 ms); Jiang et al., MRM 2015 (sinusoidal lobes, FISP readout).
    """
    if n_pulses < 1 or lobe_length < 1:
        raise ValueError("n_pulses and lobe_length must be positive")
    peaks = np.asarray(lobe_peaks_deg, dtype=np.float64)
    if peaks.size == 0 or np.any(peaks < min_flip_deg):
        raise ValueError("lobe_peaks_deg must be non-empty and not below min_flip_deg")
    n = np.arange(n_pulses)
    lobe = (n // lobe_length) % peaks.size
    u = (n % lobe_length + 0.5) / lobe_length
    fa = min_flip_deg + (peaks[lobe] - min_flip_deg) * np.sin(np.pi * u)
    return Sequence(
        fa, 0.0, tr_ms, te_ms, inversion=True, ti_ms=ti_ms,
        inversion_efficiency=inversion_efficiency, name="oksuz2019",
    )


def jiang2015(ti_ms: float = 18.0, inversion_efficiency: float = 1.0) -> Sequence:
    """The FISP-MRF schedule of Jiang et al. 2015: 1000 pulses, 5 sinusoidal lobes, varying TR.

    Values (degrees, ms) come from the MIT-licensed OpenMRF pattern files, identical to
    imr-framework's ``method_orig.mat``; see ``schedules/README.md``. TE 1.908 ms, TI 18 ms.

    References:
        Jiang et al., MR fingerprinting using fast imaging with steady state precession (FISP)
        with spiral readout, MRM 2015;74:1621 (doi:10.1002/mrm.25559).
    """
    seq = from_file(SCHEDULE_DIR / "jiang2015_fisp_schedule.csv", te_ms=1.908, ti_ms=ti_ms,
                    inversion=True, inversion_efficiency=inversion_efficiency)
    seq.name = "jiang2015"
    return seq


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
        ValueError: ragged, non-numeric, undecodable or ambiguous data, or a duplicated column.
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
            header = [h.strip() for h in first]
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
        if arr.ndim == 1:
            return {"flip_angle_deg": arr.astype(np.float64)}, labels
        if arr.ndim == 2 and arr.shape[1] <= 4:
            return ({n: arr[:, i].astype(np.float64) for i, n in
                     enumerate(_COLUMNS[: arr.shape[1]])}, labels)
        raise ValueError(f"{path}: expected shape (T,) or (T, <=4) columns "
                         f"{_COLUMNS}, got {arr.shape}")
    if suffix == ".mat":
        from mrflight.fileio import load_mat

        data = load_mat(path)
        out = {}
        lower = {k.lower(): k for k in data}
        for col, names in _ALIASES.items():
            for n in names:
                if n in lower:
                    out[col] = np.asarray(data[lower[n]], dtype=np.float64).ravel()
                    break
        if "flip_angle_deg" not in out:
            raise ValueError(f"{path}: no flip-angle variable found; expected one of "
                             f"{_ALIASES['flip_angle_deg']} (any case), found {sorted(data)}")
        return out, [f"element {i + 1}" for i in range(len(out["flip_angle_deg"]))]
    raise ValueError(f"unsupported schedule file type {suffix!r} for {path}; "
                     "use .csv, .txt, .npy or .mat")


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
    te_ms; header optional), ``.npy`` (``(T,)`` flip angles or ``(T, <=4)`` columns) or ``.mat``
    (variables ``FA``/``flip_angle_deg``, ``PH``, ``TR``, ``TE``; v7 or v7.3).

    Args:
        path: the file (UTF-8 or ASCII; a byte-order mark is ignored). Angles in degrees,
            times in ms. Column names are case-insensitive (``FA``, ``PH``, ``TR``, ``TE`` are
            understood); a file without a header has 1 column (flip angles) or 4 (in the order
            above). Every entry of a column must be finite: an empty cell is an error (a column
            left entirely empty counts as absent: phase 0, TR from ``tr_ms``, TE from ``te_ms``).
        tr_ms: TR used when the file has no TR column (required then).
        te_ms: TE (one value: mrflight simulates one echo time); default the file's TE column,
            which must then be constant, else 2 ms.

    Raises:
        ValueError: a missing, undecodable, ragged or non-numeric file, a headerless file with
            2 or 3 columns, a duplicated column, empty/NaN/infinite entries (the row is named),
            a varying TE column, or no flip-angle column (the columns found are listed).
        inversion, ti_ms, inversion_efficiency: the inversion preparation (not in the file).
        name: label; default the file stem.
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
