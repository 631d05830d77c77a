"""DNA: block-wise supervised NAS by distilling a teacher's blocks (Li et al., CVPR 2020).

Pipeline (each stage resumable from ``out_dir``):

1. teacher: a fixed network of the space's macro shape, trained on the task (``teacher/``);
2. per block k, independently: a block supernet fed the teacher's block k-1 output learns the
   teacher's block k output (MSE, one random path per step) through the shared runner
   (``block_<k>/``, resumed from its ``last.ckpt``); then EVERY candidate is rated after
   recalibrating its normalization statistics (``block_<k>/ratings.json`` marks the block done);
3. rating table (``ratings.json``) with computed costs, exact constrained search;
4. the winner retrained stand-alone (``retrain/``, weights in ``retrain/model.pt``); ``architecture.json``
   and ``report.md``.

The DNA family, one config switch ``variant`` (``docs/nas.md``, "DNA family"):

- ``cells``: a space whose blocks offer several cells (layer counts / widths, e.g. ``space: digits-cells``);
  every multi-cell block trains ONE supernet per cell (``block_<k>/cell_<c>/``, each the full
  ``block_epochs``, as the authors do), and the ratings of all cells are pooled into the block's table
  (keys ``c<cell>_...``) for the exact search. Any multi-cell space trains this way; ``cells`` checks the
  space has cells (and picks the packaged ``dna_cells_digits`` config);
- ``plus`` (DNA+, progressive): ``generations`` searches in ``gen_<g>/``; generation g+1's teacher is
  generation g's searched net retrained stand-alone (``gen_<g>/retrain/model.pt``); ``generations.json``
  records every generation (searched net, accuracy) and finished generations are reused;
- ``selfsup`` (DNA++, :mod:`nas.methods.dna_selfsup`): no labelled teacher; each block learns its own EMA
  copy's output on another augmented view with an anti-collapse term; blocks train in order.

Cached artefacts (:mod:`nas.cache`): ``teacher/``, every ``block_<k>/`` and ``retrain/`` (DNA+: every ``gen_<g>/``)
carry a record of the config values that made them (``<artefact>.config.json``); a rerun reuses an artefact only
under the same values and otherwise refuses, naming the differing keys, unless ``overwrite`` (then it is
recomputed). So a retrained network is never replaced silently. ``ratings.json``, ``architecture.json`` and
``report.md`` describe the latest search and are rewritten by every run (with ``retrain: false`` the retrained
result of that same search is kept in ``architecture.json``). An absolute ``budget`` is checked against the
space's block costs before any training.

``python -m nas.search dna [--config dna_digits|FILE] [--out-dir DIR] [--norm bkn] [--blocks '[1]'] [--retrain false]``;
the method class :class:`DNA` implements :class:`nas.methods.base.SearchMethod`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from nas.cache import Artefact, is_current, record, write_json
from nas.costs import block_cost_table, count_flops, count_params
from nas.data import DigitsDataModule
from nas.data.views import ViewConfig
from nas.export import Network, block_strings, build_network
from nas.methods.base import SearchMethod, register
from nas.methods.dna_selfsup import FixedPath, SelfSupBlockSystem, rate_block_selfsup
from nas.metrics import RATING_METRICS, block_score, check_metric, target_scale
from nas.ops import make_norm, seeded_init
from nas.recalibration import recalibrate_norm_stats
from nas.search.constrained import check_budget, search_table
from nas.search.ratings import RatingTable, save_ratings
from nas.spaces import OpSpec, SearchSpace, op_from_dict, space_preset
from nas.supernet import BlockSupernet, make_stem
from nas.systems import ClassifierSystem
from stflow.runner import RunConfig, fit, last_checkpoint

__all__ = [
    "DNA",
    "DNAConfig",
    "BlockDistillSystem",
    "teacher_features",
    "digits_config",
    "build_teacher",
    "train_teacher",
    "train_block",
    "rate_block",
    "run_dna",
    "train_block_selfsup",
    "rate_selfsup",
    "VARIANTS",
    "block_score",
]

VARIANTS = ("plain", "cells", "plus", "selfsup")
VARIANT_CONFIGS = {"cells": "dna_cells_digits", "plus": "dna_plus_digits", "selfsup": "dna_selfsup_digits"}


def _digits_space() -> dict[str, Any]:
    ops = [
        {"kind": "skip"},
        {"kernel": 3, "expansion": 1},
        {"kernel": 3, "expansion": 4},
        {"kernel": 5, "expansion": 4},
    ]
    blocks = [
        {"out_channels": 16, "stride": 1, "layers": 2},
        {"out_channels": 24, "stride": 2, "layers": 2},
        {"out_channels": 32, "stride": 2, "layers": 2},
    ]
    return {
        "name": "digits-mbconv",
        "input_channels": 1,
        "input_size": 8,
        "stem_channels": 8,
        "ops": ops,
        "blocks": blocks,
    }


@dataclass
class DNAConfig:
    """Everything a DNA search needs (defaults: the small digits search of the packaged ``dna_digits`` config).

    ``space`` and ``teacher`` are given as mappings (YAML) and become a :class:`SearchSpace` and an :class:`OpSpec`;
    ``space`` may also name a preset of :data:`nas.spaces.SPACE_PRESETS` (``digits-cells``).
    """

    space: Any = field(default_factory=_digits_space)  # a SearchSpace, its mapping, or a preset name
    variant: str = "plain"  # plain | cells (one supernet per cell) | plus (DNA+) | selfsup (DNA++)
    generations: int = 2  # DNA+: searches, each teaching the next through its retrained searched net
    ema_momentum: float = 0.99  # DNA++: momentum of the EMA target block
    var_weight: float = 1.0  # DNA++: weight of the anti-collapse variance term (per-channel std kept >= 1)
    cov_weight: float = 0.04  # DNA++: weight of the anti-collapse decorrelation term (off-diagonal covariance)
    selfsup_target: str = "path"  # DNA++ rating target: the same path's EMA ("path") | EMA population centre
    norm: str = "bn"  # normalization inside the block supernets: "bn" | "bkn"
    bkn_prior_weight: float = 0.5  # BKN's prior weight p inside the supernets (see nas.ops.make_norm)
    teacher: Any = field(default_factory=lambda: {"kernel": 3, "expansion": 6})  # an OpSpec, or its mapping
    teacher_layers: int | None = 3
    teacher_epochs: int = 15
    teacher_lr: float = 3e-3
    block_epochs: int = 15
    block_lr: float = 2e-3
    batch_size: int = 64
    recal_batches: int = 4
    rating_metric: str = "relative_l1"  # or "mse", "cosine" (nas.metrics; DNA++'s packaged config: cosine)
    budget_cost: str = "params"
    budget: float | None = None  # absolute strict budget; None: budget_fraction of the cost range
    budget_fraction: float = 0.5
    retrain_epochs: int = 15
    retrain_lr: float = 3e-3
    seed: int = 0
    data_seed: int = 0
    out_dir: str = "runs/dna-digits"
    progress: bool = True
    resume: bool = True
    overwrite: bool = False  # recompute cached artefacts made with another config (else refused)
    blocks: list[int] | None = None  # train and rate only these blocks (parallel workers); no search
    retrain: bool = True  # retrain the searched architecture stand-alone
    workers: int = 1  # > 1: blocks trained and rated in that many worker processes (nas/parallel.py)
    worker_threads: int | None = None  # torch threads per worker (None: the cores shared evenly)

    def __post_init__(self) -> None:
        if isinstance(self.space, str):
            self.space = space_preset(self.space)
        if isinstance(self.space, dict):
            self.space = SearchSpace.from_dict(self.space)
        if isinstance(self.teacher, dict):
            self.teacher = op_from_dict(self.teacher)
        if not isinstance(self.space, SearchSpace) or not isinstance(self.teacher, OpSpec):
            raise ValueError("space and teacher must be mappings (or a SearchSpace and an OpSpec)")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "cells" and not any(b.multi_cell for b in self.space.blocks):
            raise ValueError(f"variant 'cells' needs a space whose blocks offer several cells (e.g. space: "
                             f"digits-cells); {self.space.name} has one cell per block")
        if self.variant == "selfsup" and any(b.multi_cell for b in self.space.blocks):
            raise ValueError("variant 'selfsup' supports single-cell spaces only")
        if self.generations < 1:
            raise ValueError(f"generations must be >= 1, got {self.generations}")
        if not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")
        if self.var_weight < 0 or self.cov_weight < 0:
            raise ValueError(f"var_weight and cov_weight must be >= 0, got {self.var_weight}, {self.cov_weight}")
        if self.selfsup_target not in ("center", "path"):
            raise ValueError(f"selfsup_target must be 'center' or 'path', got {self.selfsup_target!r}")
        if self.rating_metric not in RATING_METRICS:
            raise ValueError(f"rating_metric must be one of {RATING_METRICS}, got {self.rating_metric!r}")
        if self.norm not in ("bn", "bkn"):
            raise ValueError(f"norm must be 'bn' or 'bkn', got {self.norm!r}")
        if not 0.0 <= self.bkn_prior_weight <= 1.0:
            raise ValueError(f"bkn_prior_weight must be in [0, 1], got {self.bkn_prior_weight}")
        if self.budget_cost not in ("params", "flops"):
            raise ValueError(f"budget_cost must be 'params' or 'flops', got {self.budget_cost!r}")
        if self.budget is None and not 0 < self.budget_fraction <= 1:
            raise ValueError(f"budget_fraction must be in (0, 1], got {self.budget_fraction}")
        if self.budget is not None and not math.isfinite(self.budget):
            raise ValueError(f"budget must be a finite number or null, got {self.budget}")
        for name in ("teacher_epochs", "block_epochs", "retrain_epochs", "batch_size", "recal_batches", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("teacher_lr", "block_lr", "retrain_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.blocks is not None:
            if self.variant == "plus":
                raise ValueError("variant 'plus' runs whole generations; --blocks is not supported")
            for k in self.blocks:
                if not 0 <= k < len(self.space.blocks):
                    raise ValueError(f"block {k} out of range: the space has {len(self.space.blocks)} blocks")


def digits_config(**changes: Any) -> DNAConfig:
    """The default digits search (the packaged ``dna_digits`` config) with ``changes``."""
    return replace(DNAConfig(), **changes)


def _teacher_fields(cfg: DNAConfig) -> dict[str, Any]:
    """What determines the fixed teacher (its network and training): ``teacher/``'s config record."""
    return {"network": cfg.space.with_single_op(cfg.teacher, cfg.teacher_layers), "teacher_epochs": cfg.teacher_epochs,
            "teacher_lr": cfg.teacher_lr, "batch_size": cfg.batch_size, "seed": cfg.seed, "data_seed": cfg.data_seed}


def _block_fields(cfg: DNAConfig, k: int, teacher: dict[str, Any]) -> dict[str, Any]:
    """What determines block ``k``'s supernet(s) and ratings: its teacher and the block (DNA++: blocks 0..k, which
    feed it), the supernet training and the rating."""
    names = ("norm", "bkn_prior_weight", "block_epochs", "block_lr", "batch_size", "recal_batches", "rating_metric",
             "seed", "data_seed")
    common = {name: getattr(cfg, name) for name in names}
    if cfg.variant == "selfsup":
        selfsup = ("ema_momentum", "var_weight", "cov_weight", "selfsup_target")
        feeding = replace(cfg.space, blocks=cfg.space.blocks[: k + 1])
        return {**common, **{n: getattr(cfg, n) for n in selfsup}, "space": feeding}
    return {**common, "teacher": teacher, "block": cfg.space.blocks[k]}


def _retrain_fields(cfg: DNAConfig, teacher: dict[str, Any]) -> dict[str, Any]:
    """What determines the retrained searched network: every block's ratings, the search, the retraining."""
    budget = {"budget": cfg.budget} if cfg.budget is not None else {"budget_fraction": cfg.budget_fraction}
    return {"blocks": [_block_fields(cfg, k, teacher) for k in range(len(cfg.space.blocks))], "variant": cfg.variant,
            "budget_cost": cfg.budget_cost, **budget, "retrain_epochs": cfg.retrain_epochs,
            "retrain_lr": cfg.retrain_lr}


def _datamodule(cfg: DNAConfig) -> DigitsDataModule:
    return DigitsDataModule(batch_size=cfg.batch_size, seed=cfg.data_seed)


def build_teacher(cfg: DNAConfig, num_classes: int = 10) -> Network:
    """The teacher: the space's stem and block shapes, every layer ``cfg.teacher`` (BatchNorm)."""
    tspace = cfg.space.with_single_op(cfg.teacher, cfg.teacher_layers)
    encoding = [next(iter(b.enumerate())) for b in tspace.blocks]
    return build_network(tspace, encoding, num_classes)


@torch.no_grad()
def teacher_features(teacher: Network, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of block ``k``: the teacher's block k-1 output (stem output for k=0) and block k output."""
    outs = teacher.block_outputs(x)
    return outs[k], outs[k + 1]


class BlockDistillSystem(pl.LightningModule):
    """DNA block training: the student block supernet maps the teacher's block k-1 output to its block k
    output (MSE), one uniformly random path per step. The frozen teacher stays in eval mode.

    The path of step t is drawn from ``random.Random(seed * 1_000_003 + t)``, so a resumed run
    samples exactly the paths the uninterrupted run would have.
    """

    def __init__(
        self, teacher: Network, student: BlockSupernet, k: int, lr: float = 2e-3, seed: int = 0, max_epochs: int = 20
    ) -> None:
        super().__init__()
        if not 0 <= k < len(teacher.blocks):
            raise ValueError(f"block index {k} out of range for a {len(teacher.blocks)}-block teacher")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student = student
        self.k = k
        self.lr = lr
        self.seed = seed
        self.max_epochs = max_epochs
        self.val_candidates = student.candidates()

    def train(self, mode: bool = True) -> BlockDistillSystem:
        super().train(mode)
        self.teacher.eval()  # its statistics are fixed
        return self

    def step_candidate(self, step: int) -> tuple[int, ...]:
        return self.student.sample(random.Random(self.seed * 1_000_003 + step))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x_in, target = teacher_features(self.teacher, batch[0], self.k)
        cand = self.step_candidate(self.global_step)
        loss = F.mse_loss(self.student(x_in, cand), target)
        self.log("train_loss", loss, batch_size=len(x_in))
        # an all-skip path has no weights: nothing to learn this step (Lightning skips a None loss)
        return loss if loss.requires_grad else None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        # A fixed rotation of candidates so val_loss is comparable across epochs (train-mode-free: eval stats).
        x_in, target = teacher_features(self.teacher, batch[0], self.k)
        cand = self.val_candidates[batch_idx % len(self.val_candidates)]
        self.log("val_loss", F.mse_loss(self.student(x_in, cand), target), prog_bar=True, batch_size=len(x_in))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.student.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


def _run_cfg(cfg: DNAConfig, out_dir: Path, epochs: int, **changes: Any) -> RunConfig:
    resume = last_checkpoint(out_dir).is_file()
    return RunConfig(
        out_dir=str(out_dir),
        max_epochs=epochs,
        seed=cfg.seed,
        resume=resume,
        progress_bar=cfg.progress,
        loggers=("csv",),
        **changes,
    )


def train_teacher(
    cfg: DNAConfig, out_dir: str | Path, datamodule: DigitsDataModule | None = None
) -> tuple[Network, dict]:
    """Train the teacher (or load ``out_dir/teacher/teacher.pt``); returns it in eval mode and its metrics."""
    tdir = Path(out_dir) / "teacher"
    weights, info_path = tdir / "teacher.pt", tdir / "teacher.json"
    if weights.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        # a DNA+ teacher is a searched architecture of the space (its encoding is recorded)
        teacher = build_teacher(cfg) if "encoding" not in info else build_network(
            cfg.space, info["encoding"], DigitsDataModule.num_classes
        )
        teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        return teacher.eval(), info
    with seeded_init(cfg.seed):
        teacher = build_teacher(cfg)
    dm = datamodule or _datamodule(cfg)
    system = ClassifierSystem(teacher, lr=cfg.teacher_lr, max_epochs=cfg.teacher_epochs)
    result = fit(system, dm, _run_cfg(cfg, tdir, cfg.teacher_epochs, monitor="val_loss"))
    if result.best_checkpoint:  # keep the best epoch's weights
        state = torch.load(result.best_checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        system.load_state_dict(state)
    info = {"test_acc": result.test_metrics.get("test_acc"), "params": count_params(teacher)}
    torch.save(teacher.state_dict(), weights)
    write_json(info_path, info)
    return teacher.eval(), info


def train_block(
    cfg: DNAConfig,
    teacher: Network,
    k: int,
    out_dir: str | Path,
    datamodule: DigitsDataModule | None = None,
    cell: int | None = None,
) -> BlockSupernet:
    """Distill block ``k`` into its supernet (resumes from ``block_<k>/checkpoints/last.ckpt``); with ``cell``,
    the supernet of that cell alone (``block_<k>/cell_<c>/``, every step on that cell's paths)."""
    salt = 0 if cell is None else 7919 * (cell + 1)  # distinct init and paths per cell; unchanged without cells
    with seeded_init(cfg.seed * 1000 + k + 1 + salt):  # same init whether blocks run in one process or many
        student = BlockSupernet(
            cfg.space.blocks[k], make_norm(cfg.norm, cfg.bkn_prior_weight), cells=None if cell is None else [cell]
        )
    system = BlockDistillSystem(
        teacher, student, k, lr=cfg.block_lr, seed=cfg.seed + k + salt, max_epochs=cfg.block_epochs
    )
    bdir = Path(out_dir) / f"block_{k}"
    if cell is not None:
        bdir = bdir / f"cell_{cell}"
    fit(system, datamodule or _datamodule(cfg), _run_cfg(cfg, bdir, cfg.block_epochs, test=False))
    return student


@torch.no_grad()
def rate_block(
    teacher: Network,
    student: BlockSupernet,
    k: int,
    recal_inputs: Sequence[torch.Tensor],
    val_inputs: Sequence[torch.Tensor],
    metric: str = "relative_l1",
    candidates: Sequence[Sequence[int]] | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """Score candidates of block ``k`` (default: every one): recalibrate norm statistics on
    ``recal_inputs`` (teacher-fed), then accumulate over ALL ``val_inputs``
    ``mean|y_hat - y| / std(y)`` (relative_l1), ``mean (y_hat - y)^2 / var(y)`` (mse) or the mean per-sample
    cosine distance (cosine; :mod:`nas.metrics`)."""
    check_metric(metric)
    teacher.eval()
    recal = [teacher_features(teacher, x, k)[0] for x in recal_inputs]
    val = [teacher_features(teacher, x, k) for x in val_inputs]
    targets = torch.cat([y.flatten() for _, y in val])  # (B, C, H, W) per batch -> (sum B*C*H*W,)
    scale = target_scale(targets, metric, f"block {k}: the teacher's targets")
    cands = list(candidates) if candidates is not None else student.candidates()
    ratings: dict[str, float] = {}
    for cand in tqdm(cands, desc=f"rate block {k}", disable=not progress, leave=False):
        recalibrate_norm_stats(student, recal, num_batches=len(recal), forward=lambda x, c=cand: student(x, c))
        err = count = 0.0
        for x_in, y in val:
            e, n = block_score(student(x_in, cand), y, metric)
            err += e
            count += n
        ratings[student.block.key(cand)] = err / count / scale
    return ratings


def _rating_inputs(cfg: DNAConfig, dm: DigitsDataModule) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Fixed (unshuffled) training batches for recalibration and all validation batches."""
    dm.setup()
    assert dm.splits is not None
    xtr, xval = dm.splits["train"][0], dm.splits["val"][0]
    recal = [xtr[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(cfg.recal_batches)]
    recal = [r for r in recal if len(r)]
    val = list(torch.split(xval, cfg.batch_size))
    return recal, val


def _budget(cfg: DNAConfig, costs: list[dict[str, dict[str, int]]]) -> float:
    if cfg.budget is not None:
        return float(cfg.budget)
    lo = sum(min(c[cfg.budget_cost] for c in table.values()) for table in costs)
    hi = sum(max(c[cfg.budget_cost] for c in table.values()) for table in costs)
    return lo + cfg.budget_fraction * (hi - lo) + 1  # +1: the budget is strict


def build_rating_table(cfg: DNAConfig, ratings: list[dict[str, float]]) -> RatingTable:
    return RatingTable(
        block_ratings=ratings,
        block_costs=block_cost_table(cfg.space),
        metric=cfg.rating_metric,
        lower_is_better=True,
        meta={"method": "dna", "space": cfg.space.name, "norm": cfg.norm},
    )


def retrain(
    cfg: DNAConfig, encoding: Sequence[Sequence[int]], out_dir: str | Path, datamodule: DigitsDataModule | None = None
) -> dict:
    """Train the searched architecture from scratch (BatchNorm); returns its test metrics. The tested weights are
    saved as ``retrain/model.pt`` (DNA+'s next teacher)."""
    with seeded_init(cfg.seed):
        model = build_network(cfg.space, encoding, DigitsDataModule.num_classes)
    system = ClassifierSystem(model, lr=cfg.retrain_lr, max_epochs=cfg.retrain_epochs)
    rdir = Path(out_dir) / "retrain"
    result = fit(system, datamodule or _datamodule(cfg), _run_cfg(cfg, rdir, cfg.retrain_epochs))
    torch.save(model.state_dict(), rdir / "model.pt")
    return result.test_metrics


def _selfsup_prefix(cfg: DNAConfig, k: int, out_dir: Path, dm: DigitsDataModule) -> FixedPath:
    """DNA++ input of block k > 0: the EMA stem and EMA blocks 0..k-1 on their best-rated candidates (frozen,
    norm statistics recalibrated for that path on the rating's training batches)."""
    norm = make_norm(cfg.norm, cfg.bkn_prior_weight)
    stem = make_stem(cfg.space, norm)
    blocks = []
    for j in range(k):
        bdir = out_dir / f"block_{j}"
        if not (bdir / "ratings.json").is_file():
            raise ValueError(f"DNA++ trains blocks in order: block {j} must be finished before block {k}")
        state = torch.load(bdir / "selfsup.pt", map_location="cpu", weights_only=True)
        if j == 0:
            stem.load_state_dict(state["ema_stem"])
        supernet = BlockSupernet(cfg.space.blocks[j], norm)
        supernet.load_state_dict(state["ema_student"])
        ratings = json.loads((bdir / "ratings.json").read_text())["ratings"]
        blocks.append((supernet, cfg.space.blocks[j].parse_key(min(ratings, key=ratings.get))))
    prefix = FixedPath(stem, blocks)
    recal, _ = _rating_inputs(cfg, dm)
    recalibrate_norm_stats(prefix, recal, num_batches=len(recal))
    return prefix.eval()


def _selfsup_system(cfg: DNAConfig, k: int, out_dir: Path, dm: DigitsDataModule) -> SelfSupBlockSystem:
    norm = make_norm(cfg.norm, cfg.bkn_prior_weight)
    with seeded_init(cfg.seed * 1000 + k + 1):
        student = BlockSupernet(cfg.space.blocks[k], norm)
        prefix = make_stem(cfg.space, norm) if k == 0 else _selfsup_prefix(cfg, k, out_dir, dm)
    return SelfSupBlockSystem(
        student, prefix, train_prefix=k == 0, lr=cfg.block_lr, seed=cfg.seed + k, max_epochs=cfg.block_epochs,
        momentum=cfg.ema_momentum, var_weight=cfg.var_weight, cov_weight=cfg.cov_weight, views=ViewConfig(),
    )


def train_block_selfsup(
    cfg: DNAConfig, k: int, out_dir: str | Path, datamodule: DigitsDataModule | None = None
) -> SelfSupBlockSystem:
    """DNA++: train block ``k`` against its EMA copy (``block_<k>/``, resumable); saves ``block_<k>/selfsup.pt``."""
    dm = datamodule or _datamodule(cfg)
    bdir = Path(out_dir) / f"block_{k}"
    system = _selfsup_system(cfg, k, Path(out_dir), dm)
    fit(system, dm, _run_cfg(cfg, bdir, cfg.block_epochs, test=False))
    state = {"student": system.student.state_dict(), "ema_student": system.ema_student.state_dict()}
    if system.train_prefix:
        assert system.ema_prefix is not None
        state |= {"stem": system.prefix.state_dict(), "ema_stem": system.ema_prefix.state_dict()}
    torch.save(state, bdir / "selfsup.pt")
    return system


def rate_selfsup(
    cfg: DNAConfig, k: int, system: SelfSupBlockSystem, datamodule: DigitsDataModule | None = None
) -> dict[str, float]:
    """DNA++ ratings of every candidate of block ``k`` (:func:`nas.methods.dna_selfsup.rate_block_selfsup`)."""
    recal, val = _rating_inputs(cfg, datamodule or _datamodule(cfg))
    online = system.prefix
    ema = system.ema_prefix if system.train_prefix else system.prefix
    assert ema is not None
    for prefix in {id(online): online, id(ema): ema}.values():  # the stems' statistics on clean images
        recalibrate_norm_stats(prefix, recal, num_batches=len(recal))
    return rate_block_selfsup(
        system.student, system.ema_student, online, ema, recal, val, system.views, cfg.rating_metric,
        cfg.selfsup_target, progress=cfg.progress,
    )


def run_dna(
    cfg: DNAConfig,
    out_dir: str | Path | None = None,
    blocks: Sequence[int] | None = None,
    do_retrain: bool | None = None,
) -> dict[str, Any]:
    """The whole DNA search (``out_dir``, ``blocks``, ``do_retrain`` default to the config's ``out_dir``,
    ``blocks``, ``retrain``); with ``blocks`` only those blocks are trained and rated (parallel workers)."""
    changes: dict[str, Any] = {}
    if out_dir is not None:
        changes["out_dir"] = str(out_dir)
    if blocks is not None:
        changes["blocks"] = list(blocks)
    if do_retrain is not None:
        changes["retrain"] = do_retrain
    return DNA(replace(cfg, **changes)).search()


@register
class DNA(SearchMethod):
    """DNA behind the method interface: teacher, then every block independently (train, rate), then the search."""

    name = "dna"
    config_class = DNAConfig
    description = "DNA: block-wise supervised search by distilling a teacher's blocks"

    def __init__(self, cfg: DNAConfig) -> None:
        super().__init__(cfg)
        self.cfg: DNAConfig = cfg
        self.datamodule = _datamodule(cfg)
        self.teacher: Network | None = None
        self.teacher_info: dict[str, Any] = {}
        self.supernets: dict[int, list[BlockSupernet]] = {}  # per block: one supernet, or one per cell
        self.selfsup_systems: dict[int, Any] = {}  # DNA++: per block, its trained SelfSupBlockSystem
        self.seeded_teacher: dict[str, Any] | None = None  # DNA+ generation > 1: the record of its seeded teacher
        self._t0 = time.perf_counter()

    @classmethod
    def default_config(cls, argv: Sequence[str]) -> str | None:
        """``--variant cells|plus|selfsup`` without ``--config``: that variant's packaged digits config."""
        for i, arg in enumerate(argv):
            value = arg.split("=", 1)[1] if arg.startswith("--variant=") else (
                argv[i + 1] if arg == "--variant" and i + 1 < len(argv) else None
            )
            if value is not None:
                return VARIANT_CONFIGS.get(value)
        return None

    @property
    def num_blocks(self) -> int:
        return len(self.cfg.space.blocks)

    def teacher_fields(self) -> dict[str, Any]:
        """The teacher's config record: the fixed teacher's, or (DNA+) the seeded one's."""
        return self.seeded_teacher if self.seeded_teacher is not None else _teacher_fields(self.cfg)

    def generation_fields(self) -> dict[str, Any]:
        """DNA+: what determines every generation (each a plain search from the same config)."""
        return _retrain_fields(replace(self.cfg, variant="plain"), _teacher_fields(self.cfg))

    def artefacts(self) -> list[Artefact]:
        """``teacher/``, the blocks to run and ``retrain/`` (DNA+: the generations), each with its config record."""
        cfg, out = self.cfg, self.out_dir
        if cfg.variant == "plus":
            fields = self.generation_fields()
            return [Artefact(out / f"gen_{g}", fields, f"DNA+ generation {g}") for g in range(1, cfg.generations + 1)]
        teacher = self.teacher_fields()
        found = [] if cfg.variant == "selfsup" else [Artefact(out / "teacher", teacher, "teacher")]
        for k in self.parallel_blocks():
            found.append(Artefact(out / f"block_{k}", _block_fields(cfg, k, teacher), f"block {k}"))
        if cfg.blocks is None and cfg.retrain:
            found.append(self.retrain_artefact())
        return found

    def retrain_artefact(self) -> Artefact:
        """``retrain/``: the searched architecture retrained stand-alone, recorded with the whole search's config."""
        return Artefact(self.out_dir / "retrain", _retrain_fields(self.cfg, self.teacher_fields()), "retrained network")

    def check_budget(self) -> None:
        """An absolute ``budget`` must exceed the cheapest architecture's ``budget_cost`` (from the space)."""
        cfg = self.cfg
        if cfg.budget is not None:
            cheapest = sum(min(c[cfg.budget_cost] for c in table.values()) for table in block_cost_table(cfg.space))
            check_budget(cfg.budget, cheapest, cfg.budget_cost)

    def prepare(self) -> Network | None:
        """The trained teacher (trained once, then loaded from ``out_dir/teacher``); DNA++ has none."""
        if self.cfg.variant == "selfsup":
            return None
        if self.teacher is None:
            self.teacher, self.teacher_info = train_teacher(self.cfg, self.out_dir, self.datamodule)
        return self.teacher

    def train_block(self, k: int) -> None:
        if self.cfg.variant == "selfsup":
            self.selfsup_systems[k] = train_block_selfsup(self.cfg, k, self.out_dir, self.datamodule)
            return
        teacher = self.prepare()
        assert teacher is not None
        block = self.cfg.space.blocks[k]
        if not block.multi_cell:
            self.supernets[k] = [train_block(self.cfg, teacher, k, self.out_dir, self.datamodule)]
            return
        # one supernet per cell, each trained on its own paths for the full schedule (the authors' cells)
        self.supernets[k] = [self._train_cell(k, c) for c in range(len(block.cells))]

    def _train_cell(self, k: int, cell: int) -> BlockSupernet:
        """The supernet of ``cell`` in block ``k``, distilled alone (``block_<k>/cell_<c>/``)."""
        teacher = self.prepare()
        assert teacher is not None
        return train_block(self.cfg, teacher, k, self.out_dir, self.datamodule, cell=cell)

    def rate_block(self, k: int) -> dict[str, float]:
        if self.cfg.variant == "selfsup":
            return rate_selfsup(self.cfg, k, self.selfsup_systems[k], self.datamodule)
        teacher = self.prepare()
        assert teacher is not None
        recal, val = _rating_inputs(self.cfg, self.datamodule)
        ratings: dict[str, float] = {}
        for student in self.supernets[k]:  # pooled over the cells' supernets (same teacher target and scale)
            ratings.update(
                rate_block(teacher, student, k, recal, val, self.cfg.rating_metric, progress=self.cfg.progress)
            )
        return ratings

    @property
    def independent_blocks(self) -> bool:
        """Blocks are independent given the teacher (plain, cells); DNA++ trains blocks in order, DNA+ runs
        generations (each a plain search)."""
        return self.cfg.variant in ("plain", "cells")

    def prepare_blocks(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prepare()

    def parallel_blocks(self) -> list[int]:
        return list(range(self.num_blocks)) if self.cfg.blocks is None else list(self.cfg.blocks)

    def block_done(self, k: int) -> bool:
        return (self.out_dir / f"block_{k}" / "ratings.json").is_file()

    def _cell_units(self, k: int) -> bool:
        """Whether block ``k`` runs as one unit per cell: several cells and a teacher (not DNA++)."""
        return self.cfg.variant != "selfsup" and self.cfg.space.blocks[k].multi_cell

    def parallel_units(self) -> list[tuple[int, int | None]]:
        """One unit per cell supernet of a multi-cell block (each trains and rates on its own, as the authors
        train the cells), one per other block; largest first by parameter count (a longest-first schedule)."""
        units: list[tuple[int, int | None]] = []
        for k in self.parallel_blocks():
            cells = len(self.cfg.space.blocks[k].cells) if self._cell_units(k) else 0
            units += [(k, c) for c in range(cells)] if cells else [(k, None)]

        def size(unit: tuple[int, int | None]) -> int:
            k, cell = unit
            block = self.cfg.space.blocks[k]
            supernet = BlockSupernet(block, make_norm(self.cfg.norm, self.cfg.bkn_prior_weight),
                                     cells=None if cell is None else [cell])
            return sum(p.numel() for p in supernet.parameters())

        return sorted(units, key=size, reverse=True)

    def unit_done(self, unit: tuple[int, int | None]) -> bool:
        k, cell = unit
        return self.block_done(k) or (cell is not None and self._cell_path(k, cell).is_file())

    def run_unit(self, unit: tuple[int, int | None]) -> dict[str, float]:
        k, cell = unit
        return self.run_block(k) if cell is None else self._run_cell(k, cell)["ratings"]

    def _cell_path(self, k: int, cell: int) -> Path:
        return self.out_dir / f"block_{k}" / f"cell_{cell}" / "ratings.json"

    def _run_cell(self, k: int, cell: int) -> dict[str, Any]:
        """Train then rate the supernet of ``cell`` in block ``k`` (``block_<k>/cell_<c>/ratings.json``: its
        candidates' ratings and times); a finished cell is loaded (resume)."""
        done = self._cell_path(k, cell)
        if done.is_file():
            return json.loads(done.read_text())
        t0, c0 = time.perf_counter(), time.process_time()
        student = self._train_cell(k, cell)
        teacher = self.prepare()
        assert teacher is not None
        recal, val = _rating_inputs(self.cfg, self.datamodule)
        ratings = rate_block(teacher, student, k, recal, val, self.cfg.rating_metric, progress=self.cfg.progress)
        payload = {"block": k, "cell": cell, "metric": self.cfg.rating_metric, "seconds": time.perf_counter() - t0,
                   "cpu_seconds": time.process_time() - c0, "ratings": ratings}
        write_json(done, payload)
        return payload

    def run_block(self, k: int) -> dict[str, float]:
        """Train then rate block ``k`` (a multi-cell block: cell by cell, each resumable); a block whose
        ``ratings.json`` exists is skipped (resume)."""
        done = self.out_dir / f"block_{k}" / "ratings.json"
        if done.is_file():
            return json.loads(done.read_text())["ratings"]
        t0, c0 = time.perf_counter(), time.process_time()
        if self._cell_units(k):  # pooled over the cells' supernets (same teacher target and scale)
            cells = [self._run_cell(k, c) for c in range(len(self.cfg.space.blocks[k].cells))]
            ratings = {key: value for cell in cells for key, value in cell["ratings"].items()}
            seconds, cpu = sum(c["seconds"] for c in cells), sum(c["cpu_seconds"] for c in cells)
        else:
            self.train_block(k)
            ratings = self.rate_block(k)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        payload = {
            "block": k,
            "metric": self.cfg.rating_metric,
            "seconds": seconds,  # training + rating (of every cell, wherever it ran)
            "cpu_seconds": cpu,  # CPU time of the processes that did it (wall time depends on the load)
            "ratings": ratings,
        }
        write_json(done, payload)
        return ratings

    def search(self) -> dict[str, Any]:
        cfg = self.cfg
        self.preflight()
        if cfg.variant == "plus":
            return self.progressive()
        todo = self.parallel_blocks()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self.prepare()
        ratings = {k: self.run_block(k) for k in todo}
        if cfg.blocks is not None:
            return {"blocks": sorted(ratings), "out_dir": str(self.out_dir)}
        return self.report([ratings[k] for k in range(self.num_blocks)])

    def progressive(self) -> dict[str, Any]:
        """DNA+: ``generations`` DNA searches in ``gen_<g>/``; the teacher of generation g+1 is generation g's
        searched net retrained stand-alone. Finished generations are reused; ``generations.json`` records all."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        gens: list[dict[str, Any]] = []
        prev: Path | None = None
        for g in range(1, cfg.generations + 1):
            gdir = self.out_dir / f"gen_{g}"
            generation = DNA(replace(cfg, variant="plain", out_dir=str(gdir), retrain=True, resume=True))
            if prev is not None:
                generation.seeded_teacher = {"seeded_from_generation": g - 1, "search": self.generation_fields()}
                _seed_teacher(gdir, prev, g - 1, generation.seeded_teacher)
            arch_path, weights = gdir / "architecture.json", gdir / "retrain" / "model.pt"
            if arch_path.is_file() and weights.is_file():
                arch = json.loads(arch_path.read_text())
            else:
                arch = generation.search()
            teacher_info = json.loads((gdir / "teacher" / "teacher.json").read_text())
            gens.append({
                "generation": g,
                "teacher": teacher_info.get("encoding", f"fixed {cfg.teacher.name} x{cfg.teacher_layers}"),
                "teacher_test_acc": teacher_info.get("test_acc"),
                **{key: arch[key] for key in ("encoding", "keys", "block_strings", "score", "params", "flops")},
                "test_acc": arch["retrain"].get("test_acc"),
                "out_dir": str(gdir),
            })
            write_json(self.out_dir / "generations.json", gens)
            prev = gdir
        lines = [f"# DNA+ (progressive) on {cfg.space.name}", "", "| generation | teacher | searched | params | "
                 "test acc |", "|---|---|---|---|---|"]
        for r in gens:
            lines.append(f"| {r['generation']} | {r['teacher']} (acc {r['teacher_test_acc']}) | {r['encoding']} | "
                         f"{r['params']} | {r['test_acc']} |")
        (self.out_dir / "report.md").write_text("\n".join(lines) + "\n")
        final = gens[-1]
        shutil.copyfile(Path(final["out_dir"]) / "ratings.json", self.out_dir / "ratings.json")
        return {"generations": gens, "encoding": final["encoding"], "test_acc": final["test_acc"],
                "out_dir": str(self.out_dir)}

    def report(self, ratings: Sequence[dict[str, float]]) -> dict[str, Any]:
        cfg, out = self.cfg, self.out_dir
        table = build_rating_table(cfg, list(ratings))
        save_ratings(table, out / "ratings.json")
        budget = _budget(cfg, table.block_costs or [])
        found = search_table(table, budget, cfg.budget_cost, "exact")
        net = build_network(cfg.space, found.encoding, DigitsDataModule.num_classes)
        shape = (cfg.space.input_channels, cfg.space.input_size, cfg.space.input_size)
        arch = {
            "encoding": found.encoding,
            "keys": found.keys,
            "block_strings": block_strings(cfg.space, found.encoding),
            "score": found.score,
            "budget": budget,
            "budget_cost": cfg.budget_cost,
            "params": count_params(net),
            "flops": count_flops(net, shape),
            "searched_blocks_cost": found.cost,
        }
        if cfg.retrain:
            arch["retrain"] = retrain(cfg, found.encoding, out, self.datamodule)
        elif is_current(self.retrain_artefact()) and (out / "architecture.json").is_file():
            # retrain: false keeps the retrained result of this very search (the last architecture.json holds it)
            earlier = json.loads((out / "architecture.json").read_text()).get("retrain")
            if earlier is not None:
                arch["retrain"] = earlier
        arch["seconds"] = time.perf_counter() - self._t0
        write_json(out / "architecture.json", arch)
        (out / "report.md").write_text(_report(cfg, self.teacher_info, table, arch))
        return arch


def _seed_teacher(gdir: Path, prev: Path, prev_generation: int, fields: dict[str, Any]) -> None:
    """Make generation ``prev``'s retrained searched net the teacher of ``gdir`` (once), recorded with ``fields``."""
    tdir = gdir / "teacher"
    if (tdir / "teacher.pt").is_file() and (tdir / "teacher.json").is_file():
        return
    arch = json.loads((prev / "architecture.json").read_text())
    tdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(prev / "retrain" / "model.pt", tdir / "teacher.pt")
    info = {"encoding": arch["encoding"], "test_acc": arch["retrain"].get("test_acc"), "params": arch["params"],
            "generation": prev_generation, "source": str(prev / "retrain" / "model.pt")}
    write_json(tdir / "teacher.json", info)
    record(Artefact(tdir, fields, "teacher"))


def _report(cfg: DNAConfig, teacher_info: dict, table: RatingTable, arch: dict) -> str:
    lines = [
        f"# DNA search on {cfg.space.name}",
        "",
        f"- space: {len(cfg.space.blocks)} blocks, {cfg.space.num_architectures()} architectures "
        f"({', '.join(str(b.num_candidates()) for b in cfg.space.blocks)} candidates per block)",
        f"- variant: {cfg.variant}",
        f"- teacher: {_teacher_line(cfg, teacher_info)}",
        f"- block supernets: norm {cfg.norm}, {cfg.block_epochs} epochs each; rating metric {cfg.rating_metric} "
        f"after recalibrating norm statistics on {cfg.recal_batches} batches",
        f"- search: exact, {cfg.budget_cost} < {arch['budget']:g}",
        "",
        "| block | best candidate | its rating | worst rating |",
        "|---|---|---|---|",
    ]
    for k, r in enumerate(table.block_ratings):
        best = min(r, key=r.get)
        lines.append(f"| {k} | {best} | {r[best]:.4f} | {max(r.values()):.4f} |")
    lines += [
        "",
        f"Searched architecture: encoding {arch['encoding']}, score {arch['score']:.4f}, "
        f"{arch['params']} params, {arch['flops']} FLOPs (MACs)",
        "",
        "Block strings: " + " | ".join(" ".join(b) or "(empty)" for b in arch["block_strings"]),
    ]
    if "retrain" in arch:
        lines += ["", f"Retrained stand-alone: test accuracy {arch['retrain'].get('test_acc')}"]
    lines += ["", f"Total time {arch['seconds']:.1f} s"]
    return "\n".join(lines) + "\n"


def _teacher_line(cfg: DNAConfig, info: dict) -> str:
    if cfg.variant == "selfsup":
        return f"none (self-supervised: EMA copy of each block, momentum {cfg.ema_momentum}, on another view)"
    what = (f"the previous generation's searched net {info['encoding']}" if "encoding" in info
            else f"every layer {cfg.teacher.name} x{cfg.teacher_layers}")
    return f"{what}, test accuracy {info.get('test_acc')}, {info.get('params')} params"
