"""Shared code of the Batch Kalman Normalization studies (``bench_bkn_digits``, ``bench_bkn_acfm``).

What lives here: the norm registry of the study (which normalizations are compared and how each is built), the
prior-weight rule, a small pre-activation ResNet taking a norm factory, a Lightning classification system, the
digits data adapter (micro-batches, per-epoch test curve), a callback recording per-epoch metrics and train time,
seed/run bookkeeping (one ``result.json`` per finished run, so an interrupted study resumes), and the plots.

Every training goes through THE shared runner ``stflow.runner.fit``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from stflow.runner import EpochShuffleSampler, RunConfig, fit

NormFactory = Callable[[int], nn.Module]

# --------------------------------------------------------------------------------------------------------------
# The prior-weight rule (fixed before any result was seen)
# --------------------------------------------------------------------------------------------------------------

REFERENCE_PRIOR_WEIGHTS = {2: 0.9, 128: 0.05}  # the authors' settings: micro-batch 2 and batch 128


def prior_weight_for(stat_batch: int) -> float:
    """The prior weight p for a layer whose statistics come from ``stat_batch`` samples.

    Linear in log2(batch) between the reference's two settings (0.9 at 2, 0.05 at 128), clamped outside:
    2 -> 0.9, 4 -> 0.758, 8 -> 0.617, 16 -> 0.475, 32 -> 0.333, 64 -> 0.192, >= 128 -> 0.05.
    ``stat_batch`` is the ghost-group size when the batch is split into groups, else the real batch size.
    """
    if stat_batch < 1:
        raise ValueError(f"stat_batch must be >= 1, got {stat_batch}")
    lo, hi = math.log2(2), math.log2(128)
    t = min(max((math.log2(stat_batch) - lo) / (hi - lo), 0.0), 1.0)
    return REFERENCE_PRIOR_WEIGHTS[2] + t * (REFERENCE_PRIOR_WEIGHTS[128] - REFERENCE_PRIOR_WEIGHTS[2])


# --------------------------------------------------------------------------------------------------------------
# The norm registry
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormSpec:
    """One normalization of the study.

    ``kind``: "bn" (torch BatchNorm, or BKN without prior = BatchNorm per ghost group when grouped), "gn"
    (GroupNorm with ``gn_groups`` groups), "bkn" (BatchNorm layers converted to a Kalman chain with
    ``normlayers.convert`` and the given ``transition``).
    """

    name: str
    kind: str
    label: str
    transition: str | None = None
    gn_groups: int = 4  # the reference's GN baseline uses 4 groups; divides every width of the study nets


NORMS: dict[str, NormSpec] = {
    spec.name: spec
    for spec in (
        NormSpec("bn", "bn", "BatchNorm"),
        NormSpec("gn", "gn", "GroupNorm(4)"),
        NormSpec("bkn_mc", "bkn", "BKN Monte-Carlo", transition="monte_carlo"),
        NormSpec("bkn_an", "bkn", "BKN analytic", transition="analytic"),
    )
}


def norm_spec(name: str) -> NormSpec:
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose from {sorted(NORMS)}")
    return NORMS[name]


def base_norm_factory(spec: NormSpec, group_size: int | None = None) -> NormFactory:
    """The factory a model is BUILT with (BKN models are built with BatchNorm, then converted).

    With ``group_size`` (ghost groups) the BatchNorm is ``BatchKalmanNorm2d`` without a prior, i.e. BatchNorm
    whose statistics are computed per group of ``group_size`` samples (ghost BatchNorm).
    """
    if spec.kind == "gn":
        if group_size is not None:
            raise ValueError("GroupNorm does not depend on the batch: ghost groups make no sense for it")
        return lambda c: nn.GroupNorm(spec.gn_groups, c)
    if group_size is None:
        return nn.BatchNorm2d
    from normlayers import BatchKalmanNorm2d

    return lambda c: BatchKalmanNorm2d(c, prior_weight=0.0, group_size=group_size)


def finalize_norms(
    model: nn.Module, spec: NormSpec, stat_batch: int, group_size: int | None = None
) -> tuple[nn.Module, float | None]:
    """For BKN specs: convert the model's BatchNorms into a Kalman chain; returns ``(model, prior_weight)``."""
    if spec.kind != "bkn":
        return model, None
    from normlayers import convert

    p = prior_weight_for(stat_batch)
    return convert(model, prior_weight=p, transition=spec.transition, group_size=group_size), p


# --------------------------------------------------------------------------------------------------------------
# The pre-activation ResNet (the reference's CIFAR net, scaled down to 8x8 digits)
# --------------------------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """norm -> ReLU -> conv3x3(stride) -> norm -> ReLU -> conv3x3, plus the shortcut.

    The shortcut is the identity, or, when the shape changes, a 1x1 strided conv applied to the pre-activated
    input (He et al. 2016, "Identity mappings"), so every tensor a norm sees is a sum of conv outputs.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm_layer: NormFactory) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        a = self.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        y = self.conv1(a)
        y = self.conv2(self.relu(self.bn2(y)))
        return y + skip


class PreActResNet(nn.Module):
    """conv3x3 stem -> stages of pre-activation blocks (stride 2 between stages) -> norm -> ReLU -> pool -> linear.

    ``depth`` blocks per stage; widths (16, 32, 64) as in the reference's CIFAR ResNets; the norm of every layer
    comes from ``norm_layer`` (channels -> module).
    """

    def __init__(
        self,
        norm_layer: NormFactory = nn.BatchNorm2d,
        in_channels: int = 1,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        depth: int = 1,
    ) -> None:
        super().__init__()
        if depth < 1 or not widths:
            raise ValueError(f"need depth >= 1 and at least one stage, got depth={depth}, widths={widths}")
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(PreActBlock(c_in, c_out, stride, norm_layer))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = norm_layer(c_in)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C_in, H, W) -> logits (N, num_classes)."""
        y = self.blocks(self.stem(x))
        y = self.relu(self.bn(y))
        y = y.mean(dim=(2, 3))  # global average pool: (N, C, H, W) -> (N, C)
        return self.fc(y)


def build_resnet(
    norm: str, stat_batch: int, group_size: int | None = None, depth: int = 1, **kwargs: Any
) -> tuple[nn.Module, float | None]:
    """The study's ResNet with norm ``norm``; BKN gets the prior weight of ``stat_batch`` samples."""
    spec = norm_spec(norm)
    model = PreActResNet(norm_layer=base_norm_factory(spec, None if spec.kind == "bkn" else group_size), depth=depth, **kwargs)
    return finalize_norms(model, spec, stat_batch, group_size)


# --------------------------------------------------------------------------------------------------------------
# Classification system and digits data adapter
# --------------------------------------------------------------------------------------------------------------


class ClassificationSystem(pl.LightningModule):
    """Cross-entropy training with the reference's CIFAR recipe: SGD momentum, step lr, weight decay.

    ``lr_milestones`` are FRACTIONS of ``max_epochs`` at which the lr is multiplied by 0.1. Validation may have
    two loaders: index 0 = validation set (``val_loss``, ``val_acc``), index 1 = test set evaluated every epoch
    (``epoch_test_acc``, for learning curves). ``test_step`` logs ``test_loss`` and ``test_acc``.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 2e-4,
        max_epochs: int = 10,
        lr_milestones: Sequence[float] = (0.5, 0.75),
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.max_epochs, self.lr_milestones = max_epochs, tuple(lr_milestones)
        acc = lambda: torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)  # noqa: E731
        self.train_acc, self.val_acc, self.epoch_test_acc, self.test_acc = acc(), acc(), acc(), acc()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        logits = self.model(x)
        if dataloader_idx == 0:
            self.val_acc(logits, y)
            self.log("val_loss", F.cross_entropy(logits, y), batch_size=len(y), add_dataloader_idx=False)
            self.log("val_acc", self.val_acc, batch_size=len(y), add_dataloader_idx=False)
        else:
            self.epoch_test_acc(logits, y)
            self.log("epoch_test_acc", self.epoch_test_acc, batch_size=len(y), add_dataloader_idx=False)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self.model(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y), batch_size=len(y))
        self.log("test_acc", self.test_acc, batch_size=len(y))

    def configure_optimizers(self) -> dict[str, Any]:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        milestones = sorted({max(1, round(f * self.max_epochs)) for f in self.lr_milestones})
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class DigitsStudyData(pl.LightningDataModule):
    """Digits (``nas.data.load_digits_split``: fixed stratified 60/20/20 split, standardized) for the study.

    An adapter over the nas data module's split: seeded epoch shuffling (``EpochShuffleSampler``, exact resume),
    ``drop_last`` on the training loader (so every step has exactly ``batch_size`` samples and ghost groups divide
    it), and a second validation loader with the test set for per-epoch test curves.
    """

    def __init__(self, batch_size: int, seed: int = 0, split_seed: int = 0, eval_batch_size: int = 512) -> None:
        super().__init__()
        if batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (batch statistics need two samples), got {batch_size}")
        self.batch_size, self.seed, self.split_seed, self.eval_batch_size = batch_size, seed, split_seed, eval_batch_size
        self.splits: dict[str, tuple[Tensor, Tensor]] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is None:
            from nas.data import load_digits_split

            self.splits = load_digits_split(seed=self.split_seed)
            n_train = len(self.splits["train"][1])
            if self.batch_size > n_train:
                raise ValueError(f"batch_size {self.batch_size} exceeds the {n_train} training images")

    def _dataset(self, name: str) -> TensorDataset:
        self.setup()
        assert self.splits is not None
        return TensorDataset(*self.splits[name])

    def train_dataloader(self) -> DataLoader:
        ds = self._dataset("train")
        return DataLoader(ds, batch_size=self.batch_size, sampler=EpochShuffleSampler(len(ds), self.seed), drop_last=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(self._dataset(n), batch_size=self.eval_batch_size) for n in ("val", "test")]

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._dataset("test"), batch_size=self.eval_batch_size)


# --------------------------------------------------------------------------------------------------------------
# Per-epoch recording
# --------------------------------------------------------------------------------------------------------------


class EpochRecorder(pl.Callback):
    """Records, per epoch, the validation-loop metrics ``val_keys``, the epoch-level ``train_keys`` and the training
    wall time (without validation).

    The row of an epoch is written at ``on_validation_end``, before the checkpoint callbacks (Lightning runs them
    last), so every checkpoint holds the history up to its own epoch and a resumed run keeps its earlier epochs.
    Epoch-level training metrics only exist after validation; they complete the row at ``on_train_epoch_end``.
    The history is restored from a checkpoint only into an empty recorder: ``trainer.test(ckpt_path=best)`` after
    ``fit`` must not roll it back to the best epoch.
    """

    def __init__(self, val_keys: Sequence[str], train_keys: Sequence[str] = ()) -> None:
        self.val_keys, self.train_keys = tuple(val_keys), tuple(train_keys)
        self.history: list[dict[str, float]] = []
        self._t0: float | None = None
        self._train_s: float = float("nan")

    def _metric(self, trainer: pl.Trainer, key: str) -> float:
        v = trainer.callback_metrics.get(key)
        return float(v) if v is not None else float("nan")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t0 = time.perf_counter()

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._t0 is not None and not trainer.sanity_checking:
            self._train_s = time.perf_counter() - self._t0
            self._t0 = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        row = {"epoch": float(trainer.current_epoch), "train_s": self._train_s}
        row.update({k: self._metric(trainer, k) for k in self.val_keys})
        self.history.append(row)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history or self.history[-1]["epoch"] != trainer.current_epoch:  # no validation this epoch
            train_s = time.perf_counter() - self._t0 if self._t0 is not None else float("nan")
            self.history.append({"epoch": float(trainer.current_epoch), "train_s": train_s})
        self._t0 = None
        self.history[-1].update({k: self._metric(trainer, k) for k in self.train_keys})

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.history:
            self.history = [dict(h) for h in state_dict.get("history", [])]


# --------------------------------------------------------------------------------------------------------------
# Runs and their bookkeeping
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell of a study table: a norm at a batch setting. ``group_size`` set = ghost groups in a real batch."""

    norm: str
    batch_size: int
    group_size: int | None = None

    @property
    def stat_batch(self) -> int:
        """Samples behind each batch statistic: the ghost-group size, else the real batch."""
        return self.group_size or self.batch_size

    @property
    def mode(self) -> str:
        return "ghost" if self.group_size else "real"

    @property
    def name(self) -> str:
        ghost = f"_g{self.group_size}" if self.group_size else ""
        return f"{self.norm}_b{self.batch_size}{ghost}"


def run_dir(root: Path, cell: Cell, seed: int) -> Path:
    return Path(root) / cell.name / f"seed{seed}"


def load_result(path: Path) -> dict[str, Any] | None:
    """A finished run's ``result.json`` (None if absent); callers mark reused results with ``"reused": True``."""
    f = Path(path) / "result.json"
    return json.loads(f.read_text()) if f.is_file() else None


def save_result(path: Path, result: dict[str, Any], keep_checkpoints: bool = False) -> None:
    """Write ``result.json`` atomically; drop the run's checkpoints once it is finished (unless asked to keep)."""
    path = Path(path)
    tmp = path / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(path / "result.json")
    if not keep_checkpoints:
        shutil.rmtree(path / "checkpoints", ignore_errors=True)


def run_config(out_dir: Path, epochs: int, seed: int, monitor: str, mode: str, resume: bool, **kw: Any) -> RunConfig:
    """The RunConfig of one study run: quiet (no progress bar), CSV log, checkpoints for resume; ``kw`` overrides."""
    ckpt = Path(out_dir) / "checkpoints" / "last.ckpt"
    options: dict[str, Any] = dict(
        out_dir=str(out_dir),
        max_epochs=epochs,
        seed=seed,
        accelerator="auto",
        devices=1,
        monitor=monitor,
        monitor_mode=mode,
        resume=bool(resume and ckpt.is_file()),
        progress_bar=False,
        loggers=("csv",),
    )
    return RunConfig(**{**options, **kw})


def train_digits_cell(
    cell: Cell,
    seed: int,
    epochs: int,
    root: Path,
    base_lr: float = 0.1,
    depth: int = 1,
    resume: bool = True,
    keep_checkpoints: bool = False,
    limit_train_batches: int | None = None,
) -> dict[str, Any]:
    """Train one digits run (or load it when finished) and return its result dict."""
    out = run_dir(root, cell, seed)
    done = load_result(out)
    if done is not None and resume and done.get("epochs") == epochs:
        return {**done, "reused": True}
    lr = base_lr * cell.batch_size / 128  # linear scaling from the reference's lr 0.1 at batch 128, for every norm
    pl.seed_everything(seed, workers=True, verbose=False)  # same init for every norm at a given seed
    model, p = build_resnet(cell.norm, cell.stat_batch, group_size=cell.group_size, depth=depth)
    system = ClassificationSystem(model, lr=lr, max_epochs=epochs)
    data = DigitsStudyData(cell.batch_size, seed=seed)
    recorder = EpochRecorder(["val_loss", "val_acc", "epoch_test_acc"], ["train_loss", "train_acc"])
    t0 = time.perf_counter()
    cfg = run_config(out, epochs, seed, "val_loss", "min", resume, limit_train_batches=limit_train_batches)
    res = fit(system, data, cfg, callbacks=[recorder])
    wall = time.perf_counter() - t0
    hist = recorder.history
    train_times = [h["train_s"] for h in hist if np.isfinite(h["train_s"])]
    result = {
        **asdict(cell),
        "cell": cell.name,
        "mode": cell.mode,
        "stat_batch": cell.stat_batch,
        "seed": seed,
        "epochs": epochs,
        "lr": lr,
        "prior_weight": p,
        "final_test_acc": hist[-1]["epoch_test_acc"] if hist else float("nan"),
        "best_val_test_acc": res.test_metrics.get("test_acc", float("nan")),
        "final_val_acc": hist[-1]["val_acc"] if hist else float("nan"),
        "epoch_s": float(np.median(train_times)) if train_times else float("nan"),
        "wall_s": wall,
        "history": hist,
    }
    save_result(out, result, keep_checkpoints)
    return result


def quiet_lightning() -> None:
    """Silence Lightning's per-run info messages and warnings (a study launches dozens of short runs)."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    quiet_lightning()


def run_tasks(
    fn: Callable[..., dict[str, Any]], tasks: Sequence[tuple], workers: int, threads: int, desc: str
) -> list[dict[str, Any]]:
    """``fn(*task)`` for every task, in order, or in a pool of ``workers`` spawned processes; with a progress bar."""
    from tqdm import tqdm

    if workers <= 1:
        init_worker(threads)
        return [fn(*t) for t in tqdm(tasks, desc=desc, unit="run")]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(threads,)) as ex:
        futures = [ex.submit(fn, *t) for t in tasks]
        return [f.result() for f in tqdm(futures, desc=desc, unit="run")]


# --------------------------------------------------------------------------------------------------------------
# Aggregation and plots
# --------------------------------------------------------------------------------------------------------------


def timing_note(results: Sequence[dict[str, Any]], wall: float, workers: int, threads: int, load: tuple) -> str:
    """How long the study took: this invocation, the runs it trained or reused, and the machine load."""
    trained = [r for r in results if not r.get("reused")]
    total = sum(r["wall_s"] for r in results)
    return (
        f"wall {wall:.0f} s for this invocation with {workers} process(es) x {threads} thread(s): {len(trained)} runs "
        f"trained, {len(results) - len(trained)} reused from the runs dir; sum of per-run walls {total:.0f} s; "
        f"load average at start {load[0]:.1f}, end {os.getloadavg()[0]:.1f} (2 cores shared with other jobs)"
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(results: Sequence[dict[str, Any]], metrics: Sequence[str], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per distinct ``keys`` tuple (in first-seen order): ``<m>_mean`` / ``<m>_std`` per metric, ``n_seeds``."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    rows = []
    for key, rs in groups.items():
        row: dict[str, Any] = dict(zip(keys, key))
        row["n_seeds"] = len(rs)
        for m in metrics:
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std([r[m] for r in rs])
        rows.append(row)
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 80) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _plt().close(fig)
    return path


def plot_curves(
    panels: dict[str, dict[str, list[list[float]]]],
    path: Path,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    sharey: bool = True,
) -> Path:
    """``panels[panel][line]`` = one curve per seed (values per epoch); plots mean with a min..max band."""
    plt = _plt()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), sharey=sharey, squeeze=False)
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, curves in lines.items():
            length = min(len(c) for c in curves)
            a = np.asarray([c[:length] for c in curves], dtype=float)  # (seeds, epochs)
            x = np.arange(1, length + 1)
            ax.plot(x, a.mean(0), label=label, lw=1.4)
            ax.fill_between(x, a.min(0), a.max(0), alpha=0.2)
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ylim:
            ax.set_ylim(*ylim)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10, y=1.04)
    return save_figure(fig, path)


def plot_by_batch(
    series: dict[str, list[tuple[float, float, float]]],
    path: Path,
    ylabel: str,
    title: str,
    xlabel: str = "samples per batch statistic",
    logx: bool = True,
) -> Path:
    """``series[label]`` = [(batch, mean, std), ...]: mean with std error bars against the batch size."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.6, 3.2))
    for i, (label, pts) in enumerate(series.items()):
        pts = sorted(pts)
        x = np.array([p[0] for p in pts]) * (1 + 0.03 * (i - len(series) / 2))  # small offset so bars do not overlap
        ax.errorbar(x, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", ms=3, capsize=2, label=label, lw=1.2)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    return save_figure(fig, path)
