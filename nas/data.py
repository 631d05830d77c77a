"""scikit-learn's 8x8 handwritten digits as a LightningDataModule (real images, no download)."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "load_digits_split"]


def load_digits_split(
    seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stratified train/val/test split fixed by ``seed``; images standardized with the TRAIN mean/std.

    Returns ``{"train"|"val"|"test": (x (N, 1, 8, 8) float32, y (N,) int64)}``.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    digits = load_digits()
    x = digits.images.astype(np.float32)  # (1797, 8, 8)
    y = digits.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=y[rest], random_state=seed
    )
    mean, std = x[train].mean(), x[train].std()
    out = {}
    for name, part in (("train", train), ("val", val), ("test", test)):
        xs = torch.from_numpy((x[part] - mean) / std).unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)
        out[name] = (xs, torch.from_numpy(y[part]))
    return out


class DigitsDataModule(pl.LightningDataModule):
    """Digits with a fixed stratified split; batches are ``(x (B, 1, 8, 8), y (B,))``."""

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(self, batch_size: int = 64, seed: int = 0, val_fraction: float = 0.2, test_fraction: float = 0.2) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_digits_split(self.seed, self.val_fraction, self.test_fraction)

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        assert self.splits is not None
        return DataLoader(TensorDataset(*self.splits[name]), batch_size=self.batch_size, shuffle=shuffle)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
