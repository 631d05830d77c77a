"""Normalization-agnostic re-estimation of running statistics for one candidate path.

Any module exposing ``running_mean``, ``running_var`` and ``reset_running_stats`` qualifies
(``nn.BatchNorm*`` and ``normlayers.BatchKalmanNorm2d`` alike), so no rater is tied to BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["norm_layers", "recalibrate_norm_stats"]


def norm_layers(module: nn.Module) -> list[nn.Module]:
    """Every sub-module that keeps running statistics."""
    return [
        m
        for m in module.modules()
        if hasattr(m, "reset_running_stats")
        and getattr(m, "running_mean", None) is not None
        and getattr(m, "running_var", None) is not None
    ]


@torch.no_grad()
def recalibrate_norm_stats(
    module: nn.Module,
    batches: Iterable[Any],
    num_batches: int = 4,
    forward: Callable[[torch.Tensor], Any] | None = None,
) -> int:
    """Reset running stats, re-estimate them as the cumulative average over ``num_batches`` batches
    (train mode, no grad), restore each layer's momentum and leave ``module`` in eval mode.

    ``batches`` yields input tensors (or tuples whose first item is the input); ``forward``
    (default ``module``) runs one batch, e.g. ``lambda x: supernet(x, candidate)``. The result
    depends only on the batches, never on which path ran before. Returns the batches used.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    run = forward if forward is not None else module
    layers = norm_layers(module)
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    module.train()
    used = 0
    try:
        for batch in batches:
            if used >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            run(x)
            used += 1
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        module.eval()
    if used == 0:
        raise ValueError("recalibrate_norm_stats received no batches")
    return used
