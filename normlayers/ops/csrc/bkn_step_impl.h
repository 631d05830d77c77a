/* The body of bkn_step.c for one element type: included once with SCALAR = float (SUFFIX f32) and once with
 * SCALAR = double (SUFFIX f64). Not a public header. */

#define STEP_CAT2(a, b) a##_##b
#define STEP_CAT(a, b) STEP_CAT2(a, b)
#define FN(name) STEP_CAT(name, SUFFIX)

/* v rounded to SCALAR, as a double (what a later read of the stored value sees) */
static inline double FN(rounded)(double v) { return (double)(SCALAR)v; }

/* The x-sized loops, each over one thread's channels [j0, j1) of every (group, sample, position), compiled for several
 * instruction sets (CLONES) and picked at load time. Sums run in SCALAR vectors over at most CHUNK elements (NCHW
 * rows) or CL_CHUNK positions (channels-last, VLEN channels per block) and are added into double after each chunk:
 * float32 vector speed, double accuracy over M elements. */

typedef SCALAR FN(vec) __attribute__((vector_size(64))); /* 16 floats or 8 doubles; split by the compiler */
#define VEC FN(vec)
#define VLEN ((int64_t)(64 / sizeof(SCALAR)))

/* an unaligned vector load (a macro: a function returning a wide vector is an ABI question for the compiler) */
#define VLOAD(p) ({                    \
    VEC v_;                             \
    memcpy(&v_, (p), sizeof v_);        \
    v_;                                 \
})

/* s1 += the lanes of a1, s2 += those of a2, in double (a macro, like VLOAD; copied out: indexing the vectors would
 * keep them in memory) */
#define ADD_LANES(a1, a2, s1, s2)                  \
    do {                                           \
        SCALAR l1_[VLEN], l2_[VLEN];               \
        memcpy(l1_, &(a1), sizeof l1_);            \
        memcpy(l2_, &(a2), sizeof l2_);            \
        for (int64_t l_ = 0; l_ < VLEN; ++l_) {    \
            (s1) += (double)l1_[l_];               \
            (s2) += (double)l2_[l_];               \
        }                                          \
    } while (0)

/* sum(x - s), sum((x - s)^2) of one contiguous row, in double (chunked SCALAR vector partial sums) */
ALWAYS_INLINE static inline void FN(row_moments)(const SCALAR *restrict xr, int64_t len, SCALAR sh, double *out1, double *out2) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t i0 = 0; i0 < len; i0 += CHUNK) {
        int64_t i1 = i0 + CHUNK < len ? i0 + CHUNK : len, i = i0;
        VEC a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};
        for (; i + 2 * VLEN <= i1; i += 2 * VLEN) {
            VEC v = VLOAD(xr + i) - sh, w = VLOAD(xr + i + VLEN) - sh;
            a1 += v;
            a2 += v * v;
            b1 += w;
            b2 += w * w;
        }
        a1 += b1;
        a2 += b2;
        for (; i < i1; ++i) { /* (no element writes to the vectors: they would live in memory) */
            SCALAR v = xr[i] - sh;
            s1 += (double)v;
            s2 += (double)(v * v);
        }
        ADD_LANES(a1, a2, s1, s2);
    }
    *out1 += s1;
    *out2 += s2;
}

/* sum(g), sum(g*(x - mu)) of one contiguous row, in double */
ALWAYS_INLINE static inline void FN(row_grad_sums)(const SCALAR *restrict xr, const SCALAR *restrict gr, int64_t len, SCALAR mu,
                                     double *out1, double *out2) {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t i0 = 0; i0 < len; i0 += CHUNK) {
        int64_t i1 = i0 + CHUNK < len ? i0 + CHUNK : len, i = i0;
        VEC a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};
        for (; i + 2 * VLEN <= i1; i += 2 * VLEN) {
            VEC g0 = VLOAD(gr + i), g1 = VLOAD(gr + i + VLEN);
            a1 += g0;
            a2 += g0 * (VLOAD(xr + i) - mu);
            b1 += g1;
            b2 += g1 * (VLOAD(xr + i + VLEN) - mu);
        }
        a1 += b1;
        a2 += b2;
        for (; i < i1; ++i) {
            s1 += (double)gr[i];
            s2 += (double)(gr[i] * (xr[i] - mu));
        }
        ADD_LANES(a1, a2, s1, s2);
    }
    *out1 += s1;
    *out2 += s2;
}

/* NCHW, channels [j0, j1): sum1/sum2 (G, C) = sum over the group's rows of sum(x - s), sum((x - s)^2), s = shift
 * (G, C); with gy: sum(g), sum(g*(x - mu)), mu = shift (the posterior mean) */
CLONES static void FN(nchw_sums)(const SCALAR *restrict x, const SCALAR *restrict gy, int64_t len, int64_t c,
                                 int64_t groups, int64_t per_group, int64_t j0, int64_t j1,
                                 const SCALAR *restrict shift, double *restrict sum1, double *restrict sum2) {
    for (int64_t k = 0; k < groups; ++k) {
        for (int64_t j = j0; j < j1; ++j) {
            sum1[k * c + j] = 0.0;
            sum2[k * c + j] = 0.0;
        }
        for (int64_t i = k * per_group; i < (k + 1) * per_group; ++i) { /* rows in memory order */
            for (int64_t j = j0; j < j1; ++j) {
                int64_t o = k * c + j, row = (i * c + j) * len;
                if (gy == 0) {
                    FN(row_moments)(x + row, len, shift[o], &sum1[o], &sum2[o]);
                } else {
                    FN(row_grad_sums)(x + row, gy + row, len, shift[o], &sum1[o], &sum2[o]);
                }
            }
        }
    }
}

/* channels-last, channels [j0, j1) (j0 a multiple of VLEN): the same sums over the group's positions in [r0, r1)
 * (group k owns positions [k*span, (k+1)*span); a thread's share of the rows); blocks of VLEN channels keep their partial sums in registers over up to CL_CHUNK
 * positions, the channels past the last full block use a small scratch */
CLONES static void FN(cl_sums)(const SCALAR *restrict x, const SCALAR *restrict gy, int64_t c, int64_t groups,
                               int64_t span, int64_t j0, int64_t j1, int64_t r0, int64_t r1,
                               const SCALAR *restrict shift, double *restrict sum1, double *restrict sum2) {
    int64_t full = j0 + (j1 - j0) / VLEN * VLEN;
    for (int64_t k = 0; k < groups; ++k) {
        double *restrict s1 = sum1 + k * c, *restrict s2 = sum2 + k * c;
        const SCALAR *restrict sh = shift + k * c;
        for (int64_t j = j0; j < j1; ++j) {
            s1[j] = 0.0;
            s2[j] = 0.0;
        }
        int64_t lo = k * span > r0 ? k * span : r0, hi = (k + 1) * span < r1 ? (k + 1) * span : r1;
        for (int64_t pos = lo; pos < hi; pos += CL_CHUNK) {
            int64_t stop = pos + CL_CHUNK < hi ? pos + CL_CHUNK : hi;
            /* the next chunk's bytes, fetched a slice per column block (the first chunk: all of it, now) */
            int64_t next = (stop + CL_CHUNK < hi ? stop + CL_CHUNK : hi) - stop, ahead = next * c * (int64_t)sizeof(SCALAR);
            int64_t blocks = (full - j0) / VLEN > 0 ? (full - j0) / VLEN : 1, block = 0;
            if (pos == lo) {
                PREFETCH_RANGE(x + pos * c, 0, (stop - pos) * c * (int64_t)sizeof(SCALAR), 0);
                if (gy != 0) PREFETCH_RANGE(gy + pos * c, 0, (stop - pos) * c * (int64_t)sizeof(SCALAR), 0);
            }
            for (int64_t j = j0; j < full; j += VLEN, ++block) {
                PREFETCH_RANGE(x + stop * c, ahead * block / blocks, ahead * (block + 1) / blocks, 0);
                if (gy != 0) PREFETCH_RANGE(gy + stop * c, ahead * block / blocks, ahead * (block + 1) / blocks, 0);
                VEC shv = VLOAD(sh + j), a1 = {0}, a2 = {0}, b1 = {0}, b2 = {0};
                int64_t q = pos;
                if (gy == 0) {
                    for (; q + 1 < stop; q += 2) {
                        VEC v = VLOAD(x + q * c + j) - shv, w = VLOAD(x + (q + 1) * c + j) - shv;
                        a1 += v;
                        a2 += v * v;
                        b1 += w;
                        b2 += w * w;
                    }
                    if (q < stop) {
                        VEC v = VLOAD(x + q * c + j) - shv;
                        a1 += v;
                        a2 += v * v;
                    }
                } else {
                    for (; q + 1 < stop; q += 2) {
                        VEC g0 = VLOAD(gy + q * c + j), g1 = VLOAD(gy + (q + 1) * c + j);
                        a1 += g0;
                        a2 += g0 * (VLOAD(x + q * c + j) - shv);
                        b1 += g1;
                        b2 += g1 * (VLOAD(x + (q + 1) * c + j) - shv);
                    }
                    if (q < stop) {
                        VEC g0 = VLOAD(gy + q * c + j);
                        a1 += g0;
                        a2 += g0 * (VLOAD(x + q * c + j) - shv);
                    }
                }
                a1 += b1;
                a2 += b2;
                SCALAR l1[VLEN], l2[VLEN]; /* (copied out: indexing the vectors would keep them in memory) */
                memcpy(l1, &a1, sizeof l1);
                memcpy(l2, &a2, sizeof l2);
                for (int64_t l = 0; l < VLEN; ++l) {
                    s1[j + l] += (double)l1[l];
                    s2[j + l] += (double)l2[l];
                }
            }
            if (full < j1) {
                SCALAR t1[VLEN] = {0}, t2[VLEN] = {0};
                for (int64_t q = pos; q < stop; ++q) {
                    for (int64_t j = full; j < j1; ++j) {
                        SCALAR v = x[q * c + j] - sh[j];
                        if (gy == 0) {
                            t1[j - full] += v;
                            t2[j - full] += v * v;
                        } else {
                            t1[j - full] += gy[q * c + j];
                            t2[j - full] += gy[q * c + j] * v;
                        }
                    }
                }
                for (int64_t j = full; j < j1; ++j) {
                    s1[j] += (double)t1[j - full];
                    s2[j] += (double)t2[j - full];
                }
            }
        }
    }
}

/* NCHW, channels [j0, j1): out = x*p0 + p1 (p2 == NULL), else gy*p0 + p1*(x - p2) + p3 (gy NULL: no first term),
 * coefficients p_i (G, C) */
CLONES static void FN(nchw_affine)(const SCALAR *restrict x, const SCALAR *restrict gy, int64_t len, int64_t c,
                                   int64_t n, int64_t per_group, int64_t j0, int64_t j1, const SCALAR *restrict p0,
                                   const SCALAR *restrict p1, const SCALAR *restrict p2, const SCALAR *restrict p3,
                                   SCALAR *restrict out) {
    for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = j0; j < j1; ++j) {
            int64_t o = (i / per_group) * c + j, row = (i * c + j) * len;
            const SCALAR *restrict xr = x + row;
            SCALAR *restrict yr = out + row;
            SCALAR a = p0[o], b = p1[o];
            if (p2 == 0) {
                for (int64_t e = 0; e < len; ++e) {
                    yr[e] = xr[e] * a + b;
                }
            } else if (gy == 0) {
                SCALAR mu = p2[o], k0 = p3[o];
                for (int64_t e = 0; e < len; ++e) {
                    yr[e] = b * (xr[e] - mu) + k0;
                }
            } else {
                const SCALAR *restrict gr = gy + row;
                SCALAR mu = p2[o], k0 = p3[o];
                for (int64_t e = 0; e < len; ++e) {
                    yr[e] = a * gr[e] + b * (xr[e] - mu) + k0;
                }
            }
        }
    }
}

/* channels-last, channels [j0, j1): the same per position in [r0, r1) (group k owns positions [k*span, (k+1)*span));
 * blocks of VLEN channels keep their coefficients in registers */
CLONES static void FN(cl_affine)(const SCALAR *restrict x, const SCALAR *restrict gy, int64_t c, int64_t groups,
                                 int64_t span, int64_t j0, int64_t j1, int64_t r0, int64_t r1,
                                 const SCALAR *restrict p0, const SCALAR *restrict p1, const SCALAR *restrict p2,
                                 const SCALAR *restrict p3, SCALAR *restrict out) {
    int64_t full = j0 + (j1 - j0) / VLEN * VLEN;
    for (int64_t k = 0; k < groups; ++k) {
        int64_t o = k * c;
        int64_t lo = k * span > r0 ? k * span : r0, hi = (k + 1) * span < r1 ? (k + 1) * span : r1;
        for (int64_t pos = lo; pos < hi; pos += CL_CHUNK) {
            int64_t stop = pos + CL_CHUNK < hi ? pos + CL_CHUNK : hi;
            int64_t next = (stop + CL_CHUNK < hi ? stop + CL_CHUNK : hi) - stop, ahead = next * c * (int64_t)sizeof(SCALAR);
            int64_t blocks = (full - j0) / VLEN > 0 ? (full - j0) / VLEN : 1, block = 0;
            if (pos == lo) { /* as in cl_sums; the output for writing */
                int64_t now = (stop - pos) * c * (int64_t)sizeof(SCALAR);
                PREFETCH_RANGE(x + pos * c, 0, now, 0);
                if (gy != 0) PREFETCH_RANGE(gy + pos * c, 0, now, 0);
                PREFETCH_RANGE(out + pos * c, 0, now, 1);
            }
            for (int64_t j = j0; j < full; j += VLEN, ++block) {
                int64_t from = ahead * block / blocks, to = ahead * (block + 1) / blocks;
                PREFETCH_RANGE(x + stop * c, from, to, 0);
                if (gy != 0) PREFETCH_RANGE(gy + stop * c, from, to, 0);
                PREFETCH_RANGE(out + stop * c, from, to, 1);
                VEC a = VLOAD(p0 + o + j), b = VLOAD(p1 + o + j);
                if (p2 == 0) {
                    for (int64_t q = pos; q < stop; ++q) {
                        VEC r = VLOAD(x + q * c + j) * a + b;
                        memcpy(out + q * c + j, &r, sizeof r);
                    }
                } else if (gy == 0) {
                    VEC mu = VLOAD(p2 + o + j), k0 = VLOAD(p3 + o + j);
                    for (int64_t q = pos; q < stop; ++q) {
                        VEC r = b * (VLOAD(x + q * c + j) - mu) + k0;
                        memcpy(out + q * c + j, &r, sizeof r);
                    }
                } else {
                    VEC mu = VLOAD(p2 + o + j), k0 = VLOAD(p3 + o + j);
                    for (int64_t q = pos; q < stop; ++q) {
                        VEC r = a * VLOAD(gy + q * c + j) + b * (VLOAD(x + q * c + j) - mu) + k0;
                        memcpy(out + q * c + j, &r, sizeof r);
                    }
                }
            }
            for (int64_t q = pos; q < stop && full < j1; ++q) {
                for (int64_t j = full; j < j1; ++j) {
                    SCALAR xv = x[q * c + j];
                    if (p2 == 0) {
                        out[q * c + j] = xv * p0[o + j] + p1[o + j];
                    } else {
                        SCALAR r = p1[o + j] * (xv - p2[o + j]) + p3[o + j];
                        out[q * c + j] = gy != 0 ? p0[o + j] * gy[q * c + j] + r : r;
                    }
                }
            }
        }
    }
}

/* sums (2, G, C) for channels [j0, j1) of every group: the team's partial sums (team x (2, G, C)) added in thread
 * order (deterministic for a given thread count) */
static void FN(combine)(const double *part, int team, int64_t gc, int64_t c, int64_t groups, int64_t j0, int64_t j1,
                        double *sums) {
    for (int64_t h = 0; h < 2 * groups; ++h) { /* h: (sum, group) */
        for (int64_t j = j0; j < j1; ++j) {
            double v = 0.0;
            for (int u = 0; u < team; ++u) {
                v += part[2 * gc * u + h * c + j];
            }
            sums[h * c + j] = v;
        }
    }
}

/* this thread's channels: [j0, j1), in units of VLEN channels for channels-last (no cache line shared by two
 * threads' writes when rows are aligned) */
static void FN(channel_range)(int64_t c, int channels_last, int team, int t, int64_t *j0, int64_t *j1) {
    int64_t unit = channels_last ? VLEN : 1, units = (c + unit - 1) / unit;
    int64_t u0, u1;
    split(units, team, t, &u0, &u1);
    *j0 = u0 * unit < c ? u0 * unit : c;
    *j1 = u1 * unit < c ? u1 * unit : c;
}

static double FN(step_forward)(const Shape *s, int channels_last, const void *xv, const void *wv, const void *bv,
                               const void *pmv, const void *pvv, int64_t prior_stride, double p, double eps,
                               double guard_ratio, int layer_guard, void *rmv, void *rvv, double momentum, void *yv,
                               void *meanv, void *varv, void *rstdv, void *dv, void *av, double *p_used) {
    const SCALAR *x = (const SCALAR *)xv, *weight = (const SCALAR *)wv, *bias = (const SCALAR *)bv;
    const SCALAR *prior_mean = (const SCALAR *)pmv, *prior_var = (const SCALAR *)pvv;
    SCALAR *y = (SCALAR *)yv, *post_mean = (SCALAR *)meanv, *post_var = (SCALAR *)varv, *rstd = (SCALAR *)rstdv;
    SCALAR *d = (SCALAR *)dv, *a = (SCALAR *)av, *running_mean = (SCALAR *)rmv, *running_var = (SCALAR *)rvv;
    int64_t n = s->n, c = s->c, len = s->length, g = s->per_group, groups = s->groups, gc = groups * c;
    int threads = s->threads;
    /* double: the sums (2*G*C) and each thread's per-group ratio sums; SCALAR: shift, then a and beta - mu_hat*a */
    /* channels-last: each thread's partial sums over its rows too (2*G*C per thread) */
    size_t partials = channels_last ? 2 * (size_t)gc * (size_t)threads : 0;
    double *sums = (double *)malloc(sizeof(double) * (2 * (size_t)gc + (size_t)threads * (size_t)groups + partials));
    SCALAR *work = (SCALAR *)malloc(sizeof(SCALAR) * 3 * (size_t)gc);
    if (sums == 0 || work == 0) {
        free(sums);
        free(work);
        return -2.0;
    }
    double *ratio = sums + 2 * gc, *part = ratio + (size_t)threads * (size_t)groups;
    SCALAR *shift = work, *coef = work + gc;
    for (int64_t k = 0; k < groups; ++k) { /* the group's first element of each channel */
        for (int64_t j = 0; j < c; ++j) {
            shift[k * c + j] = channels_last ? x[k * g * len * c + j] : x[(k * g * c + j) * len];
        }
    }
    double count = (double)s->count, unbias = s->count > 1 ? count / (count - 1.0) : 1.0;
    int64_t fired = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = thread_id(), team = team_size();
        int64_t j0, j1;
        FN(channel_range)(c, channels_last, team, t, &j0, &j1);
        int64_t r0 = 0, r1 = 0;
        if (channels_last) { /* rows split between the threads (contiguous memory), partial sums combined per channel */
            split(n * len, team, t, &r0, &r1);
            FN(cl_sums)(x, 0, c, groups, g * len, 0, c, r0, r1, shift, part + 2 * gc * t, part + 2 * gc * t + gc);
#pragma omp barrier
            FN(combine)(part, team, gc, c, groups, j0, j1, sums);
        } else {
            FN(nchw_sums)(x, 0, len, c, groups, g, j0, j1, shift, sums, sums + gc);
        }
        for (int64_t k = 0; k < groups; ++k) { /* batch moments (parked in the outputs), this thread's ratio sums */
            double ratio_sum = 0.0;
            for (int64_t j = j0; j < j1; ++j) {
                int64_t o = k * c + j;
                double dm = sums[o] / count, var = sums[gc + o] / count - dm * dm;
                post_mean[o] = (SCALAR)((double)shift[o] + dm);
                var = FN(rounded)(var > 0.0 ? var : 0.0);
                post_var[o] = (SCALAR)var;
                ratio_sum += (double)prior_var[k * prior_stride + j] / (var + eps);
            }
            ratio[t * groups + k] = ratio_sum;
        }
#pragma omp barrier
        /* the guard: every thread takes the same decisions from the same sums */
        double layer_sum = 0.0;
        for (int64_t k = 0; k < groups; ++k) {
            for (int u = 0; u < team; ++u) {
                layer_sum += ratio[u * groups + k];
            }
        }
        int layer_fired = layer_sum / ((double)groups * (double)c) >= guard_ratio;
        int64_t fired_here = 0;
        for (int64_t k = 0; k < groups; ++k) { /* the mixture, r, d, a and the normalize's coefficients */
            double group_sum = 0.0;
            for (int u = 0; u < team; ++u) {
                group_sum += ratio[u * groups + k];
            }
            int fire = layer_guard ? layer_fired : group_sum / (double)c >= guard_ratio;
            double pk = fire ? 0.0 : p, q = 1.0 - pk;
            fired_here += pk == 0.0 && p > 0.0;
            if (t == 0) {
                p_used[k] = pk;
            }
            for (int64_t j = j0; j < j1; ++j) {
                int64_t o = k * c + j;
                double mu = (double)post_mean[o], var = (double)post_var[o];
                double pm = (double)prior_mean[k * prior_stride + j], dd = mu - pm;
                if (pk > 0.0) {
                    var = FN(rounded)(q * var + pk * (double)prior_var[k * prior_stride + j] + pk * q * dd * dd);
                    mu = FN(rounded)(q * mu + pk * pm);
                    post_var[o] = (SCALAR)var;
                    post_mean[o] = (SCALAR)mu;
                }
                d[o] = (SCALAR)dd;
                double r = FN(rounded)(1.0 / sqrt(var + eps));
                rstd[o] = (SCALAR)r;
                double aj = FN(rounded)(r * (double)weight[j]);
                a[o] = (SCALAR)aj;
                coef[o] = (SCALAR)aj;
                coef[gc + o] = (SCALAR)((double)bias[j] - mu * aj);
            }
        }
        if (t == 0) {
            fired = fired_here;
        }
        if (running_mean != 0) { /* EMA of the posterior averaged over the groups, variance times M/(M-1) */
            for (int64_t j = j0; j < j1; ++j) {
                double mu = 0.0, var = 0.0;
                for (int64_t k = 0; k < groups; ++k) {
                    mu += (double)post_mean[k * c + j];
                    var += (double)post_var[k * c + j];
                }
                mu /= (double)groups;
                var /= (double)groups;
                running_mean[j] = (SCALAR)((1.0 - momentum) * (double)running_mean[j] + momentum * mu);
                running_var[j] = (SCALAR)((1.0 - momentum) * (double)running_var[j] + momentum * var * unbias);
            }
        }
        if (channels_last) { /* y = x*a + (beta - mu_hat*a), by rows: every channel's coefficients first */
#pragma omp barrier
            FN(cl_affine)(x, 0, c, groups, g * len, 0, c, r0, r1, coef, coef + gc, 0, 0, y);
        } else {
            FN(nchw_affine)(x, 0, len, c, n, g, j0, j1, coef, coef + gc, 0, 0, y);
        }
    }
    free(sums);
    free(work);
    return (double)fired;
}

static int FN(step_backward)(const Shape *s, int channels_last, const void *xv, const void *gyv, const void *meanv,
                             const void *rstdv, const void *av, const void *dv, const double *p_used,
                             const void *gmv, const void *gvv, int64_t prior_stride, void *dxv, void *gwv, void *gbv,
                             void *gpmv, void *gpvv) {
    const SCALAR *x = (const SCALAR *)xv, *gy = (const SCALAR *)gyv, *mean = (const SCALAR *)meanv;
    const SCALAR *rstd = (const SCALAR *)rstdv, *a = (const SCALAR *)av, *d = (const SCALAR *)dv;
    const SCALAR *grad_mean = (const SCALAR *)gmv, *grad_var = (const SCALAR *)gvv;
    SCALAR *dx = (SCALAR *)dxv, *grad_weight = (SCALAR *)gwv, *grad_bias = (SCALAR *)gbv;
    SCALAR *grad_prior_mean = (SCALAR *)gpmv, *grad_prior_var = (SCALAR *)gpvv;
    int64_t n = s->n, c = s->c, len = s->length, g = s->per_group, groups = s->groups, gc = groups * c;
    int threads = s->threads;
    size_t partials = channels_last ? 2 * (size_t)gc * (size_t)threads : 0; /* per-thread row sums */
    double *sums = (double *)malloc(sizeof(double) * (2 * (size_t)gc + partials)), *part = sums + 2 * gc;
    SCALAR *coef = (SCALAR *)malloc(sizeof(SCALAR) * 3 * (size_t)gc); /* a, k2, k0 */
    if (sums == 0 || coef == 0) {
        free(sums);
        free(coef);
        return -2;
    }
    double count = (double)s->count;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = thread_id(), team = team_size();
        int64_t j0, j1;
        FN(channel_range)(c, channels_last, team, t, &j0, &j1);
        int64_t r0 = 0, r1 = 0;
        if (channels_last) {
            split(n * len, team, t, &r0, &r1);
        }
        if (gy != 0 && channels_last) {
            FN(cl_sums)(x, gy, c, groups, g * len, 0, c, r0, r1, mean, part + 2 * gc * t, part + 2 * gc * t + gc);
#pragma omp barrier
            FN(combine)(part, team, gc, c, groups, j0, j1, sums);
        } else if (gy != 0) {
            FN(nchw_sums)(x, gy, len, c, groups, g, j0, j1, mean, sums, sums + gc);
        }
        for (int64_t j = j0; j < j1; ++j) { /* per channel: the closed form's terms, summed over the groups */
            double sum_pm = 0.0, sum_pv = 0.0, sum_s1 = 0.0, sum_s2 = 0.0;
            for (int64_t k = 0; k < groups; ++k) {
                int64_t o = k * c + j;
                double r = (double)rstd[o], aj = (double)a[o];
                double t1 = gy != 0 ? sums[o] : 0.0, t2 = gy != 0 ? sums[gc + o] * r : 0.0; /* S1, S2 */
                sum_s1 += t1;
                sum_s2 += t2;
                double pk = p_used[k], q = 1.0 - pk;
                double gm = (grad_mean != 0 ? (double)grad_mean[o] : 0.0) - aj * t1;
                double gv = (grad_var != 0 ? (double)grad_var[o] : 0.0) - 0.5 * aj * r * t2;
                double dpv = pk * gv, dpm = pk * gm - 2.0 * pk * q * (double)d[o] * gv;
                if (prior_stride != 0) {
                    if (grad_prior_mean != 0) grad_prior_mean[o] = (SCALAR)dpm;
                    if (grad_prior_var != 0) grad_prior_var[o] = (SCALAR)dpv;
                } else {
                    sum_pm += dpm;
                    sum_pv += dpv;
                }
                coef[o] = (SCALAR)aj;
                coef[gc + o] = (SCALAR)(2.0 * q * gv / count);
                coef[2 * gc + o] = (SCALAR)(q * gm / count);
            }
            if (prior_stride == 0) {
                if (grad_prior_mean != 0) grad_prior_mean[j] = (SCALAR)sum_pm;
                if (grad_prior_var != 0) grad_prior_var[j] = (SCALAR)sum_pv;
            }
            if (grad_weight != 0) grad_weight[j] = (SCALAR)sum_s2;
            if (grad_bias != 0) grad_bias[j] = (SCALAR)sum_s1;
        }
        if (dx != 0 && channels_last) { /* dx = a*g + k2*(x - mu_hat) + k0, by rows: every channel's terms first */
#pragma omp barrier
            FN(cl_affine)(x, gy, c, groups, g * len, 0, c, r0, r1, coef, coef + gc, mean, coef + 2 * gc, dx);
        } else if (dx != 0) {
            FN(nchw_affine)(x, gy, len, c, n, g, j0, j1, coef, coef + gc, mean, coef + 2 * gc, dx);
        }
    }
    free(sums);
    free(coef);
    return 0;
}

#undef ADD_LANES
#undef VLEN
#undef VEC
#undef FN
#undef STEP_CAT
#undef STEP_CAT2
