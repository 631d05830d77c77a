"""The Kalman chain of a converted residual network, recomputed independently.

The prior handed to every converted BKN must equal the analytic transition of the previous layer's
posterior through that conv and its activation, recomputed here with numpy/scipy in float64 (closed
form of the rectified Gaussian, the conv's linear moments), with residual merges carrying what the
authors' code carries (``m + m3``: the block's PRIOR sum; a chain start carries its posterior), and
option-A shortcuts (average pooling + zero-padded channels) converting. The analytic transition is
checked against a Monte-Carlo estimate on a large batch: N = 2,048 images of N(posterior) per
channel, interior output pixels only (zero padding is not modelled), tolerance 3 % of the standard
deviation for means and 5 % for variances (the sampling error of ~50,000 pixels per channel is ~0.5 %).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from normlayers import convert
from normlayers.convert import FromPosterior, Merge, Pad, Pool, Through


class Block(nn.Module):
    """Pre-activation block; a down-sampling block uses the option-A shortcut (pool + zero channels)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.pad = (cout - cin) // 2 if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H / stride, W / stride)
        h = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        short = x if self.pad is None else F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, self.pad, self.pad))
        return h + short


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.block1 = Block(4, 4)
        self.block2 = Block(4, 8, stride=2)
        self.block3 = Block(8, 8)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, 8, 4, 4)
        return F.relu(self.bn(self.block3(self.block2(self.block1(self.stem(x))))))


def converted(shortcut: str = "prior") -> nn.Module:
    torch.manual_seed(0)
    return convert(Net(), prior_weight=0.5, transition="analytic", shortcut=shortcut)


def run_and_record(model: nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """(prior fed, posterior) per BKN for one training forward, as float64 numpy."""
    priors, posts = {}, {}
    handles = []
    for name in model.kalman_chain.plan:
        layer = model.get_submodule(name)

        def pre(mod, args, kwargs, name=name):
            p = kwargs.get("prior")
            priors[name] = None if p is None else tuple(t.detach().double().numpy() for t in p)

        def post(mod, args, out, name=name):
            posts[name] = tuple(t.detach().double().numpy() for t in mod.posterior)

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    model.train()
    model(x)
    for h in handles:
        h.remove()
    return priors, posts


def relu_moments(mean: np.ndarray, var: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sd = np.sqrt(var)
    a = mean / sd
    m1 = mean * stats.norm.cdf(a) + sd * stats.norm.pdf(a)
    m2 = (mean**2 + var) * stats.norm.cdf(a) + mean * sd * stats.norm.pdf(a)
    return m1, m2 - m1**2


def through(post: tuple[np.ndarray, np.ndarray], conv: nn.Conv2d) -> tuple[np.ndarray, np.ndarray]:
    """Analytic transition: ReLU moments, then mean sum(W) m, variance sum(W^2) v (independent inputs)."""
    m, v = relu_moments(*post)
    w = conv.weight.detach().double().numpy()  # (C_out, C_in, k, k)
    return w.sum((2, 3)) @ m, (w**2).sum((2, 3)) @ v


def add(*parts):
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def pad(stat, n):
    return np.pad(stat[0], n), np.pad(stat[1], n)


def expected_priors(model: nn.Module, priors: dict, posts: dict) -> dict:
    """What the authors' chain feeds each BKN, from the recorded posteriors (and priors, for shortcuts)."""
    b1, b2, b3 = model.block1, model.block2, model.block3

    def carried(name):  # a shortcut into BKN ``name`` carries its prior (its posterior at a chain start)
        return priors[name] if priors[name] is not None else posts[name]

    return {
        "block1.bn1": None,  # fed by the stem conv on the image: chain start
        "block1.bn2": through(posts["block1.bn1"], b1.conv1),
        "block2.bn1": add(through(posts["block1.bn2"], b1.conv2), carried("block1.bn1")),
        "block2.bn2": through(posts["block2.bn1"], b2.conv1),
        "block3.bn1": add(through(posts["block2.bn2"], b2.conv2), pad(carried("block2.bn1"), 2)),
        "block3.bn2": through(posts["block3.bn1"], b3.conv1),
        "bn": add(through(posts["block3.bn2"], b3.conv2), carried("block3.bn1")),
    }


def test_option_a_shortcuts_convert_into_pool_and_pad():
    model = converted()
    plan = model.kalman_chain.plan
    assert plan["block3.bn1"] == Merge(
        (Through(FromPosterior("block2.bn2"), "block2.conv2", relu=True),
         Pad(Pool(FromPosterior("block2.bn1"), (2, 2), (2, 2), (0, 0)), 2, 2))
    )
    assert not model.kalman_chain.unchained


@pytest.mark.parametrize("shortcut", ["prior", "posterior"])
def test_every_prior_is_the_analytic_transition_of_the_previous_posterior(shortcut):
    model = converted(shortcut)
    x = torch.randn(16, 1, 8, 8) * 1.5 + 0.3
    priors, posts = run_and_record(model, x)
    want = expected_priors(model, priors, posts)
    if shortcut == "posterior":  # the documented option: a shortcut carries the BKN's posterior instead
        want["block3.bn1"] = add(through(posts["block2.bn2"], model.block2.conv2), pad(posts["block2.bn1"], 2))
        want["bn"] = add(through(posts["block3.bn2"], model.block3.conv2), posts["block3.bn1"])
    for name, exp in want.items():
        if exp is None:
            assert priors[name] is None, name
            continue
        np.testing.assert_allclose(priors[name][0], exp[0], rtol=1e-4, atol=1e-5, err_msg=f"{name} mean")
        np.testing.assert_allclose(priors[name][1], exp[1], rtol=1e-4, atol=1e-5, err_msg=f"{name} var")


def test_default_shortcut_carries_the_prior_sum_not_the_posterior():
    """The authors' m + m3: with a strong prior weight the two conventions give clearly different priors."""
    x = torch.randn(16, 1, 8, 8)
    prior_mode, _ = run_and_record(converted("prior"), x)
    post_mode, _ = run_and_record(converted("posterior"), x)
    assert np.abs(prior_mode["bn"][1] - post_mode["bn"][1]).max() > 1e-3
    assert np.allclose(prior_mode["block2.bn1"][0], post_mode["block2.bn1"][0])  # chain start: both posteriors


def mc_moments(mean, var, conv: nn.Conv2d, size: int, n: int = 2048, carried=None, seed: int = 0):
    """Monte Carlo: n images of N(mean, var) per channel, ReLU, the conv, (+ an independent carried
    stream), per-channel moments over interior output pixels."""
    gen = torch.Generator().manual_seed(seed)
    c = len(mean)
    z = torch.randn(n, c, size, size, generator=gen, dtype=torch.float64)
    z = z * torch.as_tensor(np.sqrt(var)).view(1, c, 1, 1) + torch.as_tensor(mean).view(1, c, 1, 1)
    with torch.no_grad():
        out = F.conv2d(F.relu(z), conv.weight.double(), stride=conv.stride, padding=0)  # no padding: interior
    if carried is not None:
        cm, cv = carried
        e = torch.randn(out.shape, generator=gen, dtype=torch.float64)
        out = out + e * torch.as_tensor(np.sqrt(cv)).view(1, -1, 1, 1) + torch.as_tensor(cm).view(1, -1, 1, 1)
    flat = out.transpose(0, 1).reshape(out.shape[1], -1).numpy()
    return flat.mean(1), flat.var(1)


def test_analytic_priors_match_monte_carlo_on_a_large_batch():
    model = converted()
    priors, posts = run_and_record(model, torch.randn(16, 1, 8, 8) * 1.5 + 0.3)
    checks = {
        "block1.bn2": (posts["block1.bn1"], model.block1.conv1, 8, None),
        "block2.bn2": (posts["block2.bn1"], model.block2.conv1, 8, None),  # stride 2
        "bn": (posts["block3.bn2"], model.block3.conv2, 4, priors["block3.bn1"]),  # residual merge
    }
    for name, (post, conv, size, carried) in checks.items():
        mc_mean, mc_var = mc_moments(post[0], post[1], conv, size, carried=carried)
        mean, var = priors[name]
        sd = np.sqrt(mc_var)
        assert np.all(np.abs(mean - mc_mean) <= 0.03 * sd), (name, mean, mc_mean)
        assert np.all(np.abs(var - mc_var) <= 0.05 * mc_var), (name, var, mc_var)
