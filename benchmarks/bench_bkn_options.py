"""BKN's Kalman-chain options against the authors' defaults, measured in ghost-group training on digits (issue 14):
the guard scope (per layer vs per ghost group) and what a residual shortcut carries (prior vs posterior).

``python -m benchmarks bkn_options [--quick] [--seeds 0 1 2 3 4] [--epochs N] [--groups 2 4 8] [--workers 2]``

The guard switches a BKN layer to plain BatchNorm for a step when the prior's variance dwarfs the batch's
(``mean(var_P / (var_B + eps)) >= guard_ratio``). With ghost groups the mean can run over the whole layer (one
decision for every group, ``guard_scope="layer"``, the authors' code and the default) or over each group's
channels (``"group"``). This study trains the ``bkn_digits`` ResNet in real batches of 128 split into ghost
groups of 2/4/8 (the ``bkn_digits`` recipe: SGD, lr 0.1, 5 epochs, fixed 60/20/20 split, prior weight from
``prior_weight_for``) with both BKN transitions under each scope, beside ghost BatchNorm, and counts during
training how often each rule fires on the same statistics (:class:`benchmarks.bkn_study.GuardMonitor`).
Runs are paired: a seed gives the same initialisation and batch order under both scopes. Two thresholds
(``--guard-ratios``): the default 100, and 0.2, a threshold at which the guard does fire in this network (its
predicted prior variance stays below the batch's, ratios of about 0.1 at the median and below 1 at most).

The shortcut option (``convert(shortcut=...)``): a residual branch that is a BKN's own input carries that BKN's
prior (``"prior"``, the authors' sum of priors, the default) or its posterior (``"posterior"``, the batch
observation mixed in); ``--shortcuts`` adds a cell per non-default value at the default guard settings.

Writes ``bkn_options.{csv,json,png}`` to the output folder (``runs/benchmarks/``; ``--results-dir DIR``;
``--update-results``: the committed ``benchmarks/results/``). Finished runs are kept under ``--runs-dir`` and
reused, so an interrupted study resumes. Every row that is not the default compares, seed by seed, with the cell
that differs from it only by the default option (layer scope at its guard ratio; prior shortcut).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.bkn_study import (
    Cell,
    _plt,
    mean_std,
    run_study,
    save_figure,
    study_runs_dir,
    timing_note,
    train_digits_cell,
)
from benchmarks.harness import check_at_least, check_not_empty, output_dir, parse_bench, report
from normlayers.convert import SHORTCUTS
from normlayers.reference import GUARD_SCOPES
from normlayers.select import NORMS, norm_spec

NAME = "bkn_options"
LARGE = 128
COLORS = {"BatchNorm": "C0", "default": "C1", "guard per group": "C2", "posterior shortcut": "C3"}  # every panel


def option_cells(
    groups: Sequence[int],
    norms: Sequence[str],
    large: int,
    ratios: Sequence[float],
    shortcuts: Sequence[str] = (),
    shortcut_depth: int = 2,
) -> list[Cell]:
    """Ghost BatchNorm once per group size; every BKN norm once per (group size, guard ratio, guard scope); with
    ``shortcuts``, every BKN norm at ``shortcut_depth`` blocks per stage with the default and each other shortcut
    (with one block per stage every identity shortcut starts at the chain start, where both carry the same)."""
    cells = []
    for g in groups:
        if large % g:
            raise ValueError(f"group {g} does not divide the batch {large}")
        for n in norms:
            if norm_spec(n).kind != "bkn":
                cells.append(Cell(n, large, g))
                continue
            cells += [Cell(n, large, g, scope, float(ratio)) for ratio in ratios for scope in GUARD_SCOPES]
            others = [sc for sc in shortcuts if sc != "prior"]
            if others:
                cells += [Cell(n, large, g, shortcut=sc, depth=shortcut_depth) for sc in ("prior", *others)]
    return list(dict.fromkeys(cells))


def option_label(result: dict[str, Any]) -> str:
    """The cell's non-default option, as the table and the plot name it ("" for the defaults)."""
    parts = []
    if result.get("guard_scope", "layer") != "layer":
        parts.append(f"guard per {result['guard_scope']}")
    if result.get("shortcut", "prior") != "prior":
        parts.append(f"{result['shortcut']} shortcut")
    return ", ".join(parts) or "default"


def _train(cell: Cell, seed: int, kw: dict[str, Any]) -> dict[str, Any]:
    return train_digits_cell(cell, seed, guard_stats=True, **kw)


def mean_rate(guard: list[dict[str, float]], key: str) -> float | None:
    """Mean of a guard rate over seeds; None when a run has no guard counts (BatchNorm, or not monitored)."""
    return float(np.mean([g[key] for g in guard])) if guard and all(key in g for g in guard) else None


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (norm, group, guard ratio, option): accuracies over seeds, guard rates, and for every
    non-default option the paired per-seed difference to the default option at the same guard ratio (same seed =
    same initialisation and batch order)."""
    by_cell: dict[tuple, dict[int, dict[str, Any]]] = {}
    for r in results:
        key = (r["norm"], r["group_size"], r.get("guard_ratio", 100.0), r.get("depth", 1), option_label(r))
        by_cell.setdefault(key, {})[r["seed"]] = r
    rows = []
    for (norm, group, ratio, depth, option), runs in by_cell.items():
        bkn = norm_spec(norm).kind == "bkn"
        seeds = sorted(runs)
        acc = [100 * runs[s]["final_test_acc"] for s in seeds]
        sel = [100 * runs[s]["best_val_test_acc"] for s in seeds]
        first = [100 * runs[s]["history"][0]["epoch_test_acc"] for s in seeds]
        guard = [runs[s].get("guard") or {} for s in seeds]
        row: dict[str, Any] = {
            "norm": norm,
            "group": group,
            "guard_ratio": ratio if bkn else "",
            "depth": depth,
            "option": option if bkn else "",
            "p": runs[seeds[0]]["prior_weight"],
            "seeds": len(seeds),
            "test_acc": mean_std(acc)[0],
            "test_acc_std": mean_std(acc)[1],
            "sel_test_acc": mean_std(sel)[0],
            "epoch1_acc": mean_std(first)[0],
            "layer_fire_pct": mean_rate(guard, "layer_fire_pct"),
            "group_fire_pct": mean_rate(guard, "group_fire_pct"),
            "disagree_pct": mean_rate(guard, "disagree_pct"),
            "d_acc_vs_default": None,
            "d_acc_vs_default_std": None,
            "better_worse_seeds": "",
        }
        base = by_cell.get((norm, group, ratio, depth, "default"))
        if option != "default" and base:
            paired = [s for s in seeds if s in base]
            diffs = [100 * (runs[s]["final_test_acc"] - base[s]["final_test_acc"]) for s in paired]
            row["d_acc_vs_default"], row["d_acc_vs_default_std"] = mean_std(diffs)
            row["better_worse_seeds"] = f"{sum(d > 0 for d in diffs)}/{sum(d < 0 for d in diffs)}/{len(diffs)}"
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], results: list[dict[str, Any]], path: Path) -> Path:
    """Test accuracy per ghost-group size: one panel per BKN norm and guard ratio, its options side by side and
    ghost BatchNorm beside them, with a dot per seed."""
    plt = _plt()
    panels = list(dict.fromkeys((r["norm"], r["guard_ratio"], r["depth"]) for r in rows if r["option"]))
    groups = sorted({r["group"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.9), sharey=True, squeeze=False)
    for ax, (norm, ratio, depth) in zip(axes[0], panels):
        panel_key = (norm, ratio)
        cells = [
            r for r in rows if r["depth"] == depth and (not r["option"] or (r["norm"], r["guard_ratio"]) == panel_key)
        ]
        labels = list(dict.fromkeys(r["option"] or "BatchNorm" for r in cells))
        width = 0.8 / len(labels)
        for j, label in enumerate(labels):
            for i, g in enumerate(groups):
                row = next((r for r in cells if r["group"] == g and (r["option"] or "BatchNorm") == label), None)
                if row is None:
                    continue
                x = i + (j - (len(labels) - 1) / 2) * width
                color = COLORS.get(label, f"C{4 + j}")
                ax.bar(x, row["test_acc"], width, color=color, alpha=0.6, label=label if i == 0 else None)
                dots = [
                    100 * r["final_test_acc"]
                    for r in results
                    if r["group_size"] == g
                    and (
                        (label == "BatchNorm" and NORMS[r["norm"]].kind != "bkn" and r.get("depth", 1) == depth)
                        or (r["norm"], r.get("guard_ratio", 100.0), r.get("depth", 1), option_label(r))
                        == (norm, ratio, depth, label)
                    )
                ]
                ax.plot([x] * len(dots), dots, "k.", ms=3)
        ax.set_xticks(range(len(groups)), [f"groups of {g}" for g in groups], fontsize=7)
        ax.set_title(f"{NORMS[norm].label}, guard ratio {ratio:g}" + (f", {depth} blocks/stage" if depth > 1 else ""),
                     fontsize=8)
        ax.set_ylim(85, 100)
        ax.legend(fontsize=7, title="option", title_fontsize=7)
    axes[0][0].set_ylabel("final test accuracy (%)", fontsize=8)
    fig.suptitle(f"digits, ghost groups inside real batches of {LARGE}: BKN options vs the defaults", fontsize=9,
                 y=1.04)
    return save_figure(fig, path)


@dataclass(frozen=True)
class Options:
    """``python -m benchmarks bkn_options`` options (flags or ``--config FILE``)."""

    quick: bool = False  # CI smoke run: 1 seed, 1 epoch of 4 batches, groups of 2
    seeds: tuple[int, ...] | None = None  # default 0 1 2 3 4 (quick: 0)
    epochs: int | None = None  # default 5 (quick: 1)
    groups: tuple[int, ...] | None = None  # ghost-group sizes inside --large; default 2 4 8 (quick: 2)
    guard_ratios: tuple[float, ...] = (100.0, 0.2)  # the default threshold, and one at which the guard fires
    shortcuts: tuple[str, ...] = ("posterior",)  # non-default shortcuts to compare with "prior" ([] for none)
    shortcut_depth: int = 2  # blocks per stage of the shortcut comparison (>= 2: identity shortcuts inside the chain)
    large: int = LARGE  # the real batch
    norms: tuple[str, ...] = ("bn", "bkn_mc", "bkn_an")
    workers: int = 1  # parallel training processes
    threads: int = 1  # torch threads per process
    runs_dir: str | None = None  # per-run checkpoints/results (default runs/bkn_options)
    no_resume: bool = False  # retrain runs that already finished

    def validate(self) -> None:
        check_at_least(self, seeds=0, epochs=1, groups=1, large=2, workers=1, threads=1, shortcut_depth=1)
        check_not_empty(self, "guard_ratios")
        unknown_shortcuts = [sc for sc in self.shortcuts if sc not in SHORTCUTS]
        if unknown_shortcuts:
            raise ValueError(f"shortcuts: unknown {unknown_shortcuts}; choose from {', '.join(SHORTCUTS)}")
        if any(not r > 0 for r in self.guard_ratios):
            raise ValueError(f"guard_ratios must be > 0 (inf disables the guard), got {list(self.guard_ratios)}")
        check_not_empty(self, "norms")
        unknown = [n for n in self.norms if n not in NORMS]
        if unknown:
            raise ValueError(f"norms: unknown norm(s) {unknown}; choose from {', '.join(NORMS)}")
        if "gn" in self.norms:
            raise ValueError("norms: GroupNorm does not depend on the batch, so it has no ghost groups")
        if not any(NORMS[n].kind == "bkn" for n in self.norms):
            raise ValueError("norms: name at least one BKN norm (bkn_mc, bkn_an): only BKN has a guard")
        for g in self.groups or ():
            if self.large % g:
                raise ValueError(f"groups: {g} does not divide the batch --large {self.large}")


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_bench(Options, argv, prog=f"python -m benchmarks {NAME}", description=__doc__.split("\n")[0])
    seeds = list(args.seeds) if args.seeds is not None else ([0] if args.quick else [0, 1, 2, 3, 4])
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 5)
    groups = list(args.groups) if args.groups is not None else ([2] if args.quick else [2, 4, 8])
    cells = option_cells(groups, args.norms, args.large, args.guard_ratios, args.shortcuts, args.shortcut_depth)
    runs_dir = study_runs_dir(NAME, args.runs_dir, args.quick)
    kw: dict[str, Any] = dict(epochs=epochs, root=runs_dir, resume=not args.no_resume)
    if args.quick:
        kw["limit_train_batches"] = 4
    results, wall, load0 = run_study(NAME, _train, cells, seeds, kw, args.workers, args.threads)
    rows = table_rows(results)
    out = output_dir()
    figure = plot(rows, results, out / f"{NAME}.png")
    notes = [
        f"{len(results)} runs ({len(cells)} cells x {len(seeds)} seeds), {epochs} epochs each, real batches of "
        f"{args.large}; " + timing_note(results, wall, args.workers, args.threads, load0),
        "test_acc: test accuracy after the last epoch (%), mean/std over seeds; sel_test_acc: at the lowest "
        "val_loss epoch; epoch1_acc: after epoch 1",
        "guard rates, counted during training on the same statistics whatever rule the run uses: layer_fire_pct = "
        "% of BKN layer calls where the layer rule (mean over groups and channels) fires; group_fire_pct = % of "
        "group decisions where the group rule fires; disagree_pct = % of layer calls where the rules differ for "
        "at least one group; percentiles of each rule's ratio are in the JSON's runs",
        "option: the non-default setting of the row (guard per group; posterior shortcut), else default (guard per "
        "layer, prior shortcut); d_acc_vs_default: per-seed paired difference to the default row at the same guard "
        "ratio (same seed = same init and batch order), mean/std; better_worse_seeds: seeds where the option is "
        "better/worse/total",
        f"plot: {figure.name}",
    ]
    columns = [
        "norm", "group", "guard_ratio", "depth", "option", "p", "seeds", "test_acc", "test_acc_std", "sel_test_acc",
        "epoch1_acc", "layer_fire_pct", "group_fire_pct", "disagree_pct", "d_acc_vs_default", "d_acc_vs_default_std",
        "better_worse_seeds",
    ]
    runs = [
        {k: r.get(k) for k in ("cell", "seed", "final_test_acc", "best_val_test_acc", "guard", "epoch_s")}
        for r in results
    ]
    report(NAME, rows, columns=columns, notes=notes, out_dir=out, extra={"epochs": epochs, "seeds": seeds,
                                                                          "wall_s": wall, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
