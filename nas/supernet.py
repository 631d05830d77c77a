"""Weight-sharing supernets built from a space: one per block, and stem + all blocks.

A block supernet holds one module per (cell, layer, op) choice; a candidate selects a single
path (the cell's layers, one op each). Weights of an op are shared by every candidate using it.

Batch Kalman Normalization: when the norm factory builds ``normlayers.BatchKalmanNorm`` layers,
every op is wired with ``normlayers.convert`` (a Kalman chain inside the op: expand -> depthwise ->
project through SiLU and the depthwise conv). In training, the block forward hands the first op of
the path the MEASURED per-channel moments of the block input (detached: an observation, like the
teacher's features it usually is) and every later op the predicted output statistics of the op
before it (residual sums included), so every BKN on a path gets a prior. Not chained (plain BN for
that step): a norm after a squeeze-excite gate (multiplicative, data-dependent).
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from nas.ops import ConvNormAct, NormFactory, build_op
from nas.spaces import BlockSpec, Candidate, SearchSpace

__all__ = ["BlockSupernet", "Supernet", "make_stem"]


def make_stem(space: SearchSpace, norm_layer: NormFactory) -> nn.Module:
    """3x3 conv -> norm -> SiLU from the input channels to ``space.stem_channels``."""
    return ConvNormAct(space.input_channels, space.stem_channels, 3, space.stem_stride, norm_layer)


class BlockSupernet(nn.Module):
    """All candidate ops of one block with shared weights; ``forward(x, candidate)`` runs one path."""

    def __init__(
        self, block: BlockSpec, norm_layer: NormFactory = nn.BatchNorm2d, cells: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.block = block
        # The cells this supernet holds (default: all). DNA trains ONE supernet per cell (``cells=[c]``): the other
        # cells' entries stay empty, so candidates keep the block's encoding and keys (``c<cell>_...``).
        self.cell_ids: tuple[int, ...] = tuple(range(len(block.cells))) if cells is None else tuple(cells)
        if not self.cell_ids or len(set(self.cell_ids)) != len(self.cell_ids):
            raise ValueError(f"cells must be distinct cell indices, got {cells}")
        for c in self.cell_ids:
            if not 0 <= c < len(block.cells):
                raise ValueError(f"cell index {c} out of range (block has {len(block.cells)} cells)")
        # cells[c][i][j]: op j of layer i in cell c
        self.cells = nn.ModuleList()
        for c, cell in enumerate(block.cells):
            layers = nn.ModuleList()
            for i, layer in enumerate(cell.layers if c in self.cell_ids else ()):
                shape = block.layer_shape(c, i)
                layers.append(
                    nn.ModuleList(
                        build_op(op, shape.in_channels, shape.out_channels, shape.stride, norm_layer)
                        for op in layer.ops
                    )
                )
            self.cells.append(layers)
        self.kalman_chained = _chain_kalman_ops(self)

    def path(self, candidate: Sequence[int]) -> list[nn.Module]:
        """The modules on the candidate's path, in order."""
        cell, ops = self.block.split(candidate)
        if cell not in self.cell_ids:
            raise ValueError(f"candidate {tuple(candidate)} is in cell {cell}; this supernet holds {self.cell_ids}")
        return [self.cells[cell][i][j] for i, j in enumerate(ops)]

    def forward(self, x: torch.Tensor, candidate: Sequence[int]) -> torch.Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H / stride, W / stride)
        stats = None  # statistics of x for the Kalman chain across the ops of the path (BKN only)
        if self.training and self.kalman_chained:
            var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=0)  # (B, C, H, W) -> (C,)
            stats = (mean, var, tuple(x.shape[2:]))
        for module in self.path(candidate):
            chain = getattr(module, "kalman_chain", None)
            if chain is None:  # skip (identity): statistics unchanged; BatchNorm ops: nothing to carry
                x = module(x)
                continue
            chain.set_input_statistics(stats if self.training else None)
            x = module(x)
            stats = chain.output_statistics() if self.training else None
        return x

    def candidates(self) -> list[Candidate]:
        """Every candidate of the cells this supernet holds (block order)."""
        multi = self.block.multi_cell
        return [c for c in self.block.enumerate() if (c[0] if multi else 0) in self.cell_ids]

    def sample(self, rng: random.Random) -> Candidate:
        """A random path: the cell uniformly (each cell is trained as often as the others, as with the
        authors' one supernet per cell, whatever its number of paths), then one op per layer uniformly."""
        cell = rng.choices(self.cell_ids)[0]  # one random() draw, as before (resumed runs agree); held cells only
        ops = tuple(rng.randrange(len(layer.ops)) for layer in self.block.cells[cell].layers)
        return ((cell,) if self.block.multi_cell else ()) + ops


def _chain_kalman_ops(supernet: nn.Module) -> int:
    """Wire a Kalman chain inside every op that holds BKN layers; returns the number of chained ops."""
    try:
        from normlayers import BatchKalmanNorm, convert
    except ImportError:  # BKN layers cannot exist without normlayers
        return 0
    count = 0
    for cell in supernet.cells:
        for layer in cell:
            for op in layer:
                if any(isinstance(m, BatchKalmanNorm) for m in op.modules()):
                    with warnings.catch_warnings():  # SE-gated norms stay un-chained (documented above)
                        warnings.filterwarnings("ignore", message="normlayers.convert:")
                        convert(op, strict=False)
                    count += 1
    return count


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
