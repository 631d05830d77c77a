"""External feature vectors per slot (ACFM and ST-ResNet layouts).

ACFM (authors' ``timestamp2array`` + ``ExtDat``), in this order:
weekday one-hot (7, Monday first) | weekday flag (1: 1 on working days, 0 on weekends) |
slot-of-day one-hot (T) | day flag (1 from 06:00 to 18:00) | holiday (1) | weather one-hot (K=17) |
wind speed | temperature. BikeNYC (no meteorology/holiday) -> 33 dims, TaxiBJ -> 77.
ST-ResNet (DeepST ``timestamp2vec`` + ``load_holiday`` + ``load_meteorol``): weekday one-hot (7) |
weekday flag (1) | holiday (1) | weather (17) | wind | temperature -> 8 (BikeNYC) / 28 (TaxiBJ).
Wind and temperature are min-max scaled to [0, 1] over the whole meteorology file.

Two reference bugs are reproducible on request (both off by default):
``compat_weekend_bug``: the flag is 0 on Monday and Sunday (instead of Saturday and Sunday);
``compat_meteorology_bug``: a lookup at HH:30 reads slot 02 of that day (the reference's
``transtrlong`` precedence bug) instead of the HH:30 slot.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .hdf5 import DataFormatError, MeteorologyFile

__all__ = [
    "FEATURE_KINDS",
    "acfm_time_features",
    "stresnet_time_features",
    "holiday_features",
    "meteorology_features",
    "external_features",
    "external_dim",
]

FEATURE_KINDS = ("acfm", "stresnet", "none")


def _weekday_part(ts: pd.DatetimeIndex, compat_weekend_bug: bool) -> np.ndarray:
    wday = ts.day_of_week.to_numpy()  # Monday = 0 ... Sunday = 6
    onehot = np.eye(7)[wday]  # (N, 7)
    weekend = (wday == 0) | (wday == 6) if compat_weekend_bug else wday >= 5
    return np.concatenate([onehot, (~weekend).astype(np.float64)[:, None]], axis=1)  # (N, 8)


def acfm_time_features(
    timestamps: pd.DatetimeIndex, slots_per_day: int, compat_weekend_bug: bool = False
) -> np.ndarray:
    """(N, 7 + 1 + T + 1): weekday one-hot, weekday flag, slot one-hot, day(06-18h) flag."""
    ts = pd.DatetimeIndex(timestamps).as_unit("ns")
    slot_ns = 86_400 * 10**9 // slots_per_day
    slot = (ts.asi8 - ts.normalize().asi8) // slot_ns
    hour = ts.hour.to_numpy()
    day = ((hour >= 6) & (hour < 18)).astype(np.float64)[:, None]  # (N, 1)
    return np.concatenate([_weekday_part(ts, compat_weekend_bug), np.eye(slots_per_day)[slot], day], axis=1)


def stresnet_time_features(timestamps: pd.DatetimeIndex, compat_weekend_bug: bool = False) -> np.ndarray:
    """(N, 8): weekday one-hot and weekday flag (DeepST ``timestamp2vec``)."""
    return _weekday_part(pd.DatetimeIndex(timestamps), compat_weekend_bug)


def holiday_features(timestamps: pd.DatetimeIndex, holidays: pd.DatetimeIndex) -> np.ndarray:
    """(N, 1): 1 where the slot's calendar day is a holiday."""
    days = pd.DatetimeIndex(timestamps).normalize()
    return days.isin(pd.DatetimeIndex(holidays).normalize()).astype(np.float64)[:, None]


def meteorology_features(
    timestamps: pd.DatetimeIndex,
    meteorology: MeteorologyFile,
    slots_per_day: int,
    previous_slot: bool,
    compat_meteorology_bug: bool = False,
) -> np.ndarray:
    """(N, K + 2): weather one-hot, wind, temperature (both scaled to [0, 1] over the file).

    ``previous_slot`` reads the slot before each timestamp (weather at prediction time is unknown);
    ``slots_per_day`` is that of the flow data, so "previous" means one flow slot earlier.
    """
    ts = pd.DatetimeIndex(timestamps)
    if previous_slot:
        ts = ts - pd.Timedelta(minutes=24 * 60 // slots_per_day)
    if compat_meteorology_bug:
        half = ts.minute != 0
        # The reference maps any HH:30 lookup to slot 02 of the same day (00:30 for 48 slots a day).
        second_slot = ts.normalize() + pd.Timedelta(minutes=24 * 60 // meteorology.slots_per_day)
        ts = pd.DatetimeIndex(np.where(half, second_slot, ts))
    rows = meteorology.timestamps.get_indexer(ts)
    if (rows < 0).any():
        missing = ts[rows < 0]
        raise DataFormatError(
            f"{meteorology.path}: no meteorology for {len(missing)} needed slot(s), first {missing[0]} "
            f"(last available {meteorology.timestamps[-1]})"
        )

    def unit(x: np.ndarray) -> np.ndarray:
        span = x.max() - x.min()
        return (x - x.min()) / span if span > 0 else np.zeros_like(x)

    table = np.concatenate(
        [meteorology.weather, unit(meteorology.wind_speed)[:, None], unit(meteorology.temperature)[:, None]], axis=1
    )  # (M, K + 2)
    return table[rows]


def external_dim(kind: str, slots_per_day: int, has_holidays: bool, weather_width: int | None) -> int:
    """Width D of the external vector for a feature kind and dataset."""
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown features {kind!r}; choose from {FEATURE_KINDS}")
    if kind == "none":
        return 0
    dim = 8 + (slots_per_day + 1 if kind == "acfm" else 0) + int(has_holidays)
    return dim + (weather_width + 2 if weather_width is not None else 0)


def external_features(
    timestamps: pd.DatetimeIndex,
    kind: str,
    slots_per_day: int,
    holidays: pd.DatetimeIndex | None = None,
    meteorology: MeteorologyFile | None = None,
    previous_slot: bool = True,
    compat_weekend_bug: bool = False,
    compat_meteorology_bug: bool = False,
) -> np.ndarray:
    """(N, D) float64 external vectors for ``timestamps`` (D = 0 for ``kind="none"``)."""
    ts = pd.DatetimeIndex(timestamps)
    if kind not in FEATURE_KINDS:
        raise ValueError(f"unknown features {kind!r}; choose from {FEATURE_KINDS}")
    if kind == "none":
        return np.zeros((len(ts), 0))
    if kind == "acfm":
        parts = [acfm_time_features(ts, slots_per_day, compat_weekend_bug)]
    else:
        parts = [stresnet_time_features(ts, compat_weekend_bug)]
    if holidays is not None:
        parts.append(holiday_features(ts, holidays))
    if meteorology is not None:
        parts.append(meteorology_features(ts, meteorology, slots_per_day, previous_slot, compat_meteorology_bug))
    return np.concatenate(parts, axis=1)
