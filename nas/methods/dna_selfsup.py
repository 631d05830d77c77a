"""DNA++: block-wise self-supervised distillation, no labelled teacher (the DNA family paper's variant).

The target of block k is a momentum (EMA) copy of the student's own block supernet, run on ANOTHER
augmented view of the same images along the same path (BYOL's bootstrap, at block level). The loss of
a step, for views v1, v2 of a batch and one uniformly random path::

    mse(z1, t2) + mse(z2, t1) + var_weight * (V(z1) + V(z2)) + cov_weight * (C(z1) + C(z2))

with ``z = online(v)``, ``t = ema(v)`` (no gradient) and the anti-collapse terms of :func:`anti_collapse`
(per-channel variance kept up, channels decorrelated; VICReg's form, over every spatial position). After
each optimizer step ``ema <- m * ema + (1 - m) * online`` (:func:`ema_update`).

Inputs: block 0 trains the stem with it (online stem + EMA stem); block k > 0 receives the frozen EMA stem
and EMA blocks 0..k-1 on their best-rated path (:class:`FixedPath`, built by the caller), so blocks train in
order. Rating (:func:`rate_block_selfsup`): for every candidate (online and EMA norm statistics recalibrated
for it), the error between the online block on a fixed view A and the target on the fixed view B:
``target="path"`` (default) the EMA output of the same candidate, i.e. the training objective on held-out
images, as DNA rates by its distillation error; ``"center"`` the mean EMA output over ALL candidates of the
block (the population centre); with any metric of :mod:`nas.metrics` (the packaged DNA++ config: ``cosine``,
the per-sample cosine distance, BYOL's scale-blind form).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from nas.data.views import ViewConfig, make_views
from nas.metrics import block_score, check_metric, target_scale
from nas.recalibration import recalibrate_norm_stats
from nas.supernet import BlockSupernet

__all__ = [
    "anti_collapse",
    "selfsup_loss",
    "ema_update",
    "FixedPath",
    "SelfSupBlockSystem",
    "fixed_views",
    "rate_block_selfsup",
]

SELFSUP_TARGETS = ("center", "path")


def anti_collapse(z: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance term, covariance term) of features ``z`` (B, C, H, W), channels as dimensions and every
    (image, position) as a sample: ``mean_c relu(1 - sqrt(var_c + eps))`` and ``sum_{i != j} cov_ij^2 / C``
    (unbiased variance/covariance)."""
    c = z.shape[1]
    flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # (B, C, H, W) -> (B*H*W, C)
    flat = flat - flat.mean(0)
    n = flat.shape[0]
    var = flat.pow(2).sum(0) / (n - 1)  # (C,)
    var_term = F.relu(1.0 - torch.sqrt(var + eps)).mean()
    cov = flat.T @ flat / (n - 1)  # (C, C)
    off = cov - torch.diag(torch.diag(cov))
    return var_term, off.pow(2).sum() / c


def selfsup_loss(
    z1: torch.Tensor, z2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor, var_weight: float, cov_weight: float
) -> torch.Tensor:
    """Symmetric invariance to the EMA target of the other view plus the anti-collapse terms of both views."""
    loss = F.mse_loss(z1, t2.detach()) + F.mse_loss(z2, t1.detach())
    for z in (z1, z2):
        var_term, cov_term = anti_collapse(z)
        loss = loss + var_weight * var_term + cov_weight * cov_term
    return loss


@torch.no_grad()
def ema_update(ema: nn.Module, online: nn.Module, momentum: float) -> None:
    """``ema <- momentum * ema + (1 - momentum) * online`` for every parameter; buffers are left alone (the
    EMA copy keeps its own running statistics, recalibrated per candidate before rating)."""
    for pe, po in zip(ema.parameters(), online.parameters()):
        pe.lerp_(po.detach(), 1.0 - momentum)


class FixedPath(nn.Module):
    """A stem followed by block supernets on fixed candidates (the already-searched blocks); ``forward(x)``."""

    def __init__(self, stem: nn.Module, blocks: Sequence[tuple[BlockSupernet, Sequence[int]]] = ()) -> None:
        super().__init__()
        self.stem = stem
        self.blocks = nn.ModuleList(b for b, _ in blocks)
        self.candidates = [tuple(c) for _, c in blocks]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> input of the next block
        x = self.stem(x)
        for block, cand in zip(self.blocks, self.candidates):
            x = block(x, cand)
        return x


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


class SelfSupBlockSystem(pl.LightningModule):
    """DNA++ training of one block supernet against its own EMA copy on another view.

    ``prefix`` maps images to the block's input: the trainable stem (``train_prefix=True``, block 0; its EMA
    copy feeds the target) or a frozen :class:`FixedPath` shared by online and target. Views and paths of
    step t come from ``seed * 1_000_003 + t``, so a resumed run draws the same ones.
    """

    def __init__(
        self,
        student: BlockSupernet,
        prefix: nn.Module,
        train_prefix: bool,
        lr: float = 2e-3,
        seed: int = 0,
        max_epochs: int = 15,
        momentum: float = 0.99,
        var_weight: float = 1.0,
        cov_weight: float = 0.04,
        views: ViewConfig | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.ema_student = _frozen(copy.deepcopy(student))
        self.train_prefix = train_prefix
        self.prefix = prefix if train_prefix else _frozen(prefix)
        self.ema_prefix = _frozen(copy.deepcopy(prefix)) if train_prefix else None
        self.lr, self.seed, self.max_epochs = lr, seed, max_epochs
        self.momentum, self.var_weight, self.cov_weight = momentum, var_weight, cov_weight
        self.views = views or ViewConfig()
        self.val_candidates = student.candidates()

    def train(self, mode: bool = True) -> SelfSupBlockSystem:
        super().train(mode)
        if not self.train_prefix:
            self.prefix.eval()  # frozen earlier blocks: fixed statistics
        return self

    def _seed(self, step: int) -> int:
        return self.seed * 1_000_003 + step

    def step_candidate(self, step: int) -> tuple[int, ...]:
        return self.student.sample(random.Random(self._seed(step)))

    def step_views(self, x: torch.Tensor, step: int) -> list[torch.Tensor]:
        return make_views(x, self.views, 2, torch.Generator().manual_seed(self._seed(step)))

    def online(self, v: torch.Tensor, cand: Sequence[int]) -> torch.Tensor:
        if self.train_prefix:
            return self.student(self.prefix(v), cand)
        with torch.no_grad():
            h = self.prefix(v)
        return self.student(h, cand)

    @torch.no_grad()
    def target(self, v: torch.Tensor, cand: Sequence[int]) -> torch.Tensor:
        prefix = self.ema_prefix if self.train_prefix else self.prefix
        return self.ema_student(prefix(v), cand)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        v1, v2 = self.step_views(batch[0], self.global_step)
        cand = self.step_candidate(self.global_step)
        z1, z2 = self.online(v1, cand), self.online(v2, cand)
        t1, t2 = self.target(v1, cand), self.target(v2, cand)
        loss = selfsup_loss(z1, z2, t1, t2, self.var_weight, self.cov_weight)
        self.log("train_loss", loss, batch_size=len(v1))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        ema_update(self.ema_student, self.student, self.momentum)
        if self.train_prefix:
            assert self.ema_prefix is not None
            ema_update(self.ema_prefix, self.prefix, self.momentum)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = batch[0]
        cand = self.val_candidates[batch_idx % len(self.val_candidates)]
        self.log("val_loss", F.mse_loss(self.online(x, cand), self.target(x, cand)), batch_size=len(x))

    def configure_optimizers(self) -> Any:
        params = list(self.student.parameters()) + (list(self.prefix.parameters()) if self.train_prefix else [])
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


def fixed_views(
    images: Sequence[torch.Tensor], views: ViewConfig, seed: int = 12345
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Two fixed views (A, B) of every batch: the same for every candidate."""
    g = torch.Generator().manual_seed(seed)
    pairs = [make_views(x, views, 2, g) for x in images]
    return [a for a, _ in pairs], [b for _, b in pairs]


@torch.no_grad()
def rate_block_selfsup(
    student: BlockSupernet,
    ema_student: BlockSupernet,
    online_prefix: nn.Module,
    ema_prefix: nn.Module,
    recal_inputs: Sequence[torch.Tensor],
    val_inputs: Sequence[torch.Tensor],
    views: ViewConfig,
    metric: str = "relative_l1",
    target: str = "path",
    candidates: Sequence[Sequence[int]] | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """``{key: rating}`` of every candidate (module docstring); recalibration on clean training images."""
    if target not in SELFSUP_TARGETS:
        raise ValueError(f"target must be one of {SELFSUP_TARGETS}, got {target!r}")
    check_metric(metric)
    online_prefix.eval()
    ema_prefix.eval()
    view_a, view_b = fixed_views(val_inputs, views)
    h_a = [online_prefix(v) for v in view_a]
    h_b = [ema_prefix(v) for v in view_b]
    recal_online = [online_prefix(x) for x in recal_inputs]
    recal_ema = [ema_prefix(x) for x in recal_inputs]
    cands = list(candidates) if candidates is not None else student.candidates()
    preds, targets = {}, {}
    for cand in tqdm(cands, desc="rate (self-supervised)", disable=not progress, leave=False):
        recalibrate_norm_stats(student, recal_online, len(recal_online), forward=lambda x, c=cand: student(x, c))
        recalibrate_norm_stats(ema_student, recal_ema, len(recal_ema), forward=lambda x, c=cand: ema_student(x, c))
        preds[cand] = [student(h, cand) for h in h_a]
        targets[cand] = [ema_student(h, cand) for h in h_b]
    center = [torch.stack([targets[c][i] for c in cands]).mean(0) for i in range(len(h_b))]
    ratings: dict[str, float] = {}
    for cand in cands:
        tgt = center if target == "center" else targets[cand]
        flat = torch.cat([t.flatten() for t in tgt])
        scale = target_scale(flat, metric, f"candidate {cand}: the EMA target (collapsed?)")
        err = count = 0.0
        for p, t in zip(preds[cand], tgt):
            e, n = block_score(p, t, metric)
            err += e
            count += n
        ratings[student.block.key(cand)] = err / count / scale
    return ratings
