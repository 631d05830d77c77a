"""The one Lightning classifier system: cross-entropy training of any plain classifier module.

Two recipes, chosen by arguments: ``optimizer="adamw", schedule="cosine"`` (the NAS default: teachers,
retraining, ground truth) and ``optimizer="sgd", schedule="step"`` (the reference CIFAR recipe of the BKN
study: SGD momentum, lr times 0.1 at fractions ``lr_milestones`` of ``max_epochs``).

Metrics: ``train_loss``/``train_acc`` per epoch; validation may have two loaders: index 0 = validation set
(``val_loss``, ``val_acc``), index 1 = test set evaluated every epoch (``epoch_test_acc``, for learning curves);
``test_step`` logs ``test_loss`` and ``test_acc``. Accuracies are exact counts (torchmetrics).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn

__all__ = ["ClassifierSystem"]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "step")


class ClassifierSystem(pl.LightningModule):
    """Cross-entropy training of ``model`` (x (B, C, H, W) -> logits (B, num_classes))."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 20,
        num_classes: int = 10,
        optimizer: str = "adamw",
        momentum: float = 0.9,
        schedule: str = "cosine",
        lr_milestones: Sequence[float] = (0.5, 0.75),
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.lr, self.weight_decay, self.max_epochs = lr, weight_decay, max_epochs
        self.optimizer_name, self.momentum = optimizer, momentum
        self.schedule, self.lr_milestones = schedule, tuple(lr_milestones)
        acc = lambda: torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)  # noqa: E731
        self.train_acc, self.val_acc, self.epoch_test_acc, self.test_acc = acc(), acc(), acc(), acc()

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W) -> (B, classes)
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self.model(x)
        if dataloader_idx == 0:
            self.val_acc(logits, y)
            self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, batch_size=len(y), add_dataloader_idx=False)
            self.log("val_acc", self.val_acc, prog_bar=True, batch_size=len(y), add_dataloader_idx=False)
        else:
            self.epoch_test_acc(logits, y)
            self.log("epoch_test_acc", self.epoch_test_acc, batch_size=len(y), add_dataloader_idx=False)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y), batch_size=len(y))
        self.log("test_acc", self.test_acc, batch_size=len(y))

    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.schedule == "step":
            milestones = sorted({max(1, round(f * self.max_epochs)) for f in self.lr_milestones})
            sched: Any = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
