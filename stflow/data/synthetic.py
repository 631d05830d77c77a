"""A synthetic city in the DeepST layout, for tests and a quick default training run.

Structure (so that models have something real to learn): each active cell mixes a residential and
a business profile. On working days residential cells send people out in the morning peak (~08:00)
and receive them in the evening peak (~18:00), business cells the opposite, so inflow/outflow peaks
swap between morning and evening; weekends and holidays have a single flat midday bump. Rainy slots
lower every flow; a slow weekly drift and Poisson counts add noise; some cells are always zero.
Deterministic per seed: the same seed writes byte-identical files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .hdf5 import write_flow_file, write_meteorology

__all__ = ["SyntheticCity", "RAINY_WEATHER", "generate_synthetic_city", "synthetic_file_names"]

# Our meaning of the 17 weather classes: 0 sunny, 1 cloudy, 2 overcast, 3-6 rain, 7-16 rare others.
RAINY_WEATHER = (3, 4, 5, 6)
_WEATHER_PROBS = np.array([0.45, 0.22, 0.12, 0.08, 0.05, 0.03, 0.02] + [0.003] * 10)


@dataclass(frozen=True)
class SyntheticCity:
    """Paths of the files written by :func:`generate_synthetic_city`."""

    flow: Path
    meteorology: Path
    holidays: Path


def synthetic_file_names(grid: tuple[int, int], slots_per_day: int) -> tuple[str, str, str]:
    """File names of a synthetic city (flow, meteorology, holidays)."""
    minutes = 24 * 60 // slots_per_day
    return f"SYN_M{grid[0]}x{grid[1]}_T{minutes}_InOut.h5", "SYN_Meteorology.h5", "SYN_Holiday.txt"


def _bump(hours: np.ndarray, centre: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((hours - centre) / width) ** 2)


def _weather_chain(rng: np.random.Generator, n: int, stay: float = 0.9) -> np.ndarray:
    probs = _WEATHER_PROBS / _WEATHER_PROBS.sum()
    fresh = rng.choice(len(probs), size=n, p=probs)
    keep = rng.random(n) < stay
    states = np.empty(n, dtype=np.int64)
    states[0] = fresh[0]
    for i in range(1, n):
        states[i] = states[i - 1] if keep[i] else fresh[i]
    return states


def generate_synthetic_city(
    out_dir: str | os.PathLike,
    seed: int = 0,
    days: int = 60,
    grid: tuple[int, int] = (16, 8),
    slots_per_day: int = 24,
    start: str = "2015-03-02",
    zero_fraction: float = 0.2,
    peak_count: float = 40.0,
) -> SyntheticCity:
    """Write a synthetic city (flow HDF5, BJ-schema meteorology HDF5, holiday list) into ``out_dir``."""
    if days < 1 or slots_per_day < 1 or (24 * 60) % slots_per_day:
        raise ValueError(f"need days >= 1 and slots_per_day dividing 1440, got {days}, {slots_per_day}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = grid
    slot_minutes = 24 * 60 // slots_per_day
    t0 = pd.Timestamp(start).normalize()
    ts = pd.date_range(t0, periods=days * slots_per_day, freq=f"{slot_minutes}min")
    # Meteorology starts one day early so the "previous slot" of the first flow slot exists.
    met_ts = pd.date_range(t0 - pd.Timedelta(days=1), periods=(days + 1) * slots_per_day, freq=f"{slot_minutes}min")

    # Holidays: two working days a third and two thirds into the period, plus one outside it.
    holidays = []
    for frac in (1 / 3, 2 / 3):
        day = t0 + pd.Timedelta(days=int(days * frac))
        while day.day_of_week >= 5:
            day += pd.Timedelta(days=1)
        holidays.append(day)
    holidays.append(t0 - pd.Timedelta(days=30))

    weather = _weather_chain(rng, len(met_ts))
    hours_met = (met_ts.hour + met_ts.minute / 60).to_numpy()
    day_index = (met_ts.normalize() - t0).days.to_numpy()
    rain = np.isin(weather, RAINY_WEATHER)
    temperature = 12 + 0.1 * day_index + 7 * np.sin(2 * np.pi * (hours_met - 9) / 24) - 3 * rain
    temperature = np.round(temperature + rng.normal(0, 1, len(met_ts)), 1)
    wind = np.round(np.abs(rng.normal(3, 2, len(met_ts))) + 3 * rain, 1)

    # Cells: business weight high near a downtown spot, some cells never active.
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (H, W)
    cy, cx = h * 0.4, w * 0.55
    business = np.exp(-(((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.3 * w)) ** 2))
    business = np.clip(business + rng.normal(0, 0.1, grid), 0, 1)  # (H, W)
    scale = rng.lognormal(0, 0.5, grid) * (0.5 + business)  # (H, W)
    active = rng.random(grid) >= zero_fraction

    hours = (ts.hour + ts.minute / 60).to_numpy()
    off_day = (ts.day_of_week.to_numpy() >= 5) | ts.normalize().isin(pd.DatetimeIndex(holidays))
    morning, evening, midday = _bump(hours, 8, 1.2), _bump(hours, 18, 1.5), _bump(hours, 13, 3.0)
    base = 0.04
    # Working-day profiles (N,) of residential/business inflow and outflow.
    res_in = 0.3 * morning + 1.0 * evening + 0.25 * midday + base
    res_out = 1.0 * morning + 0.3 * evening + 0.25 * midday + base
    bus_in = 1.0 * morning + 0.3 * evening + 0.5 * midday + base
    bus_out = 0.3 * morning + 1.0 * evening + 0.5 * midday + base
    leisure = 0.55 * _bump(hours, 14, 3.5) + base
    b = business[None]  # (1, H, W)
    off, rest = off_day[:, None, None], leisure[:, None, None]  # (N, 1, 1)
    inflow = np.where(off, rest, res_in[:, None, None] * (1 - b) + bus_in[:, None, None] * b)  # (N, H, W)
    outflow = np.where(off, rest, res_out[:, None, None] * (1 - b) + bus_out[:, None, None] * b)  # (N, H, W)
    rain_now = rain[slots_per_day:]  # weather of each flow slot
    drift = 1 + 0.08 * np.sin(2 * np.pi * np.arange(len(ts)) / (7.3 * slots_per_day))
    factor = (np.where(rain_now, 0.55, 1.0) * drift)[:, None, None]  # (N, 1, 1)
    lam = np.stack([inflow, outflow], axis=1) * (peak_count * factor * scale * active)[:, None]  # (N, 2, H, W)
    data = rng.poisson(lam).astype(np.float64)

    flow_name, met_name, hol_name = synthetic_file_names(grid, slots_per_day)
    city = SyntheticCity(out / flow_name, out / met_name, out / hol_name)
    write_flow_file(city.flow, data, ts, slots_per_day)
    write_meteorology(city.meteorology, met_ts, np.eye(17)[weather], wind, temperature, slots_per_day)
    city.holidays.write_text("".join(d.strftime("%Y%m%d") + "\n" for d in sorted(holidays)))
    return city
