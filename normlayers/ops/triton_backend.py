"""Fused Triton Batch Kalman Normalization: launchers, the autograd Function and the public entry point.

The kernels live in :mod:`normlayers.ops.triton_kernels` (imported lazily, so this module imports
without triton); the spec they follow is :mod:`normlayers.reference` (``batch_kalman_norm_reference``
and ``update_running_stats_reference``). Passes and bytes per element (fp32):

* forward, slice fits one program: 1 kernel reads x, writes y (8 B/elem) and finalizes the
  statistics; with an active guard the pass is speculative (mixture assumed), then a one-program
  finalize decides the guard (once for the layer, or per ghost group with ``guard_scope="group"``) and a
  fix-up kernel rewrites y only for groups that fell back to BN.
* forward, split: chunk statistics (4 B/elem), a merge per (group, channel), the guard/EMA
  finalize when needed, then ``y = x*a + b`` (8 B/elem): 12 B/elem in all.
* backward: single pass reads x and dy and writes dx (12 B/elem); split: chunk sums (8 B/elem),
  a finalize, then dx (12 B/elem): 20 B/elem.
* eval: one elementwise kernel with the running statistics folded in (8 B/elem).

Everything is deterministic: partials go to per-program buffers reduced in a fixed order; no atomics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache, lru_cache
from types import ModuleType

import torch
from torch import Tensor

from normlayers.reference import check_guard_scope

__all__ = ["batch_kalman_norm_triton", "is_available", "KernelConfig", "bkn_forward", "bkn_backward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@lru_cache(maxsize=1)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def is_available() -> bool:
    """True when triton imports and kernels can run: a CUDA device, or ``TRITON_INTERPRET=1`` (CPU)."""
    return _triton_importable() and (torch.cuda.is_available() or _interpreting())


def _kernels() -> ModuleType:
    if not _triton_importable():
        raise ImportError("the Triton BKN kernels need the 'triton' package (pip install triton)")
    from normlayers.ops import triton_kernels

    return triton_kernels


# ----------------------------------------------------------------------------------------------
# Launchers: validate, pick block sizes, allocate, launch.
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelConfig:
    """Block-size policy. ``single_pass_max_*``: most elements one program holds in registers
    (a (group, channel-block) slice up to this size takes the single-pass kernels); ``chunk``:
    force the split path's chunk length (elements, rounded up to whole tiles) — tests lower both."""

    single_pass_max_fwd: int = 16384
    single_pass_max_bwd: int = 8192
    tile_fwd: int = 4096
    tile_bwd: int = 2048
    programs_per_sm: int = 8
    max_chunks: int = 1024
    chunk: int | None = None


@dataclass(frozen=True)
class _Geometry:
    """(N, C, L) view of x: sizes, element strides, ghost groups and the memory format to allocate."""

    n: int
    c: int
    length: int
    s_n: int
    s_c: int
    s_l: int
    group: int  # samples per ghost group (g)
    groups: int  # G
    memory_format: torch.memory_format

    @property
    def m(self) -> int:
        return self.group * self.length


@dataclass(frozen=True)
class _Plan:
    block_c: int
    block_m: int
    single: bool
    chunk: int
    chunks: int
    num_warps: int

    def grid(self, geo: _Geometry) -> tuple[int, int, int]:
        return (_cdiv(geo.c, self.block_c), geo.groups, self.chunks)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _geometry(x: Tensor, group_size: int | None) -> _Geometry:
    """Validate x's dtype/shape/layout and describe it; channels-last is read in place, never copied."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"the Triton BKN kernels support float32/float16/bfloat16 inputs, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"input is empty: shape {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    length = math.prod(x.shape[2:])
    g = n if group_size is None else int(group_size)
    if g <= 0 or n % g != 0:
        raise ValueError(f"group_size={group_size} must be a positive divisor of the batch size {n}")
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if x.is_contiguous():
        fmt, strides = torch.contiguous_format, (c * length, length, 1)
    elif channels_last is not None and x.is_contiguous(memory_format=channels_last):
        fmt, strides = channels_last, (length * c, 1, c)
    else:
        raise ValueError(
            f"x must be contiguous (NCHW) or channels_last; got shape {tuple(x.shape)} strides {x.stride()}"
        )
    return _Geometry(n, c, length, *strides, group=g, groups=n // g, memory_format=fmt)


def _check_vector(name: str, t: Tensor | None, shapes: tuple[tuple[int, ...], ...], device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if tuple(t.shape) not in shapes:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected one of {shapes}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_device(x: Tensor) -> None:
    if not x.is_cuda and not _interpreting():
        raise ValueError(f"x is on {x.device}: the Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1 on CPU)")


@cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _plan(geo: _Geometry, single_max: int, tile: int, cfg: KernelConfig, device: torch.device) -> _Plan:
    """Tile shape and path: channels-contiguous layouts take up to 32 channels per tile (coalescing)."""
    block_c = min(_next_pow2(geo.c), 32) if geo.s_c == 1 else 1
    slice_pow2 = _next_pow2(geo.m)
    while block_c > 1 and block_c * slice_pow2 > single_max:
        block_c //= 2
    if block_c * slice_pow2 <= single_max and cfg.chunk is None:
        return _Plan(block_c, slice_pow2, True, geo.m, 1, _num_warps(block_c * slice_pow2))
    block_c = min(_next_pow2(geo.c), 32) if geo.s_c == 1 else 1
    block_m = max(16, min(slice_pow2, _next_pow2(max(1, tile // block_c))))
    tiles = _cdiv(geo.m, block_m)
    if cfg.chunk is not None:
        tiles_per_chunk = _cdiv(cfg.chunk, block_m)
    else:
        target = cfg.programs_per_sm * _num_sms(device)
        chunks = min(max(1, _cdiv(target, _cdiv(geo.c, block_c) * geo.groups)), tiles, cfg.max_chunks)
        tiles_per_chunk = _cdiv(tiles, chunks)
    chunk = tiles_per_chunk * block_m
    return _Plan(block_c, block_m, False, chunk, _cdiv(geo.m, chunk), _num_warps(block_c * block_m))


def _merge_block_c(c: int, chunks: int) -> int:
    """Channels per program of the chunk-merging kernels: a (BLOCK_C, BLOCK_S) tile of <= 4096 values."""
    return max(1, min(_next_pow2(c), 32, 4096 // _next_pow2(chunks)))


def _num_warps(tile_elements: int) -> int:
    """4 warps up to 2K elements per program, 8 up to 8K, 16 beyond (keeps ~64 fp32 values per thread)."""
    return 4 if tile_elements <= 2048 else 8 if tile_elements <= 8192 else 16


@dataclass(frozen=True)
class BKNOptions:
    """Scalar hyper-parameters of one BKN call (hashable, so it can ride along in autograd)."""

    prior_weight: float = 0.0
    momentum: float = 0.1
    eps: float = 1e-5
    guard_ratio: float = 100.0
    group_size: int | None = None
    config: KernelConfig = KernelConfig()
    guard_scope: str = "layer"  # "layer": one guard decision for all ghost groups; "group": one per group


@dataclass
class _Saved:
    """What the backward needs (O(G*C) apart from x): mu_hat/rstd (or running stats), batch mean, flags."""

    mean: Tensor  # (G, C) mu_hat, or (C,) running mean (eval)
    stat2: Tensor  # (G, C) rstd, or (C,) running var (eval)
    mean_b: Tensor | None  # (G, C) batch mean (training)
    fire: Tensor | None  # (G,) int32 guard flags (training with a prior)
    stats_from_x: bool


def _mixture_weights(p: float) -> tuple[float, float, float]:
    return p, 1.0 - p, p * (1.0 - p)


def bkn_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    prior_mean: Tensor | None,
    prior_var: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    *,
    batch_stats: bool,
    update_running: bool,
    opts: BKNOptions,
) -> tuple[Tensor, Tensor | None, Tensor | None, _Saved]:
    """Launch the forward; returns ``(y, post_mean, post_var, saved)`` (posteriors ``None`` in eval)."""
    k = _kernels()
    geo = _geometry(x, opts.group_size if batch_stats else None)
    _check_device(x)
    dev = x.device
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        _check_vector(name, t, ((geo.c,),), dev)
    for name, t in (("prior mean", prior_mean), ("prior var", prior_var)):
        _check_vector(name, t, ((geo.c,), (geo.groups, geo.c)), dev)
    y = torch.empty_like(x, memory_format=geo.memory_format)
    dummy = x  # placeholder pointer for arguments a constexpr flag leaves unread
    w_arg = weight if weight is not None else dummy
    b_arg = bias if bias is not None else dummy
    strides = (geo.s_n, geo.s_c, geo.s_l)

    if not batch_stats:
        if running_mean is None or running_var is None:
            raise ValueError("eval mode needs running_mean and running_var")
        plan = _plan(geo, 0, opts.config.tile_fwd, opts.config, dev)  # single_max=0: elementwise path
        k._bkn_fwd_normalize_kernel[plan.grid(geo)](
            x, y, running_mean, running_var, w_arg, b_arg, dummy,
            geo.c, geo.length, geo.group, *strides, 0, opts.eps, plan.chunk,
            STAT2_IS_VAR=True, ONLY_FIRED=False, HAS_W=weight is not None, HAS_B=bias is not None,
            BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, num_warps=plan.num_warps,
        )
        return y, None, None, _Saved(running_mean, running_var, None, None, False)

    if geo.m <= 1:
        raise ValueError(f"expected more than 1 value per channel per ghost group, got input size {tuple(x.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    p = float(opts.prior_weight)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prior_weight must lie in [0, 1], got {opts.prior_weight}")
    if (prior_mean is None) != (prior_var is None):
        raise ValueError("prior mean and var must both be given or both be None")
    use_prior = prior_mean is not None and p > 0.0
    guard = use_prior and not math.isinf(opts.guard_ratio)
    update_running = update_running and running_mean is not None
    pm_arg = prior_mean if use_prior else dummy
    pv_arg = prior_var if use_prior else dummy
    s_pg = geo.c if use_prior and prior_mean.dim() == 2 else 0
    if use_prior and prior_var.dim() != prior_mean.dim():
        raise ValueError(f"prior mean {tuple(prior_mean.shape)} and var {tuple(prior_var.shape)} shapes differ")
    rm_arg = running_mean if update_running else dummy
    rv_arg = running_var if update_running else dummy
    count = geo.m
    momentum = float(opts.momentum)
    momentum_var = momentum * (count / (count - 1) if count > 1 else 1.0)
    # Posterior and EMA fused into the reduction when nothing crosses (group, channel) boundaries.
    ema_inline = update_running and not guard and geo.groups == 1
    # (G, C) fp32 each; separate allocations because the posteriors are returned to the caller.
    mean_b, m2_b, post_mean, post_var, rstd = (
        torch.empty((geo.groups, geo.c), device=dev, dtype=torch.float32) for _ in range(5)
    )
    # (G,) guard flags: written by the finalize when guarding, all zero when the guard is disabled
    fire = (torch.empty if guard else torch.zeros)((geo.groups,), device=dev, dtype=torch.int32)
    pw = _mixture_weights(p)
    plan = _plan(geo, opts.config.single_pass_max_fwd, opts.config.tile_fwd, opts.config, dev)
    grid = plan.grid(geo)
    if plan.single:
        k._bkn_fwd_single_kernel[grid[:2]](
            x, y, w_arg, b_arg, pm_arg, pv_arg, mean_b, m2_b, post_mean, post_var, rstd, rm_arg, rv_arg,
            geo.c, geo.length, geo.group, *strides, s_pg, *pw, opts.eps, momentum, momentum_var,
            HAS_W=weight is not None, HAS_B=bias is not None, USE_PRIOR=use_prior, UPDATE_RUNNING=ema_inline,
            BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, num_warps=plan.num_warps,
        )
    else:
        partial = torch.empty((2, geo.groups, geo.c, plan.chunks), device=dev, dtype=torch.float32)
        k._bkn_fwd_partial_kernel[grid](
            x, partial[0], partial[1], geo.c, geo.length, geo.group, *strides, plan.chunk, plan.chunks,
            BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, num_warps=plan.num_warps,
        )
        block_c = _merge_block_c(geo.c, plan.chunks)
        k._bkn_fwd_combine_kernel[(_cdiv(geo.c, block_c), geo.groups)](
            partial[0], partial[1], pm_arg, pv_arg, mean_b, m2_b, post_mean, post_var, rstd, rm_arg, rv_arg,
            geo.c, geo.length, geo.group, plan.chunk, plan.chunks, s_pg, *pw, opts.eps, momentum, momentum_var,
            USE_PRIOR=use_prior, UPDATE_RUNNING=ema_inline, BLOCK_C=block_c, BLOCK_S=_next_pow2(plan.chunks),
        )
    if guard or (update_running and not ema_inline):
        k._bkn_fwd_finalize_kernel[(1,)](
            mean_b, m2_b, pv_arg, post_mean, post_var, rstd, fire, rm_arg, rv_arg,
            geo.groups, geo.c, geo.m, s_pg, float(opts.guard_ratio), opts.eps, momentum, momentum_var,
            GUARD=guard, LAYER_GUARD=opts.guard_scope == "layer" and geo.groups > 1,
            UPDATE_RUNNING=update_running and not ema_inline,
            BLOCK_G=min(_next_pow2(geo.groups), 16), BLOCK_C=min(_next_pow2(geo.c), 128),
        )
    if not plan.single or guard:
        k._bkn_fwd_normalize_kernel[grid](
            x, y, post_mean, rstd, w_arg, b_arg, fire, geo.c, geo.length, geo.group, *strides, geo.c,
            opts.eps, plan.chunk, STAT2_IS_VAR=False, ONLY_FIRED=plan.single, HAS_W=weight is not None,
            HAS_B=bias is not None, BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, num_warps=plan.num_warps,
        )
    return y, post_mean, post_var, _Saved(post_mean, rstd, mean_b, fire if use_prior else None, True)


def bkn_backward(
    x: Tensor,
    grad_y: Tensor | None,
    grad_post_mean: Tensor | None,
    grad_post_var: Tensor | None,
    weight: Tensor | None,
    prior_mean: Tensor | None,
    saved: _Saved,
    *,
    batch_stats: bool,
    opts: BKNOptions,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """Launch the backward; returns per-group-reduced ``(dx, dweight, dbias, dprior_mean, dprior_var)``."""
    k = _kernels()
    geo = _geometry(x, opts.group_size if batch_stats else None)
    dev = x.device
    if grad_y is not None and grad_y.stride() != x.stride():  # e.g. expanded ones from y.sum()
        grad_y = grad_y.contiguous(memory_format=geo.memory_format)
        if grad_y.stride() != x.stride():
            grad_y = torch.empty_like(x, dtype=grad_y.dtype, memory_format=geo.memory_format).copy_(grad_y)
    has_dpost = saved.stats_from_x and (grad_post_mean is not None or grad_post_var is not None)
    if has_dpost:
        dpost = [
            torch.zeros((geo.groups, geo.c), device=dev, dtype=torch.float32) if t is None
            else t.to(torch.float32).contiguous()
            for t in (grad_post_mean, grad_post_var)
        ]  # (G, C) fp32 each
    p = float(opts.prior_weight)
    use_prior = saved.fire is not None
    pw = _mixture_weights(p)
    dummy = x
    s_pg = geo.c if use_prior and prior_mean.dim() == 2 else 0
    s_g = geo.c if saved.stats_from_x else 0
    dx = torch.empty_like(x, memory_format=geo.memory_format)
    parts = torch.empty((4, geo.groups, geo.c), device=dev, dtype=torch.float32)  # dgamma, dbeta, dmu_P, dvar_P
    strides = (geo.s_n, geo.s_c, geo.s_l)
    common = dict(
        HAS_W=weight is not None, USE_PRIOR=use_prior, HAS_DPOST=has_dpost,
        STATS_FROM_X=saved.stats_from_x, STAT2_IS_VAR=not saved.stats_from_x,
    )
    coef_args = (
        weight if weight is not None else dummy, prior_mean if use_prior else dummy,
        saved.mean_b if saved.mean_b is not None else dummy, saved.fire if use_prior else dummy,
        saved.mean, saved.stat2, dpost[0] if has_dpost else dummy, dpost[1] if has_dpost else dummy,
        parts[0], parts[1], parts[2], parts[3],
    )
    dy_arg = grad_y if grad_y is not None else dummy
    plan = _plan(geo, opts.config.single_pass_max_bwd, opts.config.tile_bwd, opts.config, dev)
    grid = plan.grid(geo)
    if plan.single:
        k._bkn_bwd_single_kernel[grid[:2]](
            x, dy_arg, dx, *coef_args, geo.c, geo.length, geo.group, *strides, s_pg, s_g, *pw, opts.eps,
            HAS_DY=grad_y is not None, **common,
            BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, num_warps=plan.num_warps,
        )
    else:
        sums = torch.empty((2, geo.groups, geo.c, plan.chunks), device=dev, dtype=torch.float32)
        if grad_y is not None:
            k._bkn_bwd_partial_kernel[grid](
                x, grad_y, saved.mean, saved.stat2, sums[0], sums[1], geo.c, geo.length, geo.group, *strides,
                s_g, opts.eps, plan.chunk, plan.chunks, STAT2_IS_VAR=not saved.stats_from_x,
                BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, num_warps=plan.num_warps,
            )
        coefs = torch.empty((3, geo.groups, geo.c), device=dev, dtype=torch.float32)
        block_c = _merge_block_c(geo.c, plan.chunks)
        k._bkn_bwd_finalize_kernel[(_cdiv(geo.c, block_c), geo.groups)](
            sums[0], sums[1], *coef_args, coefs[0], coefs[1], coefs[2],
            geo.c, geo.length, geo.group, plan.chunks, s_pg, s_g, *pw, opts.eps,
            HAS_DY=grad_y is not None, **common, BLOCK_C=block_c, BLOCK_S=_next_pow2(plan.chunks),
        )
        k._bkn_bwd_dx_kernel[grid](
            x, dy_arg, dx, saved.mean, saved.stat2, coefs[0], coefs[1], coefs[2],
            geo.c, geo.length, geo.group, *strides, s_g, opts.eps, plan.chunk,
            HAS_DY=grad_y is not None, STAT2_IS_VAR=not saved.stats_from_x,
            BLOCK_C=plan.block_c, BLOCK_M=plan.block_m, num_warps=plan.num_warps,
        )
    # (G, C) -> (C,): a fixed-order torch reduction over groups (deterministic).
    reduced = parts[:2].sum(dim=1) if geo.groups > 1 else parts[:2, 0]
    dweight = reduced[0].to(weight.dtype) if weight is not None else None
    dbias = reduced[1]
    dpm = dpv = None
    if use_prior:
        dpm, dpv = parts[2], parts[3]
        if prior_mean.dim() == 1:
            dpm, dpv = dpm.sum(dim=0), dpv.sum(dim=0)  # shared (C,) prior: (G, C) -> (C,)
    return dx, dweight, dbias, dpm, dpv


# ----------------------------------------------------------------------------------------------
# Autograd wiring and the public entry point.
# ----------------------------------------------------------------------------------------------


class _BKNFunction(torch.autograd.Function):
    """Training-mode BKN: outputs ``(y, post_mean, post_var)``, all differentiable."""

    @staticmethod
    def forward(ctx, x, weight, bias, prior_mean, prior_var, running_mean, running_var, update_running, opts):
        y, post_mean, post_var, saved = bkn_forward(
            x, weight, bias, prior_mean, prior_var, running_mean, running_var,
            batch_stats=True, update_running=update_running, opts=opts,
        )
        ctx.set_materialize_grads(False)
        ctx.opts = opts
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.prior_dtypes = (prior_mean.dtype, prior_var.dtype) if prior_mean is not None else None
        # everything through save_for_backward: post_mean is an output (a ctx attribute would be a ref cycle)
        ctx.save_for_backward(x, weight, prior_mean, saved.mean, saved.stat2, saved.mean_b, saved.fire)
        return y, post_mean, post_var

    @staticmethod
    def backward(ctx, grad_y, grad_post_mean, grad_post_var):
        x, weight, prior_mean, mean, stat2, mean_b, fire = ctx.saved_tensors
        saved = _Saved(mean, stat2, mean_b, fire, True)
        dx, dw, db, dpm, dpv = bkn_backward(
            x, grad_y, grad_post_mean, grad_post_var, weight, prior_mean, saved, batch_stats=True, opts=ctx.opts,
        )
        db = db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        if dpm is not None:
            dpm, dpv = dpm.to(ctx.prior_dtypes[0]), dpv.to(ctx.prior_dtypes[1])
        return dx, dw, db, dpm, dpv, None, None, None, None


class _BNEvalFunction(torch.autograd.Function):
    """Eval-mode BN with running statistics (y = x*a + b); differentiable in x, gamma and beta."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, opts):
        y, _, _, saved = bkn_forward(
            x, weight, bias, None, None, running_mean, running_var, batch_stats=False, update_running=False, opts=opts,
        )
        ctx.opts = opts
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # running buffers may be trained again before this backward runs: keep the values used
        ctx.save_for_backward(x, weight, running_mean.detach().clone(), running_var.detach().clone())
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, running_mean, running_var = ctx.saved_tensors
        saved = _Saved(running_mean, running_var, None, None, False)
        dx, dw, db, _, _ = bkn_backward(x, grad_y, None, None, weight, None, saved, batch_stats=False, opts=ctx.opts)
        return dx, dw, db.to(ctx.bias_dtype) if ctx.bias_dtype is not None else None, None, None, None


def batch_kalman_norm_triton(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    prior: tuple[Tensor, Tensor] | None = None,
    prior_weight: float = 0.0,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    guard_ratio: float = 100.0,
    group_size: int | None = None,
    config: KernelConfig | None = None,
    guard_scope: str = "layer",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Fused BKN (same contract as ``normlayers.functional.batch_kalman_norm``, backend "triton").

    Returns ``(y, post_mean (G, C) fp32, post_var (G, C) fp32)``; posteriors are ``None`` in eval.
    Batch statistics are used when ``training`` or when a running buffer is missing; running
    buffers are updated in place only when training.
    """
    if not _triton_importable():
        raise ImportError("batch_kalman_norm_triton needs the 'triton' package (pip install triton)")
    opts = BKNOptions(float(prior_weight), float(momentum), float(eps), float(guard_ratio), group_size,
                      config or KernelConfig(), check_guard_scope(guard_scope))
    prior_mean, prior_var = (None, None) if prior is None else prior
    if prior is not None and not (isinstance(prior, (tuple, list)) and len(prior) == 2):
        raise TypeError("prior must be a (mean, var) pair of tensors")
    batch_stats = training or running_mean is None or running_var is None
    tensors = (x, weight, bias, prior_mean, prior_var)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not batch_stats:
        if not needs_grad:
            y = bkn_forward(x, weight, bias, None, None, running_mean, running_var,
                            batch_stats=False, update_running=False, opts=opts)[0]
            return y, None, None
        return _BNEvalFunction.apply(x, weight, bias, running_mean, running_var, opts), None, None
    if not needs_grad:
        y, pm, pv, _ = bkn_forward(x, weight, bias, prior_mean, prior_var, running_mean, running_var,
                                   batch_stats=True, update_running=training, opts=opts)
        return y, pm, pv
    return _BKNFunction.apply(x, weight, bias, prior_mean, prior_var, running_mean, running_var, training, opts)
