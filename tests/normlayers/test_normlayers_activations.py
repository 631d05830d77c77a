"""Transitions through any elementwise activation, and convert() on MBConv (SiLU, depthwise, SE) stacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import integrate
from torch import nn

from normlayers import BatchKalmanNorm2d, ConvertError, analytic_prior, convert, monte_carlo_prior
from normlayers.convert import FromPosterior, Through
from normlayers.transition import ACTIVATIONS, activation_moments

MEANS = torch.tensor([-2.0, -0.5, 0.0, 0.7, 2.5], dtype=torch.float64)
VARS = torch.tensor([0.05, 0.5, 1.0, 2.0, 3.0], dtype=torch.float64)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_tanh", "tanh"])
def test_quadrature_moments_match_monte_carlo_and_numerical_integration(name):
    qm, qv = activation_moments(MEANS, VARS, name)
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    z = MEANS + VARS.sqrt() * torch.randn(n, len(MEANS), generator=gen, dtype=torch.float64)  # (n, 5)
    f = ACTIVATIONS[name](z)
    mc_m, mc_v = f.mean(0), f.var(0)
    # 5 standard errors of the Monte-Carlo estimates (the variance's s.e. from the 4th central moment)
    se_m = f.std(0) / math.sqrt(n)
    se_v = ((f - mc_m).pow(4).mean(0) - mc_v**2).clamp_min(0).sqrt() / math.sqrt(n)
    assert torch.all((qm - mc_m).abs() < 5 * se_m + 1e-6)
    assert torch.all((qv - mc_v).abs() < 5 * se_v + 1e-6)
    # and a deterministic check: adaptive numerical integration of the normal density
    # (tanh's complex poles near the real axis slow Gauss-Hermite convergence: 1e-3 instead of 1e-7)
    fn, tol = {"silu": (lambda t: t / (1 + np.exp(-t)), 1e-7), "tanh": (np.tanh, 1e-3)}.get(name, (None, 0.0))
    if fn is not None:
        for m, v, q1, q2 in zip(MEANS.tolist(), VARS.tolist(), qm.tolist(), qv.tolist()):
            s = math.sqrt(v)
            def pdf(t, m=m, s=s):
                return math.exp(-0.5 * ((t - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))

            e1 = integrate.quad(lambda t, pdf=pdf: fn(t) * pdf(t), m - 12 * s, m + 12 * s, epsabs=1e-12)[0]
            e2 = integrate.quad(lambda t, pdf=pdf, e1=e1: (fn(t) - e1) ** 2 * pdf(t), m - 12 * s, m + 12 * s,
                                epsabs=1e-12)[0]
            assert q1 == pytest.approx(e1, abs=tol) and q2 == pytest.approx(e2, abs=tol)


def test_closed_forms_kept_and_quadrature_is_differentiable():
    m, v = MEANS.clone().requires_grad_(), VARS.clone().requires_grad_()
    rm, rv = activation_moments(m, v, "relu")  # rectified Gaussian closed form, not quadrature
    cdf = 0.5 * (1 + torch.erf(MEANS / VARS.sqrt() / math.sqrt(2)))
    pdf = torch.exp(-0.5 * MEANS**2 / VARS) / math.sqrt(2 * math.pi)
    assert torch.allclose(rm, MEANS * cdf + VARS.sqrt() * pdf, atol=1e-9)
    im, iv = activation_moments(m, v, "identity")
    assert im is m and iv is v
    assert torch.autograd.gradcheck(lambda a, b: activation_moments(a, b, "silu", nodes=16), (m, v))
    with pytest.raises(ValueError, match="unknown activation 'swish2'"):
        activation_moments(m, v, "swish2")


@pytest.mark.parametrize("name", ["silu", "gelu", "hardswish"])
def test_monte_carlo_transition_applies_the_activation(name):
    # 1x1 conv without padding on a large image: MC spatial moments converge to the analytic ones
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 1, bias=True)
    mean, var = torch.tensor([-1.0, 0.0, 0.5, 2.0]), torch.tensor([0.3, 1.0, 2.0, 0.5])
    gen = torch.Generator().manual_seed(1)
    mc_m, mc_v = monte_carlo_prior(mean, var, conv, spatial_size=400, generator=gen, activation=name)
    an_m, an_v = analytic_prior(mean, var, conv, activation=name)
    relu_m, _ = analytic_prior(mean, var, conv, relu=True)
    assert torch.allclose(mc_m, an_m, atol=0.02) and torch.allclose(mc_v, an_v, rtol=0.05, atol=0.01)
    assert not torch.allclose(an_m, relu_m, atol=0.02)  # the activation really changed the prior
    # a callable works in both transitions (quadrature for the analytic one)
    cm, cv = analytic_prior(mean, var, conv, activation=ACTIVATIONS[name])
    assert torch.allclose(cm, an_m) and torch.allclose(cv, an_v)


def test_analytic_depthwise_transition_with_silu_matches_monte_carlo():
    torch.manual_seed(0)
    dw = nn.Conv2d(6, 6, 3, groups=6, bias=False)  # padding 0: interior pixels only
    mean, var = torch.linspace(-1, 1, 6), torch.linspace(0.2, 2.0, 6)
    gen = torch.Generator().manual_seed(2)
    mc = [monte_carlo_prior(mean, var, dw, 300, generator=gen, activation="silu") for _ in range(4)]
    mc_m, mc_v = torch.stack([m for m, _ in mc]).mean(0), torch.stack([v for _, v in mc]).mean(0)
    an_m, an_v = analytic_prior(mean, var, dw, activation="silu")
    assert an_m.shape == (1, 6)
    assert torch.allclose(mc_m, an_m, atol=0.02) and torch.allclose(mc_v, an_v, rtol=0.05)


class ActNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(6))
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(5))
        self.silu, self.gelu, self.hsw = nn.SiLU(inplace=True), nn.GELU(approximate="tanh"), nn.Hardswish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bns[0](self.conv0(x))
        x = self.bns[1](self.convs[0](self.silu(x)))
        x = self.bns[2](self.convs[1](F.silu(x)))
        x = self.bns[3](self.convs[2](self.gelu(x)))
        x = self.bns[4](self.convs[3](F.gelu(x)))
        return self.bns[5](self.convs[4](self.hsw(x)))


def test_convert_recognizes_activations():
    plan = convert(ActNet(), transition="analytic").kalman_chain.plan
    acts = ["silu", "silu", "gelu_tanh", "gelu", "hardswish"]
    assert plan["bns.0"] is None
    for i, act in enumerate(acts):
        assert plan[f"bns.{i + 1}"] == Through(FromPosterior(f"bns.{i}"), f"convs.{i}", activation=act)
    # the legacy spelling still compares equal for ReLU
    assert Through(FromPosterior("a"), "c", relu=True) == Through(FromPosterior("a"), "c", activation="relu")


class MBConv(nn.Module):
    """expand 1x1 -> BN -> SiLU -> depthwise kxk (groups=C) -> BN -> SiLU -> [SE] -> project 1x1 -> BN (+x)."""

    def __init__(self, c: int, e: int = 4, se: bool = False) -> None:
        super().__init__()
        mid = c * e
        self.expand = nn.Sequential(nn.Conv2d(c, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.BatchNorm2d(mid),
                                nn.SiLU(inplace=True))
        self.se = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(mid, 4, 1), nn.SiLU(), nn.Conv2d(4, mid, 1),
                                nn.Sigmoid()) if se else None
        self.project = nn.Sequential(nn.Conv2d(mid, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        if self.se is not None:
            y = y * self.se(y)
        return x + self.project(y)


def _mbconv_net(se: bool = False) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
        MBConv(8), MBConv(8, e=1, se=se), MBConv(8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )


@pytest.mark.parametrize("transition", ["monte_carlo", "analytic"])
def test_convert_mbconv_stack_wires_every_bkn_and_trains(transition):
    torch.manual_seed(0)
    model = convert(_mbconv_net(), prior_weight=0.9, transition=transition)
    plan = model.kalman_chain.plan
    names = list(plan)
    assert len(names) == 1 + 3 * 3 and plan[names[0]] is None and not model.kalman_chain.unchained
    assert plan["3.dw.1"] == Through(FromPosterior("3.expand.1"), "3.dw.0", activation="silu")  # depthwise
    received: dict[str, bool] = {}
    for name in names:
        model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: received.__setitem__(name, kwargs.get("prior") is not None),
            with_kwargs=True,
        )
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert received == {n: n != names[0] for n in names}
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    # the chain changes the normalization: the same weights with the chain removed give other outputs
    model.train()
    with torch.no_grad():
        chained = model(x)
        model.kalman_chain.remove()
        plain = model(x)
    assert not torch.allclose(chained, plain, atol=1e-4)


def test_squeeze_excite_is_unsupported_and_left_unchained():
    with pytest.raises(ConvertError, match=r"cannot chain 1 norm layer\(s\): 4\.project\.1: .*mul"):
        convert(_mbconv_net(se=True))
    with pytest.warns(UserWarning, match="4.project.1 left without prior"):
        model = convert(_mbconv_net(se=True), strict=False)
    chain = model.kalman_chain
    assert list(chain.unchained) == ["4.project.1"]
    # the next block's first norm is chained through the un-chained layer's recorded posterior
    assert chain.plan["5.expand.1"] is not None
    model(torch.randn(4, 1, 8, 8)).sum().backward()


def test_input_and_output_statistics_chain_separately_converted_modules():
    torch.manual_seed(0)
    a, b = convert(MBConv(8)), convert(MBConv(8))
    x = torch.randn(8, 8, 6, 6)
    stats_seen: list = []
    first = "expand.1"
    b.get_submodule(first).register_forward_pre_hook(
        lambda mod, args, kwargs: stats_seen.append(kwargs.get("prior")), with_kwargs=True
    )
    y = a(x)
    assert a.kalman_chain.output_statistics() is None  # x + branch: the input's statistics are unknown
    a.kalman_chain.set_input_statistics((x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0), (6, 6)))
    y = a(x)
    out = a.kalman_chain.output_statistics()
    assert out is not None and out[0].shape == (8,) and out[2] == (6, 6)
    b.kalman_chain.set_input_statistics(out)
    b(y)
    b(y)  # consumed by one forward only
    assert stats_seen[0] is not None and stats_seen[0][0].shape == (32,) and stats_seen[1] is None
    with pytest.raises(ValueError, match="input statistics must be"):
        b.kalman_chain.set_input_statistics((torch.zeros(8), torch.zeros(4), (6, 6)))
    assert isinstance(b.get_submodule(first), BatchKalmanNorm2d)
