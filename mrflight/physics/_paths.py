"""Which EPG implementation simulates a batch, chunk by chunk, once the state counts are known.

Trains with RF phases of 0/180 degrees and no autograd take the real path: the Triton kernel on
CUDA, the C kernel on the CPU, else the in-place torch loop (atoms sorted by state count, chunks
sized to the cache). Anything else takes the general complex path (differentiable).
"""

from __future__ import annotations

import numpy as np
import torch

from . import _ckernel
from ._ckernel_glue import _epg_real_kernel
from ._inputs import _SeqArrays
from ._torch_epg import _epg_general, _epg_real_fast
from ._triton_glue import _run_gpu_kernel
from .sequence import Sequence

#: target working-set size of one fast-path chunk (three state arrays), bytes
_CHUNK_BYTES = 768 * 1024
#: atoms per call of the fused C kernel (progress is reported between calls)
_KERNEL_CHUNK = 8192


def run_batch(seq: Sequence, t1: torch.Tensor, t2: torch.Tensor, b: torch.Tensor,
              k_atom: np.ndarray, arrays: _SeqArrays, *, dtype: torch.dtype,
              device: torch.device, chunk_size: int | None = None, progress=None
              ) -> torch.Tensor:
    """Complex ``(N, T)`` fingerprints of validated ``(N,)`` parameters with ``k_atom`` states
    per atom (see :func:`mrflight.physics.simulate` for ``chunk_size`` and ``progress``)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (t1, t2, b))
    if not arrays.real_phases or needs_grad or _has_forward_grad(t1, t2, b):
        return _run_general(seq, t1, t2, b, k_atom, device, chunk_size, progress)
    if device.type == "cuda":
        out = _run_gpu_kernel(seq, t1, t2, b, k_atom, (), 16 if dtype == torch.float32 else 8,
                              chunk_size, progress)
        if out is not None:
            return out[0]
    use_kernel = device.type == "cpu" and _ckernel.kernel() is not None
    if use_kernel and t1.numel() <= (chunk_size or _KERNEL_CHUNK):
        # a batch that fits one chunk: one kernel call, no scatter into a second buffer
        with torch.no_grad():
            signal = _epg_real_kernel(seq, t1, t2, b, k_atom, arrays, complex_out=True)
        if progress is not None:
            progress(t1.numel())
        return signal
    return _run_real_chunks(seq, t1, t2, b, k_atom, dtype, device, use_kernel, chunk_size,
                            progress)


def _has_forward_grad(*ts) -> bool:
    import torch.autograd.forward_ad as fwAD

    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


def _run_general(seq, t1, t2, b, k_atom, device, chunk_size, progress) -> torch.Tensor:
    """The general path in input order, chunks of ``chunk_size`` (default 4096) atoms."""
    n_atoms = t1.numel()
    out = []
    step = chunk_size or 4096
    for s in range(0, n_atoms, step):
        idx = np.arange(s, min(s + step, n_atoms))
        sel = torch.as_tensor(idx, device=device)
        out.append(_epg_general(seq, t1[sel], t2[sel], b[sel], int(k_atom[idx].max())))
        if progress is not None:
            progress(min(s + step, n_atoms))
    return torch.cat(out, 0)


def _run_real_chunks(seq, t1, t2, b, k_atom, dtype, device, use_kernel, chunk_size,
                     progress) -> torch.Tensor:
    """The real path over chunks of atoms sorted by state count, scattered back in place."""
    n_atoms = t1.numel()
    order = np.argsort(k_atom, kind="stable")
    signal = torch.empty(n_atoms, len(seq), dtype=dtype, device=device)
    s = 0
    while s < n_atoms:
        step = _real_chunk(int(k_atom[order[min(n_atoms - 1, s)]]), device, use_kernel,
                           chunk_size)
        idx = order[s: s + step]
        k = k_atom[idx]
        sel = torch.as_tensor(idx, device=device)
        with torch.no_grad():
            if use_kernel:
                signal[sel] = _epg_real_kernel(seq, t1[sel], t2[sel], b[sel], k)
            else:
                signal[sel] = _epg_real_fast(seq, t1[sel], t2[sel], b[sel], int(k.max()))
        s += len(idx)
        if progress is not None:
            progress(s)
    return signal.to(torch.complex64 if dtype == torch.float32 else torch.complex128)


def _real_chunk(k_here: int, device: torch.device, use_kernel: bool,
                chunk_size: int | None) -> int:
    """Atoms in the next real-path chunk, whose smallest state count is ``k_here``."""
    if chunk_size is not None:
        return chunk_size
    if device.type == "cuda":
        return 65536
    if use_kernel:
        return _KERNEL_CHUNK
    return max(16, _CHUNK_BYTES // (3 * 4 * max(k_here, 8)))
