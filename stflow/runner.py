"""The one Lightning runner shared by ``stflow.train``, the ``nas`` searches and the benchmarks.

It knows nothing about crowd flow or NAS: it receives a ``LightningModule`` (the system), a
``LightningDataModule`` and a :class:`RunConfig`, and returns a :class:`RunResult`. What it
adds over a bare ``Trainer``: seeding, a checkpoint after every epoch (``last.ckpt`` plus the
best on the monitored metric), ``resume`` from the last checkpoint, CSV and TensorBoard logs,
optional early stopping, and ``accelerator="auto"`` so the same call runs on CPU, one GPU or
DDP over many devices/nodes.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from torch.utils.data import Sampler

from stflow.safeload import safe_load

__all__ = ["EpochShuffleSampler", "RunConfig", "RunResult", "build_trainer", "fit", "last_checkpoint",
           "previous_run_files", "prepare_out_dir"]


@dataclass
class RunConfig:
    """Everything about *how* to run; the *what* lives in the system and the data module."""

    out_dir: str | None = None  # None: runs/default (stflow.train derives one from model and dataset)
    max_epochs: int | None = None  # None: 10 (stflow.train uses a per-dataset default)
    max_steps: int = -1
    seed: int | None = 777
    accelerator: str = "auto"
    devices: int | list[int] | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    gradient_clip_val: float | None = None
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    early_stopping_patience: int | None = None
    resume: bool | str = False  # True / "last": out_dir/checkpoints/last.ckpt; or a path
    overwrite: bool = False  # prepare_out_dir: replace a previous run in out_dir (else refuse, unless resuming)
    progress_bar: bool = True
    loggers: tuple[str, ...] = ("csv", "tensorboard")
    log_every_n_steps: int = 10
    checkpoint: bool = True
    deterministic: bool | str = False
    limit_train_batches: int | float | None = None  # an int counts batches, a float is a fraction (Lightning)
    limit_val_batches: int | float | None = None
    num_sanity_val_steps: int = 0
    test: bool = True
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def resolved_out_dir(self) -> str:
        return self.out_dir or "runs/default"

    @property
    def resolved_max_epochs(self) -> int:
        return 10 if self.max_epochs is None else self.max_epochs


@dataclass
class RunResult:
    trainer: pl.Trainer
    best_checkpoint: str | None
    last_checkpoint: str | None
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]


def last_checkpoint(out_dir: str | os.PathLike) -> Path:
    """Where the runner keeps the checkpoint written after the latest epoch."""
    return Path(out_dir) / "checkpoints" / "last.ckpt"


class _AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer, minus deleting an existing ``metrics.csv``: a resumed run appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = csv.DictReader(file).fieldnames or []
            self.metrics_keys = sorted(header)  # new keys later rewrite the header, keeping every row


class _AppendingCSVLogger(CSVLogger):
    """A CSV logger that keeps the earlier epochs' rows of ``metrics.csv`` (used when resuming)."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def _loggers(cfg: RunConfig) -> list[Logger] | bool:
    known = {"csv": CSVLogger, "tensorboard": TensorBoardLogger}
    unknown = set(cfg.loggers) - set(known)
    if unknown:
        raise ValueError(f"unknown logger(s) {sorted(unknown)}; choose from {sorted(known)}")
    if not cfg.loggers:
        return False
    loggers: list[Logger] = []
    for name in cfg.loggers:
        if name == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:  # tensorboardX/tensorboard missing: keep the CSV log only
                warnings.warn("tensorboard is not installed; skipping the TensorBoard logger", stacklevel=2)
                continue
        kind = _AppendingCSVLogger if name == "csv" and _resume_path(cfg) is not None else known[name]
        loggers.append(kind(save_dir=cfg.resolved_out_dir, name="logs", version=""))
    return loggers


class EpochShuffleSampler(Sampler[int]):
    """Shuffles with an order that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` before every training epoch, so a resumed run sees exactly the
    batches the uninterrupted run would have seen (a plain ``shuffle=True`` loader does not).
    Use it as ``DataLoader(ds, batch_size=..., sampler=EpochShuffleSampler(len(ds), seed))``.
    Under DDP Lightning wraps it (``DistributedSamplerWrapper``): every process takes its share of this order.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        if num_samples <= 0:
            raise ValueError(f"EpochShuffleSampler needs at least one sample, got {num_samples}")
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # A generator: the permutation is drawn at the first batch, after Lightning's set_epoch.
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()

    def __len__(self) -> int:
        return self.num_samples


class EpochSeeder(Callback):
    """Reseed every RNG at the first batch of each epoch from ``(seed, epoch, rank)``.

    Shuffling (with :class:`EpochShuffleSampler`) and dropout of epoch k then depend only on the seed
    and k, so a run resumed from the checkpoint of epoch k-1 continues exactly as the uninterrupted
    run would have. It reseeds at batch 0, not at epoch start: Lightning creates the data iterator
    (one draw from the global RNG) after ``on_train_epoch_start`` in a continuing run but before it
    in a resumed one.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0:
            seed = self.seed + 1000 * trainer.current_epoch + trainer.global_rank
            pl.seed_everything(seed, workers=True, verbose=False)


def build_trainer(cfg: RunConfig, callbacks: Sequence[Callback] = ()) -> pl.Trainer:
    """A ``pl.Trainer`` configured from ``cfg`` (checkpoints, logs, early stopping)."""
    all_callbacks: list[Callback] = list(callbacks)
    if cfg.seed is not None:
        all_callbacks.append(EpochSeeder(cfg.seed))
    if cfg.checkpoint:
        ckpt_dir = str(Path(cfg.resolved_out_dir) / "checkpoints")
        # The best epoch on the monitored metric...
        all_callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir, filename="best-{epoch:03d}", monitor=cfg.monitor, mode=cfg.monitor_mode, save_top_k=1
            )
        )
        # ...and last.ckpt rewritten after every epoch (and on an exception such as Ctrl-C), for resume.
        all_callbacks.append(
            ModelCheckpoint(
                dirpath=ckpt_dir,
                filename="last",
                monitor=None,
                save_top_k=1,
                every_n_epochs=1,
                enable_version_counter=False,
                save_on_exception=True,
            )
        )
    if cfg.early_stopping_patience is not None:
        all_callbacks.append(
            EarlyStopping(monitor=cfg.monitor, mode=cfg.monitor_mode, patience=cfg.early_stopping_patience)
        )
    kwargs: dict[str, Any] = dict(
        default_root_dir=cfg.resolved_out_dir,
        max_epochs=cfg.resolved_max_epochs,
        max_steps=cfg.max_steps,
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        strategy=cfg.strategy,
        num_nodes=cfg.num_nodes,
        precision=cfg.precision,
        gradient_clip_val=cfg.gradient_clip_val,
        enable_progress_bar=cfg.progress_bar,
        enable_checkpointing=cfg.checkpoint,
        logger=_loggers(cfg),
        log_every_n_steps=cfg.log_every_n_steps,
        callbacks=all_callbacks,
        deterministic=cfg.deterministic,
        num_sanity_val_steps=cfg.num_sanity_val_steps,
        enable_model_summary=False,
    )
    if cfg.limit_train_batches is not None:
        kwargs["limit_train_batches"] = cfg.limit_train_batches
    if cfg.limit_val_batches is not None:
        kwargs["limit_val_batches"] = cfg.limit_val_batches
    kwargs.update(cfg.trainer_kwargs)
    return pl.Trainer(**kwargs)


def _resume_path(cfg: RunConfig) -> str | None:
    if cfg.resume in (False, None, ""):
        return None
    path = last_checkpoint(cfg.resolved_out_dir) if cfg.resume in (True, "last") else Path(str(cfg.resume))
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint at {path}")
    return str(path)


def previous_run_files(out_dir: str | os.PathLike) -> list[Path]:
    """The files a previous run left in ``out_dir``: checkpoints, CSV/TensorBoard logs, ``metrics.json``."""
    out = Path(out_dir)
    found = sorted((out / "checkpoints").glob("*.ckpt"))
    logs = out / "logs"
    found += [p for p in (logs / "metrics.csv", logs / "hparams.yaml", out / "metrics.json") if p.is_file()]
    found += sorted(logs.glob("events.out.tfevents.*"))
    return found


def prepare_out_dir(cfg: RunConfig) -> None:
    """Refuse to run into an ``out_dir`` that holds a previous run unless resuming it or ``cfg.overwrite``.

    Call it before any work. With ``overwrite`` the previous run's files (:func:`previous_run_files`) are
    deleted, so no stale ``best-*.ckpt`` survives; other files in ``out_dir`` are left alone. Resuming deletes
    nothing. Processes launched as non-zero ranks (DDP children) skip the check: rank 0 did it.
    """
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return
    resuming = cfg.resume not in (False, None, "")
    if resuming and cfg.overwrite:
        raise ValueError("resume and overwrite exclude each other: --resume continues the run, --overwrite replaces it")
    if resuming:
        _resume_path(cfg)  # a missing checkpoint is an error before anything is written
        return
    previous = previous_run_files(cfg.resolved_out_dir)
    if not previous:
        return
    if not cfg.overwrite:
        shown = ", ".join(str(p.relative_to(cfg.resolved_out_dir)) for p in previous[:4])
        more = f" and {len(previous) - 4} more" if len(previous) > 4 else ""
        raise ValueError(f"out_dir {cfg.resolved_out_dir} already holds a previous run ({shown}{more}); "
                         "pass --resume to continue it or --overwrite to replace it")
    for path in previous:
        path.unlink(missing_ok=True)


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def fit(
    system: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    cfg: RunConfig,
    callbacks: Sequence[Callback] = (),
) -> RunResult:
    """Seed, fit (resuming if asked), then test with the best checkpoint when there is one."""
    if cfg.seed is not None:
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
    resume = _resume_path(cfg)
    if resume is not None:
        safe_load(resume)  # weights_only: a crafted pickle is refused before Lightning reads it
    Path(cfg.resolved_out_dir).mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, callbacks)
    trainer.fit(system, datamodule=datamodule, ckpt_path=resume, weights_only=True if resume else None)
    val_metrics = _floats(trainer.callback_metrics)
    best = last = None
    if cfg.checkpoint and trainer.checkpoint_callback is not None:
        best = trainer.checkpoint_callback.best_model_path or None  # the first ModelCheckpoint: the best one
        last_path = last_checkpoint(cfg.resolved_out_dir)
        last = str(last_path) if last_path.is_file() else None
    test_metrics: dict[str, float] = {}
    if cfg.test and _has_test(system, datamodule):
        results = trainer.test(system, datamodule=datamodule, ckpt_path=best, verbose=False)
        test_metrics = _floats(results[0]) if results else {}
    return RunResult(trainer, best, last, val_metrics, test_metrics)


def _has_test(system: pl.LightningModule, datamodule: pl.LightningDataModule) -> bool:
    overridden = type(system).test_step is not pl.LightningModule.test_step
    has_loader = type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader
    return overridden and has_loader
