"""What the DNA and BossNAS digits benchmarks share: one ground-truth file and its command-line options."""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.harness import RESULTS_DIR
from nas.groundtruth import build_ground_truth
from nas.spaces import SearchSpace

GT_PATH = RESULTS_DIR / "nas_digits_ground_truth.json"


def add_ground_truth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--archs", type=int, default=30, help="architectures in the ground truth")
    parser.add_argument("--gt-seeds", type=int, nargs="+", default=[0, 1, 2], help="stand-alone training seeds")
    parser.add_argument("--gt-epochs", type=int, default=10)


def ground_truth(space: SearchSpace, args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The stand-alone accuracies in GT_PATH (built, or reused when its settings match)."""
    if args.archs < 3 or len(args.gt_seeds) < 2:
        parser.error("need >= 3 architectures and >= 2 ground-truth seeds")
    return build_ground_truth(space, GT_PATH, args.archs, args.gt_seeds, args.gt_epochs)
