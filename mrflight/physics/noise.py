"""The noise model used everywhere in mrflight (training, evaluation, Cramér–Rao bound).

The complex fingerprint is L2-normalised, then complex Gaussian noise with standard deviation
``noise_std`` on each of the real and imaginary parts is added. The Fisher information of this
model is ``Re(J^H J) / noise_std^2`` with ``J`` the Jacobian of the normalised fingerprint (see
:mod:`mrflight.physics.crb`).
"""

from __future__ import annotations

import torch

__all__ = ["normalize", "add_noise"]


def normalize(signals: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """L2-normalise fingerprints along the last (time) axis.

    Args:
        signals: ``(..., T)`` real or complex.
        eps: added to the norm; with ``eps=0`` an all-zero fingerprint gives NaN (undefined).

    Returns:
        Same shape and dtype, each fingerprint of unit L2 norm.
    """
    norm = torch.linalg.vector_norm(signals, dim=-1, keepdim=True)
    return signals / (norm + eps)


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
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be a non-negative number, got {noise_std}")
    x = normalize(signals if signals.is_complex() else signals.to(torch.complex64))
    if noise_std == 0:
        return x
    if noise is None:
        real = x.real
        nr = torch.randn(real.shape, generator=generator, dtype=real.dtype, device=real.device)
        ni = torch.randn(real.shape, generator=generator, dtype=real.dtype, device=real.device)
        noise = torch.complex(nr, ni)
    return x + noise_std * noise
