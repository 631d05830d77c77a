"""Dense prediction on top of a searched backbone: a light FPN/FCN head and the per-pixel Lightning system.

The backbone is any network with feature taps: ``forward_features(x)`` returning one map per block and
``feature_info`` (``[{"channels": c, "stride": s}, ...]``): :class:`nas.export.Network` (an architecture of a
:class:`nas.spaces.SearchSpace` or an exported net of block strings) and :class:`nas.spaces.hytra.HyTraNetwork`.
Metrics: per-class IoU (torchmetrics ``MulticlassJaccardIndex``; a class absent from both truth and prediction
is NaN and left out of the means), mIoU over all classes and over the foreground classes (background excluded).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

__all__ = ["HEADS", "DenseHead", "DenseModel", "SegmentationSystem", "backbone_params", "iou_summary"]

HEADS = ("fpn", "fcn")


class DenseHead(nn.Module):
    """1x1 lateral conv per tapped map -> bilinear upsampling to the finest tapped map -> sum -> norm, ReLU ->
    1x1 classifier -> bilinear upsampling to the input size. With one tapped map (the last block) it is an FCN head.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 32) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("the dense head needs at least one tapped feature map")
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU())
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        # features[i]: (B, in_channels[i], H_i, W_i) -> logits (B, num_classes, *size)
        finest = max((f.shape[-2:] for f in features), key=lambda s: s[0] * s[1])
        fused = sum(
            F.interpolate(lat(f), size=finest, mode="bilinear", align_corners=False) if f.shape[-2:] != finest
            else lat(f)
            for lat, f in zip(self.lateral, features)
        )
        logits = self.classifier(self.fuse(fused))  # (B, K, *finest)
        if logits.shape[-2:] != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        return logits


class DenseModel(nn.Module):
    """Backbone feature taps + :class:`DenseHead`; ``head="fpn"`` taps every block, ``"fcn"`` only the last.

    ``freeze=True``: the backbone's weights get no gradient and it stays in eval mode (its normalization
    statistics are those of pretraining); only the head trains.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, head: str = "fpn", channels: int = 32, freeze: bool = False
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        info = getattr(backbone, "feature_info", None)
        if not info or not hasattr(backbone, "forward_features"):
            raise ValueError(f"{type(backbone).__name__} has no feature taps (forward_features / feature_info)")
        self.backbone, self.freeze = backbone, freeze
        self.taps = list(range(len(info))) if head == "fpn" else [len(info) - 1]
        self.head = DenseHead([info[i]["channels"] for i in self.taps], num_classes, channels)
        if freeze:
            for p in self.backbone.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> DenseModel:
        super().train(mode)
        if self.freeze:
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:  # x: (B, C, H, W) -> logits (B, num_classes, H, W)
        feats = self.backbone.forward_features(x)
        return self.head([feats[i] for i in self.taps], x.shape[-2:])


def backbone_params(net: nn.Module) -> int:
    """Parameters of a classifier network without its classification head (``net.head``)."""
    head = getattr(net, "head", None)
    head_n = sum(p.numel() for p in head.parameters()) if isinstance(head, nn.Module) else 0
    return sum(p.numel() for p in net.parameters()) - head_n


def iou_summary(per_class: Tensor, background: int | None) -> dict[str, Any]:
    """``{"miou": mean over classes, "miou_fg": mean without ``background``, "iou": [per class]}``; NaN classes
    (absent from truth and prediction) are left out of the means."""
    iou = [float(v) for v in per_class]
    fg = [v for k, v in enumerate(iou) if k != background]

    def nanmean(values: list[float]) -> float:
        kept = [v for v in values if not math.isnan(v)]
        return sum(kept) / len(kept) if kept else float("nan")

    return {"miou": nanmean(iou), "miou_fg": nanmean(fg), "iou": iou}


class SegmentationSystem(pl.LightningModule):
    """Per-pixel cross-entropy training of a :class:`DenseModel` (AdamW, cosine schedule per epoch).

    Logged: ``train_loss``; ``val_loss``, ``val_miou`` (all classes), ``val_miou_fg`` (without background),
    ``val_pixel_acc``; the same with ``test_`` after testing, and ``test_iou_<k>`` per class. The last
    test's per-class IoU is kept in :attr:`test_summary` (see :func:`iou_summary`).
    """

    def __init__(
        self,
        model: nn.Module,  # x (B, C, H, W) -> logits (B, num_classes, H, W), e.g. a DenseModel
        num_classes: int,
        background: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        max_epochs: int = 10,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.num_classes, self.background = num_classes, background
        self.lr, self.weight_decay, self.max_epochs = lr, weight_decay, max_epochs
        iou = lambda: MulticlassJaccardIndex(num_classes, average="none", zero_division=float("nan"))  # noqa: E731
        self.val_iou, self.test_iou = iou(), iou()
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_summary: dict[str, Any] = {}

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, K, H, W)
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, C, H, W), (B, H, W)
        loss = F.cross_entropy(self.model(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        logits = self.model(x)
        pred = logits.argmax(1)  # (B, H, W)
        iou, acc = (self.val_iou, self.val_acc) if prefix == "val" else (self.test_iou, self.test_acc)
        iou.update(pred, y)
        acc.update(pred, y)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), batch_size=len(y))

    def _eval_epoch_end(self, prefix: str) -> dict[str, Any]:
        iou, acc = (self.val_iou, self.val_acc) if prefix == "val" else (self.test_iou, self.test_acc)
        summary = iou_summary(iou.compute(), self.background)
        summary["pixel_acc"] = float(acc.compute())
        iou.reset()
        acc.reset()
        self.log(f"{prefix}_miou", summary["miou"], prog_bar=True)
        self.log(f"{prefix}_miou_fg", summary["miou_fg"])
        self.log(f"{prefix}_pixel_acc", summary["pixel_acc"])
        return summary

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.test_summary = self._eval_epoch_end("test")
        for k, v in enumerate(self.test_summary["iou"]):
            self.log(f"test_iou_{k}", v)

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
