"""Cross-validated stand-alone ground truth of FFN expressions (one expression shared by all layers).

Each expression is trained from scratch (cross-entropy, no teacher) with every seed on every fold of a stratified
``folds``-fold partition; a seed's accuracy pools the correct answers over all folds (every example tested once).
File format (the one of :mod:`nas.search.groundtruth`, encodings replaced by expressions)::

    {"task": ..., "seeds": [...], "folds": k, "epochs": n, "d": .., "width": .., ["data": generator settings,]
     "architectures": [{"expr": "...", "accuracy": mean, "accuracies": [per seed], "ffn_params": n}, ...]}
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nas.cache import check_cached, write_json
from nas.ffn.distill import TASKS, Task, accuracy, build_model, load_task, train
from nas.ffn.expressions import STANDARD_FFN, expression_hash, ffn_params, sample_expression
from nas.ffn.transformer import FFNArch
from stflow.pool import run_tasks

__all__ = ["sample_distinct", "standalone_accuracy", "fit_and_test", "build_expr_ground_truth", "expr_seed_ceiling"]


def sample_distinct(n: int, seed: int = 0, layers: int = 1, include_standard: bool = True,
                    min_height: int = 3, max_height: int = 6) -> list[str]:
    """``n`` expressions, functionally distinct (:func:`expression_hash`), the standard FFN first."""
    rng = random.Random(seed)
    out = [STANDARD_FFN] if include_standard else []
    seen = {expression_hash(e) for e in out}
    while len(out) < n:
        e = str(sample_expression([STANDARD_FFN], rng, min_height, max_height))
        h = expression_hash(e)
        if h not in seen:
            seen.add(h)
            out.append(e)
    return out


def standalone_accuracy(task: str, arch: FFNArch, seed: int, fold: int | None, folds: int, epochs: float,
                        d: int = 32, heads: int = 2, lr: float = 3e-3, val_fraction: float = 0.2) -> tuple[int, int]:
    """(correct, tested) of ``arch`` trained from scratch with ``seed`` on fold ``fold`` (None: the fixed split);
    the validation part (``val_fraction``) is not used."""
    t, splits = load_task(task, fold=fold, num_folds=folds, val_fraction=val_fraction)
    return fit_and_test(t, arch, splits["train"], splits["test"], seed, epochs, d, heads, lr)


def fit_and_test(task: Task, arch: FFNArch, fit: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], seed: int,
                 epochs: float, d: int = 32, heads: int = 2, lr: float = 3e-3,
                 batch_size: int = 64) -> tuple[int, int]:
    """(correct, tested): ``arch`` built with ``seed``, trained from scratch on ``fit`` (cross-entropy), tested on
    ``test``."""
    torch.manual_seed(seed)
    model = build_model(task, d, heads, len(arch.exprs), max(arch.widths), max(arch.stacks))
    train(model, arch, fit, epochs, lr=lr, batch_size=batch_size, seed=seed)
    n = len(test[1])
    return round(accuracy(model, arch, test) * n), n


def _job(task: str, expr: str, layers: int, width: int, seed: int, fold: int | None, folds: int, epochs: float,
         d: int, val_fraction: float) -> tuple[int, int]:
    return standalone_accuracy(task, FFNArch.uniform(expr, layers, width), seed, fold, folds, epochs, d,
                               val_fraction=val_fraction)


def build_expr_ground_truth(
    task: str,
    path: str | Path,
    exprs: Sequence[str],
    seeds: Sequence[int] = (0, 1, 2),
    folds: int = 3,
    epochs: float = 15,
    d: int = 32,
    width: int = 128,
    layers: int = 2,
    workers: int = 1,
    progress: bool = True,
    val_fraction: float = 0.2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Mean cross-validated stand-alone accuracy of every expression over ``seeds`` (cached in ``path``: a file
    with the same settings is returned as is; one with other settings is a ``ValueError`` naming them, unless
    ``overwrite``, then it is rebuilt)."""
    path = Path(path)
    header = {"task": task, "seeds": list(seeds), "folds": folds, "epochs": float(epochs), "d": d, "width": width,
              "layers": layers}
    if val_fraction != 0.2:  # files made before val_fraction existed have 0.2 and no key
        header["val_fraction"] = val_fraction
    data_settings = TASKS[task].data if task in TASKS else None
    if data_settings:  # a procedural task: a truth made on other generated data is not reused
        header["data"] = data_settings
    if path.is_file():
        data = json.loads(path.read_text())
        stored = {**{k: data.get(k) for k in header}, "val_fraction": data.get("val_fraction", 0.2),
                  "exprs": [a.get("expr") for a in data.get("architectures", [])]}
        current = {**header, "val_fraction": val_fraction, "exprs": list(exprs)}
        hint = "pass overwrite=True to rebuild it, or another path"
        if check_cached(path, current, stored, "ground truth", overwrite=overwrite, hint=hint):
            return data
    fold_ids: list[int | None] = list(range(folds)) if folds > 1 else [None]
    jobs = [(e, s, f) for e in exprs for s in seeds for f in fold_ids]
    tasks = [(task, e, layers, width, s, f, folds, epochs, d, val_fraction) for e, s, f in jobs]
    outcomes = run_tasks(_job, tasks, workers, 1, f"ground truth {task}", progress)
    res = dict(zip(jobs, outcomes))
    entries = []
    for e in exprs:
        accs = []
        for s in seeds:
            c = sum(res[(e, s, f)][0] for f in fold_ids)
            n = sum(res[(e, s, f)][1] for f in fold_ids)
            accs.append(c / n)
        entries.append({"expr": e, "accuracy": float(np.mean(accs)), "accuracies": accs,
                        "ffn_params": FFNArch.uniform(e, layers, width).ffn_params(d),
                        "expr_params": ffn_params(e, d, width)})
    data = {**header, "architectures": entries}
    write_json(path, data)
    return data


def expr_seed_ceiling(data: dict[str, Any]) -> float:
    """Mean pairwise Kendall tau between the per-seed accuracies."""
    from scipy import stats

    per_seed = np.array([a["accuracies"] for a in data["architectures"]]).T  # (seeds, exprs)
    taus = [stats.kendalltau(per_seed[i], per_seed[j]).statistic
            for i in range(len(per_seed)) for j in range(i + 1, len(per_seed))]
    return float(np.mean(taus))
