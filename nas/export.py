"""A searched architecture as timm-style block strings and as a stand-alone, retrainable network."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nas.ops import NormFactory, build_op
from nas.spaces import BlockSpec, OpSpec, SearchSpace
from nas.supernet import make_stem

__all__ = [
    "Network",
    "build_block",
    "build_network",
    "block_strings",
    "layer_string",
    "parse_layer_string",
    "build_network_from_strings",
]


def layer_string(op: OpSpec, stride: int, out_channels: int) -> str:
    """timm-style string of one layer, e.g. ``ir_r1_k5_s2_e3_c24_se0.25`` (``skip`` layers are omitted)."""
    s = f"ir_r1_k{op.kernel}_s{stride}_e{op.expansion}_c{out_channels}"
    return s + (f"_se{op.se:g}" if op.se else "")


def block_strings(space: SearchSpace, encoding: Sequence[Sequence[int]]) -> list[list[str]]:
    """Per block, the timm-style strings of its non-skip layers."""
    encoding = space.validate(encoding)
    out: list[list[str]] = []
    for block, cand in zip(space.blocks, encoding):
        cell, _ = block.split(cand)
        strings = []
        for i, op in enumerate(block.ops_of(cand)):
            if op.is_skip:
                continue
            shape = block.layer_shape(cell, i)
            strings.append(layer_string(op, shape.stride, shape.out_channels))
        out.append(strings)
    return out


def build_block(block: BlockSpec, candidate: Sequence[int], norm_layer: NormFactory = nn.BatchNorm2d) -> nn.Sequential:
    """The stand-alone layers of one block candidate (skip layers dropped)."""
    cell, _ = block.split(candidate)
    layers = []
    for i, op in enumerate(block.ops_of(candidate)):
        if op.is_skip:
            continue
        shape = block.layer_shape(cell, i)
        layers.append(build_op(op, shape.in_channels, shape.out_channels, shape.stride, norm_layer))
    return nn.Sequential(*layers)


class Network(nn.Module):
    """Stem -> blocks -> global average pool -> linear classifier.

    Feature taps (dense prediction, :mod:`nas.transfer`): :meth:`forward_features` returns one map per block,
    and ``feature_info[k]`` gives block ``k``'s ``channels`` and ``stride`` (input side / map side), filled by
    :func:`build_network` and :func:`build_network_from_strings`.
    """

    def __init__(
        self,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        features: int,
        num_classes: int,
        feature_info: Sequence[dict[str, int]] | None = None,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(features, num_classes)
        self.feature_info = [dict(f) for f in feature_info] if feature_info is not None else None

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One map per block: ``[block 0 output, ..., block K-1 output]``; x: (B, C, H, W), map k:
        (B, feature_info[k]["channels"], H / stride_k, W / stride_k) (ceil division)."""
        return self.block_outputs(x)[1:]

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[stem output, block 0 output, ..., block K-1 output]``; x: (B, C, H, W)."""
        outs = [self.stem(x)]
        for block in self.blocks:
            outs.append(block(outs[-1]))
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> logits (B, num_classes)
        return self.head(self.block_outputs(x)[-1].mean((2, 3)))


def build_network(
    space: SearchSpace,
    encoding: Sequence[Sequence[int]],
    num_classes: int,
    norm_layer: NormFactory = nn.BatchNorm2d,
) -> Network:
    """A plain ``nn.Module`` for one architecture of ``space`` (trainable from scratch)."""
    encoding = space.validate(encoding)
    blocks = [build_block(b, cand, norm_layer) for b, cand in zip(space.blocks, encoding)]
    info, stride = [], space.stem_stride
    for b in space.blocks:
        stride *= b.stride
        info.append({"channels": b.out_channels, "stride": stride})
    return Network(make_stem(space, norm_layer), blocks, space.blocks[-1].out_channels, num_classes, info)


def parse_layer_string(s: str) -> tuple[OpSpec, int, int]:
    """``ir_r1_k5_s2_e3_c24_se0.25`` -> ``(OpSpec, stride, out_channels)`` (repeat must be 1)."""
    parts = s.split("_")
    if not parts or parts[0] != "ir":
        raise ValueError(f"not an inverted-residual block string: {s!r}")
    fields: dict[str, str] = {}
    for p in parts[1:]:
        head = "se" if p.startswith("se") else p[:1]
        fields[head] = p[len(head):]
    try:
        if int(fields.get("r", "1")) != 1:
            raise ValueError
        op = OpSpec("mbconv", int(fields["k"]), int(fields["e"]), float(fields.get("se", "0")))
        return op, int(fields["s"]), int(fields["c"])
    except (KeyError, ValueError):
        raise ValueError(f"malformed block string {s!r} (need ir_r1_k<k>_s<s>_e<e>_c<c>[_se<r>])") from None


def build_network_from_strings(
    strings: Sequence[Sequence[str]],
    num_classes: int,
    input_channels: int = 1,
    stem_channels: int = 16,
    stem_stride: int = 1,
    norm_layer: NormFactory = nn.BatchNorm2d,
) -> Network:
    """A stand-alone network from per-block timm-style strings (the exported form of a search)."""
    from nas.ops import ConvNormAct

    stem = ConvNormAct(input_channels, stem_channels, 3, stem_stride, norm_layer)
    channels, total_stride = stem_channels, stem_stride
    blocks, info = [], []
    for block in strings:
        layers = []
        for s in block:
            op, stride, out = parse_layer_string(s)
            layers.append(build_op(op, channels, out, stride, norm_layer))
            channels, total_stride = out, total_stride * stride
        blocks.append(nn.Sequential(*layers))
        info.append({"channels": channels, "stride": total_stride})
    return Network(stem, blocks, channels, num_classes, info)
