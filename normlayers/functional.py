"""Functional Batch Kalman Normalization: validation, backend dispatch and running statistics.

``batch_kalman_norm`` is to :class:`normlayers.BatchKalmanNorm` what ``F.batch_norm`` is to
``nn.BatchNorm2d``. Backends: ``"torch"`` (the fast CPU path in :mod:`normlayers.ops.torch_backend`, any device),
``"triton"`` (``normlayers.ops.triton_backend.batch_kalman_norm_triton``, imported lazily, same
signature minus ``backend``), ``"auto"`` = triton when ``x.is_cuda`` and triton imports, else torch.
Both backends follow :mod:`normlayers.reference` (the spec; its docstring lists the decisions); which function
implements which formula in each backend: the table in ``docs/normlayers.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from normlayers.ops.torch_backend import bkn_train, hot_train
from normlayers.ops.torch_backend import check_prior_values as check_prior_values_exact
from normlayers.reference import check_guard_scope, elements_per_group

__all__ = ["batch_kalman_norm", "general_path", "validate_inputs", "try_hot_path", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton")
Prior = tuple[Tensor, Tensor]


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def validate_inputs(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    prior: Prior | None,
    prior_weight: float,
    training: bool,
    group_size: int | None,
    *,
    check_prior_values: bool = True,
) -> int:
    """Check shapes and values; return ``G`` (number of ghost groups). Raises ``ValueError``/``TypeError``.

    ``check_prior_values=False`` leaves the NaN/inf/negative-variance checks of the prior to the
    caller (the torch path does them in the guard's host sync, see :func:`normlayers.ops.torch_backend.bkn_train`).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"batch_kalman_norm expects a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got shape {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but the input has {c} channels (expected ({c},))")
    if not 0.0 <= float(prior_weight) <= 1.0:
        raise ValueError(f"prior_weight must lie in [0, 1], got {prior_weight}")
    batch_stats = training or running_mean is None or running_var is None
    if not batch_stats:  # eval with running statistics: plain BN, groups and prior play no part
        return 1
    if group_size is not None and (int(group_size) <= 0 or n % int(group_size) != 0):
        raise ValueError(f"group_size={group_size} must be a positive divisor of the batch size {n}")
    groups = 1 if group_size is None else n // int(group_size)
    if elements_per_group(x, group_size) <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel (per ghost group) when training, got input size {tuple(x.shape)}"
            + ("" if group_size is None else f" with group_size={group_size}")
        )
    if prior is not None:
        if not (isinstance(prior, (tuple, list)) and len(prior) == 2):
            raise TypeError("prior must be a (mean, var) pair of tensors")
        for name, t in zip(("mean", "var"), prior):
            if not isinstance(t, Tensor):
                raise TypeError(f"prior {name} must be a tensor, got {type(t).__name__}")
            if tuple(t.shape) not in ((c,), (groups, c)):
                raise ValueError(
                    f"prior {name} has shape {tuple(t.shape)}; expected ({c},) or (G, C) = ({groups}, {c})"
                )
        if check_prior_values and not _is_compiling():  # a host sync; skipped inside torch.compile graphs
            mean, var = prior[0].detach(), prior[1].detach()
            # NaN/inf anywhere makes the sum non-finite, so `probe` is NaN; else it is min(var): one cheap sync
            probe = float((mean.sum() + var.sum()) * 0.0 + var.min())
            if not probe >= 0.0:
                check_prior_values_exact(mean, var)
    return groups


def _triton_impl(must_run: bool) -> Callable[..., tuple[Tensor, Tensor | None, Tensor | None]] | None:
    """The Triton launcher (None if it does not import, or, with ``must_run``, cannot run here)."""
    try:
        from normlayers.ops import triton_backend
    except ImportError:
        return None
    is_available = getattr(triton_backend, "is_available", None)
    if must_run and is_available is not None and not is_available():
        return None
    return triton_backend.batch_kalman_norm_triton


def try_hot_path(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    prior: Prior | None,
    prior_weight: float,
    training: bool,
    momentum: float | None,
    eps: float,
    guard_ratio: float,
    group_size: int | None,
    backend: str,
    guard_scope: str = "layer",
    num_batches_tracked: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The layer's common case (training with a prior, torch backend; NCHW or channels-last, with or without
    ghost groups) in few Python lines: ``(y, post_mean, post_var)`` from
    :func:`normlayers.ops.torch_backend.hot_train`, posteriors ``(C,)`` with one group and ``(G, C)`` with
    several, or ``None`` when it does not apply (then :func:`general_path` validates and runs).
    ``num_batches_tracked`` (a layer's counter) is incremented when the hot path runs; ``momentum=None`` then means
    the cumulative average."""
    if (training and prior is not None and isinstance(x, Tensor) and x.dim() > 2
            and (backend == "torch" or backend == "auto" and not x.is_cuda)):
        return hot_train(x, running_mean, running_var, weight, bias, prior, prior_weight, momentum, eps, guard_ratio,
                         group_size, guard_scope, num_batches_tracked)
    return None


def batch_kalman_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    prior: Prior | None = None,
    prior_weight: float = 0.0,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    guard_ratio: float = 100.0,
    group_size: int | None = None,
    backend: str = "auto",
    flat: bool = False,
    guard_scope: str = "layer",
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """BKN forward; returns ``(y, post_mean (G, C), post_var (G, C))``, posteriors ``None`` in eval.

    Training (or no running buffers): batch moments per ghost group combined with ``prior`` (a
    ``(mean, var)`` pair of shape ``(C,)`` or ``(G, C)``), running buffers updated in place (EMA with
    ``momentum``, unbiased variance, averaged over groups). Eval: plain BN with the running buffers.
    Posteriors are float32 (float64 for float64 input) and carry autograd graph to ``x``, gamma, beta
    and the prior. ``flat``: without ghost groups, posteriors of shape ``(C,)`` (what the layers expose;
    the torch path then needs no view ops). ``guard_scope``: the fallback to plain BN
    (``mean(var_P / (var_B + eps)) >= guard_ratio``) is decided once for the layer over all ghost groups and
    channels (``"layer"``, the authors') or once per ghost group (``"group"``); the same without groups.
    """
    out = try_hot_path(x, running_mean, running_var, weight, bias, prior, prior_weight, training, momentum, eps,
                       guard_ratio, group_size, backend, guard_scope)
    if out is not None:
        if flat or out[1].dim() == 2:  # (G, C) with several ghost groups
            return out
        return out[0], out[1].view(1, -1), out[2].view(1, -1)  # (C,) -> (1, C)
    return general_path(x, running_mean, running_var, weight, bias, prior=prior, prior_weight=prior_weight,
                        training=training, momentum=momentum, eps=eps, guard_ratio=guard_ratio, group_size=group_size,
                        backend=backend, flat=flat, guard_scope=guard_scope)


def general_path(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    prior: Prior | None,
    prior_weight: float,
    training: bool,
    momentum: float,
    eps: float,
    guard_ratio: float,
    group_size: int | None,
    backend: str,
    flat: bool,
    guard_scope: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """:func:`batch_kalman_norm` once :func:`try_hot_path` has declined (callers that tried it call this, not
    :func:`batch_kalman_norm`, so the hot path is not tried twice): every input validated, then the Triton or the
    torch backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_guard_scope(guard_scope)
    impl = None
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        impl = _triton_impl(must_run=backend == "auto")
        if impl is None and backend == "triton":
            raise ImportError("backend='triton' needs normlayers.ops.triton_backend (and the triton package)")
    # the torch training path checks the prior's values in the same host sync as its guard
    fused_checks = impl is None and prior_weight > 0.0 and (
        training or running_mean is None or running_var is None
    )
    validate_inputs(x, running_mean, running_var, weight, bias, prior, prior_weight, training, group_size,
                    check_prior_values=not fused_checks)
    if impl is not None:
        y, post_mean, post_var = impl(
            x, running_mean, running_var, weight, bias, prior=prior, prior_weight=prior_weight, training=training,
            momentum=momentum, eps=eps, guard_ratio=guard_ratio, group_size=group_size, guard_scope=guard_scope,
        )
        if flat and group_size is None and post_mean is not None and post_var is not None:
            post_mean, post_var = post_mean[0], post_var[0]  # (1, C) -> (C,)
        return y, post_mean, post_var
    return _batch_kalman_norm_torch(
        x, running_mean, running_var, weight, bias, prior=prior, prior_weight=prior_weight, training=training,
        momentum=momentum, eps=eps, guard_ratio=guard_ratio, group_size=group_size, flat=flat,
        guard_scope=guard_scope,
    )


def _batch_kalman_norm_torch(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    prior: Prior | None,
    prior_weight: float,
    training: bool,
    momentum: float,
    eps: float,
    guard_ratio: float,
    group_size: int | None,
    flat: bool,
    guard_scope: str,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    if not training and running_mean is not None and running_var is not None:
        return _eval(x, running_mean, running_var, weight, bias, eps), None, None
    running = None
    if training and running_mean is not None and running_var is not None:
        running = (running_mean, running_var, float(momentum), elements_per_group(x, group_size))
    return bkn_train(x, weight, bias, prior, float(prior_weight), eps, guard_ratio, group_size,
                     guard_scope=guard_scope, running=running, flat=flat)


def _eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
          eps: float) -> Tensor:
    """Plain BN with running statistics; low-precision inputs use an fp32 scale/shift (y = x*a + b)."""
    if x.dtype in (torch.float32, torch.float64) and running_mean.dtype == x.dtype:
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
    a = torch.rsqrt(running_var.float() + eps)
    if weight is not None:
        a = a * weight.float()
    b = -running_mean.float() * a
    if bias is not None:
        b = b + bias.float()
    shape = (-1,) + (1,) * (x.dim() - 2)  # (C,) -> (C, 1, ..., 1) to broadcast over (N, C, *)
    return torch.addcmul(b.view(shape), x.float(), a.view(shape)).to(x.dtype)

