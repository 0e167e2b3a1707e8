"""The noise model used everywhere in mrflight (training, evaluation, Cramér–Rao bound).

The complex fingerprint is L2-normalised, then complex Gaussian noise with standard deviation
``noise_std`` on each of the real and imaginary parts is added. The Fisher information of this
model is ``Re(J^H J) / noise_std^2`` with ``J`` the Jacobian of the normalised fingerprint (see
:mod:`mrflight.physics.crb`).
"""

from __future__ import annotations

import torch

__all__ = ["normalize", "add_noise"]


def _scaled_normalize(signals: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`normalize` of rows whose plain norm under- or overflows: divide by the peak first."""
    peak = signals.abs().amax(dim=-1, keepdim=True)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    scaled = signals / peak
    norm = torch.linalg.vector_norm(scaled, dim=-1, keepdim=True)
    return scaled / (norm + eps / peak) if eps else scaled / norm


def normalize(signals: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """L2-normalise fingerprints along the last (time) axis, at any scale.

    The norm is computed directly where that is exact; fingerprints whose squared norm would
    underflow (``x * 1e-30`` in float32) or overflow (``x * 1e30``) are first divided by their
    largest magnitude. The result is the same for ``x`` and ``c * x`` at every ``c > 0`` the
    dtype can hold.

    Args:
        signals: ``(..., T)`` real or complex.
        eps: added to the norm of ``signals``; with ``eps=0`` an all-zero fingerprint gives NaN
            (undefined).

    Returns:
        Same shape and dtype, each fingerprint of unit L2 norm (``signals / (||signals|| +
        eps)``).
    """
    if signals.is_complex():
        # on the (re, im) pairs: torch's complex norm and complex-by-real division are ~20x
        # slower on the CPU than the same arithmetic on the real view
        pairs = torch.view_as_real(signals.resolve_conj())
        norm = torch.linalg.vector_norm(pairs, dim=(-2, -1))[..., None]
    else:
        norm = torch.linalg.vector_norm(signals, dim=-1, keepdim=True)
    if signals.shape[-1] == 0:
        return signals / (norm + eps)
    info = torch.finfo(norm.dtype)
    # below this norm the squares of the largest entries could be subnormal (lost precision);
    # an infinite norm overflowed; NaN stays NaN either way
    ok = (norm >= info.tiny ** 0.5 / info.eps) & (norm < float("inf"))
    # the rows redone below get a harmless denominator here (no 0/0 in their gradient)
    denom = torch.where(ok, norm, torch.ones_like(norm)) + eps
    if signals.is_complex():
        out = torch.view_as_complex(pairs / denom[..., None])
    else:
        out = signals / denom
    bad = ~ok.squeeze(-1)
    if bool(bad.any()):
        out = out.index_put((bad,), _scaled_normalize(signals[bad], eps))
    return out


def add_noise(signals: torch.Tensor, noise_std: float, generator: torch.Generator | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
    """Normalise complex fingerprints and add complex Gaussian noise.

    Args:
        signals: ``(N, T)`` complex (a real input is treated as complex with zero imaginary part).
        noise_std: standard deviation of the real and of the imaginary part of the noise, relative
            to the unit-norm fingerprint. Must be >= 0.
        generator: torch random generator for reproducible draws.
        noise: optional pre-drawn standard complex noise of the same shape (real and imaginary
            parts N(0, 1)); it is scaled by ``noise_std``.

    Returns:
        ``(N, T)`` complex noisy fingerprints.
    """
    if not 0 <= noise_std < float("inf"):
        raise ValueError(f"noise_std must be a finite non-negative number, got {noise_std}")
    x = normalize(signals if signals.is_complex() else signals.to(torch.complex64))
    if noise_std == 0:
        return x
    if noise is None:
        real = x.real
        nr = torch.randn(real.shape, generator=generator, dtype=real.dtype, device=real.device)
        ni = torch.randn(real.shape, generator=generator, dtype=real.dtype, device=real.device)
        noise = torch.complex(nr, ni)
    elif tuple(noise.shape) != tuple(x.shape):
        raise ValueError(f"noise must have the shape of the signals {tuple(x.shape)}, got "
                         f"{tuple(noise.shape)}")
    return x + noise_std * noise
