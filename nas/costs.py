"""Parameter and FLOP counts, computed from built modules (never typed by hand).

FLOPs are multiply-accumulates of every ``nn.Conv2d`` and ``nn.Linear`` in a forward pass at
the block's input resolution (the NAS papers' "FLOPs" convention), measured by forward hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from nas.export import build_block
from nas.ops import NormFactory
from nas.spaces import SearchSpace

__all__ = ["count_params", "count_flops", "candidate_cost", "block_cost_table", "architecture_cost"]


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_flops(module: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of conv/linear layers for one forward pass of a ``(1, C, H, W)`` input."""
    total = 0

    def conv_hook(m: nn.Conv2d, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            module(torch.zeros(1, *input_shape[-3:]))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return int(total)


def candidate_cost(
    space: SearchSpace, k: int, candidate: Sequence[int], norm_layer: NormFactory = nn.BatchNorm2d
) -> dict[str, int]:
    """``{"params", "flops"}`` of block ``k``'s candidate, built stand-alone at its input resolution."""
    block = space.blocks[k]
    module = build_block(block, candidate, norm_layer)
    size = space.block_input_size(k)
    return {"params": count_params(module), "flops": count_flops(module, (block.in_channels, size, size))}


def block_cost_table(space: SearchSpace, norm_layer: NormFactory = nn.BatchNorm2d) -> list[dict[str, dict[str, int]]]:
    """Per block, ``{candidate key: {"params", "flops"}}`` for every candidate."""
    return [
        {block.key(c): candidate_cost(space, k, c, norm_layer) for c in block.enumerate()}
        for k, block in enumerate(space.blocks)
    ]


def architecture_cost(
    block_costs: Sequence[dict[str, dict[str, float]]], keys: Sequence[str], cost: str = "params"
) -> float:
    """Cost of an architecture = sum over blocks of its candidates' costs."""
    if len(keys) != len(block_costs):
        raise ValueError(f"{len(keys)} block keys for {len(block_costs)} blocks")
    return float(sum(table[key][cost] for table, key in zip(block_costs, keys)))
