"""Triton kernels for Batch Kalman Normalization; imported lazily by :mod:`normlayers.ops.triton_backend`.

Indexing convention shared by every kernel: the input is viewed as ``(N, C, L)`` (``L`` = product of
the spatial sizes) with element strides ``(sN, sC, sL)``, so NCHW (``sL == 1``) and channels-last
(``sC == 1``) tensors are read in place. Ghost group ``k`` is samples ``[k*g, (k+1)*g)``; a channel's
slice in a group has ``M = g*L`` elements, indexed flat by ``m`` -> sample ``k*g + m // L``, position
``m % L``; ``L`` is a compile-time constant in the streaming kernels so that ``//`` and ``%`` become
multiply-shift sequences (one compiled variant per spatial size, a handful per network). Tiles are
``(BLOCK_C, BLOCK_M)``: channels by slice elements. Statistics are float32.
Grids are ``(cdiv(C, BLOCK_C), G)`` (one program per channel block and group, whole slice in
registers: single pass) or ``(cdiv(C, BLOCK_C), G, S)`` (slice split into ``S`` chunks of ``CHUNK``
elements). Cross-program results go through ``(G, C)`` / ``(G, C, S)`` fp32 buffers that are reduced
in a fixed order: no atomics anywhere, so results are bitwise reproducible.

The maths (docs/background/bkn.md; ``normlayers.reference`` is the executable spec): with ``p`` the prior weight,
``q = 1 - p``, ``d = mu_B - mu_P``:
``mu_hat = p*mu_P + q*mu_B``, ``var_hat = p*var_P + q*var_B + p*q*d**2``, ``r = 1/sqrt(var_hat + eps)``,
``y = x*a + b`` with ``a = gamma*r``, ``b = beta - mu_hat*a``.
"""

import triton
import triton.language as tl


@triton.jit
def _slice_offsets(k, cs, ms, g, L, sN, sC, sL):
    """Element offsets (BLOCK_C, BLOCK_M) of channels ``cs`` (BLOCK_C,) at slice indices ``ms`` (BLOCK_M,)."""
    n = k * g + ms // L  # (BLOCK_M,) sample index
    pos = ms % L  # (BLOCK_M,) flattened spatial position
    return n.to(tl.int64)[None, :] * sN + cs.to(tl.int64)[:, None] * sC + pos.to(tl.int64)[None, :] * sL


@triton.jit
def _finish_stats(
    k, cs, cmask, mean_b, m2_b, M,
    PM, PV,  # prior mean / var: row k at ``k * s_pg`` (s_pg = 0 when one (C,) prior is shared)
    MEAN_B, M2_B,  # (G, C) fp32 out: batch mean, sum of squared deviations
    POST_MEAN, POST_VAR, RSTD,  # (G, C) fp32 out: posterior candidate (the mixture) and its rstd
    RM, RV,  # (C,) running buffers (EMA in place when UPDATE_RUNNING; only used with G == 1)
    C, s_pg, p, q, pq, eps, momentum, momentum_var,
    USE_PRIOR: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
):
    """Per (group, channel) O(1) step after the reduction: posterior (no guard), rstd, optional EMA."""
    var_b = m2_b / M
    idx = k * C + cs  # (BLOCK_C,) row-major (G, C) index
    tl.store(MEAN_B + idx, mean_b, mask=cmask)
    tl.store(M2_B + idx, m2_b, mask=cmask)
    if USE_PRIOR:
        mu_p = tl.load(PM + k * s_pg + cs, mask=cmask, other=0.0).to(tl.float32)
        var_p = tl.load(PV + k * s_pg + cs, mask=cmask, other=1.0).to(tl.float32)
        d = mean_b - mu_p
        mu_hat = p * mu_p + q * mean_b
        var_hat = p * var_p + q * var_b + pq * d * d
    else:
        mu_hat = mean_b
        var_hat = var_b
    rstd = 1.0 / tl.sqrt_rn(var_hat + eps)
    tl.store(POST_MEAN + idx, mu_hat, mask=cmask)
    tl.store(POST_VAR + idx, var_hat, mask=cmask)
    tl.store(RSTD + idx, rstd, mask=cmask)
    if UPDATE_RUNNING:
        rm = tl.load(RM + cs, mask=cmask, other=0.0).to(tl.float32)
        rv = tl.load(RV + cs, mask=cmask, other=0.0).to(tl.float32)
        tl.store(RM + cs, rm * (1.0 - momentum) + momentum * mu_hat, mask=cmask)
        tl.store(RV + cs, rv * (1.0 - momentum) + momentum_var * var_hat, mask=cmask)
    return mu_hat, rstd


@triton.jit
def _affine(cs, cmask, mean, rstd, W, B, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """Per-channel scale/shift (BLOCK_C,) each: ``a = gamma*r``, ``b = beta - mean*a``."""
    a = rstd
    if HAS_W:
        a = a * tl.load(W + cs, mask=cmask, other=1.0).to(tl.float32)
    b = -mean * a
    if HAS_B:
        b = b + tl.load(B + cs, mask=cmask, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def _bkn_fwd_single_kernel(
    X,  # (N, C, L) input, strides (sN, sC, sL)
    Y,  # (N, C, L) output, same strides and dtype as X
    W, B,  # (C,) gamma / beta (read only when HAS_W / HAS_B)
    PM, PV,  # prior: (C,) with s_pg = 0, or (G, C) with s_pg = C
    MEAN_B, M2_B, POST_MEAN, POST_VAR, RSTD,  # (G, C) fp32 out
    RM, RV,  # (C,) running buffers
    C, L: tl.constexpr, g, sN, sC, sL, s_pg,
    p, q, pq, eps, momentum, momentum_var,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, USE_PRIOR: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One pass (read x once, write y once): whole (group, channel-block) slice held in registers."""
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    ms = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    M = g * L
    cmask = cs < C
    mask = cmask[:, None] & (ms < M)[None, :]  # (BLOCK_C, BLOCK_M)
    offs = _slice_offsets(k, cs, ms, g, L, sN, sC, sL)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean_b = tl.sum(x, axis=1) / M  # (BLOCK_C,)
    dev = tl.where(mask, x - mean_b[:, None], 0.0)
    m2_b = tl.sum(dev * dev, axis=1)  # two-pass in registers, never E[x^2] - E[x]^2
    mu_hat, rstd = _finish_stats(
        k, cs, cmask, mean_b, m2_b, M, PM, PV, MEAN_B, M2_B, POST_MEAN, POST_VAR, RSTD, RM, RV,
        C, s_pg, p, q, pq, eps, momentum, momentum_var, USE_PRIOR, UPDATE_RUNNING,
    )
    a, b = _affine(cs, cmask, mu_hat, rstd, W, B, HAS_W, HAS_B)
    y = x * a[:, None] + b[:, None]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bkn_fwd_partial_kernel(
    X,  # (N, C, L) input, strides (sN, sC, sL)
    PMEAN, PM2,  # (G, C, S) fp32 out: chunk mean and chunk sum of squared deviations
    C, L: tl.constexpr, g, sN, sC, sL, CHUNK, S,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Split reduction, pass 1: per-chunk mean/M2 (tile two-pass, tiles merged with Chan's formula)."""
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    s = tl.program_id(2)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    cmask = cs < C
    start = s * CHUNK
    stop = tl.minimum(start + CHUNK, g * L)
    acc_n = 0.0
    acc_mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(start, stop, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        mask = cmask[:, None] & (ms < stop)[None, :]  # (BLOCK_C, BLOCK_M)
        x = tl.load(X + _slice_offsets(k, cs, ms, g, L, sN, sC, sL), mask=mask, other=0.0).to(tl.float32)
        n_t = tl.minimum(stop - m0, BLOCK_M).to(tl.float32)
        t_mean = tl.sum(x, axis=1) / n_t
        dev = tl.where(mask, x - t_mean[:, None], 0.0)
        t_m2 = tl.sum(dev * dev, axis=1)
        n_new = acc_n + n_t
        delta = t_mean - acc_mean
        acc_mean = acc_mean + delta * (n_t / n_new)
        acc_m2 = acc_m2 + t_m2 + delta * delta * (acc_n * n_t / n_new)
        acc_n = n_new
    idx = (k * C + cs) * S + s  # (BLOCK_C,) row-major (G, C, S) index
    tl.store(PMEAN + idx, acc_mean, mask=cmask)
    tl.store(PM2 + idx, acc_m2, mask=cmask)


@triton.jit
def _bkn_fwd_combine_kernel(
    PMEAN, PM2,  # (G, C, S) fp32 chunk statistics from _bkn_fwd_partial_kernel
    PM, PV,  # prior: (C,) with s_pg = 0, or (G, C) with s_pg = C
    MEAN_B, M2_B, POST_MEAN, POST_VAR, RSTD,  # (G, C) fp32 out
    RM, RV,  # (C,) running buffers
    C, L, g, CHUNK, S, s_pg,
    p, q, pq, eps, momentum, momentum_var,
    USE_PRIOR: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split reduction, pass 2: merge the S chunks of each (group, channel) in a fixed order."""
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    ss = tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    cmask = cs < C
    smask = ss < S
    mask = cmask[:, None] & smask[None, :]  # (BLOCK_C, BLOCK_S)
    idx = (k * C + cs)[:, None] * S + ss[None, :]  # (BLOCK_C, BLOCK_S)
    pmean = tl.load(PMEAN + idx, mask=mask, other=0.0)
    pm2 = tl.load(PM2 + idx, mask=mask, other=0.0)
    M = g * L
    n_s = tl.where(smask, tl.minimum(M - ss * CHUNK, CHUNK), 0).to(tl.float32)  # (BLOCK_S,) chunk sizes
    mean_b = tl.sum(pmean * n_s[None, :], axis=1) / M  # (BLOCK_C,)
    dev = pmean - mean_b[:, None]
    m2_b = tl.sum(tl.where(mask, pm2 + n_s[None, :] * dev * dev, 0.0), axis=1)
    _finish_stats(
        k, cs, cmask, mean_b, m2_b, M, PM, PV, MEAN_B, M2_B, POST_MEAN, POST_VAR, RSTD, RM, RV,
        C, s_pg, p, q, pq, eps, momentum, momentum_var, USE_PRIOR, UPDATE_RUNNING,
    )


@triton.jit
def _group_ratio_sums(ks, kmask, M2_B, PV, C, M, s_pg, eps, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-group sums over the channels of ``var_P / (var_B + eps)``, (BLOCK_G,) for groups ``ks``."""
    ratio = tl.zeros((BLOCK_G,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
        mask = kmask[:, None] & (cs < C)[None, :]  # (BLOCK_G, BLOCK_C)
        var_b = tl.load(M2_B + ks[:, None] * C + cs[None, :], mask=mask, other=0.0) / M
        var_p = tl.load(PV + ks[:, None] * s_pg + cs[None, :], mask=mask, other=0.0).to(tl.float32)
        ratio += tl.sum(tl.where(mask, var_p / (var_b + eps), 0.0), axis=1)
    return ratio


@triton.jit
def _bkn_fwd_finalize_kernel(
    MEAN_B, M2_B,  # (G, C) fp32 batch statistics
    PV,  # prior var: (C,) with s_pg = 0, or (G, C) with s_pg = C
    POST_MEAN, POST_VAR, RSTD,  # (G, C) fp32, rewritten for groups whose guard fires
    FIRE,  # (G,) int32 out: 1 where the group fell back to plain BN
    RM, RV,  # (C,) running buffers, EMA of the posterior averaged over groups
    G, C, M, s_pg, guard_ratio, eps, momentum, momentum_var,
    GUARD: tl.constexpr, LAYER_GUARD: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Cross-channel / cross-group O(G*C) step, one program: the guard, then the running-stat EMA.

    ``LAYER_GUARD``: one switch for the layer (the ratio's mean over all groups and channels), else one
    switch per group (the mean over its channels)."""
    if GUARD:
        if LAYER_GUARD:
            total = 0.0
            for g0 in range(0, G, BLOCK_G):
                ks = g0 + tl.arange(0, BLOCK_G)  # (BLOCK_G,)
                total += tl.sum(_group_ratio_sums(ks, ks < G, M2_B, PV, C, M, s_pg, eps, BLOCK_G, BLOCK_C), axis=0)
            layer_ratio = total / (G * C)  # the mean over all groups and channels
        for g0 in range(0, G, BLOCK_G):
            ks = g0 + tl.arange(0, BLOCK_G)  # (BLOCK_G,)
            kmask = ks < G
            if LAYER_GUARD:  # (BLOCK_G,) the layer's one switch in every group
                fire = (tl.zeros((BLOCK_G,), dtype=tl.float32) + layer_ratio) >= guard_ratio
            else:
                ratio = _group_ratio_sums(ks, kmask, M2_B, PV, C, M, s_pg, eps, BLOCK_G, BLOCK_C)
                fire = (ratio / C) >= guard_ratio  # (BLOCK_G,) one switch per group
            tl.store(FIRE + ks, fire.to(tl.int32), mask=kmask)
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                fmask = (kmask & fire)[:, None] & (cs < C)[None, :]  # (BLOCK_G, BLOCK_C)
                idx = ks[:, None] * C + cs[None, :]
                mean_b = tl.load(MEAN_B + idx, mask=fmask, other=0.0)
                var_b = tl.load(M2_B + idx, mask=fmask, other=0.0) / M
                tl.store(POST_MEAN + idx, mean_b, mask=fmask)
                tl.store(POST_VAR + idx, var_b, mask=fmask)
                tl.store(RSTD + idx, 1.0 / tl.sqrt_rn(var_b + eps), mask=fmask)
    if UPDATE_RUNNING:
        for c0 in range(0, C, BLOCK_C):
            cs = c0 + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
            cmask = cs < C
            sum_mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
            sum_var = tl.zeros((BLOCK_C,), dtype=tl.float32)
            for g0 in range(0, G, BLOCK_G):
                ks = g0 + tl.arange(0, BLOCK_G)
                mask = (ks < G)[:, None] & cmask[None, :]  # (BLOCK_G, BLOCK_C)
                idx = ks[:, None] * C + cs[None, :]
                sum_mean += tl.sum(tl.load(POST_MEAN + idx, mask=mask, other=0.0), axis=0)
                sum_var += tl.sum(tl.load(POST_VAR + idx, mask=mask, other=0.0), axis=0)
            rm = tl.load(RM + cs, mask=cmask, other=0.0).to(tl.float32)
            rv = tl.load(RV + cs, mask=cmask, other=0.0).to(tl.float32)
            tl.store(RM + cs, rm * (1.0 - momentum) + momentum * (sum_mean / G), mask=cmask)
            tl.store(RV + cs, rv * (1.0 - momentum) + momentum_var * (sum_var / G), mask=cmask)


@triton.jit
def _bkn_fwd_normalize_kernel(
    X, Y,  # (N, C, L) input / output, strides (sN, sC, sL)
    MEAN,  # (G, C) posterior mean, or (C,) running mean with s_g = 0
    STAT2,  # like MEAN: rstd, or the variance when STAT2_IS_VAR (eval with running_var)
    W, B,  # (C,) gamma / beta
    FIRE,  # (G,) int32 guard flags (read only when ONLY_FIRED)
    C, L: tl.constexpr, g, sN, sC, sL, s_g, eps, CHUNK,
    STAT2_IS_VAR: tl.constexpr, ONLY_FIRED: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Elementwise ``y = x*a + b`` over chunk s of each (group, channel-block) slice."""
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    s = tl.program_id(2)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    cmask = cs < C
    mean = tl.load(MEAN + k * s_g + cs, mask=cmask, other=0.0).to(tl.float32)
    stat2 = tl.load(STAT2 + k * s_g + cs, mask=cmask, other=1.0).to(tl.float32)
    if STAT2_IS_VAR:
        rstd = 1.0 / tl.sqrt_rn(stat2 + eps)
    else:
        rstd = stat2
    a, b = _affine(cs, cmask, mean, rstd, W, B, HAS_W, HAS_B)
    start = s * CHUNK
    stop = tl.minimum(start + CHUNK, g * L)
    if ONLY_FIRED:  # fix-up after a speculative single pass: only groups whose guard fired
        stop = tl.where(tl.load(FIRE + k) != 0, stop, start)
    for m0 in range(start, stop, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        mask = cmask[:, None] & (ms < stop)[None, :]  # (BLOCK_C, BLOCK_M)
        offs = _slice_offsets(k, cs, ms, g, L, sN, sC, sL)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(Y + offs, (x * a[:, None] + b[:, None]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_coefs(
    k, cs, cmask, sum_dy, sum_dyxh, M,
    W,  # (C,) gamma
    PM,  # prior mean: (C,) with s_pg = 0, or (G, C) with s_pg = C
    MEAN_B, FIRE,  # (G, C) fp32 batch mean, (G,) int32 guard flags
    MEAN, STAT2,  # (G, C) or (C,) with s_g = 0: mu_hat and rstd (or var when STAT2_IS_VAR)
    DPOST_MEAN, DPOST_VAR,  # (G, C) fp32 upstream gradients into the posterior (when HAS_DPOST)
    DW_PART, DB_PART, DPM_PART, DPV_PART,  # (G, C) fp32 out: per-group dgamma, dbeta, dmu_P, dvar_P
    C, s_pg, s_g, p, q, pq, eps,
    HAS_W: tl.constexpr, USE_PRIOR: tl.constexpr, HAS_DPOST: tl.constexpr,
    STATS_FROM_X: tl.constexpr, STAT2_IS_VAR: tl.constexpr,
):
    """Backward finalize per (group, channel): returns ``dx = A*dy + c1 + c2*xh`` coefficients.

    h = gamma*dy, S1 = sum(h), S2 = sum(h*xh); total gradients into the posterior
    ``g_mu = dpost_mean - r*S1``, ``g_var = dpost_var - r**2*S2/2``; through the mixture
    ``g_muB = q*g_mu + 2*p*q*d*g_var``, ``g_varB = q*g_var``, ``dmu_P = p*g_mu - 2*p*q*d*g_var``,
    ``dvar_P = p*g_var``; then ``dx = r*h + (g_muB + 2*g_varB*(mu_hat - mu_B))/M + 2*g_varB/(M*r)*xh``.
    """
    idx = k * C + cs  # (BLOCK_C,)
    mu_hat = tl.load(MEAN + k * s_g + cs, mask=cmask, other=0.0).to(tl.float32)
    stat2 = tl.load(STAT2 + k * s_g + cs, mask=cmask, other=1.0).to(tl.float32)
    if STAT2_IS_VAR:
        r = 1.0 / tl.sqrt_rn(stat2 + eps)
    else:
        r = stat2
    gamma = tl.full((cs.shape[0],), 1.0, tl.float32)
    if HAS_W:
        gamma = tl.load(W + cs, mask=cmask, other=1.0).to(tl.float32)
    tl.store(DW_PART + idx, sum_dyxh, mask=cmask)
    tl.store(DB_PART + idx, sum_dy, mask=cmask)
    c1 = tl.zeros((cs.shape[0],), dtype=tl.float32)
    c2 = tl.zeros((cs.shape[0],), dtype=tl.float32)
    if STATS_FROM_X:
        s1 = gamma * sum_dy
        s2 = gamma * sum_dyxh
        g_mu = -r * s1
        g_var = -0.5 * r * r * s2
        if HAS_DPOST:
            g_mu += tl.load(DPOST_MEAN + idx, mask=cmask, other=0.0)
            g_var += tl.load(DPOST_VAR + idx, mask=cmask, other=0.0)
        if USE_PRIOR:
            fired = tl.load(FIRE + k) != 0
            pk = tl.where(fired, 0.0, p)
            qk = tl.where(fired, 1.0, q)
            pqk = tl.where(fired, 0.0, pq)
            mean_b = tl.load(MEAN_B + idx, mask=cmask, other=0.0)
            d = mean_b - tl.load(PM + k * s_pg + cs, mask=cmask, other=0.0).to(tl.float32)
            g_mu_b = qk * g_mu + 2.0 * pqk * d * g_var
            g_var_b = qk * g_var
            tl.store(DPM_PART + idx, pk * g_mu - 2.0 * pqk * d * g_var, mask=cmask)
            tl.store(DPV_PART + idx, pk * g_var, mask=cmask)
            c1 = (g_mu_b + 2.0 * g_var_b * (mu_hat - mean_b)) / M
        else:
            g_var_b = g_var
            c1 = g_mu / M
        c2 = 2.0 * g_var_b / (M * r)
    return r * gamma, c1, c2


@triton.jit
def _bkn_bwd_single_kernel(
    X, DY, DX,  # (N, C, L), strides (sN, sC, sL) for all three
    W, PM, MEAN_B, FIRE, MEAN, STAT2, DPOST_MEAN, DPOST_VAR,  # see _bwd_coefs
    DW_PART, DB_PART, DPM_PART, DPV_PART,  # (G, C) fp32 out
    C, L: tl.constexpr, g, sN, sC, sL, s_pg, s_g, p, q, pq, eps,
    HAS_DY: tl.constexpr, HAS_W: tl.constexpr, USE_PRIOR: tl.constexpr, HAS_DPOST: tl.constexpr,
    STATS_FROM_X: tl.constexpr, STAT2_IS_VAR: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """One pass (read x and dy once, write dx once): sums, finalize and dx for a slice in registers."""
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    ms = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    M = g * L
    cmask = cs < C
    mask = cmask[:, None] & (ms < M)[None, :]  # (BLOCK_C, BLOCK_M)
    offs = _slice_offsets(k, cs, ms, g, L, sN, sC, sL)
    mu_hat = tl.load(MEAN + k * s_g + cs, mask=cmask, other=0.0).to(tl.float32)
    stat2 = tl.load(STAT2 + k * s_g + cs, mask=cmask, other=1.0).to(tl.float32)
    if STAT2_IS_VAR:
        r = 1.0 / tl.sqrt_rn(stat2 + eps)
    else:
        r = stat2
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xh = tl.where(mask, (x - mu_hat[:, None]) * r[:, None], 0.0)  # recomputed, never stored
    if HAS_DY:
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        dy = tl.zeros((BLOCK_C, BLOCK_M), dtype=tl.float32)
    sum_dy = tl.sum(dy, axis=1)
    sum_dyxh = tl.sum(dy * xh, axis=1)
    coef_a, c1, c2 = _bwd_coefs(
        k, cs, cmask, sum_dy, sum_dyxh, M, W, PM, MEAN_B, FIRE, MEAN, STAT2, DPOST_MEAN, DPOST_VAR,
        DW_PART, DB_PART, DPM_PART, DPV_PART, C, s_pg, s_g, p, q, pq, eps,
        HAS_W, USE_PRIOR, HAS_DPOST, STATS_FROM_X, STAT2_IS_VAR,
    )
    dx = coef_a[:, None] * dy + c1[:, None] + c2[:, None] * xh
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _bkn_bwd_partial_kernel(
    X, DY,  # (N, C, L), strides (sN, sC, sL)
    MEAN, STAT2,  # mu_hat and rstd (or var), (G, C) or (C,) with s_g = 0
    P_DY, P_DYXH,  # (G, C, S) fp32 out: chunk sums of dy and dy*xh
    C, L: tl.constexpr, g, sN, sC, sL, s_g, eps, CHUNK, S,
    STAT2_IS_VAR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Split backward, pass 1: per-chunk sums of dy and dy*xh (xh recomputed from x)."""
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    s = tl.program_id(2)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    cmask = cs < C
    mu_hat = tl.load(MEAN + k * s_g + cs, mask=cmask, other=0.0).to(tl.float32)
    stat2 = tl.load(STAT2 + k * s_g + cs, mask=cmask, other=1.0).to(tl.float32)
    if STAT2_IS_VAR:
        r = 1.0 / tl.sqrt_rn(stat2 + eps)
    else:
        r = stat2
    start = s * CHUNK
    stop = tl.minimum(start + CHUNK, g * L)
    acc_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_dyxh = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(start, stop, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        mask = cmask[:, None] & (ms < stop)[None, :]  # (BLOCK_C, BLOCK_M)
        offs = _slice_offsets(k, cs, ms, g, L, sN, sC, sL)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        xh = tl.where(mask, (x - mu_hat[:, None]) * r[:, None], 0.0)
        acc_dy += tl.sum(dy, axis=1)
        acc_dyxh += tl.sum(dy * xh, axis=1)
    idx = (k * C + cs) * S + s  # (BLOCK_C,) row-major (G, C, S) index
    tl.store(P_DY + idx, acc_dy, mask=cmask)
    tl.store(P_DYXH + idx, acc_dyxh, mask=cmask)


@triton.jit
def _bkn_bwd_finalize_kernel(
    P_DY, P_DYXH,  # (G, C, S) fp32 chunk sums (zeros are never read when HAS_DY is False)
    W, PM, MEAN_B, FIRE, MEAN, STAT2, DPOST_MEAN, DPOST_VAR,  # see _bwd_coefs
    DW_PART, DB_PART, DPM_PART, DPV_PART,  # (G, C) fp32 out
    COEF_A, COEF_1, COEF_2,  # (G, C) fp32 out: dx = A*dy + c1 + c2*xh
    C, L, g, S, s_pg, s_g, p, q, pq, eps,
    HAS_DY: tl.constexpr, HAS_W: tl.constexpr, USE_PRIOR: tl.constexpr, HAS_DPOST: tl.constexpr,
    STATS_FROM_X: tl.constexpr, STAT2_IS_VAR: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Split backward, pass 2: reduce the S chunk sums in a fixed order and finalize."""
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    ss = tl.arange(0, BLOCK_S)  # (BLOCK_S,)
    cmask = cs < C
    mask = cmask[:, None] & (ss < S)[None, :]  # (BLOCK_C, BLOCK_S)
    idx = (k * C + cs)[:, None] * S + ss[None, :]  # (BLOCK_C, BLOCK_S)
    if HAS_DY:
        sum_dy = tl.sum(tl.load(P_DY + idx, mask=mask, other=0.0), axis=1)
        sum_dyxh = tl.sum(tl.load(P_DYXH + idx, mask=mask, other=0.0), axis=1)
    else:
        sum_dy = tl.zeros((BLOCK_C,), dtype=tl.float32)
        sum_dyxh = tl.zeros((BLOCK_C,), dtype=tl.float32)
    coef_a, c1, c2 = _bwd_coefs(
        k, cs, cmask, sum_dy, sum_dyxh, g * L, W, PM, MEAN_B, FIRE, MEAN, STAT2, DPOST_MEAN, DPOST_VAR,
        DW_PART, DB_PART, DPM_PART, DPV_PART, C, s_pg, s_g, p, q, pq, eps,
        HAS_W, USE_PRIOR, HAS_DPOST, STATS_FROM_X, STAT2_IS_VAR,
    )
    out = k * C + cs
    tl.store(COEF_A + out, coef_a, mask=cmask)
    tl.store(COEF_1 + out, c1, mask=cmask)
    tl.store(COEF_2 + out, c2, mask=cmask)


@triton.jit
def _bkn_bwd_dx_kernel(
    X, DY, DX,  # (N, C, L), strides (sN, sC, sL)
    MEAN, STAT2,  # mu_hat and rstd (or var), (G, C) or (C,) with s_g = 0
    COEF_A, COEF_1, COEF_2,  # (G, C) fp32 from _bkn_bwd_finalize_kernel
    C, L: tl.constexpr, g, sN, sC, sL, s_g, eps, CHUNK,
    HAS_DY: tl.constexpr, STAT2_IS_VAR: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Split backward, pass 3: elementwise ``dx = A*dy + c1 + c2*xh``."""
    pid_c = tl.program_id(0)
    k = tl.program_id(1)
    s = tl.program_id(2)
    cs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    cmask = cs < C
    mu_hat = tl.load(MEAN + k * s_g + cs, mask=cmask, other=0.0).to(tl.float32)
    stat2 = tl.load(STAT2 + k * s_g + cs, mask=cmask, other=1.0).to(tl.float32)
    if STAT2_IS_VAR:
        r = 1.0 / tl.sqrt_rn(stat2 + eps)
    else:
        r = stat2
    coef_a = tl.load(COEF_A + k * C + cs, mask=cmask, other=0.0)
    c1 = tl.load(COEF_1 + k * C + cs, mask=cmask, other=0.0)
    c2 = tl.load(COEF_2 + k * C + cs, mask=cmask, other=0.0)
    start = s * CHUNK
    stop = tl.minimum(start + CHUNK, g * L)
    for m0 in range(start, stop, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        mask = cmask[:, None] & (ms < stop)[None, :]  # (BLOCK_C, BLOCK_M)
        offs = _slice_offsets(k, cs, ms, g, L, sN, sC, sL)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        xh = (x - mu_hat[:, None]) * r[:, None]
        dx = c1[:, None] + c2[:, None] * xh
        if HAS_DY:
            dx += coef_a[:, None] * tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
