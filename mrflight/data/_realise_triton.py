"""Fused Triton kernel of :func:`mrflight.data.simulated.realise`: normalisation, global phase,
noise and preprocessing of a launch of fresh training fingerprints in one pass.

The torch version of the same arithmetic is a chain of full-size element-wise kernels
(normalise, rotate, add the noise, normalise again, the phase alignment's sums and rotation, the
sign, the split into real and imaginary channels): 8.7 ms for a launch of 32 768 fingerprints of
1750 pulses on an H100, against 1.8 ms for this kernel and the noise draws on another H100
(``benchmarks/gpu_check.py``'s simulation-share row, the launch less its simulation). Here
one program owns one output row: it reads the clean fingerprint and the two noise draws once,
reduces its norms and phase sums in registers and writes the model input once. The noise itself
still comes from ``torch.randn`` with the batch's generator, in the same order as the torch
version, so both give the same inputs up to float32 rounding.

Per row ``r`` (fingerprint ``r // K`` for ``K`` noise realisations), with ``x`` the clean
fingerprint, ``phi`` its phase and ``s`` the noise level:

* ``z = x exp(i phi) / ||x|| + s (n_r + i n_i)``;
* magnitude input: ``|z| / ||z||``;
* complex input (:func:`mrflight.transforms.align_phase`): ``y = z exp(-i theta / 2) / ||z||``
  with ``theta`` the angle of ``sum_t z_t^2`` in ``(-pi, pi]``, taken from the principal square
  root of that sum (no ``atan2``), then ``y`` negated when ``sum_t Re(y_t) |Re(y_t)| < 0``;
  written as the ``(2, T)`` real and imaginary channels.

Requires ``triton``; under ``TRITON_INTERPRET=1`` (set before this module is imported) it runs on
CPU tensors through Triton's interpreter (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["realise_fused"]


@triton.jit
def _realise_kernel(clean, nr, ni, phase, sigma, out, T, K,
                    COMPLEX: tl.constexpr, PHASE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    src = row // K
    t = tl.arange(0, BLOCK)
    m = t < T
    re = tl.load(clean + src * 2 * T + 2 * t, mask=m, other=0.0)
    im = tl.load(clean + src * 2 * T + 2 * t + 1, mask=m, other=0.0)
    inv = 1.0 / tl.sqrt(tl.sum(re * re + im * im, axis=0))
    if PHASE:
        phi = tl.load(phase + src)
        a = tl.cos(phi) * inv
        b = tl.sin(phi) * inv
    else:
        a = inv
        b = 0.0
    s = tl.load(sigma + row)
    zr = re * a - im * b + s * tl.load(nr + row * T + t, mask=m, other=0.0)
    zi = re * b + im * a + s * tl.load(ni + row * T + t, mask=m, other=0.0)
    inv_z = 1.0 / tl.sqrt(tl.sum(zr * zr + zi * zi, axis=0))
    if COMPLEX:
        sr = tl.sum(zr * zr - zi * zi, axis=0)
        si = tl.sum(2.0 * zr * zi, axis=0)
        r = tl.sqrt(sr * sr + si * si)
        # principal square root u + i v of sr + i si (the larger of |u|, |v| first: stable)
        big = tl.sqrt((r + tl.abs(sr)) * 0.5)
        big = tl.where(big > 0, big, 1.0)  # s = 0: no phase to remove (torch.angle(0) = 0)
        u = tl.where(sr >= 0, big, tl.abs(si) / (2.0 * big))
        v = tl.where(sr >= 0, si / (2.0 * big), tl.where(si >= 0, big, -big))
        norm_w = tl.sqrt(u * u + v * v)
        cr = u / norm_w * inv_z  # exp(-i theta / 2) / ||z||
        ci = -v / norm_w * inv_z
        yr = zr * cr - zi * ci
        yi = zr * ci + zi * cr
        flip = tl.sum(yr * tl.abs(yr), axis=0) < 0
        sign = tl.where(flip, -1.0, 1.0)
        tl.store(out + row * 2 * T + t, yr * sign, mask=m)
        tl.store(out + row * 2 * T + T + t, yi * sign, mask=m)
    else:
        tl.store(out + row * T + t, tl.sqrt(zr * zr + zi * zi) * inv_z, mask=m)


def realise_fused(clean: torch.Tensor, noise_std: torch.Tensor, nr: torch.Tensor,
                  ni: torch.Tensor, phi: torch.Tensor | None, input_mode: str,
                  realizations: int) -> torch.Tensor:
    """The model inputs of :func:`~mrflight.data.simulated.realise` from its random draws.

    Args:
        clean: ``(B, T)`` complex fingerprints (any scale, non-zero).
        noise_std: ``(B,)`` noise std per fingerprint.
        nr, ni: ``(B * K, T)`` float32 standard normal draws (real, imaginary parts).
        phi: ``(B,)`` global phases, or ``None`` for none.
        input_mode: ``"magnitude"`` or ``"complex"``.
        realizations: ``K``, rows ``b*K .. b*K+K-1`` belong to fingerprint ``b``.

    Returns:
        ``(B * K, T)`` (magnitude) or ``(B * K, 2, T)`` (complex) float32.
    """
    b, t = clean.shape
    rows = b * realizations
    x = torch.view_as_real(clean.to(torch.complex64).resolve_conj().contiguous())
    shape = (rows, 2, t) if input_mode == "complex" else (rows, t)
    out = torch.empty(shape, dtype=torch.float32, device=clean.device)
    if rows == 0 or t == 0:
        return out
    sigma = noise_std.to(clean.device, torch.float32).repeat_interleave(realizations)
    block = triton.next_power_of_2(t)
    _realise_kernel[(rows,)](x, nr.contiguous(), ni.contiguous(),
                             x if phi is None else phi.to(torch.float32).contiguous(),
                             sigma.contiguous(), out, t, realizations,
                             COMPLEX=input_mode == "complex", PHASE=phi is not None,
                             BLOCK=block, num_warps=4 if block <= 2048 else 8,
                             enable_fp_fusion=True)
    return out
