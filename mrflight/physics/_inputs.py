"""Validated simulator inputs: the parameters as tensors, and the train as cached arrays."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from ._device import check_device
from .checks import count
from .sequence import Sequence


def _param(name: str, value, device, dtype) -> torch.Tensor:
    """Validate one parameter (in float64, before any cast) and return it as a 1-D tensor."""
    if value is None:
        what = {"t1_ms": "T1 in ms", "t2_ms": "T2 in ms"}.get(name, "a value")
        raise ValueError(f"{name} is None: pass {what}")
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(f"{name} must be real, got a complex tensor")
        check = value.detach().to("cpu", torch.float64)
    else:
        if isinstance(value, complex) or np.iscomplexobj(value):
            raise ValueError(f"{name} must be real, got complex values")
        try:
            check = torch.as_tensor(np.asarray(value, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be numeric: {e}") from None
    if check.ndim > 1:
        raise ValueError(f"{name} must be a scalar or 1-D, got shape {tuple(check.shape)}")
    if check.numel() == 0:
        raise ValueError(f"{name} is empty: pass at least one value")
    lo, hi = (float(v) for v in torch.aminmax(check))  # one pass; NaN propagates
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or Inf values")
    if lo < 0:
        raise ValueError(f"{name} must be non-negative (ms for T1/T2, a factor for B1)")
    if hi > torch.finfo(dtype).max:
        raise ValueError(f"{name} has values too large for {dtype}; use dtype=torch.float64")
    if isinstance(value, torch.Tensor):
        t = value.to(device=device if device is not None else value.device, dtype=dtype)
    else:
        t = check.to(device=device, dtype=dtype)
    return t.reshape(-1)


def _prepare(seq, t1_ms, t2_ms, b1, device, dtype):
    """Validate the train, dtype, device and parameters: ``(t1, t2, b1, device)``, the three
    parameters broadcast to one length ``(N,)`` on ``device`` in ``dtype``."""
    if not isinstance(seq, Sequence):
        raise ValueError(f"seq must be a mrflight.physics.Sequence, got {type(seq).__name__}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if device is None:
        for v in (t1_ms, t2_ms, b1):
            if isinstance(v, torch.Tensor):
                device = v.device
                break
    device = check_device(device) if device is not None else torch.device("cpu")
    t1 = _param("t1_ms", t1_ms, device, dtype)
    t2 = _param("t2_ms", t2_ms, device, dtype)
    b = _param("b1", 1.0 if b1 is None else b1, device, dtype)
    n = max(t1.numel(), t2.numel(), b.numel())
    bad = [name for name, t in (("t1_ms", t1), ("t2_ms", t2), ("b1", b))
           if t.numel() not in (1, n)]
    if bad:
        sizes = ", ".join(f"{nm}: {t.numel()}" for nm, t in
                          (("t1_ms", t1), ("t2_ms", t2), ("b1", b)))
        raise ValueError(
            f"{' and '.join(bad)} do(es) not match the other parameters' length {n} "
            f"({sizes} values): pass equal lengths or scalars"
        )
    return t1.expand(n), t2.expand(n), b.expand(n), device


def _check_tol(tol, name: str = "tol") -> None:
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.floating)) or not 0 < tol < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {tol!r}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is not None:
        count(chunk_size, "chunk_size", hint=" (atoms per chunk) or None")


class _SeqArrays(NamedTuple):
    raw: tuple  # copies of (flip_angle_deg, phase_deg, tr_ms) this entry was made from
    scalars: tuple  # (te_ms, inversion, ti_ms, inversion_efficiency)
    fingerprint: str  # Sequence.fingerprint()
    alpha: np.ndarray  # nominal flip angles, rad, float64 (T,)
    sign: np.ndarray  # cos(phase) rounded to +-1 (meaningful for real-phase trains), (T,)
    tr: np.ndarray  # TR, ms, float64 contiguous (T,)
    tr_min: float
    real_phases: bool


def _seq_arrays(seq: Sequence) -> _SeqArrays:
    """What the simulator needs from the train, computed once per train and kept on the object.

    The entry is checked against the train's current arrays on every call (a comparison, cheaper
    than hashing them), so a train changed in place is never simulated with stale values.
    """
    raw = (seq.flip_angle_deg, seq.phase_deg, seq.tr_ms)
    scalars = (seq.te_ms, seq.inversion, seq.ti_ms, seq.inversion_efficiency)
    hit = seq.__dict__.get("_epg_arrays")
    if hit is not None and hit.scalars == scalars and all(
            np.array_equal(a, b) for a, b in zip(hit.raw, raw)):
        return hit
    try:  # a train changed in place is checked again, as its constructor checks it
        with warnings.catch_warnings():
            if hit is None:  # its constructor warned of radians or seconds: not a second time
                warnings.simplefilter("ignore", UserWarning)
            type(seq)(*raw, seq.te_ms, seq.inversion, seq.ti_ms, seq.inversion_efficiency)
    except ValueError as e:
        raise ValueError(f"the sequence {seq.name!r} (changed since it was made): {e}") from None
    hit = _SeqArrays(
        tuple(np.array(a, copy=True) for a in raw), scalars, seq.fingerprint(),
        np.ascontiguousarray(np.deg2rad(seq.flip_angle_deg)),
        np.ascontiguousarray(np.cos(np.deg2rad(seq.phase_deg)).round()),
        np.ascontiguousarray(seq.tr_ms, dtype=np.float64), float(seq.tr_ms.min()),
        seq.real_phases)
    seq.__dict__["_epg_arrays"] = hit
    return hit
