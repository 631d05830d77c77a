"""``python -m stflow.data info|synthetic``: inspect a dataset as the data layer sees it, or write a synthetic city."""

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


USAGE = "usage: python -m stflow.data {info,synthetic} [options]   (--help after the command for its options)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("info", "synthetic"):
        print(USAGE, file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    command, rest = argv[0], argv[1:]
    json_flag = lambda p: p.add_argument("--json", action="store_true", help="print JSON instead of text")  # noqa: E731
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
