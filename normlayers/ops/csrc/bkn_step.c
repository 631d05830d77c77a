/* The whole training step of Batch Kalman Normalization's CPU hot path in one C call each way.
 *
 * normlayers/ops/cfinalize.py compiles this file together with bkn_finalize.c (cc -O3 -shared, with -fopenmp when
 * the compiler has it) and normlayers/ops/torch_backend.py calls it through ctypes from _NchwPriorFn and
 * _GroupedPriorFn (_step_forward, _step_backward). The torch-ops paths of those Functions are the reference and the
 * fallback; the per-channel arithmetic is bkn_forward_finalize_grouped's / bkn_backward_grouped's (bkn_finalize.c).
 *
 * x is (N, C, L) (NCHW-contiguous, L = H*W*...) or (N, L, C) (channels-last), float32 or float64; G ghost groups
 * of g = N/G consecutive samples, M = g*L elements per (group, channel). Statistics are (G, C) arrays in x's dtype.
 *
 * Forward: per-(group, channel) sums of (x - s) and (x - s)^2 in double, s = the group's first element of the
 * channel (shifted sums: no cancellation unless a channel's mean is far from its first value in units of its
 * deviation), then the finalize (guard, mixture, running buffers, r = 1/sqrt(var_hat + eps), d = mu_B - mu_P,
 * a = r*gamma), then y = x*a + (beta - mu_hat*a).
 * Backward: per-(group, channel) S1 = sum(g) and S2 = r*sum(g*(x - mu_hat)) in double, then
 * Gm = g_mean - a*S1, Gv = g_var - a*r*S2/2 (the posterior's gradients, zero when NULL), dvar_P = p*Gv,
 * dmu_P = p*Gm - 2*p*q*d*Gv, dgamma = sum_k S2, dbeta = sum_k S1, and dx = a*g + k2*(x - mu_hat) + k0 with
 * k2 = 2*q*Gv/M, k0 = q*Gm/M (docs/background/bkn.md, "Backward in closed form").
 *
 * Threads: OpenMP (linked against torch's libgomp: one thread pool) with the caller's thread count. NCHW: each thread
 * owns a range of channels (contiguous rows) through the whole step, so the forward has one barrier (the guard needs
 * every channel's ratio), the backward none, and the sums do not depend on the thread count. Channels-last: the x-sized
 * passes split the positions (each thread streams a contiguous block of whole rows, as BatchNorm2d's kernels do; split
 * by channels, every thread read every row), each thread's partial sums are added in thread order per channel, and the
 * per-channel work splits the channels (blocks of 64 bytes): two more barriers each way, and sums that depend on the
 * thread count in the last bits only.
 * Without OpenMP the pragmas are ignored and everything runs on the calling thread.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define CHUNK 512   /* elements per SCALAR partial sum (NCHW rows), added into double after each chunk */
#define CL_CHUNK 32 /* positions per SCALAR partial sum (channels-last), likewise */

/* The x-sized loops are compiled for AVX-512 and AVX2 (with FMA) too, and the loader picks the best the CPU has
 * (GCC's target_clones: an ifunc resolved when the library is loaded); elsewhere, the compiler's default target. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && defined(__x86_64__) && defined(__linux__) \
    && !defined(BKN_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif
/* helpers of the cloned loops: inlined into each clone, so they are compiled for its instruction set */
#if defined(__GNUC__)
#define ALWAYS_INLINE __attribute__((always_inline))
#else
#define ALWAYS_INLINE
#endif

/* Cache lines [from, to) bytes into base, fetched ahead (into L2) for reading or for writing. The channels-last loops
 * walk a chunk of CL_CHUNK positions one VLEN-channel column at a time, a stride of C elements that the hardware
 * prefetchers follow poorly: with x out of cache (a step after other layers) the forward took twice BatchNorm2d's
 * time. They fetch the next chunk's rows in memory order while they work on this one. */
#if defined(__GNUC__)
#define PREFETCH_RANGE(base, from, to, rw)                                         \
    do {                                                                           \
        const char *pf_ = (const char *)(base);                                    \
        for (int64_t o_ = (from) & ~(int64_t)63; o_ < (to); o_ += 64) {            \
            __builtin_prefetch(pf_ + o_, (rw), 2);                                 \
        }                                                                          \
    } while (0)
#else
#define PREFETCH_RANGE(base, from, to, rw) ((void)0)
#endif

typedef struct {
    int64_t n, c, length, groups, per_group, count; /* count = M = per_group * length */
    int threads;
} Shape;

static int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* [begin, end) of part t of `total` items split into `parts` near-equal parts */
static void split(int64_t total, int parts, int t, int64_t *begin, int64_t *end) {
    *begin = total * t / parts;
    *end = total * (t + 1) / parts;
}

/* The prior has a NaN/inf or a negative variance: nothing may be written (the caller raises). */
static int bad_prior(int is_double, int64_t rows, int64_t c, const void *prior_mean, const void *prior_var) {
    for (int64_t i = 0; i < rows * c; ++i) {
        double pm = is_double ? ((const double *)prior_mean)[i] : (double)((const float *)prior_mean)[i];
        double pv = is_double ? ((const double *)prior_var)[i] : (double)((const float *)prior_var)[i];
        if (!(pv >= 0.0) || isinf(pv) || !isfinite(pm)) {
            return 1;
        }
    }
    return 0;
}

#define SCALAR float
#define SUFFIX f32
#include "bkn_step_impl.h"
#undef SCALAR
#undef SUFFIX

#define SCALAR double
#define SUFFIX f64
#include "bkn_step_impl.h"
#undef SCALAR
#undef SUFFIX

/* Whether this build runs threads (1: OpenMP) -- for tests and the benchmark's notes. */
int bkn_step_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Forward step. channels_last: x is (N, L, C) in memory, else (N, C, L). weight, bias (C,); the prior (C,) shared
 * by the groups (prior_stride = 0) or (G, C) (prior_stride = C); guard as bkn_forward_finalize_grouped
 * (layer_guard: one decision for all groups). Running buffers (NULL to skip): EMA of the posterior averaged over the
 * groups, variance times M/(M-1). Outputs: y (x's layout), post_mean, post_var, rstd, d, a (G, C), p_used (G,).
 * Returns the number of groups whose guard fired, -1 for a bad prior (nothing written), -2 when out of memory. */
double bkn_step_forward(int is_double, int channels_last, int64_t n, int64_t c, int64_t length, int64_t groups,
                        const void *x, const void *weight, const void *bias, const void *prior_mean,
                        const void *prior_var, int64_t prior_stride, double p, double eps, double guard_ratio,
                        int layer_guard, void *running_mean, void *running_var, double momentum, void *y,
                        void *post_mean, void *post_var, void *rstd, void *d, void *a, double *p_used, int threads) {
    if (bad_prior(is_double, prior_stride != 0 ? groups : 1, c, prior_mean, prior_var)) {
        return -1.0;
    }
    Shape s = {n, c, length, groups, n / groups, (n / groups) * length, threads < 1 ? 1 : threads};
    if (is_double) {
        return step_forward_f64(&s, channels_last, x, weight, bias, prior_mean, prior_var, prior_stride, p, eps,
                                guard_ratio, layer_guard, running_mean, running_var, momentum, y, post_mean,
                                post_var, rstd, d, a, p_used);
    }
    return step_forward_f32(&s, channels_last, x, weight, bias, prior_mean, prior_var, prior_stride, p, eps,
                            guard_ratio, layer_guard, running_mean, running_var, momentum, y, post_mean, post_var,
                            rstd, d, a, p_used);
}

/* Backward step. gy in x's layout (NULL: y has no gradient); post_mean, rstd, a, d (G, C) and p_used (G,) from the
 * forward; grad_mean, grad_var (G, C) the posterior's gradients (NULL: zero). Outputs (NULL: skipped): dx (x's
 * layout), grad_weight, grad_bias (C,), grad_prior_mean, grad_prior_var ((G, C) with prior_stride = C, else summed
 * over the groups into (C,)). Returns 0, or -2 when out of memory. */
int bkn_step_backward(int is_double, int channels_last, int64_t n, int64_t c, int64_t length, int64_t groups,
                      const void *x, const void *gy, const void *post_mean, const void *rstd, const void *a,
                      const void *d, const double *p_used, const void *grad_mean, const void *grad_var,
                      int64_t prior_stride, void *dx, void *grad_weight, void *grad_bias, void *grad_prior_mean,
                      void *grad_prior_var, int threads) {
    Shape s = {n, c, length, groups, n / groups, (n / groups) * length, threads < 1 ? 1 : threads};
    if (is_double) {
        return step_backward_f64(&s, channels_last, x, gy, post_mean, rstd, a, d, p_used, grad_mean, grad_var,
                                 prior_stride, dx, grad_weight, grad_bias, grad_prior_mean, grad_prior_var);
    }
    return step_backward_f32(&s, channels_last, x, gy, post_mean, rstd, a, d, p_used, grad_mean, grad_var,
                             prior_stride, dx, grad_weight, grad_bias, grad_prior_mean, grad_prior_var);
}
