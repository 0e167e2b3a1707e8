"""Cramér–Rao lower bound on the T1 and T2 precision of an MRF train.

Signal model (the noise model of DESIGN.md section 3): the measured fingerprint is
``y = rho * x(T1, T2) / ||x(T1, T2)|| + n`` with ``x`` the simulated complex fingerprint, ``rho``
an unknown real scale (proton density M0, true value 1, a nuisance parameter) and ``n`` complex
Gaussian noise of standard deviation ``noise_std`` on the real and on the imaginary part of every
sample. For this model the Fisher information of ``theta = (rho, T1, T2)`` is

    F = (1 / sigma^2) Re(J^H J),   J = d s / d theta   (T x 3),

(the real and imaginary parts are 2T independent real Gaussians of variance sigma^2; the often
quoted ``2 / sigma^2`` belongs to a total complex variance ``E|n|^2 = sigma^2``, i.e. sigma^2 / 2
per part, which is not the convention of :func:`mrflight.physics.add_noise`; the Monte-Carlo test
in ``tests/test_crb.py`` confirms the factor)

and the bound on the standard deviation of any unbiased estimator of T1 and T2 is
``sqrt(diag(F^-1))`` at the T1 and T2 entries. Because the model is normalised,
``Re(u^H du/dT) = 0`` and the real scale costs no precision; it is kept for completeness (and it
matters for the magnitude variant).

The Jacobian comes from the simulator itself (:func:`mrflight.physics.epg.simulate_jacobian`):
on the CPU for 0/180-degree trains a fused kernel propagates tangent states through the EPG
recursion; elsewhere torch forward-mode autograd runs through the general path (the atoms are
independent, so one JVP with tangent ones in T1 gives ``d s_i / d T1_i`` for every atom at once).
The two agree to float64 precision (tests/test_crb.py). The normalisation is differentiated
analytically. Memory is bounded by the chunk size.

References:
    Zhao et al., Optimal experiment design for magnetic resonance fingerprinting: Cramér-Rao
    bound meets spin dynamics, IEEE TMI 2019;38:844 (doi:10.1109/TMI.2018.2873704).
    Assländer et al., Optimized quantification of spin relaxation times in the hybrid state,
    MRM 2019;82:1385 (doi:10.1002/mrm.27819).
"""

from __future__ import annotations

import math

import torch

from .epg import _prepare, simulate_jacobian
from .sequence import Sequence

__all__ = ["crb", "fisher_information"]


def fisher_information(seq: Sequence, t1_ms, t2_ms, b1=None, magnitude: bool = False, *,
                       tol: float = 1e-4, chunk_size: int = 512, device=None) -> torch.Tensor:
    """Fisher information per atom for ``theta = (rho, T1, T2)`` at unit noise (sigma = 1).

    Args:
        seq: the pulse train.
        t1_ms, t2_ms: T1 and T2, ms; scalars or shape ``(N,)``.
        b1: flip-angle scale, scalar or ``(N,)`` (known, not estimated); default 1.
        magnitude: bound for estimators that see only the magnitude fingerprint ``|y|``, in the
            high-SNR approximation (Rician noise ~ Gaussian of std sigma); default complex data.
        tol: EPG truncation tolerance used for the simulation (tighter than the default, since
            derivatives are taken); see :func:`mrflight.physics.simulate`.
        chunk_size: atoms per forward-AD pass (memory ~ ``chunk_size * T * 64`` bytes).
        device: where to compute; default that of a tensor argument, else CPU.

    Returns:
        float64 tensor ``(N, 3, 3)`` in units of (1, ms^-1, ms^-1) pairs; divide by sigma^2.
    """
    t1, t2, b, device = _prepare(seq, t1_ms, t2_ms, b1, device, torch.float64)
    t1, t2, b = (x.detach() for x in (t1, t2, b))
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    out = []
    n = t1.numel()
    for s in range(0, n, chunk_size):
        x, dx = simulate_jacobian(seq, t1[s: s + chunk_size], t2[s: s + chunk_size],
                                  b[s: s + chunk_size], tol=tol, device=device)
        if magnitude:  # d|x| = Re(conj(x) dx) / |x|
            ax = x.abs()
            dx = (x.conj()[..., None] * dx).real / ax.clamp_min(1e-300)[..., None]
            x = ax
        # u = x / ||x||, du = dx / ||x|| - u Re(u^H dx) / ||x||
        nrm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        u = x / nrm
        proj = (u.conj()[..., None] * dx).sum(1, keepdim=True).real
        du = (dx - u[..., None] * proj) / nrm[..., None]
        jac = torch.cat([u[..., None], du], dim=-1)  # (m, T, 3): d/d(rho, T1, T2)
        if not magnitude:
            jac = torch.cat([jac.real, jac.imag], dim=1)  # Re(J^H J) = [Re; Im]^T [Re; Im]
        out.append(jac.transpose(1, 2) @ jac)
    return torch.cat(out, 0)


def crb(seq: Sequence, t1_ms, t2_ms, noise_std: float, b1=None, magnitude: bool = False, *,
        tol: float = 1e-4, chunk_size: int = 512, device=None) -> torch.Tensor:
    """Cramér–Rao lower bound on the standard deviation of T1 and T2 (ms).

    The fingerprint is L2-normalised and corrupted by complex Gaussian noise of standard
    deviation ``noise_std`` on the real and imaginary parts (the noise model of
    :func:`mrflight.physics.add_noise`), with an unknown real scale (M0) as nuisance parameter.
    B1 is treated as known.

    Args:
        seq: the pulse train.
        t1_ms: T1, ms; scalar or ``(N,)``.
        t2_ms: T2, ms; scalar or ``(N,)``.
        noise_std: noise standard deviation relative to the unit-norm fingerprint (>= 0).
        b1: flip-angle scale factor, scalar or ``(N,)``; default 1.
        magnitude: bound for magnitude-only data ``|y|`` (high-SNR Gaussian approximation of the
            Rician noise, Fisher information ``J^T J / sigma^2``); default complex data.
        tol: EPG truncation tolerance for the simulation behind the Jacobian.
        chunk_size: atoms per forward-AD pass.
        device: where to compute.

    Returns:
        float64 tensor ``(N, 2)``: the bounds on std(T1) and std(T2), ms, on ``device``.
        ``inf`` where the Fisher information is singular or undefined (e.g. T2 = 0: the signal
        does not depend on T2, or is identically zero when TE > 0). Proportional to
        ``noise_std``.

    Raises:
        ValueError: bad ``noise_std`` or bad parameters (see :func:`simulate`).

    References:
        Zhao et al., Optimal experiment design for MRF: Cramér-Rao bound meets spin dynamics,
        IEEE TMI 2019; Assländer et al., MRM 2019.
    """
    try:
        sigma = float(noise_std)
    except (TypeError, ValueError):
        raise ValueError(f"noise_std must be a number, got {noise_std!r}") from None
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"noise_std must be a finite non-negative number, got {noise_std}")
    fim = fisher_information(seq, t1_ms, t2_ms, b1, magnitude, tol=tol, chunk_size=chunk_size,
                             device=device)
    finite = torch.isfinite(fim).all(dim=-1).all(dim=-1)  # all-zero fingerprint (T2 = 0, TE > 0)
    fim = torch.where(finite[:, None, None], fim, torch.eye(3, dtype=fim.dtype, device=fim.device))
    # scale columns to unit diagonal before inverting (T1 and T2 sensitivities differ widely)
    d = torch.sqrt(torch.diagonal(fim, dim1=-2, dim2=-1))
    ok = (d > 0).all(dim=-1)
    ds = torch.where(d > 0, d, torch.ones_like(d))
    scaled = fim / (ds[:, :, None] * ds[:, None, :])
    inv, info = torch.linalg.inv_ex(scaled)
    var = torch.diagonal(inv, dim1=-2, dim2=-1)[:, 1:] / ds[:, 1:] ** 2
    cond_bad = torch.linalg.cond(scaled) > 1e14
    bad = ~finite | ~ok | (info != 0) | cond_bad | ~(var > 0).all(dim=-1)
    bound = sigma * torch.sqrt(var.clamp_min(0))
    return torch.where(bad[:, None], torch.full_like(bound, math.inf), bound)
