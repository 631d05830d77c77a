"""BossNAS on digits in the HyTra space: rank correlation against a cross-validated ground truth.

``python -m benchmarks bossnas_hytra [--seeds 0] [--archs 20] [--gt-seeds 0 1 2] [--gt-epochs 4] [--gt-folds 3]``

Ground truth (``hytra_digits_ground_truth.json`` in the output folder, started from the committed
``benchmarks/results/`` one; built by ``nas.search.groundtruth.build_ground_truth`` when absent, resumable per
seed): ``--archs`` architectures
drawn uniformly among the legal networks of ``hytra_digits(hytra_layers, hytra_width)`` (the packaged
``bossnas_hytra_digits`` space), each trained from scratch with every ground-truth seed, each seed's
accuracy 3-fold cross-validated (pooled over all 1,797 images); printed with its seed-vs-seed ceiling.

Rating an arbitrary HyTra architecture: a block's legal candidates depend on the level at which the
previous block ends, so the search's own table (candidates after the SEARCHED prefix) does not cover
every sampled architecture. Each ground-truth architecture is therefore rated *conditionally*: block k
is rated after that architecture's own blocks 0..k-1 (their statistics re-estimated), among all the
candidates legal at that entry level (population centre over them), and the architecture's score is the
sum of its blocks' scores. Block k was trained behind the searched prefix only, so a first layer entered
from another level uses entry projections block k's training never updated: the figure measures that.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import cache_path, check_at_least, parse_bench, report
from nas.methods.bossnas import HYTRA_CONFIG, BossNAS, BossNASConfig, _prepare_prefix, rate_block
from nas.search.groundtruth import build_ground_truth, seed_ceiling
from nas.search.ranking import correlations
from nas.spaces.hytra import hytra_digits
from stflow.config import load_config, run_cli

GT_NAME = "hytra_digits_ground_truth.json"


@dataclass
class BossNASHyTraBench:
    """The benchmark's options (fields = flags)."""

    search_config: str = HYTRA_CONFIG  # BossNAS config (packaged name or YAML file)
    seeds: list[int] = field(default_factory=lambda: [0])  # BossNAS search seeds
    archs: int = 20
    gt_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    gt_epochs: int = 4
    gt_folds: int = 3
    gt_workers: int = 2
    earlier_blocks: str = "train"  # train (the authors') or frozen
    out_dir: str = "runs/bench-bossnas-hytra"  # search run directories

    def validate(self) -> None:
        if self.archs < 3 or len(self.gt_seeds) < 2:
            raise ValueError("need >= 3 architectures (--archs) and >= 2 ground-truth seeds (--gt-seeds)")
        check_at_least(self, seeds=0, gt_seeds=0, gt_epochs=1, gt_folds=1, gt_workers=1)
        if self.earlier_blocks not in ("train", "frozen"):
            raise ValueError(f"earlier_blocks must be train or frozen, got {self.earlier_blocks!r}")


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, _ = parse_bench(BossNASHyTraBench, argv, prog="python -m benchmarks bossnas_hytra",
                        description=__doc__.split("\n")[0], packages=("nas",))
    t0 = time.perf_counter()
    base = load_config(BossNASConfig, args.search_config, packages=("nas",), progress=False, space="hytra",
                       earlier_blocks=args.earlier_blocks)
    space = hytra_digits(base.hytra_layers, base.hytra_width)
    gt_path = cache_path(GT_NAME)
    gt = build_ground_truth(space, gt_path, args.archs, args.gt_seeds, args.gt_epochs, folds=args.gt_folds,
                            workers=args.gt_workers, progress=False)
    encodings = [[tuple(c) for c in a["encoding"]] for a in gt["architectures"]]
    acc = [a["accuracy"] for a in gt["architectures"]]
    rows: list[dict[str, Any]] = [
        {"rater": "seed-vs-seed ceiling", "seed": "-", "kendall": seed_ceiling(gt)},
        {"rater": "more params is better", "seed": "-",
         **correlations([a["params"] for a in gt["architectures"]], acc)},
    ]
    taus = []
    for seed in args.seeds:
        cfg = dataclasses.replace(base, seed=seed, out_dir=str(Path(args.out_dir) / f"seed{seed}"))
        method = BossNAS(cfg, log=lambda s: None)
        t1 = time.perf_counter()
        summary = method.search()
        scores = conditional_scores(method, encodings)
        res = correlations([-s for s in scores], acc)
        rows.append({"rater": "BossNAS (conditional rating)", "seed": seed, **res,
                     "searched": str(summary["architecture"]["keys"]), "seconds": time.perf_counter() - t1})
        taus.append(res["kendall"])
    rows.append({"rater": "BossNAS mean", "seed": "all", "kendall": float(np.mean(taus))})
    a = np.array(acc)
    report(
        "bossnas_hytra",
        rows,
        columns=["rater", "seed", "kendall", "spearman", "pearson", "searched", "seconds"],
        notes=[
            f"ground truth: {len(acc)} architectures of {gt['space']} (layers {list(base.hytra_layers)}, width "
            f"{base.hytra_width}), mean stand-alone accuracy over seeds {gt['seeds']}, each {gt['folds']}-fold "
            f"cross-validated, {gt['epochs']} epochs per run; mean {a.mean():.4f}, range {a.min():.4f}-{a.max():.4f}",
            "BossNAS: the packaged bossnas_hytra_digits config; correlations use -score (a distance); each "
            "architecture rated conditionally on its own prefix (module docstring)",
            f"total {time.perf_counter() - t0:.0f} s",
        ],
        extra={"ground_truth": str(gt_path), "config": base.to_json()},
    )
    return 0


def conditional_scores(method: BossNAS, encodings: list[list[tuple[int, ...]]]) -> list[float]:
    """Sum over blocks of each architecture's block score, block k rated after the architecture's own prefix."""
    model, adapter = method.model, method.adapter
    assert model is not None
    cache: dict[tuple, dict[str, float]] = {}
    scores = []
    for enc in encodings:
        total = 0.0
        for k, cand in enumerate(enc):
            prefix = tuple(enc[:k])
            if prefix not in cache:
                _prepare_prefix(model, list(prefix), method.recal_images)
                cache[prefix] = rate_block(model, adapter, k, list(prefix), method.recal_images, method.eval_pairs,
                                           normalized_center=method.cfg.center_normalized, progress=False)
            total += cache[prefix][adapter.key(k, cand)]
        scores.append(total)
    return scores
