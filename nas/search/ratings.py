"""Rating tables: THE interchange format between raters (DNA, BossNAS, ...) and searches.

JSON layout::

    {"block_ratings": [{"<candidate key>": score, ...}, ...],   # one dict per block
     "block_costs": [{"<candidate key>": {"params": n, "flops": n}, ...}, ...],  # optional
     "metric": "relative_l1", "lower_is_better": true, ...}      # extra fields kept in `meta`

Keys follow :mod:`nas.spaces` (``"0110"``). ``metric`` defaults to ``"loss"`` and
``lower_is_better`` to true, so the released BossNAS file loads as is.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RatingTable", "RatingTableError", "load_ratings", "save_ratings"]


class RatingTableError(ValueError):
    """A rating table that cannot be used, with the reason (and the file, when there is one)."""


@dataclass
class RatingTable:
    block_ratings: list[dict[str, float]]
    block_costs: list[dict[str, dict[str, float]]] | None = None
    metric: str = "loss"
    lower_is_better: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_blocks(self) -> int:
        return len(self.block_ratings)

    def validate(self, source: str = "rating table") -> None:
        """Raise :class:`RatingTableError` naming the first problem found."""
        if not isinstance(self.block_ratings, list) or not self.block_ratings:
            raise RatingTableError(f"{source}: 'block_ratings' must be a non-empty list of per-block dicts")
        for k, ratings in enumerate(self.block_ratings):
            if not isinstance(ratings, dict) or not ratings:
                raise RatingTableError(f"{source}: block {k} ratings must be a non-empty dict key -> score")
            for key, v in ratings.items():
                if not isinstance(key, str):
                    raise RatingTableError(f"{source}: block {k} has a non-string key {key!r}")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise RatingTableError(f"{source}: block {k} candidate {key!r} has a non-finite score {v!r}")
        if self.block_costs is not None:
            if not isinstance(self.block_costs, list) or len(self.block_costs) != len(self.block_ratings):
                n = len(self.block_costs) if isinstance(self.block_costs, list) else "no list of"
                raise RatingTableError(
                    f"{source}: 'block_costs' has {n} blocks but 'block_ratings' has {len(self.block_ratings)}"
                )
            for k, (ratings, costs) in enumerate(zip(self.block_ratings, self.block_costs)):
                missing = set(ratings) - set(costs)
                if missing:
                    raise RatingTableError(
                        f"{source}: block {k} has no cost for {len(missing)} rated candidate(s), "
                        f"e.g. {sorted(missing)[0]!r}"
                    )
                for key, c in costs.items():
                    if not isinstance(c, dict):
                        raise RatingTableError(
                            f"{source}: block {k} cost of {key!r} must be a dict like {{'params': n}}"
                        )
                    for name, v in c.items():
                        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                            raise RatingTableError(
                                f"{source}: block {k} candidate {key!r} has an invalid {name} cost {v!r} "
                                "(need finite >= 0)"
                            )

    def costs(self, cost: str) -> list[dict[str, float]]:
        """Per block ``{key: cost}`` for the cost named ``cost`` ("params" / "flops")."""
        if self.block_costs is None:
            raise RatingTableError("the rating table has no 'block_costs'; a constrained search needs them")
        out = []
        for k, table in enumerate(self.block_costs):
            try:
                out.append({key: float(table[key][cost]) for key in self.block_ratings[k]})
            except KeyError:
                known = sorted(next(iter(table.values())).keys()) if table else []
                raise RatingTableError(f"cost {cost!r} is missing in block {k}; available: {known}") from None
        return out

    def score(self, keys: Sequence[str]) -> float:
        """Architecture score = sum of its blocks' scores."""
        if len(keys) != self.num_blocks:
            raise RatingTableError(f"{len(keys)} block keys for a {self.num_blocks}-block rating table")
        total = 0.0
        for k, key in enumerate(keys):
            try:
                total += self.block_ratings[k][key]
            except KeyError:
                raise RatingTableError(f"candidate {key!r} is not rated in block {k}") from None
        return total

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"block_ratings": self.block_ratings}
        if self.block_costs is not None:
            out["block_costs"] = self.block_costs
        out.update(metric=self.metric, lower_is_better=self.lower_is_better, **self.meta)
        return out

    @classmethod
    def from_json(cls, data: Any, source: str = "rating table") -> RatingTable:
        if not isinstance(data, dict) or "block_ratings" not in data:
            raise RatingTableError(f"{source}: expected a JSON object with a 'block_ratings' list")
        data = dict(data)
        lower = data.pop("lower_is_better", True)
        if not isinstance(lower, bool):
            raise RatingTableError(f"{source}: 'lower_is_better' must be true or false, got {lower!r}")
        table = cls.__new__(cls)
        table.block_ratings = data.pop("block_ratings")
        table.block_costs = data.pop("block_costs", None)
        table.metric = str(data.pop("metric", "loss"))
        table.lower_is_better = lower
        table.meta = data
        table.validate(source)
        return table


def load_ratings(path: str | os.PathLike) -> RatingTable:
    """Read and validate a rating table JSON file (clear errors naming the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rating table not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RatingTableError(f"{path}: not valid JSON ({exc})") from None
    return RatingTable.from_json(data, source=str(path))


def save_ratings(table: RatingTable, path: str | os.PathLike) -> Path:
    table.validate()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1))
    tmp.replace(path)
    return path
