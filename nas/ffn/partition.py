"""EfficientBERT's search strategy: a learned partition of the search space (LaNAS style), and random search.

:class:`PartitionTree` is a binary tree of classifiers. At a node, the evaluated candidates (feature vectors
``x``, fitness ``y``) are labelled good (``y >= median``) or bad, a classifier is fitted to tell them apart, and
the two halves recurse until ``height`` levels. Sampling descends greedily from the root to the child with the
higher median fitness (the authors' "UCB" is ``value - threshold``, i.e. greedy; ``exploration > 0`` adds the
usual ``c * sqrt(2 ln n_parent / n_child)`` bonus), then draws candidates from the generator and keeps the first
unseen one that EVERY classifier on the path assigns to the chosen side (rejection sampling); after
``max_tries`` rejections it falls back to any unseen candidate, as the authors. The tree is refitted every
``retrain_interval`` evaluations, and grows one level each time the evaluation count passes a ``height_levels``
mark. Classifiers: scikit-learn's gradient boosting (the authors: LightGBM tuned by hyperopt).

:func:`run_search` drives either searcher for a fixed number of evaluations, so both get the same budget.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PartitionTree", "run_search", "SearchRecord", "SEARCHERS"]

SEARCHERS = ("partition", "random")

Proposal = tuple[Sequence[float], Any]  # (features, candidate)


def _classifier(seed: int) -> Any:
    from sklearn.ensemble import GradientBoostingClassifier

    return GradientBoostingClassifier(n_estimators=40, max_depth=2, learning_rate=0.2, random_state=seed)


class PartitionTree:
    """A node of the learned partition (the root is the whole tree)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, height: int, seed: int = 0, min_samples: int = 4) -> None:
        self.x, self.y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        self.n = len(self.y)
        self.value = float(np.median(self.y)) if self.n else -math.inf
        self.model: Any = None
        self.good: PartitionTree | None = None
        self.bad: PartitionTree | None = None
        labels = self.y >= self.value
        if height > 0 and self.n >= 2 * min_samples and 0 < labels.sum() < self.n:
            self.model = _classifier(seed).fit(self.x, labels)
            self.good = PartitionTree(self.x[labels], self.y[labels], height - 1, seed + 1, min_samples)
            self.bad = PartitionTree(self.x[~labels], self.y[~labels], height - 1, seed + 2, min_samples)

    @property
    def height(self) -> int:
        return 0 if self.model is None else 1 + max(self.good.height, self.bad.height)  # type: ignore[union-attr]

    def select_path(self, exploration: float = 0.0) -> list[tuple[PartitionTree, bool]]:
        """``[(node, side)]`` from the root to a leaf region; ``side`` True = the good half."""
        path, node = [], self
        while node.model is not None:
            assert node.good is not None and node.bad is not None

            def score(child: PartitionTree, parent: PartitionTree = node) -> float:
                bonus = exploration * math.sqrt(2 * math.log(max(parent.n, 1)) / max(child.n, 1))
                return child.value + bonus

            side = score(node.good) >= score(node.bad)
            path.append((node, side))
            node = node.good if side else node.bad
        return path

    @staticmethod
    def in_region(features: Sequence[float], path: Sequence[tuple[PartitionTree, bool]]) -> bool:
        """Whether every classifier on ``path`` puts ``features`` on the path's side."""
        f = np.asarray(features, dtype=float).reshape(1, -1)
        return all(bool(node.model.predict(f)[0]) == side for node, side in path)

    def sample(
        self,
        propose: Callable[[], Proposal],
        is_new: Callable[[Any], bool],
        exploration: float = 0.0,
        max_tries: int = 2000,
    ) -> tuple[Proposal, bool]:
        """(a proposal, whether it lies in the selected region): rejection sampling, then the fallback."""
        path = self.select_path(exploration)
        for _ in range(max_tries):
            feats, cand = propose()
            if is_new(cand) and self.in_region(feats, path):
                return (feats, cand), True
        for _ in range(max_tries):
            feats, cand = propose()
            if is_new(cand):
                return (feats, cand), False
        return propose(), False


@dataclass
class SearchRecord:
    """Every evaluation in order: candidate, fitness, features, whether it came from the selected region."""

    candidates: list[Any] = field(default_factory=list)
    fitness: list[float] = field(default_factory=list)
    features: list[list[float]] = field(default_factory=list)
    in_region: list[bool | None] = field(default_factory=list)

    def best(self) -> tuple[Any, float]:
        i = int(np.argmax(self.fitness))
        return self.candidates[i], self.fitness[i]


def run_search(
    propose: Callable[[random.Random], Proposal],
    evaluate: Callable[[Any], float],
    key: Callable[[Any], Hashable],
    n_evals: int,
    searcher: str = "partition",
    init: Sequence[Proposal] = (),
    n_init: int = 8,
    retrain_interval: int = 4,
    height_levels: Sequence[int] = (16, 32, 64),
    exploration: float = 0.0,
    seed: int = 0,
    record: SearchRecord | None = None,
    on_eval: Callable[[SearchRecord], None] | None = None,
) -> SearchRecord:
    """Evaluate ``n_evals`` distinct candidates (by ``key``): ``init`` first, random proposals until ``n_init``,
    then (``searcher="partition"``) proposals from the learned partition, refitted every ``retrain_interval``
    evaluations with height ``1 + #(height_levels <= evaluations)``; ``"random"``: random proposals throughout.
    ``record`` resumes a previous search (its candidates are not re-evaluated); ``on_eval`` is called after each
    evaluation (checkpointing)."""
    if searcher not in SEARCHERS:
        raise ValueError(f"searcher must be one of {SEARCHERS}, got {searcher!r}")
    rng = random.Random(seed)
    rec = record or SearchRecord()
    seen = {key(c) for c in rec.candidates}
    is_new = lambda c: key(c) not in seen  # noqa: E731
    init = list(init)
    tree: PartitionTree | None = None
    fitted_at = -1
    while len(rec.fitness) < n_evals:
        i = len(rec.fitness)
        region: bool | None = None
        if i < len(init):
            feats, cand = init[i]
        elif searcher == "random" or i < max(n_init, len(init)):
            for _ in range(10_000):
                feats, cand = propose(rng)
                if is_new(cand):
                    break
        else:
            if tree is None or i - fitted_at >= retrain_interval:
                height = 1 + int(np.searchsorted(np.asarray(height_levels), i, side="right"))
                tree = PartitionTree(np.asarray(rec.features), np.asarray(rec.fitness), height, seed + i)
                fitted_at = i
            (feats, cand), region = tree.sample(lambda: propose(rng), is_new, exploration)
        seen.add(key(cand))
        fit = float(evaluate(cand))
        rec.candidates.append(cand)
        rec.fitness.append(fit)
        rec.features.append([float(f) for f in feats])
        rec.in_region.append(region)
        if on_eval is not None:
            on_eval(rec)
    return rec
