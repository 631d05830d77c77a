"""Your own city: trip records -> in/out flows on a grid, and the grid time-series schema the data layer reads.

Trip records: a CSV with one trip per row and (by default) the columns ``start_time, end_time, start_lat,
start_lon, end_lat, end_lon`` (names configurable). The grid: a bounding box (``lat_min lat_max lon_min lon_max``,
degrees) cut into square cells of ``cell_size`` metres (equirectangular: 1 degree of latitude = 111,320 m, of
longitude 111,320 m x cos(mid latitude)); row 0 is the NORTHERN edge, column 0 the western edge; a cell holds
``[lat_max - (r+1) dlat, lat_max - r dlat) x [lon_min + c dlon, lon_min + (c+1) dlon)``. Time: slots of
``slot_minutes`` (dividing a day) from midnight of the first trip's day to the end of the last trip's day, so
every day is complete. A trip adds 1 to the OUTFLOW (channel 1) of the cell and slot where it starts and 1 to the
INFLOW (channel 0) of the cell and slot where it ends.

Bad records are counted by reason and reported, never silently dropped: ``unparsable_time`` (start or end),
``bad_coordinates`` (missing or not a number), ``end_before_start`` — these rows add nothing — and
``start_outside_box`` / ``end_outside_box``: that endpoint adds nothing, the other one (inside) still counts.

Output (:func:`write_city`): ``<name>_M{H}x{W}_T{slot}_InOut.h5`` in the DeepST layout and ``<name>.yaml``, a
:class:`~stflow.data.DatasetSpec` for ``--dataset <dir>/<name>.yaml --data-dir <dir>`` of every CLI.

Grid time-series schema (``read_grid_file``; a spec's ``flow_files`` may name ``.npz`` or ``.csv`` files too):

- NPZ: ``flows`` float (T, 2, H, W), channel 0 inflow, 1 outflow; ``timestamps`` (T,) slot starts as ISO strings
  (``2024-05-01T08:00``) or ``date`` ``YYYYMMDDSS`` bytes (the DeepST form);
- CSV: columns ``timestamp, row, col, inflow, outflow``, one row per slot and cell (what ``stflow.predict`` writes);
- holidays and meteorology stay optional files named by the spec (``holiday_file``: one ``YYYYMMDD`` per line;
  ``meteorology_file``: HDF5 with ``date``, ``Temperature``, ``WindSpeed``, ``Weather`` (one-hot)).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from .hdf5 import DataFormatError, FlowFile, _check_counts, _check_increasing, parse_slot_dates, write_flow_file

__all__ = ["GridGeometry", "TripReport", "read_grid_file", "trips_to_flows", "write_city", "write_grid_npz"]

METRES_PER_DEGREE = 111_320.0
COLUMNS = ("start_time", "end_time", "start_lat", "start_lon", "end_lat", "end_lon")


@dataclass(frozen=True)
class GridGeometry:
    """A bounding box cut into square cells of ``cell_size`` metres (see the module docstring)."""

    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float
    cell_size: float  # metres

    def __post_init__(self) -> None:
        if not (self.lat_min < self.lat_max and self.lon_min < self.lon_max):
            raise ValueError(f"bounding box needs lat_min < lat_max and lon_min < lon_max, got {self}")
        if not (-90 <= self.lat_min and self.lat_max <= 90) or not self.cell_size > 0:
            raise ValueError(f"latitudes must be within [-90, 90] and cell_size > 0, got {self}")

    @property
    def dlat(self) -> float:
        return self.cell_size / METRES_PER_DEGREE

    @property
    def dlon(self) -> float:
        return self.cell_size / (METRES_PER_DEGREE * math.cos(math.radians((self.lat_min + self.lat_max) / 2)))

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W): rows north to south, columns west to east."""
        return (math.ceil((self.lat_max - self.lat_min) / self.dlat - 1e-9),
                math.ceil((self.lon_max - self.lon_min) / self.dlon - 1e-9))

    def cells(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row, col, inside) of points (inside: within the box)."""
        inside = (lat >= self.lat_min) & (lat < self.lat_max) & (lon >= self.lon_min) & (lon < self.lon_max)
        h, w = self.shape
        row = np.clip(np.floor((self.lat_max - lat) / self.dlat), 0, h - 1)
        col = np.clip(np.floor((lon - self.lon_min) / self.dlon), 0, w - 1)
        return np.where(inside, row, 0).astype(np.int64), np.where(inside, col, 0).astype(np.int64), inside


@dataclass
class TripReport:
    """What the converter did with every record."""

    rows: int = 0
    used_trips: int = 0
    bad: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "used_trips": self.used_trips, "bad": dict(self.bad)}


def trips_to_flows(csv: str | os.PathLike | pd.DataFrame, geometry: GridGeometry, slot_minutes: int = 60,
                   columns: tuple[str, ...] = COLUMNS) -> tuple[np.ndarray, pd.DatetimeIndex, TripReport]:
    """(flows (T, 2, H, W) float64, slot starts (T,), report) from trip records (see the module docstring)."""
    if slot_minutes < 1 or 1440 % slot_minutes:
        raise ValueError(f"slot_minutes must divide 1440, got {slot_minutes}")
    frame = csv if isinstance(csv, pd.DataFrame) else pd.read_csv(csv, dtype=str, keep_default_na=False)
    absent = [c for c in columns if c not in frame.columns]
    if absent:
        raise DataFormatError(f"{csv if not isinstance(csv, pd.DataFrame) else 'trips'}: missing column(s) {absent} "
                              f"(found {list(frame.columns)})")
    t0_name, t1_name, lat0, lon0, lat1, lon1 = columns
    report = TripReport(rows=len(frame))
    start = pd.to_datetime(frame[t0_name], errors="coerce", format="mixed")
    end = pd.to_datetime(frame[t1_name], errors="coerce", format="mixed")
    coords = [pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float) for c in (lat0, lon0, lat1, lon1)]
    bad_time = (start.isna() | end.isna()).to_numpy()
    bad_coord = ~bad_time & ~np.isfinite(np.stack(coords)).all(axis=0)
    backwards = ~bad_time & ~bad_coord & (end < start).to_numpy()
    ok = ~(bad_time | bad_coord | backwards)
    r0, c0, in0 = geometry.cells(coords[0], coords[1])
    r1, c1, in1 = geometry.cells(coords[2], coords[3])
    report.bad = {"unparsable_time": int(bad_time.sum()), "bad_coordinates": int(bad_coord.sum()),
                  "end_before_start": int(backwards.sum()), "start_outside_box": int((ok & ~in0).sum()),
                  "end_outside_box": int((ok & ~in1).sum())}
    report.used_trips = int((ok & (in0 | in1)).sum())
    if not ok.any():
        raise DataFormatError(f"no usable trip record among {len(frame)} rows ({report.bad})")
    slot = pd.Timedelta(minutes=slot_minutes)
    s, e = pd.DatetimeIndex(start[ok]), pd.DatetimeIndex(end[ok])
    first = min(s.min(), e.min()).normalize()
    last = max(s.max(), e.max()).normalize() + pd.Timedelta(days=1)
    stamps = pd.date_range(first, last, freq=slot, inclusive="left").as_unit("ns")
    h, w = geometry.shape
    flows = np.zeros((len(stamps), 2, h, w))
    k0 = ((s - first) // slot).to_numpy()
    k1 = ((e - first) // slot).to_numpy()
    out_ok, in_ok = in0[ok], in1[ok]
    np.add.at(flows, (k0[out_ok], 1, r0[ok][out_ok], c0[ok][out_ok]), 1.0)  # outflow: where and when trips start
    np.add.at(flows, (k1[in_ok], 0, r1[ok][in_ok], c1[ok][in_ok]), 1.0)  # inflow: where and when trips end
    return flows, stamps, report


def write_city(out_dir: str | os.PathLike, name: str, flows: np.ndarray, timestamps: pd.DatetimeIndex,
               slot_minutes: int, test_days: int = 7) -> tuple[Path, Path]:
    """Write the flows (DeepST HDF5) and a dataset spec YAML; returns (flow file, spec)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h, w = flows.shape[2:]
    flow_path = write_flow_file(out / f"{name}_M{h}x{w}_T{slot_minutes}_InOut.h5", flows, timestamps,
                                1440 // slot_minutes)
    spec = {"name": name, "slots_per_day": 1440 // slot_minutes, "flow_files": [flow_path.name], "grid": [h, w],
            "test_days": test_days, "metric_factor": "active_cells"}
    spec_path = out / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return flow_path, spec_path


def write_grid_npz(path: str | os.PathLike, flows: np.ndarray, timestamps: pd.DatetimeIndex) -> Path:
    """Write the NPZ form of the schema (``flows`` + ISO ``timestamps``)."""
    path = Path(path)
    iso = np.array(list(pd.DatetimeIndex(timestamps).strftime("%Y-%m-%dT%H:%M")), dtype=str)
    np.savez(path, flows=np.asarray(flows, dtype=np.float64), timestamps=iso)
    return path


def _stamps(values: np.ndarray, slots_per_day: int, path: Path) -> pd.DatetimeIndex:
    if values.dtype.kind == "S":  # DeepST YYYYMMDDSS bytes
        return parse_slot_dates(values, slots_per_day, path)
    stamps = pd.to_datetime(pd.Series(values.astype(str)), errors="coerce", format="mixed")
    if stamps.isna().any():
        i = int(np.flatnonzero(stamps.isna())[0])
        raise DataFormatError(f"{path}: timestamp {str(values[i])!r} at row {i} is not a date and time")
    stamps = pd.DatetimeIndex(stamps).as_unit("ns")
    slot_ns = 86_400 * 10**9 // slots_per_day
    off = (stamps.asi8 - stamps.normalize().asi8) % slot_ns
    if off.any():
        i = int(np.flatnonzero(off)[0])
        raise DataFormatError(f"{path}: timestamp {stamps[i]} at row {i} is not the start of a "
                              f"{1440 // slots_per_day}-minute slot")
    return stamps


def read_grid_file(path: str | os.PathLike, slots_per_day: int, grid: tuple[int, int] | None = None) -> FlowFile:
    """Read and validate an NPZ or CSV grid time series (the schema of the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            if "flows" not in z:
                raise DataFormatError(f"{path}: missing key 'flows' (found {sorted(z.files)})")
            key = "timestamps" if "timestamps" in z else "date" if "date" in z else None
            if key is None:
                raise DataFormatError(f"{path}: missing key 'timestamps' (or 'date') (found {sorted(z.files)})")
            data, raw = z["flows"], z[key]
    else:
        frame = pd.read_csv(path)
        need = ["timestamp", "row", "col", "inflow", "outflow"]
        if [c for c in need if c not in frame.columns]:
            raise DataFormatError(f"{path}: CSV grid needs columns {need}, found {list(frame.columns)}")
        raw = np.asarray(sorted(frame["timestamp"].astype(str).unique()))
        h, w = int(frame["row"].max()) + 1, int(frame["col"].max()) + 1
        index = {s: i for i, s in enumerate(raw)}
        data = np.zeros((len(raw), 2, h, w))
        t = frame["timestamp"].astype(str).map(index).to_numpy()
        data[t, 0, frame["row"], frame["col"]] = frame["inflow"].to_numpy(dtype=float)
        data[t, 1, frame["row"], frame["col"]] = frame["outflow"].to_numpy(dtype=float)
        if len(frame) != data.shape[0] * h * w:
            expected = data.shape[0] * h * w
            raise DataFormatError(f"{path}: {len(frame)} rows, expected one per slot and cell ({expected})")
    if data.ndim != 4 or data.shape[1] != 2:
        raise DataFormatError(f"{path}: 'flows' must have shape (T, 2, H, W), got {data.shape}")
    if grid is not None and tuple(data.shape[2:]) != tuple(grid):
        raise DataFormatError(f"{path}: grid {tuple(data.shape[2:])} does not match the expected {tuple(grid)}")
    if len(raw) != len(data):
        raise DataFormatError(f"{path}: {len(raw)} timestamps for {len(data)} slots")
    data = _check_counts(np.asarray(data), "'flows'", path)
    stamps = _stamps(np.asarray(raw), slots_per_day, path)
    _check_increasing(stamps, path)
    return FlowFile(path, data, stamps)
