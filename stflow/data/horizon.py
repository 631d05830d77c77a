"""Samples for DIRECT multi-step training: every sample carries the H target slots ``t .. t+H-1``.

:class:`DirectHorizonDataModule` is a :class:`~stflow.data.CrowdFlowDataModule` whose splits keep only the ORIGINS
of an H-step forecast (:func:`~stflow.data.windowing.origin_samples`: targets ``t .. t+H-1`` are consecutive slots,
each a sample target of the SAME split, so no step of a training sample lies in the validation or test period),
and whose items change two entries:

- ``target`` (H, 2, h, w): the scaled frames of slots ``t .. t+H-1`` (batch: (B, H, 2, h, w));
- ``ext_target`` (H, D): the target vector of each of those slots (batch: (B, H, D));

``index`` stays ``t`` (the first target's row; step k's row is ``t + k``), the input window is the origin's. The
test split is therefore the same origins :func:`stflow.forecast.score` uses for an H-step evaluation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .datamodule import CrowdFlowDataModule, CrowdFlowWindows
from .hdf5 import DataFormatError
from .windowing import origin_samples

__all__ = ["DirectHorizonDataModule", "DirectHorizonWindows"]


class DirectHorizonWindows(Dataset):
    """The origins ``origins`` (indices into ``base``) of one split, items with H targets (module docstring)."""

    def __init__(self, base: CrowdFlowWindows, origins: np.ndarray, horizon: int) -> None:
        self.base = base
        self.origins = np.asarray(origins, dtype=np.int64)
        self.horizon = int(horizon)
        self.windows = base.windows.subset(self.origins)
        self._steps = torch.arange(self.horizon)  # (H,)

    @property
    def scaled(self) -> torch.Tensor:
        """(N, 2, h, w) float32, every slot (shared with the base split)."""
        return self.base.scaled

    @property
    def ext_frame(self) -> torch.Tensor:
        return self.base.ext_frame

    @property
    def ext_target(self) -> torch.Tensor:
        return self.base.ext_target

    def __len__(self) -> int:
        return len(self.origins)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = self.base[int(self.origins[i])]
        rows = item["index"] + self._steps  # (H,) rows t .. t+H-1, consecutive slots (origin_samples)
        item["target"] = self.base.scaled[rows]  # (H, 2, h, w)
        item["ext_target"] = self.base.ext_target[rows]  # (H, D)
        return item


class DirectHorizonDataModule(CrowdFlowDataModule):
    """A :class:`CrowdFlowDataModule` for a direct head of ``horizon`` >= 2 steps (see the module docstring)."""

    def __init__(self, *args: Any, horizon: int, **kwargs: Any) -> None:
        if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 2:
            raise ValueError(f"DirectHorizonDataModule needs horizon >= 2 (1 is CrowdFlowDataModule), got {horizon!r}")
        super().__init__(*args, **kwargs)
        self.horizon = horizon

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if isinstance(self.train_dataset, DirectHorizonWindows):
            return
        data = self.data
        wrapped = []
        for name, base in (("train", self.train_dataset), ("val", self.val_dataset), ("test", self.test_dataset)):
            split = base.windows
            last = int(split.target[-1]) if len(split) else None
            origins = origin_samples(split, data.timestamps, data.slots_per_day, np.arange(len(split)), self.horizon,
                                     last)
            if name in ("train", "test") and not len(origins):
                raise DataFormatError(f"{data.data_dir}: no {name} sample has {self.horizon} consecutive target "
                                      f"slots inside the {name} period")
            wrapped.append(DirectHorizonWindows(base, origins, self.horizon))
        self.train_dataset, self.val_dataset, self.test_dataset = wrapped
