"""Plain-torch reference of Batch Kalman Normalization: this file IS the spec (autograd through it).

Every fast path (``normlayers.functional`` on CPU, ``normlayers.ops.triton_backend`` on GPU) is tested
against these two functions. Notation and background: docs/background/bkn.md.

Decisions (each one is also stated in ``normlayers/__init__.py``):

* Layout. ``x`` is ``(N, C, *)``. With ``group_size=g`` the batch is split into ``G = N // g``
  consecutive "ghost" groups (samples ``[k*g, (k+1)*g)`` form group ``k``); each group has its own
  batch moments, prior and posterior; gamma/beta are shared. Without ``group_size``, ``G = 1``.
  ``M`` = elements per channel per group = ``g * prod(*)``.
* Statistics are computed in float32 (float64 when ``x`` is float64), whatever ``x``'s dtype; ``y``
  is returned in ``x``'s dtype; posteriors are returned in the statistics dtype, shape ``(G, C)``.
* Prior: ``prior_mean`` / ``prior_var`` of shape ``(C,)`` (shared by all groups) or ``(G, C)``.
  ``None`` (no prior) or ``prior_weight == 0`` gives BatchNorm exactly: the batch moments are used
  as they are (no ``0 * prior`` arithmetic), so the result is BatchNorm's and gradients to the
  prior are zero.
* Guard: a switch to plain BN for the step (posterior = batch moments, no gradient to the prior),
  decided on ``var_P / (var_B + eps)`` (``eps`` keeps a constant channel, ``var_B = 0``, finite).
  ``guard_scope="layer"`` (the default, the authors' code): ONE decision for the whole layer,
  ``mean over (G, C) of var_P / (var_B + eps) >= guard_ratio``, applied to every ghost group, so all
  groups of a step use the same formula. ``guard_scope="group"``: one decision per ghost group ``k``,
  ``mean_c(var_P[k, c] / (var_B[k, c] + eps)) >= guard_ratio``. Ungrouped (``G = 1``) both are the
  same. The comparison is not differentiated (it is a switch). ``guard_ratio=float("inf")`` disables it.
* Running statistics (:func:`update_running_stats_reference`): EMA of the posterior averaged over
  ALL ghost groups (the reference code used only the first group; the average has the same
  expectation and lower noise, and it is what the layer normalizes with in training). The running
  variance is UNBIASED like torch's BatchNorm: the posterior variance is multiplied by
  ``M / (M - 1)`` before the EMA, so without a prior the buffers equal ``F.batch_norm``'s exactly
  (the drop-in promise, including ``load_state_dict`` from ``nn.BatchNorm2d`` checkpoints).
  The factor also scales the prior part of the mixture; for spatial layers ``M`` is in the
  hundreds and the factor is ~1.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "GUARD_SCOPES", "batch_kalman_norm_reference", "check_guard_scope", "elements_per_group", "stats_dtype",
    "update_running_stats_reference",
]

GUARD_SCOPES = ("layer", "group")  # the first is the default


def check_guard_scope(guard_scope: str) -> str:
    """``guard_scope`` if it is one of :data:`GUARD_SCOPES`, else ``ValueError``."""
    if guard_scope not in GUARD_SCOPES:
        raise ValueError(f"guard_scope must be one of {GUARD_SCOPES}, got {guard_scope!r}")
    return guard_scope


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are computed and kept in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_kalman_norm_reference(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    prior_mean: Tensor | None,
    prior_var: Tensor | None,
    prior_weight: float,
    eps: float = 1e-5,
    guard_ratio: float = 100.0,
    group_size: int | None = None,
    guard_scope: str = "layer",
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BKN forward in plain torch; returns ``(y, post_mean (G, C), post_var (G, C))``.

    ``mu_hat = p*mu_P + (1-p)*mu_B``;
    ``var_hat = p*var_P + (1-p)*var_B + p*(1-p)*(mu_B - mu_P)**2``;
    ``y = gamma * (x - mu_hat) / sqrt(var_hat + eps) + beta``. Differentiable in every tensor input.
    """
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, *), got {tuple(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    g = n if group_size is None else int(group_size)
    if g <= 0 or n % g != 0:
        raise ValueError(f"group_size={group_size} must be positive and divide the batch size {n}")
    groups = n // g
    sdt = stats_dtype(x.dtype)
    p = float(prior_weight)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"prior_weight must lie in [0, 1], got {prior_weight}")
    check_guard_scope(guard_scope)

    # (N, C, *) -> (G, g, C, L): ghost group, sample in group, channel, flattened spatial
    xs = x.to(sdt).reshape(groups, g, c, -1)
    var_b, mu_b = torch.var_mean(xs, dim=(1, 3), correction=0)  # (G, C) each, biased

    use_prior = prior_mean is not None and prior_var is not None and p > 0.0
    if use_prior:
        mu_p = prior_mean.to(sdt).expand(groups, c)  # (C,) or (G, C) -> (G, C)
        var_p = prior_var.to(sdt).expand(groups, c)
        d = mu_b - mu_p
        mix_mean = p * mu_p + (1.0 - p) * mu_b
        mix_var = p * var_p + (1.0 - p) * var_b + p * (1.0 - p) * d * d
        ratios = var_p / (var_b + eps)  # (G, C)
        if guard_scope == "layer":
            ratio = ratios.mean().expand(groups, 1)  # one scalar for the layer, the same in every group
        else:
            ratio = ratios.mean(dim=1, keepdim=True)  # (G, 1): one scalar per group
        fire = (ratio >= guard_ratio).detach()
        post_mean = torch.where(fire, mu_b, mix_mean)
        post_var = torch.where(fire, var_b, mix_var)
    else:
        post_mean, post_var = mu_b, var_b

    rstd = torch.rsqrt(post_var + eps)  # (G, C)
    # (G, C) -> (G, 1, C, 1) to broadcast over (G, g, C, L)
    xh = (xs - post_mean[:, None, :, None]) * rstd[:, None, :, None]
    y = xh
    if weight is not None:
        y = y * weight.to(sdt)[None, None, :, None]
    if bias is not None:
        y = y + bias.to(sdt)[None, None, :, None]
    # (G, g, C, L) -> (N, C, *)
    y = y.reshape(x.shape).to(x.dtype)
    return y, post_mean, post_var


def update_running_stats_reference(
    running_mean: Tensor,
    running_var: Tensor,
    post_mean: Tensor,
    post_var: Tensor,
    momentum: float,
    count: int,
) -> None:
    """In-place EMA of the posterior: mean over ghost groups, unbiased variance (torch's BN habit).

    ``running = (1 - momentum) * running + momentum * stat`` with ``stat_mean = mean_k post_mean[k]``
    and ``stat_var = mean_k post_var[k] * count / (count - 1)``; ``count`` is ``M``, the number of
    elements per channel per group. ``count == 1`` keeps the biased value (torch would divide by 0).
    """
    pm, pv = post_mean.detach(), post_var.detach()
    if pm.dim() == 2:  # (G, C) -> (C,)
        pm, pv = (pm[0], pv[0]) if pm.shape[0] == 1 else (pm.mean(dim=0), pv.mean(dim=0))
    factor = count / (count - 1) if count > 1 else 1.0
    pv = pv * factor
    if pm.dtype != running_mean.dtype:
        pm, pv = pm.to(running_mean.dtype), pv.to(running_var.dtype)
    running_mean.lerp_(pm, float(momentum))
    running_var.lerp_(pv, float(momentum))


def elements_per_group(x: Tensor, group_size: int | None) -> int:
    """``M``: elements per channel per ghost group."""
    g = x.shape[0] if group_size is None else group_size
    return g * math.prod(x.shape[2:])
