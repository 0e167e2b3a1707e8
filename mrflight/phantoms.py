"""Numerical phantoms for evaluation: a 2-D brain of ellipses and a NIST-like sphere phantom.

Both return a :class:`Phantom` with T1, T2 (ms) and M0 maps, a label map and a mask. Tissue
values come from the package's ``resources/`` (see ``resources/README.md`` for sources and
licences):

* brain: the centre of mrpro's BrainWeb 3 T ranges (``brainweb_tissues_3T_mrpro_ranges.csv``);
* spheres: the 3 T MnCl2 "T2 array" (or NiCl2 "T1 array") reference values of the ISMRM/NIST
  system phantom (``nist_phantom_t1_t2_reference.csv``; Stupic et al., MRM 2021).

Values are kept as published, also where they leave the paper's training grid (T1 <= 4000 ms,
T2 <= 500 ms): CSF at 3 T has T2 = 1650 ms and NIST MnCl2 sphere 1 has T2 = 581 ms, so every
method trained or matched on that grid is extrapolating there. :attr:`Phantom.outside_range`
flags those voxels.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

__all__ = ["Phantom", "brain_phantom", "nist_phantom", "tissue_values", "nist_values",
           "RESOURCE_DIR"]

RESOURCE_DIR = Path(str(resources.files("mrflight") / "resources"))

#: parameter range of the paper's dictionary grid, ms
TRAINING_RANGE = {"t1_ms": (0.0, 4000.0), "t2_ms": (0.0, 500.0)}


@dataclass
class Phantom:
    """A 2-D numerical phantom.

    Attributes:
        name: ``"brain"`` or ``"nist"``.
        t1_ms, t2_ms: ``(H, W)`` float64 maps, ms (0 outside the mask).
        m0: ``(H, W)`` proton density (arbitrary units, 0 outside the mask).
        labels: ``(H, W)`` int map, 0 = background, ``k`` = ``regions[k - 1]``.
        regions: names of the labelled regions (tissues or spheres).
        mask: ``(H, W)`` bool, True inside the object.
        units: units of the maps.
    """

    name: str
    t1_ms: np.ndarray
    t2_ms: np.ndarray
    m0: np.ndarray
    labels: np.ndarray
    regions: list[str]
    units: dict = field(default_factory=lambda: {"t1_ms": "ms", "t2_ms": "ms", "m0": "a.u."})

    @property
    def mask(self) -> np.ndarray:
        return self.labels > 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.labels.shape

    @property
    def params(self) -> np.ndarray:
        """``(K, 2)`` T1, T2 (ms) of the ``K`` masked voxels, in row-major order."""
        return np.stack([self.t1_ms[self.mask], self.t2_ms[self.mask]], 1)

    @property
    def outside_range(self) -> np.ndarray:
        """``(H, W)`` bool: masked voxels whose T1 or T2 lies outside the paper's training grid."""
        t1_hi, t2_hi = TRAINING_RANGE["t1_ms"][1], TRAINING_RANGE["t2_ms"][1]
        return self.mask & ((self.t1_ms > t1_hi) | (self.t2_ms > t2_hi))

    def to_image(self, values) -> np.ndarray:
        """Scatter per-voxel values ``(K,)`` or ``(K, C)`` back into ``(H, W)``/``(H, W, C)``
        images, NaN outside the mask."""
        v = np.asarray(values, dtype=np.float64)
        k = int(self.mask.sum())
        if v.shape[0] != k:
            raise ValueError(f"values must have one row per masked voxel ({k}), got {v.shape}")
        out = np.full(self.shape + v.shape[1:], np.nan)
        out[self.mask] = v
        return out


def _read_csv(name: str) -> list[dict]:
    with open(RESOURCE_DIR / name, newline="") as f:
        return list(csv.DictReader(f))


def tissue_values() -> dict[str, dict[str, float]]:
    """BrainWeb 3 T tissue values: the centre of mrpro's sampling ranges.

    Returns:
        ``{tissue name: {"t1_ms", "t2_ms", "m0"}}`` for the 11 BrainWeb classes.

    References:
        mrpro (PTB-MR), ``mrpro.phantoms.brainweb`` 3 T ranges (Apache-2.0); Collins et al.,
        Design and construction of a realistic digital brain phantom, IEEE TMI 1998 (BrainWeb).
    """
    out = {}
    for r in _read_csv("brainweb_tissues_3T_mrpro_ranges.csv"):
        mid = lambda a, b, r=r: 0.5 * (float(r[a]) + float(r[b]))
        out[r["tissue"]] = {"t1_ms": mid("t1_min_ms", "t1_max_ms"),
                            "t2_ms": mid("t2_min_ms", "t2_max_ms"),
                            "m0": mid("m0_abs_min", "m0_abs_max")}
    return out


def nist_values(field_t: float = 3.0, array: str = "T2") -> np.ndarray:
    """Reference values of the 14 spheres of one ISMRM/NIST system-phantom array.

    Args:
        field_t: 1.5 or 3.0 (tesla).
        array: ``"T2"`` (MnCl2, the default) or ``"T1"`` (NiCl2).

    Returns:
        ``(14, 2)`` T1, T2 in ms, sphere 1 (longest relaxation) first.

    References:
        Stupic et al., A standard system phantom for magnetic resonance imaging, MRM 2021;86:1194
        (doi:10.1002/mrm.28779), values as tabulated in OpenMRF (MIT).
    """
    if array not in ("T1", "T2"):
        raise ValueError(f"array must be 'T1' (NiCl2) or 'T2' (MnCl2), got {array!r}")
    rows = [r for r in _read_csv("nist_phantom_t1_t2_reference.csv")
            if abs(float(r["field_T"]) - field_t) < 1e-6 and r["array"] == f"{array} array"]
    if not rows:
        raise ValueError(f"field_t must be 1.5 or 3.0 (tesla), got {field_t}")
    rows.sort(key=lambda r: int(r["sphere"]))
    return np.array([[float(r["t1_ms"]), float(r["t2_ms"])] for r in rows])


def _ellipse(yy, xx, cy, cx, ry, rx, angle_deg=0.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    y, x = yy - cy, xx - cx
    u = x * np.cos(a) + y * np.sin(a)
    v = -x * np.sin(a) + y * np.cos(a)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1.0


def brain_phantom(size: int = 128) -> Phantom:
    """A 2-D brain of ellipses: scalp fat, CSF, cortical grey matter, white matter, ventricles
    and deep grey nuclei, with BrainWeb 3 T tissue values (centres of mrpro's ranges):

    ============  ========  ========  ====
    tissue        T1 (ms)   T2 (ms)   M0
    ============  ========  ========  ====
    white matter  1150      80        0.70
    grey matter   1600      100       0.85
    CSF           3000      1650      0.95
    fat           400       80        0.95
    ============  ========  ========  ====

    CSF T2 (1650 ms) lies above the paper's training range (T2 <= 500 ms).

    Args:
        size: image side in pixels (``size x size``), >= 16.

    Returns:
        :class:`Phantom` with regions ``["white matter", "grey matter", "CSF", "fat"]``.
    """
    if int(size) != size or size < 16:
        raise ValueError(f"size must be an integer >= 16, got {size!r}")
    n = int(size)
    yy, xx = np.mgrid[0:n, 0:n] / n * 2 - 1 + 1.0 / n  # pixel centres in [-1, 1]
    regions = ["white matter", "grey matter", "CSF", "fat"]
    lab = np.zeros((n, n), dtype=np.int64)
    wm, gm, csf, fat = 1, 2, 3, 4
    lab[_ellipse(yy, xx, 0, 0, 0.92, 0.72)] = fat  # scalp / subcutaneous fat
    lab[_ellipse(yy, xx, 0, 0, 0.85, 0.65)] = csf  # subarachnoid CSF
    lab[_ellipse(yy, xx, 0.0, 0, 0.80, 0.60)] = gm  # cortex
    lab[_ellipse(yy, xx, 0.02, 0, 0.68, 0.48)] = wm
    lab[_ellipse(yy, xx, -0.05, -0.14, 0.30, 0.07, -15)] = csf  # lateral ventricles
    lab[_ellipse(yy, xx, -0.05, 0.14, 0.30, 0.07, 15)] = csf
    lab[_ellipse(yy, xx, 0.18, -0.25, 0.12, 0.08)] = gm  # deep grey nuclei
    lab[_ellipse(yy, xx, 0.18, 0.25, 0.12, 0.08)] = gm
    lab[_ellipse(yy, xx, 0.45, 0, 0.05, 0.05)] = csf  # fourth ventricle
    vals = tissue_values()
    source = {"white matter": "white matter", "grey matter": "gray matter", "CSF": "CSF",
              "fat": "fat"}
    t1, t2, m0 = (np.zeros((n, n)) for _ in range(3))
    for k, name in enumerate(regions, start=1):
        v = vals[source[name]]
        sel = lab == k
        t1[sel], t2[sel], m0[sel] = v["t1_ms"], v["t2_ms"], v["m0"]
    return Phantom("brain", t1, t2, m0, lab, regions)


def nist_phantom(size: int = 128, field_t: float = 3.0, array: str = "T2") -> Phantom:
    """A NIST-like phantom: 14 uniform spheres (disks), 10 on a ring and 4 in its centre, in an
    empty (masked-out) housing.

    Default: the 3 T MnCl2 "T2 array" (T1 91-2480 ms, T2 5.6-581 ms). Sphere 1 (T2 = 581 ms)
    lies above the paper's training range (T2 <= 500 ms). Spheres are numbered clockwise from
    the top, sphere 1 first, with M0 = 1.

    Args:
        size: image side in pixels, >= 32.
        field_t: 1.5 or 3.0 (tesla).
        array: ``"T2"`` (MnCl2) or ``"T1"`` (NiCl2).

    Returns:
        :class:`Phantom` with regions ``["sphere 1", ..., "sphere 14"]``.

    References:
        Stupic et al., MRM 2021;86:1194 (doi:10.1002/mrm.28779).
    """
    if int(size) != size or size < 32:
        raise ValueError(f"size must be an integer >= 32, got {size}")
    n = int(size)
    vals = nist_values(field_t, array)
    yy, xx = np.mgrid[0:n, 0:n] / n * 2 - 1 + 1.0 / n
    lab = np.zeros((n, n), dtype=np.int64)
    ring, radius = 0.62, 0.12
    # 10 spheres on the outer ring, 4 in the centre (as in the system phantom's plates)
    centres = [(-ring * np.cos(a), ring * np.sin(a))
               for a in np.linspace(0, 2 * np.pi, 10, endpoint=False)]
    centres += [(-0.2, -0.2), (-0.2, 0.2), (0.2, 0.2), (0.2, -0.2)]
    t1, t2, m0 = (np.zeros((n, n)) for _ in range(3))
    for k, (cy, cx) in enumerate(centres, start=1):
        sel = _ellipse(yy, xx, cy, cx, radius, radius)
        lab[sel] = k
        t1[sel], t2[sel], m0[sel] = vals[k - 1, 0], vals[k - 1, 1], 1.0
    return Phantom("nist", t1, t2, m0, lab, [f"sphere {k}" for k in range(1, 15)])
