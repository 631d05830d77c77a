"""Rank correlation between rating-table architecture scores and ground-truth accuracy.

Ground truth JSON: ``{"architectures": [{"encoding": [[ops of block 0], ...], "<metric>": value}, ...]}``.
An architecture's score is the sum of its blocks' ratings (see :class:`nas.search.ratings.RatingTable`), or,
for a whole-architecture rater, its row's score (:class:`nas.search.ratings.ArchitectureRatings`). The two files
must describe the same space: a ground truth whose architectures have another number of blocks than the ratings,
or use candidate keys (rows: architectures) the ratings do not rate, is a one-line error naming the counts or the
keys (:func:`check_compatible`); nothing is truncated or left out.

CLI::

    python -m nas.search.ranking --ratings R.json --ground-truth G.json [--metric top1] [--json]  # block table or rows
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from nas.search.ratings import ArchitectureRatings, RatingTable, load_any_ratings
from nas.spaces import candidate_key
from stflow.config import parse_cli, run_cli

__all__ = ["correlations", "load_ground_truth", "architecture_keys", "architecture_scores", "check_compatible",
           "evaluate", "main"]


def correlations(scores: Sequence[float], truth: Sequence[float]) -> dict[str, float]:
    """Kendall tau-b, Spearman rho and Pearson r (scipy.stats) between two equal-length sequences."""
    x = np.asarray(scores, dtype=float)
    y = np.asarray(truth, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"scores and truth must be 1-D of equal length, got {x.shape} and {y.shape}")
    if len(x) < 3:
        raise ValueError(f"need at least 3 architectures to correlate, got {len(x)}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("scores and truth must be finite")
    return {
        "kendall": float(stats.kendalltau(x, y).statistic),
        "spearman": float(stats.spearmanr(x, y).statistic),
        "pearson": float(stats.pearsonr(x, y).statistic),
        "n": int(len(x)),
    }


def load_ground_truth(
    path: str | os.PathLike, metric: str | None = None
) -> tuple[list[list[list[int]]], list[float], str]:
    """``(encodings, values, metric)``; ``metric`` defaults to the only numeric field besides the encoding."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground truth not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    archs = data.get("architectures") if isinstance(data, dict) else None
    if not isinstance(archs, list) or not archs:
        raise ValueError(f"{path}: expected {{'architectures': [{{'encoding': ..., '<metric>': value}}, ...]}}")
    if metric is None:
        fields = {k for a in archs for k, v in a.items() if k != "encoding" and isinstance(v, (int, float))}
        if len(fields) != 1:
            raise ValueError(f"{path}: pass --metric, the ground truth has metrics {sorted(fields)}")
        metric = fields.pop()
    encodings, values = [], []
    for i, a in enumerate(archs):
        if "encoding" not in a or metric not in a:
            raise ValueError(f"{path}: architecture {i} lacks 'encoding' or {metric!r}")
        v = a[metric]
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{path}: architecture {i} has a non-finite {metric!r}: {v!r}")
        encodings.append([[int(j) for j in block] for block in a["encoding"]])
        values.append(float(v))
    return encodings, values, metric


def architecture_keys(table: RatingTable, encoding: Sequence[Sequence[int]]) -> list[str]:
    """Rating-table keys of an architecture's blocks (multi-cell blocks detected by their ``c`` keys)."""
    keys = []
    for ratings, cand in zip(table.block_ratings, encoding):
        multi = next(iter(ratings)).startswith("c")
        keys.append(candidate_key(cand, multi))
    return keys


def check_compatible(
    table: RatingTable | ArchitectureRatings,
    encodings: Sequence[Sequence[Sequence[int]]],
    sources: tuple[str, str] = ("the rating table", "the ground truth"),
) -> None:
    """Raise a one-line ``ValueError`` unless every encoding has the table's block count and is rated (block table:
    each block's candidate key; rows: the whole architecture); ``sources`` name the two sides in the message."""
    ratings, truth = sources
    counts = sorted({len(e) for e in encodings})
    if counts != [table.num_blocks]:
        raise ValueError(f"block counts differ: {ratings} rates {table.num_blocks}-block architectures, {truth} holds "
                         f"{' and '.join(map(str, counts))}-block ones")
    if isinstance(table, ArchitectureRatings):
        missing = [[list(b) for b in e] for e in encodings if not table.is_rated(e)]
        if missing:
            raise ValueError(f"{truth}: {len(missing)} of its {len(encodings)} architectures are not rated in "
                             f"{ratings} ({len(table.rows)} rows), e.g. {missing[0]}")
        return
    unknown: dict[int, list[str]] = {}  # block -> keys the table does not rate, in order of appearance
    for e in encodings:
        for k, key in enumerate(architecture_keys(table, e)):
            if key not in table.block_ratings[k] and key not in unknown.get(k, []):
                unknown.setdefault(k, []).append(key)
    if unknown:
        named = "; ".join(f"block {k}: {_listed(keys)}" for k, keys in sorted(unknown.items()))
        raise ValueError(f"{truth} uses candidate keys that {ratings} does not rate: {named}")


def _listed(keys: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(map(repr, keys[:limit])) + more


def architecture_scores(
    table: RatingTable | ArchitectureRatings, encodings: Sequence[Sequence[Sequence[int]]]
) -> list[float]:
    """The table's score of each encoding: sum of block ratings (block table) or the row's score (rows)."""
    if isinstance(table, ArchitectureRatings):
        return [table.score(e) for e in encodings]
    return [table.score(architecture_keys(table, e)) for e in encodings]


def evaluate(
    table: RatingTable | ArchitectureRatings,
    encodings: Sequence[Sequence[Sequence[int]]],
    values: Sequence[float],
    sources: tuple[str, str] = ("the rating table", "the ground truth"),
) -> dict[str, Any]:
    """Correlations between the table's architecture scores and ``values`` (block table or whole-architecture rows),
    after :func:`check_compatible`."""
    check_compatible(table, encodings, sources)
    scores = architecture_scores(table, encodings)
    out: dict[str, Any] = correlations(scores, values)
    out["metric"] = table.metric
    out["lower_is_better"] = table.lower_is_better
    return out


@dataclass
class RankingConfig:
    """``python -m nas.search.ranking``'s options (fields = flags)."""

    ratings: str  # rating table JSON (block ratings or whole-architecture rows)
    ground_truth: str  # ground truth JSON
    metric: str | None = None  # ground-truth field (default: the only numeric one)
    json: bool = False  # print JSON instead of text


def main(argv: list[str] | None = None) -> int:
    """The CLI; a user error prints one ``error: ...`` line and returns 2."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, _ = parse_cli(
        RankingConfig, argv, prog="python -m nas.search.ranking", description=__doc__.split("\n")[0], packages=("nas",)
    )
    table = load_any_ratings(args.ratings)
    encodings, values, metric = load_ground_truth(args.ground_truth, args.metric)
    result = evaluate(table, encodings, values, (args.ratings, args.ground_truth))
    result["ground_truth_metric"] = metric
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['n']} architectures vs {metric}: Kendall {result['kendall']:+.4f}  "
            f"Spearman {result['spearman']:+.4f}  Pearson {result['pearson']:+.4f}"
            + ("  (scores are losses: negative = agreement)" if table.lower_is_better else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
