"""The two pure-torch EPG implementations (see :mod:`mrflight.physics.epg` for the model).

* :func:`_epg_real_fast`: RF phases 0/180 degrees, no autograd; real states, in-place updates.
* :func:`_epg_general`: any RF phase; complex, out of place, differentiable (reverse and forward
  mode).
"""

from __future__ import annotations

import numpy as np
import torch

from .sequence import Sequence


def _decay(tau_ms, t_ms):
    """exp(-t / tau) with the limits tau = 0 -> 0 (for t > 0) and t = 0 -> 1; grad-safe."""
    t = torch.as_tensor(t_ms, dtype=tau_ms.dtype, device=tau_ms.device)
    pos = tau_ms > 0
    safe = torch.where(pos, tau_ms, torch.ones_like(tau_ms))
    e = torch.exp(-t / safe)
    zero_tau = torch.where(t > 0, torch.zeros_like(e), torch.ones_like(e))
    return torch.where(pos, e, zero_tau)


def _initial_z(seq: Sequence, t1) -> torch.Tensor:
    """``Z_0`` before the first pulse: ``1 - (1 + eta) exp(-TI/T1)`` after an inversion, else 1."""
    if seq.inversion:
        return 1.0 - (1.0 + seq.inversion_efficiency) * _decay(t1, seq.ti_ms)
    return torch.ones_like(t1)


def _epg_real_fast(seq: Sequence, t1, t2, b1, n_states: int) -> torch.Tensor:
    """Real-arithmetic EPG for phases in {0, 180} deg, no autograd. Returns (n, T) real signal.

    States: ``F+_k = -i p_k``, ``F-_k = i q_k`` (so ``F-_0 = conj(F+_0)`` means ``q_0 = p_0``),
    ``Z_k`` real. For phase 0 the RF pulse acts as
    ``p' = c2 p - s2 q + sa Z``, ``q' = c2 q - s2 p + sa Z``, ``Z' = ca Z - sa/2 (p + q)``
    with ``c2 = cos^2(a/2)``, ``s2 = sin^2(a/2)``, ``sa = sin a``, ``ca = cos a``; a phase of 180
    degrees flips the sign of ``sa``. The signal is ``i F+_0 = p_0``.
    """
    n, T, K = t1.numel(), len(seq), n_states
    dev, dt = t1.device, t1.dtype
    alpha = torch.as_tensor(np.deg2rad(seq.flip_angle_deg), dtype=dt, device=dev)
    sign = torch.as_tensor(np.cos(np.deg2rad(seq.phase_deg)).round(), dtype=dt, device=dev)
    a = alpha[None, :] * b1[:, None]  # (n, T) actual flip angles
    c2 = torch.cos(a / 2) ** 2
    s2 = 1.0 - c2
    sa = torch.sin(a) * sign[None, :]
    ca = torch.cos(a)
    tr = torch.as_tensor(seq.tr_ms, dtype=dt, device=dev)
    e1 = _decay(t1[:, None], tr[None, :])  # (n, T)
    e2 = _decay(t2[:, None], tr[None, :])
    e2te = _decay(t2, seq.te_ms)[:, None]
    # relaxation folded into the RF coefficients: one fused update per state array
    pc2, ps2, psa = e2 * c2, e2 * s2, e2 * sa
    zca, zsa, rec = e1 * ca, e1 * sa * 0.5, 1.0 - e1
    # columns of the (n, T) coefficient tables, contiguous per pulse
    pc2, ps2, psa, zca, zsa, rec = (x.T.contiguous() for x in (pc2, ps2, psa, zca, zsa, rec))
    # unfolded coefficients for the readout at TE (right after the pulse)
    c2t, s2t, sat = (x.T.contiguous() for x in (c2, s2, sa))

    # states along rows, atoms along contiguous columns: every op below is a contiguous pass,
    # and the per-pulse coefficients broadcast along the fast axis
    width_buf = T + K + 1
    pbuf = torch.zeros(width_buf, n, dtype=dt, device=dev)
    qbuf = torch.zeros(width_buf, n, dtype=dt, device=dev)
    z = torch.zeros(K, n, dtype=dt, device=dev)
    tmp = torch.empty(K, n, dtype=dt, device=dev)
    tmp2 = torch.empty(K, n, dtype=dt, device=dev)
    out = torch.empty(T, n, dtype=dt, device=dev)
    z[0] = _initial_z(seq, t1)
    ps, qs = T, 0  # view starts: the p view moves up, the q view down, once per TR
    for i in range(T):
        w = min(i + 1, K)
        p = pbuf[ps: ps + w]
        q = qbuf[qs: qs + w]
        zz = z[:w]
        t = tmp[:w]
        u = tmp2[:w]
        # readout at TE: F+_0 right after the pulse (relaxation to TE applied at the end)
        out[i] = c2t[i] * p[0] - s2t[i] * q[0] + sat[i] * zz[0]
        # t = p + q (for Z), u = sa * Z (shared by p and q); with relaxation folded in,
        # p' = c2 p - s2 q + sa Z = E2 p - s2 (p + q) + sa Z  (c2 + s2 = E2)
        torch.add(p, q, out=t)
        torch.mul(zz, psa[i], out=u)
        e2i = pc2[i] + ps2[i]
        p.mul_(e2i).addcmul_(t, ps2[i], value=-1.0).add_(u)
        q.mul_(e2i).addcmul_(t, ps2[i], value=-1.0).add_(u)
        zz.mul_(zca[i]).addcmul_(t, zsa[i], value=-1.0)
        zz[0].add_(rec[i])
        # gradient: p_k <- p_{k-1} (view start moves up), q_k <- q_{k+1}, new p_0 = q_0
        ps -= 1
        qs += 1
        pbuf[ps] = qbuf[qs]
    return out.T * e2te


def _epg_general(seq: Sequence, t1, t2, b1, n_states: int) -> torch.Tensor:
    """Complex out-of-place EPG for any RF phase; supports reverse- and forward-mode autograd.

    Returns the complex signal ``i F+_0 exp(-TE/T2)``, shape ``(n, T)``.
    """
    n, T, K = t1.numel(), len(seq), n_states
    dev, dt = t1.device, t1.dtype
    cdt = torch.complex64 if dt == torch.float32 else torch.complex128
    alpha = torch.as_tensor(np.deg2rad(seq.flip_angle_deg), dtype=dt, device=dev)
    phi = torch.as_tensor(np.deg2rad(seq.phase_deg), dtype=dt, device=dev)
    tr = torch.as_tensor(seq.tr_ms, dtype=dt, device=dev)
    a = alpha[None, :] * b1[:, None]
    c2 = (torch.cos(a / 2) ** 2).to(cdt)
    s2 = (torch.sin(a / 2) ** 2).to(cdt)
    sa = torch.sin(a).to(cdt)
    ca = torch.cos(a).to(cdt)
    eip = torch.polar(torch.ones_like(phi), phi)[None, :]  # e^{i phi}, (1, T)
    e1 = _decay(t1[:, None], tr[None, :]).to(cdt)
    e2 = _decay(t2[:, None], tr[None, :]).to(cdt)
    e2te = _decay(t2, seq.te_ms).to(cdt)
    z0 = _initial_z(seq, t1)
    fp = torch.zeros(n, K, dtype=cdt, device=dev)
    fm = torch.zeros(n, K, dtype=cdt, device=dev)
    z = torch.cat([z0.to(cdt)[:, None], torch.zeros(n, K - 1, dtype=cdt, device=dev)], 1)
    zero_col = torch.zeros(n, 1, dtype=cdt, device=dev)
    unit = torch.zeros(K, dtype=cdt, device=dev)
    unit[0] = 1
    sig = []
    for i in range(T):
        e, c, s, si, co = eip[:, i: i + 1], c2[:, i: i + 1], s2[:, i: i + 1], sa[:, i: i + 1], \
            ca[:, i: i + 1]
        fp_n = c * fp + e * e * s * fm - 1j * e * si * z
        fm_n = s * fp / (e * e) + c * fm + 1j * si * z / e
        z_n = -0.5j * si * fp / e + 0.5j * e * si * fm + co * z
        sig.append(1j * fp_n[:, 0])
        fp_n = fp_n * e2[:, i: i + 1]
        fm_n = fm_n * e2[:, i: i + 1]
        z = z_n * e1[:, i: i + 1] + (1 - e1[:, i: i + 1]) * unit
        fp = torch.cat([fm_n[:, 1:2].conj(), fp_n[:, :-1]], 1) if K > 1 else fm_n[:, 0:1].conj() * 0
        fm = torch.cat([fm_n[:, 1:], zero_col], 1)
    return torch.stack(sig, 1) * e2te[:, None]
