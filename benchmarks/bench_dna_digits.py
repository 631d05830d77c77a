"""DNA on digits: does the block-wise rating rank architectures like stand-alone training does?

``python -m benchmarks dna_digits [--norm bn|bkn|both] [--bkn-p 0.5 0.9] [--seeds 0 1] [--archs 30] [--gt-seeds 0 1 2]``

1. ground truth: ``--archs`` architectures of the digits space (fixed sample seed), each trained
   from scratch with every ``--gt-seeds`` seed; mean test accuracy, reused from (and extended in)
   ``nas_digits_ground_truth.json`` in the output folder, which starts as a copy of the committed
   ``benchmarks/results/`` one;
2. DNA (teacher, block distillation, rating of every candidate) per norm and search seed;
3. Kendall tau / Spearman / Pearson between DNA's architecture score (negated loss) and mean
   accuracy, beside the seed-vs-seed ceiling (mean pairwise Kendall between single-seed
   accuracies) and the "more parameters is better" baseline in the same run; ``distill_loss`` =
   the mean rating (relative L1 distillation error) over all candidates and blocks, a
   ground-truth-free measure of how well the supernet learned (used to pick BKN's prior weight).

Writes ``dna_digits.{csv,json,png}`` to the output folder (``runs/benchmarks/``; ``--results-dir DIR``;
``--update-results``: the committed ``benchmarks/results/``).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from benchmarks.harness import check_at_least, output_path, parse_bench, report
from benchmarks.nas_digits import (
    GroundTruthOptions,
    agreement,
    describe_ground_truth,
    ground_truth,
    gt_path,
    plot_agreement,
)
from nas.methods.dna import digits_config, run_dna
from nas.search.groundtruth import seed_ceiling
from nas.search.ranking import correlations, evaluate
from nas.search.ratings import load_ratings
from stflow.config import run_cli


@dataclass
class DNADigitsBench(GroundTruthOptions):
    """The benchmark's options (fields = flags; ``--out`` is ``--out-dir``)."""

    norm: str = "both"  # bn | bkn | both
    bkn_p: list[float] = field(default_factory=lambda: [0.5])  # BKN prior weights to run (bkn rows)
    seeds: list[int] = field(default_factory=lambda: [0])  # DNA search seeds
    out_dir: str = "runs/bench-dna-digits"  # DNA run directories (resumable)
    fresh: bool = False  # delete previous DNA runs in --out-dir first

    cli_aliases = {"--out": "--out_dir"}

    def validate(self) -> None:
        super().validate()
        if self.norm not in ("bn", "bkn", "both"):
            raise ValueError(f"norm must be bn, bkn or both, got {self.norm!r}")
        check_at_least(self, seeds=0, bkn_p=0.0)
        if max(self.bkn_p) > 1.0:
            raise ValueError(f"bkn_p: prior weights must lie in [0, 1], got {self.bkn_p}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, _ = parse_bench(
        DNADigitsBench, argv, prog="python -m benchmarks dna_digits", description=__doc__.split("\n")[0]
    )
    t_start = time.perf_counter()
    cfg0 = digits_config(progress=False)
    gt = ground_truth(cfg0.space, args)
    t_gt = time.perf_counter() - t_start
    encodings = [a["encoding"] for a in gt["architectures"]]
    acc = [a["accuracy"] for a in gt["architectures"]]
    ceiling = seed_ceiling(gt)
    by_params = correlations([a["params"] for a in gt["architectures"]], acc)

    rows = [
        {"rater": "seed-vs-seed ceiling", "norm": "-", "seed": "-", "kendall": ceiling},
        {"rater": "more params is better", "norm": "-", "seed": "-", **_corr(by_params)},
    ]
    variants = [("bn", None)] if args.norm in ("bn", "both") else []
    if args.norm in ("bkn", "both"):
        variants += [("bkn", weight) for weight in args.bkn_p]
    out = Path(args.out_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    tables: dict[str, list] = {}
    for seed in args.seeds:
        teacher_src: Path | None = None
        for norm, prior_weight in variants:
            label = norm if prior_weight is None else f"bkn p={prior_weight:g}"
            run_dir = out / (f"{norm}-seed{seed}" if prior_weight is None else f"bkn-p{prior_weight:g}-seed{seed}")
            if teacher_src is not None and not (run_dir / "teacher").exists():  # one teacher for every variant
                shutil.copytree(teacher_src, run_dir / "teacher", ignore=shutil.ignore_patterns("checkpoints", "logs"))
            cfg = replace(cfg0, norm=norm, seed=seed)
            if prior_weight is not None:
                cfg = replace(cfg, bkn_prior_weight=prior_weight)
            run_dna(cfg, run_dir, do_retrain=False)
            teacher_src = run_dir / "teacher"
            seconds = sum(  # training + rating of every block, recorded when it ran
                json.loads((run_dir / f"block_{k}" / "ratings.json").read_text())["seconds"]
                for k in range(len(cfg.space.blocks))
            )
            table = load_ratings(run_dir / "ratings.json")
            tables.setdefault(label, []).append(table)
            res = evaluate(table, encodings, acc)
            loss = float(np.mean([np.mean(list(b.values())) for b in table.block_ratings]))
            # scores are losses (lower = better): negate so positive correlation = agreement
            rows.append(
                {
                    "rater": "DNA",
                    "norm": label,
                    "seed": seed,
                    **_corr(res, sign=-1.0),
                    "distill_loss": loss,
                    "seconds": seconds,
                }
            )
    dna_rows = [r for r in rows if r["rater"] == "DNA"]
    for label in dict.fromkeys(r["norm"] for r in dna_rows):
        taus = [r["kendall"] for r in dna_rows if r["norm"] == label]
        rows.append({"rater": "DNA mean", "norm": label, "seed": "all", "kendall": float(np.mean(taus))})
    raters = {f"DNA {label} (mean of {len(t)} seeds)": agreement(t, encodings) for label, t in tables.items()}
    plot = plot_agreement(gt, raters, output_path("dna_digits.png"))
    total = time.perf_counter() - t_start
    notes = [
        describe_ground_truth(gt),
        f"ground truth time {t_gt:.0f} s ({'reused' if t_gt < 5 else 'trained'}); total {total:.0f} s",
        "DNA correlations use -score (the rating is a loss); 'more params' uses the parameter count",
        "bkn p=...: normlayers.BatchKalmanNorm2d (prior weight p, analytic transition) chained along every "
        "sampled path of the block supernets (nas.supernet); ratings use running statistics after recalibration",
        "distill_loss: mean relative-L1 rating over every candidate of every block (no ground truth involved)",
        "'seconds' = training + rating of the blocks, recorded when they ran (the teacher is shared and not "
        "counted; a finished run in --out is reused)",
        f"scatter of every rater's score against accuracy: {plot}",
    ]
    report(
        "dna_digits",
        rows,
        columns=["rater", "norm", "seed", "kendall", "spearman", "pearson", "distill_loss", "seconds"],
        notes=notes,
        extra={"ground_truth": str(gt_path()), "total_seconds": total},
    )
    return 0


def _corr(res: dict, sign: float = 1.0) -> dict:
    return {k: sign * float(res[k]) for k in ("kendall", "spearman", "pearson")}
