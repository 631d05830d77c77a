"""'Sequential digits': scikit-learn's 8x8 digits read as a sequence of 8 tokens (the rows) of 8 pixels.

The split is the digits split of :func:`nas.data.digits.digits_split_indices` (stratified, fixed by ``seed``;
``fold`` of ``num_folds`` for cross-validation), standardized with the TRAIN mean/std.
"""

from __future__ import annotations

import torch

from nas.data.digits import _digits, digits_split_indices

__all__ = ["load_seqdigits_split", "SEQDIGITS_META"]

SEQDIGITS_META = {"input_dim": 8, "vocab_size": None, "max_len": 8, "num_classes": 10}


def load_seqdigits_split(
    seed: int = 0, fold: int | None = None, num_folds: int = 5, val_fraction: float = 0.2
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{"train"|"val"|"test": (x (N, 8 tokens, 8 pixels) float32, y (N,) int64)}``."""
    parts = digits_split_indices(seed, val_fraction, 0.2, fold, num_folds)
    x, y = _digits()  # (1797, 8, 8) rows are tokens
    mean, std = x[parts["train"]].mean(), x[parts["train"]].std()
    return {k: (torch.from_numpy((x[i] - mean) / std), torch.from_numpy(y[i])) for k, i in parts.items()}
