"""Constrained block-wise search: exact Pareto DP vs DNA's reference traversal.

``python -m benchmarks constrained_search [--instances 200] [--sizes 3 6 10 30]``

1. paper-sized space: 6 blocks x 560 candidates (3.1e16 architectures), realistic ratings
   (costlier candidates tend to have lower loss), exact search timed at three budgets, and the
   adversarial case where every candidate is on its block's Pareto front;
2. many random small instances (5 blocks): how often the reference traversal returns the
   optimum and its mean relative gap in total loss (exact search is the oracle; it equals brute
   force, checked here on the smallest size and in tests/test_nas_search.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from benchmarks.harness import check_at_least, parse_bench, report, time_fn
from nas.search.constrained import brute_force, exact_search, reference_traversal
from stflow.config import run_cli


def realistic_instance(rng: np.random.Generator, blocks: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Costs ~ log-uniform over a decade; loss ~ cost^-0.5 times noise (bigger = better, noisily)."""
    costs = [np.round(10 ** rng.uniform(3, 4, size)) for _ in range(blocks)]
    scores = [c ** -0.5 * 30 * np.exp(rng.normal(0, 0.15, size)) for c in costs]
    return scores, costs


def budget_at(costs: list[np.ndarray], fraction: float) -> float:
    lo = sum(float(c.min()) for c in costs)
    hi = sum(float(c.max()) for c in costs)
    return lo + fraction * (hi - lo)


@dataclass
class ConstrainedSearchBench:
    """The benchmark's options (fields = flags)."""

    instances: int = 200
    sizes: list[int] = field(default_factory=lambda: [3, 6, 10, 30])  # candidates per block (60: ~2 s per instance)
    seed: int = 0

    def validate(self) -> None:
        check_at_least(self, instances=1, sizes=1, seed=0)


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, _ = parse_bench(ConstrainedSearchBench, argv, prog="python -m benchmarks constrained_search",
                        description=__doc__.split("\n")[0])
    rng = np.random.default_rng(args.seed)
    rows = []

    scores, costs = realistic_instance(rng, 6, 560)
    n_arch = float(np.prod([len(s) for s in scores], dtype=float))
    for fraction in (0.25, 0.5, 0.75):
        budget = budget_at(costs, fraction)
        sol = exact_search(scores, costs, budget)
        assert sol is not None and sol[2] < budget
        t = time_fn(lambda b=budget: exact_search(scores, costs, b), warmup=1, repeats=5)
        rows.append(
            {
                "case": f"paper-size 6x560 ({n_arch:.1e} archs)",
                "budget": f"{fraction:.2f} of range",
                "method": "exact",
                "p50_ms": t["p50_ms"],
                "best_loss": sol[1],
            }
        )

    # adversarial: loss strictly decreasing in cost, so every candidate is on its block's front
    hard_scores = [np.interp(c, np.sort(c), np.linspace(1.0, 0.1, len(c))) for c in costs]
    for fraction in (0.25, 0.5, 0.75):
        budget = budget_at(costs, fraction)
        t0 = time.perf_counter()
        sol = exact_search(hard_scores, costs, budget)
        seconds = time.perf_counter() - t0
        assert sol is not None and sol[2] < budget
        rows.append(
            {
                "case": "paper-size, all candidates Pareto",
                "budget": f"{fraction:.2f} of range",
                "method": "exact",
                "p50_ms": 1e3 * seconds,
                "best_loss": sol[1],
            }
        )

    for size in args.sizes:
        optimal = infeasible = 0
        gaps: list[float] = []
        t_exact = t_ref = 0.0
        checked_bf = 0
        for _ in range(args.instances):
            scores, costs = realistic_instance(rng, 5, size)
            budget = budget_at(costs, rng.uniform(0.2, 0.6))
            t0 = time.perf_counter()
            opt = exact_search(scores, costs, budget)
            t_exact += time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = reference_traversal(scores, costs, budget)
            t_ref += time.perf_counter() - t0
            if size <= 3:  # the oracle itself, against exhaustive search
                bf = brute_force(scores, costs, budget)
                assert (bf is None and opt is None) or abs(bf[1] - opt[1]) < 1e-9
                checked_bf += 1
            if opt is None:
                continue
            if ref is None:
                infeasible += 1
                continue
            gap = ref[1] / opt[1] - 1.0
            gaps.append(gap)
            optimal += gap < 1e-12
        rows.append(
            {
                "case": f"random 5 blocks x {size}",
                "budget": "0.2-0.6 of range",
                "method": "reference vs exact",
                "optimal": f"{optimal}/{args.instances}",
                "mean_gap_pct": 100 * float(np.mean(gaps)) if gaps else float("nan"),
                "max_gap_pct": 100 * float(np.max(gaps)) if gaps else float("nan"),
                "ref_none": infeasible,
                "exact_ms": 1e3 * t_exact / args.instances,
                "ref_ms": 1e3 * t_ref / args.instances,
                "brute_force_checked": checked_bf,
            }
        )
    report(
        "constrained_search",
        rows,
        columns=["case", "budget", "method", "p50_ms", "best_loss", "optimal", "mean_gap_pct", "max_gap_pct",
                 "ref_none", "exact_ms", "ref_ms", "brute_force_checked"],
        notes=[
            "gap = reference total loss / optimal total loss - 1 (instances where both found a solution)",
            "ref_none: instances with a feasible architecture where the reference traversal returned none",
        ],
    )
    return 0
