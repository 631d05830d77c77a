"""The HyTra search space (BossNAS): hybrid CNN / transformer layers with searchable down-sampling.

Every layer picks an op = (kind, level): kind ``resconv`` (a ResNet bottleneck) or ``resatt`` (the
same bottleneck with multi-head self-attention in place of the 3x3 conv), and a resolution
*level* ``l`` (feature side = ``input_size / stem_stride / 2**l``, channels ``widths[l]``). Along a
path (and across blocks) the level may only stay or go up by at most ``max_down`` per layer, i.e.
the resolution only goes down; where it goes down is what the search decides. Attention is only
offered at ``att_levels`` (the coarse ones: few tokens), and each block restricts its levels
(later blocks live at coarse resolutions), as in the paper.

Two channel plans are provided: :func:`hytra_digits` (8x8 inputs; levels 8/4/2/1 px) and
:func:`hytra_imagenet` (224 inputs; levels 1/4..1/32 with the paper's 256..2048 channels).

A candidate of block ``k`` is a tuple of op indices into ``space.ops``; which candidates are
legal depends on the level the block is entered at (the exit level of the previous block).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "HyTraOp",
    "HyTraBlock",
    "HyTraSpace",
    "hytra_digits",
    "hytra_imagenet",
    "MHSA2d",
    "HyTraLayerOp",
    "HyTraBlockSupernet",
    "HyTraSupernet",
    "HyTraNetwork",
    "build_path",
    "build_hytra_network",
]

NormFactory = Callable[[int], nn.Module]
KINDS = ("resatt", "resconv")


@dataclass(frozen=True)
class HyTraOp:
    """One layer choice: operator kind at a resolution level."""

    kind: str
    level: int

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"HyTra op kind must be one of {KINDS}, got {self.kind!r}")
        if self.level < 0:
            raise ValueError(f"HyTra level must be >= 0, got {self.level}")

    @property
    def name(self) -> str:
        return f"{self.kind}_l{self.level}"


@dataclass(frozen=True)
class HyTraBlock:
    """A block: its number of layers and the resolution levels its layers may use."""

    num_layers: int
    levels: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"a HyTra block needs >= 1 layer, got {self.num_layers}")
        if not self.levels or list(self.levels) != sorted(set(self.levels)):
            raise ValueError(f"block levels must be a non-empty increasing tuple, got {self.levels}")


@dataclass(frozen=True)
class HyTraSpace:
    """Stem (to level 0, ``widths[0]`` channels) followed by HyTra blocks."""

    blocks: tuple[HyTraBlock, ...]
    widths: tuple[int, ...]
    att_levels: tuple[int, ...]
    input_size: int = 8
    input_channels: int = 1
    stem_stride: int = 1
    max_down: int = 1
    bottleneck: int = 4
    head_dim: int = 8
    name: str = "hytra"

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("a HyTra space needs at least one block")
        if self.stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {self.stem_stride}")
        if self.max_down < 1:
            raise ValueError(f"max_down must be >= 1, got {self.max_down}")
        base = self.input_size // self.stem_stride
        if base * self.stem_stride != self.input_size or base >> (self.num_levels - 1) < 1:
            raise ValueError(
                f"input_size {self.input_size} with stem stride {self.stem_stride} cannot be halved "
                f"{self.num_levels - 1} times (levels {self.num_levels})"
            )
        for w in self.widths:
            if w % self.bottleneck:
                raise ValueError(f"width {w} is not divisible by the bottleneck ratio {self.bottleneck}")
        for lv in self.att_levels:
            if not 0 <= lv < self.num_levels:
                raise ValueError(f"attention level {lv} outside 0..{self.num_levels - 1}")
        for k, b in enumerate(self.blocks):
            if b.levels[-1] >= self.num_levels:
                raise ValueError(f"block {k} uses level {b.levels[-1]} but only {self.num_levels} levels exist")

    # -- geometry ---------------------------------------------------------------------------
    @property
    def num_levels(self) -> int:
        return len(self.widths)

    def resolution(self, level: int) -> int:
        """Feature side length at ``level``."""
        return (self.input_size // self.stem_stride) >> level

    def level_of_size(self, size: int) -> int:
        """The level whose feature side is ``size`` (inverse of :meth:`resolution`)."""
        for lv in range(self.num_levels):
            if self.resolution(lv) == size:
                return lv
        raise ValueError(f"feature side {size} matches no level of {self.name} (sides {self.sides()})")

    def sides(self) -> list[int]:
        return [self.resolution(lv) for lv in range(self.num_levels)]

    # -- ops and candidates -----------------------------------------------------------------
    @property
    def ops(self) -> tuple[HyTraOp, ...]:
        """Every op of the space; a candidate stores indices into this tuple."""
        out = []
        for lv in range(self.num_levels):
            if lv in self.att_levels:
                out.append(HyTraOp("resatt", lv))
            out.append(HyTraOp("resconv", lv))
        return tuple(out)

    def block_ops(self, k: int) -> list[int]:
        """Indices of the ops that block ``k`` may use."""
        return [i for i, op in enumerate(self.ops) if op.level in self.blocks[k].levels]

    def entry_level(self, k: int, prefix: Sequence[Sequence[int]]) -> int:
        """Level at which block ``k`` is entered after the candidates ``prefix`` of blocks 0..k-1."""
        if len(prefix) != k:
            raise ValueError(f"block {k} needs the candidates of {k} earlier blocks, got {len(prefix)}")
        level = 0
        for j, cand in enumerate(prefix):
            self.check(j, cand, level)
            level = self.ops[cand[-1]].level
        return level

    def check(self, k: int, candidate: Sequence[int], entry_level: int) -> None:
        """Raise ``ValueError`` unless ``candidate`` is a legal path of block ``k`` entered at ``entry_level``."""
        block = self.blocks[k]
        if len(candidate) != block.num_layers:
            raise ValueError(
                f"block {k} has {block.num_layers} layers; candidate {tuple(candidate)} has {len(candidate)}"
            )
        level = entry_level
        for i, idx in enumerate(candidate):
            if not 0 <= idx < len(self.ops):
                raise ValueError(f"op index {idx} out of range ({len(self.ops)} HyTra ops)")
            op = self.ops[idx]
            if op.level not in block.levels:
                raise ValueError(f"layer {i} of block {k}: level {op.level} not allowed (levels {block.levels})")
            if not 0 <= op.level - level <= self.max_down:
                raise ValueError(
                    f"layer {i} of block {k}: level {level} -> {op.level} (resolution may only go down, "
                    f"by at most {self.max_down} level(s) per layer)"
                )
            level = op.level

    def legal_paths(self, k: int, entry_level: int = 0) -> list[tuple[int, ...]]:
        """Every legal candidate of block ``k`` entered at ``entry_level`` (depth-first, op order)."""
        block_ops = self.block_ops(k)
        out: list[tuple[int, ...]] = []

        def extend(path: tuple[int, ...], level: int) -> None:
            if len(path) == self.blocks[k].num_layers:
                out.append(path)
                return
            for idx in block_ops:
                if 0 <= self.ops[idx].level - level <= self.max_down:
                    extend(path + (idx,), self.ops[idx].level)

        extend((), entry_level)
        return out

    def num_architectures(self) -> int:
        """Number of legal whole-network paths (dynamic program over the block exit level)."""
        counts = {0: 1}
        for k in range(len(self.blocks)):
            nxt: dict[int, int] = {}
            for entry, n in counts.items():
                for path in self.legal_paths(k, entry):
                    lv = self.ops[path[-1]].level
                    nxt[lv] = nxt.get(lv, 0) + n
            counts = nxt
        return sum(counts.values())

    def enumerate_architectures(self) -> Iterator[tuple[tuple[int, ...], ...]]:
        """Every legal whole-network encoding (only sensible for small spaces)."""

        def rec(k: int, entry: int, prefix: tuple[tuple[int, ...], ...]) -> Iterator[tuple[tuple[int, ...], ...]]:
            if k == len(self.blocks):
                yield prefix
                return
            for path in self.legal_paths(k, entry):
                yield from rec(k + 1, self.ops[path[-1]].level, prefix + (path,))

        yield from rec(0, 0, ())

    def path_names(self, candidate: Sequence[int]) -> list[str]:
        return [self.ops[i].name for i in candidate]


def hytra_digits(layers: Sequence[int] = (3, 3, 3), base_width: int = 16, head_dim: int = 8) -> HyTraSpace:
    """HyTra for 8x8 digits: levels 8/4/2/1 px with widths base*(1, 2, 4, 8); attention at 4x4 and 2x2.

    Block levels mirror the paper (the first block may use every resolution, later blocks only
    the coarser ones).
    """
    allowed = [(0, 1, 2, 3), (1, 2, 3), (2, 3), (2, 3)]
    blocks = tuple(HyTraBlock(n, allowed[min(k, 3)]) for k, n in enumerate(layers))
    widths = tuple(base_width * 2**lv for lv in range(4))
    return HyTraSpace(
        blocks,
        widths,
        att_levels=(1, 2),
        input_size=8,
        input_channels=1,
        stem_stride=1,
        head_dim=head_dim,
        name="hytra-digits",
    )


def hytra_imagenet(width_mult: float = 1.0) -> HyTraSpace:
    """The paper's plan: 224 inputs, stem to 1/4, levels 1/4..1/32 with 256..2048 channels, attention
    at 1/16 and 1/32, four 4-layer blocks."""
    widths = tuple(int(round(c * width_mult / 32)) * 32 for c in (256, 512, 1024, 2048))
    blocks = (
        HyTraBlock(4, (0, 1, 2, 3)),
        HyTraBlock(4, (1, 2, 3)),
        HyTraBlock(4, (2, 3)),
        HyTraBlock(4, (2, 3)),
    )
    return HyTraSpace(
        blocks,
        widths,
        att_levels=(2, 3),
        input_size=224,
        input_channels=3,
        stem_stride=4,
        head_dim=max(8, widths[0] // 4 // 4),
        name="hytra-imagenet",
    )


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
class MHSA2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} heads")
        self.heads = heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W)
        b, c, h, w = x.shape
        qkv = self.qkv(x).reshape(b, 3, self.heads, c // self.heads, h * w)  # (B, 3, heads, d, N)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        return out.transpose(-1, -2).reshape(b, c, h, w)  # (B, heads, d, N) -> (B, C, H, W)


def _entry(c_in: int, c_out: int, stride: int, norm_layer: NormFactory, depthwise: int | None) -> nn.Sequential:
    """1x1 conv, average-pool down-sampling by ``stride``, optional depthwise 3x3 (position encoding), norm."""
    mods: list[nn.Module] = [nn.Conv2d(c_in, c_out, 1, bias=False)]
    if stride > 1:
        mods.append(nn.AvgPool2d(stride))
    if depthwise is not None:
        mods.append(nn.Conv2d(c_out, c_out, 3, padding=1, groups=c_out, bias=False))
    mods.append(norm_layer(c_out))
    return nn.Sequential(*mods)


class HyTraLayerOp(nn.Module):
    """One (kind, level) op: bottleneck with a 3x3 conv (ResConv) or self-attention (ResAtt).

    Inputs may arrive from any level ``in_level`` in ``in_levels`` (<= the op's level); each gets its
    own entry projection and shortcut (average-pool down-sampling), the body is shared.
    """

    def __init__(self, space: HyTraSpace, op: HyTraOp, in_levels: Sequence[int], norm_layer: NormFactory) -> None:
        super().__init__()
        self.op = op
        c_out = space.widths[op.level]
        mid = c_out // space.bottleneck
        self.entry = nn.ModuleDict()
        self.shortcut = nn.ModuleDict()
        for lv in in_levels:
            if lv > op.level:
                raise ValueError(f"op {op.name} cannot take input from the coarser level {lv}")
            c_in, stride = space.widths[lv], 2 ** (op.level - lv)
            self.entry[str(lv)] = _entry(c_in, mid, stride, norm_layer, depthwise=1 if op.kind == "resatt" else None)
            self.shortcut[str(lv)] = (
                nn.Identity() if stride == 1 and c_in == c_out else _entry(c_in, c_out, stride, norm_layer, None)
            )
        if op.kind == "resconv":
            self.mixer = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        else:
            self.mixer = MHSA2d(mid, max(1, mid // space.head_dim))
        self.mixer_norm = norm_layer(mid)
        self.out = nn.Conv2d(mid, c_out, 1, bias=False)
        self.out_norm = norm_layer(c_out)
        if getattr(self.out_norm, "weight", None) is not None:
            nn.init.zeros_(self.out_norm.weight)  # start as the shortcut (standard for residual bottlenecks)

    def forward(self, x: torch.Tensor, in_level: int) -> torch.Tensor:
        # x: (B, widths[in_level], S_in, S_in) -> (B, widths[level], S_in / 2**(level - in_level), ...)
        key = str(in_level)
        if key not in self.entry:
            raise ValueError(f"op {self.op.name} cannot take input at level {in_level} (has {list(self.entry)})")
        h = F.relu(self.entry[key](x))
        h = F.relu(self.mixer_norm(self.mixer(h)))
        h = self.out_norm(self.out(h))
        return F.relu(h + self.shortcut[key](x))


def _stem(space: HyTraSpace, norm_layer: NormFactory) -> nn.Sequential:
    """Conv to ``widths[0]`` channels at level 0 (3x3 for small inputs; 7x7 s2 + max-pool for 224)."""
    c = space.widths[0]
    if space.stem_stride == 1:
        return nn.Sequential(nn.Conv2d(space.input_channels, c, 3, padding=1, bias=False), norm_layer(c), nn.ReLU())
    mods: list[nn.Module] = [
        nn.Conv2d(space.input_channels, c, 7, stride=2, padding=3, bias=False),
        norm_layer(c),
        nn.ReLU(),
    ]
    if space.stem_stride == 4:
        mods.append(nn.MaxPool2d(3, stride=2, padding=1))
    return nn.Sequential(*mods)


class HyTraBlockSupernet(nn.Module):
    """Every op of every layer of one block, weights shared; ``forward(x, candidate)`` runs one path.

    The entry level is read from the input's spatial size, so the block works after any prefix.
    """

    def __init__(self, space: HyTraSpace, k: int, norm_layer: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.space, self.k = space, k
        block = space.blocks[k]
        # input levels the first layer can see: every exit level of earlier blocks (level 0 from the stem)
        first_in = sorted({0} | {lv for j in range(k) for lv in space.blocks[j].levels})
        self.layers = nn.ModuleList()
        for i in range(block.num_layers):
            seen = first_in if i == 0 else list(block.levels)
            layer = nn.ModuleDict()
            for idx in space.block_ops(k):
                op = space.ops[idx]
                in_levels = [lv for lv in seen if 0 <= op.level - lv <= space.max_down]
                if in_levels:
                    layer[str(idx)] = HyTraLayerOp(space, op, in_levels, norm_layer)
            self.layers.append(layer)

    def forward(self, x: torch.Tensor, candidate: Sequence[int]) -> torch.Tensor:
        # x: (B, widths[entry], S, S) -> (B, widths[exit], S', S')
        level = self.space.level_of_size(x.shape[-1])
        self.space.check(self.k, candidate, level)
        for layer, idx in zip(self.layers, candidate):
            x = layer[str(idx)](x, level)
            level = self.space.ops[idx].level
        return x


class HyTraSupernet(nn.Module):
    """Stem + one :class:`HyTraBlockSupernet` per block (same interface as ``nas.supernet.Supernet``)."""

    def __init__(self, space: HyTraSpace, norm_layer: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.space = space
        self.stem = _stem(space, norm_layer)
        self.blocks = nn.ModuleList(HyTraBlockSupernet(space, k, norm_layer) for k in range(len(space.blocks)))

    def forward(self, x: torch.Tensor, encoding: Sequence[Sequence[int]]) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, widths[exit], S, S)
        x = self.stem(x)
        for block, cand in zip(self.blocks, encoding):
            x = block(x, cand)
        return x


class _PathLayer(nn.Module):
    """One op of a stand-alone path with its input level fixed."""

    def __init__(self, op: HyTraLayerOp, in_level: int) -> None:
        super().__init__()
        self.op, self.in_level = op, in_level

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, C', S', S')
        return self.op(x, self.in_level)


def build_path(
    space: HyTraSpace, k: int, candidate: Sequence[int], entry_level: int, norm_layer: NormFactory = nn.BatchNorm2d
) -> nn.Sequential:
    """The stand-alone layers of block ``k``'s candidate entered at ``entry_level`` (only their weights)."""
    space.check(k, candidate, entry_level)
    layers, level = [], entry_level
    for idx in candidate:
        layers.append(_PathLayer(HyTraLayerOp(space, space.ops[idx], [level], norm_layer), level))
        level = space.ops[idx].level
    return nn.Sequential(*layers)


class HyTraNetwork(nn.Module):
    """A stand-alone HyTra network: stem, the chosen paths, global average pooling and a classifier."""

    def __init__(
        self,
        space: HyTraSpace,
        encoding: Sequence[Sequence[int]],
        num_classes: int,
        norm_layer: NormFactory = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        space.entry_level(len(space.blocks), [tuple(c) for c in encoding])  # validates the whole encoding
        self.stem = _stem(space, norm_layer)
        blocks, level = [], 0
        self.feature_info: list[dict[str, int]] = []  # per block: exit channels and stride (input side / map side)
        for k, cand in enumerate(encoding):
            blocks.append(build_path(space, k, cand, level, norm_layer))
            level = space.ops[cand[-1]].level
            self.feature_info.append({"channels": space.widths[level], "stride": space.stem_stride * 2**level})
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(space.widths[level], num_classes)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One map per block (feature taps); x: (B, C_in, H, W) -> map k (B, channels_k, H / stride_k, W / stride_k)."""
        outs, h = [], self.stem(x)
        for block in self.blocks:
            h = block(h)
            outs.append(h)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, num_classes)
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def build_hytra_network(
    space: HyTraSpace, encoding: Sequence[Sequence[int]], num_classes: int, norm_layer: NormFactory = nn.BatchNorm2d
) -> HyTraNetwork:
    """Stand-alone network for a searched HyTra encoding (retrainable)."""
    return HyTraNetwork(space, encoding, num_classes, norm_layer)
