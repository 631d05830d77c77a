/* The per-channel O(C) work of Batch Kalman Normalization's CPU hot path, as one call each way.
 *
 * normlayers/ops/cfinalize.py compiles this file on first use (cc -O2 -shared) and calls it through
 * ctypes from normlayers/ops/torch_backend.py (_NchwPriorFn); the torch-ops finalize in that file is the same
 * arithmetic and the fallback. Background: docs/background/bkn.md. Tensors are contiguous (C,) or (N, C)
 * arrays of float32 or float64 (is_double); the arithmetic runs in double and rounds once on store.
 */
#include <math.h>
#include <stdint.h>

static inline double load(const void *base, int64_t i, int is_double) {
    return is_double ? ((const double *)base)[i] : (double)((const float *)base)[i];
}

/* Stores v rounded to the array's dtype and returns the stored value (what later reads see). */
static inline double store(void *base, int64_t i, double v, int is_double) {
    if (is_double) {
        ((double *)base)[i] = v;
        return v;
    }
    float f = (float)v;
    ((float *)base)[i] = f;
    return (double)f;
}

/* Forward finalize. Inputs: per-(sample, channel) means m and inverse deviations rstd_n (N, C) from
 * group norm with eps = 0; the prior (mu_P, var_P); gamma; the prior weight p; the guard ratio.
 * Batch moments by the law of total variance: mu_B = mean_n m, var_B = mean_n(1/rstd_n^2 + (m - mu_B)^2).
 * Guard: mean_c var_P / (var_B + eps) >= guard_ratio -> p = 0 (plain BN for this step).
 * Outputs (C,): mu_hat, var_hat (the mixture), r = 1/sqrt(var_hat + eps), d = mu_B - mu_P, a = r*gamma,
 * w_bn = (1 - p)*gamma; running buffers (optional, NULL to skip) get the EMA of (mu_hat, var_hat * M/(M-1)).
 * Returns the prior weight used (0 when the guard fired), or -1 when the prior has a NaN/inf or a
 * negative variance (nothing is written then; the caller raises).
 */
double bkn_forward_finalize(int is_double, int64_t n, int64_t c, const void *m, const void *rstd_n,
                            const void *prior_mean, const void *prior_var, const void *weight, double p,
                            double eps, double guard_ratio, void *running_mean, void *running_var,
                            double momentum, int64_t count, void *post_mean, void *post_var, void *rstd,
                            void *d, void *a, void *w_bn) {
    double ratio_sum = 0.0;
    for (int64_t j = 0; j < c; ++j) {
        double pm = load(prior_mean, j, is_double), pv = load(prior_var, j, is_double);
        if (!(pv >= 0.0) || isinf(pv) || !isfinite(pm)) {
            return -1.0;
        }
        double mu = 0.0, var = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            mu += load(m, i * c + j, is_double);
        }
        mu /= (double)n;
        for (int64_t i = 0; i < n; ++i) {
            double dev = load(m, i * c + j, is_double) - mu, r = load(rstd_n, i * c + j, is_double);
            var += dev * dev + 1.0 / (r * r); /* r = inf (a constant row) adds 0 */
        }
        var /= (double)n;
        /* batch moments parked in the outputs until the guard is known */
        mu = store(post_mean, j, mu, is_double);
        var = store(post_var, j, var, is_double);
        ratio_sum += pv / (var + eps);
    }
    if (ratio_sum / (double)c >= guard_ratio) {
        p = 0.0;
    }
    double q = 1.0 - p, unbias = count > 1 ? (double)count / (double)(count - 1) : 1.0;
    for (int64_t j = 0; j < c; ++j) {
        double mu = load(post_mean, j, is_double), var = load(post_var, j, is_double);
        double pm = load(prior_mean, j, is_double), dd = mu - pm;
        if (p > 0.0) { /* the mixture of N(mu_B, var_B) and N(mu_P, var_P) with weights q, p */
            var = store(post_var, j, q * var + p * load(prior_var, j, is_double) + p * q * dd * dd, is_double);
            mu = store(post_mean, j, q * mu + p * pm, is_double);
        }
        store(d, j, dd, is_double);
        double r = store(rstd, j, 1.0 / sqrt(var + eps), is_double), w = load(weight, j, is_double);
        store(a, j, r * w, is_double);
        store(w_bn, j, q * w, is_double);
        if (running_mean != 0) {
            store(running_mean, j, (1.0 - momentum) * load(running_mean, j, is_double) + momentum * mu, is_double);
            store(running_var, j, (1.0 - momentum) * load(running_var, j, is_double) + momentum * var * unbias,
                  is_double);
        }
    }
    return p;
}

/* Backward finalize: the prior's gradients from BN's reductions S1 = sum(g), S2 = sum(g * xh):
 * dvar_P = -p/2 * a*r * S2, dmu_P = -p * a * S1 - 2*(1 - p) * d * dvar_P (docs/background/bkn.md, "Backward in closed form"). */
void bkn_backward_finalize(int is_double, int64_t c, const void *s1, const void *s2, const void *a,
                           const void *rstd, const void *d, double p, void *grad_prior_mean, void *grad_prior_var) {
    double q = 1.0 - p;
    for (int64_t j = 0; j < c; ++j) {
        double aj = load(a, j, is_double);
        double dv = -0.5 * p * aj * load(rstd, j, is_double) * load(s2, j, is_double);
        store(grad_prior_var, j, dv, is_double);
        store(grad_prior_mean, j, -p * aj * load(s1, j, is_double) - 2.0 * q * load(d, j, is_double) * dv, is_double);
    }
}

/* Backward when the posterior has gradients of its own (in a chain, the next layer's prior was computed
 * from it): g_mean = dL/dmu_hat and g_var = dL/dvar_hat (NULL: zero), S1, S2 as above, M = count.
 * Gm = g_mean - a*S1, Gv = g_var - a*r*S2/2; dvar_P = p*Gv, dmu_P = p*Gm - 2*p*(1 - p)*d*Gv;
 * dx = a*g + k2*x + shift with k2 = 2*(1 - p)*Gv/M and shift = (1 - p)*(Gm - 2*Gv*mu_hat)/M
 * (k2 and shift written here, the two x-sized passes done by the caller). p = 0 (the guard fired)
 * gives BatchNorm's backward plus the posterior's terms, and zero prior gradients. */
void bkn_backward_chain_finalize(int is_double, int64_t c, int64_t count, const void *s1, const void *s2,
                                 const void *a, const void *rstd, const void *d, const void *post_mean,
                                 const void *grad_mean, const void *grad_var, double p, void *grad_prior_mean,
                                 void *grad_prior_var, void *k2, void *shift) {
    double q = 1.0 - p, q_m = q / (double)count;
    for (int64_t j = 0; j < c; ++j) {
        double aj = load(a, j, is_double);
        double gm = (grad_mean != 0 ? load(grad_mean, j, is_double) : 0.0) - aj * load(s1, j, is_double);
        double gv = (grad_var != 0 ? load(grad_var, j, is_double) : 0.0)
                    - 0.5 * aj * load(rstd, j, is_double) * load(s2, j, is_double);
        store(grad_prior_var, j, p * gv, is_double);
        store(grad_prior_mean, j, p * gm - 2.0 * p * q * load(d, j, is_double) * gv, is_double);
        store(k2, j, 2.0 * q_m * gv, is_double);
        store(shift, j, q_m * (gm - 2.0 * gv * load(post_mean, j, is_double)), is_double);
    }
}

/* Forward finalize of the grouped / channels-last hot path (_GroupedPriorFn): G ghost groups (G = 1 allowed).
 * Inputs: per-row moments m and s, (G*n, C), n rows per group (rows of equal element counts): with var_rows = 0
 * s is group norm's inverse deviation (eps = 0), with var_rows = 1 the biased variance (BN's statistics kernel).
 * Group k's moments by the law of total variance: mu_B = mean_i m, var_B = mean_i(var_i + (m_i - mu_B)^2).
 * The prior is (C,) shared by the groups (prior_stride = 0) or (G, C) (prior_stride = C). Guard on the ratios
 * var_P / (var_B + eps): with layer_guard = 1 one decision for all groups, mean over (G, C) >= guard_ratio;
 * with layer_guard = 0 one per group, mean over group k's channels >= guard_ratio. A group whose guard fired
 * gets p_k = 0, written to p_used[k] (doubles; it holds group k's ratio sum until the decision).
 * Outputs (G, C): mu_hat, var_hat, r, d, a = r*gamma; with expand > 0, per-row copies
 * (G*expand, C) of mu_hat (mean_rows), r (rstd_rows), a (scale_rows) and beta - mu_hat*a (shift_rows), each row
 * of group k repeated expand times (NULL pointers are skipped). Running buffers (NULL to skip): EMA of the
 * posterior averaged over the groups, variance times M/(M-1) (M = count). Returns the number of groups whose
 * guard fired, or -1 for a NaN/inf or negative variance in the prior (running buffers untouched then). */
double bkn_forward_finalize_grouped(int is_double, int var_rows, int64_t groups, int64_t n, int64_t c,
                                    const void *m, const void *s, const void *prior_mean, const void *prior_var,
                                    int64_t prior_stride, const void *weight, const void *bias, double p,
                                    double eps, double guard_ratio, int layer_guard, void *running_mean,
                                    void *running_var, double momentum, int64_t count, void *post_mean,
                                    void *post_var, void *rstd, void *d, void *a, double *p_used, int64_t expand,
                                    void *mean_rows, void *rstd_rows, void *scale_rows, void *shift_rows) {
    double layer_sum = 0.0;
    for (int64_t k = 0; k < groups; ++k) { /* batch moments (parked in the outputs) and each group's ratio sum */
        double ratio_sum = 0.0;
        for (int64_t j = 0; j < c; ++j) {
            double pm = load(prior_mean, k * prior_stride + j, is_double);
            double pv = load(prior_var, k * prior_stride + j, is_double);
            if (!(pv >= 0.0) || isinf(pv) || !isfinite(pm)) {
                return -1.0;
            }
            double mu = 0.0, var = 0.0;
            for (int64_t i = k * n; i < (k + 1) * n; ++i) {
                mu += load(m, i * c + j, is_double);
            }
            mu /= (double)n;
            for (int64_t i = k * n; i < (k + 1) * n; ++i) {
                double dev = load(m, i * c + j, is_double) - mu, v = load(s, i * c + j, is_double);
                var += dev * dev + (var_rows ? v : 1.0 / (v * v)); /* r = inf (a constant row) adds 0 */
            }
            var /= (double)n;
            store(post_mean, k * c + j, mu, is_double); /* batch moments parked until the guard is known */
            var = store(post_var, k * c + j, var, is_double);
            ratio_sum += pv / (var + eps);
        }
        p_used[k] = ratio_sum;
        layer_sum += ratio_sum;
    }
    int layer_fired = layer_sum / ((double)groups * (double)c) >= guard_ratio;
    int64_t fired = 0;
    for (int64_t k = 0; k < groups; ++k) { /* the guard, then the mixture */
        int fire = layer_guard ? layer_fired : p_used[k] / (double)c >= guard_ratio;
        double pk = fire ? 0.0 : p, q = 1.0 - pk;
        fired += pk == 0.0 && p > 0.0;
        p_used[k] = pk;
        for (int64_t j = 0; j < c; ++j) {
            int64_t o = k * c + j;
            double mu = load(post_mean, o, is_double), var = load(post_var, o, is_double);
            double pm = load(prior_mean, k * prior_stride + j, is_double), dd = mu - pm;
            if (pk > 0.0) {
                var = store(post_var, o, q * var + pk * load(prior_var, k * prior_stride + j, is_double)
                                             + pk * q * dd * dd, is_double);
                mu = store(post_mean, o, q * mu + pk * pm, is_double);
            }
            store(d, o, dd, is_double);
            double r = store(rstd, o, 1.0 / sqrt(var + eps), is_double), w = load(weight, j, is_double);
            double aj = store(a, o, r * w, is_double);
            double shift = load(bias, j, is_double) - mu * aj;
            for (int64_t e = 0; e < expand; ++e) {
                int64_t row = (k * expand + e) * c + j;
                if (mean_rows != 0) store(mean_rows, row, mu, is_double);
                if (rstd_rows != 0) store(rstd_rows, row, r, is_double);
                if (scale_rows != 0) store(scale_rows, row, aj, is_double);
                if (shift_rows != 0) store(shift_rows, row, shift, is_double);
            }
        }
    }
    if (running_mean != 0) {
        double unbias = count > 1 ? (double)count / (double)(count - 1) : 1.0;
        for (int64_t j = 0; j < c; ++j) {
            double mu = 0.0, var = 0.0;
            for (int64_t k = 0; k < groups; ++k) {
                mu += load(post_mean, k * c + j, is_double);
                var += load(post_var, k * c + j, is_double);
            }
            mu /= (double)groups;
            var /= (double)groups;
            store(running_mean, j, (1.0 - momentum) * load(running_mean, j, is_double) + momentum * mu, is_double);
            store(running_var, j, (1.0 - momentum) * load(running_var, j, is_double) + momentum * var * unbias,
                  is_double);
        }
    }
    return (double)fired;
}

/* Backward of the grouped / channels-last hot path. Inputs: BN's per-row reductions S1 = sum(g) and
 * S2 = sum(g * xh) (xh at the row's group statistics), (G*n, C), summed here over each group's n rows;
 * a, r, d, mu_hat (G, C) and p_used (G,) from the forward; the posterior's gradients g_mean, g_var (G, C)
 * (NULL: zero). Per group: Gm = g_mean - a*S1, Gv = g_var - a*r*S2/2, dvar_P = p*Gv,
 * dmu_P = p*Gm - 2*p*q*d*Gv, written (G, C) (prior_stride = C) or summed over the groups into (C,)
 * (prior_stride = 0); dgamma = sum_k S2, dbeta = sum_k S1 (C,) (NULL: skipped). With expand > 0 the
 * coefficients of dx = a*g + k2*x + shift, k2 = 2*q*Gv/M, shift = q*(Gm - 2*Gv*mu_hat)/M (M = count, elements
 * per channel per group), per row (G*expand, C) as in the forward. */
void bkn_backward_grouped(int is_double, int64_t groups, int64_t n, int64_t c, int64_t count, const void *s1,
                          const void *s2, const void *a, const void *rstd, const void *d, const void *post_mean,
                          const double *p_used, const void *grad_mean, const void *grad_var, int64_t prior_stride,
                          void *grad_prior_mean, void *grad_prior_var, void *grad_weight, void *grad_bias,
                          int64_t expand, void *k2_rows, void *shift_rows) {
    for (int64_t j = 0; j < c; ++j) {
        double sum_pm = 0.0, sum_pv = 0.0, sum_s1 = 0.0, sum_s2 = 0.0;
        for (int64_t k = 0; k < groups; ++k) {
            int64_t o = k * c + j;
            double t1 = 0.0, t2 = 0.0;
            for (int64_t i = k * n; i < (k + 1) * n; ++i) {
                t1 += load(s1, i * c + j, is_double);
                t2 += load(s2, i * c + j, is_double);
            }
            sum_s1 += t1;
            sum_s2 += t2;
            double pk = p_used[k], q = 1.0 - pk, aj = load(a, o, is_double);
            double gm = (grad_mean != 0 ? load(grad_mean, o, is_double) : 0.0) - aj * t1;
            double gv = (grad_var != 0 ? load(grad_var, o, is_double) : 0.0)
                        - 0.5 * aj * load(rstd, o, is_double) * t2;
            double dpv = pk * gv, dpm = pk * gm - 2.0 * pk * q * load(d, o, is_double) * gv;
            if (grad_prior_mean != 0) {
                if (prior_stride != 0) {
                    store(grad_prior_mean, o, dpm, is_double);
                    store(grad_prior_var, o, dpv, is_double);
                } else {
                    sum_pm += dpm;
                    sum_pv += dpv;
                }
            }
            double q_m = q / (double)count, k2 = 2.0 * q_m * gv;
            double shift = q_m * (gm - 2.0 * gv * load(post_mean, o, is_double));
            for (int64_t e = 0; e < expand; ++e) {
                int64_t row = (k * expand + e) * c + j;
                store(k2_rows, row, k2, is_double);
                store(shift_rows, row, shift, is_double);
            }
        }
        if (grad_prior_mean != 0 && prior_stride == 0) {
            store(grad_prior_mean, j, sum_pm, is_double);
            store(grad_prior_var, j, sum_pv, is_double);
        }
        if (grad_weight != 0) store(grad_weight, j, sum_s2, is_double);
        if (grad_bias != 0) store(grad_bias, j, sum_s1, is_double);
    }
}
