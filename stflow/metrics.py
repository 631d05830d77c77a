"""Crowd-flow metrics on the ORIGINAL scale, exactly per the ACFM metric protocol (../shared/docs/acfm.md).

Predictions and targets arrive scaled to [-1, 1]; an error in original units is ``(pred - target) * (max - min) / 2``.

- RMSE = sqrt(global MSE over every sample, both channels, every cell) in original units, times ``metric_factor``.
  Per-batch RMSEs are never averaged: squared errors are summed over the whole split and divided once.
- ``rmse_inflow`` / ``rmse_outflow``: the same restricted to channel 0 / 1.
- ``metric_factor`` = sqrt(H*W / n_active) (sqrt(128/81) for BikeNYC: 81 of 128 cells ever see a bike) turns
  "mean square over all cells" into "sum of squares / number of ACTIVE cells": RMSE_81 = sqrt(sum e^2 / (N*2*81))
  = RMSE_all * sqrt(128/81). The never-active cells stay in the sum (a model predicting flow there is penalised).
- MAE = mean |error| over the ACTIVE cells only (``active_mask``; all cells when None). The factor-style
  conversion MAE_all * 128/81 (= sum|e| / (N*2*81), the MAE analogue of the RMSE rule) is NOT what the published
  figures use: on the authors' BikeNYC checkpoint it gives 3.468, while acfm.md's "MAE over the 81 active cells"
  3.382 is exactly the mean over the active cells with the 47 never-active cells left out (checked in
  tests/test_metrics.py on constructed data and in the reference evaluation). ``mae_all`` is the plain mean
  over every cell (no factor), ``mae_scaled`` the same on scaled values (the l1 loss).

DDP and DistributedSampler padding: the states are SUMS indexed by the target slot (``batch["index"]``),
reduced across processes with ``dist_reduce_fx="sum"``. A sample duplicated by the sampler's padding adds its
error twice to the same slot and ``hits`` counts it twice; ``compute`` divides each slot by its hit count, so
every target slot counts exactly once whatever the number of processes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["FlowMetrics", "METRIC_NAMES", "protocol_metrics"]

METRIC_NAMES = ("rmse", "rmse_inflow", "rmse_outflow", "mae", "mae_all", "mse_scaled", "mae_scaled")


class FlowMetrics(Metric):
    """RMSE / inflow RMSE / outflow RMSE / MAE (original units, protocol factor) and the scaled MSE.

    Args:
        num_slots: number of slots of the data module (``len(datamodule.timestamps)``): ``index`` values are in
            ``[0, num_slots)``.
        scale: ``(scaler_max - scaler_min) / 2``, converts a scaled error into original units.
        metric_factor: sqrt(H*W / n_active_cells) (see the module docstring).
        active_mask: (H, W) bool, the cells MAE is averaged over (None: every cell).
        channels: flow channels (2: inflow, outflow).

    ``update(pred, target, index)``: pred/target (B, C, H, W) scaled, index (B,) int64 target slots.
    ``compute()`` returns a dict with :data:`METRIC_NAMES` (0-d float64 tensors) and ``n_samples``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    sse: Tensor
    sae: Tensor
    sae_active: Tensor
    hits: Tensor
    cells: Tensor

    def __init__(
        self,
        num_slots: int,
        scale: float,
        metric_factor: float = 1.0,
        active_mask: Tensor | None = None,
        channels: int = 2,
    ) -> None:
        super().__init__()
        if num_slots < 1:
            raise ValueError(f"FlowMetrics needs num_slots >= 1, got {num_slots}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"FlowMetrics scale (max - min) / 2 must be a positive finite number, got {scale}")
        if not (math.isfinite(metric_factor) and metric_factor > 0):
            raise ValueError(f"metric_factor must be a positive finite number, got {metric_factor}")
        self.num_slots = int(num_slots)
        self.scale = float(scale)
        self.metric_factor = float(metric_factor)
        self.channels = int(channels)
        if active_mask is not None:
            active_mask = torch.as_tensor(active_mask, dtype=torch.bool)
            if active_mask.ndim != 2 or not active_mask.any():
                raise ValueError(
                    f"active_mask must be a non-empty (H, W) bool map, got shape {tuple(active_mask.shape)}"
                )
        self.active_mask: Tensor | None
        self.register_buffer("active_mask", active_mask, persistent=False)
        # float64 sums: thousands of samples x cells of squared counts lose digits in float32.
        self.add_state("sse", torch.zeros(num_slots, channels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sae", torch.zeros(num_slots, channels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sae_active", torch.zeros(num_slots, channels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("active_cells", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("hits", torch.zeros(num_slots, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cells", torch.zeros((), dtype=torch.float64), dist_reduce_fx="max")

    def update(self, pred: Tensor, target: Tensor, index: Tensor) -> None:  # type: ignore[override]
        if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != self.channels:
            raise ValueError(
                f"FlowMetrics expects pred and target of shape (B, {self.channels}, H, W), "
                f"got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        index = index.to(device=self.sse.device, dtype=torch.long).reshape(-1)
        if index.numel() != pred.shape[0]:
            raise ValueError(f"index has {index.numel()} entries for a batch of {pred.shape[0]}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_slots):
            raise IndexError(f"target slot index out of range [0, {self.num_slots}): {index.min()}..{index.max()}")
        err = (pred.detach().double() - target.detach().double()) * self.scale  # (B, C, H, W), original units
        self.sse.index_add_(0, index, err.square().sum(dim=(2, 3)))  # (B, C) per-sample, per-channel sums
        abs_err = err.abs()
        self.sae.index_add_(0, index, abs_err.sum(dim=(2, 3)))
        if self.active_mask is None:
            self.sae_active.index_add_(0, index, abs_err.sum(dim=(2, 3)))
            self.active_cells.fill_(pred.shape[2] * pred.shape[3])
        else:
            if self.active_mask.shape != pred.shape[2:]:
                raise ValueError(f"active_mask is {tuple(self.active_mask.shape)}, the grid is {tuple(pred.shape[2:])}")
            self.sae_active.index_add_(
                0, index, abs_err[:, :, self.active_mask].sum(dim=2)
            )  # (B, C, n_active) -> (B, C)
            self.active_cells.fill_(int(self.active_mask.sum()))
        self.hits.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))
        self.cells.fill_(pred.shape[2] * pred.shape[3])

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        seen = self.hits > 0
        n = seen.sum().to(torch.float64)
        if n == 0:
            raise RuntimeError("FlowMetrics.compute() called before any update")
        per_slot = 1.0 / self.hits[seen].unsqueeze(1)  # (n, 1): each target slot counts once (DDP padding)
        sse = (self.sse[seen] * per_slot).sum(0)  # (C,)
        sae = (self.sae[seen] * per_slot).sum(0)  # (C,)
        sae_active = (self.sae_active[seen] * per_slot).sum(0)  # (C,)
        values_per_channel = n * self.cells
        mse = sse / values_per_channel  # (C,) original units, all cells
        factor = self.metric_factor
        return {
            "rmse": mse.mean().sqrt() * factor,
            "rmse_inflow": mse[0].sqrt() * factor,
            "rmse_outflow": mse[-1].sqrt() * factor,
            "mae": sae_active.sum() / (n * self.active_cells * self.channels),
            "mae_all": sae.sum() / (values_per_channel * self.channels),
            "mse_scaled": mse.mean() / self.scale**2,
            "mae_scaled": sae.sum() / (values_per_channel * self.channels) / self.scale,
            "n_samples": n,
        }


def protocol_metrics(
    pred: Tensor, target: Tensor, scale: float, metric_factor: float = 1.0, active_mask: Tensor | None = None
) -> dict[str, float]:
    """The protocol metrics of a whole split at once (pred/target (N, C, H, W) scaled); plain floats."""
    index = torch.arange(pred.shape[0])
    metric = FlowMetrics(pred.shape[0], scale, metric_factor, active_mask, channels=pred.shape[1])
    metric.update(pred, target, index)
    return {k: float(v) for k, v in metric.compute().items()}
