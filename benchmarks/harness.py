"""The shared benchmark harness: timing, environment capture, one table printed and saved.

Every benchmark builds a list of row dicts and hands it to :func:`report`, which prints an
aligned table and writes ``benchmarks/results/<name>.csv`` and ``<name>.json``; the JSON also
records the machine, library versions and git revision so figures can be traced later.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
        return (rev or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def environment() -> dict[str, Any]:
    """Machine, versions and revision: the context every saved figure needs."""
    import numpy
    import torch

    env: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "git": git_revision(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        import pytorch_lightning

        env["pytorch_lightning"] = pytorch_lightning.__version__
    except ImportError:
        pass
    try:  # the version only: importing triton here would fix its mode (interpreter or not) for the process
        env["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        pass
    return env


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], Any], *, warmup: int = 3, repeats: int = 20, min_time_s: float = 0.0) -> dict[str, float]:
    """Wall-clock quantiles (p20/p50/p80, milliseconds) of ``fn()``; CUDA is synchronized."""
    for _ in range(warmup):
        fn()
    _sync()
    samples: list[float] = []
    start_all = time.perf_counter()
    while len(samples) < repeats or (time.perf_counter() - start_all) < min_time_s:
        t0 = time.perf_counter()
        fn()
        _sync()
        samples.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(samples, n=10) if len(samples) >= 2 else [samples[0]] * 9
    return {"p20_ms": q[1], "p50_ms": statistics.median(samples), "p80_ms": q[7], "n": len(samples)}


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = list(columns or _all_columns(rows))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join([line, sep, *body])


def _all_columns(rows: Iterable[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(k)
    return columns


def report(
    name: str,
    rows: Sequence[dict[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    notes: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> Path:
    """Print the table and notes, write ``<name>.csv`` / ``<name>.json``; return the JSON path."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"\n== {name} ==  ({env['processor']}, {env['cpu_count']} cpu, torch {env['torch']}, git {env['git']})")
    print(format_table(rows, columns))
    for note in notes:
        print(f"* {note}")
    cols = list(columns or _all_columns(rows))
    with open(out / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    payload = {"benchmark": name, "environment": env, "rows": list(rows), "notes": list(notes), **(extra or {})}
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(payload, indent=2, default=str))
    print(f"saved {out / (name + '.csv')} and {json_path}")
    return json_path
