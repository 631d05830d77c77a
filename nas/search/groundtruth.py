"""Stand-alone ground truth for rank-correlation benchmarks: sample architectures, train each
from scratch with several seeds (through the shared runner), and store mean accuracies.

File format (shared with the BossNAS benchmark and ``python -m nas.search.ranking``)::

    {"architectures": [{"encoding": [[...], ...], "accuracy": mean, "accuracies": [per seed],
                        "params": n}, ...], "space": name, "seeds": [...], "epochs": n, "folds": k}
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from nas.cache import check_cached, write_json
from nas.costs import count_params
from nas.data import DigitsDataModule
from nas.export import build_network
from nas.ops import NormFactory, seeded_init
from nas.spaces import Candidate, SearchSpace
from nas.spaces.hytra import HyTraSpace, build_hytra_network
from nas.systems import ClassifierSystem
from stflow.pool import run_tasks
from stflow.runner import RunConfig, fit

__all__ = ["sample_architectures", "train_standalone", "build_ground_truth", "seed_ceiling", "build_any",
           "cross_validated_accuracy"]


def build_any(
    space: SearchSpace | HyTraSpace, encoding: Sequence[Sequence[int]], num_classes: int,
    norm_layer: NormFactory = nn.BatchNorm2d,
) -> nn.Module:
    """Stand-alone network of an MBConv-style space (``nas.export.build_network``) or a HyTra space."""
    if isinstance(space, HyTraSpace):
        return build_hytra_network(space, encoding, num_classes, norm_layer)
    return build_network(space, encoding, num_classes, norm_layer)


def sample_architectures(space: SearchSpace, n: int, seed: int = 0) -> list[tuple[Candidate, ...]]:
    """``n`` distinct architectures drawn uniformly (fixed ``seed``); a HyTra space (blocks not
    independent) samples uniformly among its legal whole-network encodings."""
    total = space.num_architectures()
    if n > total:
        raise ValueError(f"cannot sample {n} distinct architectures from a space of {total}")
    rng = random.Random(seed)
    if isinstance(space, HyTraSpace):
        return rng.sample(list(space.enumerate_architectures()), n)
    per_block = [list(b.enumerate()) for b in space.blocks]
    seen: set[tuple[Candidate, ...]] = set()
    out: list[tuple[Candidate, ...]] = []
    while len(out) < n:
        arch = tuple(rng.choice(cands) for cands in per_block)
        if arch not in seen:
            seen.add(arch)
            out.append(arch)
    return out


def train_standalone(
    space: SearchSpace,
    encoding: Sequence[Sequence[int]],
    seed: int,
    epochs: int = 15,
    lr: float = 3e-3,
    batch_size: int = 64,
    data_seed: int = 0,
    norm_layer: NormFactory = nn.BatchNorm2d,
    datamodule: DigitsDataModule | None = None,
) -> float:
    """Test accuracy of the architecture trained from scratch with ``seed`` (last epoch, no checkpoints)."""
    dm = datamodule or DigitsDataModule(batch_size=batch_size, seed=data_seed)
    with seeded_init(seed):  # the initialization depends on the seed only, not on earlier runs
        model = build_any(space, encoding, DigitsDataModule.num_classes, norm_layer)
    system = ClassifierSystem(model, lr=lr, max_epochs=epochs)
    with tempfile.TemporaryDirectory(prefix="nas-gt-") as tmp:
        cfg = RunConfig(
            out_dir=tmp, max_epochs=epochs, seed=seed, checkpoint=False, loggers=(), progress_bar=False,
            limit_val_batches=0,
        )
        result = fit(system, dm, cfg)
    return float(result.test_metrics["test_acc"])


def _fold_job(space: SearchSpace, arch: tuple[Candidate, ...], seed: int, epochs: int, fold: int | None,
              num_folds: int) -> tuple[float, int]:
    """(accuracy, test images) of one stand-alone run; module-level so worker processes can run it."""
    dm = DigitsDataModule(fold=fold, num_folds=num_folds)
    dm.setup()
    assert dm.splits is not None
    return train_standalone(space, arch, seed, epochs, datamodule=dm), len(dm.splits["test"][1])


def build_ground_truth(
    space: SearchSpace,
    path: str | os.PathLike,
    num_archs: int = 30,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 15,
    sample_seed: int = 0,
    folds: int = 1,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Mean stand-alone accuracies of ``num_archs`` sampled architectures over ``seeds``, cached in
    ``path``: seeds already in a file of the same space, archs, epochs and folds are reused, new
    seeds are trained and added (the file keeps every seed it ever held; the result has ``seeds``).
    A file made with other settings is a ``ValueError`` naming them, unless ``overwrite`` (then it is
    rebuilt): an earlier ground truth is never replaced silently.

    ``folds > 1``: each seed's accuracy is cross-validated: the architecture is trained ``folds``
    times, each time tested on one stratified fold, and the correct answers are pooled over all
    1,797 images. That cuts the test-set noise of a single 360-image split ~``folds``-fold, which
    is what makes small capacity differences measurable on digits. ``workers`` processes train
    runs in parallel (one thread each).
    """
    path = Path(path)
    archs = sample_architectures(space, num_archs, sample_seed)
    header = {"space": space.name, "epochs": epochs, "sample_seed": sample_seed, "folds": folds}
    done = _finished_seeds(path, header, archs, overwrite)  # {seed: accuracy per architecture}
    fold_ids: list[int | None] = list(range(folds)) if folds > 1 else [None]
    jobs = [(a, s, f) for a in range(len(archs)) for s in seeds if s not in done for f in fold_ids]
    if jobs:
        tasks = [(space, archs[a], s, epochs, f, folds) for a, s, f in jobs]
        threads = 1 if workers > 1 else None  # one thread per worker; the main process keeps its own count
        outcomes = run_tasks(_fold_job, tasks, workers, threads, "ground truth (stand-alone runs)", progress)
        results: dict[tuple[int, int, int | None], tuple[float, int]] = dict(zip(jobs, outcomes))
        for s in dict.fromkeys(s for _, s, _ in jobs):
            done[s] = []
            for a in range(len(archs)):
                runs = [results[(a, s, f)] for f in fold_ids]
                done[s].append(sum(acc * n for acc, n in runs) / sum(n for _, n in runs))  # pooled over folds
        write_json(path, _ground_truth_data(space, archs, header, done, list(done)))
    return _ground_truth_data(space, archs, header, done, list(seeds))


def cross_validated_accuracy(
    space: SearchSpace | HyTraSpace,
    archs: Sequence[Sequence[Sequence[int]]],
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 10,
    folds: int = 5,
    workers: int = 1,
    progress: bool = False,
) -> list[list[float]]:
    """Per architecture, per seed: the ``folds``-fold cross-validated stand-alone accuracy (correct answers
    pooled over all folds), trained exactly as :func:`build_ground_truth` trains (same folds, epochs, seeds),
    so the numbers sit on the ground truth's scale (e.g. a searched net beside the ground truth)."""
    archs = [tuple(tuple(c) for c in a) for a in archs]
    fold_ids: list[int | None] = list(range(folds)) if folds > 1 else [None]
    jobs = [(a, s, f) for a in range(len(archs)) for s in seeds for f in fold_ids]
    tasks = [(space, archs[a], s, epochs, f, folds) for a, s, f in jobs]
    outcomes = run_tasks(_fold_job, tasks, workers, 1 if workers > 1 else None, "cross-validation", progress)
    results = dict(zip(jobs, outcomes))
    return [
        [sum(results[(a, s, f)][0] * results[(a, s, f)][1] for f in fold_ids)
         / sum(results[(a, s, f)][1] for f in fold_ids) for s in seeds]
        for a in range(len(archs))
    ]


def _ground_truth_data(space: SearchSpace, archs: Sequence[tuple[Candidate, ...]], header: dict[str, Any],
                       done: dict[int, list[float]], seeds: list[int]) -> dict[str, Any]:
    """The file format (module docstring) for ``seeds``, from per-seed accuracies."""
    entries = []
    for a, arch in enumerate(archs):
        accs = [done[s][a] for s in seeds]
        params = count_params(build_any(space, arch, DigitsDataModule.num_classes))
        entries.append(
            {
                "encoding": [list(b) for b in arch],
                "accuracy": float(np.mean(accs)),
                "accuracies": accs,
                "params": params,
            }
        )
    return {
        "space": header["space"],
        "seeds": seeds,
        **{k: v for k, v in header.items() if k != "space"},
        "architectures": entries,
    }


def _finished_seeds(
    path: Path, header: dict[str, Any], archs: Sequence[tuple[Candidate, ...]], overwrite: bool
) -> dict[int, list[float]]:
    """``{seed: accuracy per architecture}`` from an earlier file with the same settings (header and sampled
    architectures; :func:`nas.cache.check_cached`), empty when there is none or (``overwrite``) it differs."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    entries = data.get("architectures", [])
    stored = {**{k: data.get(k, 1 if k == "folds" else None) for k in header},
              "architectures": [e.get("encoding") for e in entries]}
    current = {**header, "architectures": [[list(b) for b in a] for a in archs]}
    hint = "pass overwrite=True to rebuild it, or another path"
    if not check_cached(path, current, stored, "ground truth", overwrite=overwrite, hint=hint):
        return {}
    return {int(s): [e["accuracies"][i] for e in entries] for i, s in enumerate(data.get("seeds", []))}


def seed_ceiling(data: dict[str, Any]) -> float:
    """Mean pairwise Kendall tau between the per-seed accuracies (how reproducible the truth is)."""
    from scipy import stats

    per_seed = np.array([a["accuracies"] for a in data["architectures"]]).T  # (seeds, archs)
    taus = [
        stats.kendalltau(per_seed[i], per_seed[j]).statistic
        for i in range(len(per_seed))
        for j in range(i + 1, len(per_seed))
    ]
    return float(np.mean(taus))
