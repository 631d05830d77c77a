"""Candidate ops: MBConv (inverted residual) and skip, with any normalization layer.

Every builder takes ``norm_layer: Callable[[int], nn.Module]`` (channel count first, like
``nn.BatchNorm2d``) so the same op runs with BatchNorm or Batch Kalman Normalization.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

from nas.spaces import OpSpec

__all__ = ["NormFactory", "make_norm", "SqueezeExcite", "MBConv", "build_op", "ConvNormAct", "seeded_init"]

NormFactory = Callable[[int], nn.Module]


def make_norm(name: str, prior_weight: float = 0.5) -> NormFactory:
    """Norm factory by name: ``"bn"`` (``nn.BatchNorm2d``) or ``"bkn"`` (``normlayers.BatchKalmanNorm2d``
    with ``prior_weight``, ANALYTIC transition).

    Supernets built with ``"bkn"`` wire a Kalman chain along every path (:mod:`nas.supernet`). The
    analytic transition (closed-form/quadrature moments through SiLU and the conv) is deterministic,
    so a candidate's recalibrated statistics and rating do not depend on the global RNG state, i.e. on
    which candidates were rated before (the Monte-Carlo transition would draw a random image).
    The default weight 0.5 (not the layer's 0.9): in DNA's digits supernets p = 0.9 distils about
    1.5x worse (block-0 relative L1 1.12 vs 0.75 at 0.5, see docs/nas.md), a criterion that needs
    no ground truth."""
    if name == "bn":
        return nn.BatchNorm2d
    if name == "bkn":
        if not 0.0 <= prior_weight <= 1.0:
            raise ValueError(f"BKN prior_weight must lie in [0, 1], got {prior_weight}")
        try:
            from normlayers import BatchKalmanNorm2d
        except ImportError as exc:  # the sibling package is missing or broken
            raise ImportError(f"norm 'bkn' needs normlayers.BatchKalmanNorm2d: {exc}") from exc
        return functools.partial(BatchKalmanNorm2d, transition="analytic", prior_weight=prior_weight)
    raise ValueError(f"unknown norm {name!r}; choose 'bn' or 'bkn'")


@contextlib.contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Build modules inside this block to get weights that depend on ``seed`` only (not on what ran
    before); the global CPU RNG state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ConvNormAct(nn.Sequential):
    """Conv (no bias) -> norm -> optional SiLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        norm_layer: NormFactory,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False),
            norm_layer(out_channels),
            nn.SiLU(inplace=True) if act else nn.Identity(),
        )


class SqueezeExcite(nn.Module):
    """Channel gating from global average pooling (reduced width = ``se * reference channels``)."""

    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand] -> kxk depthwise -> [SE] -> 1x1 project; residual when shapes match.

    Expansion 1 has no expand conv (as in MobileNetV2/EfficientNet's first stage).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int = 3,
        stride: int = 1,
        expansion: int = 1,
        se: float = 0.0,
        norm_layer: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        mid = in_channels * expansion
        self.expand = ConvNormAct(in_channels, mid, 1, 1, norm_layer) if expansion != 1 else nn.Identity()
        self.depthwise = ConvNormAct(mid, mid, kernel, stride, norm_layer, groups=mid)
        self.se = SqueezeExcite(mid, max(1, int(in_channels * se))) if se > 0 else nn.Identity()
        self.project = ConvNormAct(mid, out_channels, 1, 1, norm_layer, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


def build_op(op: OpSpec, in_channels: int, out_channels: int, stride: int, norm_layer: NormFactory) -> nn.Module:
    """The module for one candidate op at one layer position."""
    if op.is_skip:
        if in_channels != out_channels or stride != 1:
            raise ValueError(f"skip cannot map {in_channels}->{out_channels} channels with stride {stride}")
        return nn.Identity()
    return MBConv(in_channels, out_channels, op.kernel, stride, op.expansion, op.se, norm_layer)
