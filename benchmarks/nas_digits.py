"""What the DNA and BossNAS digits benchmarks share: one ground-truth file and its options (config fields).

The ground truth is a cache in the output folder (``harness.cache_path``): the committed
``benchmarks/results/nas_digits_ground_truth.json`` is copied there and reused, new seeds are written there
(into ``benchmarks/results/`` itself only with ``--update-results``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import cache_path, check_at_least
from nas.search.groundtruth import build_ground_truth
from nas.search.ranking import architecture_keys, correlations
from nas.search.ratings import RatingTable
from nas.spaces import SearchSpace

GT_NAME = "nas_digits_ground_truth.json"


def gt_path() -> Path:
    """The ground-truth file this run reads and extends (in the output folder; see the module docstring)."""
    return cache_path(GT_NAME)


@dataclass
class GroundTruthOptions:
    """The ground truth's options, shared by the digits benchmarks' configs (``--archs``, ``--gt-seeds 0 1 2``, ...)."""

    archs: int = 30  # architectures in the ground truth
    gt_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # stand-alone training seeds
    gt_epochs: int = 10
    gt_folds: int = 5  # cross-validation folds per seed (1 = the fixed 360-image test split)
    gt_workers: int = 2  # parallel stand-alone training processes

    def validate(self) -> None:
        if self.archs < 3 or len(self.gt_seeds) < 2:
            raise ValueError("need >= 3 architectures (--archs) and >= 2 ground-truth seeds (--gt-seeds)")
        check_at_least(self, gt_seeds=0, gt_epochs=1, gt_folds=1, gt_workers=1)


def describe_ground_truth(gt: dict[str, Any]) -> str:
    """One line for a benchmark's notes: what the accuracies are and their spread."""
    acc = [a["accuracy"] for a in gt["architectures"]]
    folds = gt.get("folds", 1)
    how = f"{folds}-fold cross-validated (pooled over all 1,797 images)" if folds > 1 else "fixed 360-image test split"
    return (f"{len(acc)} architectures of {gt['space']}, ground truth = mean stand-alone accuracy over seeds "
            f"{gt['seeds']}, each {how}, {gt['epochs']} epochs per run; mean {np.mean(acc):.4f}, "
            f"range {min(acc):.4f}-{max(acc):.4f}")


def ground_truth(space: SearchSpace, opts: GroundTruthOptions) -> dict[str, Any]:
    """The stand-alone accuracies in :func:`gt_path` (built, or reused when its settings match)."""
    opts.validate()
    return build_ground_truth(space, gt_path(), opts.archs, opts.gt_seeds, opts.gt_epochs, folds=opts.gt_folds,
                              workers=opts.gt_workers)


def agreement(tables: Sequence[RatingTable], encodings: Sequence[Sequence[Sequence[int]]]) -> list[float]:
    """Architecture scores with higher = better, averaged over search seeds (one table per seed)."""
    per_seed = []
    for table in tables:
        sign = -1.0 if table.lower_is_better else 1.0
        per_seed.append([sign * table.score(architecture_keys(table, e)) for e in encodings])
    return list(np.mean(per_seed, axis=0))


def plot_agreement(gt: dict[str, Any], raters: dict[str, Sequence[float]], path: Path) -> Path:
    """One scatter per rater, after the "more params" baseline: its score (higher = better) against mean
    stand-alone accuracy, with the Kendall tau of exactly what is plotted in the panel's title."""
    from benchmarks.bkn_study import _plt, save_figure

    plt = _plt()
    panels = {"more params": [float(a["params"]) for a in gt["architectures"]], **raters}
    acc = np.array([a["accuracy"] for a in gt["architectures"]]) * 100
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.0), squeeze=False)
    for ax, (label, scores) in zip(axes[0], panels.items()):
        tau = correlations(list(scores), list(acc))["kendall"]
        ax.scatter(scores, acc, s=14)
        ax.set_title(f"{label}\nKendall {tau:+.2f}", fontsize=9)
        ax.set_xlabel("score (higher = better)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("stand-alone accuracy, %", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)
