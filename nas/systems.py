"""Lightning systems wrapping plain modules: a classifier, and DNA's block-wise distillation."""

from __future__ import annotations

import random
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from .export import Network
from .supernet import BlockSupernet

__all__ = ["ClassifierSystem", "BlockDistillSystem", "teacher_features"]


class ClassifierSystem(pl.LightningModule):
    """Cross-entropy training of any classifier; logs ``val_loss``, ``val_acc``, ``test_acc``."""

    def __init__(self, model: nn.Module, lr: float = 3e-3, weight_decay: float = 1e-4, max_epochs: int = 20) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay
        self.max_epochs = max_epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, H, W) -> (B, classes)
        return self.model(x)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log(f"{stage}_loss", loss, prog_bar=stage != "train", batch_size=len(y))
        self.log(f"{stage}_acc", acc, prog_bar=stage != "train", batch_size=len(y))
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


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
