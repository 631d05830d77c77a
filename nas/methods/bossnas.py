"""BossNAS: self-supervised block-wise search with ensemble bootstrapping (Li et al., ICCV 2021).

Pipeline (one block at a time, earlier blocks fixed to their searched best path; by default they keep
training along that path, as in the authors' code; ``earlier_blocks: frozen`` freezes them):

1. Siamese supernets: online and target (EMA of online, momentum ``base -> 1`` by cosine over
   the block's steps); per-block projector MLP (both nets) and predictor MLP (online), as BYOL.
2. Ensemble bootstrapping: every step samples several paths (a *fair* set, every op once per
   layer, or ``k`` random legal paths); each path sees its own two views; the target of a view
   is the MEAN over the sampled paths of the L2-normalized target projections of the other view;
   each path's loss is the symmetric BYOL loss ``2 - 2 cos`` against that ensemble target; the
   gradients of all paths accumulate, then one optimizer step, then the EMA update.
3. Rating: every legal path of the block, after re-estimating its normalization statistics
   (``nas.recalibration``, BN and BKN alike), predicts fixed validation views; the *population
   center* is the mean target projection over ALL candidates; a path's score is the BYOL
   distance of its online prediction to that center (lower is better).
4. The ratings form the shared rating-table JSON; the core's exact constrained search picks the
   architecture; the core's ranking code evaluates it against ground truth (benchmark).

CLI: ``python -m nas.search bossnas [--config bossnas_digits|bossnas_hytra_digits|FILE] [--space hytra|mbconv]
[--norm bn|bkn] [--out-dir DIR]`` (the packaged ``bossnas_digits`` config by default, ``bossnas_hytra_digits``
with ``--space hytra``); the method class :class:`BossNAS` implements :class:`nas.methods.base.SearchMethod`.
Blocks checkpoint through the shared runner; a finished block is skipped on resume and an interrupted one
continues from its ``last.ckpt``, but only when the block was made with the same config: every ``block<k>/``
carries a record of the values that determine it (``block<k>.config.json``, :mod:`nas.cache`; everything but
the budget, the cost, ``out_dir``, progress and workers, as block k trains on the searched blocks before it).
A rerun with another config is refused, naming the differing keys, unless ``overwrite`` (then the blocks are
retrained). A ``budget`` is checked against the cheapest legal architecture before any training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nas.cache import Artefact, config_fields, write_json
from nas.data import DigitsDataModule
from nas.data.views import ViewConfig, make_view
from nas.methods.base import SearchMethod, register
from nas.methods.bossnas_adapters import HyTraAdapter, MBConvAdapter, SpaceAdapter
from nas.ops import make_norm
from nas.recalibration import recalibrate_norm_stats
from nas.search.constrained import check_budget
from nas.search.ratings import RatingTable, save_ratings
from nas.spaces import Candidate
from nas.spaces.hytra import hytra_digits
from stflow.config import load_config
from stflow.runner import RunConfig, fit

__all__ = [
    "BossNAS",
    "BossNASConfig",
    "momentum_at",
    "ema_update",
    "byol_loss",
    "ensemble_target",
    "population_center",
    "Projector",
    "MLP",
    "SiameseSupernet",
    "BossNASBlockSystem",
    "rate_block",
    "run_search",
]

DEFAULT_CONFIG = "bossnas_digits"  # packaged configs (nas/configs/), found through importlib.resources
HYTRA_CONFIG = "bossnas_hytra_digits"


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
@dataclass
class BossNASConfig:
    """Everything a BossNAS search needs; YAML files (the packaged ``nas/configs/bossnas_*.yaml``) set these fields."""

    space: str = "mbconv"  # "mbconv" (the core's digits space) | "hytra"
    norm: str = "bn"  # "bn" | "bkn"
    bkn_prior_weight: float = 0.5  # BKN's prior weight p inside the supernets (see nas.ops.make_norm)
    out_dir: str = "runs/bossnas-digits"
    seed: int = 0
    data_seed: int = 0
    epochs_per_block: int = 30
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-4
    base_momentum: float = 0.99
    sampling: str = "fair"  # "fair" | "random"
    num_paths: int = 4  # paths per step for "random" (a fair set has max(#ops) paths)
    proj_hidden: int = 128
    proj_dim: int = 64
    views: ViewConfig = field(default_factory=ViewConfig)
    recal_batches: int = 2
    rate_views: int = 2  # view pairs per validation image when rating
    center_normalized: bool = False  # population center of L2-normalized (True) or raw projections
    # earlier blocks while block k trains: "train" (the authors': they keep training along their searched
    # path, online gradients flow through them, the EMA averages stem + blocks 0..k into the target) or
    # "frozen" (fixed weights and statistics; only block k, its projector and predictor learn)
    earlier_blocks: str = "train"
    budget: float | None = None  # constrained search: total cost < budget (None: best per block)
    cost: str = "params"
    hytra_layers: tuple[int, ...] = (3, 3, 3)
    hytra_width: int = 16
    mbconv_config: str | None = None  # a DNA config (packaged name or file) holding the MBConv space
    progress: bool = True
    resume: bool = True
    overwrite: bool = False  # retrain blocks made with another config (else refused)
    limit_train_batches: int | None = None
    limit_val_batches: int | None = 2
    workers: int = 1  # > 1: each block's candidates rated by that many worker processes (nas/parallel.py)
    worker_threads: int | None = None  # torch threads per rating worker (None: the cores shared evenly)

    def __post_init__(self) -> None:
        if isinstance(self.views, dict):
            self.views = ViewConfig(**self.views)
        self.hytra_layers = tuple(self.hytra_layers)
        checks = [
            (self.space in ("mbconv", "hytra"), f"space must be 'mbconv' or 'hytra', got {self.space!r}"),
            (self.norm in ("bn", "bkn"), f"norm must be 'bn' or 'bkn', got {self.norm!r}"),
            (0.0 <= self.bkn_prior_weight <= 1.0, f"bkn_prior_weight must be in [0, 1], got {self.bkn_prior_weight}"),
            (self.sampling in ("fair", "random"), f"sampling must be 'fair' or 'random', got {self.sampling!r}"),
            (self.earlier_blocks in ("train", "frozen"),
             f"earlier_blocks must be 'train' or 'frozen', got {self.earlier_blocks!r}"),
            (not (self.space == "hytra" and self.sampling == "fair"),
             "sampling 'fair' needs every op combination to be legal; HyTra restricts resolution changes, "
             "so use sampling: random"),
            (self.epochs_per_block >= 1, f"epochs_per_block must be >= 1, got {self.epochs_per_block}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (batch statistics), got {self.batch_size}"),
            (self.num_paths >= 1, f"num_paths must be >= 1, got {self.num_paths}"),
            (0.0 <= self.base_momentum <= 1.0, f"base_momentum must be in [0, 1], got {self.base_momentum}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.recal_batches >= 1 and self.rate_views >= 1, "recal_batches and rate_views must be >= 1"),
            (self.cost in ("params", "flops"), f"cost must be 'params' or 'flops', got {self.cost!r}"),
            (self.budget is None or math.isfinite(self.budget),
             f"budget must be a finite number or null, got {self.budget!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"BossNASConfig: {msg}")

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["hytra_layers"] = list(self.hytra_layers)
        return out


# ---------------------------------------------------------------------------------------------
# the BYOL pieces
# ---------------------------------------------------------------------------------------------
def momentum_at(step: int, total_steps: int, base: float) -> float:
    """Cosine EMA momentum: ``base`` at step 0, 1 at ``total_steps`` (BYOL's schedule)."""
    if total_steps <= 0:
        return 1.0
    t = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * t) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for every parameter (same order)."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    if len(t_params) != len(o_params):
        raise ValueError(f"EMA between modules with {len(t_params)} and {len(o_params)} parameters")
    for t, o in zip(t_params, o_params):
        t.mul_(momentum).add_(o.detach(), alpha=1.0 - momentum)


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``2 - 2 cos(prediction, target)``; (B, D) each."""
    return (2.0 - 2.0 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


def ensemble_target(projections: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over paths of the L2-normalized target projections; each (B, D) -> (B, D)."""
    if not projections:
        raise ValueError("ensemble_target needs at least one path's projections")
    return torch.stack([F.normalize(p, dim=-1) for p in projections]).mean(0)


def population_center(projections: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Mean target projection over ALL candidates: (P, N, D) -> (N, D)."""
    if projections.dim() != 3:
        raise ValueError(f"population_center expects (candidates, samples, dim), got {tuple(projections.shape)}")
    return (F.normalize(projections, dim=-1) if normalized else projections).mean(0)


class MLP(nn.Module):
    """Linear -> BatchNorm1d -> ReLU -> Linear (BYOL's projector/predictor)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in_dim) -> (B, out_dim)
        return self.net(x)


class Projector(nn.Module):
    """Global average pooling, then an MLP whose first layer depends on the input channels (HyTra
    paths may end at different widths); the rest is shared."""

    def __init__(self, in_channels: Sequence[int], hidden: int, out_dim: int) -> None:
        super().__init__()
        self.first = nn.ModuleDict(
            {
                str(c): nn.Sequential(nn.Linear(c, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
                for c in sorted(set(in_channels))
            }
        )
        self.last = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.last(self.first[str(x.shape[1])](x.mean((2, 3))))


class SiameseSupernet(nn.Module):
    """Online and target supernets with per-block projectors (both) and predictors (online only)."""

    def __init__(
        self, adapter: SpaceAdapter, norm_layer: Callable[[int], nn.Module], proj_hidden: int, proj_dim: int
    ) -> None:
        super().__init__()
        self.online = adapter.build_supernet(norm_layer)
        self.online_proj = nn.ModuleList()
        self.predictor = nn.ModuleList()
        for k in range(adapter.num_blocks):
            self.online_proj.append(Projector(adapter.out_channels(k), proj_hidden, proj_dim))
            self.predictor.append(MLP(proj_dim, proj_hidden, proj_dim))
        self.target = copy.deepcopy(self.online)
        self.target_proj = copy.deepcopy(self.online_proj)
        for p in list(self.target.parameters()) + list(self.target_proj.parameters()):
            p.requires_grad_(False)

    def prefix(self, which: str, x: torch.Tensor, prefix: Sequence[Candidate]) -> torch.Tensor:
        """Input of block ``len(prefix)`` in the ``which`` net ("online"/"target"): the image itself for
        block 0 (the stem trains with block 0), else stem and the searched earlier blocks; (B, C, H, W)."""
        if not prefix:
            return x
        net = self.online if which == "online" else self.target
        h = net.stem(x)
        for j, cand in enumerate(prefix):
            h = net.blocks[j](h, cand)
        return h

    def trained_modules(self, which: str, k: int) -> list[nn.Module]:
        """Backbone modules trained with block ``k`` (the stem belongs to block 0)."""
        net = self.online if which == "online" else self.target
        return ([net.stem] if k == 0 else []) + [net.blocks[k]]

    def earlier_modules(self, which: str, k: int) -> list[nn.Module]:
        """The stem and blocks ``0..k-1`` of the ``which`` net (empty for block 0)."""
        net = self.online if which == "online" else self.target
        return [net.stem, *[net.blocks[j] for j in range(k)]] if k > 0 else []

    def _block(self, which: str, k: int, h: torch.Tensor, cand: Candidate) -> torch.Tensor:
        net = self.online if which == "online" else self.target
        if k == 0:
            h = net.stem(h)
        return net.blocks[k](h, cand)

    def online_prediction(self, k: int, h: torch.Tensor, cand: Candidate) -> torch.Tensor:
        """Block input (B, C, H, W) -> predictor(projector(block k path)) (B, D)."""
        return self.predictor[k](self.online_proj[k](self._block("online", k, h, cand)))

    def target_projection(self, k: int, h: torch.Tensor, cand: Candidate) -> torch.Tensor:
        """Block input (B, C, H, W) -> target projector(block k path) (B, D)."""
        return self.target_proj[k](self._block("target", k, h, cand))

    def block_pairs(self, k: int, earlier: bool = False) -> tuple[nn.ModuleList, nn.ModuleList]:
        """(target, online) modules trained for block ``k``, aligned for the EMA; ``earlier``: also the
        stem and blocks ``0..k-1`` (the authors average the whole backbone; blocks after ``k`` are still
        equal in both nets, so leaving them out changes nothing)."""
        return (
            nn.ModuleList(
                [*(self.earlier_modules("target", k) if earlier else []), *self.trained_modules("target", k),
                 self.target_proj[k]]
            ),
            nn.ModuleList(
                [*(self.earlier_modules("online", k) if earlier else []), *self.trained_modules("online", k),
                 self.online_proj[k]]
            ),
        )


# ---------------------------------------------------------------------------------------------
# training one block
# ---------------------------------------------------------------------------------------------
class BossNASBlockSystem(pl.LightningModule):
    """Trains block ``k`` of a :class:`SiameseSupernet` with ensemble bootstrapping (manual optimization:
    per-path backward, one step, then the EMA update)."""

    def __init__(
        self, model: SiameseSupernet, adapter: SpaceAdapter, k: int, prefix: Sequence[Candidate], cfg: BossNASConfig
    ) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.k = k
        self.prefix_paths = [tuple(c) for c in prefix]
        self.cfg = cfg
        self.automatic_optimization = False
        self.candidates = adapter.candidates(k, self.prefix_paths)
        self.total_steps = 1

    # -- helpers ------------------------------------------------------------------------------
    def sample_paths(self, rng: random.Random) -> list[Candidate]:
        if self.cfg.sampling == "fair":
            return self.adapter.fair_paths(self.k, self.prefix_paths, rng)
        return self.adapter.random_paths(self.k, self.prefix_paths, self.cfg.num_paths, rng)

    @property
    def train_earlier(self) -> bool:
        return self.cfg.earlier_blocks == "train" and self.k > 0

    def _set_modes(self) -> None:
        """Train mode for what block ``k`` trains (both nets: batch statistics, as in BYOL); the stem and
        the searched earlier blocks too when they keep training (the authors'), else eval mode (fixed
        statistics). Lightning keeps whatever modes the modules had, and rating leaves them in eval
        mode, so set them every step."""
        self.model.train()
        if self.k == 0 or self.train_earlier:
            return
        for net in (self.model.online, self.model.target):
            net.stem.eval()
            for j in range(self.k):
                net.blocks[j].eval()

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(online, target) inputs of block ``k``; the online one carries gradients into the earlier
        blocks when they keep training."""
        with torch.no_grad():
            target = self.model.prefix("target", x, self.prefix_paths)
        with torch.set_grad_enabled(self.train_earlier and torch.is_grad_enabled()):
            online = self.model.prefix("online", x, self.prefix_paths)
        return online, target

    def bootstrap_losses(
        self, x: torch.Tensor, paths: Sequence[Candidate], generator: torch.Generator | None, backward: bool
    ) -> list[torch.Tensor]:
        """Per-path symmetric BYOL losses against the ensemble targets (backward per path if asked).

        Every path gets its own two views of ``x`` (B, C, H, W), run as one (2B, ...) batch.
        """
        b = x.shape[0]
        views = [
            torch.cat([make_view(x, self.cfg.views, generator), make_view(x, self.cfg.views, generator)]) for _ in paths
        ]  # each (2B, C, H, W): view 1 then view 2
        feats = [self._features(v) for v in views]
        with torch.no_grad():
            proj = [self.model.target_projection(self.k, f_target, p) for (_, f_target), p in zip(feats, paths)]
            t1 = ensemble_target([t[:b] for t in proj])  # (B, D)
            t2 = ensemble_target([t[b:] for t in proj])
        losses = []
        for (f_online, _), p in zip(feats, paths):
            z = self.model.online_prediction(self.k, f_online, p)  # (2B, D)
            loss = byol_loss(z[:b], t2) + byol_loss(z[b:], t1)
            if backward:
                self.manual_backward(loss)
            losses.append(loss.detach())
        return losses

    # -- Lightning hooks ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        online = nn.ModuleList(
            [
                *(self.model.earlier_modules("online", self.k) if self.train_earlier else []),
                *self.model.trained_modules("online", self.k),
                self.model.online_proj[self.k],
                self.model.predictor[self.k],
            ]
        )
        params = list(online.parameters())
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.total_steps)
        return {"optimizer": opt, "lr_scheduler": sched}

    def on_fit_start(self) -> None:
        self.total_steps = max(1, int(self.trainer.estimated_stepping_batches))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self._set_modes()
        x = batch[0]  # (B, C, H, W)
        opt = self.optimizers()
        sched = self.lr_schedulers()
        opt.zero_grad()
        step = self.global_step  # this step's index (0-based); manual optimization advances it in opt.step()
        rng = random.Random(torch.randint(0, 2**31 - 1, (1,)).item())  # follows the runner's per-epoch seeding
        losses = self.bootstrap_losses(x, self.sample_paths(rng), None, backward=True)
        opt.step()
        sched.step()
        momentum = momentum_at(step, self.total_steps, self.cfg.base_momentum)  # base at the first step
        ema_update(*self.model.block_pairs(self.k, earlier=self.train_earlier), momentum)
        loss = torch.stack(losses).mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("momentum", momentum, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        gen = torch.Generator().manual_seed(10_000 + batch_idx)
        paths = random.Random(batch_idx).sample(self.candidates, min(self.cfg.num_paths, len(self.candidates)))
        loss = torch.stack(self.bootstrap_losses(x, paths, gen, backward=False)).mean()
        self.log("val_loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss


# ---------------------------------------------------------------------------------------------
# rating
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def candidate_outputs(
    model: SiameseSupernet,
    k: int,
    candidate: Candidate,
    recal: Sequence[tuple[torch.Tensor, torch.Tensor]],
    views: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidate's (online predictions, target projections), each (2, N, D) for the two views.

    ``recal``: (online, target) prefix features of the recalibration batches; ``views``: per batch
    ((online v1, target v1), (online v2, target v2)) prefix features. Norm statistics of the
    candidate are re-estimated first, so the result never depends on what ran before.
    """
    online = nn.ModuleList([*model.trained_modules("online", k), model.online_proj[k], model.predictor[k]])
    target = nn.ModuleList([*model.trained_modules("target", k), model.target_proj[k]])
    recalibrate_norm_stats(
        online, [h for h, _ in recal], len(recal), forward=lambda h: model.online_prediction(k, h, candidate)
    )
    recalibrate_norm_stats(
        target, [h for _, h in recal], len(recal), forward=lambda h: model.target_projection(k, h, candidate)
    )
    preds: list[list[torch.Tensor]] = [[], []]
    projs: list[list[torch.Tensor]] = [[], []]
    for pair in views:
        for v, (h_online, h_target) in enumerate(pair):
            preds[v].append(model.online_prediction(k, h_online, candidate))
            projs[v].append(model.target_projection(k, h_target, candidate))
    return torch.stack([torch.cat(p) for p in preds]), torch.stack([torch.cat(p) for p in projs])


def score_candidates(
    predictions: torch.Tensor, projections: torch.Tensor, normalized_center: bool = False
) -> torch.Tensor:
    """Scores from all candidates' outputs, each (P, 2, N, D): symmetric BYOL distance of every
    candidate's online prediction of view v to the population center of the other view."""
    c1 = population_center(projections[:, 0], normalized_center)  # (N, D)
    c2 = population_center(projections[:, 1], normalized_center)
    d12 = 2 - 2 * F.cosine_similarity(predictions[:, 0], c2[None], dim=-1)  # (P, N)
    d21 = 2 - 2 * F.cosine_similarity(predictions[:, 1], c1[None], dim=-1)
    return (d12 + d21).mean(1)


@torch.no_grad()
def rate_block(
    model: SiameseSupernet,
    adapter: SpaceAdapter,
    k: int,
    prefix: Sequence[Candidate],
    recal_images: Sequence[torch.Tensor],
    eval_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    candidates: Sequence[Candidate] | None = None,
    normalized_center: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """``{candidate key: score}`` for every (or the given) candidate of block ``k`` (lower is better)."""
    model.eval()
    device = next(model.parameters()).device
    recal_images = [x.to(device) for x in recal_images]
    eval_pairs = [(v1.to(device), v2.to(device)) for v1, v2 in eval_pairs]
    candidates = list(candidates) if candidates is not None else adapter.candidates(k, prefix)
    recal = [(model.prefix("online", x, prefix), model.prefix("target", x, prefix)) for x in recal_images]
    views = [
        tuple((model.prefix("online", v, prefix), model.prefix("target", v, prefix)) for v in pair)
        for pair in eval_pairs
    ]
    preds, projs = [], []
    for cand in tqdm(candidates, desc=f"rate block {k}", disable=not progress, leave=False):
        p, t = candidate_outputs(model, k, cand, recal, views)
        preds.append(p)
        projs.append(t)
    scores = score_candidates(torch.stack(preds), torch.stack(projs), normalized_center)
    return {adapter.key(k, c): float(s) for c, s in zip(candidates, scores.tolist())}


def rating_data(
    dm: DigitsDataModule, cfg: BossNASConfig
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, torch.Tensor]]]:
    """Fixed (seeded) recalibration views of training batches and view pairs of the validation set."""
    dm.setup()
    assert dm.splits is not None
    gen = torch.Generator().manual_seed(cfg.seed + 12345)
    x_train = dm.splits["train"][0]
    order = torch.randperm(len(x_train), generator=gen)
    recal = [
        make_view(x_train[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]], cfg.views, gen)
        for i in range(cfg.recal_batches)
    ]
    x_val = dm.splits["val"][0]
    pairs = [(make_view(x_val, cfg.views, gen), make_view(x_val, cfg.views, gen)) for _ in range(cfg.rate_views)]
    return [r for r in recal if len(r) > 1], pairs


# ---------------------------------------------------------------------------------------------
# the whole search
# ---------------------------------------------------------------------------------------------
def make_adapter(cfg: BossNASConfig) -> SpaceAdapter:
    if cfg.space == "hytra":
        return HyTraAdapter(hytra_digits(cfg.hytra_layers, cfg.hytra_width))
    from nas.methods.dna import DNAConfig  # the core's digits MBConv space: the one DNA and the ground truth use

    dna = load_config(DNAConfig, cfg.mbconv_config, packages=("nas",)) if cfg.mbconv_config else DNAConfig()
    return MBConvAdapter(dna.space)


def _prepare_prefix(model: SiameseSupernet, prefix: Sequence[Candidate], images: Sequence[torch.Tensor]) -> None:
    """Re-estimate the norm statistics of the stem and the searched earlier blocks (both nets)."""
    if not prefix:
        return
    device = next(model.parameters()).device
    images = [x.to(device) for x in images]
    for which, net in (("online", model.online), ("target", model.target)):
        modules = nn.ModuleList([net.stem, *[net.blocks[j] for j in range(len(prefix))]])
        recalibrate_norm_stats(modules, images, len(images), forward=lambda x, w=which: model.prefix(w, x, prefix))


def run_search(
    cfg: BossNASConfig, adapter: SpaceAdapter | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Train, rate and search every block (resuming finished/interrupted blocks); write
    ``ratings.json``, ``architecture.json`` and ``report.md`` to ``cfg.out_dir``; return the summary."""
    return BossNAS(cfg, adapter, log).search()


@register
class BossNAS(SearchMethod):
    """BossNAS behind the method interface: blocks in order, each trained with the earlier blocks fixed to
    their searched best path, then rated; the rating table's search picks the architecture."""

    name = "bossnas"
    config_class = BossNASConfig
    description = "BossNAS: self-supervised block-wise search with ensemble bootstrapping"

    def __init__(
        self, cfg: BossNASConfig, adapter: SpaceAdapter | None = None, log: Callable[[str], None] = print
    ) -> None:
        super().__init__(cfg)
        self.cfg: BossNASConfig = cfg
        self.log = log
        self.adapter = adapter or make_adapter(cfg)
        self.norm_layer = make_norm(cfg.norm, cfg.bkn_prior_weight)
        self.model: SiameseSupernet | None = None
        self.prefix: list[Candidate] = []  # searched best candidates of the finished blocks
        self.infos: list[dict[str, Any]] = []  # per finished block: best, ratings, costs, seconds
        self._block_t0 = 0.0

    @classmethod
    def default_config(cls, argv: Sequence[str]) -> str | None:
        hytra = any(a in ("--space=hytra", "--space hytra") for a in argv) or any(
            a == "--space" and b == "hytra" for a, b in zip(argv, argv[1:])
        )
        return HYTRA_CONFIG if hytra else DEFAULT_CONFIG

    @property
    def num_blocks(self) -> int:
        return self.adapter.num_blocks

    def artefacts(self) -> list[Artefact]:
        """Every ``block<k>/``; block k trains on blocks 0..k-1's searched paths, so each depends on the whole
        training config (the space itself stands for ``mbconv_config``, the file that holds it)."""
        fields = {**config_fields(self.cfg, drop=("budget", "cost", "mbconv_config")), "space_spec": self.adapter.space}
        return [Artefact(self.out_dir / f"block{k}", fields, f"block {k}")
                for k in range(self.num_blocks)]

    def check_budget(self) -> None:
        if self.cfg.budget is not None:
            check_budget(self.cfg.budget, self.adapter.cheapest(self.cfg.cost, self.norm_layer), self.cfg.cost,
                         "legal architecture")

    def prepare(self) -> None:
        """Seeded supernet, data, the fixed rating data; ``config.json`` in ``out_dir``."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        pl.seed_everything(self.cfg.seed, verbose=False)
        self.model = SiameseSupernet(self.adapter, self.norm_layer, self.cfg.proj_hidden, self.cfg.proj_dim)
        self.datamodule = DigitsDataModule(batch_size=self.cfg.batch_size, seed=self.cfg.data_seed)
        self.recal_images, self.eval_pairs = rating_data(self.datamodule, self.cfg)
        write_json(self.out_dir / "config.json", self.cfg.to_json())

    def train_block(self, k: int) -> None:
        assert self.model is not None, "prepare() first"
        cfg, bdir = self.cfg, self.out_dir / f"block{k}"
        self._block_t0 = time.time()
        _prepare_prefix(self.model, self.prefix, self.recal_images)
        system = BossNASBlockSystem(self.model, self.adapter, k, self.prefix, cfg)
        resume = (bdir / "checkpoints" / "last.ckpt").is_file()
        run_cfg = RunConfig(
            out_dir=str(bdir),
            max_epochs=cfg.epochs_per_block,
            seed=cfg.seed + k,
            progress_bar=cfg.progress,
            loggers=("csv",),
            resume=resume,
            test=False,
            limit_train_batches=cfg.limit_train_batches,
            limit_val_batches=cfg.limit_val_batches,
            log_every_n_steps=1,
            accelerator="auto",
            devices=1,
        )
        fit(system, self.datamodule, run_cfg)

    def rate_block(self, k: int) -> dict[str, float]:
        assert self.model is not None, "prepare() first"
        adapter, prefix, bdir = self.adapter, self.prefix, self.out_dir / f"block{k}"
        _prepare_prefix(self.model, prefix, self.recal_images)  # the prefix trained on (earlier_blocks: train)
        if self.cfg.workers > 1:  # blocks stay sequential (each trains on the searched prefix); candidates split
            from nas.parallel import rate_candidates_parallel

            scores = rate_candidates_parallel(self, k, self.cfg.workers, self.cfg.worker_threads)
        else:
            scores = rate_block(
                self.model,
                adapter,
                k,
                prefix,
                self.recal_images,
                self.eval_pairs,
                normalized_center=self.cfg.center_normalized,
                progress=self.cfg.progress,
            )
        cands = adapter.candidates(k, prefix)
        block_costs = {adapter.key(k, c): adapter.cost(k, prefix, c, self.norm_layer) for c in cands}
        best_key = min(scores, key=scores.__getitem__)
        best = next(c for c in cands if adapter.key(k, c) == best_key)
        torch.save(self.model.state_dict(), bdir / "model.pt")
        info = {
            "block": k,
            "best": list(best),
            "best_key": best_key,
            "ratings": scores,
            "costs": block_costs,
            "seconds": time.time() - self._block_t0,
        }
        write_json(bdir / "done.json", info)
        self.log(f"block {k}: rated {len(scores)} candidates in {info['seconds']:.0f} s; best {best_key}")
        return scores

    def _finished(self, k: int) -> dict[str, Any] | None:
        """A finished block's info (its trained weights loaded), else None."""
        assert self.model is not None, "prepare() first"
        bdir = self.out_dir / f"block{k}"
        if not (bdir / "done.json").is_file():
            return None
        info = json.loads((bdir / "done.json").read_text())
        self.model.load_state_dict(torch.load(bdir / "model.pt", map_location="cpu", weights_only=True))
        self.log(f"block {k}: finished earlier, skipped (best {info['best']})")
        return info

    def search(self) -> dict[str, Any]:
        self._t0 = time.time()
        self.preflight()
        self.prepare()
        for k in range(self.num_blocks):
            info = self._finished(k)
            if info is None:
                self.train_block(k)
                self.rate_block(k)
                info = json.loads((self.out_dir / f"block{k}" / "done.json").read_text())
            self.prefix.append(tuple(info["best"]))
            self.infos.append(info)
        return self.report([info["ratings"] for info in self.infos])

    def report(self, ratings: Sequence[dict[str, float]]) -> dict[str, Any]:
        cfg, adapter, out = self.cfg, self.adapter, self.out_dir
        costs = [info["costs"] for info in self.infos]
        table = RatingTable(
            list(ratings),
            costs,
            metric="bossnas_center_byol",
            lower_is_better=True,
            meta={"method": "bossnas", "space": adapter.name, "norm": cfg.norm},
        )
        save_ratings(table, out / "ratings.json")
        found = adapter.search(table, cfg.budget, cfg.cost)
        arch = {
            **found,
            "space": adapter.name,
            "ops": adapter.describe([tuple(c) for c in found["encoding"]]),
            "params": sum(costs[k][key]["params"] for k, key in enumerate(found["keys"])),
            "flops": sum(costs[k][key]["flops"] for k, key in enumerate(found["keys"])),
            "budget": cfg.budget,
            "cost": cfg.cost,
        }
        write_json(out / "architecture.json", arch)
        summary = {
            "architecture": arch,
            "block_seconds": [float(info["seconds"]) for info in self.infos],
            "seconds": time.time() - self._t0,
            "num_candidates": [len(r) for r in ratings],
        }
        (out / "report.md").write_text(_report(cfg, adapter, table, arch, summary))
        self.log(f"searched {arch['keys']} (score {arch['score']:.4f}, {arch['params']} params); wrote {out}")
        return summary


def _report(
    cfg: BossNASConfig, adapter: SpaceAdapter, table: RatingTable, arch: dict[str, Any], summary: dict[str, Any]
) -> str:
    lines = [
        f"# BossNAS search on digits ({adapter.name}, norm {cfg.norm})",
        "",
        f"- {cfg.epochs_per_block} epochs per block, batch {cfg.batch_size}, sampling {cfg.sampling}, "
        f"base momentum {cfg.base_momentum}",
        f"- candidates rated per block: {summary['num_candidates']}",
        f"- training + rating time per block (s): {[round(s) for s in summary['block_seconds']]}",
        f"- constraint: {'none (best per block)' if cfg.budget is None else f'{cfg.cost} < {cfg.budget:g}'}",
        "",
        "| block | searched | score | best | worst |",
        "|---|---|---|---|---|",
    ]
    for k, key in enumerate(arch["keys"]):
        r = table.block_ratings[k]
        lines.append(
            f"| {k} | {key} ({', '.join(arch['ops'][k]) or 'all skip'}) | {r[key]:.4f} | "
            f"{min(r.values()):.4f} | {max(r.values()):.4f} |"
        )
    lines += [
        "",
        f"Searched architecture: blocks hold {arch['params']} params and {arch['flops']} FLOPs (stem and "
        f"classifier excluded); score {arch['score']:.4f}.",
    ]
    return "\n".join(lines) + "\n"
