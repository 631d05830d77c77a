"""Transitions: Monte-Carlo moments converge to the analytic ones like 1/sqrt(n); merges; gradients."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats
from torch import nn

from normlayers import analytic_prior, monte_carlo_prior, pad_channels, residual_merge
from normlayers.transition import rectified_gaussian_moments


def test_rectified_gaussian_moments_match_scipy():
    mean = torch.tensor([-1.5, -0.2, 0.0, 0.7, 3.0], dtype=torch.float64)
    var = torch.tensor([0.5, 1.0, 2.0, 0.3, 0.01], dtype=torch.float64)
    m, v = rectified_gaussian_moments(mean, var)
    for i in range(5):
        mu, sd = mean[i].item(), math.sqrt(var[i].item())
        # E[relu(z)] and E[relu(z)^2] by numerical integration of the normal density
        e1 = stats.norm.expect(lambda z: max(z, 0.0), loc=mu, scale=sd)
        e2 = stats.norm.expect(lambda z: max(z, 0.0) ** 2, loc=mu, scale=sd)
        np.testing.assert_allclose(m[i].item(), e1, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(v[i].item(), e2 - e1 * e1, rtol=1e-6, atol=1e-9)


def _rms_error(layer: nn.Module, size: int, mean: torch.Tensor, var: torch.Tensor, groups: int) -> float:
    gen = torch.Generator().manual_seed(size)
    am, av = analytic_prior(mean, var, layer)
    mm, mv = monte_carlo_prior(mean.expand(groups, -1), var.expand(groups, -1), layer, size, generator=gen)
    err = torch.cat([(mm - am) / av.sqrt(), (mv - av) / av])  # relative to the spread: (2G, C_out)
    return err.square().mean().sqrt().item()


def test_monte_carlo_converges_to_analytic_like_one_over_sqrt_n():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=0, bias=True)  # no padding: every output pixel is an interior pixel
    mean, var = torch.tensor([0.3, -0.5, 1.0]), torch.tensor([1.0, 0.5, 2.0])
    with torch.no_grad():
        errors = [_rms_error(conv, size + 2, mean, var, groups=32) for size in (8, 32, 128)]  # n = 64, 1024, 16384
    # each step multiplies n by 16: the error should shrink by ~4 (allow 2.5..6.5 for sampling noise)
    for big, small in zip(errors, errors[1:]):
        assert 2.5 < big / small < 6.5, errors
    assert errors[-1] < 0.05


def test_monte_carlo_linear_and_gradients_flow():
    torch.manual_seed(1)
    linear = nn.Linear(3, 2)
    mean = torch.tensor([0.2, -0.1, 0.5], requires_grad=True)
    var = torch.tensor([1.0, 0.4, 0.8], requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    mm, mv = monte_carlo_prior(mean, var, linear, 20000, generator=gen)
    am, av = analytic_prior(mean, var, linear)
    torch.testing.assert_close(mm, am, atol=0.03, rtol=0.0)
    torch.testing.assert_close(mv, av, atol=0.03, rtol=0.05)
    (mm.sum() + mv.sum()).backward()
    assert mean.grad is not None and mean.grad.abs().sum() > 0 and var.grad.abs().sum() > 0
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0


def test_analytic_prior_linear_moments_without_relu():
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    mean, var = torch.randn(2, 4), torch.rand(2, 4) + 0.1
    m, v = analytic_prior(mean, var, conv, relu=False)
    w = conv.weight.detach()
    expect_m = torch.zeros(2, 4)
    expect_v = torch.zeros(2, 4)
    for o in range(4):
        ins = range(0, 2) if o < 2 else range(2, 4)  # grouped conv: outputs 0,1 see inputs 0,1
        for j, i in enumerate(ins):
            expect_m[:, o] += w[o, j].sum() * mean[:, i]
            expect_v[:, o] += w[o, j].square().sum() * var[:, i]
    torch.testing.assert_close(m, expect_m + conv.bias.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v, expect_v, atol=1e-6, rtol=1e-6)


def test_residual_merge_and_zero_padded_shortcut():
    a = (torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25]))
    b = (torch.tensor([[3.0, -1.0]]), torch.tensor([[1.0, 2.0]]))
    m, v = residual_merge(a, b)
    torch.testing.assert_close(m, torch.tensor([[4.0, 1.0]]))
    torch.testing.assert_close(v, torch.tensor([[1.5, 2.25]]))
    pm, pv = pad_channels(a, 1, 2)
    torch.testing.assert_close(pm, torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0]))
    torch.testing.assert_close(pv, torch.tensor([0.0, 0.5, 0.25, 0.0, 0.0]))
