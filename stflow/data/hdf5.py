"""Readers and validation for the DeepST / ST-ResNet HDF5 layout.

Flow file: ``data`` float64 ``(N, 2, H, W)`` (channel 0 inflow, 1 outflow) and ``date`` ``|S10``
bytes ``YYYYMMDDSS`` where slot ``SS`` runs 01..T and slot k starts at ``(k-1) * 24h / T``.
Meteorology file (BJ_Meteorology schema): ``date``, ``Temperature`` (N,), ``WindSpeed`` (N,),
``Weather`` (N, K) one-hot (K = 17). Holiday file: one ``YYYYMMDD`` per line (LF or CRLF).
Every problem raises :class:`DataFormatError` naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

__all__ = [
    "DataFormatError",
    "FlowFile",
    "MeteorologyFile",
    "IncompleteDays",
    "parse_slot_dates",
    "read_flow_file",
    "read_meteorology",
    "read_holidays",
    "remove_incomplete_days",
    "format_slot_dates",
    "write_flow_file",
    "write_meteorology",
]


class DataFormatError(ValueError):
    """A data file or dataset configuration that stflow cannot use (message names file and problem)."""


PathLike = str | os.PathLike


@dataclass
class FlowFile:
    """One flow file after validation: raw counts and the start time of every slot."""

    path: Path
    data: np.ndarray  # float64 (N, 2, H, W)
    timestamps: pd.DatetimeIndex  # (N,) strictly increasing slot start times


@dataclass
class MeteorologyFile:
    """Weather per slot in the BJ_Meteorology schema."""

    path: Path
    timestamps: pd.DatetimeIndex  # (M,)
    weather: np.ndarray  # float64 (M, K) one-hot
    wind_speed: np.ndarray  # float64 (M,)
    temperature: np.ndarray  # float64 (M,)
    slots_per_day: int


def _decode(raw: np.ndarray, path: Path) -> list[str]:
    out = []
    for item in raw.tolist():
        if isinstance(item, bytes):
            try:
                item = item.decode("ascii")
            except UnicodeDecodeError as exc:
                raise DataFormatError(f"{path}: 'date' entry {item!r} is not ASCII") from exc
        out.append(str(item).strip())
    return out


def parse_slot_dates(dates: np.ndarray | list, slots_per_day: int, path: PathLike = "<dates>") -> pd.DatetimeIndex:
    """``YYYYMMDDSS`` strings/bytes -> slot start times; rejects malformed dates and slot numbers."""
    path = Path(path)
    strings = _decode(np.asarray(dates), path)
    if not strings:
        raise DataFormatError(f"{path}: 'date' is empty")
    for i, s in enumerate(strings):
        if len(s) != 10 or not s.isdigit():
            raise DataFormatError(f"{path}: malformed date {s!r} at row {i} (expected YYYYMMDDSS)")
    slots = np.array([int(s[8:]) for s in strings], dtype=np.int64)
    bad = np.flatnonzero((slots < 1) | (slots > slots_per_day))
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(
            f"{path}: bad slot number {strings[i][8:]} in {strings[i]!r} at row {i} (slots are 01..{slots_per_day:02d})"
        )
    days = pd.to_datetime([s[:8] for s in strings], format="%Y%m%d", errors="coerce")
    if days.isna().any():
        i = int(np.flatnonzero(days.isna())[0])
        raise DataFormatError(f"{path}: bad calendar date {strings[i][:8]!r} in {strings[i]!r} at row {i}")
    minutes_per_slot = 24 * 60 // slots_per_day
    return pd.DatetimeIndex(days + pd.to_timedelta((slots - 1) * minutes_per_slot, unit="min")).as_unit("ns")


def _check_increasing(ts: pd.DatetimeIndex, path: Path) -> None:
    steps = np.diff(ts.asi8)
    if (steps <= 0).any():
        i = int(np.flatnonzero(steps <= 0)[0])
        raise DataFormatError(
            f"{path}: dates are not strictly increasing ({ts[i]} at row {i} is followed by {ts[i + 1]})"
        )


def _open(path: Path) -> h5py.File:
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataFormatError(f"{path}: not a readable HDF5 file ({exc})") from exc


def _get(f: h5py.File, key: str, path: Path) -> np.ndarray:
    if key not in f:
        raise DataFormatError(f"{path}: missing key {key!r} (found {sorted(f.keys())})")
    return f[key][()]


def _check_counts(values: np.ndarray, what: str, path: Path, nonneg: bool = True) -> np.ndarray:
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(values.dtype, np.complexfloating):
        raise DataFormatError(f"{path}: {what} has non-numeric dtype {values.dtype}")
    values = values.astype(np.float64, copy=False)
    if not np.isfinite(values).all():
        raise DataFormatError(f"{path}: {what} contains NaN or infinite values")
    if nonneg and (values < 0).any():
        raise DataFormatError(f"{path}: {what} contains negative counts (min {values.min()})")
    return values


def read_flow_file(path: PathLike, slots_per_day: int, grid: tuple[int, int] | None = None) -> FlowFile:
    """Read and validate one flow file (shape, grid, counts, dates); ``.npz`` / ``.csv`` grid files are read by
    :func:`stflow.data.trips.read_grid_file` (the grid time-series schema)."""
    path = Path(path)
    if path.suffix.lower() in (".npz", ".csv"):
        from .trips import read_grid_file

        return read_grid_file(path, slots_per_day, grid)
    with _open(path) as f:
        data = _get(f, "data", path)
        dates = _get(f, "date", path)
    if data.ndim != 4 or data.shape[1] != 2:
        raise DataFormatError(f"{path}: 'data' must have shape (N, 2, H, W), got {data.shape}")
    if grid is not None and tuple(data.shape[2:]) != tuple(grid):
        raise DataFormatError(f"{path}: grid {tuple(data.shape[2:])} does not match the expected {tuple(grid)}")
    if dates.ndim != 1 or len(dates) != len(data):
        raise DataFormatError(f"{path}: 'date' has shape {dates.shape} but 'data' has {len(data)} slots")
    data = _check_counts(data, "'data'", path)
    ts = parse_slot_dates(dates, slots_per_day, path)
    _check_increasing(ts, path)
    return FlowFile(path, data, ts)


def read_meteorology(path: PathLike, slots_per_day: int) -> MeteorologyFile:
    """Read a BJ_Meteorology-schema file (``date``, ``Temperature``, ``WindSpeed``, ``Weather``)."""
    path = Path(path)
    with _open(path) as f:
        dates = _get(f, "date", path)
        temperature = _get(f, "Temperature", path)
        wind = _get(f, "WindSpeed", path)
        weather = _get(f, "Weather", path)
    n = len(dates)
    if dates.ndim != 1:
        raise DataFormatError(f"{path}: 'date' must be 1-D, got shape {dates.shape}")
    for key, arr in (("Temperature", temperature), ("WindSpeed", wind)):
        if arr.shape != (n,):
            raise DataFormatError(f"{path}: {key!r} must have shape ({n},), got {arr.shape}")
    if weather.ndim != 2 or len(weather) != n:
        raise DataFormatError(f"{path}: 'Weather' must have shape ({n}, K), got {weather.shape}")
    ts = parse_slot_dates(dates, slots_per_day, path)
    _check_increasing(ts, path)
    return MeteorologyFile(
        path,
        ts,
        _check_counts(weather, "'Weather'", path),
        _check_counts(wind, "'WindSpeed'", path, nonneg=False),
        _check_counts(temperature, "'Temperature'", path, nonneg=False),
        slots_per_day,
    )


def read_holidays(path: PathLike) -> pd.DatetimeIndex:
    """Holiday dates (midnight timestamps, sorted, unique) from a ``YYYYMMDD``-per-line file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    lines = [line.strip() for line in path.read_text(encoding="ascii", errors="replace").splitlines()]
    days = []
    for i, line in enumerate(lines):
        if not line:
            continue
        day = pd.to_datetime(line, format="%Y%m%d", errors="coerce") if len(line) == 8 and line.isdigit() else pd.NaT
        if pd.isna(day):
            raise DataFormatError(f"{path}: line {i + 1} {line!r} is not a YYYYMMDD date")
        days.append(day)
    return pd.DatetimeIndex(sorted(set(days)))


@dataclass
class IncompleteDays:
    """Result of :func:`remove_incomplete_days`: which slots to keep and which days were dropped."""

    keep: np.ndarray  # bool (N,)
    removed_days: list[str]  # YYYYMMDD


def remove_incomplete_days(
    timestamps: pd.DatetimeIndex, slots_per_day: int, keep_edge_days: bool = False
) -> IncompleteDays:
    """Keep a day only if it has all ``slots_per_day`` slots (the reference's rule, applied per file).

    ``keep_edge_days`` also keeps the first and last day of the file when they are cut only by the
    file's boundary (every slot from the file's first slot to midnight, resp. from midnight to the
    file's last slot, is present): a file segment that starts at 23:00 then keeps that slot.
    """
    ts = pd.DatetimeIndex(timestamps).as_unit("ns")
    days = ts.normalize()
    unique_days, inverse, counts = np.unique(days.asi8, return_inverse=True, return_counts=True)
    complete = counts == slots_per_day
    if keep_edge_days and len(unique_days):
        slot_ns = 86_400 * 10**9 // slots_per_day
        first_slot = (ts.asi8[0] - unique_days[0]) // slot_ns
        last_slot = (ts.asi8[-1] - unique_days[-1]) // slot_ns
        if counts[0] == slots_per_day - first_slot:
            complete[0] = True
        if counts[-1] == last_slot + 1:
            complete[-1] = True
    removed = [pd.Timestamp(d).strftime("%Y%m%d") for d in unique_days[~complete]]
    return IncompleteDays(keep=complete[inverse], removed_days=removed)


def format_slot_dates(timestamps: pd.DatetimeIndex, slots_per_day: int) -> np.ndarray:
    """Slot start times -> ``|S10`` ``YYYYMMDDSS`` bytes (the inverse of :func:`parse_slot_dates`)."""
    ts = pd.DatetimeIndex(timestamps).as_unit("ns")
    slot = (ts.asi8 - ts.normalize().asi8) // (86_400 * 10**9 // slots_per_day) + 1
    return np.array([f"{d}{s:02d}".encode() for d, s in zip(ts.strftime("%Y%m%d"), slot)], dtype="S10")


def write_flow_file(path: PathLike, data: np.ndarray, timestamps: pd.DatetimeIndex, slots_per_day: int) -> Path:
    """Write ``data`` (N, 2, H, W) and its slot dates in the DeepST layout."""
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=np.asarray(data, dtype=np.float64))
        f.create_dataset("date", data=format_slot_dates(timestamps, slots_per_day))
    return path


def write_meteorology(
    path: PathLike,
    timestamps: pd.DatetimeIndex,
    weather: np.ndarray,
    wind_speed: np.ndarray,
    temperature: np.ndarray,
    slots_per_day: int,
) -> Path:
    """Write a meteorology file in the BJ_Meteorology schema."""
    path = Path(path)
    with h5py.File(path, "w") as f:
        f.create_dataset("date", data=format_slot_dates(timestamps, slots_per_day))
        f.create_dataset("Temperature", data=np.asarray(temperature, dtype=np.float64))
        f.create_dataset("WindSpeed", data=np.asarray(wind_speed, dtype=np.float64))
        f.create_dataset("Weather", data=np.asarray(weather, dtype=np.float64))
    return path
