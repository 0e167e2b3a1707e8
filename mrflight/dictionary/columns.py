"""Parameter columns, identified by name: T1 and T2 in ms first, then B1, then any other.

A file whose columns are ``("T2", "T1")`` is reordered to T1, T2 when it is loaded, so every
consumer (matching, maps, training on a file) can take ``params[:, :2]`` as T1, T2 in ms.
"""

from __future__ import annotations

import re

import numpy as np

_TIME_UNITS = {"": 1.0, "unknown": 1.0, "ms": 1.0, "msec": 1.0, "s": 1e3, "sec": 1e3,
               "seconds": 1e3}
#: canonical (name, unit) of each kind of column
_CANONICAL = {"t1": ("t1_ms", "ms"), "t2": ("t2_ms", "ms"), "b1": ("b1", "1")}


def param_kind(name: str, unit: str) -> tuple[str | None, float]:
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


def default_names(p: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Names and units of ``p`` unnamed columns: T1 ms, T2 ms, then B1, then ``param_4``..."""
    names = ("t1_ms", "t2_ms", "b1", *(f"param_{i + 1}" for i in range(3, p)))[:p]
    units = ("ms", "ms", "1", *("unknown",) * max(0, p - 3))[:p]
    return names, units


def names_and_units(names, units, p: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names and units a file gives for its ``p`` columns, defaults filled in.

    No names: :func:`default_names`. No units: the default ones when the names count ``p``
    columns, else empty units (the :class:`~mrflight.dictionary.Dictionary` then reports the
    mismatch).
    """
    names = tuple(names) if names else default_names(p)[0]
    if units:
        return names, tuple(units)
    return names, default_names(p)[1] if len(names) == p else ("",) * len(names)


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
        ``(names, units, params)`` with canonical names ``t1_ms``, ``t2_ms``, ``b1`` and times
        converted to ms.

    Raises:
        ValueError: no (or several) T1 or T2 column, or a T1/T2 unit that is not a time.
    """
    kinds = [param_kind(n, u) for n, u in zip(names, units)]
    order = _column_order(names, kinds)
    out_names, out_units, cols = [], [], []
    for i in order:
        k, factor = kinds[i]
        n, u = _CANONICAL[k] if k else (str(names[i]), str(units[i]))
        out_names.append(n)
        out_units.append(u)
        cols.append(params[:, i] * factor if factor != 1.0 else params[:, i])
    if order == list(range(len(names))) and all(f == 1.0 for _, f in kinds):
        out_params = params
    else:
        out_params = np.ascontiguousarray(np.stack(cols, axis=1))
    return tuple(out_names), tuple(out_units), out_params
