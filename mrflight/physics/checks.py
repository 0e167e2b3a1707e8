"""Checks of plain numeric arguments, shared by the physics, the data, the models and the configs
(here because :mod:`mrflight.physics` is the layer everything else imports, and imports nothing
of the rest).

A number is a real Python or NumPy number that is finite and not a bool (``True`` is not the
count 1, and a string such as ``"64"`` is not a number: configs give typed values). A count is a
whole number, given as an int or as a whole float (``1e5`` from a command line), returned as an
``int``; ``2.5`` is refused, never truncated.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["is_number", "count", "all_finite"]


def is_number(value, whole: bool = False) -> bool:
    """``value`` is a finite real number, not a bool (and a whole one when ``whole``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    x = float(value)
    return math.isfinite(x) and (not whole or x.is_integer())


def count(value, name: str, low: int = 1, hint: str = "") -> int:
    """``value`` as an ``int`` if it is a whole number ``>= low``.

    Args:
        value: the argument.
        name: its name in the message (``"chunk_size"``, ``"data.batch_size"``).
        low: the smallest value allowed.
        hint: words after "must be a positive integer" (``" (atoms per block) or None"``).

    Raises:
        ValueError: ``"{name} must be a positive integer{hint}, got {value!r}"``.
    """
    if not is_number(value, whole=True) or value < low:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"{name} must be {what}{hint}, got {value!r}")
    return int(value)


def all_finite(x) -> bool:
    """Every value of the tensor ``x`` (complex: both parts) is finite.

    By its minimum and maximum on the real view (NaN propagates, so both are finite iff every
    value is): ``torch.isfinite(x).all()`` costs ~15x more on the CPU (it goes through ``abs()``
    for complex input).
    """
    if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
        return True
    import torch

    lo, hi = torch.aminmax(torch.view_as_real(x.resolve_conj()) if x.is_complex() else x)
    return math.isfinite(float(lo)) and math.isfinite(float(hi))
