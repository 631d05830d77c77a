"""scikit-learn's 8x8 handwritten digits as THE LightningDataModule of every digits run (real images, no download).

NAS (DNA, BossNAS, ground truth) shuffles with a plain ``shuffle=True`` loader (its published numbers were made
so); the BKN digits study passes ``shuffle_seed`` (the runner's exact-resume ``EpochShuffleSampler``),
``drop_last=True``, ``eval_batch_size=512`` and ``test_in_val=True`` (a per-epoch test curve).
"""

from __future__ import annotations

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from stflow.runner import EpochShuffleSampler

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
    :func:`digits_split_indices`, all fixed by ``seed``); batches are ``(x (B, 1, 8, 8), y (B,))``.

    Training order: ``shuffle_seed=None`` a ``shuffle=True`` loader (torch's global RNG); else
    ``EpochShuffleSampler(n, shuffle_seed)``, an order fixed by (seed, epoch), so a resumed run sees exactly the
    batches of the uninterrupted one. ``drop_last``: every training step has ``batch_size`` samples.
    ``eval_batch_size``: validation/test batch (default ``batch_size``). ``test_in_val``: a second validation
    loader with the test set (per-epoch test accuracy).
    """

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
        shuffle_seed: int | None = None,
        drop_last: bool = False,
        eval_batch_size: int | None = None,
        test_in_val: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.shuffle_seed, self.drop_last, self.test_in_val = shuffle_seed, drop_last, test_in_val
        self.eval_batch_size = eval_batch_size or batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.fold = fold
        self.num_folds = num_folds
        self.splits: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            self.splits = load_digits_split(self.seed, self.val_fraction, self.test_fraction, self.fold, self.num_folds)
            n_train = len(self.splits["train"][1])
            if self.drop_last and self.batch_size > n_train:
                raise ValueError(f"batch_size {self.batch_size} exceeds the {n_train} training images")

    def _dataset(self, name: str) -> TensorDataset:
        self.setup()
        assert self.splits is not None
        return TensorDataset(*self.splits[name])

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        if self.shuffle_seed is None:
            return DataLoader(ds, batch_size=self.batch_size, shuffle=True, drop_last=self.drop_last)
        sampler = EpochShuffleSampler(len(ds), self.shuffle_seed)
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        val = DataLoader(self._dataset("val"), batch_size=self.eval_batch_size)
        if not self.test_in_val:
            return val
        return [val, DataLoader(self._dataset("test"), batch_size=self.eval_batch_size)]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test"), batch_size=self.eval_batch_size)
