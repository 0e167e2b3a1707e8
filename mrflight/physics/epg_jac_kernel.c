/*
 * Fused CPU kernel: the real-arithmetic FISP EPG of epg_kernel.c together with its forward-mode
 * derivatives with respect to T1, T2 and (optionally) B1 (tangent states propagated through the
 * same recursion, float64). Used by the Cramér–Rao bound; checked against torch forward-mode
 * autograd through the general path in tests/test_crb.py.
 *
 * With t = p + q: p' = E2 p - S2 t + SA z, q' = E2 q - S2 t + SA z, z' = ZC z - ZS t (+ REC at
 * k = 0), where E2 = e2, S2 = e2 s2, SA = e2 sa, ZC = e1 ca, ZS = e1 sa / 2, REC = 1 - e1.
 * d/dT1 acts through e1 (de1/dT1 = e1 TR / T1^2) and z0; d/dT2 through e2 (de2/dT2 = e2 TR / T2^2).
 * d/dB1 acts through the RF coefficients of the flip a = b1 alpha: with c2 = cos^2(a/2),
 * s2 = sin^2(a/2), sa = sgn sin a, ca = cos a, d/dB1 = alpha d/da gives
 * dc2 = -alpha sin(a) / 2, ds2 = alpha sin(a) / 2, dsa = alpha sgn cos a, dca = -alpha sin a
 * (z0, set by the inversion, does not depend on B1).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "epg_threads.h"

#define L 8
/* compiled twice: without (epg_fisp_jac_f64) and with (epg_fisp_jac_b1_f64) the B1 tangent */
#ifndef WITH_B1
#define WITH_B1 0
#endif
#ifndef JFN
#define JFN epg_fisp_jac_f64
#endif

typedef struct {
    epg_job in;
    const double *dz0;
    double *out, *d1, *d2, *db;
} job;

/* one thread: its own value and tangent buffers, then groups from the shared queue */
static void *work(void *arg)
{
    job *J = (job *)arg;
    EPG_UNPACK(&J->in);
    const double *dz0 = J->dz0;
    double *out = J->out, *d1 = J->d1, *d2 = J->d2, *db = J->db;
    (void)db;  /* written by the WITH_B1 build only */
    {
        size_t blen = (size_t)(T + kmax_all + 1) * L, zlen = (size_t)kmax_all * L;
        /* value, d/dT1, d/dT2, d/dB1 for p and q (moving windows) and z */
        double *P[4], *Q[4], *Z[4];
        int ok = 1;
        int nset = WITH_B1 ? 4 : 3;
        for (int j = 0; j < 4; j++) P[j] = Q[j] = Z[j] = NULL;
        for (int j = 0; j < nset; j++) {
            P[j] = (double *)malloc(blen * sizeof(double));
            Q[j] = (double *)malloc(blen * sizeof(double));
            Z[j] = (double *)malloc(zlen * sizeof(double));
            if (!P[j] || !Q[j] || !Z[j]) ok = 0;
        }
        if (!ok) epg_fail(&J->in.q);
        for (int g; (g = epg_next_group(&J->in.q)) >= 0;) {
            int a0 = g * L;
            int na = (n - a0 < L) ? n - a0 : L;
            int K = 1;
            for (int l = 0; l < na; l++) if (kst[a0 + l] > K) K = (int)kst[a0 + l];
            size_t len = (size_t)(T + K + 1) * L;
            for (int j = 0; j < nset; j++) {
                memset(P[j], 0, len * sizeof(double));
                memset(Q[j], 0, len * sizeof(double));
                memset(Z[j], 0, (size_t)K * L * sizeof(double));
            }
            double lr1[L], lr2[L], lb1[L];
            for (int l = 0; l < L; l++) {
                int a = a0 + (l < na ? l : 0);
                lr1[l] = r1[a]; lr2[l] = r2[a]; lb1[l] = b1[a];
                Z[0][l] = (l < na) ? z0[a] : 0.0;
                Z[1][l] = (l < na) ? dz0[a] : 0.0;
            }
            long long ps = T, qs = 0;
            double E2[L], S2[L], SA[L], ZC[L], ZS[L], REC[L];
            double dZC[L], dZS[L], dREC[L];          /* d/dT1 of the z coefficients */
            double hE2[L], hS2[L], hSA[L];           /* d/dT2 of the p/q coefficients */
            double bS2[L], bSA[L], bZC[L], bZS[L];   /* d/dB1 of the coefficients */
            double e1v[L], e2v[L], de1v[L], de2v[L]; /* relaxation over the current TR */
            for (int i = 0; i < T; i++) {
                int w = (i + 1 < K) ? i + 1 : K;
                double *p = P[0] + ps * L, *q = Q[0] + qs * L, *z = Z[0];
                double *dp = P[1] + ps * L, *dq = Q[1] + qs * L, *dz = Z[1];
                double *hp = P[2] + ps * L, *hq = Q[2] + qs * L, *hz = Z[2];
                double *bp = WITH_B1 ? P[3] + ps * L : NULL, *bq = WITH_B1 ? Q[3] + qs * L : NULL;
                double *bz = Z[3];
                for (int l = 0; l < L; l++) {
                    double ang = alpha[i] * lb1[l];
                    double ch = cos(0.5 * ang);
                    double c2 = ch * ch, s2 = 1.0 - c2;
                    double sn = sin(ang), sa = sn * sgn[i], ca = cos(ang);
                    double dc2 = -0.5 * alpha[i] * sn, ds2 = -dc2;
                    double dsa = alpha[i] * ca * sgn[i], dca = -alpha[i] * sn;
                    if (i == 0 || tr[i] != tr[i - 1]) {  /* exp only when TR changes */
                        e1v[l] = exp(-tr[i] * lr1[l]);
                        e2v[l] = exp(-tr[i] * lr2[l]);
                        /* de/dT = e * TR / T^2 = e * TR * r^2 (0 in the T = 0 limit) */
                        de1v[l] = isfinite(lr1[l]) ? e1v[l] * tr[i] * lr1[l] * lr1[l] : 0.0;
                        de2v[l] = isfinite(lr2[l]) ? e2v[l] * tr[i] * lr2[l] * lr2[l] : 0.0;
                    }
                    double e1 = e1v[l], e2 = e2v[l], de1 = de1v[l], de2 = de2v[l];
                    if (l < na) {
                        size_t o = (size_t)(a0 + l) * T + i;
                        out[o] = c2 * p[l] - s2 * q[l] + sa * z[l];
                        d1[o] = c2 * dp[l] - s2 * dq[l] + sa * dz[l];
                        d2[o] = c2 * hp[l] - s2 * hq[l] + sa * hz[l];
                        if (WITH_B1)
                            db[o] = c2 * bp[l] - s2 * bq[l] + sa * bz[l]
                                    + dc2 * p[l] - ds2 * q[l] + dsa * z[l];
                    }
                    E2[l] = e2; S2[l] = e2 * s2; SA[l] = e2 * sa;
                    ZC[l] = e1 * ca; ZS[l] = 0.5 * e1 * sa; REC[l] = 1.0 - e1;
                    dZC[l] = de1 * ca; dZS[l] = 0.5 * de1 * sa; dREC[l] = -de1;
                    hE2[l] = de2; hS2[l] = de2 * s2; hSA[l] = de2 * sa;
                    bS2[l] = e2 * ds2; bSA[l] = e2 * dsa;
                    bZC[l] = e1 * dca; bZS[l] = 0.5 * e1 * dsa;
                }
                for (int k = 0; k < w; k++) {
                    size_t o = (size_t)k * L;
#pragma omp simd
                    for (int l = 0; l < L; l++) {
                        double pv = p[o + l], qv = q[o + l], zv = z[o + l], t = pv + qv;
                        double dpv = dp[o + l], dqv = dq[o + l], dzv = dz[o + l], dt = dpv + dqv;
                        double hpv = hp[o + l], hqv = hq[o + l], hzv = hz[o + l], ht = hpv + hqv;
                        p[o + l] = E2[l] * pv - S2[l] * t + SA[l] * zv;
                        q[o + l] = E2[l] * qv - S2[l] * t + SA[l] * zv;
                        z[o + l] = ZC[l] * zv - ZS[l] * t;
                        dp[o + l] = E2[l] * dpv - S2[l] * dt + SA[l] * dzv;
                        dq[o + l] = E2[l] * dqv - S2[l] * dt + SA[l] * dzv;
                        dz[o + l] = ZC[l] * dzv - ZS[l] * dt + dZC[l] * zv - dZS[l] * t;
                        hp[o + l] = E2[l] * hpv - S2[l] * ht + SA[l] * hzv
                                    + hE2[l] * pv - hS2[l] * t + hSA[l] * zv;
                        hq[o + l] = E2[l] * hqv - S2[l] * ht + SA[l] * hzv
                                    + hE2[l] * qv - hS2[l] * t + hSA[l] * zv;
                        hz[o + l] = ZC[l] * hzv - ZS[l] * ht;
#if WITH_B1
                        double bpv = bp[o + l], bqv = bq[o + l], bzv = bz[o + l];
                        double bt = bpv + bqv;
                        bp[o + l] = E2[l] * bpv - S2[l] * bt + SA[l] * bzv
                                    - bS2[l] * t + bSA[l] * zv;
                        bq[o + l] = E2[l] * bqv - S2[l] * bt + SA[l] * bzv
                                    - bS2[l] * t + bSA[l] * zv;
                        bz[o + l] = ZC[l] * bzv - ZS[l] * bt + bZC[l] * zv - bZS[l] * t;
#endif
                    }
                }
                for (int l = 0; l < L; l++) { z[l] += REC[l]; dz[l] += dREC[l]; }
                ps -= 1;
                qs += 1;
                for (int j = 0; j < nset; j++)
                    for (int l = 0; l < L; l++) P[j][ps * L + l] = Q[j][qs * L + l];
            }
        }
        for (int j = 0; j < 4; j++) { free(P[j]); free(Q[j]); free(Z[j]); }
    }
    return NULL;
}

/* db (d/dB1, n x T) is filled by the WITH_B1 build and ignored (may be NULL) otherwise.
   Up to nthreads threads. Returns 0 on success, -1 if memory ran out. */
int JFN(int n, int T, const double *alpha, const double *sgn, const double *tr,
        const double *r1, const double *r2, const double *b1, const double *z0,
        const double *dz0, const long long *kst, double *out, double *d1,
        double *d2, double *db, int nthreads)
{
    job J = {epg_job_make(n, T, L, alpha, sgn, tr, r1, r2, b1, z0, kst), dz0, out, d1, d2, db};
    epg_run(nthreads, J.in.q.ngroups, work, &J);
    return J.in.q.failed ? -1 : 0;
}
