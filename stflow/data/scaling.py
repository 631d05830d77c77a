"""Global min-max scaling of flow counts to [-1, 1] (one min and one max for every cell and channel)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

__all__ = ["MinMaxScaler"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class MinMaxScaler:
    """``x -> 2 (x - min) / (max - min) - 1`` and back; works on numpy arrays and torch tensors."""

    min: float
    max: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min) and np.isfinite(self.max)) or self.max <= self.min:
            raise ValueError(f"MinMaxScaler needs finite min < max, got min={self.min}, max={self.max}")

    @classmethod
    def fit(cls, x: np.ndarray | torch.Tensor) -> MinMaxScaler:
        """The global min and max of ``x``."""
        if isinstance(x, torch.Tensor):
            return cls(float(x.min()), float(x.max()))
        return cls(float(np.min(x)), float(np.max(x)))

    @property
    def scale(self) -> float:
        """Original units per scaled unit: ``(max - min) / 2`` (turns a scaled RMSE into a real one)."""
        return (self.max - self.min) / 2.0

    def transform(self, x: ArrayT) -> ArrayT:
        return (x - self.min) / (self.max - self.min) * 2.0 - 1.0

    def inverse_transform(self, x: ArrayT) -> ArrayT:
        return (x + 1.0) / 2.0 * (self.max - self.min) + self.min
