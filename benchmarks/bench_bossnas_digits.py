"""BossNAS on digits: does the self-supervised block rating rank architectures like stand-alone training?

``python -m benchmarks bossnas_digits [--norm bn|bkn] [--seeds 0 1] [--epochs N] [--variant tuned plain]
[--search-config bossnas_digits|FILE]``

Same protocol and ground truth as ``benchmarks/bench_dna_digits.py``: the architectures of the
core's digits MBConv space in ``benchmarks/results/nas_digits_ground_truth.json`` (built with
``nas.search.groundtruth`` when absent), Kendall / Spearman / Pearson between the BossNAS architecture
score (negated: the rating is a loss) and mean stand-alone accuracy, printed beside the
seed-vs-seed ceiling, the "more parameters is better" baseline (same run) and DNA's tau (read
from ``benchmarks/results/dna_digits.json`` when present).

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

from benchmarks.harness import RESULTS_DIR, report
from benchmarks.nas_digits import (
    GT_PATH,
    GroundTruthOptions,
    agreement,
    describe_ground_truth,
    ground_truth,
    plot_agreement,
)
from nas.data.views import ViewConfig
from nas.methods.bossnas import DEFAULT_CONFIG, BossNASConfig, run_search
from nas.methods.dna import DNAConfig
from nas.search.groundtruth import seed_ceiling
from nas.search.ranking import correlations, evaluate
from nas.search.ratings import load_ratings
from stflow.config import load_config, parse_cli, run_cli

DNA_RESULTS = RESULTS_DIR / "dna_digits.json"

PLAIN = dict(
    epochs_per_block=15,
    sampling="random",
    num_paths=2,
    batch_size=64,
    views=ViewConfig(pad=1, rotate_deg=0.0, scale=0.0, noise_std=0.05, cutout=0, cutout_prob=0.0),
)


def dna_tau() -> dict[str, Any] | None:
    """DNA's mean Kendall tau per norm from the DNA benchmark's saved JSON, if present."""
    if not DNA_RESULTS.is_file():
        return None
    rows = json.loads(DNA_RESULTS.read_text()).get("rows", [])
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
    out_dir: str = "runs/bench-bossnas-digits"  # search run directories (resumable)
    fresh: bool = False  # delete previous runs in --out-dir first

    cli_aliases = {"--out": "--out_dir"}

    def validate(self) -> None:
        super().validate()
        if self.norm not in ("bn", "bkn"):
            raise ValueError(f"norm must be bn or bkn, got {self.norm!r}")
        if not self.variant or set(self.variant) - {"tuned", "plain"}:
            raise ValueError(f"variant must be tuned and/or plain, got {self.variant}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, _ = parse_cli(
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
    for variant in args.variant:
        cfg = dataclasses.replace(base, **PLAIN) if variant == "plain" else base
        if args.epochs is not None and variant == "tuned":
            cfg = dataclasses.replace(cfg, epochs_per_block=args.epochs)
        taus, tables = [], []
        for seed in args.seeds:
            run = dataclasses.replace(cfg, seed=seed, out_dir=str(out / f"{variant}-{args.norm}-seed{seed}"))
            summary = run_search(run, log=lambda s: None)
            table = load_ratings(Path(run.out_dir) / "ratings.json")
            tables.append(table)
            res = evaluate(table, encodings, acc)
            vs_params = evaluate(table, encodings, [a["params"] for a in gt["architectures"]])
            row = {
                "rater": "BossNAS",
                "variant": variant,
                "seed": seed,
                **_corr(res, sign=-1.0),
                "tau_vs_params": -vs_params["kendall"],
                "epochs": cfg.epochs_per_block,
                "seconds": float(sum(summary["block_seconds"])),
            }
            rows.append(row)
            taus.append(row["kendall"])
        rows.append({"rater": "BossNAS mean", "variant": variant, "seed": "all", "kendall": float(np.mean(taus))})
        raters[f"BossNAS {variant} (mean of {len(tables)} seeds)"] = agreement(tables, encodings)
        if len(tables) > 1:
            rows.append(
                {
                    "rater": "BossNAS seed-vs-seed (all archs)",
                    "variant": variant,
                    "seed": "pairs",
                    "kendall": rating_stability(space, tables),
                }
            )
    plot = plot_agreement(gt, raters, RESULTS_DIR / "bossnas_digits.png")
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
        columns=["rater", "variant", "seed", "kendall", "spearman", "pearson", "tau_vs_params", "epochs", "seconds"],
        notes=notes,
        extra={"ground_truth": str(GT_PATH), "total_seconds": total, "config": base.to_json()},
    )
    return 0


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
