"""Block-parallel DNA search: serial vs ``--workers`` worker processes (blocks + rating), on the digits search.

``python -m benchmarks nas_parallel [--dna-config dna_digits|dna_cells_digits] [--workers 2] [--repeats 3]
[--threads 1] [--block-epochs 15] [--large-blocks 12]``.

The teacher is trained once (the shared, serial stage; timed) and copied into fresh run directories; then the
blocks stage (train + rate every unit, :func:`nas.parallel.run_blocks_parallel`; a unit is a block, or one cell
supernet of a block with depth/width cells) runs serially (``workers=1``: in this process, ``--threads`` torch
threads) and on ``--workers`` spawned processes with ``--threads`` threads each, ``--repeats`` times interleaved
(serial first in even repeats, parallel first in odd ones: both see the same machine drift); finally each run's
report (the rating table,
the exact search; no retrain). Every parallel table is compared exactly with its serial one (``identical``).
Speed-up = serial blocks-stage wall time / parallel, per repeat; the median over repeats is the figure.

Projection for N workers (Amdahl with the measured parts): ``T(1) = T_shared + T_report + sum(serial unit
times)``, ``T(N > 1) = T_shared + T_report + overhead + makespan_N(unit times inside the workers)``, where
``makespan_N`` schedules the per-unit times longest first on N workers (for N >= #units: the slowest unit), the
in-worker times include running beside each other, and ``overhead`` = measured parallel blocks-stage time minus
the makespan of those times (process spawn, imports, loading the teacher), so ``T(2)`` is the measurement; the
figure also shows the bound of the split alone (dashed: serial unit times, no overhead). Two spaces: the config's
(measured) and a larger one of ``--large-blocks`` units, each costing the measured mean unit time, same teacher
and overhead (an assumption). Writes ``nas_parallel.{csv,json}`` and ``nas_parallel.png`` (speed-up and projected
time) to the output folder (``runs/benchmarks/``; ``--results-dir DIR``, formerly ``--out-dir``;
``--update-results``: the committed ``benchmarks/results/``).
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from benchmarks.harness import check_at_least, output_path, parse_bench, report
from nas.methods.dna import DNA, DNAConfig
from nas.parallel import run_blocks_parallel
from nas.search.ratings import load_ratings
from stflow.config import load_config


@dataclass(frozen=True)
class Options:
    """``python -m benchmarks nas_parallel`` options."""

    dna_config: str = "dna_digits"  # packaged DNA config (dna_cells_digits: 3 blocks x 3 cells = 9 units) or YAML
    workers: int = 2  # parallel run's worker processes
    repeats: int = 1  # interleaved serial/parallel pairs (the median speed-up is reported)
    threads: int = 1  # torch threads per block (serial run and each worker: identical arithmetic)
    block_epochs: int | None = None  # None: the packaged dna_digits config's 15
    teacher_epochs: int | None = None
    large_blocks: int = 12  # blocks of the larger space in the projection
    max_workers: int = 16  # projection up to this many workers
    keep_runs: str | None = None  # keep the run directories here (default: a temporary directory)

    cli_aliases = {"--out-dir": "--results_dir"}  # its former name: the results go to the output folder

    def validate(self) -> None:
        check_at_least(self, block_epochs=1, teacher_epochs=1, repeats=1)
        if self.workers < 2 or self.threads < 1 or self.large_blocks < 1 or self.max_workers < 1:
            raise ValueError("workers >= 2, threads >= 1, large_blocks >= 1, max_workers >= 1")


def makespan(times: list[float], workers: int) -> float:
    """Longest-processing-time-first schedule of ``times`` on ``workers``: the finishing time of the last."""
    loads = [0.0] * max(1, workers)
    for t in sorted(times, reverse=True):
        heapq.heapreplace(loads, loads[0] + t)
    return max(loads)


def _run(cfg: DNAConfig, out: Path, teacher: Path, workers: int, threads: int) -> dict:
    shutil.copytree(teacher, out / "teacher")
    method = DNA(replace(cfg, out_dir=str(out), workers=workers, worker_threads=threads))
    t0 = time.perf_counter()
    run_blocks_parallel(method, workers, threads)
    total = time.perf_counter() - t0
    timing = json.loads((out / "parallel.json").read_text())
    # report: the search() after the blocks (gathering the ratings, the table, the exact search; no retrain)
    report_s = timing["total_seconds"] - timing["blocks_seconds"] - timing["shared_seconds"]
    units = timing["unit_seconds"]  # in dispatch order (largest first)
    cpu = timing["unit_cpu_seconds"]
    return {"blocks_s": timing["blocks_seconds"], "report_s": report_s, "total_s": total,
            "unit_times": list(units.values()), "units": list(units), "unit_cpu": [cpu[u] for u in units]}


def projection(t_shared: float, t_report: float, overhead: float, serial_times: list[float],
               worker_times: list[float], n: int) -> float:
    """Projected search time on ``n`` workers: the serial unit times for one, else the overhead plus the
    schedule of the unit times measured inside the workers (they include running beside each other)."""
    units = makespan(serial_times, 1) if n == 1 else overhead + makespan(worker_times, n)
    return t_shared + t_report + units


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_bench(Options, argv, prog="python -m benchmarks nas_parallel", description=__doc__.splitlines()[0])
    cfg = load_config(DNAConfig, args.dna_config, packages=("nas",))
    changes = {"retrain": False, "progress": False}
    if args.block_epochs is not None:
        changes["block_epochs"] = args.block_epochs
    if args.teacher_epochs is not None:
        changes["teacher_epochs"] = args.teacher_epochs
    cfg = replace(cfg, **changes)
    load_start = os.getloadavg()
    saved_threads = torch.get_num_threads()
    root = Path(args.keep_runs) if args.keep_runs else Path(tempfile.mkdtemp(prefix="nas-parallel-"))
    pairs = []
    try:
        torch.set_num_threads(args.threads)
        t0 = time.perf_counter()
        shared = DNA(replace(cfg, out_dir=str(root / "shared")))
        shared.prepare_blocks()  # the teacher: the serial stage
        t_shared = time.perf_counter() - t0
        for r in range(args.repeats):  # interleaved, the order alternating (the VM's speed drifts over minutes)
            order = ("serial", "parallel") if r % 2 == 0 else ("parallel", "serial")
            done = {}
            for kind in order:
                workers = 1 if kind == "serial" else args.workers
                done[kind] = _run(cfg, root / f"{kind}{r}", root / "shared" / "teacher", workers, args.threads)
                torch.set_num_threads(args.threads)  # (the in-process serial run sets it too)
            serial, parallel = done["serial"], done["parallel"]
            parallel["identical"] = (load_ratings(root / f"serial{r}" / "ratings.json").block_ratings
                                     == load_ratings(root / f"parallel{r}" / "ratings.json").block_ratings)
            pairs.append((serial, parallel))
    finally:
        torch.set_num_threads(saved_threads)
        if not args.keep_runs:
            shutil.rmtree(root, ignore_errors=True)
    load_end = os.getloadavg()
    speedups = [s["blocks_s"] / p["blocks_s"] for s, p in pairs]
    median = sorted(range(len(pairs)), key=lambda i: speedups[i])[len(pairs) // 2]  # the median repeat
    serial, parallel = pairs[median]
    units = serial["unit_times"]
    overhead = max(0.0, parallel["blocks_s"] - makespan(parallel["unit_times"], args.workers))
    t_report = serial["report_s"]
    rows = []
    for r, ((s_run, p_run), speedup) in enumerate(zip(pairs, speedups)):
        for kind, run, workers, sp in (("serial", s_run, 1, 1.0), ("parallel", p_run, args.workers, speedup)):
            rows.append({"run": kind, "repeat": r, "workers": workers, "blocks_stage_s": run["blocks_s"],
                         "speedup": sp, "unit_s": " ".join(f"{t:.1f}" for t in run["unit_times"]),
                         "unit_cpu_s": " ".join(f"{t:.1f}" for t in run["unit_cpu"]),
                         "identical_table": run.get("identical", True)})
    rows.append({"run": "median", "repeat": "-", "workers": args.workers, "blocks_stage_s": parallel["blocks_s"],
                 "speedup": speedups[median], "unit_s": "", "unit_cpu_s": "",
                 "identical_table": all(p["identical"] for _, p in pairs)})
    in_workers = parallel["unit_times"]
    mean_unit, mean_in_worker = sum(units) / len(units), sum(in_workers) / len(in_workers)
    name = f"{cfg.space.name} ({len(units)} units, measured)"
    spaces = {name: (units, in_workers),
              f"larger ({args.large_blocks} units of the mean unit)": ([mean_unit] * args.large_blocks,
                                                                       [mean_in_worker] * args.large_blocks)}
    proj = []
    for space, (times, worker_times) in spaces.items():
        t1 = projection(t_shared, t_report, overhead, times, worker_times, 1)
        for n in range(1, args.max_workers + 1):
            tn = projection(t_shared, t_report, overhead, times, worker_times, n)
            blocks_n = makespan(times, 1) if n == 1 else overhead + makespan(worker_times, n)
            proj.append({"space": space, "workers": n, "projected_s": tn, "projected_speedup": t1 / tn,
                         "blocks_speedup": makespan(times, 1) / blocks_n,
                         "blocks_speedup_no_overhead": makespan(times, 1) / makespan(times, n)})
    load = f"start {' '.join(f'{v:.1f}' for v in load_start)}, end {' '.join(f'{v:.1f}' for v in load_end)}"
    figure = _plot(proj, rows, output_path("nas_parallel.png"), args)
    report(
        "nas_parallel",
        rows,
        columns=["run", "repeat", "workers", "blocks_stage_s", "speedup", "unit_s", "unit_cpu_s", "identical_table"],
        notes=[f"DNA on {cfg.space.name} ({args.dna_config}, block_epochs {cfg.block_epochs}), blocks + rating only, "
               f"{len(units)} units ({', '.join(serial['units'])}, largest first); teacher (shared, serial) "
               f"{t_shared:.1f} s, report {t_report:.1f} s; {args.threads} torch thread(s) per unit; "
               f"{os.cpu_count()} cpus; load average {load}; {args.repeats} interleaved repeat(s), the median "
               f"repeat ({median}) feeds the projection",
               f"parallel overhead (spawn, imports, teacher load) {overhead:.1f} s; goal speed-up >= 1.7 on 2 workers",
               "unit_s / unit_cpu_s: wall / process CPU seconds of each unit (dispatch order; CPU below wall: the "
               "unit waited for a core); repeats alternate the order (even: serial first, odd: parallel first)",
               "projection (T(1) = shared + report + the serial unit times; T(N > 1) = shared + report + overhead + "
               "LPT makespan of the unit times measured inside the workers): "
               + "; ".join(f"{r['space']} N={r['workers']}: {r['projected_s']:.0f} s (x{r['projected_speedup']:.2f})"
                           for r in proj if r["workers"] in (1, 2, 4, 8, args.max_workers)),
               f"figure: {figure}"],
        extra={"projection": proj, "shared_s": t_shared, "report_s": t_report, "overhead_s": overhead,
               "load_average": load, "block_epochs": cfg.block_epochs, "threads": args.threads,
               "dna_config": args.dna_config, "speedups": speedups},
    )
    return 0


def _plot(proj: list[dict], rows: list[dict], path: Path, args: Options) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(matplotlib missing: no figure)"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for space in dict.fromkeys(r["space"] for r in proj):
        pts = [r for r in proj if r["space"] == space]
        ax1.plot([r["workers"] for r in pts], [r["projected_s"] for r in pts], marker="o", ms=3, label=space)
        line = ax2.plot([r["workers"] for r in pts], [r["blocks_speedup"] for r in pts], marker="o", ms=3,
                        label=space)[0]
        ax2.plot([r["workers"] for r in pts], [r["blocks_speedup_no_overhead"] for r in pts], ls="--",
                 color=line.get_color(), label=f"{space.split(' (')[0]}: the split alone (serial unit times)")
    measured = [r["speedup"] for r in rows if r["run"] == "parallel"]
    ax2.plot([args.workers] * len(measured), measured, "k.", ms=6, label="measured, each repeat")
    ax2.plot([1, args.workers], [1.0, rows[-1]["speedup"]], "k*", ms=12, label="measured, median")
    ax2.axhline(1.7, color="grey", ls=":", label="goal 1.7 on 2 workers")
    ax1.set(xlabel="workers N", ylabel="projected search time (s)", title="Projected time (Amdahl)")
    ax2.set(xlabel="workers N", ylabel="blocks-stage speed-up", title="Speed-up of the blocks stage")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"saved {path}")
    return str(path)


if __name__ == "__main__":
    raise SystemExit(main())
