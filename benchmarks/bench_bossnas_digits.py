"""BossNAS on digits: does the self-supervised block rating rank architectures like stand-alone training?

``python -m benchmarks bossnas_digits [--norm bn|bkn] [--seeds 0 1] [--epochs N] [--variant tuned plain]
[--search-config bossnas_digits|FILE]``

Same protocol and ground truth as ``benchmarks/bench_dna_digits.py``: the architectures of the
core's digits MBConv space in ``nas_digits_ground_truth.json`` (the committed one in ``benchmarks/results/``,
copied to the output folder; built with ``nas.search.groundtruth`` when absent), Kendall / Spearman / Pearson
between the BossNAS architecture score (negated: the rating is a loss) and mean stand-alone accuracy, printed
beside the seed-vs-seed ceiling, the "more parameters is better" baseline (same run) and DNA's tau (read
from ``dna_digits.json`` in the output folder, else the committed ``benchmarks/results/`` one, when present).

``--earlier-blocks train frozen``: the earlier blocks keep training along their searched path while
block k trains (``train``, the authors' and the default) or are frozen (``frozen``, the earlier default).

``--retrain``: the architecture each search (first variant and earlier-blocks mode) ends with is retrained
stand-alone and 5-fold cross-validated with the ground truth's seeds and epochs, beside random architectures
of equal parameter count (within 10 %): the ground truth's own architectures (uniformly sampled, trained by the
same protocol) when it holds ``--random-archs`` of them, else new ones drawn and trained the same way
(``bossnas_digits_retrain.json``).

Writes ``bossnas_digits.{csv,json,png}`` to the output folder (``runs/benchmarks/``; ``--results-dir DIR``;
``--update-results``: the committed ``benchmarks/results/``).

Variants: ``tuned`` = the packaged ``bossnas_digits`` config, ``nas/configs/bossnas_digits.yaml`` (fair 4-path
ensembles, strong views, batch 256, recalibration); ``plain`` = a straightforward setting (15 epochs per
block, 2 random paths, batch 64, weak views) for comparison.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from benchmarks.harness import check_at_least, input_path, output_path, parse_bench, report
from benchmarks.nas_digits import (
    GroundTruthOptions,
    agreement,
    describe_ground_truth,
    ground_truth,
    gt_path,
    plot_agreement,
)
from nas.data.views import ViewConfig
from nas.methods.bossnas import DEFAULT_CONFIG, BossNASConfig, run_search
from nas.methods.dna import DNAConfig
from nas.search.groundtruth import seed_ceiling
from nas.search.ranking import correlations, evaluate
from nas.search.ratings import load_ratings
from stflow.config import load_config, run_cli

PLAIN = dict(
    epochs_per_block=15,
    sampling="random",
    num_paths=2,
    batch_size=64,
    views=ViewConfig(pad=1, rotate_deg=0.0, scale=0.0, noise_std=0.05, cutout=0, cutout_prob=0.0),
)


def dna_tau() -> dict[str, Any] | None:
    """DNA's mean Kendall tau per norm from the DNA benchmark's saved JSON, if present."""
    path = input_path("dna_digits.json")
    if not path.is_file():
        return None
    rows = json.loads(path.read_text()).get("rows", [])
    means = {r["norm"]: r["kendall"] for r in rows if r.get("rater") == "DNA mean"}
    return means or None


@dataclass
class BossNASDigitsBench(GroundTruthOptions):
    """The benchmark's options (fields = flags; ``--out`` is ``--out-dir``)."""

    search_config: str = DEFAULT_CONFIG  # BossNAS config of the tuned variant (packaged name or YAML file)
    norm: str = "bn"  # bn | bkn
    seeds: list[int] = field(default_factory=lambda: [0])  # BossNAS search seeds
    epochs: int | None = None  # override epochs per block (tuned variant)
    variant: list[str] = field(default_factory=lambda: ["tuned"])  # tuned and/or plain
    earlier_blocks: list[str] = field(default_factory=lambda: ["train"])  # train (authors') and/or frozen
    retrain: bool = False  # retrain + cross-validate the searched nets beside equal-size random ones
    random_archs: int = 3  # random architectures of equal parameter count (--retrain)
    out_dir: str = "runs/bench-bossnas-digits"  # search run directories (resumable)
    fresh: bool = False  # delete previous runs in --out-dir first

    cli_aliases = {"--out": "--out_dir"}

    def validate(self) -> None:
        super().validate()
        check_at_least(self, seeds=0, epochs=1, random_archs=1)
        if self.norm not in ("bn", "bkn"):
            raise ValueError(f"norm must be bn or bkn, got {self.norm!r}")
        if not self.variant or set(self.variant) - {"tuned", "plain"}:
            raise ValueError(f"variant must be tuned and/or plain, got {self.variant}")
        if not self.earlier_blocks or set(self.earlier_blocks) - {"train", "frozen"}:
            raise ValueError(f"earlier_blocks must be train and/or frozen, got {self.earlier_blocks}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, _ = parse_bench(
        BossNASDigitsBench,
        argv,
        prog="python -m benchmarks bossnas_digits",
        description=__doc__.split("\n")[0],
        packages=("nas",),
    )
    t_start = time.perf_counter()
    space = DNAConfig().space
    gt = ground_truth(space, args)
    t_gt = time.perf_counter() - t_start
    encodings = [a["encoding"] for a in gt["architectures"]]
    acc = [a["accuracy"] for a in gt["architectures"]]
    by_params = correlations([a["params"] for a in gt["architectures"]], acc)
    rows: list[dict[str, Any]] = [
        {"rater": "seed-vs-seed ceiling", "variant": "-", "seed": "-", "kendall": seed_ceiling(gt)},
        {"rater": "more params is better", "variant": "-", "seed": "-", **_corr(by_params)},
    ]
    dna = dna_tau()
    if dna:
        rows += [
            {"rater": f"DNA mean ({norm}, from dna_digits.json)", "variant": "-", "seed": "all", "kendall": tau}
            for norm, tau in dna.items()
        ]

    out = Path(args.out_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    base = load_config(
        BossNASConfig, args.search_config, packages=("nas",), norm=args.norm, progress=False, space="mbconv"
    )
    raters: dict[str, list[float]] = {}
    searched: list[dict[str, Any]] = []
    for variant, earlier in itertools.product(args.variant, args.earlier_blocks):
        cfg = dataclasses.replace(base, **PLAIN) if variant == "plain" else base
        cfg = dataclasses.replace(cfg, earlier_blocks=earlier)
        if args.epochs is not None and variant == "tuned":
            cfg = dataclasses.replace(cfg, epochs_per_block=args.epochs)
        taus, tables = [], []
        for seed in args.seeds:
            name = f"{variant}-{earlier}-{args.norm}-seed{seed}"
            run = dataclasses.replace(cfg, seed=seed, out_dir=str(out / name))
            summary = run_search(run, log=lambda s: None)
            table = load_ratings(Path(run.out_dir) / "ratings.json")
            tables.append(table)
            res = evaluate(table, encodings, acc)
            vs_params = evaluate(table, encodings, [a["params"] for a in gt["architectures"]])
            arch = json.loads((Path(run.out_dir) / "architecture.json").read_text())
            searched.append({"run": name, "variant": variant, "earlier": earlier, "seed": seed,
                             "encoding": arch["encoding"]})
            row = {
                "rater": "BossNAS",
                "variant": variant,
                "earlier": earlier,
                "seed": seed,
                **_corr(res, sign=-1.0),
                "tau_vs_params": -vs_params["kendall"],
                "epochs": cfg.epochs_per_block,
                "seconds": float(sum(summary["block_seconds"])),
            }
            rows.append(row)
            taus.append(row["kendall"])
        rows.append({"rater": "BossNAS mean", "variant": variant, "earlier": earlier, "seed": "all",
                     "kendall": float(np.mean(taus))})
        raters[f"BossNAS {variant}, earlier {earlier}\n(mean of {len(tables)} seeds)"] = agreement(tables, encodings)
        if len(tables) > 1:
            rows.append(
                {
                    "rater": "BossNAS seed-vs-seed (all archs)",
                    "variant": variant,
                    "earlier": earlier,
                    "seed": "pairs",
                    "kendall": rating_stability(space, tables),
                }
            )
    plot = plot_agreement(gt, raters, output_path("bossnas_digits.png"))
    if args.retrain:
        default = [s for s in searched if s["variant"] == args.variant[0] and s["earlier"] == args.earlier_blocks[0]]
        retrain_searched(space, gt, default, args)
    total = time.perf_counter() - t_start
    notes = [
        describe_ground_truth(gt),
        f"ground truth {'reused' if t_gt < 5 else 'trained'} ({t_gt:.0f} s); total {total:.0f} s; norm {args.norm}",
        "BossNAS correlations use -score (the rating is a BYOL distance to the population center); "
        "tau_vs_params: Kendall between -score and parameter count (does the rating track capacity?)",
        "BossNAS seed-vs-seed: Kendall between two search seeds' scores of all architectures (rating stability)",
        "'seconds' = training + rating wall time of the search's blocks (recorded when they ran; a finished "
        "run in --out is reused)",
        f"scatter of every rater's score against accuracy: {plot}",
    ]
    report(
        "bossnas_digits",
        rows,
        columns=["rater", "variant", "earlier", "seed", "kendall", "spearman", "pearson", "tau_vs_params", "epochs",
                 "seconds"],
        notes=notes,
        extra={"ground_truth": str(gt_path()), "total_seconds": total, "config": base.to_json()},
    )
    return 0


def retrain_searched(space: Any, gt: dict[str, Any], searched: list[dict[str, Any]], args: BossNASDigitsBench) -> None:
    """Cross-validated stand-alone accuracy of the searched nets (one per search seed) beside random
    architectures of equal parameter count (within 5 % of the first searched net's) and the ground truth's
    distribution; same folds, epochs and seeds as the ground truth. Writes ``bossnas_digits_retrain.{csv,json}``."""
    import random

    from nas.costs import count_params
    from nas.export import build_network
    from nas.search.groundtruth import cross_validated_accuracy

    t0 = time.perf_counter()
    unique: dict[str, dict[str, Any]] = {}
    for s in searched:
        unique.setdefault(json.dumps(s["encoding"]), {**s, "runs": []})["runs"].append(s["run"])
    archs = [u["encoding"] for u in unique.values()]

    def params(enc: Any) -> int:
        return count_params(build_network(space, enc, 10))

    target = params(archs[0])
    near = [a for a in gt["architectures"] if abs(a["params"] - target) <= 0.10 * target
            and json.dumps(a["encoding"]) not in unique]
    if len(near) >= args.random_archs:  # the ground truth's uniformly sampled archs: already trained, same protocol
        randoms = [a["encoding"] for a in near]
        pool_note = f"the {len(near)} ground-truth architectures with params within 10 % of {target}"
        accs = cross_validated_accuracy(space, archs, args.gt_seeds, gt["epochs"], gt.get("folds", 1),
                                        args.gt_workers) + [a["accuracies"] for a in near]
    else:
        pool = [a for a in itertools.product(*[list(b.enumerate()) for b in space.blocks])
                if abs(params(a) - target) <= 0.10 * target and json.dumps([list(c) for c in a]) not in unique]
        rng = random.Random(0)
        randoms = [[list(c) for c in a] for a in rng.sample(pool, min(args.random_archs, len(pool)))]
        pool_note = f"{len(randoms)} drawn (seed 0) among the {len(pool)} with params within 10 % of {target}"
        accs = cross_validated_accuracy(space, archs + randoms, args.gt_seeds, gt["epochs"], gt.get("folds", 1),
                                        args.gt_workers)
    gt_acc = np.array([a["accuracy"] for a in gt["architectures"]])
    rows = []
    kinds = ["searched"] * len(archs) + ["random, equal params"] * len(randoms)
    for enc, acc, kind in zip(archs + randoms, accs, kinds):
        mean = float(np.mean(acc))
        rows.append({"architecture": kind, "encoding": json.dumps(enc), "params": params(enc), "accuracy": mean,
                     "per_seed": " ".join(f"{a:.4f}" for a in acc),
                     "gt_percentile": float((gt_acc < mean).mean() * 100),
                     "runs": " ".join(unique.get(json.dumps(enc), {}).get("runs", []))})
    rows.append({"architecture": "ground truth (30 sampled archs)", "accuracy": float(gt_acc.mean()),
                 "per_seed": f"min {gt_acc.min():.4f} median {np.median(gt_acc):.4f} max {gt_acc.max():.4f}",
                 "params": int(np.median([a["params"] for a in gt["architectures"]]))})
    report(
        "bossnas_digits_retrain",
        rows,
        columns=["architecture", "encoding", "params", "accuracy", "per_seed", "gt_percentile", "runs"],
        notes=[
            f"{gt.get('folds', 1)}-fold cross-validated stand-alone accuracy, seeds {args.gt_seeds}, {gt['epochs']} "
            "epochs (the ground truth's protocol); accuracy = mean over seeds; gt_percentile = share of the ground "
            "truth's architectures with a lower mean accuracy",
            f"random architectures of equal size: {pool_note}; {time.perf_counter() - t0:.0f} s",
        ],
    )


def rating_stability(space: Any, tables: list[Any]) -> float:
    """Mean pairwise Kendall tau between search seeds' scores of EVERY architecture of the space."""
    per_block = [[b.key(c) for c in b.enumerate()] for b in space.blocks]
    scores = []
    for t in tables:
        block_scores = [np.array([t.block_ratings[k][key] for key in keys]) for k, keys in enumerate(per_block)]
        total = block_scores[0]
        for bs in block_scores[1:]:
            total = (total[:, None] + bs[None, :]).ravel()  # every combination, block order
        scores.append(total)
    taus = [stats.kendalltau(scores[i], scores[j]).statistic for i, j in itertools.combinations(range(len(scores)), 2)]
    return float(np.mean(taus))


def _corr(res: dict, sign: float = 1.0) -> dict:
    return {k: sign * float(res[k]) for k in ("kendall", "spearman", "pearson")}
