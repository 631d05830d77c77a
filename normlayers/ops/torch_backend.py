"""Fast torch path of BKN training: an autograd.Function with the closed-form backward.

Forward: batch moments (see ``_batch_moments``), the prior checks and the guard in one host sync
(``_guarded_weight``), an O(G*C) finalize (mixture), one fused normalize pass. Backward: BN's two
per-channel reductions S1 = sum(g), S2 = sum(g*xh) (``aten.native_batch_norm_backward``), O(G*C)
work, then ``dx = A*g + B*x + D`` per channel. The posterior (mean, var) is a differentiable
output; its gradients add to dx and to the prior (see docs/background/bkn.md, "Backward in closed form",
extended with d mu_B/dx = 1/M and d var_B/dx = 2 (x - mu_B)/M).

With ``dL/dmu_hat = gm - r*S1h`` =: Gm and ``dL/dvar_hat = gv - r**2*S2h/2`` =: Gv
(``S1h = gamma*S1``, ``S2h = gamma*S2``, ``r = rsqrt(var_hat + eps)``, ``q = 1 - p``):

    dx     = r*gamma*g + q*Gm/M + 2*q*Gv*(x - mu_hat)/M     (the cross terms cancel)
    dmu_P  = p*Gm - 2*p*q*(mu_B - mu_P)*Gv
    dvar_P = p*Gv

A group whose guard fires uses p = 0 (plain BN; zero gradient to its prior); the guard is one decision for
all ghost groups (``guard_scope="layer"``, the default) or one per group (``"group"``). Without posterior
gradients (gm = gv = 0) dx is ``q * BN_dx(g) + p*r*gamma*g`` with BN_dx BN's training backward at
(mu_hat, r): one fused BN backward call plus one pass.

Per-call cost matters as much as bandwidth at CIFAR sizes (a small torch op costs 1-3 us in a tight
loop and ~5 us right after an x-sized kernel; BatchNorm2d's whole training step on (2, 256, 16, 16)
costs ~0.3 ms on one core), so: the effective prior weight is a Python float whenever every ghost
group agrees on the guard (always when ungrouped or with the layer-wide guard), ungrouped statistics
stay (C,) inside (views to (1, C) only at the outputs), and scalar arguments ride on
``alpha``/``value``/``lerp`` weights rather than separate multiplications. The layer's common case (one
group, a (C,) prior, NCHW) has its own straight-line Function, :class:`_NchwPriorFn`, reached through
:func:`hot_train`; channels-last input and ghost groups take :class:`_GroupedPriorFn` (per-row moments
combined per group by one C call each way).

In mode ``"auto"`` of :mod:`normlayers.ops.cfinalize` :func:`hot_train` hands every such case to the C++ operator
``torch.ops.normlayers.bkn_step`` (``ops/csrc/bkn_op.cpp``) when it builds. Otherwise (mode ``"step"``, or no C++
build) both Functions run the same whole step in C through ctypes (``ops/csrc/bkn_step.c``): :func:`_step_forward`
(moments, guard, mixture, running buffers and ``y`` in one call) and :func:`_step_backward` (reductions, the closed
form with or without posterior gradients, ``dx``, in one call), fp32/fp64, threads shared with torch's OpenMP pool.
Their torch-kernel bodies below stay the reference and the fallback (modes ``"finalize"`` and ``"torch"``, or no
compiler).
"""

from __future__ import annotations

import ctypes
import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import increment_version as _increment_version

from normlayers.ops import cfinalize
from normlayers.reference import check_guard_scope, stats_dtype

__all__ = ["bkn_train", "check_prior_values", "hot_train"]

PriorWeight = float | Tensor  # a float for the whole layer, or a tensor ((G, 1), or (1,) ungrouped)
Running = tuple[Tensor, Tensor, float, int]  # (running_mean, running_var, momentum, M)

_native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward.default
_native_batch_norm_out = torch.ops.aten.native_batch_norm.out
_GROUP_NORM_MIN_NUMEL = 1 << 15  # below this, per-op overhead dominates and BN's kernel is cheaper
# 0-d constants (never written to): ``torch.add(t, _ONE, alpha=eps)`` and ``torch.addcmul(_ZERO, a, b, value=s)``
# skip the Python-scalar wrapping (a dtype conversion) of ``t + eps`` and ``a * b * s``, ~1.5 us per op
_ONE = torch.ones(())
_ZERO = torch.zeros(())
# eval-mode BN's unused save_mean/save_invstd outputs (left empty), one per statistics dtype
_EMPTY = {dtype: torch.empty(0, dtype=dtype) for dtype in (torch.float32, torch.float64)}


def _grouped(t: Tensor, groups: int) -> Tensor:
    """(N, C, *) -> (G, N // G, C, L); a view for NCHW-contiguous and channels-last tensors."""
    n, c = t.shape[0], t.shape[1]
    return t.reshape(groups, n // groups, c, -1)  # (N, C, *) -> (G, g, C, L)


def _bcast(v: Tensor) -> Tensor:
    """(G, C) -> (G, 1, C, 1): broadcast a per-group, per-channel value over (G, g, C, L)."""
    return v[:, None, :, None]


def _combine_sample_moments(m: Tensor, rstd_n: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mu_B, var_B)`` (C,) from group norm's per-(sample, channel) means and inverse
    deviations (N, C) (eps = 0): ``Var[m_n] + E[var_n]`` (law of total variance), the mean and biased
    variance of the N means by BN's statistics kernel. Overwrites ``rstd_n``."""
    mu, var = torch.batch_norm_update_stats(m, None, None, 0.0)
    return mu, var.add_(rstd_n.pow_(-2).sum(dim=0), alpha=1.0 / m.shape[0])


def _batch_moments(xs: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Biased per-channel moments ``(mu_B, var_B, scratch)``: (C,) each when ``groups == 1``, else (G, C).

    NCHW-contiguous (and not tiny): per-(sample, channel) moments from ``native_group_norm`` with
    one group per channel (a vectorized Welford row reduction; eps=0 so ``var = rstd**-2`` inverts
    it), combined over each ghost group with the law of total variance. Otherwise (channels-last,
    tiny, ...): ``torch.batch_norm_update_stats``, BN's own two-pass kernel, once per ghost group.
    Both are several times faster than ``torch.var_mean`` on CPU.

    ``scratch`` is group norm's (unused) normalized output, an x-sized buffer the caller writes y
    into: one large allocation and free fewer per call (less heap churn; glibc's trimming can make a
    freed x-sized buffer cost dozens of page faults at the next step, see docs/normlayers.md).
    """
    n, c = xs.shape[0], xs.shape[1]
    length = math.prod(xs.shape[2:])
    if xs.is_contiguous() and length > 1 and xs.numel() >= _GROUP_NORM_MIN_NUMEL:
        scratch, m, rstd = torch.native_group_norm(xs, None, None, n, c, length, c, 0.0)  # (N, C) stats
        if groups == 1:
            return *_combine_sample_moments(m, rstd), scratch
        var_n = rstd.pow(-2)
        m = m.view(groups, n // groups, c)  # (N, C) -> (G, g, C)
        mu = m.mean(dim=1)
        dev = m - mu[:, None]
        var = torch.addcmul(var_n.view(groups, n // groups, c), dev, dev).mean(dim=1)  # E[var_n] + Var[mu_n]
        return mu, var, scratch
    if groups == 1:
        return *torch.batch_norm_update_stats(xs, None, None, 0.0), None
    moments = [torch.batch_norm_update_stats(part, None, None, 0.0) for part in xs.chunk(groups, dim=0)]
    return torch.stack([mv[0] for mv in moments]), torch.stack([mv[1] for mv in moments]), None  # G x (C,) -> (G, C)


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
                    guard_ratio: float, layer_guard: bool, check: bool) -> PriorWeight:
    """The prior weight after the guard: 0 where the ratio ``var_P / (var_B + eps)``, averaged over the
    channels of a ghost group (``layer_guard=False``) or over all groups and channels (``layer_guard=True``,
    one decision for every group), reaches ``guard_ratio``.

    A float when every ghost group agrees, else a (G, 1) tensor. With ``check``, the prior's values
    are validated in the same host sync. Inside ``torch.compile`` graphs (no host sync): a tensor,
    no value checks.
    """
    terms = torch.div(prior_var, torch.add(var_b, _ONE, alpha=eps))  # (C,) or (G, C); negative iff var_P is
    if torch.compiler.is_compiling():
        ratio = terms.mean(dim=-1, keepdim=True)  # (1,) or (G, 1)
        if layer_guard:  # the groups' mean of equal-size channel means: the mean over (G, C)
            ratio = ratio.mean(dim=0, keepdim=True).expand_as(ratio)
        return torch.where(ratio >= guard_ratio, 0.0, torch.full_like(ratio, p))  # p in var_b's dtype, not fp32
    # guard and value checks in one host read: sqrt makes a negative var_P NaN, adding 0*mu_P makes a
    # non-finite mu_P NaN, and the 2-norm of sqrt(var_P / (var_B + eps)) is the root of the ratios' sum
    roots = terms.sqrt_()
    if check:
        roots = roots.add_(prior_mean, alpha=0.0)
    norms = torch.linalg.vector_norm(roots, dim=-1).tolist()
    sums = [r * r for r in ([norms] if var_b.dim() == 1 else norms)]  # C * the ratio of each group
    if check and not all(math.isfinite(s) for s in sums):
        check_prior_values(prior_mean, prior_var)  # raises, unless only a ratio overflowed or x is not finite
    channels = var_b.shape[-1]
    if layer_guard:  # one decision over all groups and channels
        return 0.0 if sum(sums) / (len(sums) * channels) >= guard_ratio else p
    fired = [s / channels >= guard_ratio for s in sums]
    if not any(fired):
        return p
    if all(fired):
        return 0.0
    return torch.tensor([0.0 if f else p for f in fired], dtype=var_b.dtype, device=var_b.device)[:, None]


def _update_running(post_mean: Tensor, post_var: Tensor, running_mean: Tensor, running_var: Tensor,
                    momentum: float, count: int) -> None:
    """In-place EMA of the grad-free posterior, the arithmetic of ``update_running_stats_reference``."""
    if post_mean.dim() == 2:
        post_mean, post_var = post_mean.mean(dim=0), post_var.mean(dim=0)  # (G, C) -> (C,)
    if post_mean.dtype != running_mean.dtype:
        post_mean, post_var = post_mean.to(running_mean.dtype), post_var.to(running_var.dtype)
    # lerp to var_hat, plus momentum * var_hat / (M - 1): the EMA of the unbiased var_hat * M / (M - 1)
    torch._foreach_lerp_([running_mean, running_var], [post_mean, post_var], momentum)
    if count > 1:
        running_var.add_(post_var, alpha=momentum / (count - 1))


class _BatchKalmanNormFn(torch.autograd.Function):
    """(x, gamma, beta, mu_P, var_P) -> (y, mu_hat, var_hat); statistics (C,) ungrouped, else (G, C).

    ``running`` = (running_mean, running_var, momentum, M) is updated in the forward, where the
    statistics are grad-free, exactly as ``update_running_stats_reference`` would.
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
        layer_guard: bool,
        groups: int,
        check_prior: bool,
        running: Running | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        sdt = stats_dtype(x.dtype)
        xs = x if x.dtype == sdt else x.to(sdt)
        single = groups == 1
        mu_b, var_b, scratch = _batch_moments(xs, groups)  # (C,) each when single, else (G, C)
        ctx.prior_shape = None if prior_mean is None else (prior_mean.shape, prior_var.shape)

        pe: PriorWeight = 0.0
        if prior_mean is not None and prior_var is not None:
            if single and prior_mean.dim() == 2:
                prior_mean = prior_mean.view(-1)  # (1, C) -> (C,)
            if single and prior_var.dim() == 2:
                prior_var = prior_var.view(-1)  # (1, C) -> (C,)
            pe = _guarded_weight(prior_mean, prior_var, var_b, p, eps, guard_ratio, layer_guard, check_prior)
        d = None
        if isinstance(pe, Tensor) or pe > 0.0:
            d = mu_b - prior_mean
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
        rstd = torch.rsqrt(torch.add(post_var, _ONE, alpha=eps))

        w = weight if weight is None or weight.dtype == sdt else weight.to(sdt)
        b = bias if bias is None or bias.dtype == sdt else bias.to(sdt)
        if single and xs is x and x.is_contiguous():  # NCHW: torch's fused eval-BN pass is vectorized
            if scratch is not None:  # written into group norm's spare output (no new x-sized buffer)
                y = _native_batch_norm_out(x, w, b, post_mean, post_var, False, 0.0, eps,
                                           out=scratch, save_mean=_EMPTY[sdt], save_invstd=_EMPTY[sdt])[0]
            else:
                y = torch.native_batch_norm(x, w, b, post_mean, post_var, False, 0.0, eps)[0]
        else:  # channels-last (where a broadcast addcmul beats eval-BN), ghost groups, low precision
            a = rstd if w is None else rstd * w
            shift = -post_mean * a if b is None else torch.addcmul(b, post_mean, a, value=-1.0)
            if single:
                shape = (-1,) + (1,) * (x.dim() - 2)  # (C,) -> (C, 1, ..., 1) to broadcast over (N, C, *)
                y = torch.addcmul(shift.view(shape), xs, a.view(shape)).to(x.dtype)
            else:
                y = torch.addcmul(_bcast(shift), _grouped(xs, groups), _bcast(a)).reshape(x.shape).to(x.dtype)

        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, post_mean, rstd, d, pe if isinstance(pe, Tensor) else None)
        ctx.pe, ctx.eps, ctx.groups = (pe if isinstance(pe, float) else None), eps, groups
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y, post_mean, post_var  # (C,) each when single, else (G, C)

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, gm: Tensor | None, gv: Tensor | None):  # type: ignore[override]
        x, weight, post_mean, rstd, d, pe_tensor = ctx.saved_tensors
        pe: PriorWeight = ctx.pe if pe_tensor is None else pe_tensor
        grads = _closed_form_backward(ctx.needs_input_grad, x, weight, post_mean, rstd, d, pe, ctx.eps, ctx.groups,
                                      ctx.bias_dtype, ctx.prior_shape, gy, gm, gv)
        return *grads, None, None, None, None, None, None, None


Finalized = tuple[float, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # p used, mu_hat, var_hat, r, d, a, w_bn


def _finalize_c(lib: Any, m: Tensor, rstd_n: Tensor, prior_mean: Tensor, prior_var: Tensor, weight: Tensor,
                p: float, eps: float, guard_ratio: float, running: Running | None) -> Finalized:
    """The forward finalize in one C call (``ops/csrc/bkn_finalize.c``; same arithmetic as :func:`_finalize_torch`)."""
    n, c = m.shape
    dtype = m.dtype
    post_mean, post_var = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
    rstd, d, a, w_bn = torch.empty(4, c, dtype=dtype).unbind(0)  # internal: saved for the backward only
    running_mean_ptr = running_var_ptr = None  # NULL: no running buffers to update
    momentum, count = 0.0, 0
    if running is not None:
        running_mean, running_var, momentum, count = running
        running_mean_ptr, running_var_ptr = running_mean.data_ptr(), running_var.data_ptr()
    p_used = lib.bkn_forward_finalize(
        dtype is torch.float64, n, c, m.data_ptr(), rstd_n.data_ptr(), prior_mean.data_ptr(), prior_var.data_ptr(),
        weight.data_ptr(), p, eps, guard_ratio, running_mean_ptr, running_var_ptr, momentum, count,
        post_mean.data_ptr(), post_var.data_ptr(), rstd.data_ptr(), d.data_ptr(), a.data_ptr(), w_bn.data_ptr(),
    )
    if p_used < 0.0:  # a NaN/inf or a negative variance in the prior
        check_prior_values(prior_mean, prior_var)
        raise ValueError("prior rejected by the C finalize")  # (check_prior_values raises first)
    if running is not None:  # written through raw pointers: tell autograd's saved-tensor checks, as in-place ops do
        _increment_version([running[0], running[1]])
    return p_used, post_mean, post_var, rstd, d, a, w_bn


def _finalize_torch(m: Tensor, rstd_n: Tensor, prior_mean: Tensor, prior_var: Tensor, weight: Tensor, p: float,
                    eps: float, guard_ratio: float, running: Running | None) -> Finalized:
    """The forward finalize in torch ops: batch moments from the (N, C) moments, guard, mixture, r, EMA."""
    mu_b, var_b = _combine_sample_moments(m, rstd_n)
    d = mu_b - prior_mean
    p = _guarded_weight(prior_mean, prior_var, var_b, p, eps, guard_ratio, True, check=True)  # a float: one group
    if p == 0.0:  # the guard fired: plain BN for this step (the batch moments exactly, whatever d is)
        post_mean, post_var = mu_b, var_b
    else:  # mu_hat = lerp(mu_B, mu_P, p); var_hat = lerp(var_B + p*d**2, var_P, p) = q*var_B + p*var_P + p*q*d**2
        post_mean, post_var = torch._foreach_lerp([mu_b, var_b.addcmul_(d, d, value=p)], [prior_mean, prior_var], p)
    if running is not None:
        _update_running(post_mean, post_var, *running)
    rstd = torch.add(post_var, _ONE, alpha=eps).rsqrt_()
    return p, post_mean, post_var, rstd, d, rstd * weight, torch.add(weight, weight, alpha=-p)


def _chain_backward_c(lib: Any, x: Tensor, weight: Tensor, post_mean: Tensor, rstd: Tensor, d: Tensor, a: Tensor,
                      p: float, eps: float, gy: Tensor, gm: Tensor | None, gv: Tensor | None) -> tuple[Tensor, ...]:
    """``(dx, dgamma, dbeta, dmu_P, dvar_P)`` with posterior gradients: BN's reductions, the per-channel
    terms in one C call (:func:`_closed_form_backward`'s formulas), ``dx = a*g + shift + k2*x`` in two passes."""
    _, s2, s1 = _native_batch_norm_backward(gy, x, weight, None, None, post_mean, rstd, True, eps, [False, True, True])
    c, dtype = s1.shape[0], s1.dtype
    gm = None if gm is None else gm.to(dtype).contiguous()
    gv = None if gv is None else gv.to(dtype).contiguous()
    dpm, dpv = torch.empty_like(s1), torch.empty_like(s1)
    k2, shift = torch.empty(2, c, dtype=dtype).unbind(0)
    lib.bkn_backward_chain_finalize(
        dtype is torch.float64, c, x.numel() // c, s1.data_ptr(), s2.data_ptr(), a.data_ptr(), rstd.data_ptr(),
        d.data_ptr(), post_mean.data_ptr(), None if gm is None else gm.data_ptr(),
        None if gv is None else gv.data_ptr(),
        p, dpm.data_ptr(), dpv.data_ptr(), k2.data_ptr(), shift.data_ptr(),
    )
    shape = (-1,) + (1,) * (x.dim() - 2)  # (C,) -> (C, 1, ..., 1) to broadcast over (N, C, *)
    dx = torch.addcmul(shift.view(shape), gy, a.view(shape)).addcmul_(x, k2.view(shape))
    return dx, s2, s1, dpm, dpv


def _step_forward(ctx: Any, lib: Any, x: Tensor, weight: Tensor, bias: Tensor, prior_mean: Tensor, prior_var: Tensor,
                  p: float, eps: float, guard_ratio: float, layer_guard: bool, groups: int,
                  running: Running | None) -> tuple[Tensor, Tensor, Tensor]:
    """The whole forward in one C call (``ops/csrc/bkn_step.c``, :func:`normlayers.ops.cfinalize.load_step`): moments,
    guard, mixture, running buffers and ``y`` for NCHW-contiguous or channels-last ``x``; ``G = groups`` ghost groups.
    Posteriors ``(C,)`` when ``G == 1``, else ``(G, C)``. Fills ``ctx`` for :func:`_step_backward`."""
    n, c = x.shape[0], x.shape[1]
    dtype = x.dtype
    channels_last = not x.is_contiguous()
    stat_shape = (c,) if groups == 1 else (groups, c)
    y = torch.empty_like(x)  # in x's layout
    post_mean, post_var = torch.empty(stat_shape, dtype=dtype), torch.empty(stat_shape, dtype=dtype)
    rstd, d, a = torch.empty(3, groups, c, dtype=dtype).unbind(0)  # internal: saved for the backward only
    p_used = torch.empty(groups, dtype=torch.float64)
    running_mean = running_var = None
    momentum = 0.0
    if running is not None:
        running_mean, running_var, momentum, _ = running
    fired = lib.bkn_step_forward(
        dtype is torch.float64, channels_last, n, c, x.numel() // (n * c), groups, x.data_ptr(), weight.data_ptr(),
        bias.data_ptr(), prior_mean.data_ptr(), prior_var.data_ptr(), 0 if prior_mean.dim() == 1 else c, p, eps,
        guard_ratio, layer_guard, _ptr(running_mean), _ptr(running_var), momentum, y.data_ptr(), post_mean.data_ptr(),
        post_var.data_ptr(), rstd.data_ptr(), d.data_ptr(), a.data_ptr(), p_used.data_ptr(), torch.get_num_threads(),
    )
    if fired < 0.0:
        if fired == -1.0:  # a NaN/inf or a negative variance in the prior (nothing was written)
            check_prior_values(prior_mean, prior_var)
            raise ValueError("prior rejected by the C step")  # (check_prior_values raises first)
        raise MemoryError("the C step could not allocate its workspace")
    if running is not None:  # written through raw pointers: tell autograd's saved-tensor checks, as in-place ops do
        _increment_version([running[0], running[1]])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, post_mean, rstd, d, a, p_used)
    ctx.step, ctx.channels_last, ctx.groups, ctx.prior_shape = lib, channels_last, groups, prior_mean.shape
    return y, post_mean, post_var


def _step_backward(ctx: Any, gy: Tensor | None, gm: Tensor | None, gv: Tensor | None) -> tuple[Tensor | None, ...]:
    """``(dx, dgamma, dbeta, dmu_P, dvar_P)`` of :func:`_step_forward` in one C call: the reductions
    ``S1 = sum(g)``, ``S2 = sum(g*xh)`` per (group, channel), the closed form's per-channel terms (with or
    without posterior gradients ``gm``, ``gv``) and ``dx = a*g + k2*(x - mu_hat) + k0``; gradients not needed are
    not computed. A ``gy`` in another layout or dtype is converted first."""
    x, post_mean, rstd, d, a, p_used = ctx.saved_tensors
    needs = ctx.needs_input_grad
    n, c = x.shape[0], x.shape[1]
    dtype = x.dtype
    if gy is not None:
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        gy = gy.to(dtype).contiguous(memory_format=layout)
    gm = None if gm is None else gm.to(dtype).contiguous()
    gv = None if gv is None else gv.to(dtype).contiguous()
    dx = torch.empty_like(x) if needs[0] else None
    dweight = torch.empty(c, dtype=dtype) if needs[1] else None
    dbias = torch.empty(c, dtype=dtype) if needs[2] else None
    dpm = torch.empty(ctx.prior_shape, dtype=dtype) if needs[3] else None
    dpv = torch.empty(ctx.prior_shape, dtype=dtype) if needs[4] else None
    rc = ctx.step.bkn_step_backward(
        dtype is torch.float64, ctx.channels_last, n, c, x.numel() // (n * c), ctx.groups, x.data_ptr(), _ptr(gy),
        post_mean.data_ptr(), rstd.data_ptr(), a.data_ptr(), d.data_ptr(), p_used.data_ptr(), _ptr(gm), _ptr(gv),
        0 if len(ctx.prior_shape) == 1 else c, _ptr(dx), _ptr(dweight), _ptr(dbias), _ptr(dpm), _ptr(dpv),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise MemoryError("the C step could not allocate its workspace")
    return dx, dweight, dbias, dpm, dpv


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _NchwPriorFn(torch.autograd.Function):
    """The layer's hot path: :class:`_BatchKalmanNormFn` specialized to one group, a ``(C,)`` prior,
    a float prior weight and NCHW-contiguous input large enough for group norm's moments (see
    :func:`hot_train`). Same arguments (no ``groups``/``check_prior``: prior values are always
    checked), same outputs, same arithmetic up to rounding.

    Why a second Function: at CIFAR sizes its four x-sized kernels (group-norm moments, the eval-BN
    normalize, BN's fused backward, one elementwise pass) together cost about what BatchNorm2d's
    whole step costs, and each of the ~20 per-channel ops of the general path runs with caches the
    kernels just flushed, at ~5 us. Here the per-channel work is one call each way: the C finalize
    (:mod:`normlayers.ops.cfinalize`) when it is available, else :func:`_finalize_torch` (straight-line
    torch ops: in-place where possible, ``_foreach`` lerps, one host read for guard and value checks).
    With posterior gradients (a chain) the backward's per-channel part is one C call as well
    (:func:`_chain_backward_c`); without the C library, or with a non-contiguous ``gy`` or no input
    gradient, it goes to :func:`_closed_form_backward`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        prior_mean: Tensor,
        prior_var: Tensor,
        p: float,
        eps: float,
        guard_ratio: float,
        running: Running | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        step = cfinalize.load_step()
        if step is not None:  # the whole step in C
            return _step_forward(ctx, step, x, weight, bias, prior_mean, prior_var, p, eps, guard_ratio, True, 1,
                                 running)
        ctx.step = None
        n, c = x.shape[0], x.shape[1]
        scratch, m, rstd_n = torch.native_group_norm(x, None, None, n, c, x.numel() // (n * c), c, 0.0)  # (N, C)
        lib = cfinalize.load()
        if lib is not None:
            finalized = _finalize_c(lib, m, rstd_n, prior_mean, prior_var, weight, p, eps, guard_ratio, running)
        else:
            finalized = _finalize_torch(m, rstd_n, prior_mean, prior_var, weight, p, eps, guard_ratio, running)
        p, post_mean, post_var, rstd, d, a, w_bn = finalized
        empty = _EMPTY[x.dtype]
        y = _native_batch_norm_out(x, weight, bias, post_mean, post_var, False, 0.0, eps,
                                   out=scratch, save_mean=empty, save_invstd=empty)[0]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, post_mean, rstd, d, a, w_bn)
        ctx.p, ctx.eps, ctx.lib = p, eps, lib
        return y, post_mean, post_var

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, gm: Tensor | None, gv: Tensor | None):  # type: ignore[override]
        if ctx.step is not None:
            return *_step_backward(ctx, gy, gm, gv), None, None, None, None
        x, weight, post_mean, rstd, d, a, w_bn = ctx.saved_tensors
        p, needs = ctx.p, ctx.needs_input_grad
        if gy is None or not (needs[0] and gy.is_contiguous()):
            grads = _closed_form_backward(needs, x, weight, post_mean, rstd, d if p > 0.0 else None, p, ctx.eps, 1,
                                          weight.dtype, (post_mean.shape, post_mean.shape), gy, gm, gv)
            return *grads, None, None, None, None
        if gm is not None or gv is not None:  # a Kalman chain: the posterior has gradients of its own
            if ctx.lib is not None:
                grads = _chain_backward_c(ctx.lib, x, weight, post_mean, rstd, d, a, p, ctx.eps, gy, gm, gv)
            else:
                grads = _closed_form_backward(needs, x, weight, post_mean, rstd, d if p > 0.0 else None, p, ctx.eps,
                                              1, weight.dtype, (post_mean.shape, post_mean.shape), gy, gm, gv)
            return *grads, None, None, None, None
        # dx = q*BN_dx(g) + p*a*g: BN's fused backward with weight q*gamma, S1 = sum(g), S2 = sum(g*xh)
        dx, s2, s1 = _native_batch_norm_backward(gy, x, w_bn, None, None, post_mean, rstd, True, ctx.eps,
                                                 [True, True, True])
        if p == 0.0:  # the guard fired: plain BN, no gradient to the prior
            zeros = torch.zeros_like(rstd) if needs[3] or needs[4] else None
            return dx, s2, s1, zeros, zeros, None, None, None, None
        dx.addcmul_(gy, a.view((-1,) + (1,) * (x.dim() - 2)), value=p)  # (C,) -> (C, 1, ..., 1)
        dpm = dpv = None
        if needs[3] or needs[4]:  # a*S1 = -Gm, a*r*S2 = -2*Gv
            if ctx.lib is not None:
                dpm, dpv = torch.empty_like(s1), torch.empty_like(s1)
                ctx.lib.bkn_backward_finalize(s1.dtype is torch.float64, s1.shape[0], s1.data_ptr(), s2.data_ptr(),
                                              a.data_ptr(), rstd.data_ptr(), d.data_ptr(), p, dpm.data_ptr(),
                                              dpv.data_ptr())
            else:
                dpm, dpv = _prior_grads(a, rstd, s1, s2, d, p)
        return dx, s2, s1, dpm, dpv, None, None, None, None


# the C++ apply without Function.apply's Python layer (setup_context binding, functorch unwrapping: ~6 us a
# call); used unless functorch transforms (vmap, grad, ...) are active, which need that layer
_nchw_apply_c = super(torch.autograd.Function, _NchwPriorFn).apply


# ---- the grouped / channels-last hot path -------------------------------------------------------------------------

_PTR, _I64, _F64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_GROUPED_FORWARD_ARGTYPES = [_INT, _INT, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _F64, _F64, _F64,
                             _INT, _PTR, _PTR, _F64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR,
                             _PTR]
_GROUPED_BACKWARD_ARGTYPES = [_INT, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64,
                              _PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR]
_grouped_bound: dict[int, Any] = {}  # id(library) -> library, once its grouped entry points are declared


def _grouped_lib() -> Any:
    """The C library with its grouped entry points declared, or ``None`` (torch-ops finalize)."""
    lib = cfinalize.load()
    if lib is None or id(lib) in _grouped_bound:
        return lib
    try:
        lib.bkn_forward_finalize_grouped.argtypes = _GROUPED_FORWARD_ARGTYPES
        lib.bkn_forward_finalize_grouped.restype = _F64
        lib.bkn_backward_grouped.argtypes = _GROUPED_BACKWARD_ARGTYPES
        lib.bkn_backward_grouped.restype = None
    except AttributeError:  # a library built from an older source: the torch ops
        return None
    _grouped_bound[id(lib)] = lib
    return lib


_unit_rows: dict[tuple[int, torch.dtype], tuple[Tensor, Tensor]] = {}  # (rows, dtype) -> (zeros, ones), read-only


def _unit(rows: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Zero means and unit variances of ``rows`` channels: eval-BN with eps = 0 is then ``x*scale + shift``."""
    key = (rows, dtype)
    unit = _unit_rows.get(key)
    if unit is None:
        if len(_unit_rows) > 32:
            _unit_rows.clear()
        unit = _unit_rows[key] = (torch.zeros(rows, dtype=dtype), torch.ones(rows, dtype=dtype))
    return unit


def _cl_rows(t: Tensor, groups: int) -> Tensor:
    """Channels-last (N, C, H, W) -> (G, g*H*W, C): each ghost group's pixels as rows of C channels (a view)."""
    return t.permute(0, 2, 3, 1).reshape(groups, -1, t.shape[1])  # (N, C, H, W) -> (N, H, W, C) -> (G, gHW, C)


def _cl_moments(x: Tensor, groups: int) -> tuple[Tensor, Tensor]:
    """Per-group, per-channel biased ``(mean, var)`` (G, C) of channels-last ``x`` from BN's statistics kernel
    (vectorized over the contiguous channels of the (g*H*W, C) rows), one call per ghost group."""
    if groups == 1:
        return torch.batch_norm_update_stats(x, None, None, 0.0)  # (C,) each: the C finalize reads them as (1, C)
    moments = [torch.batch_norm_update_stats(part, None, None, 0.0) for part in x.chunk(groups, dim=0)]
    return torch.stack([mv[0] for mv in moments]), torch.stack([mv[1] for mv in moments])  # G x (C,) -> (G, C)


def _finalize_grouped_torch(m: Tensor, s: Tensor, var_rows: bool, groups: int, prior_mean: Tensor,
                            prior_var: Tensor, p: float, eps: float, guard_ratio: float, layer_guard: bool,
                            running: Running | None) -> tuple[PriorWeight, Tensor, Tensor, Tensor, Tensor | None]:
    """The grouped forward finalize in torch ops (the C one's arithmetic): ``(p used, mu_hat, var_hat, r, d)``,
    statistics (G, C); ``p`` a float when every group agrees on the guard, else (G, 1); ``d`` None if all fired."""
    c = m.shape[-1]
    rows = m.numel() // c
    var_n = s if var_rows else s.pow(-2)  # group norm's inverse deviations -> variances
    mg = m.view(groups, rows // groups, c)  # (G*n, C) -> (G, n, C)
    mu_b = mg.mean(dim=1)
    dev = mg - mu_b[:, None]
    var_b = torch.addcmul(var_n.view(groups, rows // groups, c), dev, dev).mean(dim=1)  # E[var_i] + Var[mu_i]
    pe = _guarded_weight(prior_mean, prior_var, var_b, p, eps, guard_ratio, layer_guard, check=True)
    d = None
    if isinstance(pe, Tensor) or pe > 0.0:
        d = mu_b - prior_mean
        post_mean = torch.lerp(mu_b, prior_mean, pe)
        post_var = torch.lerp(var_b, prior_var, pe)
        if isinstance(pe, Tensor):
            post_var.addcmul_(d * (pe * (1.0 - pe)), d)
        else:
            post_var.addcmul_(d, d, value=pe * (1.0 - pe))
    else:
        post_mean, post_var = mu_b, var_b
    if running is not None:
        _update_running(post_mean, post_var, *running)
    return pe, post_mean, post_var, torch.add(post_var, _ONE, alpha=eps).rsqrt_(), d


class _GroupedPriorFn(torch.autograd.Function):
    """The hot path for ghost groups (``G > 1``; NCHW or channels-last) and for channels-last input with one
    group: (x, gamma, beta, mu_P, var_P) -> (y, mu_hat, var_hat), statistics ``(C,)`` when ``G == 1``, else
    ``(G, C)``; the prior ``(C,)`` (shared by the groups) or ``(G, C)``. Same arithmetic as
    :class:`_BatchKalmanNormFn` up to rounding; reached through :func:`hot_train`.

    Moments per row, combined per group by the per-channel finalize (one C call, or the torch ops of
    :func:`_finalize_grouped_torch`):

    * NCHW: group norm's per-(sample, channel) moments (N, C) (rows = samples, g rows per group); the
      normalize is torch's vectorized eval-BN pass on the ``(1, N*C, L)`` view with per-row scale and shift
      (``mean = 0, var = 1, eps = 0``: ``y = x*a + shift``) written into group norm's spare output.
    * channels-last: BN's statistics kernel per group (rows = groups); the normalize is one broadcast
      ``addcmul`` on the ``(G, g*H*W, C)`` view.

    Backward (C finalize, ``gy`` in ``x``'s layout): one channels-last group and only ``y`` with a gradient:
    BN's fused backward with weight ``(1-p)*gamma`` plus ``p*a*g``, as :class:`_NchwPriorFn`. Otherwise BN's
    reductions per row (NCHW: on the ``(1, N*C, L)`` view at the rows' group statistics; channels-last: one
    call per group), one C call for the prior's and the affine gradients and the per-row coefficients of
    ``dx = a*g + k2*x + shift``, and two passes. The torch-ops finalize, a ``gy`` in another layout or no
    input gradient: :func:`_closed_form_backward`.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor,
        prior_mean: Tensor,
        prior_var: Tensor,
        p: float,
        eps: float,
        guard_ratio: float,
        layer_guard: bool,
        groups: int,
        running: Running | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        step = cfinalize.load_step()
        if step is not None:  # the whole step in C
            return _step_forward(ctx, step, x, weight, bias, prior_mean, prior_var, p, eps, guard_ratio, layer_guard,
                                 groups, running)
        ctx.step = None
        n, c = x.shape[0], x.shape[1]
        dtype = x.dtype
        nchw = x.is_contiguous()
        length = x.numel() // (n * c)
        if nchw:  # per-(sample, channel) moments (N, C): g rows per group
            scratch, m, s = torch.native_group_norm(x, None, None, n, c, length, c, 0.0)
            per_group, expand = n // groups, n // groups
        else:  # channels-last: per-(group, channel) moments (G, C)
            scratch = None
            m, s = _cl_moments(x, groups)
            per_group, expand = 1, 1
        lib = _grouped_lib()
        ctx.prior_shape = (prior_mean.shape, prior_var.shape)
        stat_shape = (c,) if groups == 1 else (groups, c)
        mean_rows = rstd_rows = scale_rows = None
        if lib is not None:
            post_mean, post_var = torch.empty(stat_shape, dtype=dtype), torch.empty(stat_shape, dtype=dtype)
            if nchw:  # (G, C) internals for the backward; per-row (N, C) mean, r, a, shift
                rstd, d, a = torch.empty(3, groups, c, dtype=dtype).unbind(0)
                mean_rows, rstd_rows, scale_rows, shift = torch.empty(4, n, c, dtype=dtype).unbind(0)
            else:  # rows = groups: (G, C) each
                rstd, d, a, shift = torch.empty(4, groups, c, dtype=dtype).unbind(0)
            p_used = torch.empty(groups, dtype=torch.float64)
            running_mean = running_var = None
            momentum, count = 0.0, 0
            if running is not None:
                running_mean, running_var, momentum, count = running
            fired = lib.bkn_forward_finalize_grouped(
                dtype is torch.float64, not nchw, groups, per_group, c, m.data_ptr(), s.data_ptr(),
                prior_mean.data_ptr(), prior_var.data_ptr(), 0 if prior_mean.dim() == 1 else c, weight.data_ptr(),
                bias.data_ptr(), p, eps, guard_ratio, layer_guard, _ptr(running_mean), _ptr(running_var),
                momentum, count, post_mean.data_ptr(), post_var.data_ptr(), rstd.data_ptr(), d.data_ptr(), a.data_ptr(),
                p_used.data_ptr(), expand, _ptr(mean_rows), _ptr(rstd_rows), _ptr(scale_rows), shift.data_ptr(),
            )
            if fired < 0.0:  # a NaN/inf or a negative variance in the prior
                check_prior_values(prior_mean, prior_var)
                raise ValueError("prior rejected by the C finalize")  # (check_prior_values raises first)
            if running is not None:  # written through raw pointers: tell autograd's saved-tensor checks
                _increment_version([running[0], running[1]])
            # the prior weight used: a float when every group agrees, else (G, 1) (for the closed-form fallback)
            pe: PriorWeight = p if fired == 0.0 else 0.0 if fired == groups else p_used.to(dtype)[:, None]
        else:
            pe, post_mean, post_var, rstd, d = _finalize_grouped_torch(
                m, s, not nchw, groups, prior_mean, prior_var, p, eps, guard_ratio, layer_guard, running)
            if groups == 1:
                post_mean, post_var, rstd = post_mean.view(c), post_var.view(c), rstd.view(c)  # (1, C) -> (C,)
                d = None if d is None else d.view(c)
            a = rstd * weight  # (G, C) or (C,)
            shift = torch.addcmul(bias, post_mean, a, value=-1.0)
            if nchw:  # (G, C) -> (G, g, C) -> (N, C): a row per sample
                scale_rows = a.view(groups, 1, c).expand(groups, expand, c).reshape(n, c)
                shift = shift.view(groups, 1, c).expand(groups, expand, c).reshape(n, c)
            p_used = mean_rows = rstd_rows = None
        if nchw:  # y = x*a + shift per (sample, channel) row: eval BN with mean 0, var 1, eps 0, into the scratch
            zeros, ones = _unit(n * c, dtype)
            x_rows = x.view(1, n * c, length)  # (N, C, *) -> (1, N*C, L)
            y = _native_batch_norm_out(x_rows, scale_rows.view(-1), shift.view(-1), zeros, ones, False, 0.0, 0.0,
                                       out=scratch.view(1, n * c, length), save_mean=_EMPTY[dtype],
                                       save_invstd=_EMPTY[dtype])[0].view(x.shape)
        elif groups == 1:  # (C,) -> (C, 1, 1) to broadcast over channels-last (N, C, H, W); y keeps x's layout
            y = torch.addcmul(shift.view(c, 1, 1), x, a.view(c, 1, 1))
        else:  # (G, g*H*W, C) rows, broadcast (G, 1, C) coefficients; back to channels-last (N, C, H, W)
            y = torch.addcmul(shift.view(groups, 1, c), _cl_rows(x, groups), a.view(groups, 1, c))
            h, w = x.shape[2], x.shape[3]
            y = y.view(n, h, w, c).permute(0, 3, 1, 2)  # (G, gHW, C) -> (N, H, W, C) -> (N, C, H, W)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, post_mean, rstd, d, a, p_used, mean_rows, rstd_rows, scale_rows,
                              pe if isinstance(pe, Tensor) else None)
        ctx.pe = pe if isinstance(pe, float) else None
        ctx.eps, ctx.groups, ctx.lib = eps, groups, lib
        return y, post_mean, post_var

    @staticmethod
    def backward(ctx: Any, gy: Tensor | None, gm: Tensor | None, gv: Tensor | None):  # type: ignore[override]
        if ctx.step is not None:
            return *_step_backward(ctx, gy, gm, gv), None, None, None, None, None, None
        x, weight, post_mean, rstd, d, a, p_used, mean_rows, rstd_rows, scale_rows, pe_t = ctx.saved_tensors
        pe: PriorWeight = ctx.pe if pe_t is None else pe_t
        lib, groups, needs, eps = ctx.lib, ctx.groups, ctx.needs_input_grad, ctx.eps
        nchw = x.is_contiguous()
        same_layout = gy is not None and (gy.is_contiguous() if nchw else
                                          gy.is_contiguous(memory_format=torch.channels_last))
        if lib is None or not (needs[0] and same_layout):
            if d is not None and isinstance(pe, float) and pe == 0.0:
                d = None  # every group's guard fired: plain BN
            stat = (post_mean.shape[-1],) if groups == 1 else (groups, post_mean.shape[-1])
            grads = _closed_form_backward(
                needs, x, weight, post_mean.view(stat), rstd.view(stat), None if d is None else d.view(stat), pe,
                eps, groups, weight.dtype, ctx.prior_shape, gy, gm, gv)
            return *grads, None, None, None, None, None, None
        n, c = x.shape[0], x.shape[1]
        dtype = x.dtype
        mean_shape = ctx.prior_shape[0]
        dpm, dpv = torch.empty(mean_shape, dtype=dtype), torch.empty(mean_shape, dtype=dtype)
        prior_stride = 0 if len(mean_shape) == 1 else c
        gm = None if gm is None else gm.to(dtype).contiguous()
        gv = None if gv is None else gv.to(dtype).contiguous()
        dweight, dbias = torch.empty(c, dtype=dtype), torch.empty(c, dtype=dtype)
        if nchw:  # BN's reductions per (sample, channel) row at the row's group statistics: (N*C,) each
            length = x.numel() // (n * c)
            x_rows, gy_rows = x.view(1, n * c, length), gy.view(1, n * c, length)  # (N, C, *) -> (1, N*C, L)
            _, s2, s1 = _native_batch_norm_backward(gy_rows, x_rows, None, None, None, mean_rows.view(-1),
                                                    rstd_rows.view(-1), True, eps, [False, True, True])
            rows, per_group = n, n // groups
        else:  # channels-last: one call per group, (G, C) each
            if groups == 1:
                _, s2, s1 = _native_batch_norm_backward(gy, x, None, None, None, post_mean, rstd.view(c), True, eps,
                                                        [False, True, True])
            else:
                mu, r = post_mean.view(groups, c), rstd.view(groups, c)
                parts = [_native_batch_norm_backward(g_k, x_k, None, None, None, mu[k], r[k], True, eps,
                                                     [False, True, True])
                         for k, (g_k, x_k) in enumerate(zip(gy.chunk(groups, dim=0), x.chunk(groups, dim=0)))]
                s2, s1 = torch.stack([t[1] for t in parts]), torch.stack([t[2] for t in parts])
            rows, per_group = groups, 1
        k2, shift = torch.empty(2, rows, c, dtype=dtype).unbind(0)  # per row
        lib.bkn_backward_grouped(
            dtype is torch.float64, groups, per_group, c, x.numel() // (groups * c), s1.data_ptr(), s2.data_ptr(),
            a.data_ptr(), rstd.data_ptr(), d.data_ptr(), post_mean.data_ptr(), p_used.data_ptr(), _ptr(gm), _ptr(gv),
            prior_stride, dpm.data_ptr(), dpv.data_ptr(), dweight.data_ptr(), dbias.data_ptr(), rows // groups,
            k2.data_ptr(), shift.data_ptr(),
        )
        if nchw:  # dx = g*a + shift (eval BN, mean 0, var 1, eps 0) + k2*x, per (sample, channel) row
            zeros, ones = _unit(n * c, dtype)
            dx = torch.native_batch_norm(gy_rows, scale_rows.view(-1), shift.view(-1), zeros, ones, False, 0.0,
                                         0.0)[0]
            dx = dx.addcmul_(x_rows, k2.view(1, n * c, 1)).view(x.shape)
        elif groups == 1:  # (C,) -> (C, 1, 1) over channels-last (N, C, H, W)
            dx = torch.addcmul(shift.view(c, 1, 1), gy, a.view(c, 1, 1)).addcmul_(x, k2.view(c, 1, 1))
        else:  # (G, g*H*W, C) rows, (G, 1, C) coefficients, back to channels-last (N, C, H, W)
            dx = torch.addcmul(shift.view(groups, 1, c), _cl_rows(gy, groups), a.view(groups, 1, c))
            dx = dx.addcmul_(_cl_rows(x, groups), k2.view(groups, 1, c))
            dx = dx.view(n, x.shape[2], x.shape[3], c).permute(0, 3, 1, 2)  # (G, gHW, C) -> (N, C, H, W)
        return dx, dweight, dbias, dpm, dpv, None, None, None, None, None, None


_grouped_apply_c = super(torch.autograd.Function, _GroupedPriorFn).apply


def hot_train(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    prior: Any,
    prior_weight: float,
    momentum: float | None,
    eps: float,
    guard_ratio: float,
    group_size: int | None = None,
    guard_scope: str = "layer",
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """Training BKN through a hot-path Function when one applies, else ``None`` (the caller takes the
    general, fully validated path). Posteriors ``(C,)`` with one group, else ``(G, C)``; running buffers
    updated in place.

    ``num_batches_tracked``: the layer's step counter, incremented here when the step runs (and left alone when
    ``None`` is returned); ``momentum=None`` then means the cumulative average ``1 / count``, like BatchNorm's.

    Every case below runs the C++ operator ``torch.ops.normlayers.bkn_step`` (``csrc/bkn_op.cpp``: the C step with
    its own autograd node) when :func:`normlayers.ops.cfinalize.load_op` has it (mode ``"auto"``, outside
    functorch transforms). Python checks only what the operator's schema could not parse; shapes, dtypes and layouts
    are checked by the operator, which raises ``NotImplementedError`` for what it does not take (then ``None``
    here). Every training step of every layer comes through here, and at (2, 256, 16, 16) each Python line right
    after an x-sized kernel costs about as much as one of BatchNorm2d's per-channel kernels. Otherwise one of two
    Python Functions:

    :class:`_NchwPriorFn`: one group (``group_size`` None or the batch size), a ``(C,)`` prior, NCHW.
    :class:`_GroupedPriorFn`: ghost groups (``G > 1``, NCHW or channels-last 4-D), or channels-last with one
    group; its prior is ``(C,)`` or, with ``G > 1``, ``(G, C)`` (mean and variance of one shape).
    All need: ``0 < prior_weight <= 1``, fp32/fp64 CPU ``x`` contiguous in its layout with more than one
    element per (sample, channel) and at least ``_GROUP_NORM_MIN_NUMEL`` elements, contiguous affine
    parameters (and running buffers, if any) of shape ``(C,)`` in ``x``'s dtype, outside ``torch.compile``
    graphs. Every check is cheap; anything else (including every invalid input, such as an unknown
    ``guard_scope``) returns ``None``. ``guard_scope``: ``"layer"`` or ``"group"`` (see
    :func:`normlayers.reference.batch_kalman_norm_reference`); it only matters with ghost groups.
    """
    if not (0.0 < prior_weight <= 1.0 and (guard_scope == "layer" or guard_scope == "group")
            and isinstance(prior, tuple) and len(prior) == 2):
        return None
    prior_mean, prior_var = prior
    n = x.shape[0]
    groups = 1
    if group_size is not None:
        if not (isinstance(group_size, int) and 0 < group_size <= n and n % group_size == 0):
            return None
        groups = n // group_size
    if x.numel() < _GROUP_NORM_MIN_NUMEL or _is_compiling():
        return None
    op = cfinalize.load_op()
    if op is not None and not torch._C._are_functorch_transforms_active():  # the step and its backward in C++
        if not (isinstance(prior_mean, Tensor) and isinstance(prior_var, Tensor) and isinstance(weight, Tensor)
                and isinstance(bias, Tensor) and (running_mean is None or isinstance(running_mean, Tensor))
                and (running_var is None or isinstance(running_var, Tensor))):
            return None  # what the operator's schema would not parse
        try:
            return op(x, weight, bias, prior_mean, prior_var, float(prior_weight), float(eps), float(guard_ratio),
                      guard_scope == "layer", groups, running_mean, running_var, momentum, num_batches_tracked)
        except NotImplementedError:  # a shape, dtype or layout the C step does not take (csrc/bkn_op.cpp)
            return None
    return _hot_train_python(x, running_mean, running_var, weight, bias, prior_mean, prior_var, prior_weight,
                             momentum, eps, guard_ratio, groups, guard_scope, num_batches_tracked)


def _hot_train_python(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                      bias: Tensor | None, prior_mean: Any, prior_var: Any, prior_weight: float, momentum: float | None,
                      eps: float, guard_ratio: float, groups: int, guard_scope: str,
                      num_batches_tracked: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """:func:`hot_train` without the operator: every check in Python, then one of the two Python Functions."""
    dtype = x.dtype
    if not (dtype is torch.float32 or dtype is torch.float64):
        return None
    n, c = x.shape[0], x.shape[1]
    shape = (c,)
    for t in (weight, bias):  # the C finalize reads them as plain (C,) arrays
        if not (isinstance(t, Tensor) and t.dtype is dtype and t.shape == shape and t.is_contiguous()):
            return None
    prior_shape = prior_mean.shape if isinstance(prior_mean, Tensor) else None
    if not (prior_shape == shape or groups > 1 and prior_shape == (groups, c)):
        return None
    for t in (prior_mean, prior_var):
        if not (isinstance(t, Tensor) and t.dtype is dtype and t.shape == prior_shape and t.is_contiguous()):
            return None
    if running_mean is not None or running_var is not None:
        for t in (running_mean, running_var):
            if not (isinstance(t, Tensor) and t.dtype is dtype and t.shape == shape and t.is_contiguous()):
                return None
        if momentum is None and num_batches_tracked is None:
            return None
    numel = x.numel()
    if not (numel > n * c and x.device.type == "cpu"):
        return None
    nchw = x.is_contiguous()
    if not (nchw or x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return None
    if momentum is None:  # cumulative moving average, like torch (the count after this step)
        momentum = 0.0 if num_batches_tracked is None else 1.0 / (float(num_batches_tracked) + 1.0)
    functorch = torch._C._are_functorch_transforms_active()
    if nchw and groups == 1:
        running = None if running_mean is None else (running_mean, running_var, momentum, numel // c)
        apply = _NchwPriorFn.apply if functorch else _nchw_apply_c
        out = apply(x, weight, bias, prior_mean, prior_var, float(prior_weight), float(eps), float(guard_ratio),
                    running)
    else:
        running = None if running_mean is None else (running_mean, running_var, momentum, numel // (groups * c))
        apply = _GroupedPriorFn.apply if functorch else _grouped_apply_c
        out = apply(x, weight, bias, prior_mean, prior_var, float(prior_weight), float(eps), float(guard_ratio),
                    guard_scope == "layer", groups, running)
    if num_batches_tracked is not None:  # once the step has run, as the operator does
        num_batches_tracked.add_(1)
    return out


_is_compiling = torch.compiler.is_compiling


def _prior_grads(a: Tensor, rstd: Tensor, s1: Tensor, s2: Tensor, d: Tensor, p: float) -> tuple[Tensor, Tensor]:
    """``(dmu_P, dvar_P)`` when only ``y`` has a gradient, in four ops: with ``a*S1 = -Gm`` and
    ``a*r*S2 = -2*Gv``, ``dvar_P = p*Gv`` and ``dmu_P = p*Gm - 2*p*q*d*Gv`` (``a = r*gamma``)."""
    dpv = torch.addcmul(_ZERO, a * rstd, s2, value=-0.5 * p)
    return torch.addcmul(_ZERO, a, s1, value=-p).addcmul_(d, dpv, value=-2.0 * (1.0 - p)), dpv


def _closed_form_backward(
    needs_input_grad: tuple[bool, ...],
    x: Tensor,
    weight: Tensor | None,
    post_mean: Tensor,
    rstd: Tensor,
    d: Tensor | None,
    pe: PriorWeight,
    eps: float,
    groups: int,
    bias_dtype: torch.dtype | None,
    prior_shape: tuple[torch.Size, torch.Size] | None,
    gy: Tensor | None,
    gm: Tensor | None,
    gv: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Gradients ``(dx, dweight, dbias, dmu_P, dvar_P)`` of every case (module docstring's formulas).

    ``needs_input_grad`` is the Function's, whose first five inputs are (x, weight, bias, mu_P, var_P);
    ``d = mu_B - mu_P`` (None when no group used a prior); ``pe`` the guarded prior weight.
    """
    single = groups == 1
    sdt = rstd.dtype
    xs = x if x.dtype == sdt else x.to(sdt)
    w = weight if weight is None or weight.dtype == sdt else weight.to(sdt)
    gys = gy if gy is None or gy.dtype == sdt else gy.to(sdt)
    need_dx = needs_input_grad[0]
    need_prior = needs_input_grad[3] or needs_input_grad[4]
    only_y = gm is None and gv is None
    shape = (-1,) + (1,) * (x.dim() - 2)  # (C,) -> (C, 1, ..., 1) to broadcast over (N, C, *)
    a = rstd if w is None else rstd * w  # r * gamma
    dx = s1 = s2 = None

    if gys is not None and single:
        # only_y: dx = q*BN_dx(g) + p*a*g, BN's fused backward with weight q*gamma and one more pass
        # (vectorized for NCHW; channels-last takes the two affine passes below)
        fused = need_dx and only_y and (d is None or gys.is_contiguous())
        w_bn = w
        if fused and d is not None:
            if isinstance(pe, Tensor):  # (inside torch.compile graphs)
                w_bn = (rstd.new_ones(rstd.shape) if w is None else w) * (1.0 - pe)
            elif w is None:
                w_bn = rstd.new_full(rstd.shape, 1.0 - pe)
            else:  # (1 - p) * gamma as gamma - p * gamma: an alpha, not a wrapped scalar
                w_bn = torch.add(w, w, alpha=-pe)
        dx, s2, s1 = _native_batch_norm_backward(
            gys, xs, w_bn, None, None, post_mean, rstd, True, eps, [fused, True, True],
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

    dpm = dpv = None
    if d is None:  # no prior, or every group's guard fired: plain BN, zero gradient to the prior
        dpm = dpv = torch.zeros_like(rstd) if need_prior else None
        need_prior = False
    if need_prior and only_y and not need_dx and s1 is not None and isinstance(pe, float):
        # the common case in few ops: a*S1 = -Gm, a*r*S2 = -2*Gv
        dpm, dpv = _prior_grads(a, rstd, s1, s2, d, pe)
    elif need_prior or need_dx:
        if s1 is None:  # no gradient reached y
            g_mean = torch.zeros_like(rstd) if gm is None else gm
            g_var = torch.zeros_like(rstd) if gv is None else gv
        else:  # Gm = gm - a*S1, Gv = gv - a*r*S2/2
            ar = a * rstd
            g_mean = torch.mul(a, s1).neg_() if gm is None else torch.addcmul(gm, a, s1, value=-1.0)
            g_var = torch.mul(ar, s2).mul_(-0.5) if gv is None else torch.addcmul(gv, ar, s2, value=-0.5)
        if need_prior:
            if isinstance(pe, Tensor):
                dpv = pe * g_var
                dpm = torch.addcmul(pe * g_mean, d * (pe * (1.0 - pe)), g_var, value=-2.0)
            else:
                dpv = g_var * pe
                dpm = torch.addcmul(g_mean * pe, d, g_var, value=-2.0 * pe * (1.0 - pe))
        if need_dx:  # dx = a*g + k2*x + shift with k2 = 2q*Gv/M, shift = q*(Gm - 2*Gv*mu_hat)/M
            m = (x.shape[0] // groups) * math.prod(x.shape[2:])
            q_m = (1.0 - pe) / m  # (1 - p) / M: a float, or a tensor
            k2 = g_var * (2.0 * q_m)
            shift = torch.addcmul(g_mean, g_var, post_mean, value=-2.0).mul_(q_m)
            if single and gys is not None:
                if gys.is_contiguous():  # NCHW: torch's fused per-channel affine (eval BN, eps=0) is vectorized
                    zeros = torch.zeros_like(a)
                    dx = torch.native_batch_norm(gys, a, shift, zeros, zeros + 1.0, False, 0.0, 0.0)[0]
                else:
                    dx = torch.addcmul(shift.view(shape), gys, a.view(shape))
                dx.addcmul_(xs, k2.view(shape))
            elif single:
                dx = torch.addcmul(shift.view(shape), xs, k2.view(shape))
            else:
                dx = torch.addcmul(_bcast(shift), _grouped(xs, groups), _bcast(k2))
                if gys is not None:
                    dx.addcmul_(_grouped(gys, groups), _bcast(a))
                dx = dx.reshape(x.shape)
    if dx is not None and dx.dtype != x.dtype:
        dx = dx.to(x.dtype)

    dweight = dbias = None
    if weight is not None and s2 is not None and needs_input_grad[1]:
        dweight = s2 if single else s2.sum(dim=0)  # (G, C) -> (C,)
        dweight = dweight if dweight.dtype == weight.dtype else dweight.to(weight.dtype)
    if bias_dtype is not None and s1 is not None and needs_input_grad[2]:
        dbias = s1 if single else s1.sum(dim=0)  # (G, C) -> (C,)
        dbias = dbias if dbias.dtype == bias_dtype else dbias.to(bias_dtype)

    if dpm is not None:  # back to the prior's shapes: (C,) or (G, C)
        mean_shape, var_shape = prior_shape
        dpm = _sum_to(dpm, mean_shape, single)
        dpv = _sum_to(dpv, var_shape, single)
    return dx, dweight, dbias, dpm, dpv


def _sum_to(grad: Tensor, shape: torch.Size, single: bool) -> Tensor:
    """A prior gradient, (C,) when single else (G, C), reduced/viewed to the prior's (C,) or (G, C)."""
    if single:
        return grad if len(shape) == 1 else grad.view(1, -1)  # (C,) -> (1, C)
    return grad.sum(dim=0) if len(shape) == 1 else grad  # (G, C) -> (C,) for a prior shared by the groups


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
    guard_scope: str = "layer",
    check_prior: bool = True,
    running: Running | None = None,
    flat: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BKN through the closed-form Function; ``(y, post_mean (G, C), post_var (G, C))``,
    or ``(C,)`` posteriors without ghost groups when ``flat`` (what the layer exposes; no view ops).

    ``guard_scope``: ``"layer"`` (one guard decision for all ghost groups) or ``"group"`` (one per group).
    ``check_prior``: raise ``ValueError`` for NaN/inf prior values or a negative prior variance
    (checked in the guard's host sync; skipped inside ``torch.compile`` graphs).
    ``running``: ``(running_mean, running_var, momentum, M)`` to update in place, as
    :func:`normlayers.reference.update_running_stats_reference` does.
    """
    groups = 1 if group_size is None else x.shape[0] // int(group_size)
    prior_mean = prior_var = None
    if prior is not None and prior_weight > 0.0:
        prior_mean, prior_var = prior  # (C,) or (G, C), broadcast over groups
        sdt = stats_dtype(x.dtype)
        if prior_mean.dtype != sdt or prior_var.dtype != sdt:
            prior_mean, prior_var = prior_mean.to(sdt), prior_var.to(sdt)
    y, post_mean, post_var = _BatchKalmanNormFn.apply(
        x, weight, bias, prior_mean, prior_var, float(prior_weight), float(eps), float(guard_ratio),
        check_guard_scope(guard_scope) == "layer", groups, check_prior, running,
    )
    if groups == 1 and not flat:  # the functional API's (G, C) = (1, C)
        return y, post_mean.view(1, -1), post_var.view(1, -1)
    return y, post_mean, post_var
