"""Fast torch path of BKN training: an autograd.Function with the closed-form backward.

Forward: batch moments (see ``_batch_moments``), the prior checks and the guard (one host sync,
see ``_guarded_weight``), an O(G*C) finalize (mixture), one fused normalize pass. Backward: BN's two
per-channel reductions S1 = sum(g), S2 = sum(g*xh) (``aten.native_batch_norm_backward`` with only
the weight/bias grads requested), O(G*C) work, then ``dx = A*g + B*x + D`` per channel in two
elementwise passes. The posterior (mean, var) is a differentiable output; its gradients add to dx
and to the prior (see /work/shared/docs/bkn.md, "Backward", extended with d mu_B/dx = 1/M and
d var_B/dx = 2 (x - mu_B)/M).

With ``dL/dmu_hat = gm - r*S1h`` =: Gm and ``dL/dvar_hat = gv - r**2*S2h/2`` =: Gv
(``S1h = gamma*S1``, ``S2h = gamma*S2``, ``r = rsqrt(var_hat + eps)``, ``q = 1 - p``):

    dx     = r*gamma*g + q*Gm/M + 2*q*Gv*(x - mu_hat)/M     (the cross terms cancel)
    dmu_P  = p*Gm - 2*p*q*(mu_B - mu_P)*Gv
    dvar_P = p*Gv

A group whose guard fires uses p = 0 (plain BN; zero gradient to its prior).

Per-call cost matters as much as bandwidth at CIFAR sizes (a small torch op costs ~1-2 us, about
what BatchNorm2d's whole step takes per 1000 channels), so the effective prior weight is a Python
float whenever every ghost group agrees on the guard (always when ungrouped): the finalize then
needs a handful of ops with scalar arguments instead of tensor arithmetic on weights.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from normlayers.reference import stats_dtype

__all__ = ["bkn_train", "check_prior_values"]

PriorWeight = float | Tensor  # a float for the whole layer, or (G, 1) per ghost group


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
        _, m, rstd = torch.native_group_norm(xs, None, None, n, c, length, c, 0.0)  # (N, C) each
        var_n = rstd.pow(-2)
        if groups == 1:  # mean and biased variance of the N sample means: BN's statistics kernel on (N, C)
            mu, var_m = torch.batch_norm_update_stats(m, None, None, 0.0)
            return mu[None], torch.add(var_m, var_n.sum(dim=0), alpha=1.0 / n)[None]  # (C,) -> (1, C)
        m = m.view(groups, n // groups, c)  # (N, C) -> (G, g, C)
        mu = m.mean(dim=1)
        dev = m - mu[:, None]
        return mu, torch.addcmul(var_n.view(groups, n // groups, c), dev, dev).mean(dim=1)  # E[var_n] + Var[mu_n]
    if groups == 1:
        mu, var = torch.batch_norm_update_stats(xs, None, None, 0.0)
        return mu[None], var[None]  # (C,) -> (1, C)
    moments = [torch.batch_norm_update_stats(part, None, None, 0.0) for part in xs.chunk(groups, dim=0)]
    return torch.stack([mv[0] for mv in moments]), torch.stack([mv[1] for mv in moments])  # G x (C,) -> (G, C)


def check_prior_values(mean: Tensor, var: Tensor) -> None:
    """Raise ``ValueError`` for NaN/inf in the prior or a negative prior variance (exact checks)."""
    mean, var = mean.detach(), var.detach()
    if not bool(torch.isfinite(mean).all()):
        raise ValueError("prior mean contains NaN or inf")
    if not bool(torch.isfinite(var).all()):
        raise ValueError("prior var contains NaN or inf")
    if bool((var < 0).any()):
        raise ValueError(f"prior var must be non-negative (min {float(var.min()):.4g})")


def _guarded_weight(prior_mean: Tensor, prior_var: Tensor, var_b: Tensor, p: float, eps: float,
                    guard_ratio: float, check: bool) -> PriorWeight:
    """The prior weight after the guard (0 where ``mean_c(var_P / (var_B + eps)) >= guard_ratio``).

    A float when every ghost group agrees, else a (G, 1) tensor. With ``check``, the prior's values
    are validated in the same host sync (skipped, like the float, inside ``torch.compile`` graphs).
    """
    channels = var_b.shape[1]
    ratio_sum = torch.div(prior_var, var_b.add(eps)).sum(dim=1)  # (G,): C * the guard ratio of each group
    if torch.compiler.is_compiling():  # no host sync inside a graph: per-group tensor weights
        fire = ratio_sum / channels >= guard_ratio
        return torch.where(fire, 0.0, p).to(var_b.dtype)[:, None]  # (G,) -> (G, 1)
    if check:
        # probe: NaN if the mean has NaN/inf, else min(var_P); +inf in var_P makes its group's ratio +inf
        probe = torch.add(prior_var, prior_mean, alpha=0.0).amin()
        values = torch.cat((probe.view(1), ratio_sum)).tolist()
        sums = values[1:]
        if not (values[0] >= 0.0 and all(math.isfinite(s) for s in sums)):
            check_prior_values(prior_mean, prior_var)  # raises, unless only a ratio overflowed
    else:
        sums = ratio_sum.tolist()
    fired = [s / channels >= guard_ratio for s in sums]
    if not any(fired):
        return p
    if all(fired):
        return 0.0
    return torch.tensor([0.0 if f else p for f in fired], dtype=var_b.dtype, device=var_b.device)[:, None]


_native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward.default


def _update_running(post_mean: Tensor, post_var: Tensor, running_mean: Tensor, running_var: Tensor,
                    momentum: float, count: int) -> None:
    """In-place EMA of the grad-free posterior, the arithmetic of ``update_running_stats_reference``."""
    if post_mean.shape[0] == 1:
        pm, pv = post_mean.view(-1), post_var.view(-1)  # (1, C) -> (C,)
    else:
        pm, pv = post_mean.mean(dim=0), post_var.mean(dim=0)  # (G, C) -> (C,)
    pv = pv * (count / (count - 1) if count > 1 else 1.0)
    if pm.dtype != running_mean.dtype:
        pm, pv = pm.to(running_mean.dtype), pv.to(running_var.dtype)
    running_mean.lerp_(pm, momentum)
    running_var.lerp_(pv, momentum)


class _BatchKalmanNormFn(torch.autograd.Function):
    """(x, gamma, beta, mu_P, var_P) -> (y, mu_hat, var_hat); statistics of shape (G, C).

    Written with few, fused torch ops: at CIFAR sizes the per-op overhead is comparable to the
    memory-bound passes. ``running`` = (running_mean, running_var, momentum, M) updates BN-style
    buffers in the forward (statistics are grad-free there), as ``update_running_stats_reference``.
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
        check_prior: bool,
        running: tuple[Tensor, Tensor, float, int] | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        sdt = stats_dtype(x.dtype)
        xs = x if x.dtype == sdt else x.to(sdt)
        mu_b, var_b = _batch_moments(xs, groups)  # (G, C) each

        pe: PriorWeight = 0.0
        if prior_mean is not None and prior_var is not None:
            pe = _guarded_weight(prior_mean, prior_var, var_b, p, eps, guard_ratio, check_prior)
        d = None
        if isinstance(pe, Tensor) or pe > 0.0:
            d = mu_b - prior_mean  # (G, C)
            post_mean = torch.lerp(mu_b, prior_mean, pe)  # p*mu_P + q*mu_B
            post_var = torch.lerp(var_b, prior_var, pe)  # ... + p*q*d**2, the spread of the mixture
            if isinstance(pe, Tensor):
                post_var.addcmul_(d * (pe * (1.0 - pe)), d)
            else:
                post_var.addcmul_(d, d, value=pe * (1.0 - pe))
        else:
            post_mean, post_var = mu_b, var_b
        if running is not None:
            _update_running(post_mean, post_var, *running)
        rstd = torch.rsqrt(post_var + eps)  # (G, C)

        w = weight if weight is None or weight.dtype == sdt else weight.to(sdt)
        b = bias if bias is None or bias.dtype == sdt else bias.to(sdt)
        if groups == 1 and xs is x and x.is_contiguous():  # NCHW: torch's fused eval-BN pass is vectorized
            y = torch.native_batch_norm(x, w, b, post_mean.view(-1), post_var.view(-1), False, 0.0, eps)[0]
        else:  # channels-last (where a broadcast addcmul beats eval-BN), ghost groups, low precision
            a = rstd if w is None else rstd * w  # (G, C)
            shift = -post_mean * a if b is None else torch.addcmul(b, post_mean, a, value=-1.0)
            y = torch.addcmul(_bcast(shift), _grouped(xs, groups), _bcast(a)).reshape(x.shape).to(x.dtype)

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, post_mean, rstd, d, pe if isinstance(pe, Tensor) else None)
        ctx.pe, ctx.eps, ctx.groups = (pe if isinstance(pe, float) else None), eps, groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.prior_shared = prior_mean is not None and prior_mean.dim() == 1
        return y, post_mean, post_var

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, gm: Tensor | None, gv: Tensor | None):  # type: ignore[override]
        x, weight, post_mean, rstd, d, pe_tensor = ctx.saved_tensors
        pe: PriorWeight = ctx.pe if pe_tensor is None else pe_tensor
        groups: int = ctx.groups
        sdt = rstd.dtype
        xs = x if x.dtype == sdt else x.to(sdt)
        w = weight if weight is None or weight.dtype == sdt else weight.to(sdt)
        gys = gy if gy is None or gy.dtype == sdt else gy.to(sdt)
        need_dx = ctx.needs_input_grad[0]
        shape = (-1,) + (1,) * (x.dim() - 2)  # (1, C) -> (C, 1, ..., 1) to broadcast over (N, C, *)
        dx = s1 = s2 = None

        a = rstd if w is None else rstd * w  # (G, C): r * gamma
        if gys is not None and groups == 1:
            # Without posterior gradients, dx = q*BN_dx(g) + p*a*g: BN's fused backward with weight
            # q*gamma, plus one pass. Vectorized for NCHW only; channels-last uses the two passes below.
            fused = need_dx and gm is None and gv is None and (d is None or gys.is_contiguous())
            wq = w
            if fused and d is not None:
                wq = (rstd.new_ones(rstd.shape[1]) if w is None else w) * (1.0 - pe)
                wq = wq.view(-1)  # (1, C) when the weight is a (1, 1) tensor -> (C,)
            dx, s2, s1 = _native_batch_norm_backward(
                gys, xs, wq, None, None, post_mean.view(-1), rstd.view(-1), True, ctx.eps, [fused, True, True],
            )  # S1 = sum(g), S2 = sum(g * xh), each (C,)
            if fused and d is not None:
                if isinstance(pe, Tensor):
                    dx.addcmul_(gys, (a * pe).view(shape))
                else:
                    dx.addcmul_(gys, a.view(shape), value=pe)
            need_dx = need_dx and not fused
        elif gys is not None:
            gyg = _grouped(gys, groups)  # (G, g, C, L)
            s1 = gyg.sum(dim=(1, 3))
            s2 = ((_grouped(xs, groups) - _bcast(post_mean)) * gyg).sum(dim=(1, 3)).mul_(rstd)

        need_prior = d is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        g_mean = g_var = None
        if need_dx or need_prior:  # Gm = dL/dmu_hat = gm - a*S1 and Gv = dL/dvar_hat = gv - a*r*S2/2, (G, C)
            if s1 is None:
                g_mean = torch.zeros_like(rstd) if gm is None else gm
                g_var = torch.zeros_like(rstd) if gv is None else gv
            else:
                ar = a * rstd
                g_mean = torch.mul(a, s1).neg_() if gm is None else torch.addcmul(gm, a, s1, value=-1.0)
                g_var = torch.mul(ar, s2).mul_(-0.5) if gv is None else torch.addcmul(gv, ar, s2, value=-0.5)

        if need_dx:  # dx = a*g + k2*x + shift with k2 = 2q*Gv/M, shift = q*(Gm - 2*Gv*mu_hat)/M
            m = (x.shape[0] // groups) * math.prod(x.shape[2:])
            q_m = (1.0 - pe) / m  # (1 - p) / M: a float, or (G, 1)
            k2 = g_var * (2.0 * q_m)  # (G, C)
            shift = torch.addcmul(g_mean, g_var, post_mean, value=-2.0).mul_(q_m)
            if groups == 1 and gys is not None:
                if gys.is_contiguous():  # NCHW: torch's fused per-channel affine (eval BN, eps=0) is vectorized
                    zeros = torch.zeros_like(a).view(-1)
                    dx = torch.native_batch_norm(gys, a.view(-1), shift.view(-1), zeros, zeros + 1.0, False, 0.0,
                                                 0.0)[0]
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
        if need_prior:  # dvar_P = p*Gv, dmu_P = p*Gm - 2*p*q*d*Gv
            if isinstance(pe, Tensor):
                dpv = pe * g_var
                dpm = torch.addcmul(pe * g_mean, d * (pe * (1.0 - pe)), g_var, value=-2.0)
            else:
                dpv = g_var * pe
                dpm = torch.addcmul(g_mean * pe, d, g_var, value=-2.0 * pe * (1.0 - pe))
        elif ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:  # every group's guard fired: plain BN
            dpm = dpv = torch.zeros_like(rstd)
        if dpm is not None and ctx.prior_shared:  # a (C,) prior used by every group: (G, C) -> (C,)
            dpm, dpv = (dpm.view(-1), dpv.view(-1)) if groups == 1 else (dpm.sum(dim=0), dpv.sum(dim=0))
        return dx, dweight, dbias, dpm, dpv, None, None, None, None, None, None


def bkn_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    prior: tuple[Tensor, Tensor] | None,
    prior_weight: float,
    eps: float,
    guard_ratio: float,
    group_size: int | None,
    *,
    check_prior: bool = True,
    running: tuple[Tensor, Tensor, float, int] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BKN through the closed-form Function; ``(y, post_mean (G, C), post_var (G, C))``.

    ``check_prior``: raise ``ValueError`` for NaN/inf prior values or a negative prior variance
    (checked in the guard's host sync; skipped inside ``torch.compile`` graphs).
    ``running``: ``(running_mean, running_var, momentum, M)`` to update in place, as
    :func:`normlayers.reference.update_running_stats_reference` does.
    """
    groups = 1 if group_size is None else x.shape[0] // int(group_size)
    prior_mean = prior_var = None
    if prior is not None and prior_weight > 0.0:
        sdt = stats_dtype(x.dtype)
        prior_mean, prior_var = prior  # (C,) or (G, C), broadcast over groups
        if prior_mean.dtype != sdt or prior_var.dtype != sdt:
            prior_mean, prior_var = prior_mean.to(sdt), prior_var.to(sdt)
    return _BatchKalmanNormFn.apply(
        x, weight, bias, prior_mean, prior_var, float(prior_weight), float(eps), float(guard_ratio), groups,
        check_prior, running,
    )
