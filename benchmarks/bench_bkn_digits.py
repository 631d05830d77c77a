"""BKN vs BatchNorm vs GroupNorm at micro-batches on scikit-learn's digits (issue 8, study 1).

``python -m benchmarks bkn_digits [--quick] [--seeds 0 1 2] [--epochs N] [--workers 2]``

A pre-activation ResNet (one block per stage, widths 16/32/64) trained with the reference's CIFAR recipe (SGD
momentum 0.9, weight decay 2e-4, lr x0.1 at 50% and 75% of the epochs; lr = 0.1 * batch / 128 for EVERY norm) at
real batches of 2, 4, 8 and 128 (the "large" batch: 1077 training images, 8 steps per epoch), and with ghost
groups of 2/4/8 inside real batches of 128. BKN's prior weight follows ``normlayers.prior_weight_for`` (fixed
before any run). Each run is one ``stflow.runner.fit``; finished runs are kept under ``--runs-dir`` and reused,
so an interrupted study resumes where it stopped. Writes ``bkn_digits.csv/.json`` and three PNGs to the output
folder (``runs/benchmarks/``; ``--results-dir DIR``, formerly ``--out``; ``--update-results``: the committed
``benchmarks/results/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.bkn_study import (
    Cell,
    aggregate,
    plot_by_batch,
    plot_curves,
    run_study,
    study_runs_dir,
    timing_note,
    train_digits_cell,
)
from benchmarks.harness import check_at_least, check_not_empty, output_dir, parse_bench, report
from normlayers.select import NORMS, norm_spec

NAME = "bkn_digits"
MICRO = (2, 4, 8)
LARGE = 128
GHOST_NORMS = ("bn", "bkn_mc", "bkn_an")  # GroupNorm ignores the batch: no ghost variant


def study_cells(
    batch_sizes: Sequence[int], ghost_groups: Sequence[int], norms: Sequence[str], large: int
) -> list[Cell]:
    """Real-batch cells (every norm x batch size), then ghost cells (batch-dependent norms x group, in ``large``)."""
    for n in norms:
        norm_spec(n)
    cells = [Cell(n, b) for b in batch_sizes for n in norms]
    for g in ghost_groups:
        if large % g:
            raise ValueError(f"ghost group {g} does not divide the large batch {large}")
        cells += [Cell(n, large, g) for n in norms if n in GHOST_NORMS]
    return cells


def run_all(
    cells: list[Cell], seeds: Sequence[int], kw: dict[str, Any], workers: int, threads: int
) -> tuple[list[dict[str, Any]], float, tuple[float, float, float]]:
    """Every (cell, seed) run, longest (smallest batch) first, in ``workers`` processes (:func:`run_study`)."""
    return run_study(NAME, _train, sorted(cells, key=lambda c: c.batch_size), seeds, kw, workers, threads)


def _train(cell: Cell, seed: int, kw: dict[str, Any]) -> dict[str, Any]:
    return train_digits_cell(cell, seed, **kw)


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per cell: accuracy (%) mean/std over seeds, time per epoch, deltas/ratios vs BatchNorm of the cell."""
    metrics = ["final_test_acc", "best_val_test_acc", "epoch1_test_acc", "epoch_s"]
    results = [{**r, "epoch1_test_acc": r["history"][0]["epoch_test_acc"]} for r in results]  # speed of convergence
    rows = aggregate(results, metrics, ["norm", "mode", "batch_size", "group_size", "stat_batch", "prior_weight", "lr"])
    bn = {(r["mode"], r["stat_batch"]): r for r in rows if r["norm"] == "bn"}
    out = []
    for r in rows:
        base = bn.get((r["mode"], r["stat_batch"]))
        out.append(
            {
                "norm": r["norm"],
                "mode": r["mode"],
                "batch": r["batch_size"],
                "group": r["group_size"] or "",
                "p": "" if r["prior_weight"] is None else round(r["prior_weight"], 3),
                "lr": r["lr"],
                "seeds": r["n_seeds"],
                "test_acc": 100 * r["final_test_acc_mean"],
                "test_acc_std": 100 * r["final_test_acc_std"],
                "sel_test_acc": 100 * r["best_val_test_acc_mean"],
                "sel_test_acc_std": 100 * r["best_val_test_acc_std"],
                "epoch1_acc": 100 * r["epoch1_test_acc_mean"],
                "epoch1_acc_std": 100 * r["epoch1_test_acc_std"],
                "d_acc_vs_bn": 100 * (r["final_test_acc_mean"] - base["final_test_acc_mean"]) if base else None,
                "epoch_s": r["epoch_s_mean"],
                "epoch_s_std": r["epoch_s_std"],
                "time_vs_bn": r["epoch_s_mean"] / base["epoch_s_mean"] if base else None,
            }
        )
    return out


def make_plots(results: list[dict[str, Any]], out: Path, large: int) -> list[Path]:
    """Accuracy-vs-epoch panels (real batches; ghost groups) and final accuracy vs samples per statistic."""
    label = lambda r: NORMS[r["norm"]].label + (" (ghost)" if r["mode"] == "ghost" else "")  # noqa: E731
    paths = []
    ordered = sorted(results, key=lambda r: (r["stat_batch"], list(NORMS).index(r["norm"])))
    real: dict[str, dict[str, list[list[float]]]] = {}
    ghost: dict[str, dict[str, list[list[float]]]] = {}
    for r in ordered:
        curve = [h["epoch_test_acc"] for h in r["history"]]
        if r["mode"] == "real":
            real.setdefault(f"batch {r['batch_size']}", {}).setdefault(label(r), []).append(curve)
        else:
            ghost.setdefault(f"groups of {r['group_size']} in {large}", {}).setdefault(label(r), []).append(curve)
    gn_large = [r for r in ordered if r["norm"] == "gn" and r["mode"] == "real" and r["batch_size"] == large]
    for panel in ghost.values():  # GroupNorm at the same real batch, for scale
        for r in gn_large:
            panel.setdefault(label(r) + f" b{large}", []).append([h["epoch_test_acc"] for h in r["history"]])
    if real:
        title = "digits: test accuracy per epoch, real batches (mean over seeds, min-max band)"
        paths.append(plot_curves(real, out / f"{NAME}_curves.png", "test accuracy", title, ylim=(0.5, 1.0)))
    if ghost:
        title = f"digits: test accuracy per epoch, ghost groups inside real batches of {large}"
        paths.append(plot_curves(ghost, out / f"{NAME}_ghost_curves.png", "test accuracy", title, ylim=(0.5, 1.0)))
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in aggregate(results, ["final_test_acc"], ["norm", "mode", "stat_batch"]):
        lab = NORMS[row["norm"]].label + (" (ghost)" if row["mode"] == "ghost" else "")
        series.setdefault(lab, []).append(
            (row["stat_batch"], 100 * row["final_test_acc_mean"], 100 * row["final_test_acc_std"])
        )
    paths.append(
        plot_by_batch(series, out / f"{NAME}_by_batch.png", "final test accuracy (%)", "digits: accuracy vs batch")
    )
    return paths


@dataclass(frozen=True)
class Options:
    """``python -m benchmarks bkn_digits`` options (flags or ``--config FILE``; ``--out`` is ``--results-dir``)."""

    quick: bool = False  # CI smoke run: 1 seed, 1 epoch of 4 batches
    seeds: tuple[int, ...] | None = None  # default 0 1 2 (quick: 0)
    epochs: int | None = None  # default 5 (quick: 1); the same for every cell
    batch_sizes: tuple[int, ...] = (*MICRO, LARGE)  # real batch sizes
    ghost_groups: tuple[int, ...] = MICRO  # ghost group sizes inside --large ([] for none)
    large: int = LARGE  # the large batch (ghost groups live in it)
    norms: tuple[str, ...] = tuple(NORMS)
    workers: int = 1  # parallel training processes
    threads: int = 1  # torch threads per process
    runs_dir: str | None = None  # per-run checkpoints/results (default runs/bkn_digits)
    no_resume: bool = False  # retrain runs that already finished

    cli_aliases = {"--out": "--results_dir"}

    def validate(self) -> None:
        check_at_least(self, seeds=0, epochs=1, batch_sizes=2, large=2, workers=1, threads=1)
        if self.ghost_groups:
            check_at_least(self, ghost_groups=1)
        check_not_empty(self, "norms")
        unknown = [n for n in self.norms if n not in NORMS]
        if unknown:
            raise ValueError(f"norms: unknown norm(s) {unknown}; choose from {', '.join(NORMS)}")
        for g in self.ghost_groups:
            if self.large % g:
                raise ValueError(f"ghost_groups: {g} does not divide the large batch {self.large}")


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_bench(Options, argv, prog=f"python -m benchmarks {NAME}", description=__doc__.split("\n")[0])
    seeds = list(args.seeds) if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 5)
    cells = study_cells(args.batch_sizes, args.ghost_groups, args.norms, args.large)
    runs_dir = study_runs_dir(NAME, args.runs_dir, args.quick)
    kw: dict[str, Any] = dict(epochs=epochs, root=runs_dir, resume=not args.no_resume)
    if args.quick:
        kw["limit_train_batches"] = 4
    results, wall, load0 = run_all(cells, seeds, kw, args.workers, args.threads)
    rows = table_rows(results)
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    plots = make_plots(results, out, args.large)
    notes = [
        f"{len(results)} runs ({len(cells)} cells x {len(seeds)} seeds), {epochs} epochs each; "
        + timing_note(results, wall, args.workers, args.threads, load0),
        "test_acc: test accuracy after the last epoch (%), mean and std over seeds; sel_test_acc: at the epoch with "
        "the lowest val_loss; epoch1_acc: after the first epoch (speed); d_acc_vs_bn: test_acc minus BatchNorm's in "
        "the same mode and statistic size",
        f"lr = 0.1 * batch / 128 for every norm; BKN prior weight p = interpolation in log2(samples per statistic) "
        f"between 0.9 at 2 and 0.05 at 128; mode ghost = groups of `group` inside real batches of {args.large}",
        "epoch_s: median training seconds per epoch (without validation); time_vs_bn: ratio to BatchNorm's",
        "plots: " + ", ".join(p.name for p in plots),
    ]
    columns = [
        "norm",
        "mode",
        "batch",
        "group",
        "p",
        "lr",
        "seeds",
        "test_acc",
        "test_acc_std",
        "sel_test_acc",
        "sel_test_acc_std",
        "epoch1_acc",
        "epoch1_acc_std",
        "d_acc_vs_bn",
        "epoch_s",
        "epoch_s_std",
        "time_vs_bn",
    ]
    curves = [
        {k: r[k] for k in ("cell", "seed", "final_test_acc", "best_val_test_acc", "epoch_s", "history")}
        for r in results
    ]
    report(
        NAME,
        rows,
        columns=columns,
        notes=notes,
        out_dir=out,
        extra={"epochs": epochs, "seeds": list(seeds), "wall_s": wall, "runs": curves},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
