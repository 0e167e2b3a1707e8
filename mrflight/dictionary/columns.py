"""Parameter columns, identified by name: T1 and T2 in ms first, then B1 (a ratio), then any
other.

A file whose columns are ``("T2", "T1")`` is reordered to T1, T2 when it is loaded, so every
consumer (matching, maps, training on a file) can take ``params[:, :2]`` as T1, T2 in ms; times
in s and B1 in % are converted by their units (:func:`param_kind`).
"""

from __future__ import annotations

import re

import numpy as np

_TIME_UNITS = {"": 1.0, "unknown": 1.0, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3,
               "seconds": 1e3}
#: units of a B1 column: a ratio (1: the nominal flip angle) or percent (converted to a ratio)
_B1_UNITS = {"": 1.0, "unknown": 1.0, "1": 1.0, "ratio": 1.0, "fraction": 1.0, "a.u.": 1.0,
             "%": 0.01, "pct": 0.01, "percent": 0.01}
#: canonical (name, unit) of each kind of column
_CANONICAL = {"t1": ("t1_ms", "ms"), "t2": ("t2_ms", "ms"), "b1": ("b1", "1")}


def param_kind(name: str, unit: str) -> tuple[str | None, float]:
    """``("t1" | "t2" | "b1" | None, factor to ms or to a ratio)`` of a named column.

    Case-insensitive; ``T1``, ``t1_ms``, ``T1 (ms)``, ``t1_s`` (seconds), ``B1``, ``b1+``,
    ``B1 (%)`` ... A unit in the name and the unit given must agree (``t1_s`` with unit ``"ms"``
    is refused, not guessed); an empty or ``"unknown"`` unit takes the name's unit, else ms for
    T1/T2 and a ratio for B1. B1 units: ``"1"`` (or ``"ratio"``, ``"fraction"``, ``"a.u."``) or
    ``"%"`` (``"pct"``, ``"percent"``; divided by 100).

    Raises:
        ValueError: a unit that is not a time (T1, T2) or a ratio or percent (B1), or that
            disagrees with the unit in the name.
    """
    n = re.sub(r"[\s\[\]()\-]+", "_", str(name).strip().lower()).strip("_")
    m = re.fullmatch(r"(t1|t2)(?:_?(ms|msec|s|sec))?", n)
    if m:
        return m.group(1), _unit_factor(name, unit, m.group(2), _TIME_UNITS,
                                        "T1 and T2 must be in ms (or s, converted to ms)")
    m = re.fullmatch(r"b1(?:\+|_?(?:rel|ratio|scale|factor|map))?(?:_?(%|pct|percent))?", n)
    if m:
        return "b1", _unit_factor(name, unit, m.group(1), _B1_UNITS,
                                  "B1 must be a ratio (unit '1') or in % (converted to a ratio)")
    return None, 1.0


def _unit_factor(name: str, unit: str, named: str | None, factors: dict[str, float],
                 allowed: str) -> float:
    """The factor of ``unit`` (one of ``factors``), or of the unit ``named`` in the name."""
    u = str(unit).strip().lower()
    if u not in factors:
        raise ValueError(f"parameter {name!r} has unit {unit!r}: {allowed}; fix its entry in "
                         "units")
    if named is None:
        return factors[u]
    if u not in ("", "unknown") and factors[u] != factors[named]:
        raise ValueError(f"parameter {name!r} has unit {unit!r} but its name says {named!r}: "
                         "make param_names and units agree (e.g. the name without its unit "
                         "and the unit the values are in)")
    return factors[named]


def default_names(p: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and units of ``p`` unnamed columns: T1 ms, T2 ms, then B1, then ``param_4``..."""
    names = ("t1_ms", "t2_ms", "b1", *(f"param_{i + 1}" for i in range(3, p)))[:p]
    units = ("ms", "ms", "1", *("unknown",) * max(0, p - 3))[:p]
    return names, units


def names_and_units(names, units, p: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names and units a file gives for its ``p`` columns, defaults filled in.

    No names: :func:`default_names` (without the unit in the name when units are given, so
    that units ``("s", "s")`` alone convert seconds). No units: ``"unknown"`` for every name,
    so that each column's unit follows its name (``t1_s`` in s, ``T1`` in ms, ``B1`` a ratio, in
    any column order); a count of names other than ``p`` is reported by the
    :class:`~mrflight.dictionary.Dictionary`.
    """
    if names:
        names = tuple(names)
    else:  # units without names (a lut in s with dict.units = 's,s'): the names carry none
        names = tuple(n[:-3] if n.endswith("_ms") else n for n in default_names(p)[0]) \
            if units else default_names(p)[0]
    if units:
        return names, tuple(units)
    # not the default units by position: those gave B1 first 'ms' and t1_s 'ms' (refused)
    return names, ("unknown",) * len(names)


def split_names(v) -> tuple[str, ...]:
    """Names or units stored as one comma-separated string or as an array of strings."""
    if v is None:
        return ()
    if isinstance(v, str):
        return tuple(x.strip() for x in v.split(",")) if v else ()
    return tuple(str(x) for x in np.asarray(v).ravel())


def _column_order(names, kinds) -> list[int]:
    """Column indices in the order T1, T2[, B1][, others in their order]."""
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
    return order + [i for i in range(len(names)) if i not in order]


def canonical_columns(names, units, params: np.ndarray):
    """Reorder the columns to T1 (ms), T2 (ms)[, B1][, others in their order], by name.

    Returns:
        ``(names, units, params)`` with canonical names ``t1_ms``, ``t2_ms``, ``b1``, times
        converted to ms and B1 to a ratio (see :func:`param_kind`).

    Raises:
        ValueError: no (or several) T1 or T2 column, a T1/T2 unit that is not a time, a B1 unit
            that is not a ratio or percent, or a unit that disagrees with the column's name.
    """
    kinds = [param_kind(n, u) for n, u in zip(names, units)]
    order = _column_order(names, kinds)
    out_names, out_units, cols = [], [], []
    for i in order:
        k, factor = kinds[i]
        n, u = _CANONICAL[k] if k else (str(names[i]), str(units[i]))
        out_names.append(n)
        out_units.append(u)
        cols.append(_scaled(params[:, i], factor))
    if order == list(range(len(names))) and all(f == 1.0 for _, f in kinds):
        out_params = params
    else:
        out_params = np.ascontiguousarray(np.stack(cols, axis=1))
    return tuple(out_names), tuple(out_units), out_params


def _scaled(col: np.ndarray, factor: float) -> np.ndarray:
    """``col`` times ``factor``; a factor below 1 divides by its inverse (``57 / 100`` is 0.57,
    ``57 * 0.01`` is not)."""
    if factor == 1.0:
        return col
    return col * factor if factor > 1.0 else col / round(1.0 / factor)
