"""Transitions: how layer k-1's posterior becomes layer k's prior (docs/background/bkn.md, "The transition").

Both transitions take the posterior ``(mean, var)`` of a BKN input, ``(C_in,)`` or ``(G, C_in)``,
apply an elementwise activation (ReLU by default; see :data:`ACTIVATIONS`) and the next conv/linear
layer's OWN weights, and return per-channel ``(mean, var)`` of shape ``(G, C_out)`` (float32,
differentiable: no stop-gradient). Like the reference they ignore the BN affine in between.

* :func:`monte_carlo_prior` is the reference's: one random image per ghost group drawn from
  ``N(mean, var)`` at the conv input's spatial size, the activation, the conv, then the spatial mean
  and (biased) variance per channel. Zero padding is part of the sample, so border pixels pull the
  mean towards the bias and add spread; with ``padding=0`` and a large image it converges to the
  analytic moments at rate ``1/sqrt(H*W)``. Any elementwise activation works (a name or a callable).
* :func:`analytic_prior` is deterministic: the activation's first two moments under ``N(mean, var)``
  (closed form for ReLU and identity; Gauss-Hermite quadrature with :data:`QUADRATURE_NODES` nodes
  for every other named activation), then the linear moments of the conv (mean ``sum W*mu + b``,
  variance ``sum W**2 * var``, independent inputs). It describes an interior output pixel: zero
  padding, stride and dilation do not change it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "monte_carlo_prior",
    "analytic_prior",
    "activation_moments",
    "rectified_gaussian_moments",
    "residual_merge",
    "pad_channels",
    "Prior",
    "ACTIVATIONS",
    "LINEAR_SAMPLES",
    "QUADRATURE_NODES",
]

Prior = tuple[Tensor, Tensor]
Activation = str | Callable[[Tensor], Tensor] | None
LINEAR_SAMPLES = 64  # Monte-Carlo samples per group through an nn.Linear (it has no spatial extent)
QUADRATURE_NODES = 32  # Gauss-Hermite nodes for the analytic moments of smooth activations
_SQRT_EPS = 1e-12  # keeps d sqrt(var)/d var finite for a constant channel (var = 0)

# Elementwise activations the transitions know by name (convert recognizes their modules/functions).
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "hardswish": F.hardswish,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
}


def _resolve_activation(activation: Activation, relu: bool) -> tuple[str | None, Callable[[Tensor], Tensor]]:
    """(name or None for a callable, function); ``activation=None`` keeps the legacy ``relu`` flag."""
    if activation is None:
        activation = "relu" if relu else "identity"
    if callable(activation):
        return None, activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)} (or pass a callable)")
    return activation, ACTIVATIONS[activation]


def _hermite(nodes: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """Probabilists' Gauss-Hermite nodes and weights normalized to sum 1: E f(Z) ~ sum w_i f(x_i)."""
    x, w = np.polynomial.hermite_e.hermegauss(nodes)  # weight exp(-x^2/2), sum(w) = sqrt(2 pi)
    return (torch.as_tensor(x, dtype=dtype, device=device), torch.as_tensor(w / w.sum(), dtype=dtype, device=device))


def _as_groups(post_mean: Tensor, post_var: Tensor, layer: nn.Module) -> tuple[Tensor, Tensor]:
    if post_mean.shape != post_var.shape or post_mean.dim() not in (1, 2):
        raise ValueError(
            f"posterior mean/var must both be (C,) or (G, C); got {tuple(post_mean.shape)} and {tuple(post_var.shape)}"
        )
    c_in = _in_channels(layer)
    if post_mean.shape[-1] != c_in:
        raise ValueError(f"posterior has {post_mean.shape[-1]} channels but {type(layer).__name__} expects {c_in}")
    sdt = torch.float64 if post_mean.dtype == torch.float64 else torch.float32
    mean = post_mean.to(sdt).reshape(-1, c_in)  # (C,) or (G, C) -> (G, C)
    var = post_var.to(sdt).reshape(-1, c_in)
    return mean, var


def _in_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.in_channels
    if isinstance(layer, nn.Linear):
        return layer.in_features
    raise TypeError(f"a transition needs an nn.ConvNd or nn.Linear layer, got {type(layer).__name__}")


def monte_carlo_prior(
    post_mean: Tensor,
    post_var: Tensor,
    layer: nn.Module,
    spatial_size: tuple[int, ...] | int | None,
    generator: torch.Generator | None = None,
    relu: bool = True,
    activation: Activation = None,
) -> Prior:
    """The reference transition: sample, activation, the layer's own weights, spatial moments; ``(G, C_out)``.

    ``spatial_size`` is the conv INPUT's spatial size (an int means square/cubic); for ``nn.Linear``
    it is the number of samples per group (default :data:`LINEAR_SAMPLES`). ``activation`` is a name
    of :data:`ACTIVATIONS` or any elementwise callable; ``None`` means ReLU if ``relu`` else identity.
    """
    _, act = _resolve_activation(activation, relu)
    mean, var = _as_groups(post_mean, post_var, layer)
    groups, c_in = mean.shape
    std = (var.clamp_min(0.0) + _SQRT_EPS).sqrt()
    if isinstance(layer, nn.Linear):
        samples = LINEAR_SAMPLES if spatial_size is None else int(math.prod(_tuple(spatial_size, 1)))
        noise = torch.randn(groups, samples, c_in, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean[:, None, :] + std[:, None, :] * noise  # (G, S, C_in)
        z = act(z)
        out = F.linear(z, layer.weight.to(z.dtype), None if layer.bias is None else layer.bias.to(z.dtype))
        var_o, mean_o = torch.var_mean(out, dim=1, correction=0)  # (G, S, C_out) -> (G, C_out)
        return mean_o, var_o
    nd = layer.weight.dim() - 2
    if spatial_size is None:
        raise ValueError("monte_carlo_prior needs the conv input's spatial_size")
    size = _tuple(spatial_size, nd)
    noise = torch.randn(groups, c_in, *size, generator=generator, device=mean.device, dtype=mean.dtype)
    shape = (groups, c_in) + (1,) * nd  # (G, C) -> (G, C, 1, ..., 1) to broadcast over the image
    z = mean.view(shape) + std.view(shape) * noise  # one image per group: (G, C_in, *size)
    z = act(z)
    out = layer._conv_forward(z, layer.weight.to(z.dtype), None if layer.bias is None else layer.bias.to(z.dtype))
    var_o, mean_o = torch.var_mean(out.flatten(2), dim=2, correction=0)  # (G, C_out, L) -> (G, C_out)
    return mean_o, var_o


def _tuple(size: tuple[int, ...] | int, nd: int) -> tuple[int, ...]:
    return (int(size),) * nd if isinstance(size, int) else tuple(int(s) for s in size)


def rectified_gaussian_moments(mean: Tensor, var: Tensor) -> Prior:
    """Mean and variance of ``relu(z)``, ``z ~ N(mean, var)`` (elementwise, differentiable)."""
    std = (var.clamp_min(0.0) + _SQRT_EPS).sqrt()
    alpha = mean / std
    cdf = 0.5 * (1.0 + torch.erf(alpha / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * alpha * alpha) / math.sqrt(2.0 * math.pi)
    m1 = mean * cdf + std * pdf
    m2 = (mean * mean + var) * cdf + mean * std * pdf
    return m1, (m2 - m1 * m1).clamp_min(0.0)


def activation_moments(
    mean: Tensor, var: Tensor, activation: Activation = "relu", nodes: int = QUADRATURE_NODES
) -> Prior:
    """Mean and variance of ``f(z)``, ``z ~ N(mean, var)`` elementwise (deterministic, differentiable).

    Closed form for ``"relu"`` and ``"identity"``; Gauss-Hermite quadrature with ``nodes`` nodes
    otherwise (exact for polynomials of degree < 2*nodes; accurate for smooth activations such as
    SiLU/GELU; kinks, as in hardswish or relu6, cost some accuracy at small variance).
    """
    name, act = _resolve_activation(activation, relu=True)  # a callable gets quadrature
    if name == "identity":
        return mean, var
    if name == "relu":
        return rectified_gaussian_moments(mean, var)
    if nodes < 2:
        raise ValueError(f"Gauss-Hermite quadrature needs >= 2 nodes, got {nodes}")
    x, w = _hermite(nodes, mean.dtype, mean.device)
    std = (var.clamp_min(0.0) + _SQRT_EPS).sqrt()
    f = act(mean.unsqueeze(-1) + std.unsqueeze(-1) * x)  # (..., nodes): f at the scaled nodes
    m1 = (f * w).sum(-1)
    v = ((f - m1.unsqueeze(-1)).pow(2) * w).sum(-1)  # centred: no cancellation when var << mean^2
    return m1, v


def analytic_prior(
    post_mean: Tensor,
    post_var: Tensor,
    layer: nn.Module,
    relu: bool = True,
    activation: Activation = None,
    nodes: int = QUADRATURE_NODES,
) -> Prior:
    """Deterministic transition: the activation's moments (:func:`activation_moments`), then the
    layer's linear moments; ``(G, C_out)``. ``activation``: a name of :data:`ACTIVATIONS` or an
    elementwise callable (quadrature); ``None`` means ReLU if ``relu`` else identity.

    Cost O(C_out * C_in * k) instead of a whole conv. Grouped convolutions are supported.
    """
    mean, var = _as_groups(post_mean, post_var, layer)
    name, act = _resolve_activation(activation, relu)
    mean, var = activation_moments(mean, var, act if name is None else name, nodes)
    w = layer.weight.to(mean.dtype)
    if isinstance(layer, nn.Linear):
        w_sum, w_sq = w, w * w  # (C_out, C_in)
        mean_o, var_o = mean @ w_sum.t(), var @ w_sq.t()
    else:
        w_sum = w.flatten(2).sum(dim=2)  # (C_out, C_in/groups, k...) -> (C_out, C_in/groups)
        w_sq = (w * w).flatten(2).sum(dim=2)
        conv_groups = layer.groups
        g, c_in = mean.shape
        c_out = w.shape[0]
        # (G, C_in) -> (G, conv_groups, C_in/conv_groups); weights (C_out, C_in/cg) -> (cg, C_out/cg, C_in/cg)
        m = mean.view(g, conv_groups, c_in // conv_groups)
        v = var.view(g, conv_groups, c_in // conv_groups)
        ws = w_sum.view(conv_groups, c_out // conv_groups, -1)
        wq = w_sq.view(conv_groups, c_out // conv_groups, -1)
        mean_o = torch.einsum("gki,koi->gko", m, ws).reshape(g, c_out)  # (G, cg, C_out/cg) -> (G, C_out)
        var_o = torch.einsum("gki,koi->gko", v, wq).reshape(g, c_out)
    if layer.bias is not None:
        mean_o = mean_o + layer.bias.to(mean_o.dtype)
    return mean_o, var_o


def residual_merge(prior_a: Prior, prior_b: Prior) -> Prior:
    """Statistics of ``a + b`` for independent branches: means add, variances add (shapes broadcast)."""
    return prior_a[0] + prior_b[0], prior_a[1] + prior_b[1]


def pad_channels(prior: Prior, before: int, after: int) -> Prior:
    """Statistics of a zero-padded shortcut (option-A ResNet): the padded channels get mean 0, var 0."""
    mean, var = prior
    return F.pad(mean, (before, after)), F.pad(var, (before, after))
