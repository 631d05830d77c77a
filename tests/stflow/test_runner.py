"""The shared runner: checkpoints every epoch, resume equals an uninterrupted run, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stflow.runner import EpochShuffleSampler, RunConfig, fit, last_checkpoint


class TinyRegression(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1)
        )  # dropout: resume must replay its masks

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def test_step(self, batch, batch_idx):
        self.log("test_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class TinyData(pl.LightningDataModule):
    def setup(self, stage: str | None = None) -> None:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 3, generator=g)
        y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3
        self.data = TensorDataset(x, y)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16, sampler=EpochShuffleSampler(len(self.data), seed=5))

    def val_dataloader(self):
        return DataLoader(self.data, batch_size=32)

    def test_dataloader(self):
        return DataLoader(self.data, batch_size=32)


def _cfg(out: Path, **kw) -> RunConfig:
    base = dict(
        out_dir=str(out), max_epochs=4, progress_bar=False, loggers=("csv",), seed=3, accelerator="cpu", devices=1
    )
    base.update(kw)
    return RunConfig(**base)


def test_checkpoints_every_epoch_and_tests_best(tmp_path: Path) -> None:
    result = fit(TinyRegression(), TinyData(), _cfg(tmp_path, max_epochs=3))
    assert last_checkpoint(tmp_path).is_file()
    assert result.best_checkpoint and Path(result.best_checkpoint).is_file()
    assert torch.load(last_checkpoint(tmp_path), weights_only=False)["epoch"] == 2
    assert "test_loss" in result.test_metrics
    assert (tmp_path / "logs" / "metrics.csv").is_file()


def test_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = TinyRegression()
    fit(straight, TinyData(), _cfg(tmp_path / "straight", max_epochs=4, test=False))

    torch.manual_seed(0)
    fit(TinyRegression(), TinyData(), _cfg(tmp_path / "split", max_epochs=2, test=False))
    resumed = TinyRegression()  # its fresh weights are replaced by the checkpoint's
    fit(resumed, TinyData(), _cfg(tmp_path / "split", max_epochs=4, resume=True, test=False))

    for a, b in zip(straight.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_epoch_shuffle_sampler_depends_only_on_seed_and_epoch() -> None:
    a, b = EpochShuffleSampler(10, seed=1), EpochShuffleSampler(10, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(4)
    assert list(a) != list(b)
    with pytest.raises(ValueError, match="at least one sample"):
        EpochShuffleSampler(0)


def test_early_stopping_stops_before_max_epochs(tmp_path: Path) -> None:
    class Flat(TinyRegression):
        def validation_step(self, batch, batch_idx):
            self.log("val_loss", torch.tensor(1.0))  # never improves

    result = fit(Flat(), TinyData(), _cfg(tmp_path, max_epochs=20, early_stopping_patience=2, test=False))
    assert result.trainer.current_epoch < 5


def test_resume_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot resume: no checkpoint"):
        fit(TinyRegression(), TinyData(), _cfg(tmp_path, resume=True))


def test_unknown_logger_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown logger"):
        fit(TinyRegression(), TinyData(), _cfg(tmp_path, loggers=("wandb",)))
