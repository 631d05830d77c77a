"""Weight-sharing supernets built from a space: one per block, and stem + all blocks.

A block supernet holds one module per (cell, layer, op) choice; a candidate selects a single
path (the cell's layers, one op each). Weights of an op are shared by every candidate using it.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import nn

from .ops import ConvNormAct, NormFactory, build_op
from .spaces import BlockSpec, Candidate, SearchSpace

__all__ = ["BlockSupernet", "Supernet", "make_stem"]


def make_stem(space: SearchSpace, norm_layer: NormFactory) -> nn.Module:
    """3x3 conv -> norm -> SiLU from the input channels to ``space.stem_channels``."""
    return ConvNormAct(space.input_channels, space.stem_channels, 3, space.stem_stride, norm_layer)


class BlockSupernet(nn.Module):
    """All candidate ops of one block with shared weights; ``forward(x, candidate)`` runs one path."""

    def __init__(self, block: BlockSpec, norm_layer: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.block = block
        # cells[c][i][j]: op j of layer i in cell c
        self.cells = nn.ModuleList()
        for c, cell in enumerate(block.cells):
            layers = nn.ModuleList()
            for i, layer in enumerate(cell.layers):
                shape = block.layer_shape(c, i)
                layers.append(
                    nn.ModuleList(
                        build_op(op, shape.in_channels, shape.out_channels, shape.stride, norm_layer)
                        for op in layer.ops
                    )
                )
            self.cells.append(layers)

    def path(self, candidate: Sequence[int]) -> list[nn.Module]:
        """The modules on the candidate's path, in order."""
        cell, ops = self.block.split(candidate)
        return [self.cells[cell][i][j] for i, j in enumerate(ops)]

    def forward(self, x: torch.Tensor, candidate: Sequence[int]) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)
        for module in self.path(candidate):
            x = module(x)
        return x

    def candidates(self) -> list[Candidate]:
        return list(self.block.enumerate())

    def sample(self, rng: random.Random) -> Candidate:
        """A uniformly random candidate: cell weighted by its number of paths, then one op per layer."""
        sizes = [_paths(self.block, c) for c in range(len(self.block.cells))]
        cell = rng.choices(range(len(sizes)), weights=sizes)[0]
        ops = tuple(rng.randrange(len(layer.ops)) for layer in self.block.cells[cell].layers)
        return ((cell,) if self.block.multi_cell else ()) + ops


def _paths(block: BlockSpec, cell: int) -> int:
    n = 1
    for layer in block.cells[cell].layers:
        n *= len(layer.ops)
    return n


class Supernet(nn.Module):
    """Stem followed by one :class:`BlockSupernet` per block; ``forward(x, encoding)`` runs one path."""

    def __init__(self, space: SearchSpace, norm_layer: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.space = space
        self.stem = make_stem(space, norm_layer)
        self.blocks = nn.ModuleList(BlockSupernet(b, norm_layer) for b in space.blocks)

    def forward(self, x: torch.Tensor, encoding: Sequence[Sequence[int]]) -> torch.Tensor:
        # x: (B, C_in, H, W) -> last block's features (B, C_out, H', W')
        encoding = self.space.validate(encoding)
        x = self.stem(x)
        for block, cand in zip(self.blocks, encoding):
            x = block(x, cand)
        return x

    def sample(self, rng: random.Random) -> tuple[Candidate, ...]:
        return tuple(b.sample(rng) for b in self.blocks)
