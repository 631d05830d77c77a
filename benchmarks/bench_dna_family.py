"""The DNA family on digits: DNA, DNA with depth/width cells, DNA+ (per generation) and DNA++ against the
cross-validated ground truth, beside the seed-vs-seed ceiling.

``python -m benchmarks dna_family [--variants plain cells plus selfsup] [--seeds 0 1 2] [--generations 2]``

- plain, plus, selfsup: the digits space (``dna_digits``) and its ground truth
  ``nas_digits_ground_truth.json``; cells: the ``digits-cells`` space (1-layer, narrow and wide 2-layer cells)
  and ``nas_digits_cells_ground_truth.json`` (built when missing); both read from the output folder, which starts
  from copies of the committed ones in ``benchmarks/results/``;
- DNA+ generation 1 IS plain DNA (same config and seed), so with ``plus`` the plain rows are generation 1's;
- per DNA+ generation: Kendall of its rating table, and its searched net's 5-fold cross-validated accuracy
  (training seed = search seed, correct answers pooled over all 1,797 images, ``--cv-epochs`` epochs, the
  ground truth's protocol); cached in ``--out-dir``/cv_accuracy.json;
- "seconds": training + rating of every block (recorded when it ran; teacher and retraining not counted).

Writes ``dna_family.{csv,json,png}`` and ``dna_family_generations.{csv,json}`` to the output folder
(``runs/benchmarks/``; ``--results-dir DIR``; ``--update-results``: the committed ``benchmarks/results/``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import (
    cache_path,
    check_at_least,
    check_not_empty,
    input_path,
    output_path,
    parse_bench,
    report,
)
from benchmarks.nas_digits import GroundTruthOptions, describe_ground_truth, ground_truth, gt_path
from nas.data import DigitsDataModule
from nas.methods.dna import VARIANT_CONFIGS, VARIANTS, DNAConfig, digits_config, run_dna
from nas.search.groundtruth import build_ground_truth, seed_ceiling, train_standalone
from nas.search.ranking import correlations, evaluate
from nas.search.ratings import load_ratings
from nas.spaces import SearchSpace, space_preset
from stflow.config import load_config, run_cli
from stflow.pool import run_tasks

CELLS_GT_NAME = "nas_digits_cells_ground_truth.json"


@dataclass
class DNAFamilyBench(GroundTruthOptions):
    """The benchmark's options (fields = flags; ``--out`` is ``--out-dir``)."""

    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # search seeds
    generations: int = 2  # DNA+ generations
    cv_folds: int = 5
    cv_epochs: int = 10
    cells_gt_epochs: int = 5  # epochs per stand-alone run of the digits-cells ground truth (30 x 3 seeds x 5 folds)
    cells_gt_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # its training seeds
    out_dir: str = "runs/bench-dna-family"
    only_finished: bool = False  # train nothing: evaluate the runs (and ground-truth seeds) --out-dir already holds

    cli_aliases = {"--out": "--out_dir"}

    def validate(self) -> None:
        super().validate()
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown variant(s) {sorted(unknown)}; choose from {VARIANTS}")
        check_not_empty(self, "variants")
        check_at_least(self, seeds=0, generations=1, cv_folds=2, cv_epochs=1, cells_gt_epochs=1, cells_gt_seeds=0)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _block_seconds(run_dir: Path, blocks: int, key: str = "seconds") -> float | None:
    """Sum over the blocks of ``key`` (wall ``seconds`` or ``cpu_seconds``) recorded when they ran."""
    values = [json.loads((run_dir / f"block_{k}" / "ratings.json").read_text()).get(key) for k in range(blocks)]
    return None if None in values else float(sum(values))


def _fold_run(space: SearchSpace, encoding: list[list[int]], seed: int, epochs: int, fold: int, folds: int):
    dm = DigitsDataModule(fold=fold, num_folds=folds)
    dm.setup()
    assert dm.splits is not None
    return train_standalone(space, encoding, seed, epochs, datamodule=dm), len(dm.splits["test"][1])


def cv_accuracies(
    space: SearchSpace, nets: list[tuple[list[list[int]], int]], opts: DNAFamilyBench
) -> list[float | None]:
    """Pooled ``cv_folds``-fold accuracy of each (encoding, training seed), cached in the out dir
    (``--only-finished``: cached values only, None for the others)."""
    cv_path = Path(opts.out_dir) / "cv_accuracy.json"
    cache = json.loads(cv_path.read_text()) if cv_path.is_file() else {}

    def key(enc: list[list[int]], seed: int) -> str:
        return f"{space.name}|{enc}|{seed}|{opts.cv_epochs}|{opts.cv_folds}"

    todo = list(dict.fromkeys((json.dumps(e), s) for e, s in nets if key(e, s) not in cache))
    if opts.only_finished:
        todo = []
    tasks = [(space, json.loads(e), s, opts.cv_epochs, f, opts.cv_folds) for e, s in todo for f in range(opts.cv_folds)]
    if tasks:
        out = run_tasks(_fold_run, tasks, opts.gt_workers, 1 if opts.gt_workers > 1 else None, "cv accuracy", False)
        for i, (e, s) in enumerate(todo):
            runs = out[i * opts.cv_folds : (i + 1) * opts.cv_folds]
            cache[key(json.loads(e), s)] = sum(a * n for a, n in runs) / sum(n for _, n in runs)
        cv_path.parent.mkdir(parents=True, exist_ok=True)
        cv_path.write_text(json.dumps(cache, indent=1))
    return [cache.get(key(e, s)) for e, s in nets]


def _collect_finished(out: Path, seed: int, args: DNAFamilyBench, runs: dict, plus_gens: dict) -> None:
    """``--only-finished``: the finished runs of ``seed`` in ``out`` (nothing is trained)."""
    if "plus" in args.variants:
        for g in range(1, args.generations + 1):
            gdir = out / f"plus-seed{seed}" / f"gen_{g}"
            if not (gdir / "ratings.json").is_file():
                break
            label = "DNA (plain)" if g == 1 else f"DNA+ generation {g}"
            runs.setdefault(label, {})[seed] = gdir
            arch_path = gdir / "architecture.json"
            if arch_path.is_file() and (gdir / "retrain" / "model.pt").is_file():
                arch = json.loads(arch_path.read_text())
                teacher = json.loads((gdir / "teacher" / "teacher.json").read_text())
                plus_gens.setdefault(seed, []).append({
                    "generation": g, "encoding": arch["encoding"], "params": arch["params"],
                    "test_acc": arch["retrain"].get("test_acc"), "teacher_test_acc": teacher.get("test_acc"),
                })
    labels = {"plain": "DNA (plain)", "selfsup": "DNA++ (self-supervised)", "cells": "DNA with cells"}
    for variant, label in labels.items():
        run_dir = out / f"{variant}-seed{seed}"
        if variant in args.variants and (run_dir / "ratings.json").is_file():
            runs.setdefault(label, {})[seed] = run_dir


def _mean(values: list) -> float | None:
    return None if not values or None in values else float(np.mean(values))


def _corr(res: dict, sign: float = 1.0) -> dict:
    return {k: sign * float(res[k]) for k in ("kendall", "spearman", "pearson")}


def _main(argv: list[str]) -> int:
    args, _ = parse_bench(
        DNAFamilyBench, argv, prog="python -m benchmarks dna_family", description=__doc__.split("\n")[0]
    )
    t_start = time.perf_counter()
    out = Path(args.out_dir)
    base = digits_config(progress=False)
    # DNA++ as users get it: the packaged config (the digits search with variant selfsup and its rating metric)
    selfsup_base = replace(load_config(DNAConfig, VARIANT_CONFIGS["selfsup"], packages=("nas",)), progress=False)
    cells_space = space_preset("digits-cells")
    runs: dict[str, dict[int, Path]] = {}  # label -> seed -> run dir holding ratings.json
    seconds: dict[str, dict[int, float | None]] = {}
    cpu: dict[str, dict[int, float | None]] = {}
    plus_gens: dict[int, list[dict[str, Any]]] = {}
    for seed in args.seeds:
        if args.only_finished:
            _collect_finished(out, seed, args, runs, plus_gens)
            continue
        if "plus" in args.variants:
            cfg = replace(base, variant="plus", generations=args.generations, seed=seed)
            plus_gens[seed] = run_dna(cfg, out / f"plus-seed{seed}")["generations"]
            for g in plus_gens[seed]:
                label = "DNA (plain)" if g["generation"] == 1 else f"DNA+ generation {g['generation']}"
                runs.setdefault(label, {})[seed] = Path(g["out_dir"])
        elif "plain" in args.variants:
            run_dna(replace(base, seed=seed), out / f"plain-seed{seed}", do_retrain=False)
            runs.setdefault("DNA (plain)", {})[seed] = out / f"plain-seed{seed}"
        if "selfsup" in args.variants:
            run_dir = out / f"selfsup-seed{seed}"
            run_dna(replace(selfsup_base, seed=seed), run_dir, do_retrain=False)
            runs.setdefault("DNA++ (self-supervised)", {})[seed] = run_dir
        if "cells" in args.variants:
            run_dir = out / f"cells-seed{seed}"
            run_dna(replace(base, space=cells_space, variant="cells", seed=seed), run_dir, do_retrain=False)
            runs.setdefault("DNA with cells", {})[seed] = run_dir
    for label, by_seed in runs.items():
        for seed, run_dir in by_seed.items():
            seconds.setdefault(label, {})[seed] = _block_seconds(run_dir, 3)
            cpu.setdefault(label, {})[seed] = _block_seconds(run_dir, 3, "cpu_seconds")

    gt = ground_truth(base.space, args)
    gts = {"digits-mbconv": gt}
    cells_seeds = list(args.cells_gt_seeds)
    cells_gt = input_path(CELLS_GT_NAME)
    if args.only_finished:  # the seeds the file holds
        cells_seeds = json.loads(cells_gt.read_text())["seeds"] if cells_gt.is_file() else []
    if "cells" in args.variants and cells_seeds:
        cells_gt = cache_path(CELLS_GT_NAME)
        gts["digits-cells"] = build_ground_truth(
            cells_space, cells_gt, args.archs, cells_seeds, args.cells_gt_epochs, folds=args.gt_folds,
            workers=args.gt_workers, progress=False,
        )
    runs = {label: by_seed for label, by_seed in runs.items() if "cells" not in label or "digits-cells" in gts}
    rows: list[dict[str, Any]] = []
    for name, data in gts.items():
        acc = [a["accuracy"] for a in data["architectures"]]
        if len(data["seeds"]) > 1:
            rows.append({"space": name, "rater": "seed-vs-seed ceiling", "seed": "-", "kendall": seed_ceiling(data)})
        rows.append({"space": name, "rater": "more params is better", "seed": "-",
                     **_corr(correlations([a["params"] for a in data["architectures"]], acc))})
    means: dict[str, float] = {}
    for label, by_seed in runs.items():
        name = "digits-cells" if "cells" in label else "digits-mbconv"
        data = gts[name]
        encodings = [a["encoding"] for a in data["architectures"]]
        acc = [a["accuracy"] for a in data["architectures"]]
        taus = []
        for seed, run_dir in sorted(by_seed.items()):
            res = evaluate(load_ratings(run_dir / "ratings.json"), encodings, acc)
            row = {"space": name, "rater": label, "seed": seed, **_corr(res, sign=-1.0),
                   "seconds": seconds[label][seed], "cpu_seconds": cpu[label][seed]}
            taus.append(row["kendall"])
            rows.append(row)
        means[label] = float(np.mean(taus))
        rows.append({"space": name, "rater": f"{label} mean", "seed": "all", "kendall": means[label]})

    gen_rows: list[dict[str, Any]] = []
    if plus_gens:
        nets = [(g["encoding"], seed) for seed, gens in plus_gens.items() for g in gens]
        cv = iter(cv_accuracies(base.space, nets, args))
        for seed, gens in plus_gens.items():
            for g in gens:
                gen_rows.append({"seed": seed, "generation": g["generation"], "encoding": json.dumps(g["encoding"]),
                                 "params": g["params"], "test_acc": g["test_acc"], "cv_acc": next(cv),
                                 "teacher_test_acc": g["teacher_test_acc"]})
        for gen in sorted({r["generation"] for r in gen_rows}):
            sel = [r for r in gen_rows if r["generation"] == gen]
            gen_rows.append({"seed": "mean", "generation": gen, "params": float(np.mean([r["params"] for r in sel])),
                             "test_acc": float(np.mean([r["test_acc"] for r in sel])),
                             "cv_acc": _mean([r["cv_acc"] for r in sel])})
    plot = _plot(rows, gen_rows, output_path("dna_family.png"))
    total = time.perf_counter() - t_start
    notes = [describe_ground_truth(d) for d in gts.values()] + [
        "Kendall etc. use -score (ratings are losses); 'DNA (plain)' = DNA+ generation 1 (same config and seed)",
        "seconds / cpu_seconds = wall / CPU time of training + rating every block, recorded when it ran (teacher, "
        "retraining not counted; CPU time of a block resumed after an interruption counts the resumed part only)",
        f"total {total:.0f} s (finished runs in {out} are reused); plot: {plot}",
    ]
    columns = ["space", "rater", "seed", "kendall", "spearman", "pearson", "seconds", "cpu_seconds"]
    truth = {"digits-mbconv": str(gt_path()), "digits-cells": str(cells_gt)}
    report("dna_family", rows, columns=columns, notes=notes, extra={"generations": gen_rows, "ground_truth": truth})
    if gen_rows:
        report("dna_family_generations", gen_rows,
               columns=["seed", "generation", "encoding", "params", "test_acc", "cv_acc", "teacher_test_acc"],
               notes=[f"cv_acc: {args.cv_folds}-fold cross-validated accuracy of the searched net (training seed = "
                      f"search seed, {args.cv_epochs} epochs, pooled over all 1,797 images)"])
    return 0


def _plot(rows: list[dict[str, Any]], gen_rows: list[dict[str, Any]], path: Path) -> Path:
    from benchmarks.bkn_study import _plt, save_figure

    plt = _plt()
    fig, axes = plt.subplots(1, 2 if gen_rows else 1, figsize=(11 if gen_rows else 7, 3.4), squeeze=False)
    ax = axes[0][0]
    labels = list(dict.fromkeys(r["rater"] for r in rows if isinstance(r["seed"], int)))
    for i, label in enumerate(labels):
        taus = [r["kendall"] for r in rows if r["rater"] == label and isinstance(r["seed"], int)]
        ax.scatter([i] * len(taus), taus, s=18)
        ax.bar(i, float(np.mean(taus)), alpha=0.35)
    for r in rows:
        if r["rater"] == "seed-vs-seed ceiling":
            ax.axhline(r["kendall"], ls="--" if r["space"] == "digits-mbconv" else ":", color="gray",
                       label=f"ceiling ({r['space']})")
        if r["rater"] == "more params is better":
            ax.axhline(r["kendall"], ls="--" if r["space"] == "digits-mbconv" else ":", color="tab:olive",
                       label=f"more params is better ({r['space']})")
    ax.axhline(0.2, color="red", lw=0.8, label="goal 0.20")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([t.replace(" (", "\n(").replace(" generation", "\ngen") for t in labels], fontsize=7)
    ax.set_ylabel("Kendall tau vs ground truth", fontsize=8)
    ax.legend(fontsize=6, loc="upper left")
    if gen_rows:
        ax = axes[0][1]
        for seed in sorted({r["seed"] for r in gen_rows if r["seed"] != "mean"}):
            sel = [r for r in gen_rows if r["seed"] == seed]
            sel = [r for r in sel if r["cv_acc"] is not None]
            ax.plot([r["generation"] for r in sel], [100 * r["cv_acc"] for r in sel], "o-", label=f"seed {seed}")
        sel = [r for r in gen_rows if r["seed"] == "mean" and r["cv_acc"] is not None]
        ax.plot([r["generation"] for r in sel], [100 * r["cv_acc"] for r in sel], "k-s", lw=2, label="mean")
        ax.set_xlabel("DNA+ generation", fontsize=8)
        ax.set_xticks(sorted({r["generation"] for r in gen_rows}))
        ax.set_ylabel("searched net, 5-fold CV accuracy %", fontsize=8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path)
