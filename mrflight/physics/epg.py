"""Extended Phase Graph (EPG) simulation of FISP-MRF fingerprints.

The FISP readout has an unbalanced (dephasing) gradient in every TR, so the magnetisation is a
sum of configuration states: transverse ``F+_k``, ``F-_k`` and longitudinal ``Z_k`` (Weigel, JMRI
2015). Each TR applies, in this order: the RF pulse (flip ``b1 * alpha_n``, phase ``phi_n``); the
readout at TE (signal ``F+_0 * exp(-TE/T2)``); relaxation over TR (``F *= E2``, ``Z *= E1``,
``Z_0 += 1 - E1``); the gradient (``F+_k -> F+_{k+1}``, ``F-_k -> F-_{k-1}``). An inversion with
efficiency ``eta`` followed by the delay TI sets ``Z_0 = 1 - (1 + eta) exp(-TI/T1)`` before the
first pulse. Magnetisation is in units of M0 = 1 and the signal convention makes a 90-degree
phase-0 pulse on ``Mz = +1`` give the real, positive signal ``+1``.

Two implementations share this model (:mod:`mrflight.physics._paths` picks one per batch):

* a fast path (no autograd, RF phases multiples of 180 degrees): the states are real (``F+ =
  -i p``, ``F- = i q``, ``Z`` real), the gradient shift is a moving view into a buffer instead of a
  copy, atoms are processed in cache-sized chunks sorted by their state count, and the whole
  per-pulse update is a handful of fused in-place ops (also as fused C and Triton kernels);
* a general path (any RF phase, differentiable in T1, T2 and B1, forward- and reverse-mode
  autograd): out-of-place complex arithmetic.

The number of states each atom keeps is set by an accuracy bound and verified for every train
and parameter range (:mod:`mrflight.physics.truncation`).

References:
    Weigel, Extended phase graphs: dephasing, RF pulses, and echoes - pure and simple, JMRI 2015.
    Jiang et al., MR fingerprinting using FISP, MRM 2015.
"""

from __future__ import annotations

import numpy as np
import torch

from ._inputs import _check_chunk_size, _check_tol, _prepare, _seq_arrays, _SeqArrays
from ._paths import run_batch
from .sequence import Sequence
from .truncation import DEFAULT_TOL, _rate_for, states_needed, truncation_rate

__all__ = ["simulate", "EPG_VERSION", "DEFAULT_TOL", "states_needed", "truncation_rate"]

#: bumped whenever the simulated signal changes (part of every dictionary cache key)
EPG_VERSION = "2"


def simulate(
    seq: Sequence,
    t1_ms,
    t2_ms,
    b1=None,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
    tol: float = DEFAULT_TOL,
    max_states: int | None = None,
    chunk_size: int | None = None,
    progress=None,
    bounds: dict | None = None,
    _rate: float | None = None,
) -> torch.Tensor:
    """Simulate FISP-MRF fingerprints with the EPG formalism.

    Args:
        seq: the pulse train.
        t1_ms: T1, ms; scalar or shape ``(N,)``. 0 means instant recovery.
        t2_ms: T2, ms; scalar or ``(N,)``. 0 means instant transverse decay.
        b1: flip-angle scale factor (1 = nominal); scalar or ``(N,)``; default 1.
        dtype: real working precision, ``torch.float32`` (default) or ``torch.float64``.
        device: where to compute; default the device of a tensor argument, else CPU.
        tol: allowed relative L2 error of the normalised magnitude fingerprint from truncating
            the state count (see :mod:`mrflight.physics.truncation`); default 1e-3.
        max_states: hard cap on the state count (``None``: set by ``tol`` alone).
        chunk_size: atoms per chunk, a positive integer (``None``: chosen from the state count
            to fit the cache on CPU, 65536 atoms on CUDA). Memory is bounded by the chunk, not
            by N.
        progress: optional callable ``progress(n_done_atoms)`` called after every chunk.
        bounds: the parameter range the atoms are drawn from, e.g. ``dict(t1_max=4000.0,
            t2_max=500.0, b1_range=(0.7, 1.3))`` (ms, ms, ratio; any key may be left out). The
            state truncation is verified once for this range (:func:`truncation_rate`, cached),
            so that every batch drawn from the prior uses the same truncation and none probes
            again; atoms outside the bounds widen the verified range. Without ``bounds`` the
            range is that of the atoms (widened to :func:`.truncation.verified_range`).

    Returns:
        Complex fingerprints, shape ``(N, T)``, dtype complex64 (complex128 for float64), in units
        of M0, on ``device``. Differentiable with respect to tensor inputs that require grad.

    Raises:
        ValueError: negative, non-finite, empty, missing or mismatched parameters (naming the
            argument); a bad ``tol``, ``chunk_size``, ``max_states`` or ``bounds``.
    """
    t1, t2, b, device = _prepare(seq, t1_ms, t2_ms, b1, device, dtype)
    _check_tol(tol)
    _check_chunk_size(chunk_size)
    arrays = _seq_arrays(seq)
    if _rate is None:
        _rate = _rate_for(seq, tol, t1.detach(), t2.detach(), b.detach(), bounds, arrays)
    k_atom = _state_counts(t2, arrays, len(seq), tol, _rate, max_states)
    return run_batch(seq, t1, t2, b, k_atom, arrays, dtype=dtype, device=device,
                     chunk_size=chunk_size, progress=progress)


def _state_counts(t2: torch.Tensor, arrays: _SeqArrays, n_pulses: int, tol: float, rate: float,
                  max_states: int | None) -> np.ndarray:
    """States kept per atom: :func:`states_needed` at ``rate``, capped at ``max_states``."""
    k_atom = states_needed(t2.detach().cpu().numpy(), arrays.tr_min, n_pulses, tol, rate)
    if max_states is not None:
        if max_states < 1:
            raise ValueError(f"max_states must be >= 1, got {max_states}")
        k_atom = np.minimum(k_atom, max_states)
    return k_atom
