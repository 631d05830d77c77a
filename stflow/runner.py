"""The one Lightning runner shared by ``stflow.train``, the ``nas`` searches and the benchmarks.

It knows nothing about crowd flow or NAS: it receives a ``LightningModule`` (the system), a
``LightningDataModule`` and a :class:`RunConfig`, and returns a :class:`RunResult`. What it
adds over a bare ``Trainer``: seeding, a checkpoint after every epoch (``last.ckpt`` plus the
best on the monitored metric), ``resume`` from the last checkpoint, CSV and TensorBoard logs,
optional early stopping, and ``accelerator="auto"`` so the same call runs on CPU, one GPU or
DDP over many devices/nodes.

Resume is exact, from an end-of-epoch checkpoint and from the ``last.ckpt`` saved mid-epoch on an exception
such as Ctrl-C: :class:`EpochShuffleSampler` and :class:`EpochSeeder` fix each epoch's order and random draws,
:class:`ResumableLoader` skips the batches the interrupted epoch had consumed, and :class:`MidEpochResume`
carries the random generators and the epoch's metric accumulators over the interruption. A Ctrl-C while
training stops at the next batch boundary (:class:`~stflow.callbacks.GracefulInterrupt`) and ``fit`` raises
:class:`TrainingInterrupted` once ``last.ckpt`` is written.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import math
import os
import random
import signal
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.trainer.states import TrainerStatus
from torch.utils.data import DataLoader, Sampler
from torchmetrics import Metric

from stflow.callbacks import GracefulInterrupt
from stflow.safeload import safe_load

__all__ = ["EpochSeeder", "EpochShuffleSampler", "MidEpochResume", "ResumableLoader", "RunConfig", "RunResult",
           "TrainingInterrupted", "build_trainer", "epoch_position", "fit", "last_checkpoint", "previous_run_files",
           "prepare_out_dir"]


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


def epoch_position(trainer: pl.Trainer) -> tuple[int, int]:
    """``(epoch, batches of it done)``, as Lightning counts them when it restarts from a checkpoint saved now.

    Read from the trainer's progress, not from the loader: batches fetched ahead (Lightning's prefetch, worker
    processes) are not consumed. Between epochs it is ``(next epoch, 0)``. A checkpoint saved in
    ``on_train_batch_end`` counts that batch as done (Lightning completes it when it restarts); one saved in
    ``on_train_batch_start`` or inside the step does not (the batch runs again).
    """
    epochs = trainer.fit_loop.epoch_progress.current
    if epochs.started <= epochs.processed:  # no epoch in progress
        return int(epochs.processed), 0
    b = trainer.fit_loop.epoch_loop.batch_progress.current
    done = int(b.processed if _at_batch_end(trainer) else b.completed)
    if done >= trainer.num_training_batches:  # saved from the last batch's end: Lightning goes to the next epoch
        return int(epochs.processed) + 1, 0
    return int(epochs.processed), done


def _at_batch_end(trainer: pl.Trainer) -> bool:
    """Whether the current batch ran its step but not yet its ``on_train_batch_end`` bookkeeping."""
    b = trainer.fit_loop.epoch_loop.batch_progress.current
    return b.ready == b.started == b.processed == b.completed + 1


class _SkipConsumed:
    """A loader's index sampler minus the batches its resumed epoch had consumed; the skip is taken, once, when
    the first index is drawn (a generator), so iterators created and dropped before that keep it."""

    def __init__(self, loader: ResumableLoader, base: Any) -> None:
        self.loader, self.base = loader, base

    def __iter__(self) -> Iterator[Any]:
        skip, self.loader.skip_batches = self.loader.skip_batches, 0
        yield from itertools.islice(self.base, skip, None)

    def __len__(self) -> int:
        return len(self.base)


class _LazyIterator:
    """A loader iterator created at its first ``next``: torch's worker processes draw indices as soon as their
    iterator exists, and a resumed Lightning run creates it before ``set_epoch`` (and would keep it)."""

    def __init__(self, loader: ResumableLoader) -> None:
        self.loader: ResumableLoader = loader
        self.iterator: Iterator[Any] | None = None

    def __iter__(self) -> _LazyIterator:
        return self

    def __next__(self) -> Any:
        if self.iterator is None:
            self.iterator = DataLoader.__iter__(self.loader)
        return next(self.iterator)

    def __len__(self) -> int:
        return len(self.loader)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that Lightning resumes mid-epoch: its state is the ``(epoch, batches done)`` position.

    Lightning saves ``state_dict()`` in every checkpoint and calls ``load_state_dict`` before the resumed epoch;
    the next iteration then skips the consumed batches without loading them. The skip applies to the batches
    the sampler yields after DDP's split, so it holds on every rank. Indices are drawn at the first batch, after
    Lightning's ``set_epoch``, also with worker processes (otherwise a run resumed from an end-of-epoch checkpoint
    with workers replays epoch 0's order). The position comes from ``progress``, which :class:`MidEpochResume`
    points at the trainer's progress; without it the state is empty and a resumed epoch restarts at its start.
    """

    progress: Callable[[], tuple[int, int]] | None = None
    skip_batches: int = 0

    @property
    def _index_sampler(self) -> Any:  # torch's DataLoader iterators draw their indices from this
        return _SkipConsumed(self, super()._index_sampler)

    def __iter__(self) -> Any:
        return _LazyIterator(self)

    def state_dict(self) -> dict[str, int]:
        if self.progress is None:
            return {}
        epoch, batches = self.progress()
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self.skip_batches = int(state_dict["batches"])


def _rng_state() -> dict[str, Any]:
    """The global generators (torch, CUDA, numpy, python), as tensors and plain data (``weights_only`` loads it)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": {"version": int(version), "state": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _clone(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else [v.detach().clone() for v in value]


def _module_metrics(pl_module: pl.LightningModule) -> dict[str, dict[str, Any]]:
    """The accumulated states of the module's torchmetrics (e.g. the epoch's training metrics)."""
    return {
        name: {"update_count": int(m._update_count), "state": {k: _clone(v) for k, v in m.metric_state.items()}}
        for name, m in pl_module.named_modules()
        if isinstance(m, Metric) and m.update_called
    }


def _epoch_results(trainer: pl.Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The epoch accumulators of ``self.log(..., on_epoch=True)`` calls made while training."""
    saved: dict[str, dict[str, torch.Tensor]] = {}
    for key, metric in trainer.fit_loop.epoch_loop._results.items():
        if metric.is_tensor and metric.meta.on_epoch and not metric.has_reset:
            saved[key] = {k: _clone(v) for k, v in metric.metric_state.items()}
    return saved


class MidEpochResume(Callback):
    """What a mid-epoch checkpoint needs beyond Lightning's own state, so resuming from it is exact.

    Saved (only when a checkpoint is taken inside an epoch): the global random generators, the module's
    torchmetrics states, the epoch accumulators of ``self.log(on_epoch=True)`` and the logging step. Restored at
    the first resumed batch (the generators after Lightning created the data iterator, which draws from them);
    each logged accumulator is merged once the resumed run logged the key again, ``saved + value`` being bit for
    bit the sum the uninterrupted run computes. It also tells every :class:`ResumableLoader` the trainer's
    position (:func:`epoch_position`). Random generators are restored only in a single-process run: a DDP
    checkpoint holds rank 0's.

    Lightning itself skips the epoch end (validation, epoch metrics) of a checkpoint saved from the LAST batch's
    ``on_train_batch_end``; a Ctrl-C never stops there (:class:`~stflow.callbacks.GracefulInterrupt`).
    """

    def __init__(self) -> None:
        self._trainer: pl.Trainer | None = None
        self._pending: dict[str, Any] | None = None  # the loaded mid-epoch state, until its first batch ran
        self._results_left: dict[str, dict[str, torch.Tensor]] = {}  # saved sums of keys not logged again yet

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _attach(self, trainer: pl.Trainer) -> None:
        combined = getattr(trainer.fit_loop, "_combined_loader", None)
        for loader in combined.flattened if combined is not None else ():
            if isinstance(loader, ResumableLoader):
                loader.progress = lambda: epoch_position(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer)  # reload_dataloaders_every_n_epochs makes new loaders
        self._pending, self._results_left = None, {}

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Stopped from an ``on_train_batch_end``: write that batch's step metrics, which Lightning logs after the
        hook and skips on restart (a real Ctrl-C stops at a batch start, see GracefulInterrupt)."""
        if trainer.training and trainer.fit_loop._data_fetcher is not None and _at_batch_end(trainer):
            with contextlib.suppress(Exception):  # best effort: never mask the exception being handled
                trainer._logger_connector.update_train_step_metrics()

    def state_dict(self) -> dict[str, Any]:
        if self._pending is not None:  # stopped again before the resumed batch completed: still that position
            return dict(self._pending)
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit" or trainer.lightning_module is None:
            return {}
        epoch, batches = epoch_position(trainer)
        if batches == 0:
            return {}
        loop = trainer.fit_loop.epoch_loop
        # The logging step the next batch starts from (Lightning's restart recomputes it, one too many when the
        # checkpoint was taken at a batch start).
        stepped = loop._batches_that_stepped + int(_at_batch_end(trainer) and not loop._should_accumulate())
        return {"epoch": epoch, "batches": batches, "world_size": trainer.world_size, "rng": _rng_state(),
                "metrics": _module_metrics(trainer.lightning_module),
                "results": {**self._results_left, **_epoch_results(trainer)}, "batches_that_stepped": stepped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) if state_dict.get("batches") else None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        state = self._pending
        if state is None:
            return
        if (trainer.current_epoch, batch_idx) != (state["epoch"], state["batches"]):
            warnings.warn(f"resumed at epoch {trainer.current_epoch} batch {batch_idx}, the checkpoint was taken at "
                          f"epoch {state['epoch']} batch {state['batches']}: its random and metric state is not "
                          "restored", stacklevel=2)
            self._pending = None
            return
        if state["world_size"] == trainer.world_size == 1:
            _set_rng_state(state["rng"])
        trainer.fit_loop.epoch_loop._batches_that_stepped = int(state["batches_that_stepped"])
        modules = dict(pl_module.named_modules())
        for name, saved in state["metrics"].items():
            metric = modules.get(name)
            if isinstance(metric, Metric):
                for key, value in saved["state"].items():
                    current = getattr(metric, key)
                    device = current.device if isinstance(current, torch.Tensor) else pl_module.device
                    setattr(metric, key, value.to(device) if isinstance(value, torch.Tensor)
                            else [v.to(device) for v in value])
                metric._update_count = saved["update_count"]
                metric._computed = None
        self._results_left = dict(state["results"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._pending = None
        results = trainer.fit_loop.epoch_loop._results
        for key in [k for k in self._results_left if k in results]:
            metric, saved = results[key], self._results_left.pop(key)
            for name, value in saved.items():
                current = getattr(metric, name)
                value = value.to(current.device)
                if name == "value" and (metric.meta.is_max_reduction or metric.meta.is_min_reduction):
                    setattr(metric, name, metric.meta.reduce_fx(current, value))
                else:  # mean (weighted sum and batch count) or sum
                    setattr(metric, name, current + value)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped :func:`fit`; Lightning has saved ``checkpoint`` (when checkpointing) for ``resume``.

    ``epoch`` (0-based, as in the logs) and ``batch`` (batches of it done, of ``batches``) say where;
    ``stage`` is "fit" or "test"; ``rank`` is the process's global rank (every DDP process raises it).
    """

    def __init__(self, epoch: int, batch: int, batches: float, checkpoint: Path | None, stage: str = "fit",
                 rank: int = 0) -> None:
        super().__init__(f"interrupted at epoch {epoch} (batch {batch} of {_count(batches)})")
        self.epoch, self.batch, self.batches, self.checkpoint, self.stage = epoch, batch, batches, checkpoint, stage
        self.rank = rank


def _count(batches: float) -> str:
    return str(int(batches)) if math.isfinite(batches) else "?"


def build_trainer(cfg: RunConfig, callbacks: Sequence[Callback] = ()) -> pl.Trainer:
    """A ``pl.Trainer`` configured from ``cfg`` (checkpoints, logs, early stopping)."""
    # MidEpochResume first: it completes a resumed batch's logged sums before any other callback may stop the run.
    all_callbacks: list[Callback] = [MidEpochResume(), *callbacks, GracefulInterrupt()]
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
    with _interruptible(trainer, cfg, "fit"):
        trainer.fit(system, datamodule=datamodule, ckpt_path=resume, weights_only=True if resume else None)
    val_metrics = _floats(trainer.callback_metrics)
    best = last = None
    if cfg.checkpoint and trainer.checkpoint_callback is not None:
        best = trainer.checkpoint_callback.best_model_path or None  # the first ModelCheckpoint: the best one
        last_path = last_checkpoint(cfg.resolved_out_dir)
        last = str(last_path) if last_path.is_file() else None
    test_metrics: dict[str, float] = {}
    if cfg.test and _has_test(system, datamodule):
        with _interruptible(trainer, cfg, "test"):
            results = trainer.test(system, datamodule=datamodule, ckpt_path=best, verbose=False)
        test_metrics = _floats(results[0]) if results else {}
    return RunResult(trainer, best, last, val_metrics, test_metrics)


@contextlib.contextmanager
def _interruptible(trainer: pl.Trainer, cfg: RunConfig, stage: str) -> Iterator[None]:
    """Turn Lightning's exit on Ctrl-C (``sys.exit(1)`` after saving ``last.ckpt``) into
    :class:`TrainingInterrupted`, and give back the Ctrl-C handler Lightning replaced with "ignore"."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if main else None
    try:
        yield
    except SystemExit as stop:
        if trainer.state.status != TrainerStatus.INTERRUPTED or not isinstance(stop.__context__, KeyboardInterrupt):
            raise
        epoch, batch = epoch_position(trainer)
        path = last_checkpoint(cfg.resolved_out_dir)
        saved = path if cfg.checkpoint and path.is_file() else None
        raise TrainingInterrupted(epoch, batch, trainer.num_training_batches, saved, stage,
                                  trainer.global_rank) from None
    finally:
        if main and handler is not None:
            signal.signal(signal.SIGINT, handler)


def _has_test(system: pl.LightningModule, datamodule: pl.LightningDataModule) -> bool:
    overridden = type(system).test_step is not pl.LightningModule.test_step
    has_loader = type(datamodule).test_dataloader is not pl.LightningDataModule.test_dataloader
    return overridden and has_loader
