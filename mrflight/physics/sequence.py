"""MRF acquisition schedules: flip-angle, RF-phase and TR trains.

A :class:`Sequence` is a plain container of per-pulse arrays (degrees and milliseconds) plus the
inversion preparation. Builders construct the trains this project ships:

* :func:`oksuz2019` -- the default train: 1750 pulses at TR 4.3 ms (Oksuz et al. 2019) with flip
  angles in repeating half-sine lobes between 5 and 70 degrees, after an adiabatic inversion.
* :func:`jiang2015` -- the published FISP-MRF schedule of Jiang et al. 2015 (1000 pulses,
  sinusoidal lobes, TR 11.67-14.33 ms), shipped as a CSV file in ``schedules/``.

Trains in user files (``.csv``, ``.txt``, ``.npy``, ``.mat``) are read by
:func:`mrflight.sequence_files.from_file`. Only numpy is imported here.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from importlib import resources
from pathlib import Path

import numpy as np

from .checks import count

__all__ = ["Sequence", "oksuz2019", "jiang2015", "SCHEDULE_DIR"]

SCHEDULE_DIR = Path(str(resources.files("mrflight.physics") / "schedules"))


def _as_train(name: str, value, n: int | None) -> np.ndarray:
    arr = np.array(value, dtype=np.float64)  # a copy: the caller's array may change later
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
        if not np.any(self.flip_angle_deg):
            raise ValueError("flip_angle_deg is zero for every pulse: such a train excites no "
                             "signal (flip angles are in degrees)")
        self.phase_deg = _as_train("phase_deg", phase_deg, n)
        self.tr_ms = _as_train("tr_ms", tr_ms, n)
        if np.any(self.tr_ms <= 0):
            raise ValueError("tr_ms must be positive for every pulse")
        self.te_ms = float(te_ms)
        if not math.isfinite(self.te_ms) or self.te_ms < 0:
            raise ValueError(f"te_ms must be a finite non-negative number, got {te_ms}")
        if np.any(self.te_ms > self.tr_ms):
            seconds = self.tr_ms.max() < _SECONDS_MS  # the warning below would not be reached
            raise ValueError(
                f"te_ms={self.te_ms} is longer than the shortest TR {self.tr_ms.min()}"
                + (" (TR in seconds? TR and TE are in ms)" if seconds else ""))
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
        _warn_unit_slips(self)

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


#: below these, a train's values look like radians (flip, phase) or seconds (TR, TI), not the
#: degrees and ms a Sequence takes: no MRF train has every flip within 3.2 degrees, every RF
#: phase within 6.3 degrees, a TR under 0.5 ms, or an inversion delay under 0.5 ms (0 is the
#: idealised limit, not a slip)
_RADIAN_FLIP_DEG = 3.2
_RADIAN_PHASE_DEG = 6.3
_SECONDS_MS = 0.5


def _warn_unit_slips(seq: Sequence) -> None:
    """Warn (``UserWarning``) where a train's numbers look like radians or seconds: the
    simulator would silently run a train with flips 57x too small or TRs 1000x too short."""
    slips = []
    fa = float(np.abs(seq.flip_angle_deg).max())
    if fa <= _RADIAN_FLIP_DEG:
        slips.append(f"every flip angle is within {fa:.4g} degrees (radians? "
                     "np.rad2deg converts them)")
    ph = float(np.abs(seq.phase_deg).max())
    if 0 < ph <= _RADIAN_PHASE_DEG:
        slips.append(f"every RF phase is within {ph:.4g} degrees (radians? np.rad2deg "
                     "converts them)")
    tr = float(seq.tr_ms.max())
    if tr < _SECONDS_MS:
        slips.append(f"the longest TR is {tr:.4g} ms (seconds? TR and TE are in ms)")
    if seq.inversion and 0 < seq.ti_ms < _SECONDS_MS:
        slips.append(f"TI is {seq.ti_ms:.4g} ms (seconds? TI is in ms)")
    if slips:
        warnings.warn(f"sequence {seq.name!r}: {'; '.join(slips)}. Flip angles and phases are "
                      "in degrees, times in ms", UserWarning, stacklevel=3)


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
    n_pulses, lobe_length = count(n_pulses, "n_pulses"), count(lobe_length, "lobe_length")
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
    # columns flip_angle_deg, phase_deg, tr_ms, te_ms (constant 1.908) after one header line
    fa, phase, tr, _ = np.loadtxt(SCHEDULE_DIR / "jiang2015_fisp_schedule.csv", delimiter=",",
                                  skiprows=1, unpack=True)
    return Sequence(fa, phase, tr, 1.908, inversion=True, ti_ms=ti_ms,
                    inversion_efficiency=inversion_efficiency, name="jiang2015")
