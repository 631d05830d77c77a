"""What BossNAS needs from a search space, for the core's MBConv spaces and for HyTra.

An adapter answers: build the (single-path, weight-sharing) supernet; list block ``k``'s legal
candidates after the searched prefix; name a candidate in rating tables; the widths a block can
output (projector inputs); a "fair" set of paths; a candidate's computed cost; the cheapest legal
architecture's cost (a budget is checked against it before any training); and an exact constrained
search over a rating table that respects the space's cross-block rules.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from torch import nn

from nas.costs import candidate_cost, count_flops, count_params
from nas.export import block_strings
from nas.ops import NormFactory
from nas.search.constrained import exact_search
from nas.search.ratings import RatingTable
from nas.spaces import Candidate, SearchSpace, candidate_key, parse_candidate_key
from nas.spaces.hytra import HyTraSpace, HyTraSupernet, build_path
from nas.supernet import Supernet

__all__ = ["SpaceAdapter", "MBConvAdapter", "HyTraAdapter", "fair_paths"]


class SpaceAdapter(Protocol):
    name: str
    num_blocks: int
    space: SearchSpace | HyTraSpace

    def build_supernet(self, norm_layer: NormFactory) -> nn.Module: ...  # has .stem and .blocks[k](x, cand)

    def candidates(self, k: int, prefix: Sequence[Candidate]) -> list[Candidate]: ...

    def key(self, k: int, candidate: Sequence[int]) -> str: ...

    def out_channels(self, k: int) -> list[int]: ...  # every width block k's output can have

    def fair_paths(self, k: int, prefix: Sequence[Candidate], rng: random.Random) -> list[Candidate]: ...

    def random_paths(self, k: int, prefix: Sequence[Candidate], n: int, rng: random.Random) -> list[Candidate]: ...

    def cost(
        self, k: int, prefix: Sequence[Candidate], candidate: Sequence[int], norm_layer: NormFactory
    ) -> dict[str, int]: ...

    def cheapest(self, cost: str, norm_layer: NormFactory) -> float: ...  # the cheapest legal architecture

    def search(self, table: RatingTable, budget: float | None, cost: str) -> dict[str, Any]: ...

    def describe(self, encoding: Sequence[Candidate]) -> list[list[str]]: ...


def fair_paths(choices_per_layer: Sequence[int], rng: random.Random) -> list[Candidate]:
    """``max(choices)`` paths in which every op of every layer appears (exactly once where a layer
    has the maximum number of choices; smaller layers repeat random ops to fill up)."""
    n = max(choices_per_layer)
    columns = []
    for m in choices_per_layer:
        perm = list(range(m))
        rng.shuffle(perm)
        perm += [rng.randrange(m) for _ in range(n - m)]
        columns.append(perm)
    return [tuple(col[i] for col in columns) for i in range(n)]


def _best_per_block(table: RatingTable) -> list[str]:
    pick = min if table.lower_is_better else max
    return [pick(r, key=r.__getitem__) for r in table.block_ratings]


class MBConvAdapter:
    """The core's :class:`nas.spaces.SearchSpace` (blocks independent: every candidate always legal)."""

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.name = space.name
        self.num_blocks = len(space.blocks)

    def build_supernet(self, norm_layer: NormFactory) -> nn.Module:
        return Supernet(self.space, norm_layer)

    def candidates(self, k: int, prefix: Sequence[Candidate]) -> list[Candidate]:
        return list(self.space.enumerate_block(k))

    def key(self, k: int, candidate: Sequence[int]) -> str:
        return self.space.blocks[k].key(candidate)

    def out_channels(self, k: int) -> list[int]:
        return [self.space.blocks[k].out_channels]

    def fair_paths(self, k: int, prefix: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        block = self.space.blocks[k]
        cell = rng.choices(range(len(block.cells)))[0]  # cells uniformly, whatever their number of paths
        paths = fair_paths([len(layer.ops) for layer in block.cells[cell].layers], rng)
        return [((cell,) if block.multi_cell else ()) + p for p in paths]

    def random_paths(self, k: int, prefix: Sequence[Candidate], n: int, rng: random.Random) -> list[Candidate]:
        """``n`` distinct random paths of one cell drawn uniformly (all of its paths if it has fewer)."""
        block = self.space.blocks[k]
        cell = rng.randrange(len(block.cells)) if block.multi_cell else 0
        cands = [c for c in self.space.enumerate_block(k) if block.split(c)[0] == cell]
        return rng.sample(cands, min(n, len(cands)))

    def cost(
        self, k: int, prefix: Sequence[Candidate], candidate: Sequence[int], norm_layer: NormFactory
    ) -> dict[str, int]:
        return candidate_cost(self.space, k, candidate, norm_layer)

    def cheapest(self, cost: str, norm_layer: NormFactory) -> float:
        """Sum over blocks of the cheapest candidate (blocks are independent)."""
        return float(sum(min(candidate_cost(self.space, k, c, norm_layer)[cost] for c in self.space.enumerate_block(k))
                         for k in range(self.num_blocks)))

    def search(self, table: RatingTable, budget: float | None, cost: str) -> dict[str, Any]:
        keys = [list(r) for r in table.block_ratings]
        if budget is None:
            chosen = _best_per_block(table)
        else:
            costs = table.costs(cost)
            sol = exact_search(
                [[table.block_ratings[k][key] for key in ks] for k, ks in enumerate(keys)],
                [[costs[k][key] for key in ks] for k, ks in enumerate(keys)],
                budget,
                table.lower_is_better,
            )
            if sol is None:
                raise ValueError(f"no architecture has {cost} < budget {budget:g}")
            chosen = [keys[k][j] for k, j in enumerate(sol[0])]
        encoding = [self.space.blocks[k].parse_key(key) for k, key in enumerate(chosen)]
        return {"keys": chosen, "encoding": [list(c) for c in encoding], "score": table.score(chosen)}

    def describe(self, encoding: Sequence[Candidate]) -> list[list[str]]:
        return block_strings(self.space, encoding)


class HyTraAdapter:
    """HyTra: a block's legal candidates depend on the level at which the prefix leaves off."""

    def __init__(self, space: HyTraSpace) -> None:
        self.space = space
        self.name = space.name
        self.num_blocks = len(space.blocks)

    def build_supernet(self, norm_layer: NormFactory) -> nn.Module:
        return HyTraSupernet(self.space, norm_layer)

    def candidates(self, k: int, prefix: Sequence[Candidate]) -> list[Candidate]:
        return self.space.legal_paths(k, self.space.entry_level(k, prefix))

    def key(self, k: int, candidate: Sequence[int]) -> str:
        return candidate_key(candidate)

    def out_channels(self, k: int) -> list[int]:
        return [self.space.widths[lv] for lv in self.space.blocks[k].levels]

    def random_paths(self, k: int, prefix: Sequence[Candidate], n: int, rng: random.Random) -> list[Candidate]:
        """``n`` distinct legal paths drawn uniformly (all of them if there are fewer)."""
        cands = self.candidates(k, prefix)
        return rng.sample(cands, min(n, len(cands)))

    def fair_paths(self, k: int, prefix: Sequence[Candidate], rng: random.Random) -> list[Candidate]:
        raise ValueError(
            "fair path sampling needs every op combination to be legal; HyTra restricts resolution "
            "changes, so use sampling: random"
        )

    def cost(
        self, k: int, prefix: Sequence[Candidate], candidate: Sequence[int], norm_layer: NormFactory
    ) -> dict[str, int]:
        return self._cost_at(k, candidate, self.space.entry_level(k, prefix), norm_layer)

    def cheapest(self, cost: str, norm_layer: NormFactory) -> float:
        """Dynamic program over the level at which each block is entered (a path's cost depends on it)."""
        best = {0: 0.0}  # entry level of block k -> cheapest cost of blocks 0..k-1 that leave off there
        for k in range(self.num_blocks):
            after: dict[int, float] = {}
            for entry, so_far in best.items():
                for c in self.space.legal_paths(k, entry):
                    level = self.space.ops[c[-1]].level
                    total = so_far + self._cost_at(k, c, entry, norm_layer)[cost]
                    after[level] = min(after.get(level, total), total)
            best = after
        return min(best.values())

    def _cost_at(self, k: int, candidate: Sequence[int], entry: int, norm_layer: NormFactory) -> dict[str, int]:
        module = build_path(self.space, k, candidate, entry, norm_layer)
        side = self.space.resolution(entry)
        return {
            "params": count_params(module),
            "flops": count_flops(module, (self.space.widths[entry], side, side)),
        }

    def search(self, table: RatingTable, budget: float | None, cost: str) -> dict[str, Any]:
        """Exact search over legal combinations: for every sequence of block exit levels, keep the
        candidates consistent with it and run the core's exact search; return the best."""
        sp = self.space
        cands = [{key: parse_candidate_key(key) for key in r} for r in table.block_ratings]
        costs = table.costs(cost) if budget is not None else None
        sign = 1.0 if table.lower_is_better else -1.0
        best: tuple[float, list[str]] | None = None
        for exits in itertools.product(range(sp.num_levels), repeat=self.num_blocks - 1):
            entries = (0,) + exits
            keys: list[list[str]] = []
            for k in range(self.num_blocks):
                ok = [
                    key
                    for key, c in cands[k].items()
                    if _legal(sp, k, c, entries[k]) and (k == self.num_blocks - 1 or sp.ops[c[-1]].level == exits[k])
                ]
                if not ok:
                    break
                keys.append(ok)
            else:
                scores = [[table.block_ratings[k][key] for key in ks] for k, ks in enumerate(keys)]
                if costs is None:
                    choice = [int(np.argmin(sign * np.asarray(s))) for s in scores]
                else:
                    sol = exact_search(
                        scores,
                        [[costs[k][key] for key in ks] for k, ks in enumerate(keys)],
                        budget,
                        table.lower_is_better,
                    )
                    if sol is None:
                        continue
                    choice = sol[0]
                chosen = [keys[k][j] for k, j in enumerate(choice)]
                total = sign * table.score(chosen)
                if best is None or total < best[0]:
                    best = (total, chosen)
        if best is None:
            raise ValueError(
                f"no legal architecture has {cost} < budget {budget:g}"
                if budget is not None
                else "the rating table holds no legal architecture"
            )
        chosen = best[1]
        return {
            "keys": chosen,
            "encoding": [list(cands[k][key]) for k, key in enumerate(chosen)],
            "score": table.score(chosen),
        }

    def describe(self, encoding: Sequence[Candidate]) -> list[list[str]]:
        return [self.space.path_names(c) for c in encoding]


def _legal(space: HyTraSpace, k: int, candidate: Sequence[int], entry: int) -> bool:
    try:
        space.check(k, candidate, entry)
    except ValueError:
        return False
    return True
