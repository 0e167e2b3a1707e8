/*
 * Threads for the fused EPG kernels: groups of atoms handed out one at a time from a shared
 * counter, to the calling thread and nth - 1 POSIX threads started for this call and joined at
 * its end. No thread pool and no spinning: an OpenMP team whose idle members spin at the barrier
 * cost more than the work on a busy machine (a 16-atom call with 2 threads took 56 ms, a 64-atom
 * call 3x the CPU time of one thread). Starting a thread costs ~20 us, so the kernels use threads
 * only when every thread gets at least a few groups (EPG_MIN_GROUPS_PER_THREAD).
 */
#ifndef EPG_THREADS_H
#define EPG_THREADS_H

#include <pthread.h>
#include <stdlib.h>

#ifndef EPG_MIN_GROUPS_PER_THREAD
#define EPG_MIN_GROUPS_PER_THREAD 4
#endif

typedef struct {
    int ngroups;
    int next;    /* next group to hand out (atomic) */
    int failed;  /* set when a thread could not allocate its buffers (atomic) */
} epg_queue;

/* the inputs every kernel shares (see epg_kernel.c for their meaning) */
typedef struct {
    epg_queue q;
    int n, T;
    const double *alpha, *sgn, *tr, *r1, *r2, *b1, *z0;
    const long long *kst;
    long long kmax_all;  /* the largest state count of any atom */
} epg_job;

static inline epg_job epg_job_make(int n, int T, int lanes, const double *alpha,
                                   const double *sgn, const double *tr, const double *r1,
                                   const double *r2, const double *b1, const double *z0,
                                   const long long *kst)
{
    epg_job j = {{(n + lanes - 1) / lanes, 0, 0}, n, T, alpha, sgn, tr, r1, r2, b1, z0, kst, 1};
    for (int a = 0; a < n; a++) if (kst[a] > j.kmax_all) j.kmax_all = kst[a];
    return j;
}

/* local copies of an epg_job's fields, under their usual names, inside a worker */
#define EPG_UNPACK(J)                                                                     \
    int n = (J)->n, T = (J)->T;                                                           \
    const double *alpha = (J)->alpha, *sgn = (J)->sgn, *tr = (J)->tr, *r1 = (J)->r1;      \
    const double *r2 = (J)->r2, *b1 = (J)->b1, *z0 = (J)->z0;                             \
    const long long *kst = (J)->kst;                                                      \
    long long kmax_all = (J)->kmax_all

/* the next group for this thread, or -1 when none is left or a thread failed */
static inline int epg_next_group(epg_queue *q)
{
    if (__atomic_load_n(&q->failed, __ATOMIC_RELAXED)) return -1;
    int g = __atomic_fetch_add(&q->next, 1, __ATOMIC_RELAXED);
    return g < q->ngroups ? g : -1;
}

static inline void epg_fail(epg_queue *q) { __atomic_store_n(&q->failed, 1, __ATOMIC_RELAXED); }

/* run work(arg) on min(nthreads, ngroups / EPG_MIN_GROUPS_PER_THREAD) threads (at least the
   caller's) and wait for all of them; a thread that cannot be started leaves its share to the
   others */
static inline void epg_run(int nthreads, int ngroups, void *(*work)(void *), void *arg)
{
    int nth = nthreads < 1 ? 1 : nthreads;
    int most = ngroups / EPG_MIN_GROUPS_PER_THREAD;
    if (nth > most) nth = most < 1 ? 1 : most;
    pthread_t *tid = nth > 1 ? (pthread_t *)malloc(sizeof(pthread_t) * (size_t)(nth - 1)) : NULL;
    int started = 0;
    if (tid)
        for (int t = 1; t < nth; t++)
            if (pthread_create(&tid[started], NULL, work, arg) == 0) started++;
    work(arg);
    for (int t = 0; t < started; t++) pthread_join(tid[t], NULL);
    free(tid);
}

#endif
