"""convert(): a pre-activation ResNet is rewired into a Kalman chain and still trains."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from normlayers import BatchKalmanNorm2d, ConvertError, convert
from normlayers.convert import FromPosterior, Merge, Through


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, C', H', W')
        out = F.relu(self.bn1(x))
        short = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + short


class PreActResNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.block1 = PreActBlock(width, width)
        self.block2 = PreActBlock(width, 2 * width, stride=2)
        self.bn = nn.BatchNorm2d(2 * width)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 8, 8) -> (B, classes)
        x = self.block2(self.block1(self.stem(x)))
        return self.fc(self.relu(self.bn(x)).mean(dim=(2, 3)))


def _digits(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    data = load_digits()
    x = torch.tensor(data.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1)  # (n, 8, 8) -> (n, 1, 8, 8)
    return x, torch.tensor(data.target[:n])


def test_wiring_of_a_preact_resnet():
    model = convert(PreActResNet(), prior_weight=0.9)
    plan = model.kalman_chain.plan
    assert list(plan) == ["block1.bn1", "block1.bn2", "block2.bn1", "block2.bn2", "bn"]
    assert plan["block1.bn1"] is None  # fed by the stem conv on the image: start of the chain
    assert plan["block1.bn2"] == Through(FromPosterior("block1.bn1"), "block1.conv1", relu=True)
    assert plan["block2.bn1"] == Merge(
        (Through(FromPosterior("block1.bn2"), "block1.conv2", relu=True), FromPosterior("block1.bn1"))
    )
    assert plan["bn"] == Merge(
        (Through(FromPosterior("block2.bn2"), "block2.conv2", relu=True),
         Through(FromPosterior("block2.bn1"), "block2.shortcut", relu=True))
    )
    assert all(isinstance(model.get_submodule(name), BatchKalmanNorm2d) for name in plan)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())

    received: dict[str, tuple | None] = {}
    for name in plan:
        model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: received.__setitem__(name, kwargs.get("prior")), with_kwargs=True
        )
    x, _ = _digits(8)
    model(x)
    assert received["block1.bn1"] is None
    for name in list(plan)[1:]:
        mean, var = received[name]
        c = model.get_submodule(name).num_features
        assert mean.shape == var.shape == (c,) and bool((var >= 0).all()) and mean.requires_grad
    model.eval()
    received.clear()
    model(x)
    assert all(prior is None for prior in received.values())


def test_convert_copies_weights_and_starts_as_batchnorm_in_eval():
    torch.manual_seed(0)
    reference = PreActResNet()
    x, _ = _digits(16)
    reference(x)  # non-trivial running statistics
    reference.eval()
    model = convert(copy.deepcopy(reference))
    model.eval()
    assert set(model.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("transition", ["monte_carlo", "analytic"])
def test_converted_resnet_trains_with_ghost_groups(transition):
    torch.manual_seed(0)
    model = convert(PreActResNet(), prior_weight=0.9, transition=transition, group_size=2,
                    generator=torch.Generator().manual_seed(0))
    x, y = _digits(256)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    gen = torch.Generator().manual_seed(1)
    for _ in range(40):
        idx = torch.randint(0, len(x), (16,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    assert model.get_submodule("block2.bn1").posterior[0].shape == (8, 8)  # 16 samples / group_size 2
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.3


class PooledNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        return self.bn2(self.conv2(x))


class BranchyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            x = x * 2
        return self.bn(self.conv(x))


def test_unsupported_models_raise_documented_errors():
    with pytest.raises(ConvertError, match=r"cannot chain 1 norm layer\(s\): bn2: .*max_pool2d"):
        convert(PooledNet())
    with pytest.raises(ConvertError, match="data-dependent control flow"):
        convert(BranchyNet())
    with pytest.raises(ConvertError, match="no nn.BatchNorm1d/2d/3d layer"):
        convert(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.warns(UserWarning, match="bn2 left without prior"):
        model = convert(PooledNet(), strict=False)
    assert isinstance(model.bn2, BatchKalmanNorm2d) and model.kalman_chain.plan == {"bn1": None}
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4, 4, 4)
    with pytest.raises(ConvertError, match="already converted"):
        convert(model)
