"""BKN semantics: BatchNorm parity without prior, the spec's update recomputed in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlayers import (
    BatchKalmanNorm,
    BatchKalmanNorm1d,
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    batch_kalman_norm,
    batch_kalman_norm_reference,
    update_running_stats_reference,
)

CASES = [
    (BatchKalmanNorm1d, nn.BatchNorm1d, (6, 4), False),
    (BatchKalmanNorm1d, nn.BatchNorm1d, (5, 4, 7), False),
    (BatchKalmanNorm2d, nn.BatchNorm2d, (3, 4, 5, 6), False),
    (BatchKalmanNorm2d, nn.BatchNorm2d, (3, 4, 5, 6), True),
    (BatchKalmanNorm3d, nn.BatchNorm3d, (2, 4, 3, 4, 5), False),
    (BatchKalmanNorm3d, nn.BatchNorm3d, (2, 4, 3, 4, 5), True),
]


def _input(shape: tuple[int, ...], channels_last: bool, seed: int = 0) -> torch.Tensor:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2.0 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


@pytest.mark.parametrize("bkn_cls,bn_cls,shape,channels_last", CASES)
@pytest.mark.parametrize("mode", ["no_prior", "p0"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_equals_batchnorm_without_prior(bkn_cls, bn_cls, shape, channels_last, mode, momentum):
    c = shape[1]
    bn = bn_cls(c, momentum=momentum)
    bkn = bkn_cls(c, momentum=momentum, prior_weight=0.0 if mode == "p0" else 0.9, backend="torch")
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bkn.load_state_dict(bn.state_dict())
    prior_shape = (c,)
    for step in range(3):
        x = _input(shape, channels_last, seed=step)
        prior = (torch.randn(prior_shape), torch.rand(prior_shape) + 0.5) if mode == "p0" else None
        y_bn = bn(x)
        y_bkn = bkn(x, prior=prior)
        torch.testing.assert_close(y_bkn, y_bn, atol=1e-6, rtol=1e-6)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bkn, name), getattr(bn, name), atol=1e-6, rtol=1e-6)
    assert int(bkn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    bn.eval()
    bkn.eval()
    x = _input(shape, channels_last, seed=9)
    torch.testing.assert_close(bkn(x), bn(x), atol=1e-6, rtol=1e-6)
    assert bkn.posterior is None


def test_functional_matches_f_batch_norm_including_running_stats():
    x = _input((4, 3, 5, 5), False)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm1, rv1 = torch.randn(3), torch.rand(3) + 0.5
    rm2, rv2 = rm1.clone(), rv1.clone()
    y_ref = F.batch_norm(x, rm1, rv1, w, b, training=True, momentum=0.3, eps=1e-5)
    y, post_mean, post_var = batch_kalman_norm(x, rm2, rv2, w, b, training=True, momentum=0.3, backend="torch")
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rm2, rm1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rv2, rv1, atol=1e-6, rtol=1e-6)
    assert post_mean.shape == post_var.shape == (1, 3)
    y_eval, pm, pv = batch_kalman_norm(x, rm2, rv2, w, b, training=False, backend="torch")
    torch.testing.assert_close(y_eval, F.batch_norm(x, rm1, rv1, w, b, training=False), atol=1e-6, rtol=1e-6)
    assert pm is None and pv is None


def _spec_numpy(x, prior_mean, prior_var, p, gamma, beta, group_size, eps=1e-5, guard=100.0, scope="layer"):
    """The bkn.md update, written independently in float64 numpy, one ghost group at a time; the guard's ratio
    averaged over all groups' channels (``scope="layer"``) or over each group's (``"group"``)."""
    x = x.astype(np.float64)
    n, c = x.shape[:2]
    groups = n // group_size
    slices = [x[k * group_size:(k + 1) * group_size].transpose(1, 0, *range(2, x.ndim)).reshape(c, -1)
              for k in range(groups)]
    ratios = [np.mean(prior_var[k] / (xg.var(axis=1) + eps)) for k, xg in enumerate(slices)]
    ys, means, vars_, fired = [], [], [], []
    for k, xg in enumerate(slices):
        mu_b, var_b = xg.mean(axis=1), xg.var(axis=1)
        mu_p, var_p = prior_mean[k], prior_var[k]
        fire = (np.mean(ratios) if scope == "layer" else ratios[k]) >= guard
        if fire:
            mu_hat, var_hat = mu_b, var_b
        else:
            mu_hat = p * mu_p + (1 - p) * mu_b
            var_hat = p * var_p + (1 - p) * var_b + p * (1 - p) * (mu_b - mu_p) ** 2
        shape = (1, c) + (1,) * (x.ndim - 2)
        xk = x[k * group_size:(k + 1) * group_size]
        ys.append(gamma.reshape(shape) * (xk - mu_hat.reshape(shape)) / np.sqrt(var_hat.reshape(shape) + eps)
                  + beta.reshape(shape))
        means.append(mu_hat)
        vars_.append(var_hat)
        fired.append(fire)
    return np.concatenate(ys), np.stack(means), np.stack(vars_), fired


@pytest.mark.parametrize("scope", ["layer", "group"])
@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_update_matches_spec_in_float64_with_guard(group_size, backend, scope):
    gen = torch.Generator().manual_seed(3)
    n, c = 6, 5
    x = torch.randn(n, c, 4, 3, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    gs = n if group_size is None else group_size
    groups = n // gs
    gamma = torch.rand(c, generator=gen, dtype=torch.float64) + 0.5
    beta = torch.randn(c, generator=gen, dtype=torch.float64)
    prior_mean = torch.randn(groups, c, generator=gen, dtype=torch.float64) * 2.0  # far from mu_B: cross term
    prior_var = torch.rand(groups, c, generator=gen, dtype=torch.float64) + 0.5
    if groups > 1:
        prior_var[-1] *= 1e4  # the last group's ratio is far above the threshold, the others' below
    else:
        prior_var *= 1e4
    p = 0.7
    y_np, m_np, v_np, fired = _spec_numpy(x.numpy(), prior_mean.numpy(), prior_var.numpy(), p, gamma.numpy(),
                                          beta.numpy(), gs, scope=scope)
    # "group": only the last group falls back; "layer": the mean over all groups is above the threshold too
    assert fired[-1] and (groups == 1 or all(fired) if scope == "layer" else not any(fired[:-1]))
    if backend == "reference":
        y, pm, pv = batch_kalman_norm_reference(x, gamma, beta, prior_mean, prior_var, p, group_size=group_size,
                                                guard_scope=scope)
    else:
        y, pm, pv = batch_kalman_norm(x, None, None, gamma, beta, prior=(prior_mean, prior_var), prior_weight=p,
                                      group_size=group_size, backend="torch", guard_scope=scope)
    np.testing.assert_allclose(y.numpy(), y_np, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pm.numpy(), m_np, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(pv.numpy(), v_np, rtol=1e-10, atol=1e-10)

    # without the guard (infinite ratio) every group mixes, the cross term included
    y2, pm2, pv2 = batch_kalman_norm_reference(x, gamma, beta, prior_mean, prior_var, p, guard_ratio=float("inf"),
                                               group_size=group_size, guard_scope=scope)
    _, m2_np, v2_np, _ = _spec_numpy(x.numpy(), prior_mean.numpy(), prior_var.numpy(), p, gamma.numpy(),
                                     beta.numpy(), gs, guard=np.inf)
    np.testing.assert_allclose(pv2.numpy(), v2_np, rtol=1e-10)
    np.testing.assert_allclose(pm2.numpy(), m2_np, rtol=1e-10)


def test_running_stats_are_unbiased_ema_of_group_average():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 2, 5, generator=gen)
    prior = (torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5)
    bkn = BatchKalmanNorm(3, momentum=0.25, group_size=2, prior_weight=0.6, backend="torch")
    bkn(x, prior=prior)
    pm, pv = bkn.posterior
    assert pm.shape == (2, 3)
    count = 2 * 2 * 5
    expect_mean = 0.75 * 0.0 + 0.25 * pm.detach().double().mean(0)
    expect_var = 0.75 * 1.0 + 0.25 * pv.detach().double().mean(0) * count / (count - 1)
    torch.testing.assert_close(bkn.running_mean.double(), expect_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bkn.running_var.double(), expect_var, atol=1e-6, rtol=1e-6)

    rm, rv = torch.zeros(3), torch.ones(3)
    update_running_stats_reference(rm, rv, pm, pv, 0.25, count)
    torch.testing.assert_close(rm, bkn.running_mean)
    torch.testing.assert_close(rv, bkn.running_var)


def test_eval_is_bn_with_running_stats_and_ignores_prior():
    bkn = BatchKalmanNorm2d(3, backend="torch")
    for seed in range(3):
        bkn(_input((4, 3, 4, 4), False, seed), prior=(torch.zeros(3), torch.ones(3)))
    bkn.eval()
    x = _input((2, 3, 4, 4), False, 7)
    expect = F.batch_norm(x, bkn.running_mean, bkn.running_var, bkn.weight, bkn.bias, training=False)
    torch.testing.assert_close(bkn(x, prior=(torch.full((3,), 5.0), torch.ones(3))), expect)
