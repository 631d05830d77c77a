"""Parameter-free baselines with the common ``forward(batch)`` interface: persistence and historical average.

Both have ``trainable = False``: the training system skips optimisation for them. The historical average is
fitted on the training history with :meth:`HistoricalAverage.fit_history` before evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

__all__ = ["Persistence", "HistoricalAverage", "slot_of_day"]


class Persistence(nn.Module):
    """Repeat a past frame: the last one (``mode="last"``: closeness[:, 0] = t-1) or the same slot one week
    earlier (``mode="week"``: trend[:, 0], which is t-7 days with the data module's default trend interval)."""

    trainable = False

    def __init__(self, mode: Literal["last", "week"] = "last") -> None:
        super().__init__()
        if mode not in ("last", "week"):
            raise ValueError(f"Persistence mode must be 'last' or 'week', got {mode!r}")
        self.mode = mode

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """batch: closeness (B, lc, 2, H, W) [mode last] or trend (B, lt, 2, H, W) [mode week], scaled, most recent
        first -> the repeated frame (B, 2, H, W), scaled."""
        key = "closeness" if self.mode == "last" else "trend"
        frames = batch.get(key)
        if frames is None or frames.ndim != 5 or frames.shape[1] < 1:
            shape = None if frames is None else tuple(frames.shape)
            raise ValueError(
                f"Persistence(mode={self.mode!r}) needs batch[{key!r}] of shape (B, >=1, C, H, W), got {shape}"
            )
        return frames[:, 0]

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def slot_of_day(timestamps: pd.DatetimeIndex, slots_per_day: int) -> np.ndarray:
    """Slot index 0..T-1 of each slot-start timestamp (slot k covers [k*24h/T, (k+1)*24h/T))."""
    minutes = timestamps.hour.to_numpy() * 60 + timestamps.minute.to_numpy()
    return (minutes * slots_per_day) // (24 * 60)


class HistoricalAverage(nn.Module):
    """Mean of the training slots with the same weekday and slot of day.

    After :meth:`fit_history`, buffer ``means`` (7*T, 2, H, W) holds the scaled averages keyed by
    ``weekday * T + slot`` and ``slot_key`` (N_slots,) maps every slot index of the data module to its key, so
    ``forward`` only needs ``batch["index"]``. A (weekday, slot) pair absent from the training history falls back
    to the mean of that slot of day over all weekdays, then to the overall training mean.
    """

    trainable = False

    def __init__(self, slots_per_day: int, flow_shape: tuple[int, int, int] = (2, 16, 8)) -> None:
        super().__init__()
        if slots_per_day < 1:
            raise ValueError(f"slots_per_day must be >= 1, got {slots_per_day}")
        self.slots_per_day = slots_per_day
        self.register_buffer("means", torch.zeros(7 * slots_per_day, *flow_shape))
        self.register_buffer("slot_key", torch.zeros(0, dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return self.slot_key.numel() > 0

    def fit_history(self, flows: np.ndarray, timestamps: pd.DatetimeIndex, train_mask: np.ndarray, scaler: Any) -> None:
        """flows (N_slots, 2, H, W) in original units, their slot-start timestamps, a bool mask of the training
        slots, and the data module's scaler (``.transform``): stores the scaled weekday x slot means."""
        flows = np.asarray(flows, dtype=np.float64)
        train_mask = np.asarray(train_mask)
        n = len(flows)
        if flows.ndim != 4:
            raise ValueError(f"flows must be (N_slots, C, H, W), got shape {flows.shape}")
        if len(timestamps) != n or train_mask.shape != (n,):
            raise ValueError(f"flows ({n}), timestamps ({len(timestamps)}) and train_mask {train_mask.shape} disagree")
        if train_mask.dtype != bool:
            raise TypeError(f"train_mask must be boolean, got {train_mask.dtype}")
        if not train_mask.any():
            raise ValueError("train_mask selects no slot: nothing to average")
        if not np.isfinite(flows[train_mask]).all():
            raise ValueError("flows contain NaN/inf in the training slots")
        t = self.slots_per_day
        key = np.asarray(timestamps.day_of_week) * t + slot_of_day(pd.DatetimeIndex(timestamps), t)
        train_flows, train_key = flows[train_mask], key[train_mask]
        overall = train_flows.mean(axis=0)
        means = np.empty((7 * t, *flows.shape[1:]))
        for slot in range(t):
            same_slot = train_key % t == slot
            slot_mean = train_flows[same_slot].mean(axis=0) if same_slot.any() else overall
            for day in range(7):
                hit = train_key == day * t + slot
                means[day * t + slot] = train_flows[hit].mean(axis=0) if hit.any() else slot_mean
        scaled = np.asarray(scaler.transform(means), dtype=np.float32)
        self.means = torch.from_numpy(scaled).to(self.means.device)
        self.slot_key = torch.from_numpy(key.astype(np.int64)).to(self.means.device)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """batch: index (B,) int64, the target slot's index into the fitted ``timestamps`` -> (B, 2, H, W) scaled."""
        if not self.fitted:
            raise RuntimeError(
                "HistoricalAverage is not fitted: call fit_history(flows, timestamps, train_mask, scaler)"
            )
        index = batch["index"].to(self.slot_key.device).long()
        if index.numel() and (index.min() < 0 or index.max() >= self.slot_key.numel()):
            raise IndexError(f"batch index out of range [0, {self.slot_key.numel()}) of the fitted history")
        return self.means[self.slot_key[index]]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        # The buffers' sizes depend on the fitted data: adopt the checkpoint's sizes before the strict copy.
        for name in ("means", "slot_key"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"slots_per_day={self.slots_per_day}, fitted={self.fitted}"
