"""Fast torch path of BKN training: an autograd.Function with the closed-form backward.

Forward: batch moments (see ``_batch_moments``), an O(G*C) finalize (guard, mixture), one fused
normalize pass. Backward: BN's two per-channel reductions S1 = sum(g), S2 = sum(g*xh)
(``aten.native_batch_norm_backward`` with only the weight/bias grads requested), O(G*C) work,
then ``dx = A*g + B*x + D`` per channel in two elementwise passes. The posterior (mean, var) is a
differentiable output; its gradients add to dx and to the prior (see /work/shared/docs/bkn.md,
"Backward", extended with d mu_B/dx = 1/M and d var_B/dx = 2 (x - mu_B)/M).

With ``dL/dmu_hat = gm - r*S1h`` =: Gm and ``dL/dvar_hat = gv - r**2*S2h/2`` =: Gv
(``S1h = gamma*S1``, ``S2h = gamma*S2``, ``r = rsqrt(var_hat + eps)``, ``q = 1 - p``):

    dx     = r*gamma*g + q*Gm/M + 2*q*Gv*(x - mu_hat)/M     (the cross terms cancel)
    dmu_P  = p*Gm - 2*p*q*(mu_B - mu_P)*Gv
    dvar_P = p*Gv

A group whose guard fires uses p = 0 (plain BN; zero gradient to its prior).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from normlayers.reference import stats_dtype

__all__ = ["bkn_train"]


def _grouped(t: Tensor, groups: int) -> Tensor:
    """(N, C, *) -> (G, N // G, C, L); a view for NCHW-contiguous and channels-last tensors."""
    n, c = t.shape[0], t.shape[1]
    return t.reshape(groups, n // groups, c, -1)  # (N, C, *) -> (G, g, C, L)


def _bcast(v: Tensor) -> Tensor:
    """(G, C) -> (G, 1, C, 1): broadcast a per-group, per-channel value over (G, g, C, L)."""
    return v[:, None, :, None]


_GROUP_NORM_MIN_NUMEL = 1 << 15  # below this, per-op overhead dominates and BN's kernel is cheaper


def _batch_moments(xs: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Biased per-group, per-channel moments ``(mu_B, var_B)``, each (G, C).

    NCHW-contiguous (and not tiny): per-(sample, channel) moments from ``native_group_norm`` with
    one group per channel (a vectorized Welford row reduction; eps=0 so ``var = rstd**-2`` inverts
    it), combined over each ghost group with the law of total variance. Otherwise (channels-last,
    tiny, ...): ``torch.batch_norm_update_stats``, BN's own two-pass kernel, once per ghost group.
    Both are several times faster than ``torch.var_mean`` on CPU.
    """
    n, c = xs.shape[0], xs.shape[1]
    length = math.prod(xs.shape[2:])
    if xs.is_contiguous() and length > 1 and xs.numel() >= _GROUP_NORM_MIN_NUMEL:
        _, m, rstd = torch.ops.aten.native_group_norm(xs, None, None, n, c, length, c, 0.0)
        m = m.view(groups, n // groups, c)  # (N, C) -> (G, g, C)
        v = rstd.pow(-2).view(groups, n // groups, c)  # (N, C) -> (G, g, C)
        mu = m.mean(dim=1)
        dev = m - mu[:, None]
        return mu, torch.addcmul(v, dev, dev).mean(dim=1)  # E[var_n] + Var[mu_n]
    if groups == 1:
        mu, var = torch.batch_norm_update_stats(xs, None, None, 0.0)
        return mu[None], var[None]  # (C,) -> (1, C)
    moments = [torch.batch_norm_update_stats(part, None, None, 0.0) for part in xs.chunk(groups, dim=0)]
    return torch.stack([mv[0] for mv in moments]), torch.stack([mv[1] for mv in moments])  # G x (C,) -> (G, C)


class _BatchKalmanNormFn(torch.autograd.Function):
    """(x, gamma, beta, mu_P, var_P) -> (y, mu_hat, var_hat); statistics of shape (G, C).

    Written with few, fused torch ops: at CIFAR sizes the per-op overhead is comparable to the
    memory-bound passes.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        prior_mean: Tensor | None,
        prior_var: Tensor | None,
        p: float,
        eps: float,
        guard_ratio: float,
        groups: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        sdt = stats_dtype(x.dtype)
        xs = x if x.dtype == sdt else x.to(sdt)
        mu_b, var_b = _batch_moments(xs, groups)  # (G, C) each

        pe = pqd = None
        if prior_mean is not None and prior_var is not None:
            ratio = (prior_var / (var_b + eps)).mean(dim=1, keepdim=True)  # (G, 1): one guard per group
            keep = ratio.lt(guard_ratio).to(sdt)  # (G, 1): 1, or 0 where the guard fires
            pe = keep * p  # effective prior weight
            d = mu_b - prior_mean
            pqd = d * (keep * (p * (1.0 - p)))  # p*q*(mu_B - mu_P), (G, C)
            post_mean = torch.lerp(mu_b, prior_mean, pe)  # p*mu_P + q*mu_B
            post_var = torch.lerp(var_b, prior_var, pe).addcmul_(pqd, d)
        else:
            post_mean, post_var = mu_b, var_b
        rstd = (post_var + eps).rsqrt_()  # (G, C)

        w = weight if weight is None or weight.dtype == sdt else weight.to(sdt)
        b = bias if bias is None or bias.dtype == sdt else bias.to(sdt)
        if groups == 1 and xs is x:  # torch's fused per-channel affine pass
            y = torch.batch_norm(x, w, b, post_mean.view(-1), post_var.view(-1), False, 0.0, eps, False)
        else:
            a = rstd if w is None else rstd * w  # (G, C)
            shift = -post_mean * a if b is None else torch.addcmul(b, post_mean, a, value=-1.0)
            y = torch.addcmul(_bcast(shift), _grouped(xs, groups), _bcast(a)).reshape(x.shape).to(x.dtype)

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, post_mean, rstd, pe, pqd)
        ctx.eps, ctx.groups = eps, groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.prior_shared = prior_mean is not None and prior_mean.dim() == 1
        return y, post_mean, post_var

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, gm: Tensor | None, gv: Tensor | None):  # type: ignore[override]
        x, weight, post_mean, rstd, pe, pqd = ctx.saved_tensors
        groups: int = ctx.groups
        sdt = stats_dtype(x.dtype)
        xs = x if x.dtype == sdt else x.to(sdt)
        w = weight if weight is None or weight.dtype == sdt else weight.to(sdt)
        gys = gy if gy is None or gy.dtype == sdt else gy.to(sdt)
        need_dx = ctx.needs_input_grad[0]
        dx = s1 = s2 = None

        if gys is not None and groups == 1:
            plain_bn = pe is None and gm is None and gv is None  # torch's fused backward does everything
            dx, s2, s1 = torch.ops.aten.native_batch_norm_backward(
                gys, xs, w, None, None, post_mean.view(-1), rstd.view(-1), True, ctx.eps,
                [need_dx and plain_bn, True, True],
            )  # S1 = sum(g), S2 = sum(g * xh), each (C,)
            need_dx = need_dx and not plain_bn
        elif gys is not None:
            gyg = _grouped(gys, groups)  # (G, g, C, L)
            s1 = gyg.sum(dim=(1, 3))
            s2 = ((_grouped(xs, groups) - _bcast(post_mean)) * gyg).sum(dim=(1, 3)).mul_(rstd)

        # Gm = dL/dmu_hat = gm - a*S1 and Gv = dL/dvar_hat = gv - a*r*S2/2 (a = r*gamma), each (G, C)
        a = rstd if w is None else rstd * w
        if s1 is None:
            g_mean, g_var = torch.zeros_like(rstd), torch.zeros_like(rstd)
        else:
            g_mean = torch.mul(a, s1).neg_() if gm is None else torch.addcmul(gm, a, s1, value=-1.0)
            g_var = torch.mul(a * rstd, s2).mul_(-0.5) if gv is None else torch.addcmul(gv, a * rstd, s2, value=-0.5)
        if s1 is None and gm is not None:
            g_mean = g_mean + gm
        if s1 is None and gv is not None:
            g_var = g_var + gv

        if need_dx:  # dx = a*g + k2*x + shift with k2 = 2q*Gv/M, shift = q*(Gm - 2*Gv*mu_hat)/M
            m = (x.shape[0] // groups) * math.prod(x.shape[2:])
            q_m = 1.0 / m if pe is None else (1.0 - pe) / m  # (1 - p) / M
            k2 = g_var * (2.0 * q_m)  # (G, C)
            shift = torch.addcmul(g_mean, g_var, post_mean, value=-2.0).mul_(q_m)
            if groups == 1 and gys is not None:
                shape = (-1,) + (1,) * (x.dim() - 2)  # (1, C) -> (C, 1, ..., 1) to broadcast over (N, C, *)
                if gys.is_contiguous():  # NCHW: torch's fused per-channel affine (eval BN, eps=0) is vectorized
                    ones = torch.ones_like(a).view(-1)
                    dx = torch.batch_norm(gys, a.view(-1), shift.view(-1), ones - 1.0, ones, False, 0.0, 0.0, False)
                else:
                    dx = torch.addcmul(shift.view(shape), gys, a.view(shape))
                dx.addcmul_(xs, k2.view(shape))
            else:
                dx = torch.addcmul(_bcast(shift), _grouped(xs, groups), _bcast(k2))
                if gys is not None:
                    dx.addcmul_(_grouped(gys, groups), _bcast(a))
                dx = dx.reshape(x.shape)
        if dx is not None and dx.dtype != x.dtype:
            dx = dx.to(x.dtype)

        dweight = dbias = None
        if weight is not None and s2 is not None and ctx.needs_input_grad[1]:
            dweight = s2 if s2.dim() == 1 else s2.sum(dim=0)  # (G, C) -> (C,)
            dweight = dweight if dweight.dtype == weight.dtype else dweight.to(weight.dtype)
        if ctx.bias_dtype is not None and s1 is not None and ctx.needs_input_grad[2]:
            dbias = s1 if s1.dim() == 1 else s1.sum(dim=0)  # (G, C) -> (C,)
            dbias = dbias if dbias.dtype == ctx.bias_dtype else dbias.to(ctx.bias_dtype)

        dpm = dpv = None
        if pe is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            dpv = pe * g_var  # p * Gv
            dpm = torch.addcmul(pe * g_mean, pqd, g_var, value=-2.0)  # p*Gm - 2*p*q*d*Gv
            if ctx.prior_shared:  # a (C,) prior used by every group: (G, C) -> (C,)
                dpm, dpv = dpm.sum(dim=0), dpv.sum(dim=0)
        return dx, dweight, dbias, dpm, dpv, None, None, None, None


def bkn_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    prior: tuple[Tensor, Tensor] | None,
    prior_weight: float,
    eps: float,
    guard_ratio: float,
    group_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BKN through the closed-form Function; ``(y, post_mean (G, C), post_var (G, C))``."""
    groups = 1 if group_size is None else x.shape[0] // int(group_size)
    prior_mean = prior_var = None
    if prior is not None and prior_weight > 0.0:
        sdt = stats_dtype(x.dtype)
        prior_mean, prior_var = prior  # (C,) or (G, C), broadcast over groups
        if prior_mean.dtype != sdt or prior_var.dtype != sdt:
            prior_mean, prior_var = prior_mean.to(sdt), prior_var.to(sdt)
    return _BatchKalmanNormFn.apply(
        x, weight, bias, prior_mean, prior_var, float(prior_weight), float(eps), float(guard_ratio), groups
    )
