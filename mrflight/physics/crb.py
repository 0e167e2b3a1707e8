"""Cramér–Rao lower bound on the T1, T2 (and B1) precision of an MRF train.

Signal and noise model (the one used everywhere in mrflight, see
:func:`mrflight.physics.add_noise`): the complex fingerprint is L2-normalised, then complex
Gaussian noise of standard deviation ``noise_std`` is added to each of its real and imaginary
parts. The measured fingerprint is therefore

    y = c * x(T1, T2, B1) / ||x(T1, T2, B1)|| + n,

with ``x`` the simulated complex fingerprint and ``c`` an unknown scale (proton density M0, true
value 1), a nuisance parameter: real by default, or complex (``phase_nuisance=True``: two real
nuisances ``Re c`` and ``Im c``, i.e. an unknown amplitude and an arbitrary global phase). For the
parameters ``theta = (Re c, [Im c], T1, T2, [B1])`` the Fisher information is

    F = (1 / sigma^2) Re(J^H J),   J = d y / d theta   (T x P),

(the real and imaginary parts are 2T independent real Gaussians of variance sigma^2; the often
quoted ``2 / sigma^2`` belongs to a total complex variance ``E|n|^2 = sigma^2``, i.e. sigma^2 / 2
per part, which is not this convention; the Monte-Carlo tests in ``tests/test_crb.py`` confirm the
factor), and the bound on the standard deviation of any unbiased estimator of T1, T2 (and B1)
is ``sqrt(diag(F^-1))`` at their entries. B1 is either known (default) or estimated too
(``estimate_b1=True``). Because the model is normalised, ``Re(u^H du/dtheta) = 0`` and a real
scale costs no precision (it matters for the magnitude variant); a global phase costs precision
where ``Im(u^H du/dtheta) != 0`` (trains with RF phases other than 0/180 degrees).

The Jacobian comes from the simulator itself (:func:`mrflight.physics.jacobian.simulate_jacobian`):
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

from ._inputs import _prepare
from .checks import count
from .jacobian import simulate_jacobian
from .sequence import Sequence

__all__ = ["crb", "fisher_information"]


def _names(magnitude: bool, estimate_b1: bool, phase_nuisance: bool) -> tuple[tuple, tuple]:
    """(nuisance names, parameter names) in the order of the Fisher information's axes."""
    nuisance = ("rho",) + (("rho_im",) if phase_nuisance and not magnitude else ())
    return nuisance, ("t1", "t2") + (("b1",) if estimate_b1 else ())


def _fisher_from_gram(g: torch.Tensor, n_nuisance: int) -> torch.Tensor:
    """Fisher information of the normalised model from the Gram matrix of ``[x, dx]``.

    With ``G = [x, dx]^H [x, dx]`` (``(m, 1+P, 1+P)``), ``u = x / ||x||`` and ``du = dx / ||x|| -
    u Re(u^H dx) / ||x||``: ``Re(du_i^H du_j) = (Re G_ij - Re G_0i Re G_0j / G_00) / G_00``,
    ``Re(u^H du_j) = 0``, ``u^H u = 1`` and, for the imaginary part of the scale (column
    ``i u``), ``Re((i u)^H du_j) = Im G_0j / G_00``. No ``(m, T, P)`` temporaries are formed.
    """
    gr = g.real
    g00 = gr[:, 0, 0]
    p = g.shape[-1] - 1
    block = (gr[:, 1:, 1:] - gr[:, 0, 1:, None] * gr[:, 0, None, 1:] / g00[:, None, None]) \
        / g00[:, None, None]
    fim = torch.zeros(g.shape[0], n_nuisance + p, n_nuisance + p, dtype=gr.dtype,
                      device=gr.device)
    fim[:, n_nuisance:, n_nuisance:] = block
    for k in range(n_nuisance):
        fim[:, k, k] = g00 / g00  # 1 (NaN for an all-zero fingerprint, like the block)
    if n_nuisance == 2:  # the column i u of the complex scale
        cross = g.imag[:, 0, 1:] / g00[:, None] if g.is_complex() else torch.zeros_like(
            gr[:, 0, 1:])
        fim[:, 1, 2:] = cross
        fim[:, 2:, 1] = cross
    return fim


def fisher_information(seq: Sequence, t1_ms, t2_ms, b1=None, magnitude: bool = False, *,
                       estimate_b1: bool = False, phase_nuisance: bool = False,
                       tol: float = 1e-4, chunk_size: int = 512, device=None,
                       bounds: dict | None = None) -> torch.Tensor:
    """Fisher information per atom at unit noise (sigma = 1).

    The parameters are, in this order: the real scale ``rho`` (nuisance), its imaginary part
    ``rho_im`` (nuisance, only with ``phase_nuisance=True`` and complex data), T1, T2 and, with
    ``estimate_b1=True``, B1.

    Args:
        seq: the pulse train.
        t1_ms, t2_ms: T1 and T2, ms; scalars or shape ``(N,)``.
        b1: flip-angle scale (ratio to nominal), scalar or ``(N,)``; default 1.
        magnitude: bound for estimators that see only the magnitude fingerprint ``|y|``, in the
            high-SNR approximation (Rician noise ~ Gaussian of std sigma); default complex data.
        estimate_b1: B1 is unknown and estimated with T1 and T2 (default: known).
        phase_nuisance: the scale is complex (an unknown global phase as well as an amplitude);
            no effect on magnitude data, which do not depend on the phase.
        tol: EPG truncation tolerance used for the simulation (tighter than the default, since
            derivatives are taken); see :func:`mrflight.physics.simulate`.
        chunk_size: atoms per pass (a positive integer; memory ~ ``chunk_size * T * 80`` bytes).
        device: where to compute; default that of a tensor argument, else CPU.
        bounds: the parameter range the atoms come from (fixes the state truncation for a
            prior, see :func:`mrflight.physics.simulate`).

    Returns:
        float64 tensor ``(N, P, P)``, ``P = 3 + phase_nuisance + estimate_b1`` (``phase_nuisance``
        counting only for complex data), in units of the inverse products of (1, [1], ms, ms,
        [1]); divide by sigma^2.
    """
    t1, t2, b, device = _prepare(seq, t1_ms, t2_ms, b1, device, torch.float64)
    t1, t2, b = (x.detach() for x in (t1, t2, b))
    chunk_size = count(chunk_size, "chunk_size")
    nuisance, params = _names(magnitude, estimate_b1, phase_nuisance)
    out = []
    n = t1.numel()
    for s in range(0, n, chunk_size):
        # real float64 from the fused kernel, complex128 from the autograd route
        x, dx = simulate_jacobian(seq, t1[s: s + chunk_size], t2[s: s + chunk_size],
                                  b[s: s + chunk_size], wrt=params, tol=tol, device=device,
                                  bounds=bounds, _real_ok=True)
        if magnitude:  # d|x| = Re(conj(x) dx) / |x|
            if x.is_complex():
                ax = x.abs()
                dx = (x.conj()[..., None] * dx).real / ax.clamp_min(1e-300)[..., None]
                x = ax
            else:
                dx = dx * torch.sign(x)[..., None]
                x = x.abs()
        z = torch.cat([x[..., None], dx], dim=-1)  # (m, T, 1 + P)
        out.append(_fisher_from_gram(z.transpose(1, 2).conj() @ z, len(nuisance)))
    return torch.cat(out, 0)


def crb(seq: Sequence, t1_ms, t2_ms, noise_std: float, b1=None, magnitude: bool = False, *,
        estimate_b1: bool = False, phase_nuisance: bool = False, tol: float = 1e-4,
        chunk_size: int = 512, device=None, bounds: dict | None = None) -> torch.Tensor:
    """Cramér–Rao lower bound on the standard deviation of T1 and T2 (ms), and of B1.

    The fingerprint is L2-normalised and corrupted by complex Gaussian noise of standard
    deviation ``noise_std`` on each of the real and imaginary parts (the noise model of
    :func:`mrflight.physics.add_noise`; Fisher information ``Re(J^H J) / noise_std^2``), with an
    unknown scale (M0) as nuisance parameter: real, or complex with ``phase_nuisance=True``.
    B1 is known unless ``estimate_b1=True``. The bound for "unknown T1, T2, B1 and complex scale"
    is ``crb(..., estimate_b1=True, phase_nuisance=True)``.

    Args:
        seq: the pulse train.
        t1_ms: T1, ms; scalar or ``(N,)``.
        t2_ms: T2, ms; scalar or ``(N,)``.
        noise_std: noise standard deviation relative to the unit-norm fingerprint (>= 0).
        b1: flip-angle scale factor (ratio to nominal), scalar or ``(N,)``; default 1. The true
            value when ``estimate_b1=True``.
        magnitude: bound for magnitude-only data ``|y|`` (high-SNR Gaussian approximation of the
            Rician noise, Fisher information ``J^T J / sigma^2``); default complex data.
        estimate_b1: B1 is an unknown parameter too (the bound on T1 and T2 can only grow).
        phase_nuisance: the scale is complex, i.e. an arbitrary global phase is unknown too (no
            effect on magnitude data).
        tol: EPG truncation tolerance for the simulation behind the Jacobian.
        chunk_size: atoms per pass (a positive integer).
        device: where to compute.
        bounds: the parameter range the atoms come from, e.g. ``dict(t1_max=4000.0,
            t2_max=500.0, b1_range=(0.7, 1.3))``: the state truncation is verified once for it
            (see :func:`mrflight.physics.simulate`), as for per-batch bounds in training.

    Returns:
        float64 tensor ``(N, 2)``: the bounds on std(T1) and std(T2), ms; with
        ``estimate_b1=True`` ``(N, 3)``: T1 (ms), T2 (ms), B1 (ratio to nominal). On ``device``.
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
    fim = fisher_information(seq, t1_ms, t2_ms, b1, magnitude, estimate_b1=estimate_b1,
                             phase_nuisance=phase_nuisance, tol=tol, chunk_size=chunk_size,
                             device=device, bounds=bounds)
    n_nuisance = len(_names(magnitude, estimate_b1, phase_nuisance)[0])
    p = fim.shape[-1]
    finite = torch.isfinite(fim).all(dim=-1).all(dim=-1)  # all-zero fingerprint (T2 = 0, TE > 0)
    fim = torch.where(finite[:, None, None], fim, torch.eye(p, dtype=fim.dtype, device=fim.device))
    # scale columns to unit diagonal before inverting (T1, T2 and B1 sensitivities differ widely)
    d = torch.sqrt(torch.diagonal(fim, dim1=-2, dim2=-1))
    ok = (d > 0).all(dim=-1)
    ds = torch.where(d > 0, d, torch.ones_like(d))
    scaled = fim / (ds[:, :, None] * ds[:, None, :])
    inv, info = torch.linalg.inv_ex(scaled)
    var = torch.diagonal(inv, dim1=-2, dim2=-1)[:, n_nuisance:] / ds[:, n_nuisance:] ** 2
    cond_bad = torch.linalg.cond(scaled) > 1e14
    bad = ~finite | ~ok | (info != 0) | cond_bad | ~(var > 0).all(dim=-1)
    bound = sigma * torch.sqrt(var.clamp_min(0))
    return torch.where(bad[:, None], torch.full_like(bound, math.inf), bound)
