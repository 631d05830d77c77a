"""The shared benchmark harness: timing, environment capture, one table printed and saved.

Every benchmark builds a list of row dicts and hands it to :func:`report`, which prints an
aligned table and writes ``<name>.csv`` and ``<name>.json`` to the output folder; the JSON also
records the machine, library versions and git revision so figures can be traced later.

The output folder is decided here, once (:func:`output_dir`): ``runs/benchmarks/`` under the repository
root by default (``runs/`` is git-ignored), ``--results-dir DIR`` to choose another, and only
``--update-results`` writes into the committed ``benchmarks/results/``. Every benchmark parses its options
with :func:`parse_bench`, which adds those two flags to its config's, and writes its tables
(:func:`report`), figures (:func:`output_path`) and new caches (:func:`cache_path`) there. Committed
inputs (the ground-truth caches, other benchmarks' results) are still read from ``benchmarks/results/``
when the output folder has no newer copy (:func:`input_path`, :func:`cache_path`).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"  # committed: written only with --update-results
OUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "benchmarks"  # the default output folder (git-ignored)

_output: dict[str, Any] = {"results_dir": None, "update_results": False}  # set by parse_bench / set_output


def set_output(results_dir: str | os.PathLike | None = None, update_results: bool = False) -> Path:
    """Choose the output folder of this process's benchmark (``parse_bench`` calls it); returns it."""
    if update_results and results_dir is not None:
        raise ValueError("--results-dir and --update-results exclude each other: --update-results writes into "
                         "the committed benchmarks/results/, --results-dir into another folder")
    if results_dir is not None and not str(results_dir).strip():
        raise ValueError("results_dir must be a folder, got an empty string")
    _output.update(results_dir=None if results_dir is None else Path(results_dir), update_results=bool(update_results))
    return output_dir()


def output_dir() -> Path:
    """Where tables, figures and new caches go: ``benchmarks/results/`` with ``--update-results``, else
    ``--results-dir``, else ``runs/benchmarks/`` under the repository root."""
    if _output["update_results"]:
        return RESULTS_DIR
    return _output["results_dir"] if _output["results_dir"] is not None else OUT_DIR


def output_path(name: str) -> Path:
    """``output_dir() / name``, its folder created (a figure, a table of a benchmark's own)."""
    path = output_dir() / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def input_path(name: str) -> Path:
    """A file another benchmark wrote, read only: the output folder's copy when there is one (a fresh run),
    else the committed ``benchmarks/results/<name>`` (which may not exist either)."""
    fresh = output_dir() / name
    return fresh if fresh.is_file() else RESULTS_DIR / name


def cache_path(name: str) -> Path:
    """A cache a benchmark reads and extends (a ground truth): ``output_dir() / name``. Without
    ``--update-results`` the committed ``benchmarks/results/<name>`` is copied there first when the output
    folder has none, so its entries are reused and whatever is added is written to the output folder."""
    path = output_path(name)
    committed = RESULTS_DIR / name
    if path != committed and not path.is_file() and committed.is_file():
        shutil.copyfile(committed, path)
        print(f"{name}: starting from the committed {committed} (copied to {path})")
    return path


def _output_flags(parser: Any) -> None:
    parser.add_argument("--results_dir", default=None,
                        help="folder of the tables, figures and new caches; null: runs/benchmarks/ in the repository")
    parser.add_argument("--update_results", type=bool, nargs="?", const=True, default=False,  # bare flag: true
                        help="write into the committed benchmarks/results/ instead (refreshing the published figures)")


def parse_bench(cls: type[T], argv: Sequence[str] | None, **kwargs: Any) -> tuple[T, dict[str, Any]]:
    """:func:`stflow.config.parse_cli` of a benchmark's options plus the shared output flags
    (``--results-dir DIR``, ``--update-results``), which then choose the output folder (:func:`set_output`)."""
    from stflow.config import ConfigError, parse_cli

    own = kwargs.pop("extra", None)

    def extra(parser: Any) -> None:
        _output_flags(parser)
        if own is not None:
            own(parser)

    cfg, extras = parse_cli(cls, argv, extra=extra, **kwargs)
    try:
        set_output(extras.pop("results_dir", None), extras.pop("update_results", False))
    except ValueError as err:
        raise ConfigError(str(err)) from err
    return cfg, extras


def check_at_least(cfg: Any, **minimums: float) -> None:
    """``ValueError`` naming the first field of ``cfg`` below its minimum: a number (None = not given, allowed)
    or every item of a list, which must not be empty; ``True``/``False`` are not numbers here."""
    for key, low in minimums.items():
        value = getattr(cfg, key)
        if value is None:
            continue
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and not items:
            raise ValueError(f"{key} must not be empty")
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)):
                raise ValueError(f"{key} must be a number, got {item!r}")
            if item < low:
                shown = list(value) if isinstance(value, (list, tuple)) else value
                raise ValueError(f"{key} must be >= {low:g}, got {shown}")


def check_not_empty(cfg: Any, *keys: str) -> None:
    """``ValueError`` naming the first of ``keys`` whose list is empty."""
    for key in keys:
        if not getattr(cfg, key):
            raise ValueError(f"{key} must not be empty")


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
    """Print the table and notes, write ``<name>.csv`` / ``<name>.json`` to ``out_dir`` (default: the output
    folder, :func:`output_dir`); return the JSON path."""
    out = Path(out_dir) if out_dir is not None else output_dir()
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
    if out.resolve() != RESULTS_DIR.resolve():
        print(f"(the committed {RESULTS_DIR} is left as it is; --update-results writes there)")
    return json_path
