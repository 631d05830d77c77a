"""Stand-alone ground truth for rank-correlation benchmarks: sample architectures, train each
from scratch with several seeds (through the shared runner), and store mean accuracies.

File format (shared with the BossNAS benchmark and ``python -m nas.ranking``)::

    {"architectures": [{"encoding": [[...], ...], "accuracy": mean, "accuracies": [per seed],
                        "params": n}, ...], "space": name, "seeds": [...], "epochs": n}
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from stflow.runner import RunConfig, fit

from .costs import count_params
from .data import DigitsDataModule
from .export import build_network
from .ops import NormFactory, seeded_init
from .spaces import Candidate, SearchSpace
from .systems import ClassifierSystem

__all__ = ["sample_architectures", "train_standalone", "build_ground_truth", "seed_ceiling"]


def sample_architectures(space: SearchSpace, n: int, seed: int = 0) -> list[tuple[Candidate, ...]]:
    """``n`` distinct architectures drawn uniformly (fixed ``seed``)."""
    total = space.num_architectures()
    if n > total:
        raise ValueError(f"cannot sample {n} distinct architectures from a space of {total}")
    rng = random.Random(seed)
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
        model = build_network(space, encoding, DigitsDataModule.num_classes, norm_layer)
    system = ClassifierSystem(model, lr=lr, max_epochs=epochs)
    with tempfile.TemporaryDirectory(prefix="nas-gt-") as tmp:
        cfg = RunConfig(
            out_dir=tmp, max_epochs=epochs, seed=seed, checkpoint=False, loggers=(), progress_bar=False,
            limit_val_batches=0,
        )
        result = fit(system, dm, cfg)
    return float(result.test_metrics["test_acc"])


def build_ground_truth(
    space: SearchSpace,
    path: str | os.PathLike,
    num_archs: int = 30,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 15,
    sample_seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Load ``path`` if it matches (space, archs, seeds, epochs), else train and write it."""
    path = Path(path)
    archs = sample_architectures(space, num_archs, sample_seed)
    header = {"space": space.name, "seeds": list(seeds), "epochs": epochs, "sample_seed": sample_seed}
    if path.is_file():
        data = json.loads(path.read_text())
        if {k: data.get(k) for k in header} == header and [
            [list(b) for b in a] for a in archs
        ] == [a["encoding"] for a in data.get("architectures", [])]:
            return data
    dm = DigitsDataModule()
    entries = []
    for arch in tqdm(archs, desc="ground truth", disable=not progress):
        accs = [train_standalone(space, arch, s, epochs, datamodule=dm) for s in seeds]
        params = count_params(build_network(space, arch, DigitsDataModule.num_classes))
        entries.append(
            {"encoding": [list(b) for b in arch], "accuracy": float(np.mean(accs)), "accuracies": accs, "params": params}
        )
    data = {**header, "architectures": entries}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return data


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
