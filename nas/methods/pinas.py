"""Pi-NAS: a whole single-path supernet trained without labels, with cross-path learning and a
path-restricted mean teacher (Peng et al., ICCV 2021), on the core's MBConv spaces.

Pipeline (each stage resumable from ``out_dir``):

1. Contrastive supernet training (``supernet/``, the shared runner, ``last.ckpt`` every epoch). Encoder =
   supernet + neck (global average pooling -> Linear -> ReLU -> Linear); key encoder = a copy without
   gradients; a FIFO queue of L2-normalized negatives; InfoNCE with temperature ``temperature``.
   Every step samples two paths A and B that differ in every layer (:func:`sample_path_pair`) and four
   views of the batch: ``q_A, k_A, q_B, k_B``. Cross-path learning: ``q_A`` meets ``k_B`` and ``q_B``
   meets ``k_A`` (``cross_path: false``: each query meets its own path's key, a plain MoCo supernet
   with two paths per step). The queue receives the mean of the two keys.
   Path-restricted mean teacher: before the key pass of path P the key encoder's stem, P's ops and the
   neck move ``theta_k <- m theta_k + (1 - m) theta_q``; ops not on P stay bit-identical
   (``restricted_teacher: false``: every parameter moves, as in MoCo). Shuffle-BN on one device: the key
   batch is permuted and run in ``shuffle_bn_groups`` ghost groups, each normalized with its own batch
   statistics, then un-permuted (:meth:`PiNASModel.key`).
2. Linear probe (``probe.pt``): a linear classifier on the frozen backbone's pooled features, one random
   path per step, norms in training mode (batch statistics), as the authors' linear training.
3. Rating (``rows.json``): every architecture of the space (or ``rate_sample`` of them plus
   ``rate_include``'s encodings) after re-estimating its norm statistics on ``recal_batches`` training
   batches (BN and BKN alike, :mod:`nas.recalibration`): validation accuracy of the probe, cross-entropy
   as tie-break: ``score = accuracy + exp(-CE) / (N_val + 1)`` (the second term never reorders accuracies).
4. Scores of whole architectures are not block-additive: they form whole-architecture rows
   (:class:`nas.search.ratings.ArchitectureRatings`, ``ratings.json``) searched by a scan
   (:func:`nas.search.constrained.search_rows`), optionally under a ``budget``.

Interface choice: Pi-NAS is behind :class:`nas.methods.base.SearchMethod` with ONE "block", the whole
supernet: ``num_blocks == 1``, ``train_block(0)`` trains the supernet and the probe, ``rate_block(0)``
returns ``{architecture key: score}`` with keys :func:`architecture_key` (block keys joined by ``|``) and
``report`` turns them into rows.

Cached artefacts (:mod:`nas.cache`): ``supernet/`` (training, probe) and ``rows.json`` (ratings) carry a record of
the config values that determine them; a rerun reuses them only under the same values and otherwise refuses,
naming the differing keys, unless ``overwrite`` (then they are recomputed). A ``budget`` is checked against the
cheapest architecture to be rated before any training.

CLI: ``python -m nas.search pinas [--config pinas_digits|FILE] [--cross-path false] [--restricted-teacher false]
[--norm bkn] [--out-dir DIR]``.
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
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nas.cache import Artefact, config_fields, write_json
from nas.costs import block_cost_table
from nas.data import DigitsDataModule
from nas.data.views import ViewConfig, make_view
from nas.methods.base import SearchMethod, register
from nas.ops import make_norm, seeded_init
from nas.recalibration import recalibrate_norm_stats
from nas.search.constrained import check_budget, search_rows
from nas.search.ratings import ArchitectureRatings, save_ratings
from nas.spaces import Candidate, SearchSpace, candidate_key
from nas.supernet import Supernet
from stflow.runner import RunConfig, fit, last_checkpoint

__all__ = [
    "PiNAS",
    "PiNASConfig",
    "PiNASModel",
    "PiNASSystem",
    "Neck",
    "sample_path_pair",
    "info_nce",
    "pinas_loss",
    "train_probe",
    "rate_architectures",
    "rate_all_architectures",
    "architecture_key",
    "parse_architecture_key",
    "feature_shift",
    "run_pinas",
]

DEFAULT_CONFIG = "pinas_digits"
Encoding = tuple[Candidate, ...]


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------
def _digits_space() -> SearchSpace:
    from nas.methods.dna import DNAConfig  # the core's digits space: the one the ground truth covers

    return DNAConfig().space


@dataclass
class PiNASConfig:
    """Everything a Pi-NAS search needs (defaults: the packaged ``pinas_digits`` config)."""

    space: Any = None  # None: the core's digits MBConv space (DNA's); or a SearchSpace mapping (YAML)
    norm: str = "bn"  # "bn" | "bkn"
    bkn_prior_weight: float = 0.5  # BKN's prior weight p inside the supernets (see nas.ops.make_norm)
    cross_path: bool = True  # query of path A meets the key of path B and vice versa
    restricted_teacher: bool = True  # EMA only of the stem, the sampled path's ops and the neck
    epochs: int = 60
    batch_size: int = 128
    lr: float = 1e-2
    weight_decay: float = 1e-4
    momentum: float = 0.99  # key encoder EMA momentum m (constant, as MoCo)
    temperature: float = 0.2
    queue_size: int = 1024
    feat_dim: int = 32
    neck_hidden: int = 128
    shuffle_bn_groups: int = 2  # ghost groups of the permuted key batch (1: one group, i.e. no shuffle-BN)
    views: ViewConfig = field(default_factory=ViewConfig)
    probe_epochs: int = 10
    probe_lr: float = 1e-2
    recal_batches: int = 2
    rate_sample: int | None = None  # None: every architecture; else this many uniformly drawn (seeded), 0: none
    rate_include: str | None = None  # a ground-truth JSON whose encodings are always rated (with rate_sample)
    budget: float | None = None  # constrained search: cost < budget (None: the best rated architecture)
    cost: str = "params"
    seed: int = 0
    data_seed: int = 0
    out_dir: str = "runs/pinas-digits"
    progress: bool = True
    resume: bool = True
    overwrite: bool = False  # recompute cached artefacts made with another config (else refused)
    limit_train_batches: int | None = None

    def __post_init__(self) -> None:
        if self.space is None:
            self.space = _digits_space()
        elif isinstance(self.space, dict):
            self.space = SearchSpace.from_dict(self.space)
        if isinstance(self.views, dict):
            self.views = ViewConfig(**self.views)
        checks = [
            (isinstance(self.space, SearchSpace), "space must be a mapping (or a SearchSpace) or null"),
            (self.norm in ("bn", "bkn"), f"norm must be 'bn' or 'bkn', got {self.norm!r}"),
            (0.0 <= self.bkn_prior_weight <= 1.0, f"bkn_prior_weight must be in [0, 1], got {self.bkn_prior_weight}"),
            (0.0 <= self.momentum <= 1.0, f"momentum must be in [0, 1], got {self.momentum}"),
            (self.temperature > 0, f"temperature must be > 0, got {self.temperature}"),
            (self.epochs >= 1 and self.probe_epochs >= 1, "epochs and probe_epochs must be >= 1"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (batch statistics), got {self.batch_size}"),
            (self.queue_size >= 1 and self.feat_dim >= 1 and self.neck_hidden >= 1,
             "queue_size, feat_dim and neck_hidden must be >= 1"),
            (1 <= self.shuffle_bn_groups <= self.batch_size // 2,
             f"shuffle_bn_groups must be in [1, batch_size / 2], got {self.shuffle_bn_groups}"),
            (self.lr > 0 and self.probe_lr > 0, "lr and probe_lr must be > 0"),
            (self.recal_batches >= 1, f"recal_batches must be >= 1, got {self.recal_batches}"),
            (self.rate_sample is None or self.rate_sample >= 0, f"rate_sample must be >= 0, got {self.rate_sample}"),
            (self.rate_sample != 0 or self.rate_include is not None, "rate_sample 0 rates only rate_include's"),
            (self.cost in ("params", "flops"), f"cost must be 'params' or 'flops', got {self.cost!r}"),
            (self.budget is None or math.isfinite(self.budget),
             f"budget must be a finite number or null, got {self.budget!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"PiNASConfig: {msg}")
        if any(b.multi_cell for b in self.space.blocks):
            raise ValueError("PiNASConfig: multi-cell blocks are not supported (paths must differ in every layer)")

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["space"] = self.space.name
        out["views"] = dataclasses.asdict(self.views)
        return out


# ---------------------------------------------------------------------------------------------
# paths, keys, loss
# ---------------------------------------------------------------------------------------------
def sample_path_pair(space: SearchSpace, rng: random.Random) -> tuple[Encoding, Encoding]:
    """Two paths that differ in every layer: per layer two distinct ops drawn uniformly (a layer with
    one op repeats it). Each op of an m-op layer is on one of the two paths with probability 2/m."""
    a: list[Candidate] = []
    b: list[Candidate] = []
    for block in space.blocks:
        ops_a, ops_b = [], []
        for layer in block.cells[0].layers:
            m = len(layer.ops)
            i, j = rng.sample(range(m), 2) if m >= 2 else (0, 0)
            ops_a.append(i)
            ops_b.append(j)
        a.append(tuple(ops_a))
        b.append(tuple(ops_b))
    return tuple(a), tuple(b)


def architecture_key(encoding: Sequence[Sequence[int]]) -> str:
    """``"12|12|00"``: the block keys (:func:`nas.spaces.candidate_key`) joined by ``|``."""
    return "|".join(candidate_key(c) for c in encoding)


def parse_architecture_key(key: str) -> Encoding:
    from nas.spaces import parse_candidate_key

    return tuple(parse_candidate_key(k) for k in key.split("|"))


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of queries ``q`` (B, D) against positive keys ``k`` (B, D) and negatives ``queue`` (D, K):
    cross-entropy of ``[q.k, q.queue] / T`` with the positive at index 0 (mean over the batch)."""
    pos = (q * k.detach()).sum(1, keepdim=True)  # (B, 1)
    neg = q @ queue.detach()  # (B, K)
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def pinas_loss(
    q_a: torch.Tensor, k_a: torch.Tensor, q_b: torch.Tensor, k_b: torch.Tensor, queue: torch.Tensor,
    temperature: float, cross_path: bool = True,
) -> torch.Tensor:
    """Sum of the two InfoNCE terms: ``(q_A, k_B) + (q_B, k_A)`` (cross-path) or ``(q_A, k_A) + (q_B, k_B)``."""
    if cross_path:
        return info_nce(q_a, k_b, queue, temperature) + info_nce(q_b, k_a, queue, temperature)
    return info_nce(q_a, k_a, queue, temperature) + info_nce(q_b, k_b, queue, temperature)


class Neck(nn.Module):
    """Global average pooling -> Linear -> ReLU -> Linear (MoCo v2's non-linear neck)."""

    def __init__(self, in_channels: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, out_dim)
        return self.mlp(x.mean((2, 3)))


class PiNASModel(nn.Module):
    """Query encoder (``backbone`` + ``neck``), key encoder (``key_backbone`` + ``key_neck``, no gradients)
    and the queue of negatives (``queue`` (D, K), L2-normalized columns; ``queue_ptr``)."""

    def __init__(
        self, space: SearchSpace, norm_layer: Callable[[int], nn.Module], neck_hidden: int = 128,
        feat_dim: int = 32, queue_size: int = 1024,
    ) -> None:
        super().__init__()
        self.space = space
        self.backbone = Supernet(space, norm_layer)
        self.neck = Neck(space.blocks[-1].out_channels, neck_hidden, feat_dim)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_neck = copy.deepcopy(self.neck)
        for p in [*self.key_backbone.parameters(), *self.key_neck.parameters()]:
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(feat_dim, queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def query(self, x: torch.Tensor, path: Encoding) -> torch.Tensor:
        """(B, C, H, W) -> L2-normalized query embeddings (B, D)."""
        return F.normalize(self.neck(self.backbone(x, path)), dim=1)

    @torch.no_grad()
    def key(
        self, x: torch.Tensor, path: Encoding, groups: int = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """L2-normalized key embeddings (B, D) of the key encoder. Shuffle-BN on one device: the batch is
        permuted and run in ``groups`` ghost groups (each normalized with its own batch statistics), then
        un-permuted, so a key never shares normalization statistics with exactly its query's batch."""
        if groups <= 1:
            return F.normalize(self.key_neck(self.key_backbone(x, path)), dim=1)
        perm = torch.randperm(len(x), generator=generator).to(x.device)
        out = torch.cat([self.key_neck(self.key_backbone(chunk, path)) for chunk in x[perm].chunk(groups)])
        return F.normalize(out[torch.argsort(perm)], dim=1)

    def ema_pairs(self, path: Encoding | None) -> list[tuple[nn.Module, nn.Module]]:
        """(key, query) module pairs the mean teacher moves before a key pass of ``path``: the stem, the ops
        on ``path`` and the neck; ``path=None``: the whole encoders (plain MoCo)."""
        if path is None:
            return [(self.key_backbone, self.backbone), (self.key_neck, self.neck)]
        pairs = [(self.key_backbone.stem, self.backbone.stem)]
        for kb, qb, cand in zip(self.key_backbone.blocks, self.backbone.blocks, path):
            pairs += list(zip(kb.path(cand), qb.path(cand)))
        return pairs + [(self.key_neck, self.neck)]

    @torch.no_grad()
    def momentum_update(self, path: Encoding | None, momentum: float) -> None:
        """``theta_k <- m theta_k + (1 - m) theta_q`` on :meth:`ema_pairs` (parameters only; the key
        encoder keeps its own normalization statistics)."""
        for key_mod, query_mod in self.ema_pairs(path):
            for pk, pq in zip(key_mod.parameters(), query_mod.parameters()):
                pk.mul_(momentum).add_(pq.detach(), alpha=1.0 - momentum)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: write ``keys`` (B, D) into the queue from ``queue_ptr`` on, wrapping around."""
        size = self.queue.shape[1]
        keys = keys[-size:]  # a batch larger than the queue keeps its newest keys
        idx = (int(self.queue_ptr) + torch.arange(len(keys), device=keys.device)) % size
        self.queue[:, idx] = keys.T.to(self.queue.dtype)
        self.queue_ptr[0] = (int(self.queue_ptr) + len(keys)) % size


# ---------------------------------------------------------------------------------------------
# training the supernet
# ---------------------------------------------------------------------------------------------
class PiNASSystem(pl.LightningModule):
    """One step: paths A, B (:func:`sample_path_pair`), views ``q_A, k_A, q_B, k_B``; ``q_A``; the mean
    teacher moves for A; ``k_A``; ``q_B``; the mean teacher moves for B; ``k_B``; :func:`pinas_loss`;
    the queue receives ``(k_A + k_B) / 2``; then the optimizer step (automatic optimization).

    Paths and views of step t come from seeds of (seed, t), so a resumed run repeats the uninterrupted
    one's draws. ``param_shift`` collects ``||theta_k(after) - theta_k(before)|| / ||theta_k(before)||``
    of the whole key encoder per step (the parameter shift; not checkpointed)."""

    def __init__(self, model: PiNASModel, cfg: PiNASConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.param_shift: list[float] = []

    def step_draws(self, step: int) -> tuple[tuple[Encoding, Encoding], torch.Generator]:
        rng = random.Random(self.cfg.seed * 1_000_003 + step)
        return sample_path_pair(self.model.space, rng), torch.Generator().manual_seed(self.cfg.seed * 7_919 + step)

    def _key_vector(self) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in [*self.model.key_backbone.parameters(),
                                                          *self.model.key_neck.parameters()]])

    def forward_step(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """The loss of one training step on batch ``x`` (B, C, H, W), with the mean-teacher updates and the
        enqueue done in between (the optimizer step is the caller's)."""
        cfg, model = self.cfg, self.model
        (path_a, path_b), gen = self.step_draws(step)
        v_qa, v_ka, v_qb, v_kb = (make_view(x, cfg.views, gen) for _ in range(4))
        before = self._key_vector()
        q_a = model.query(v_qa, path_a)
        model.momentum_update(path_a if cfg.restricted_teacher else None, cfg.momentum)
        k_a = model.key(v_ka, path_a, cfg.shuffle_bn_groups, gen)
        q_b = model.query(v_qb, path_b)
        model.momentum_update(path_b if cfg.restricted_teacher else None, cfg.momentum)
        k_b = model.key(v_kb, path_b, cfg.shuffle_bn_groups, gen)
        loss = pinas_loss(q_a, k_a, q_b, k_b, model.queue.clone(), cfg.temperature, cfg.cross_path)
        model.enqueue((k_a + k_b) / 2)
        self.param_shift.append(float((self._key_vector() - before).norm() / before.norm().clamp_min(1e-12)))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0]
        loss = self.forward_step(x, self.global_step)
        self.log("train_loss", loss, prog_bar=True, batch_size=len(x))
        return loss

    def configure_optimizers(self) -> Any:
        params = [*self.model.backbone.parameters(), *self.model.neck.parameters()]
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.cfg.epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


# ---------------------------------------------------------------------------------------------
# linear probe and rating
# ---------------------------------------------------------------------------------------------
def _features(backbone: Supernet, x: torch.Tensor, path: Encoding) -> torch.Tensor:
    return backbone(x, path).mean((2, 3))  # (B, C, H, W) -> (B, C)


def train_probe(
    backbone: Supernet, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, batch_size: int, seed: int,
    num_classes: int = 10,
) -> nn.Linear:
    """A linear classifier on the frozen backbone's pooled features; one random path per step, norms in
    training mode (batch statistics; the running statistics it leaves are re-estimated when rating)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    with seeded_init(seed):
        probe = nn.Linear(backbone.space.blocks[-1].out_channels, num_classes)
    opt = torch.optim.Adam(probe.parameters(), lr=lr)
    backbone.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x) - batch_size // 2, batch_size):  # a short last batch joins nothing: dropped
            idx = order[i : i + batch_size]
            with torch.no_grad():
                feats = _features(backbone, x[idx], backbone.sample(rng))
            loss = F.cross_entropy(probe(feats), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    backbone.eval()
    return probe


@torch.no_grad()
def rate_architectures(
    backbone: Supernet,
    probe: nn.Module,
    encodings: Sequence[Encoding],
    recal_images: Sequence[torch.Tensor],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Per encoding ``{"encoding", "score", "accuracy", "ce"}``: norm statistics re-estimated on
    ``recal_images`` (so the result never depends on what was rated before), then the probe's validation
    accuracy; ``score = accuracy + exp(-CE) / (N_val + 1)`` (cross-entropy only breaks ties)."""
    rows = []
    for enc in tqdm(encodings, desc="rate architectures", disable=not progress, leave=False):
        recalibrate_norm_stats(backbone, recal_images, len(recal_images), forward=lambda x, e=enc: backbone(x, e))
        logits = probe(_features(backbone, x_val, enc))
        acc = float((logits.argmax(1) == y_val).float().mean())
        ce = float(F.cross_entropy(logits, y_val))
        rows.append({"encoding": [list(c) for c in enc], "score": acc + math.exp(-ce) / (len(y_val) + 1),
                     "accuracy": acc, "ce": ce})
    return rows


@torch.no_grad()
def rate_all_architectures(
    backbone: Supernet,
    probe: nn.Module,
    recal_images: Sequence[torch.Tensor],
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    encodings: Sequence[Encoding] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """:func:`rate_architectures` of every architecture (or of ``encodings``), computed as a depth-first walk
    over block prefixes: block k's normalization statistics depend only on its own inputs, i.e. on the
    prefix of blocks ``< k``, so each prefix is recalibrated and run once and shared by every architecture
    below it. Identical to recalibrating every architecture from scratch (block by block, the same
    batches in the same order, upstream layers in training mode while recalibrating, in eval mode on the
    validation images), at a fraction of the cost; rows come in the order of ``encodings`` (default: the
    lexicographic order of the block candidates)."""
    space = backbone.space
    wanted = None if encodings is None else {tuple(tuple(c) for c in e) for e in encodings}
    prefixes = None if wanted is None else {w[:j] for w in wanted for j in range(1, len(w) + 1)}
    per_block = [list(b.enumerate()) for b in space.blocks]
    stem = backbone.stem
    recal = []  # training-mode stem outputs of the recalibration batches (stem statistics re-estimated)
    recalibrate_norm_stats(stem, recal_images, len(recal_images), forward=lambda x: recal.append(stem(x)))
    val = stem(x_val)
    rows: dict[Encoding, dict[str, Any]] = {}
    total = space.num_architectures() if wanted is None else len(wanted)
    bar = tqdm(total=total, desc="rate architectures", disable=not progress, leave=False)

    def walk(k: int, prefix: tuple[Candidate, ...], h_recal: list[torch.Tensor], h_val: torch.Tensor) -> None:
        block = backbone.blocks[k]
        for cand in per_block[k]:
            path = (*prefix, cand)
            if prefixes is not None and path not in prefixes:
                continue
            outs: list[torch.Tensor] = []
            run = lambda h, c=cand, o=outs: o.append(block(h, c))  # noqa: E731  (keeps the training-mode outputs)
            recalibrate_norm_stats(block, h_recal, len(h_recal), forward=run)
            out_val = block(h_val, cand)
            if k + 1 < len(per_block):
                walk(k + 1, path, outs, out_val)
                continue
            logits = probe(out_val.mean((2, 3)))
            acc = float((logits.argmax(1) == y_val).float().mean())
            ce = float(F.cross_entropy(logits, y_val))
            rows[path] = {"encoding": [list(c) for c in path], "score": acc + math.exp(-ce) / (len(y_val) + 1),
                          "accuracy": acc, "ce": ce}
            bar.update()

    walk(0, (), recal, val)
    bar.close()
    backbone.eval()
    order = list(rows) if encodings is None else [tuple(tuple(c) for c in e) for e in encodings]
    return [rows[e] for e in order]


# ---------------------------------------------------------------------------------------------
# the feature shift
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def feature_shift(backbone: Supernet, x: torch.Tensor, pairs: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """Per layer with a prefix (every layer but block 0's first), the mean over ``pairs`` pairs of random
    paths of ``RMS_c |mu_A,c - mu_B,c| / sigma_c``: the shift of the layer input's per-channel mean between
    two random prefixes, in units of its pooled per-channel std (sigma_c^2 = (var_A,c + var_B,c) / 2),
    measured in training mode (batch statistics, as the supernet sees it while training) on a copy."""
    net = copy.deepcopy(backbone).train()
    rng = random.Random(seed)
    captured: dict[tuple[int, int], torch.Tensor] = {}
    hooks = []
    for k, block in enumerate(net.blocks):
        for i, layer in enumerate(block.cells[0]):
            if k == 0 and i == 0:
                continue
            for op in layer:
                hooks.append(op.register_forward_pre_hook(
                    lambda m, args, key=(k, i): captured.__setitem__(key, args[0].detach())))
    sums: dict[tuple[int, int], list[float]] = {}
    try:
        for _ in range(pairs):
            stats = []
            for path in (net.sample(rng), net.sample(rng)):
                captured.clear()
                net(x, path)
                stats.append({key: torch.var_mean(h, dim=(0, 2, 3), correction=0) for key, h in captured.items()})
            for key in stats[0]:
                (var_a, mu_a), (var_b, mu_b) = stats[0][key], stats[1][key]
                sigma = ((var_a + var_b) / 2).clamp_min(1e-8).sqrt()
                sums.setdefault(key, []).append(float(((mu_a - mu_b) / sigma).pow(2).mean().sqrt()))
    finally:
        for h in hooks:
            h.remove()
    return [{"block": k, "layer": i, "shift": float(np.mean(v))} for (k, i), v in sorted(sums.items())]


# ---------------------------------------------------------------------------------------------
# the method
# ---------------------------------------------------------------------------------------------
def run_pinas(cfg: PiNASConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, probe, rate and search (resuming what ``cfg.out_dir`` holds); the result summary."""
    return PiNAS(cfg, log).search()


def _rating_encodings(cfg: PiNASConfig) -> list[Encoding] | None:
    """None (every architecture) or the sample plus ``rate_include``'s encodings."""
    space = cfg.space
    if cfg.rate_sample is None or cfg.rate_sample >= space.num_architectures():
        return None
    from nas.search.groundtruth import sample_architectures

    chosen = [tuple(tuple(c) for c in e) for e in sample_architectures(space, cfg.rate_sample, seed=cfg.seed + 4242)]
    if cfg.rate_include:  # a ground-truth (or rows) JSON: {"architectures": [{"encoding": ...}, ...]}
        encodings = [a["encoding"] for a in json.loads(Path(cfg.rate_include).read_text())["architectures"]]
        seen = set(chosen)
        chosen += [e for e in (tuple(tuple(c) for c in enc) for enc in encodings) if e not in seen]
    return chosen


@register
class PiNAS(SearchMethod):
    """Pi-NAS behind the method interface: ONE "block", the whole supernet (``num_blocks == 1``);
    ``rate_block(0)`` rates whole architectures, ``report`` writes them as rows and scans them."""

    name = "pinas"
    config_class = PiNASConfig
    description = "Pi-NAS: unsupervised whole-supernet search with cross-path learning and a path-restricted teacher"

    def __init__(self, cfg: PiNASConfig, log: Callable[[str], None] = print) -> None:
        super().__init__(cfg)
        self.cfg: PiNASConfig = cfg
        self.log = log
        self.norm_layer = make_norm(cfg.norm, cfg.bkn_prior_weight)
        self.model: PiNASModel | None = None
        self.probe: nn.Linear | None = None
        self.info: dict[str, Any] = {}

    @classmethod
    def default_config(cls, argv: Sequence[str]) -> str | None:
        return DEFAULT_CONFIG

    @property
    def num_blocks(self) -> int:
        return 1

    @property
    def train_dir(self) -> Path:
        return self.out_dir / "supernet"

    def artefacts(self) -> list[Artefact]:
        """``supernet/`` (everything but the rating and the search) and ``rows.json`` (plus the rated encodings)."""
        rating = ("recal_batches", "rate_sample", "rate_include")
        trained = config_fields(self.cfg, drop=("budget", "cost", *rating))
        rated = {**trained, "recal_batches": self.cfg.recal_batches, "rated": _rating_encodings(self.cfg)}
        return [Artefact(self.train_dir, trained, "trained supernet"),
                Artefact(self.out_dir / "rows.json", rated, "architecture ratings")]

    def check_budget(self) -> None:
        """A ``budget`` must exceed the cheapest architecture that will be rated (block costs of the space)."""
        cfg = self.cfg
        if cfg.budget is None:
            return
        table = block_cost_table(cfg.space, self.norm_layer)
        costs = [{key: c[cfg.cost] for key, c in block.items()} for block in table]
        rated = _rating_encodings(cfg)
        if rated is None:
            cheapest = sum(min(block.values()) for block in costs)
        else:
            cheapest = min(sum(costs[b][candidate_key(c)] for b, c in enumerate(e)) for e in rated)
        check_budget(cfg.budget, cheapest, cfg.cost, "rated architecture")

    def prepare(self) -> None:
        """Seeded model, data; ``config.json``."""
        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with seeded_init(cfg.seed):
            self.model = PiNASModel(cfg.space, self.norm_layer, cfg.neck_hidden, cfg.feat_dim, cfg.queue_size)
        self.datamodule = DigitsDataModule(batch_size=cfg.batch_size, seed=cfg.data_seed, drop_last=True)
        self.datamodule.setup()
        write_json(self.out_dir / "config.json", self.cfg.to_json(), default=str)

    def _splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        assert self.datamodule.splits is not None
        return self.datamodule.splits

    def train_block(self, k: int) -> None:
        """Contrastive training of the whole supernet, then the linear probe (``supernet/``)."""
        if k != 0:
            raise ValueError(f"Pi-NAS has one block (the whole supernet), got block {k}")
        assert self.model is not None, "prepare() first"
        cfg, tdir = self.cfg, self.train_dir
        done = tdir / "trained.json"
        if done.is_file():
            self.model.load_state_dict(torch.load(tdir / "model.pt", map_location="cpu", weights_only=True))
            self.probe = self._load_probe()
            self.info = json.loads(done.read_text())
            self.log("supernet: trained earlier, loaded")
            return
        t0 = time.perf_counter()
        system = PiNASSystem(self.model, cfg)
        run_cfg = RunConfig(
            out_dir=str(tdir), max_epochs=cfg.epochs, seed=cfg.seed, progress_bar=cfg.progress, loggers=("csv",),
            resume=last_checkpoint(tdir).is_file(), test=False, limit_train_batches=cfg.limit_train_batches,
            limit_val_batches=0, log_every_n_steps=1, accelerator="cpu", devices=1, monitor="train_loss",
        )
        fit(system, self.datamodule, run_cfg)
        self.model.cpu()
        t_train = time.perf_counter() - t0
        x_tr, y_tr = self._splits()["train"]
        probe = train_probe(self.model.backbone, x_tr, y_tr, cfg.probe_epochs, cfg.probe_lr, cfg.batch_size,
                            cfg.seed + 1)
        shifts = feature_shift(self.model.backbone, x_tr[: cfg.batch_size], seed=cfg.seed)
        torch.save(self.model.state_dict(), tdir / "model.pt")
        torch.save(probe.state_dict(), tdir / "probe.pt")
        self.probe = probe
        self.info = {
            "train_seconds": t_train,
            "probe_seconds": time.perf_counter() - t0 - t_train,
            "param_shift_mean": float(np.mean(system.param_shift)) if system.param_shift else None,
            "param_shift": system.param_shift,
            "feature_shift": shifts,
            "feature_shift_mean": float(np.mean([s["shift"] for s in shifts])) if shifts else None,
        }
        write_json(done, self.info)

    def _load_probe(self) -> nn.Linear:
        probe = nn.Linear(self.cfg.space.blocks[-1].out_channels, DigitsDataModule.num_classes)
        probe.load_state_dict(torch.load(self.train_dir / "probe.pt", map_location="cpu", weights_only=True))
        return probe

    def rate_block(self, k: int) -> dict[str, float]:
        """``{architecture key: score}`` of every rated architecture (``rows.json`` holds the full rows)."""
        if k != 0:
            raise ValueError(f"Pi-NAS has one block (the whole supernet), got block {k}")
        assert self.model is not None and self.probe is not None, "train_block(0) first"
        cfg = self.cfg
        path = self.out_dir / "rows.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            rows, self.rate_seconds = saved["rows"], saved["seconds"]
        else:
            t0 = time.perf_counter()
            x_tr = self._splits()["train"][0]
            recal = [x_tr[i * cfg.batch_size : (i + 1) * cfg.batch_size] for i in range(cfg.recal_batches)]
            x_val, y_val = self._splits()["val"]
            rows = rate_all_architectures(self.model.backbone, self.probe, [r for r in recal if len(r) > 1], x_val,
                                          y_val, _rating_encodings(cfg), cfg.progress)
            seconds = self.rate_seconds = time.perf_counter() - t0
            write_json(path, {"seconds": seconds, "rows": rows}, indent=None)
            self.log(f"rated {len(rows)} architectures in {seconds:.0f} s")
        self.rows = rows
        return {architecture_key(r["encoding"]): r["score"] for r in rows}

    def search(self) -> dict[str, Any]:
        self._t0 = time.perf_counter()
        self.preflight()
        self.prepare()
        self.train_block(0)
        return self.report([self.rate_block(0)])

    def report(self, ratings: Sequence[dict[str, float]]) -> dict[str, Any]:
        cfg, out = self.cfg, self.out_dir
        costs = block_cost_table(cfg.space, self.norm_layer)
        extra = {architecture_key(r["encoding"]): r for r in getattr(self, "rows", [])}
        rows = []
        for key, score in ratings[0].items():
            enc = parse_architecture_key(key)
            keys = [candidate_key(c) for c in enc]
            row = {"encoding": [list(c) for c in enc], "score": float(score), "keys": keys,
                   "params": sum(costs[b][kk]["params"] for b, kk in enumerate(keys)),
                   "flops": sum(costs[b][kk]["flops"] for b, kk in enumerate(keys))}
            row.update({f: extra[key][f] for f in ("accuracy", "ce") if key in extra})
            rows.append(row)
        table = ArchitectureRatings(rows, metric="probe_accuracy", lower_is_better=False, meta={
            "method": "pinas", "space": cfg.space.name, "norm": cfg.norm, "cross_path": cfg.cross_path,
            "restricted_teacher": cfg.restricted_teacher, "costs": "blocks only (stem and classifier excluded)"})
        save_ratings(table, out / "ratings.json")
        found = search_rows(table, cfg.budget, cfg.cost)
        arch = {**found.to_json(), "space": cfg.space.name, "params": next(
            r["params"] for r in rows if r["encoding"] == found.encoding), "flops": next(
            r["flops"] for r in rows if r["encoding"] == found.encoding), "budget": cfg.budget}
        write_json(out / "architecture.json", arch)
        summary = {
            "architecture": arch,
            "num_rated": len(rows),
            "train_seconds": self.info.get("train_seconds"),
            "rate_seconds": getattr(self, "rate_seconds", None),
            "param_shift_mean": self.info.get("param_shift_mean"),
            "feature_shift_mean": self.info.get("feature_shift_mean"),
            "seconds": time.perf_counter() - self._t0,
        }
        (out / "report.md").write_text(_report(cfg, table, arch, summary, self.info))
        self.log(f"searched {arch['keys']} (score {arch['score']:.4f}, {arch['params']} params); wrote {out}")
        return summary


def _report(
    cfg: PiNASConfig, table: ArchitectureRatings, arch: dict[str, Any], summary: dict[str, Any], info: dict[str, Any]
) -> str:
    acc = [r.get("accuracy", r["score"]) for r in table.rows]
    lines = [
        f"# Pi-NAS search on {cfg.space.name} (norm {cfg.norm})",
        "",
        f"- cross-path learning: {cfg.cross_path}; path-restricted mean teacher: {cfg.restricted_teacher} "
        f"(m {cfg.momentum}); queue {cfg.queue_size} x {cfg.feat_dim}; T {cfg.temperature}; "
        f"shuffle-BN ghost groups {cfg.shuffle_bn_groups}",
        f"- {cfg.epochs} epochs, batch {cfg.batch_size}; probe {cfg.probe_epochs} epochs; "
        f"recalibration on {cfg.recal_batches} batches",
        f"- rated {len(table.rows)} of {cfg.space.num_architectures()} architectures; probe accuracy "
        f"{min(acc):.4f}-{max(acc):.4f} (mean {np.mean(acc):.4f})",
        f"- parameter shift (mean ||d theta_k|| / ||theta_k|| per step): {summary['param_shift_mean']}",
        f"- feature shift (mean over layers of RMS |mu_A - mu_B| / sigma): {summary['feature_shift_mean']}",
        f"- constraint: {'none (best rated)' if cfg.budget is None else f'{cfg.cost} < {cfg.budget:g}'}",
        "",
        f"Searched architecture: {arch['keys']}, score {arch['score']:.4f}, {arch['params']} params, "
        f"{arch['flops']} FLOPs (blocks only); total {summary['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"
