"""scikit-learn's 8x8 handwritten digits as a LightningDataModule (real images, no download)."""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsDataModule", "digits_split_indices", "load_digits_split"]


def digits_split_indices(
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    fold: int | None = None,
    num_folds: int = 5,
) -> dict[str, np.ndarray]:
    """Indices into the 1,797 digits of a stratified train/val/test split fixed by ``seed``.

    With ``fold`` given, the test part is fold ``fold`` of a stratified ``num_folds``-fold partition
    (the folds' test parts cover every image exactly once: cross-validated accuracy) and
    ``test_fraction`` is ignored; val is still ``val_fraction`` of all images.
    """
    from sklearn.model_selection import StratifiedKFold, train_test_split

    if fold is not None:
        if num_folds < 2 or not 0 <= fold < num_folds:
            raise ValueError(f"fold must be in [0, {num_folds}) with num_folds >= 2, got fold={fold}")
        test_fraction = 1.0 / num_folds
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"bad split fractions val={val_fraction} test={test_fraction}")
    y = _digits()[1]
    idx = np.arange(len(y))
    if fold is None:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
    else:
        rest, test = list(StratifiedKFold(num_folds, shuffle=True, random_state=seed).split(idx, y))[fold]
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), stratify=y[rest], random_state=seed
    )
    return {"train": train, "val": val, "test": test}


def load_digits_split(
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    fold: int | None = None,
    num_folds: int = 5,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The split of :func:`digits_split_indices` as tensors, standardized with the TRAIN mean/std.

    Returns ``{"train"|"val"|"test": (x (N, 1, 8, 8) float32, y (N,) int64)}``.
    """
    parts = digits_split_indices(seed, val_fraction, test_fraction, fold, num_folds)
    x, y = _digits()
    mean, std = x[parts["train"]].mean(), x[parts["train"]].std()
    out = {}
    for name, part in parts.items():
        xs = torch.from_numpy((x[part] - mean) / std).unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)
        out[name] = (xs, torch.from_numpy(y[part]))
    return out


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: images (1797, 8, 8) float32 and labels (1797,) int64."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


class DigitsDataModule(pl.LightningDataModule):
    """Digits with a fixed stratified split (or cross-validation fold ``fold`` of ``num_folds``, see
    :func:`digits_split_indices`); batches are ``(x (B, 1, 8, 8), y (B,))``."""

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        fold: int | None = None,
        num_folds: int = 5,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.fold = fold
        self.num_folds = num_folds
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_digits_split(self.seed, self.val_fraction, self.test_fraction, self.fold, self.num_folds)

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
