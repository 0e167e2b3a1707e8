"""Fused GPU kernel (Triton) of the real-arithmetic FISP EPG and of its forward-mode derivatives.

Same model, state convention and truncation as the CPU kernel (``epg_kernel.c``) and
``_epg_real_fast`` in :mod:`mrflight.physics._torch_epg`: RF phases 0/180 degrees, states
``F+_k = -i p_k``,
``F-_k = i q_k``, ``Z_k`` real; per TR the RF pulse, the readout of ``F+_0``, relaxation and the
gradient shift. One launch simulates every atom of a call; one program owns ``BLOCK_A`` atoms
(sorted by state count, so a program's atoms need similar counts) for all ``T`` pulses, with its
states in a private scratch area (a few tens of kB, resident in L1/L2) laid out
``[state][atom]`` so that every access is one coalesced row per state. The gradient shift is index
arithmetic: ``p`` and ``q`` live in circular buffers of the program's state count ``K``, whose
start moves down (``p``) or up (``q``) by one state per TR, so no state is ever copied; ``Z``
does not shift and is double-buffered so the readout of ``Z_0`` never races its update.

Invariants used (the same as the CPU kernel's moving windows): ``p_0 = q_0`` (``F-_0`` is the
conjugate of ``F+_0``), so ``p_0`` is never stored; ``q_{K-1}`` is zero when loaded (it would come
from ``q_K``, beyond the truncation). A per-atom state count ``k_a <= K`` is honoured by storing
zeros for ``k >= k_a`` (identical to truncating that atom alone at ``k_a``).

Variant (``run(..., z_registers=True)``, fingerprints only): ``Z`` is never shifted, so
:func:`_epg_fisp_zreg_kernel` keeps it in registers for the whole train (all of a program's
states in one block of ``KP``, a power of two, one launch per bucket of counts) and moves only
``p`` and ``q`` through the scratch: 16 instead of 24 bytes of scratch traffic per state update,
which is what bounds the scratch kernel on a GPU. Same arithmetic in the same order.

Forward-mode derivatives (the tangent recursion of ``epg_jac_kernel.c``, extended to B1): for a
parameter ``theta`` every folded coefficient ``c`` of ``p' = E2 p - S2 t + SA z``,
``z' = ZC z - ZS t + REC [k = 0]`` (``t = p + q``) contributes ``dc/dtheta`` times the state, so the
tangent states obey the same recursion plus a source term. ``T1`` acts through ``E1`` and ``Z_0``
after the inversion, ``T2`` through ``E2``, ``B1`` through the flip angle ``b1 * alpha_n``:
``d/dB1 (cos^2(a/2), sin^2(a/2), sin a, cos a) = alpha_n (-sin a / 2, sin a / 2, cos a, -sin a)``.

The readout at TE (``exp(-TE/T2)``) is applied in the kernel; outputs are written straight into
the caller's complex tensor (real parts; the imaginary parts stay zero).

Requires ``triton``. Under ``TRITON_INTERPRET=1`` (set before this module is imported) the same
kernel runs on CPU tensors through Triton's interpreter (slow; used by the tests).

References:
    Weigel, Extended phase graphs: dephasing, RF pulses, and echoes - pure and simple, JMRI 2015.
    Jiang et al., MR fingerprinting using FISP, MRM 2015.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = ["run", "PARAMS", "BLOCK_A"]

#: parameters the kernel can differentiate with respect to, in kernel order
PARAMS = ("t1", "t2", "b1")
#: atoms per program
BLOCK_A = 32
#: bound on the scratch bytes of one launch (more atoms are split into several launches)
_SCRATCH_BYTES = 2 * 2**30



@triton.jit
def _tangent(dp, dq, dz, p, q, z, t, e2, s2c, sac, zc, zs, de2, ds2, dsa, dzc, dzs,
             PQ: tl.constexpr, ZZ: tl.constexpr):
    """One tangent step: the value recursion applied to (dp, dq, dz), plus the source terms of
    the coefficients that depend on the parameter (PQ: E2/S2/SA, ZZ: ZC/ZS)."""
    dt = dp + dq
    np_ = e2 * dp - s2c * dt + sac * dz
    nq = e2 * dq - s2c * dt + sac * dz
    nz = zc * dz - zs * dt
    if PQ:
        np_ += de2 * p - ds2 * t + dsa * z
        nq += de2 * q - ds2 * t + dsa * z
    if ZZ:
        nz += dzc * z - dzs * t
    return np_, nq, nz


@triton.jit
def _load_set(ptr, poff, qoff, zoff, pm, qm, zm, k):
    """(p, q, z) of one state set; p_0 is q_0 (never stored), q_{K-1} is zero (masked)."""
    q = tl.load(ptr + qoff, mask=qm, other=0.0)
    p = tl.where(k == 0, q, tl.load(ptr + poff, mask=pm, other=0.0))
    z = tl.load(ptr + zoff, mask=zm, other=0.0)
    return p, q, z


@triton.jit
def _store_set(ptr, poff, qoff, zoff, p, q, z, keep, m, k):
    """Store the updated set; states at or beyond the atom's count are stored as zeros, and
    q'_0 is not stored (the shift drops it: F-_0 -> F-_{-1})."""
    tl.store(ptr + poff, tl.where(keep, p, 0.0), mask=m)
    tl.store(ptr + qoff, tl.where(keep, q, 0.0), mask=m & (k > 0))
    tl.store(ptr + zoff, tl.where(keep, z, 0.0), mask=m)


@triton.jit
def _readout(ptr, qoff, zoff, qm, am, ca, sa):
    """F+_0 right after the pulse (p_0 = q_0): c2 p0 - s2 q0 + sa z0 = cos(a) q0 + sa z0."""
    q0 = tl.load(ptr + qoff, mask=qm, other=0.0)
    z0 = tl.load(ptr + zoff, mask=am, other=0.0)
    return ca * q0 + sa * z0, q0, z0


@triton.jit
def _pulse(alpha, sgn, tr, r1c, r2c, b1c):
    """One pulse's coefficients per atom: sin^2(a/2), sin a, cos a, sin(a) sgn (a = b1 alpha),
    TR/T1, TR/T2, E1, E2 and 1 - E1."""
    ang = alpha * b1c
    # half-angle forms: no cancellation in sin^2(a/2) for small flips
    sh = tl.sin(0.5 * ang)
    ch = tl.cos(0.5 * ang)
    c2 = ch * ch
    s2 = sh * sh
    sn = 2.0 * sh * ch
    ca = c2 - s2
    sa = sn * sgn
    x1 = tr * r1c
    x2 = tr * r2c
    e1 = tl.exp(-x1)
    e2 = tl.exp(-x2)
    # 1 - E1 without cancellation for TR << T1 (the series of -expm1(-x), error < 1e-10)
    rec = tl.where(x1 < 0.125,
                   x1 * (1.0 - x1 * (0.5 - x1 * (1.0 / 6 - x1 * (1.0 / 24 - x1 * (
                       1.0 / 120 - x1 / 720))))), 1.0 - e1)
    return s2, sn, ca, sa, x1, x2, e1, e2, rec


@triton.jit
def _pq_offsets(ps, qs, k, kg, base, cols, BLOCK_A: tl.constexpr):
    """Scratch offsets of states ``k`` of ``p`` and ``q``: circular buffers of ``K = kg`` rows
    of ``BLOCK_A`` atoms whose state 0 sits at row ``ps`` (``qs``)."""
    pi = ps + k
    pi = tl.where(pi >= kg, pi - kg, pi)
    qi = qs + k
    qi = tl.where(qi >= kg, qi - kg, qi)
    return (base + pi * BLOCK_A + cols[None, :],
            base + kg * BLOCK_A + qi * BLOCK_A + cols[None, :])


@triton.jit
def _program(r1_ptr, r2_ptr, b1_ptr, kst_ptr, idx_ptr, kg_ptr, soff_ptr, n,
             BLOCK_A: tl.constexpr):
    """This program's atoms: ``(pid, cols, mask, offsets, 1/T1, 1/T2, B1, state counts, output
    rows, K, scratch offset)``; ``K`` is the largest count of its atoms. The last programs hold
    the atoms with the most states: they start first (a shorter tail)."""
    pid = tl.num_programs(0) - 1 - tl.program_id(0)
    cols = tl.arange(0, BLOCK_A)
    offs = pid * BLOCK_A + cols
    am = offs < n
    r1 = tl.load(r1_ptr + offs, mask=am, other=1.0)
    r2 = tl.load(r2_ptr + offs, mask=am, other=1.0)
    b1 = tl.load(b1_ptr + offs, mask=am, other=1.0)
    kst = tl.load(kst_ptr + offs, mask=am, other=0)
    row = tl.load(idx_ptr + offs, mask=am, other=0)
    return (pid, cols, am, offs, r1, r2, b1, kst, row, tl.load(kg_ptr + pid),
            tl.load(soff_ptr + pid))


@triton.jit
def _epg_fisp_kernel(
    alpha_ptr, sgn_ptr, tr_ptr,                    # (T,) nominal flip (rad), cos(phase), TR (ms)
    r1_ptr, r2_ptr, b1_ptr, z0_ptr, dz0_ptr,       # (n,) per atom, sorted by state count
    kst_ptr, idx_ptr, kg_ptr, soff_ptr,            # per atom: states, output row; per program
    scratch_ptr, out_ptr, jac_ptr,
    n, T, te,
    so_a, so_t, sj_a, sj_t, sj_d,                  # output strides (real elements)
    c_t1, c_t2, c_b1,                              # Jacobian column of each parameter
    D_T1: tl.constexpr, D_T2: tl.constexpr, D_B1: tl.constexpr,
    ACC: tl.constexpr, BLOCK_A: tl.constexpr, KC: tl.constexpr,
):
    J1: tl.constexpr = 1                           # state set of each tangent (0: the value)
    J2: tl.constexpr = 1 + D_T1
    JB: tl.constexpr = 1 + D_T1 + D_T2
    # its scratch: per state set [p: K][q: K][z: 2K] x BLOCK_A
    pid, cols, am, offs, r1, r2, b1, kst, row, kg, base = _program(
        r1_ptr, r2_ptr, b1_ptr, kst_ptr, idx_ptr, kg_ptr, soff_ptr, n, BLOCK_A)
    sset = 4 * kg * BLOCK_A
    # coefficients are computed in CDT (float64 with ACC, as the CPU kernel does), the states
    # and their updates in the working precision WDT of the inputs
    WDT: tl.constexpr = r1_ptr.dtype.element_ty
    CDT: tl.constexpr = tl.float64 if ACC else WDT
    r1c = r1.to(CDT)
    r2c = r2.to(CDT)
    b1c = b1.to(CDT)
    # readout at TE: exp(-TE/T2) and its T2 derivative (limits T2 = 0 and TE = 0 included)
    e2te = tl.where(te > 0, tl.exp(-te * r2c), 1.0)
    de2te = tl.where(e2te > 0, e2te * te * r2c * r2c, 0.0).to(WDT)
    e2te = e2te.to(WDT)
    z0v = tl.load(z0_ptr + offs, mask=am, other=0.0)
    tl.store(scratch_ptr + base + 2 * kg * BLOCK_A + cols, z0v, mask=am)
    if D_T1:
        dz0v = tl.load(dz0_ptr + offs, mask=am, other=0.0)
        tl.store(scratch_ptr + base + J1 * sset + 2 * kg * BLOCK_A + cols, dz0v, mask=am)
    tl.debug_barrier()
    rows = tl.arange(0, KC)[:, None]
    q0m = am & (cols * 0 + kg > 1)
    ps = kg * 0
    qs = kg * 0
    for i in range(T):
        alpha = tl.load(alpha_ptr + i).to(CDT)
        sgn = tl.load(sgn_ptr + i).to(CDT)
        s2, sn, ca, sa, x1, x2, e1, e2, rec = _pulse(alpha, sgn, tl.load(tr_ptr + i).to(CDT),
                                                     r1c, r2c, b1c)
        # derivative coefficients (T = 0 limits: e = 0 and de/dT = 0)
        de1 = tl.where(e1 > 0, e1 * x1 * r1c, 0.0)
        de2 = tl.where(e2 > 0, e2 * x2 * r2c, 0.0)
        dsa = alpha * ca * sgn      # d (sin(a) sgn) / dB1
        dca = -alpha * sn           # d cos(a) / dB1
        # relaxation folded into the RF coefficients (as in the CPU kernel), working precision
        e2b = e2.to(WDT)[None, :]
        s2c = (e2 * s2).to(WDT)[None, :]
        sac = (e2 * sa).to(WDT)[None, :]
        zc = (e1 * ca).to(WDT)[None, :]
        zs = (0.5 * e1 * sa).to(WDT)[None, :]
        recb = rec.to(WDT)[None, :]
        # Z is double-buffered (read zr, write zw): the readout of Z_0 never races its update
        zr = base + (2 + (i % 2)) * kg * BLOCK_A
        zw = base + (3 - (i % 2)) * kg * BLOCK_A
        q0off = base + kg * BLOCK_A + qs * BLOCK_A + cols
        caw = ca.to(WDT)
        saw = sa.to(WDT)
        x, q0, z0 = _readout(scratch_ptr, q0off, zr + cols, q0m, am, caw, saw)
        tl.store(out_ptr + row * so_a + i * so_t, x * e2te, mask=am)
        if D_T1:
            dx, _, _ = _readout(scratch_ptr + J1 * sset, q0off, zr + cols, q0m, am, caw, saw)
            tl.store(jac_ptr + row * sj_a + i * sj_t + c_t1 * sj_d, dx * e2te, mask=am)
        if D_T2:
            dx, _, _ = _readout(scratch_ptr + J2 * sset, q0off, zr + cols, q0m, am, caw, saw)
            tl.store(jac_ptr + row * sj_a + i * sj_t + c_t2 * sj_d, dx * e2te + x * de2te,
                     mask=am)
        if D_B1:
            dx, _, _ = _readout(scratch_ptr + JB * sset, q0off, zr + cols, q0m, am, caw, saw)
            dx += dca.to(WDT) * q0 + dsa.to(WDT) * z0
            tl.store(jac_ptr + row * sj_a + i * sj_t + c_b1 * sj_d, dx * e2te, mask=am)
        # RF + relaxation on every state of the program, KC states at a time
        for kc in range(0, kg, KC):
            k = kc + rows
            ing = (k < kg) & am[None, :]
            keep = k < kst[None, :]   # per-atom truncation
            poff, qoff = _pq_offsets(ps, qs, k, kg, base, cols, BLOCK_A)
            zoff = k * BLOCK_A + cols[None, :]
            qm = (k < kg - 1) & am[None, :]
            pm = ing & (k > 0)
            p, q, z = _load_set(scratch_ptr, poff, qoff, zr + zoff, pm, qm, ing, k)
            t = p + q
            u = sac * z
            np_ = e2b * p - s2c * t + u
            nq = e2b * q - s2c * t + u
            nz = zc * z - zs * t + tl.where(k == 0, recb, 0.0)
            if D_T1:
                ptr = scratch_ptr + J1 * sset
                dp, dq, dz = _load_set(ptr, poff, qoff, zr + zoff, pm, qm, ing, k)
                dp, dq, dz = _tangent(dp, dq, dz, p, q, z, t, e2b, s2c, sac, zc, zs,
                                      0.0, 0.0, 0.0, (de1 * ca).to(WDT)[None, :],
                                      (0.5 * de1 * sa).to(WDT)[None, :], False, True)
                dz -= tl.where(k == 0, de1.to(WDT)[None, :], 0.0)
                _store_set(ptr, poff, qoff, zw + zoff, dp, dq, dz, keep, ing, k)
            if D_T2:
                ptr = scratch_ptr + J2 * sset
                dp, dq, dz = _load_set(ptr, poff, qoff, zr + zoff, pm, qm, ing, k)
                dp, dq, dz = _tangent(dp, dq, dz, p, q, z, t, e2b, s2c, sac, zc, zs,
                                      de2.to(WDT)[None, :], (de2 * s2).to(WDT)[None, :],
                                      (de2 * sa).to(WDT)[None, :], 0.0, 0.0, True, False)
                _store_set(ptr, poff, qoff, zw + zoff, dp, dq, dz, keep, ing, k)
            if D_B1:
                ptr = scratch_ptr + JB * sset
                dp, dq, dz = _load_set(ptr, poff, qoff, zr + zoff, pm, qm, ing, k)
                dp, dq, dz = _tangent(dp, dq, dz, p, q, z, t, e2b, s2c, sac, zc, zs,
                                      0.0, (0.5 * e2 * alpha * sn).to(WDT)[None, :],
                                      (e2 * dsa).to(WDT)[None, :], (e1 * dca).to(WDT)[None, :],
                                      (0.5 * e1 * dsa).to(WDT)[None, :], True, True)
                _store_set(ptr, poff, qoff, zw + zoff, dp, dq, dz, keep, ing, k)
            _store_set(scratch_ptr, poff, qoff, zw + zoff, np_, nq, nz, keep, ing, k)
        # gradient: p_k <- p_{k-1} (start moves down), q_k <- q_{k+1} (start moves up)
        tl.debug_barrier()
        ps = tl.where(ps == 0, kg - 1, ps - 1)
        qs = tl.where(qs == kg - 1, 0, qs + 1)


@triton.jit
def _epg_fisp_zreg_kernel(
    alpha_ptr, sgn_ptr, tr_ptr, r1_ptr, r2_ptr, b1_ptr, z0_ptr,
    kst_ptr, idx_ptr, kg_ptr, soff_ptr, scratch_ptr, out_ptr,
    n, T, te, so_a, so_t,
    ACC: tl.constexpr, BLOCK_A: tl.constexpr, KP: tl.constexpr,
):
    """The value recursion of :func:`_epg_fisp_kernel` with all ``K <= KP`` states of a
    program in one block: ``Z`` (which the gradient does not shift) stays in registers for the
    whole train, only ``p`` and ``q`` go through the scratch (circular buffers, as there): 16
    instead of 24 bytes of scratch traffic per state update. ``Z_0`` is also tracked as a vector
    for the readout."""
    # its state count K <= KP; its scratch: [p: K][q: K] x BLOCK_A
    pid, cols, am, offs, r1, r2, b1, kst, row, kg, base = _program(
        r1_ptr, r2_ptr, b1_ptr, kst_ptr, idx_ptr, kg_ptr, soff_ptr, n, BLOCK_A)
    WDT: tl.constexpr = r1_ptr.dtype.element_ty
    CDT: tl.constexpr = tl.float64 if ACC else WDT
    r1c = r1.to(CDT)
    r2c = r2.to(CDT)
    b1c = b1.to(CDT)
    e2te = tl.where(te > 0, tl.exp(-te * r2c), 1.0).to(WDT)
    z0 = tl.load(z0_ptr + offs, mask=am, other=0.0)
    k = tl.arange(0, KP)[:, None]
    ing = (k < kg) & am[None, :]
    live = ing & (k < kst[None, :])     # per-atom truncation: states beyond stay zero
    z = tl.where((k == 0) & am[None, :], z0[None, :], 0.0)
    q0m = am & (cols * 0 + kg > 1)
    qm = (k < kg - 1) & am[None, :]
    pm = ing & (k > 0)
    ps = kg * 0
    qs = kg * 0
    for i in range(T):
        s2, sn, ca, sa, x1, x2, e1, e2, rec = _pulse(
            tl.load(alpha_ptr + i).to(CDT), tl.load(sgn_ptr + i).to(CDT),
            tl.load(tr_ptr + i).to(CDT), r1c, r2c, b1c)
        e2w = e2.to(WDT)
        s2c = (e2 * s2).to(WDT)
        sac = (e2 * sa).to(WDT)
        zcw = (e1 * ca).to(WDT)
        zsw = (0.5 * e1 * sa).to(WDT)
        recw = rec.to(WDT)
        # readout of F+_0 right after the pulse (p_0 = q_0): cos(a) q0 + sin(a) z0
        q0 = tl.load(scratch_ptr + base + kg * BLOCK_A + qs * BLOCK_A + cols, mask=q0m,
                     other=0.0)
        tl.store(out_ptr + row * so_a + i * so_t, (ca.to(WDT) * q0 + sa.to(WDT) * z0) * e2te,
                 mask=am)
        poff, qoff = _pq_offsets(ps, qs, k, kg, base, cols, BLOCK_A)
        q = tl.load(scratch_ptr + qoff, mask=qm, other=0.0)
        p = tl.where(k == 0, q, tl.load(scratch_ptr + poff, mask=pm, other=0.0))
        t = p + q
        u = sac[None, :] * z
        np_ = e2w[None, :] * p - s2c[None, :] * t + u
        nq = e2w[None, :] * q - s2c[None, :] * t + u
        z = tl.where(live, zcw[None, :] * z - zsw[None, :] * t
                     + tl.where(k == 0, recw[None, :], 0.0), 0.0)
        # Z_0 as the k = 0 row above (t_0 = 2 q_0)
        z0 = zcw * z0 - zsw * (q0 + q0) + recw
        tl.store(scratch_ptr + poff, tl.where(live, np_, 0.0), mask=ing)
        tl.store(scratch_ptr + qoff, tl.where(live, nq, 0.0), mask=ing & (k > 0))
        # gradient: p_k <- p_{k-1} (start moves down), q_k <- q_{k+1} (start moves up)
        tl.debug_barrier()
        ps = tl.where(ps == 0, kg - 1, ps - 1)
        qs = tl.where(qs == kg - 1, 0, qs + 1)


def _group_max(k_sorted: np.ndarray, lanes: int) -> np.ndarray:
    """Each run of ``lanes`` consecutive (sorted) atoms takes the largest count of the run."""
    n = k_sorted.size
    starts = np.arange(0, n, lanes)
    g = np.maximum.reduceat(k_sorted, starts)
    return np.repeat(g, np.diff(np.append(starts, n)))


def run(seq, t1: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor, k_atom: np.ndarray, *,
        wrt: tuple[str, ...] = (), lanes: int = 1, block_a: int = BLOCK_A, k_chunk: int = 16,
        chunk_size: int | None = None, accurate: bool = True, num_warps: int | None = None,
        z_registers: bool = False, progress=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Simulate fingerprints (and optionally their derivatives) with the fused kernel.

    Args:
        seq: the pulse train (RF phases multiples of 180 degrees).
        t1, t2, b1: ``(n,)`` tensors (ms, ms, ratio) on the kernel's device; their dtype
            (float32/float64) is the working precision.
        k_atom: ``(n,)`` int states per atom (:func:`mrflight.physics.truncation.states_needed`).
        wrt: parameters to differentiate with respect to, a subset of :data:`PARAMS` in any
            order (the Jacobian's columns follow it).
        lanes: atoms (in state-count order) that share the largest count of their run, to
            reproduce the CPU kernels' truncation exactly (16 for its float32 path, 8 for float64
            and the Jacobian); 1 truncates every atom at its own count.
        accurate: compute the per-pulse coefficients (flip-angle trigonometry, relaxation
            factors) in float64 and round them to the working precision, as the CPU kernel does;
            ``False`` computes them in the working precision (cheaper on GPUs with slow float64).
        block_a: atoms per program (a power of two).
        k_chunk: states updated per step of a program's inner loop (a power of two).
        num_warps: warps per program (``None``: Triton's default).
        z_registers: without ``wrt``, run :func:`_epg_fisp_zreg_kernel` (``Z`` in registers; one
            launch per power-of-two bucket of state counts, its own atoms per program,
            :func:`_zreg_launch`; ``block_a`` and ``k_chunk`` are not used, ``num_warps`` is).
        chunk_size: atoms per launch (default: all, up to a scratch budget of 2 GiB).
        progress: optional ``progress(n_done_atoms)`` called after every launch.

    Returns:
        ``(x, jac)``: complex ``(n, T)`` fingerprints (complex64 for float32 work, complex128 for
        float64) and ``(n, T, len(wrt))`` derivatives in the same dtype (``None`` when ``wrt`` is
        empty), per ms for T1/T2 and per unit B1.
    """
    bad = [w for w in wrt if w not in PARAMS]
    if bad or len(set(wrt)) != len(wrt):
        raise ValueError(f"wrt must be distinct names among {PARAMS}, got {tuple(wrt)}")
    dev, dt = t1.device, t1.dtype
    n, T = t1.numel(), len(seq)
    cdt = torch.complex64 if dt == torch.float32 else torch.complex128
    order = np.argsort(k_atom, kind="stable")
    ks = _group_max(np.asarray(k_atom, dtype=np.int64)[order], max(1, int(lanes)))
    sel = torch.as_tensor(order, device=dev)
    t1s, t2s, b1s = (x.detach().reshape(-1)[sel].contiguous() for x in (t1, t2, b1))
    r1 = torch.reciprocal(t1s.double())  # +inf for T = 0
    r2 = torch.reciprocal(t2s.double())
    z0 = torch.ones_like(r1)
    dz0 = torch.zeros_like(r1)
    if seq.inversion:
        ei = torch.exp(-seq.ti_ms * r1) if seq.ti_ms > 0 else torch.ones_like(r1)
        z0 = 1.0 - (1.0 + seq.inversion_efficiency) * ei
        if "t1" in wrt:
            dz0 = torch.where(ei > 0, -(1.0 + seq.inversion_efficiency) * ei * seq.ti_ms
                              * r1 * r1, dz0)
    r1, r2, z0, dz0 = (x.to(dt).contiguous() for x in (r1, r2, z0, dz0))
    alpha = torch.as_tensor(np.deg2rad(seq.flip_angle_deg), dtype=dt, device=dev)
    sgn = torch.as_tensor(np.cos(np.deg2rad(seq.phase_deg)).round(), dtype=dt, device=dev)
    tr = torch.as_tensor(seq.tr_ms, dtype=dt, device=dev)
    kst = torch.as_tensor(ks.astype(np.int32), device=dev)
    idx = torch.as_tensor(order.astype(np.int64), device=dev)
    x = torch.zeros(n, T, dtype=cdt, device=dev)
    jac = torch.zeros(n, T, max(1, len(wrt)), dtype=cdt, device=dev)
    xr, jr = torch.view_as_real(x), torch.view_as_real(jac)
    flags = [int(w in wrt) for w in PARAMS]
    cols = [wrt.index(w) if w in wrt else 0 for w in PARAMS]
    n_sets = 1 + sum(flags)
    if z_registers and not wrt:
        done = 0  # the buckets run largest counts first: count the atoms, not the end index
        for a0, a1, kp in _buckets(ks):  # the largest counts first (the longest programs)
            ba, nw = _zreg_launch(kp, num_warps)
            for b0, b1_, kg, so, scratch in _program_launches(ks[a0:a1], ba, 2, dt, dev,
                                                              chunk_size):
                b0, b1_ = a0 + b0, a0 + b1_
                _epg_fisp_zreg_kernel[(len(kg),)](
                    alpha, sgn, tr, r1[b0:b1_], r2[b0:b1_], b1s[b0:b1_], z0[b0:b1_],
                    kst[b0:b1_], idx[b0:b1_], kg, so, scratch, xr, b1_ - b0, T,
                    float(seq.te_ms), xr.stride(0), xr.stride(1), ACC=accurate, BLOCK_A=ba,
                    KP=kp, num_warps=nw, enable_fp_fusion=True)
                del scratch  # freed before the next launch allocates its own
                done += b1_ - b0
                if progress is not None:
                    progress(done)
        return x, None
    # programs of BLOCK_A sorted atoms; the count of a program is that of its last atom
    kc = min(int(k_chunk), triton.next_power_of_2(int(ks.max())))
    launch = {} if num_warps is None else {"num_warps": int(num_warps)}
    for a0, a1, kg, so, scratch in _program_launches(ks, block_a, 4 * n_sets, dt, dev,
                                                     chunk_size):
        _epg_fisp_kernel[(len(kg),)](
            alpha, sgn, tr, r1[a0:a1], r2[a0:a1], b1s[a0:a1], z0[a0:a1], dz0[a0:a1],
            kst[a0:a1], idx[a0:a1], kg, so, scratch, xr, jr,
            a1 - a0, T, float(seq.te_ms),
            xr.stride(0), xr.stride(1), jr.stride(0), jr.stride(1), jr.stride(2),
            *cols, *flags, ACC=accurate, BLOCK_A=block_a, KC=kc, enable_fp_fusion=True, **launch,
        )
        del scratch  # freed before the next launch allocates its own
        if progress is not None:
            progress(a1)
    return x, (jac if wrt else None)


def _zreg_launch(kp: int, num_warps: int | None = None) -> tuple[int, int]:
    """Atoms per program and warps of :func:`_epg_fisp_zreg_kernel` for a bucket of ``kp``
    states: blocks of at most 4096 states x atoms (8 to 32 atoms), 8 warps for the full ones
    (no spills on an H100 up to ``kp = 512``, ``tests/test_triton.py``); ``num_warps``
    overrides the warps."""
    ba = max(8, min(32, 4096 // kp))
    return ba, int(num_warps) if num_warps else (8 if kp * ba >= 4096 else 4)


def _buckets(ks: np.ndarray):
    """``(a0, a1, KP)`` runs of the sorted atoms whose state count rounds up to the same power of
    two ``KP`` (at least 16), the largest first."""
    kp = np.maximum(16, 2 ** np.ceil(np.log2(np.maximum(ks, 1))).astype(np.int64))
    starts = np.concatenate([[0], np.flatnonzero(np.diff(kp)) + 1])
    ends = np.append(starts[1:], len(ks))
    return [(int(a), int(b), int(kp[a])) for a, b in zip(starts, ends)][::-1]


def _program_launches(ks: np.ndarray, block_a: int, sets: int, dt: torch.dtype, dev,
                      chunk_size: int | None):
    """Launches over sorted atoms with counts ``ks``, programs of ``block_a`` atoms each owning
    ``sets x K x block_a`` scratch values (``K`` the count of its last atom): yields ``(a0, a1,
    kg, soff, scratch)``, the atoms of the launch, its programs' counts and scratch offsets, and
    its zeroed scratch, at most ``chunk_size`` atoms (default all) and 2 GiB of scratch each."""
    n, item = len(ks), torch.empty((), dtype=dt).element_size()
    n_prog = -(-n // block_a)
    kg_all = ks[np.minimum(np.arange(1, n_prog + 1) * block_a, n) - 1].astype(np.int64)
    per_prog = sets * kg_all * block_a
    step = max(1, (chunk_size or n) // block_a)
    p0 = 0
    while p0 < n_prog:
        p1 = min(n_prog, p0 + step)
        while p1 > p0 + 1 and per_prog[p0:p1].sum() * item > _SCRATCH_BYTES:
            p1 = p0 + (p1 - p0) // 2
        soff = np.concatenate([[0], np.cumsum(per_prog[p0:p1])[:-1]])
        scratch = torch.zeros(int(per_prog[p0:p1].sum()), dtype=dt, device=dev)
        yield (p0 * block_a, min(n, p1 * block_a),
               torch.as_tensor(kg_all[p0:p1].astype(np.int32), device=dev),
               torch.as_tensor(soff.astype(np.int64), device=dev), scratch)
        del scratch  # (the caller drops its reference too: one scratch alive at a time)
        p0 = p1
