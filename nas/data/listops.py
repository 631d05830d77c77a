"""ListOps (Nangia & Bowman 2018; the Long Range Arena task), generated procedurally at small depth and length.

An example is a nested list of operations over single digits, e.g. ``[MAX 2 [MIN 4 7 ] 0 ]`` -> 4; the
operations are ``MAX``, ``MIN``, ``MED`` (the median, rounded down as ``int(np.median)``) and ``SM`` (sum modulo
10); the label is the value of the whole expression (10 classes). Token ids: 0 pad, 1..10 the digits 0..9,
11..14 ``[MAX [MIN [MED [SM``, 15 ``]``. Everything is fixed by the generator seed; no download.

The default size (:data:`LISTOPS_SIZE`: 4000 examples, nesting depth <= 2, 2-3 arguments, <= 16 tokens) is one a
2-layer d=32 transformer learns to ~50 % in seconds (chance 10 %), with 2-3 points between FFN expressions against
~1 point between seeds. At depth 3, 2-4 arguments, 24 tokens and 2000 examples every expression stayed at 32-35 %
(the label's prior and little more), so FFN expressions could not be ranked on it.
"""

from __future__ import annotations

import random
from functools import lru_cache

import numpy as np
import torch

__all__ = ["OPS", "generate_listops", "evaluate_listops", "tokenize", "load_listops_split", "LISTOPS_META",
           "LISTOPS_SIZE"]

OPS = ("MAX", "MIN", "MED", "SM")
VOCAB = ("<pad>", *(str(i) for i in range(10)), *(f"[{o}" for o in OPS), "]")
LISTOPS_SIZE = {"n": 4000, "max_depth": 2, "max_args": 3, "max_len": 16, "leaf_prob": 0.6}  # the packaged task
LISTOPS_META = {"input_dim": None, "vocab_size": len(VOCAB), "max_len": LISTOPS_SIZE["max_len"], "num_classes": 10}

Tree = int | tuple  # a digit, or (op, [children])


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, leaf_prob: float) -> Tree:
    if depth > 0 and (depth >= max_depth or rng.random() < leaf_prob):
        return rng.randrange(10)
    return (rng.choice(OPS), [_tree(rng, depth + 1, max_depth, max_args, leaf_prob)
                              for _ in range(rng.randint(2, max_args))])


def evaluate_listops(tree: Tree) -> int:
    if isinstance(tree, int):
        return tree
    op, children = tree
    vals = [evaluate_listops(c) for c in children]
    if op == "MAX":
        return max(vals)
    if op == "MIN":
        return min(vals)
    if op == "MED":
        return int(np.median(vals))
    return sum(vals) % 10


def tokenize(tree: Tree) -> list[str]:
    if isinstance(tree, int):
        return [str(tree)]
    op, children = tree
    return [f"[{op}", *(t for c in children for t in tokenize(c)), "]"]


def generate_listops(
    n: int, seed: int = 0, max_depth: int = LISTOPS_SIZE["max_depth"], max_args: int = LISTOPS_SIZE["max_args"],
    max_len: int = LISTOPS_SIZE["max_len"], leaf_prob: float = LISTOPS_SIZE["leaf_prob"],
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct examples of at most ``max_len`` tokens: ids (n, max_len) int64 (0-padded), labels (n,)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    xs, ys = [], []
    while len(xs) < n:
        tree = _tree(rng, 0, max_depth, max_args, leaf_prob)
        toks = tokenize(tree)
        key = " ".join(toks)
        if len(toks) > max_len or key in seen:
            continue
        seen.add(key)
        xs.append([VOCAB.index(t) for t in toks] + [0] * (max_len - len(toks)))
        ys.append(evaluate_listops(tree))
    return np.asarray(xs, dtype=np.int64), np.asarray(ys, dtype=np.int64)


@lru_cache(maxsize=4)
def _dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    return generate_listops(n, seed)


def load_listops_split(
    seed: int = 0, fold: int | None = None, num_folds: int = 5, val_fraction: float = 0.2, n: int = LISTOPS_SIZE["n"],
    data_seed: int = 0,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stratified train/val/test of ``n`` generated examples (60/20/20, or test = ``fold`` of ``num_folds``)."""
    from sklearn.model_selection import StratifiedKFold, train_test_split

    x, y = _dataset(n, data_seed)
    idx = np.arange(len(y))
    if fold is None:
        rest, test = train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
        vf = val_fraction / 0.8
    else:
        rest, test = list(StratifiedKFold(num_folds, shuffle=True, random_state=seed).split(idx, y))[fold]
        vf = val_fraction / (1 - 1 / num_folds)
    train, val = train_test_split(rest, test_size=vf, stratify=y[rest], random_state=seed)
    return {k: (torch.from_numpy(x[i]), torch.from_numpy(y[i])) for k, i in
            {"train": train, "val": val, "test": test}.items()}
