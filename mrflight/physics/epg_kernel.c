/*
 * Fused CPU kernel for the real-arithmetic FISP EPG (RF phases in {0, 180} degrees).
 *
 * Same model and state convention as mrflight/physics/epg.py (_epg_real_fast): F+_k = -i p_k,
 * F-_k = i q_k, Z_k real; per TR: RF, readout of F+_0, relaxation, gradient shift. Atoms are
 * processed in groups of LANES that share one state count, with the states of a group laid out
 * [state][lane] so the update of one state is one SIMD vector, and the whole working window of a
 * group stays in L1/L2 for all T pulses. The gradient shift moves the window start (p upwards,
 * q downwards) instead of copying states. Groups are shared among threads by epg_threads.h.
 * Compiled at first use by mrflight.physics._ckernel.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "epg_threads.h"

#ifndef REAL
#define REAL float
#define LANES 16
#define FN epg_fisp_f32
#endif

typedef struct {
    epg_job in;
    REAL *out;
} job;

/* one thread: its own state buffers, then groups from the shared queue until none is left */
static void *work(void *arg)
{
    job *J = (job *)arg;
    EPG_UNPACK(&J->in);
    REAL *out = J->out;
    {
        size_t buf_len = (size_t)(T + kmax_all + 1) * LANES;
        REAL *pbuf = (REAL *)aligned_alloc(64, ((buf_len * sizeof(REAL) + 63) / 64) * 64);
        REAL *qbuf = (REAL *)aligned_alloc(64, ((buf_len * sizeof(REAL) + 63) / 64) * 64);
        REAL *z = (REAL *)aligned_alloc(64, (((size_t)kmax_all * LANES * sizeof(REAL) + 63) / 64) * 64);
        if (!pbuf || !qbuf || !z) epg_fail(&J->in.q);
        for (int g; (g = epg_next_group(&J->in.q)) >= 0;) {
            int a0 = g * LANES;
            int na = (n - a0 < LANES) ? n - a0 : LANES;
            int K = 1;
            for (int l = 0; l < na; l++) if (kst[a0 + l] > K) K = (int)kst[a0 + l];
            size_t len = (size_t)(T + K + 1) * LANES;
            memset(pbuf, 0, len * sizeof(REAL));
            memset(qbuf, 0, len * sizeof(REAL));
            memset(z, 0, (size_t)K * LANES * sizeof(REAL));
            double lr1[LANES], lr2[LANES], lb1[LANES];
            for (int l = 0; l < LANES; l++) {
                int a = a0 + (l < na ? l : 0);
                lr1[l] = r1[a]; lr2[l] = r2[a]; lb1[l] = b1[a];
                z[l] = (l < na) ? (REAL)z0[a] : (REAL)0;
            }
            long long ps = T, qs = 0;
            int same_b1 = 1;
            for (int l = 1; l < LANES; l++) if (lb1[l] != lb1[0]) same_b1 = 0;
            REAL E2[LANES], S2[LANES], SA[LANES], ZC[LANES], ZS[LANES], REC[LANES];
            double C2[LANES], SS2[LANES], SAN[LANES], CA[LANES], e1v[LANES], e2v[LANES];
            for (int i = 0; i < T; i++) {
                int w = (i + 1 < K) ? i + 1 : K;
                REAL *p = pbuf + ps * LANES;
                REAL *q = qbuf + qs * LANES;
                /* per-lane pulse and relaxation factors; transcendental functions only when the
                   flip angle or TR changes (shared by the group when its B1 is uniform) */
                for (int l = 0; l < LANES; l++) {
                    if (l == 0 || !same_b1) {
                        double ang = alpha[i] * lb1[l];
                        double ch = cos(0.5 * ang);
                        C2[l] = ch * ch; SS2[l] = 1.0 - C2[l];
                        SAN[l] = sin(ang) * sgn[i]; CA[l] = cos(ang);
                    } else {
                        C2[l] = C2[0]; SS2[l] = SS2[0]; SAN[l] = SAN[0]; CA[l] = CA[0];
                    }
                    if (i == 0 || tr[i] != tr[i - 1]) {
                        e1v[l] = exp(-tr[i] * lr1[l]);
                        e2v[l] = exp(-tr[i] * lr2[l]);
                    }
                }
                for (int l = 0; l < LANES; l++) {
                    double c2 = C2[l], s2 = SS2[l], sa = SAN[l], ca = CA[l];
                    double e1 = e1v[l], e2 = e2v[l];
                    if (l < na)
                        out[(size_t)(a0 + l) * T + i] =
                            (REAL)(c2 * p[l] - s2 * q[l] + sa * z[l]);
                    E2[l] = (REAL)e2; S2[l] = (REAL)(e2 * s2); SA[l] = (REAL)(e2 * sa);
                    ZC[l] = (REAL)(e1 * ca); ZS[l] = (REAL)(0.5 * e1 * sa); REC[l] = (REAL)(1.0 - e1);
                }
                for (int k = 0; k < w; k++) {
                    REAL *pk = p + (size_t)k * LANES, *qk = q + (size_t)k * LANES;
                    REAL *zk = z + (size_t)k * LANES;
#pragma omp simd
                    for (int l = 0; l < LANES; l++) {
                        REAL pv = pk[l], qv = qk[l], zv = zk[l];
                        REAL t = pv + qv, u = SA[l] * zv;
                        pk[l] = E2[l] * pv - S2[l] * t + u;
                        qk[l] = E2[l] * qv - S2[l] * t + u;
                        zk[l] = ZC[l] * zv - ZS[l] * t;
                    }
                }
                for (int l = 0; l < LANES; l++) z[l] += REC[l];
                ps -= 1;
                qs += 1;
                for (int l = 0; l < LANES; l++) pbuf[ps * LANES + l] = qbuf[qs * LANES + l];
            }
        }
        free(pbuf);
        free(qbuf);
        free(z);
    }
    return NULL;
}

/*
 * n atoms (already sorted so that each group of LANES atoms needs similar state counts),
 * T pulses. alpha[T] nominal flip (rad), sgn[T] cos(phase) in {+1,-1}, tr[T] ms.
 * r1[n], r2[n]: relaxation rates 1/T1, 1/T2 (1/ms; +inf for T = 0). b1[n]: flip scale.
 * z0[n]: Z_0 before the first pulse. kst[n]: states needed per atom. out[n*T]: p_0 after each
 * pulse (the readout, before TE decay). Up to nthreads threads. Returns 0 on success, -1 if
 * memory ran out.
 */
int FN(int n, int T, const double *alpha, const double *sgn, const double *tr,
       const double *r1, const double *r2, const double *b1, const double *z0,
       const long long *kst, REAL *out, int nthreads)
{
    job J = {epg_job_make(n, T, LANES, alpha, sgn, tr, r1, r2, b1, z0, kst), out};
    epg_run(nthreads, J.in.q.ngroups, work, &J);
    return J.in.q.failed ? -1 : 0;
}
