"""Block-wise search spaces as frozen dataclasses.

A space is a stem followed by blocks. Each block offers one or more *cells* (a layer count and an
inner width, DNA's depth/width choice); each layer of a cell offers candidate ops. A *candidate*
(the encoding of one block choice) is a tuple of ints: the op index of every layer, preceded by
the cell index when the block has more than one cell. Rating tables key candidates by a string:
the op indices written as digits (``"0110"``, the convention of the released BossNAS rating
file), joined by ``-`` when an index exceeds 9, and prefixed ``c<cell>_`` for multi-cell blocks.
Names of ops are derived from their fields and never parsed back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

__all__ = [
    "Candidate",
    "OpSpec",
    "LayerSpec",
    "CellSpec",
    "BlockSpec",
    "SearchSpace",
    "candidate_key",
    "parse_candidate_key",
    "SKIP",
    "mbconv",
    "op_from_dict",
    "SPACE_PRESETS",
    "space_preset",
]

Candidate = tuple[int, ...]


@dataclass(frozen=True)
class OpSpec:
    """One candidate op: an inverted-residual MBConv, or ``skip`` (identity, drops the layer)."""

    kind: str = "mbconv"  # "mbconv" | "skip"
    kernel: int = 3
    expansion: int = 1
    se: float = 0.0  # squeeze-excite ratio relative to the layer's input channels; 0 = none

    def __post_init__(self) -> None:
        if self.kind not in ("mbconv", "skip"):
            raise ValueError(f"OpSpec.kind must be 'mbconv' or 'skip', got {self.kind!r}")
        if self.kind == "mbconv":
            if self.kernel < 1 or self.kernel % 2 == 0:
                raise ValueError(f"MBConv kernel must be odd and >= 1, got {self.kernel}")
            if self.expansion < 1:
                raise ValueError(f"MBConv expansion must be >= 1, got {self.expansion}")
            if not 0.0 <= self.se < 1.0:
                raise ValueError(f"squeeze-excite ratio must be in [0, 1), got {self.se}")

    @property
    def is_skip(self) -> bool:
        return self.kind == "skip"

    @property
    def name(self) -> str:
        """Derived display name, e.g. ``ir_k3_e6_se0.25`` or ``skip``."""
        if self.is_skip:
            return "skip"
        return f"ir_k{self.kernel}_e{self.expansion}" + (f"_se{self.se:g}" if self.se else "")


SKIP = OpSpec(kind="skip")


def mbconv(kernel: int, expansion: int, se: float = 0.0) -> OpSpec:
    return OpSpec("mbconv", kernel, expansion, se)


@dataclass(frozen=True)
class LayerSpec:
    """The candidate ops of one layer."""

    ops: tuple[OpSpec, ...]

    def __post_init__(self) -> None:
        if not self.ops:
            raise ValueError("a layer needs at least one candidate op")


@dataclass(frozen=True)
class CellSpec:
    """One block-supernet variant: its layers and inner width (None = the block's out channels)."""

    layers: tuple[LayerSpec, ...]
    width: int | None = None

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a cell needs at least one layer")


@dataclass(frozen=True)
class LayerShape:
    """Input/output channels and stride of one layer inside a cell."""

    in_channels: int
    out_channels: int
    stride: int

    @property
    def shape_preserving(self) -> bool:
        return self.in_channels == self.out_channels and self.stride == 1


@dataclass(frozen=True)
class BlockSpec:
    """One block: in/out channels, stride (taken by the first layer) and its cells."""

    in_channels: int
    out_channels: int
    stride: int
    cells: tuple[CellSpec, ...]

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError(f"block channels must be positive, got {self.in_channels}->{self.out_channels}")
        if self.stride not in (1, 2):
            raise ValueError(f"block stride must be 1 or 2, got {self.stride}")
        if not self.cells:
            raise ValueError("a block needs at least one cell")
        for c, cell in enumerate(self.cells):
            for i, layer in enumerate(cell.layers):
                shape = self.layer_shape(c, i)
                if not shape.shape_preserving and any(op.is_skip for op in layer.ops):
                    raise ValueError(
                        f"cell {c} layer {i} changes shape ({shape.in_channels}->{shape.out_channels}, "
                        f"stride {shape.stride}) so it cannot offer the 'skip' op"
                    )

    @classmethod
    def uniform(
        cls,
        in_channels: int,
        out_channels: int,
        stride: int,
        num_layers: int,
        ops: Sequence[OpSpec],
        first_ops: Sequence[OpSpec] | None = None,
    ) -> BlockSpec:
        """A single-cell block whose layers share ``ops`` (the first layer may differ, e.g. no skip)."""
        first = tuple(first_ops) if first_ops is not None else tuple(ops)
        layers = (LayerSpec(first),) + tuple(LayerSpec(tuple(ops)) for _ in range(num_layers - 1))
        return cls(in_channels, out_channels, stride, (CellSpec(layers),))

    @property
    def multi_cell(self) -> bool:
        return len(self.cells) > 1

    def layer_shape(self, cell: int, layer: int) -> LayerShape:
        c = self.cells[cell]
        width = c.width or self.out_channels
        n = len(c.layers)
        cin = self.in_channels if layer == 0 else width
        cout = self.out_channels if layer == n - 1 else width
        return LayerShape(cin, cout, self.stride if layer == 0 else 1)

    def split(self, candidate: Sequence[int]) -> tuple[int, Candidate]:
        """``(cell, op indices)`` of a candidate, validated."""
        cand = tuple(int(i) for i in candidate)
        if self.multi_cell:
            if not cand:
                raise ValueError("empty candidate for a multi-cell block")
            cell, ops = cand[0], cand[1:]
            if not 0 <= cell < len(self.cells):
                raise ValueError(f"cell index {cell} out of range (block has {len(self.cells)} cells)")
        else:
            cell, ops = 0, cand
        layers = self.cells[cell].layers
        if len(ops) != len(layers):
            raise ValueError(f"candidate {cand} has {len(ops)} op indices; cell {cell} has {len(layers)} layers")
        for i, (op, layer) in enumerate(zip(ops, layers)):
            if not 0 <= op < len(layer.ops):
                raise ValueError(f"op index {op} of layer {i} out of range ({len(layer.ops)} candidates)")
        return cell, ops

    def ops_of(self, candidate: Sequence[int]) -> list[OpSpec]:
        cell, ops = self.split(candidate)
        return [layer.ops[i] for layer, i in zip(self.cells[cell].layers, ops)]

    def enumerate(self) -> Iterator[Candidate]:
        """Every candidate of the block, cells in order, op indices in lexicographic order."""
        for c, cell in enumerate(self.cells):
            prefix: Candidate = (c,) if self.multi_cell else ()
            for ops in itertools.product(*(range(len(layer.ops)) for layer in cell.layers)):
                yield prefix + tuple(ops)

    def num_candidates(self) -> int:
        return sum(math.prod(len(layer.ops) for layer in cell.layers) for cell in self.cells)

    def key(self, candidate: Sequence[int]) -> str:
        self.split(candidate)
        return candidate_key(candidate, self.multi_cell)

    def parse_key(self, key: str) -> Candidate:
        cand = parse_candidate_key(key, self.multi_cell)
        self.split(cand)
        return cand


def candidate_key(candidate: Sequence[int], multi_cell: bool = False) -> str:
    """Rating-table key of a candidate (see the module docstring)."""
    cand = [int(i) for i in candidate]
    cell, ops = (cand[0], cand[1:]) if multi_cell else (None, cand)
    sep = "" if all(0 <= i <= 9 for i in ops) else "-"
    body = sep.join(str(i) for i in ops)
    return body if cell is None else f"c{cell}_{body}"


def parse_candidate_key(key: str, multi_cell: bool = False) -> Candidate:
    """Inverse of :func:`candidate_key`; raises ``ValueError`` naming the bad key."""
    try:
        prefix: Candidate = ()
        body = key
        if multi_cell:
            head, _, body = key.partition("_")
            if not head.startswith("c") or not _:
                raise ValueError
            prefix = (int(head[1:]),)
        parts = body.split("-") if "-" in body else list(body)
        return prefix + tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"malformed candidate key {key!r}") from None


@dataclass(frozen=True)
class SearchSpace:
    """Stem (3x3 conv, norm, swish) followed by blocks; inputs of ``input_channels`` x ``input_size``."""

    blocks: tuple[BlockSpec, ...]
    input_channels: int = 1
    input_size: int = 8
    stem_channels: int = 16
    stem_stride: int = 1
    name: str = "space"
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not self.blocks:
            raise ValueError("a search space needs at least one block")
        prev = self.stem_channels
        for k, b in enumerate(self.blocks):
            if b.in_channels != prev:
                raise ValueError(f"block {k} expects {b.in_channels} input channels but receives {prev}")
            prev = b.out_channels

    def enumerate_block(self, k: int) -> Iterator[Candidate]:
        return self.blocks[k].enumerate()

    def num_architectures(self) -> int:
        return math.prod(b.num_candidates() for b in self.blocks)

    def block_input_size(self, k: int) -> int:
        """Spatial side length entering block ``k`` (ceil division per stride-2 conv with padding)."""
        size = _down(self.input_size, self.stem_stride)
        for b in self.blocks[:k]:
            size = _down(size, b.stride)
        return size

    def validate(self, encoding: Sequence[Sequence[int]]) -> tuple[Candidate, ...]:
        if len(encoding) != len(self.blocks):
            raise ValueError(f"encoding has {len(encoding)} blocks; the space has {len(self.blocks)}")
        out = []
        for b, cand in zip(self.blocks, encoding):
            b.split(cand)
            out.append(tuple(int(i) for i in cand))
        return tuple(out)

    def with_single_op(self, op: OpSpec, num_layers: int | None = None) -> SearchSpace:
        """The same stem and block in/out shapes with ``op`` as the only choice (e.g. DNA's teacher):
        one cell per block of ``num_layers`` layers (default: the first cell's layer count)."""
        blocks = tuple(
            replace(b, cells=(CellSpec(tuple(LayerSpec((op,)) for _ in range(num_layers or len(b.cells[0].layers)))),))
            for b in self.blocks
        )
        return replace(self, blocks=blocks, name=f"{self.name}-{op.name}")

    @classmethod
    def from_dict(cls, cfg: dict) -> SearchSpace:
        """Build from a config mapping (YAML)::

            {input_channels, input_size, stem_channels, stem_stride, name,
             ops: [{kind: skip} | {kernel, expansion, se}], blocks: [{out_channels, stride,
             layers: int | [int per cell], widths: [int per cell] (optional)}]}

        Every layer offers ``ops``, except that a layer changing shape (a block's first layer with
        stride 2 or new channels, or a cell's last layer when its width differs) drops ``skip``.
        """
        try:
            ops = tuple(op_from_dict(o) for o in cfg["ops"])
            if not ops:
                raise ValueError("a search space needs at least one op (ops is empty)")
            stem = int(cfg.get("stem_channels", 16))
            blocks, prev = [], stem
            for b in cfg["blocks"]:
                out, stride = int(b["out_channels"]), int(b.get("stride", 1))
                counts = b["layers"] if isinstance(b["layers"], list) else [b["layers"]]
                widths = b.get("widths", [None] * len(counts))
                if len(widths) != len(counts):
                    raise ValueError(f"block {len(blocks)}: {len(widths)} widths for {len(counts)} cells")
                cells = []
                for n, w in zip(counts, widths):
                    probe = CellSpec(tuple(LayerSpec((ops[-1],)) for _ in range(int(n))), w)
                    shell = BlockSpec(prev, out, stride, (probe,))
                    layers = tuple(
                        LayerSpec(
                            ops if shell.layer_shape(0, i).shape_preserving else tuple(o for o in ops if not o.is_skip)
                        )
                        for i in range(int(n))
                    )
                    cells.append(CellSpec(layers, w))
                blocks.append(BlockSpec(prev, out, stride, tuple(cells)))
                prev = out
            return cls(
                blocks=tuple(blocks),
                input_channels=int(cfg.get("input_channels", 1)),
                input_size=int(cfg.get("input_size", 8)),
                stem_channels=stem,
                stem_stride=int(cfg.get("stem_stride", 1)),
                name=str(cfg.get("name", "space")),
            )
        except KeyError as exc:
            raise ValueError(f"search space config lacks {exc}") from None


def op_from_dict(cfg: dict) -> OpSpec:
    """``{kind: skip}`` or ``{kernel: 3, expansion: 4, se: 0.25}`` -> OpSpec."""
    if not isinstance(cfg, dict):
        raise ValueError(f"an op config must be a mapping, got {cfg!r}")
    unknown = set(cfg) - {"kind", "kernel", "expansion", "se"}
    if unknown:
        raise ValueError(f"unknown op field(s) {sorted(unknown)} in {cfg!r}")
    return OpSpec(
        str(cfg.get("kind", "mbconv")),
        int(cfg.get("kernel", 3)),
        int(cfg.get("expansion", 1)),
        float(cfg.get("se", 0.0)),
    )


def _down(size: int, stride: int) -> int:
    return (size + stride - 1) // stride


# Named space configs (``SearchSpace.from_dict`` mappings), e.g. ``--space digits-cells`` of DNA.
SPACE_PRESETS: dict[str, dict] = {
    # Digits with DNA's depth/width cells: each block offers a 1-layer cell, a narrow 2-layer cell (inner
    # width out/2) and a wide 2-layer cell (inner width 2 x out); every layer chooses MBConv e1 k3, e4 k3 or
    # e4 k5 (no skip: depth is the cell's). 3 + 9 + 9 = 21 candidates per block, 9,261 architectures.
    "digits-cells": {
        "name": "digits-cells",
        "input_channels": 1,
        "input_size": 8,
        "stem_channels": 8,
        "stem_stride": 1,
        "ops": [{"kernel": 3, "expansion": 1}, {"kernel": 3, "expansion": 4}, {"kernel": 5, "expansion": 4}],
        "blocks": [
            {"out_channels": 16, "stride": 1, "layers": [1, 2, 2], "widths": [None, 8, 32]},
            {"out_channels": 24, "stride": 2, "layers": [1, 2, 2], "widths": [None, 12, 48]},
            {"out_channels": 32, "stride": 2, "layers": [1, 2, 2], "widths": [None, 16, 64]},
        ],
    },
}


def space_preset(name: str) -> SearchSpace:
    """The packaged space ``name`` (a key of :data:`SPACE_PRESETS`); ``KeyError`` naming the presets."""
    if name not in SPACE_PRESETS:
        raise KeyError(f"unknown space preset {name!r}; presets: {', '.join(sorted(SPACE_PRESETS))}")
    return SearchSpace.from_dict(SPACE_PRESETS[name])
