"""BatchKalmanNorm modules: checkpoints with nn.BatchNorm2d, the posterior chain, input validation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normlayers import BatchKalmanNorm, BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d, batch_kalman_norm


def _trained_bn(c: int = 4) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    for seed in range(2):
        bn(torch.randn(3, c, 4, 4, generator=torch.Generator().manual_seed(seed)))
    return bn


def test_state_dict_round_trip_both_ways_strict():
    bn = _trained_bn()
    bkn = BatchKalmanNorm2d(4)
    assert set(bkn.state_dict()) == set(bn.state_dict())
    bkn.load_state_dict(bn.state_dict(), strict=True)
    for key, value in bn.state_dict().items():
        assert torch.equal(bkn.state_dict()[key], value), key
    bkn(torch.randn(2, 4, 3, 3), prior=(torch.zeros(4), torch.ones(4)))  # change the buffers
    back = nn.BatchNorm2d(4)
    back.load_state_dict(bkn.state_dict(), strict=True)
    for key, value in bkn.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    bn.eval()
    bkn.load_state_dict(bn.state_dict())
    bkn.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(bkn(x), bn(x))


def test_no_affine_and_no_running_stats_like_torch():
    bn = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    bkn = BatchKalmanNorm2d(3, affine=False, track_running_stats=False)
    assert set(bkn.state_dict()) == set(bn.state_dict()) == set()
    x = torch.randn(2, 3, 4, 4)
    bn.eval()
    bkn.eval()  # no buffers: batch statistics even in eval, and a posterior for the chain
    torch.testing.assert_close(bkn(x), bn(x))
    assert bkn.posterior is not None


def test_posterior_shape_dtype_and_gradient_through_the_chain():
    torch.manual_seed(0)
    first = BatchKalmanNorm2d(3, group_size=2)
    second = BatchKalmanNorm2d(3, group_size=2)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y1 = first(x)
    mean, var = first.posterior
    assert mean.shape == var.shape == (2, 3) and mean.dtype == torch.float32
    assert mean.requires_grad and var.requires_grad
    y2 = second(torch.relu(y1) * 2.0, prior=(mean, var))  # prior from the first layer, per group
    y2.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    ungrouped = BatchKalmanNorm2d(3)
    ungrouped(torch.randn(2, 3, 4, 4))
    assert ungrouped.posterior[0].shape == (3,)


def test_chain_gradient_reaches_previous_layer_statistics():
    """d loss / d x includes the path x -> posterior of layer 1 -> prior of layer 2."""
    torch.manual_seed(1)
    first, second = BatchKalmanNorm2d(2, prior_weight=0.9), BatchKalmanNorm2d(2, prior_weight=0.9)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    z = torch.randn(3, 2, 4, 4)
    first(x)
    second(z, prior=first.posterior).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "cls,good,bad,message",
    [
        (BatchKalmanNorm1d, (4, 3), (4, 3, 2, 2), "expected 2D or 3D input"),
        (BatchKalmanNorm2d, (4, 3, 2, 2), (4, 3, 2), "expected 4D input"),
        (BatchKalmanNorm3d, (4, 3, 2, 2, 2), (4, 3, 2, 2), "expected 5D input"),
    ],
)
def test_rank_checks_like_torch(cls, good, bad, message):
    layer = cls(3)
    assert layer(torch.randn(*good)).shape == good
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(*bad))


def test_bad_inputs_raise_clear_errors():
    layer = BatchKalmanNorm2d(3, group_size=2)
    x = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="got an input with 5 channels"):
        layer(torch.randn(4, 5, 2, 2))
    with pytest.raises(ValueError, match=r"prior mean has shape \(4,\); expected \(3,\) or \(G, C\) = \(2, 3\)"):
        layer(x, prior=(torch.zeros(4), torch.ones(3)))
    with pytest.raises(ValueError, match="prior var must be non-negative"):
        layer(x, prior=(torch.zeros(3), torch.tensor([1.0, -0.5, 1.0])))
    with pytest.raises(ValueError, match="prior mean contains NaN"):
        layer(x, prior=(torch.tensor([0.0, float("nan"), 0.0]), torch.ones(3)))
    with pytest.raises(ValueError, match="group_size=2 must be a positive divisor of the batch size 3"):
        layer(torch.randn(3, 3, 2, 2))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchKalmanNorm2d(3)(torch.randn(1, 3, 1, 1))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        BatchKalmanNorm1d(3, group_size=1)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"prior_weight must lie in \[0, 1\], got 1.5"):
        BatchKalmanNorm(3, prior_weight=1.5)
    with pytest.raises(ValueError, match=r"prior_weight must lie in \[0, 1\], got -0.1"):
        batch_kalman_norm(x, None, None, prior_weight=-0.1)
    with pytest.raises(ValueError, match="weight has shape"):
        batch_kalman_norm(x, None, None, torch.ones(4))
    with pytest.raises(TypeError, match="floating-point"):
        batch_kalman_norm(torch.ones(2, 3, dtype=torch.long), None, None)
    with pytest.raises(ValueError, match="backend must be one of"):
        batch_kalman_norm(x, None, None, backend="cuda")
    with pytest.raises(ValueError, match="transition must be one of"):
        BatchKalmanNorm(3, transition="kalman")
    # eval with running statistics accepts a single sample, like BatchNorm
    layer.eval()
    assert layer(torch.randn(1, 3, 1, 1)).shape == (1, 3, 1, 1)


def test_momentum_none_is_cumulative_average():
    bkn = BatchKalmanNorm2d(2, momentum=None)
    means = []
    for seed in range(3):
        x = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(seed)) + seed
        means.append(x.mean(dim=(0, 2, 3)))
        bkn(x)
    torch.testing.assert_close(bkn.running_mean, torch.stack(means).mean(0), atol=1e-6, rtol=1e-6)
