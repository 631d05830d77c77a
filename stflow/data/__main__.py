"""``python -m stflow.data info|synthetic|trips``: inspect a dataset as the data layer sees it, write a synthetic city,
or turn trip records into a grid dataset (:mod:`stflow.data.trips`)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import parse_cli, run_cli
from .datamodule import ensure_synthetic_city, load_crowd_flow
from .options import CrowdFlowOptions
from .synthetic import generate_synthetic_city

_WINDOW_FLAGS = ("len_closeness", "len_period", "len_trend", "period_interval", "trend_interval", "test_days",
                 "val_fraction", "features", "compat_weekend_bug", "compat_meteorology_bug", "scale_min", "scale_max")


@dataclass(frozen=True)
class InfoConfig:
    """``python -m stflow.data info``: slots kept/removed, sample counts, test period, scaler, features."""

    dataset: str = "synthetic"  # registered name, packaged spec name (taxinyc) or a .yaml spec
    data_dir: str | None = None  # default for synthetic: the user cache
    data: CrowdFlowOptions = field(default_factory=CrowdFlowOptions)
    seed: int = 0  # synthetic city seed when --data-dir is absent

    cli_aliases: ClassVar[dict[str, str]] = {f"--{name}": f"--data.{name}" for name in _WINDOW_FLAGS}


@dataclass(frozen=True)
class SyntheticConfig:
    """``python -m stflow.data synthetic``: write a synthetic city in the DeepST layout."""

    out: str
    seed: int = 0
    days: int = 60
    grid: tuple[int, int] = (16, 8)

    def validate(self) -> None:
        if self.days < 1 or min(self.grid) < 1:
            raise ValueError(f"days and grid must be >= 1, got days={self.days}, grid={self.grid}")


@dataclass(frozen=True)
class TripsConfig:
    """``python -m stflow.data trips``: trip records (CSV) -> in/out flows on a grid + a dataset spec."""

    csv: str  # one trip per row: start_time, end_time, start_lat, start_lon, end_lat, end_lon
    out: str  # output folder: <name>_M{H}x{W}_T{slot}_InOut.h5 and <name>.yaml
    bbox: tuple[float, float, float, float]  # lat_min lat_max lon_min lon_max (degrees)
    cell_size: float = 500.0  # metres
    slot_minutes: int = 60
    name: str = "city"
    test_days: int = 7  # written into the spec
    columns: tuple[str, str, str, str, str, str] = ("start_time", "end_time", "start_lat", "start_lon", "end_lat",
                                                    "end_lon")


def _trips(cfg: TripsConfig) -> dict[str, Any]:
    from .trips import GridGeometry, trips_to_flows, write_city

    geometry = GridGeometry(*cfg.bbox, cell_size=cfg.cell_size)
    flows, stamps, report = trips_to_flows(cfg.csv, geometry, cfg.slot_minutes, tuple(cfg.columns))
    flow_path, spec_path = write_city(cfg.out, cfg.name, flows, stamps, cfg.slot_minutes, cfg.test_days)
    return {**report.as_dict(), "grid": list(geometry.shape), "slots": len(stamps), "first": str(stamps[0]),
            "last": str(stamps[-1]), "flow_file": str(flow_path), "spec": str(spec_path),
            "inflow_total": float(flows[:, 0].sum()), "outflow_total": float(flows[:, 1].sum())}


def _text(info: dict[str, Any]) -> str:
    s, scaler = info["samples"], info["scaler"]
    lines = [
        f"dataset        {info['dataset']}  ({info['data_dir']})",
        *(f"file           {f}" for f in info["files"]),
        f"grid           {info['grid'][0]}x{info['grid'][1]}, {info['slots_per_day']} slots per day",
        f"slots          {info['slots_kept']} kept / {info['slots_read']} read ({info['slots_removed']} removed)",
        f"removed days   {', '.join(info['removed_days']) or 'none'}",
        f"date range     {info['date_first']} .. {info['date_last']}",
        f"samples        {s['total']} total: train {s['train']}, val {s['val']}, test {s['test']}",
        f"train targets  {info['train_period'][0]} .. {info['train_period'][1]}",
        f"val targets    {info['val_period'][0]} .. {info['val_period'][1]}",
        f"test targets   {info['test_period'][0]} .. {info['test_period'][1]}",
        f"scaler         min {scaler['min']:g}, max {scaler['max']:g} "
        f"({scaler['source']}, {info['train_slots']} train slots)",
        f"external       {info['features']}, {info['ext_dim']} dims",
        f"metric factor  {info['metric_factor']:.6f}",
    ]
    return "\n".join(lines)


USAGE = "usage: python -m stflow.data {info,synthetic,trips} [options]   (--help after the command for its options)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("info", "synthetic", "trips"):
        print(USAGE, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    json_flag = lambda p: p.add_argument("--json", action="store_true", help="print JSON instead of text")  # noqa: E731
    if command == "trips":
        trips_cfg, extras = parse_cli(TripsConfig, rest, prog="python -m stflow.data trips", extra=json_flag)
        result = _trips(trips_cfg)
        if not extras.get("json"):
            bad = ", ".join(f"{k} {v}" for k, v in result["bad"].items())
            print(f"read {result['rows']} trip records: {result['used_trips']} used; bad records: {bad}")
            print(f"grid {result['grid'][0]}x{result['grid'][1]}, {result['slots']} slots "
                  f"({result['first']} .. {result['last']}); inflow {result['inflow_total']:g}, "
                  f"outflow {result['outflow_total']:g}")
            print(f"wrote {result['flow_file']} and {result['spec']} "
                  f"(use --dataset {result['spec']} --data-dir {trips_cfg.out})")
        if extras.get("json"):
            print(json.dumps(result))
        return 0
    if command == "synthetic":
        syn, _ = parse_cli(SyntheticConfig, rest, prog="python -m stflow.data synthetic")
        city = generate_synthetic_city(syn.out, seed=syn.seed, days=syn.days, grid=tuple(syn.grid))
        print(f"wrote {city.flow}, {city.meteorology}, {city.holidays}")
        return 0
    cfg, extras = parse_cli(InfoConfig, rest, prog="python -m stflow.data info", extra=json_flag)
    data_dir = cfg.data_dir
    if data_dir is None:
        if cfg.dataset != "synthetic":
            raise ValueError(f"--data-dir is required for dataset {cfg.dataset!r}")
        data_dir = ensure_synthetic_city(cfg.seed)
    info = load_crowd_flow(cfg.dataset, data_dir, cfg.data).info()
    print(json.dumps(info, indent=2) if extras.get("json") else _text(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
