"""Rating tables: THE interchange format between raters (DNA, BossNAS, ...) and searches.

JSON layout::

    {"block_ratings": [{"<candidate key>": score, ...}, ...],   # one dict per block
     "block_costs": [{"<candidate key>": {"params": n, "flops": n}, ...}, ...],  # optional
     "metric": "relative_l1", "lower_is_better": true, ...}      # extra fields kept in `meta`

Keys follow :mod:`nas.spaces` (``"0110"``). ``metric`` defaults to ``"loss"`` and
``lower_is_better`` to true, so the released BossNAS file loads as is.

Whole-architecture raters (Pi-NAS: a score per network, not a sum of block scores) write rows instead::

    {"architectures": [{"encoding": [[ops of block 0], ...], "score": s,
                        "params": n, "flops": n, ...}, ...],            # costs optional, extra fields kept
     "metric": "probe_accuracy", "lower_is_better": false, ...}

(:class:`ArchitectureRatings`; the same layout as a ground-truth file, with ``score`` as the metric).
:func:`load_any_ratings` reads either kind; :func:`load_ratings` only block tables.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas.cache import write_json

__all__ = [
    "RatingTable",
    "ArchitectureRatings",
    "RatingTableError",
    "load_ratings",
    "load_any_ratings",
    "save_ratings",
]


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


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


@dataclass
class ArchitectureRatings:
    """Scores of whole architectures: one row ``{"encoding": [[...], ...], "score": s, ...}`` per rated network.

    Extra row fields (``params``, ``flops``, ``accuracy``, ...) are kept; costs, where present, must be
    finite and >= 0. Encodings are unique. The rated rows may be a sample of the space."""

    rows: list[dict[str, Any]]
    metric: str = "score"
    lower_is_better: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str = "architecture ratings") -> None:
        if not isinstance(self.rows, list) or not self.rows:
            raise RatingTableError(f"{source}: 'architectures' must be a non-empty list of rows")
        seen: set[tuple[tuple[int, ...], ...]] = set()
        for i, row in enumerate(self.rows):
            if not isinstance(row, dict) or "encoding" not in row or "score" not in row:
                raise RatingTableError(f"{source}: row {i} needs 'encoding' and 'score'")
            enc = row["encoding"]
            if not isinstance(enc, list) or not enc or not all(
                isinstance(b, list) and all(isinstance(j, int) and not isinstance(j, bool) for j in b) for b in enc
            ):
                raise RatingTableError(f"{source}: row {i} encoding must be a list of lists of ints, got {enc!r}")
            if not _finite(row["score"]):
                raise RatingTableError(f"{source}: row {i} has a non-finite score {row['score']!r}")
            for name in ("params", "flops"):
                if name in row and (not _finite(row[name]) or row[name] < 0):
                    raise RatingTableError(f"{source}: row {i} has an invalid {name} cost {row[name]!r}")
            key = _encoding_key(enc)
            if key in seen:
                raise RatingTableError(f"{source}: encoding {enc} is rated twice")
            seen.add(key)
        if len({len(r["encoding"]) for r in self.rows}) != 1:
            raise RatingTableError(f"{source}: rows have different numbers of blocks")

    @property
    def num_blocks(self) -> int:
        return len(self.rows[0]["encoding"])

    def score(self, encoding: Sequence[Sequence[int]]) -> float:
        """The rated score of ``encoding`` (``RatingTableError`` when it was not rated)."""
        lookup = self._lookup()
        try:
            return float(lookup[_encoding_key(encoding)]["score"])
        except KeyError:
            raise RatingTableError(
                f"architecture {[list(b) for b in encoding]} is not rated ({len(self.rows)} rows)"
            ) from None

    def is_rated(self, encoding: Sequence[Sequence[int]]) -> bool:
        """Whether a row rates ``encoding``."""
        return _encoding_key(encoding) in self._lookup()

    def costs(self, cost: str) -> list[float]:
        """Cost ``cost`` of every row, in row order."""
        missing = [i for i, r in enumerate(self.rows) if cost not in r]
        if missing:
            raise RatingTableError(f"{len(missing)} row(s) have no {cost!r} cost (e.g. row {missing[0]})")
        return [float(r[cost]) for r in self.rows]

    def _lookup(self) -> dict[tuple[tuple[int, ...], ...], dict[str, Any]]:
        return {_encoding_key(r["encoding"]): r for r in self.rows}

    def to_json(self) -> dict[str, Any]:
        return {"architectures": self.rows, "metric": self.metric, "lower_is_better": self.lower_is_better,
                **self.meta}

    @classmethod
    def from_json(cls, data: Any, source: str = "architecture ratings") -> ArchitectureRatings:
        if not isinstance(data, dict) or "architectures" not in data:
            raise RatingTableError(f"{source}: expected a JSON object with an 'architectures' list")
        data = dict(data)
        lower = data.pop("lower_is_better", False)
        if not isinstance(lower, bool):
            raise RatingTableError(f"{source}: 'lower_is_better' must be true or false, got {lower!r}")
        out = cls.__new__(cls)
        out.rows = data.pop("architectures")
        out.metric = str(data.pop("metric", "score"))
        out.lower_is_better = lower
        out.meta = data
        out.validate(source)
        return out


def _encoding_key(encoding: Sequence[Sequence[int]]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(j) for j in b) for b in encoding)


def _read_json(path: str | os.PathLike) -> tuple[Path, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rating table not found: {path}")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RatingTableError(f"{path}: not valid JSON ({exc})") from None


def load_ratings(path: str | os.PathLike) -> RatingTable:
    """Read and validate a rating table JSON file (clear errors naming the file)."""
    path, data = _read_json(path)
    if isinstance(data, dict) and "architectures" in data and "block_ratings" not in data:
        raise RatingTableError(f"{path}: holds whole-architecture rows, not block ratings (use load_any_ratings)")
    return RatingTable.from_json(data, source=str(path))


def load_any_ratings(path: str | os.PathLike) -> RatingTable | ArchitectureRatings:
    """A block rating table or whole-architecture rows, whichever the file holds."""
    path, data = _read_json(path)
    if isinstance(data, dict) and "architectures" in data and "block_ratings" not in data:
        return ArchitectureRatings.from_json(data, source=str(path))
    return RatingTable.from_json(data, source=str(path))


def save_ratings(table: RatingTable | ArchitectureRatings, path: str | os.PathLike) -> Path:
    table.validate()
    path = Path(path)
    write_json(path, table.to_json())
    return path
