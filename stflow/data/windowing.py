"""Closeness / period / trend samples as indices into the kept slots.

For a target slot t the inputs are, MOST RECENT FIRST (the reference's order):
closeness t-1, t-2, ..., t-lc (in slots); period t-1*pi, t-2*pi, ..., t-lp*pi (pi = period_interval
days); trend t-1*ti, ..., t-lt*ti (ti = trend_interval days). A sample exists only if every frame it
needs exists in the same file; samples are built per file, then concatenated in time order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["WindowIndex", "frame_offsets", "build_windows", "origin_samples"]


@dataclass
class WindowIndex:
    """Slot indices of each sample (rows are samples in time order)."""

    target: np.ndarray  # int64 (S,)
    closeness: np.ndarray  # int64 (S, lc)
    period: np.ndarray  # int64 (S, lp)
    trend: np.ndarray  # int64 (S, lt)

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, rows: slice | np.ndarray) -> WindowIndex:
        return WindowIndex(self.target[rows], self.closeness[rows], self.period[rows], self.trend[rows])


def frame_offsets(
    slots_per_day: int,
    len_closeness: int,
    len_period: int,
    len_trend: int,
    period_interval: int = 1,
    trend_interval: int = 7,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets (in slots, before the target) of the closeness, period and trend frames."""
    for name, value in (("len_closeness", len_closeness), ("len_period", len_period), ("len_trend", len_trend)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if len_closeness + len_period + len_trend == 0:
        raise ValueError("at least one of len_closeness, len_period, len_trend must be > 0")
    if period_interval < 1 or trend_interval < 1:
        raise ValueError(f"intervals must be >= 1 day, got period {period_interval}, trend {trend_interval}")
    k = np.arange(1, max(len_closeness, len_period, len_trend) + 1, dtype=np.int64)
    return (
        k[:len_closeness],
        k[:len_period] * period_interval * slots_per_day,
        k[:len_trend] * trend_interval * slots_per_day,
    )


def build_windows(
    timestamps: pd.DatetimeIndex,
    file_ids: np.ndarray,
    slots_per_day: int,
    len_closeness: int,
    len_period: int,
    len_trend: int,
    period_interval: int = 1,
    trend_interval: int = 7,
) -> WindowIndex:
    """All samples whose every frame exists (within the target's file), in time order."""
    offsets = frame_offsets(slots_per_day, len_closeness, len_period, len_trend, period_interval, trend_interval)
    slot_ns = 86_400 * 10**9 // slots_per_day
    slot_no = pd.DatetimeIndex(timestamps).as_unit("ns").asi8 // slot_ns  # integer slot number since the epoch
    file_ids = np.asarray(file_ids)
    parts: list[list[np.ndarray]] = []
    for fid in np.unique(file_ids):  # files are stored in time order
        rows = np.flatnonzero(file_ids == fid)
        numbers = slot_no[rows]
        valid = np.ones(len(rows), dtype=bool)
        groups = []
        for group in offsets:
            wanted = numbers[:, None] - group[None, :]  # (n, len(group))
            pos = np.searchsorted(numbers, wanted).clip(max=len(numbers) - 1)
            valid &= (numbers[pos] == wanted).all(axis=1)
            groups.append(rows[pos])
        parts.append([rows[valid]] + [g[valid] for g in groups])
    target, closeness, period, trend = (np.concatenate([p[i] for p in parts]) for i in range(4))
    return WindowIndex(target, closeness, period, trend)


def origin_samples(windows: WindowIndex, timestamps: pd.DatetimeIndex, slots_per_day: int, candidates: np.ndarray,
                   horizon: int, last_row: int | None = None) -> np.ndarray:
    """The candidate samples whose targets ``t .. t+horizon-1`` are consecutive slots, each a sample of ``windows``
    and none after row ``last_row`` (e.g. the last test target): the origins of a ``horizon``-step forecast."""
    targets = set(windows.target.tolist())
    slot_ns = 86_400 * 10**9 // slots_per_day
    stamps = pd.DatetimeIndex(timestamps).as_unit("ns").asi8
    keep = []
    for s in np.asarray(candidates):
        t = int(windows.target[s])
        end = t + horizon - 1
        if end >= len(stamps) or (last_row is not None and end > last_row):
            continue
        if stamps[end] - stamps[t] != (horizon - 1) * slot_ns:
            continue
        if all(r in targets for r in range(t, end + 1)):
            keep.append(int(s))
    return np.asarray(keep, dtype=np.int64)
