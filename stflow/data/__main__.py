"""``python -m stflow.data info|synthetic``: inspect a dataset as the data layer sees it, or write a synthetic city."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .datamodule import ensure_synthetic_city, load_crowd_flow
from .features import FEATURE_KINDS
from .hdf5 import DataFormatError
from .synthetic import generate_synthetic_city


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stflow.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="slots kept/removed, sample counts, test period, scaler, features")
    info.add_argument("--dataset", default="synthetic", help="registered name or a .yaml spec")
    info.add_argument("--data-dir", default=None, help="data directory (default for synthetic: the user cache)")
    info.add_argument("--len-closeness", type=int, default=4)
    info.add_argument("--len-period", type=int, default=2)
    info.add_argument("--len-trend", type=int, default=0)
    info.add_argument("--period-interval", type=int, default=1)
    info.add_argument("--trend-interval", type=int, default=7)
    info.add_argument("--test-days", type=int, default=None)
    info.add_argument("--val-fraction", type=float, default=0.1)
    info.add_argument("--features", choices=FEATURE_KINDS, default="acfm")
    info.add_argument("--compat-weekend-bug", action="store_true")
    info.add_argument("--compat-meteorology-bug", action="store_true")
    info.add_argument("--scale-min", type=float, default=None)
    info.add_argument("--scale-max", type=float, default=None)
    info.add_argument("--seed", type=int, default=0, help="synthetic city seed when --data-dir is absent")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    syn = sub.add_parser("synthetic", help="write a synthetic city in the DeepST layout")
    syn.add_argument("--out", required=True)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--days", type=int, default=60)
    syn.add_argument("--grid", type=int, nargs=2, default=(16, 8), metavar=("H", "W"))
    return parser


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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "synthetic":
        city = generate_synthetic_city(args.out, seed=args.seed, days=args.days, grid=tuple(args.grid))
        print(f"wrote {city.flow}, {city.meteorology}, {city.holidays}")
        return 0
    data_dir = args.data_dir
    if data_dir is None:
        if args.dataset != "synthetic":
            print(f"error: --data-dir is required for dataset {args.dataset!r}", file=sys.stderr)
            return 2
        data_dir = ensure_synthetic_city(args.seed)
    try:
        data = load_crowd_flow(
            args.dataset, data_dir, args.len_closeness, args.len_period, args.len_trend, args.period_interval,
            args.trend_interval, args.test_days, args.val_fraction, args.features, args.compat_weekend_bug,
            args.compat_meteorology_bug, args.scale_min, args.scale_max,
        )
    except DataFormatError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = data.info()
    print(json.dumps(info, indent=2) if args.json else _text(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
