"""The noise model used everywhere in mrflight (training, evaluation, Cramér–Rao bound).

The complex fingerprint is L2-normalised, then complex Gaussian noise with standard deviation
``noise_std`` on each of the real and imaginary parts is added. The Fisher information of this
model is ``Re(J^H J) / noise_std^2`` with ``J`` the Jacobian of the normalised fingerprint (see
:mod:`mrflight.physics.crb`).
"""

from __future__ import annotations

import torch

__all__ = ["normalize", "unit_rows", "row_norms", "add_noise", "to_complex"]


def row_norms(signals: torch.Tensor) -> torch.Tensor:
    """L2 norms of fingerprints along the last axis, ``(..., T) -> (...)``, in the real dtype.

    Complex input is read as its (re, im) pairs: torch's complex norm is ~20x slower on the CPU
    than the same arithmetic on the real view. No rescaling: see :func:`unit_rows` for any scale.
    """
    if signals.is_complex():
        return torch.linalg.vector_norm(torch.view_as_real(signals.resolve_conj()), dim=(-2, -1))
    return torch.linalg.vector_norm(signals, dim=-1)


def _divide(signals: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """``signals / denom`` for a real ``denom`` ``(..., 1)``; complex input on its real view
    (complex-by-real division is several times slower on the CPU)."""
    if signals.is_complex():
        return torch.view_as_complex(torch.view_as_real(signals.resolve_conj()) / denom[..., None])
    return signals / denom


def unit_rows(signals: torch.Tensor, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`normalize`, with the norms: ``(signals / (||signals|| + eps), ||signals||)``.

    The norm is computed directly where that is exact; fingerprints whose squared norm would
    underflow (``x * 1e-30`` in float32) or overflow (``x * 1e30``) are first divided by their
    largest magnitude, and their norm is that division's times the magnitude, in float64.

    Args:
        signals: ``(..., T)`` real or complex.
        eps: added to the norm in the division; with ``eps=0`` an all-zero fingerprint gives NaN.

    Returns:
        The unit fingerprints (shape and dtype of ``signals``) and their norms ``(...)``, float64
        (a norm above the dtype's largest value is kept).
    """
    norm = row_norms(signals)[..., None]
    if signals.shape[-1] == 0:
        return signals / (norm + eps), norm[..., 0].to(torch.float64)
    info = torch.finfo(norm.dtype)
    # below this norm the squares of the largest entries could be subnormal (lost precision);
    # an infinite norm overflowed; NaN stays NaN either way
    ok = (norm >= info.tiny ** 0.5 / info.eps) & (norm < float("inf"))
    # the rows redone below get a harmless denominator here (no 0/0 in their gradient)
    out = _divide(signals, torch.where(ok, norm, torch.ones_like(norm)) + eps)
    norm = norm[..., 0].to(torch.float64)
    bad = ~ok[..., 0]
    if bool(bad.any()):
        x = signals[bad]
        peak = x.abs().amax(dim=-1, keepdim=True)
        peak = torch.where(peak > 0, peak, torch.ones_like(peak))
        scaled = _divide(x, peak)
        n = row_norms(scaled)[..., None]
        out = out.index_put((bad,), _divide(scaled, n + eps / peak if eps else n))
        norm = norm.index_put((bad,), (n * peak)[..., 0].to(torch.float64))
    return out, norm


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
    return unit_rows(signals, eps)[0]


def to_complex(signals: torch.Tensor) -> torch.Tensor:
    """``signals`` as complex with zero imaginary part if real: complex128 for float64 (its
    precision and range kept), complex64 otherwise; complex input unchanged."""
    if signals.is_complex():
        return signals
    return signals.to(torch.complex128 if signals.dtype == torch.float64 else torch.complex64)


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
    x = normalize(to_complex(signals))
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
