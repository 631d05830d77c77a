"""Plain classifier models used by the studies (no Lightning): the pre-activation ResNet of the BKN study."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from nas.ops import NormFactory

__all__ = ["PreActBlock", "PreActResNet"]


class PreActBlock(nn.Module):
    """norm -> ReLU -> conv3x3(stride) -> norm -> ReLU -> conv3x3, plus the shortcut.

    The shortcut is the identity, or, when the shape changes, a 1x1 strided conv applied to the pre-activated
    input (He et al. 2016, "Identity mappings"), so every tensor a norm sees is a sum of conv outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        a = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        y = self.conv1(a)
        y = self.conv2(self.relu(self.bn2(y)))
        return y + skip


class PreActResNet(nn.Module):
    """conv3x3 stem -> stages of pre-activation blocks (stride 2 between stages) -> norm -> ReLU -> pool -> linear.

    ``depth`` blocks per stage; widths (16, 32, 64) as in the reference's CIFAR ResNets; the norm of every layer
    comes from ``norm_layer`` (channels -> module).
    """

    def __init__(
        self,
        norm_layer: NormFactory = nn.BatchNorm2d,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        depth: int = 1,
    ) -> None:
        super().__init__()
        if depth < 1 or not widths:
            raise ValueError(f"need depth >= 1 and at least one stage, got depth={depth}, widths={widths}")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(c_in, c_out, stride, norm_layer))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = norm_layer(c_in)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, H, W) -> logits (N, num_classes)."""
        y = self.blocks(self.stem(x))
        y = self.relu(self.bn(y))
        y = y.mean(dim=(2, 3))  # global average pool: (N, C, H, W) -> (N, C)
        return self.fc(y)
