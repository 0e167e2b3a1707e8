"""Dispatch to the fused Triton GPU kernel (:mod:`mrflight.physics._triton`), imported lazily:
``None`` (the caller falls back to the pure-torch path) when Triton is missing or failed."""

from __future__ import annotations

import importlib
import os
import warnings

import torch


def triton_disabled() -> bool:
    """Whether ``MRFLIGHT_NO_TRITON`` (any value but empty or ``0``) asks for the non-Triton
    paths (the pure-torch EPG, ``nn.GRU``)."""
    return os.environ.get("MRFLIGHT_NO_TRITON", "") not in ("", "0")


def guarded_kernel(call, what: str, fallback: str):
    """``call()``, or ``None`` when it fails with anything but a ``ValueError`` (bad input) or
    a CUDA out-of-memory error, e.g. Triton's ``CompilationError`` on an unsupported GPU: then
    a warning names ``what`` failed and the ``fallback`` that serves instead (the caller
    disables its kernel for the rest of the process)."""
    try:
        return call()
    except (ValueError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - any kernel failure leaves a working fallback
        warnings.warn(f"mrflight: {what} failed ({type(e).__name__}: {e}); {fallback}",
                      RuntimeWarning, stacklevel=4)
        return None


class LazyKernel:
    """A Triton kernel module (or one of its attributes) imported at its first use.

    :meth:`get` returns it, or ``None`` (the caller's fallback serves) when
    ``MRFLIGHT_NO_TRITON`` asks for the non-Triton paths, when Triton is missing or has no usable
    backend, or after :meth:`disable` (a kernel that failed at run time stays off for the rest of
    the process). ``value``: ``False`` before the first import, then the kernel or ``None``.
    """

    def __init__(self, module: str, attr: str | None = None):
        self.module, self.attr = module, attr
        self.value = False

    def get(self):
        if triton_disabled():
            return None
        if self.value is False:
            try:
                mod = importlib.import_module(self.module)
                self.value = getattr(mod, self.attr) if self.attr else mod
            except Exception:  # no triton, or no usable backend: the fallback serves
                self.value = None
        return self.value

    def disable(self) -> None:
        self.value = None


_TRITON = LazyKernel("mrflight.physics._triton")


def _gpu_kernel():
    """The fused GPU kernel module (:mod:`mrflight.physics._triton`), or ``None`` when Triton is
    not installed, failed before, or ``MRFLIGHT_NO_TRITON=1`` asks for the pure-torch path."""
    return _TRITON.get()


def _run_gpu_kernel(seq, t1, t2, b1, k_atom, wrt, lanes, chunk_size=None, progress=None):
    """Fingerprints (and derivatives) from the fused GPU kernel, or ``None`` to fall back.

    ``lanes`` reproduces the CPU kernels' truncation (their SIMD groups share the largest state
    count: 16 atoms in float32, 8 in float64 and for derivatives), so both give the same signal
    up to rounding. A kernel that fails to compile or launch (an unsupported GPU) warns once and
    leaves this process on the pure-torch path.
    """
    gk = _gpu_kernel()
    if gk is None:
        return None
    with torch.no_grad():
        out = guarded_kernel(lambda: gk.run(seq, t1, t2, b1, k_atom, wrt=wrt, lanes=lanes,
                                            chunk_size=chunk_size, progress=progress),
                             "the fused GPU EPG kernel", "using the slower pure-torch path")
    if out is None:
        _TRITON.disable()
    return out
