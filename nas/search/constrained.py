"""Constrained search over a rating table: best architecture score with total cost < budget.

``exact_search`` (default) is a dynamic program over blocks that keeps only the Pareto front of
(cost, score) pairs of partial architectures, pruned by the cheapest completion; it is exact and
solves a ~3e16-architecture space in about a second. ``reference_traversal`` reproduces DNA's
released search (nested walks of loss-sorted lists with index caps), which is NOT exact; it is
kept to reproduce the paper's procedure and to measure its gap.

Scores are summed over blocks; lower is better unless the table says otherwise. The budget is
strict: total cost < budget. Whole-architecture rows (:class:`nas.search.ratings.ArchitectureRatings`,
e.g. Pi-NAS) are not block-additive: ``search_rows`` scans the rated rows (exact over what was rated).

CLI::

    python -m nas.search.constrained --ratings R.json --budget 30000 [--cost params|flops] [--method exact|reference]
    # R: a block table, or whole-architecture rows (exact scan)
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from nas.search.ratings import ArchitectureRatings, RatingTable, load_any_ratings
from nas.spaces import candidate_key, parse_candidate_key
from stflow.config import parse_cli, run_cli

__all__ = [
    "SearchResult",
    "exact_search",
    "reference_traversal",
    "brute_force",
    "search_table",
    "search_rows",
    "search_any",
    "check_budget",
    "main",
]

Solution = tuple[list[int], float, float]  # (candidate index per block, total score, total cost)


def _check(
    scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number, got {budget!r}")
    if len(scores) != len(costs) or not scores:
        raise ValueError(f"need the same non-zero number of score and cost blocks, got {len(scores)} and {len(costs)}")
    s_out, c_out = [], []
    for k, (s, c) in enumerate(zip(scores, costs)):
        s_arr, c_arr = np.asarray(s, dtype=np.float64), np.asarray(c, dtype=np.float64)
        if s_arr.ndim != 1 or s_arr.shape != c_arr.shape or len(s_arr) == 0:
            raise ValueError(f"block {k}: scores {s_arr.shape} and costs {c_arr.shape} must be equal non-empty 1-D")
        if not (np.isfinite(s_arr).all() and np.isfinite(c_arr).all()):
            raise ValueError(f"block {k}: scores and costs must be finite")
        if (c_arr < 0).any():
            raise ValueError(f"block {k}: costs must be >= 0")
        s_out.append(s_arr)
        c_out.append(c_arr)
    return s_out, c_out


def _pareto(cost: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated points (strictly lower score than every cheaper-or-equal point)."""
    order = np.lexsort((score, cost))  # by cost, ties by score
    s = score[order]
    best_before = np.concatenate(([np.inf], np.minimum.accumulate(s)[:-1]))
    return order[s < best_before]


def exact_search(
    scores: Sequence[Sequence[float]],
    costs: Sequence[Sequence[float]],
    budget: float,
    lower_is_better: bool = True,
    chunk: int = 4_000_000,
) -> Solution | None:
    """The optimum (index per block, score, cost) with total cost < ``budget``; None if nothing fits."""
    s_list, c_list = _check(scores, costs, budget)
    sign = 1.0 if lower_is_better else -1.0
    s_list = [sign * s for s in s_list]
    n = len(s_list)
    rest = np.concatenate((np.cumsum([c.min() for c in c_list][::-1])[::-1][1:], [0.0]))  # cheapest completion
    # Candidates dominated inside their own block can never be needed: keep each block's front.
    fronts = [_pareto(c, s) for c, s in zip(c_list, s_list)]
    front_cost = np.zeros(1)
    front_score = np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []  # per block: (parent index, candidate index)
    for k in range(n):
        cand = fronts[k]
        cc, cs = c_list[k][cand], s_list[k][cand]
        parts_c, parts_s, parts_p, parts_j = [], [], [], []
        step = max(1, chunk // len(cand))
        for lo in range(0, len(front_cost), step):
            tot_c = (front_cost[lo : lo + step, None] + cc[None, :]).ravel()  # (F_chunk * M,)
            tot_s = (front_score[lo : lo + step, None] + cs[None, :]).ravel()
            ok = np.flatnonzero(tot_c + rest[k] < budget)
            keep = ok[_pareto(tot_c[ok], tot_s[ok])]
            parts_c.append(tot_c[keep])
            parts_s.append(tot_s[keep])
            parts_p.append(lo + keep // len(cand))
            parts_j.append(cand[keep % len(cand)])
        tot_c, tot_s = np.concatenate(parts_c), np.concatenate(parts_s)
        if len(tot_c) == 0:
            return None
        keep = _pareto(tot_c, tot_s)
        front_cost, front_score = tot_c[keep], tot_s[keep]
        back.append((np.concatenate(parts_p)[keep], np.concatenate(parts_j)[keep]))
    i = int(np.argmin(front_score))  # ties: the cheapest (front is sorted by cost)
    best_cost, best_score = float(front_cost[i]), float(front_score[i])
    choice = [0] * n
    for k in range(n - 1, -1, -1):
        parent, j = back[k]
        choice[k] = int(j[i])
        i = int(parent[i])
    return choice, sign * best_score, best_cost


def brute_force(
    scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float, lower_is_better: bool = True
) -> Solution | None:
    """Exhaustive search (small instances only; the test oracle)."""
    import itertools

    s_list, c_list = _check(scores, costs, budget)
    sign = 1.0 if lower_is_better else -1.0
    best: Solution | None = None
    for combo in itertools.product(*(range(len(s)) for s in s_list)):
        c = sum(float(c_list[k][j]) for k, j in enumerate(combo))
        if c >= budget:
            continue
        s = sum(float(s_list[k][j]) for k, j in enumerate(combo))
        if best is None or sign * s < sign * best[1] or (sign * s == sign * best[1] and c < best[2]):
            best = (list(combo), s, c)
    return best


def reference_traversal(
    scores: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float, lower_is_better: bool = True
) -> Solution | None:
    """DNA's released traversal: loss-sorted candidate lists walked in nested loops.

    Partial costs are checked against ``budget - cheapest completion`` (``>`` skips), the last
    block takes the first candidate with total cost < budget and caps its list there; a cap of 0
    moves the cap to the enclosing block's current index. Not exact (see the module docstring).
    """
    s_list, c_list = _check(scores, costs, budget)
    sign = 1.0 if lower_is_better else -1.0
    n = len(s_list)
    order = [np.argsort(sign * s, kind="stable") for s in s_list]
    loss = [(sign * s)[o].tolist() for s, o in zip(s_list, order)]
    cost = [c[o].tolist() for c, o in zip(c_list, order)]
    mins = [min(c) for c in cost]
    threshold = [budget - sum(mins[k + 1 :]) for k in range(n)]
    cap = [len(x) for x in loss]
    idx = [0] * n
    best: dict[str, object] = {"loss": math.inf, "idx": None, "cost": None}

    def walk(k: int, partial_cost: float, partial_loss: float) -> None:
        if k == n - 1:
            for j in range(cap[k]):
                if j >= cap[k]:
                    break
                c = partial_cost + cost[k][j]
                if c < threshold[k]:
                    total = partial_loss + loss[k][j]
                    if total < best["loss"]:
                        idx[k] = j
                        best.update(loss=total, idx=list(idx), cost=c)
                    cap[k] = j
                    if cap[k] == 0 and k > 0:
                        cap[k - 1] = idx[k - 1]
                        cap[k] = len(loss[k])
                    break
            return
        for j in range(cap[k]):  # range fixed at loop entry, caps checked per iteration (as released)
            if k > 0 and j >= cap[k]:
                if cap[k] == 0:
                    cap[k - 1] = idx[k - 1]
                    cap[k] = len(loss[k])
                break
            idx[k] = j
            c = partial_cost + cost[k][j]
            if c > threshold[k]:
                continue
            walk(k + 1, c, partial_loss + loss[k][j])

    walk(0, 0.0, 0.0)
    if best["idx"] is None:
        return None
    choice = [int(order[k][j]) for k, j in enumerate(best["idx"])]  # type: ignore[arg-type]
    total_score = float(sum(s_list[k][j] for k, j in enumerate(choice)))
    return choice, total_score, float(sum(c_list[k][j] for k, j in enumerate(choice)))


@dataclass
class SearchResult:
    method: str
    budget: float
    cost_name: str
    keys: list[str]
    encoding: list[list[int]]
    score: float
    cost: float

    def to_json(self) -> dict:
        return asdict(self)


METHODS = {"exact": exact_search, "reference": reference_traversal}


def check_budget(budget: float, cheapest: float, cost: str = "params", what: str = "architecture") -> None:
    """Raise a one-line ``ValueError`` naming the budget and the cheapest cost unless ``cheapest < budget`` (the
    budget is strict); the searches call it before searching, the methods before any training."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite positive number, got {budget!r}")
    if budget <= 0:
        raise ValueError(f"budget must be a finite positive number, got {budget:g} (the cheapest {what} costs "
                         f"{cheapest:g} {cost})")
    if not cheapest < budget:
        raise ValueError(f"no {what} has {cost} < budget {budget:g}; the cheapest costs {cheapest:g}")


def search_table(table: RatingTable, budget: float, cost: str = "params", method: str = "exact") -> SearchResult:
    """Best architecture of a rating table under ``total cost < budget``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {sorted(METHODS)}")
    cost_tables = table.costs(cost)
    keys = [list(r) for r in table.block_ratings]
    scores = [[table.block_ratings[k][key] for key in ks] for k, ks in enumerate(keys)]
    costs = [[cost_tables[k][key] for key in ks] for k, ks in enumerate(keys)]
    check_budget(budget, sum(min(c) for c in costs), cost)
    sol = METHODS[method](scores, costs, budget, table.lower_is_better)
    if sol is None:  # the reference traversal may miss a feasible architecture
        raise ValueError(f"the {method} search found no architecture with {cost} < budget {budget:g}")
    choice, score, total = sol
    chosen = [keys[k][j] for k, j in enumerate(choice)]
    encoding = [list(parse_candidate_key(key, key.startswith("c"))) for key in chosen]
    return SearchResult(method, float(budget), cost, chosen, encoding, float(score), float(total))


def search_rows(
    rows: ArchitectureRatings, budget: float | None, cost: str = "params", method: str = "exact"
) -> SearchResult:
    """Best rated architecture with ``cost < budget`` (``budget`` None: the best overall); ties go to the
    first row. Exact over the rated rows (a scan); the block-wise ``reference`` traversal does not apply."""
    if method != "exact":
        raise ValueError(f"whole-architecture rows are searched exactly (a scan); method {method!r} does not apply")
    costs = rows.costs(cost) if budget is not None else [0.0] * len(rows.rows)
    if budget is not None:
        check_budget(budget, min(costs), cost, "rated architecture")
    sign = 1.0 if rows.lower_is_better else -1.0
    best: int | None = None
    for i, (row, c) in enumerate(zip(rows.rows, costs)):
        if budget is not None and not c < budget:
            continue
        if best is None or sign * row["score"] < sign * rows.rows[best]["score"]:
            best = i
    assert best is not None  # check_budget: some rated row fits
    row = rows.rows[best]
    encoding = [list(b) for b in row["encoding"]]
    keys = row.get("keys") or [candidate_key(b) for b in encoding]
    total = float(costs[best]) if budget is not None else float(row.get(cost, float("nan")))
    return SearchResult(method, float(budget) if budget is not None else math.inf, cost, list(keys), encoding,
                        float(row["score"]), total)


def search_any(
    table: RatingTable | ArchitectureRatings, budget: float, cost: str = "params", method: str = "exact"
) -> SearchResult:
    """:func:`search_table` for a block table, :func:`search_rows` for whole-architecture rows."""
    if isinstance(table, ArchitectureRatings):
        return search_rows(table, budget, cost, method)
    return search_table(table, budget, cost, method)


@dataclass
class ConstrainedSearchConfig:
    """``python -m nas.search.constrained``'s options (fields = flags)."""

    ratings: str  # rating table JSON with block_costs, or whole-architecture rows with costs
    budget: float  # strict upper bound on the total cost
    cost: str = "params"  # cost field: params | flops
    method: str = "exact"  # exact | reference | brute_force

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")


def main(argv: list[str] | None = None) -> int:
    """The CLI; a user error prints one ``error: ...`` line and returns 2."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, _ = parse_cli(
        ConstrainedSearchConfig,
        argv,
        prog="python -m nas.search.constrained",
        description=__doc__.split("\n")[0],
        packages=("nas",),
    )
    result = search_any(load_any_ratings(args.ratings), args.budget, args.cost, args.method)  # errors: ValueErrors
    print(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
