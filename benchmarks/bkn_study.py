"""Shared code of the Batch Kalman Normalization studies (``bench_bkn_digits``, ``bench_bkn_acfm``).

What lives here: the study's cells (a norm at a batch setting) and how one is built and trained, seed/run
bookkeeping (one ``result.json`` per finished run, so an interrupted study resumes), aggregation and the plots.
What the study uses from the packages: the norm registry and prior-weight rule (``normlayers.select``), the
pre-activation ResNet (``nas.models``), the classifier system (``nas.systems``), the digits data module
(``nas.data``), the per-epoch recorder (``stflow.callbacks``) and the process pool (``stflow.pool``).

Every training goes through THE shared runner ``stflow.runner.fit``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from nas.data import DigitsDataModule
from nas.models import PreActResNet
from nas.systems import ClassifierSystem
from normlayers import BatchKalmanNorm
from normlayers.select import base_norm_factory, finalize_norms, norm_spec
from stflow.callbacks import EpochRecorder
from stflow.paths import REPO_ROOT
from stflow.pool import quiet_lightning, run_tasks
from stflow.runner import RunConfig, fit

# --------------------------------------------------------------------------------------------------------------
# The study's ResNet with each norm, its training recipe and its data
# --------------------------------------------------------------------------------------------------------------


def build_resnet(
    norm: str,
    stat_batch: int,
    group_size: int | None = None,
    depth: int = 1,
    guard_scope: str = "layer",
    guard_ratio: float = 100.0,
    shortcut: str = "prior",
    **kwargs: Any,
) -> tuple[nn.Module, float | None]:
    """The study's ResNet with norm ``norm``; BKN gets the prior weight of ``stat_batch`` samples."""
    spec = norm_spec(norm)
    model = PreActResNet(
        norm_layer=base_norm_factory(spec, None if spec.kind == "bkn" else group_size), depth=depth, **kwargs
    )
    return finalize_norms(model, spec, stat_batch, group_size, guard_scope, guard_ratio, shortcut)


def study_data(batch_size: int, seed: int = 0, eval_batch_size: int = 512) -> DigitsDataModule:
    """The study's digits data: the fixed 60/20/20 split (split seed 0), seeded epoch shuffling (the runner's
    ``EpochShuffleSampler``, exact resume), ``drop_last`` (every step has ``batch_size`` samples, so ghost
    groups divide it) and the test set as a second validation loader (per-epoch test curve)."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (batch statistics need two samples), got {batch_size}")
    return DigitsDataModule(
        batch_size, seed=0, shuffle_seed=seed, drop_last=True, eval_batch_size=eval_batch_size, test_in_val=True
    )


def study_system(model: nn.Module, lr: float = 0.1, max_epochs: int = 10) -> ClassifierSystem:
    """The reference's CIFAR recipe: SGD momentum 0.9, weight decay 2e-4, lr x0.1 at 50% and 75% of the epochs."""
    return ClassifierSystem(
        model,
        lr=lr,
        weight_decay=2e-4,
        max_epochs=max_epochs,
        optimizer="sgd",
        momentum=0.9,
        schedule="step",
        lr_milestones=(0.5, 0.75),
    )


class GuardMonitor:
    """Counts, during training, how often BKN's fallback to plain BN fires under each guard rule.

    A forward pre-hook on every :class:`BatchKalmanNorm` with ghost groups sees the layer's input and the prior
    the Kalman chain feeds it, and recomputes ``ratio = var_P / (var_B + eps)`` per (group, channel) as
    ``normlayers.reference`` does: the layer rule fires when the mean over all groups and channels reaches
    ``guard_ratio``, the group rule for each group whose mean over channels does. Both are counted on the same
    statistics, whatever rule the model itself uses, so a run shows how often the two scopes would differ.
    """

    def __init__(self, model: nn.Module) -> None:
        self.calls = self.layer_fired = self.groups = self.groups_fired = self.disagree = 0
        self.layer_ratios: list[float] = []  # the layer rule's ratio, one per call
        self.group_ratios: list[torch.Tensor] = []  # the group rule's ratios, (G,) per call
        self._handles = [
            m.register_forward_pre_hook(self._count, with_kwargs=True)
            for m in model.modules()
            if isinstance(m, BatchKalmanNorm) and m.group_size
        ]

    @torch.no_grad()
    def _count(self, module: BatchKalmanNorm, args: tuple, kwargs: dict) -> None:
        prior = kwargs.get("prior")
        if not module.training or prior is None or module.prior_weight == 0.0:
            return
        x = args[0]
        g = int(module.group_size)
        groups, c = x.shape[0] // g, x.shape[1]
        # (N, C, *) -> (G, g, C, L): ghost group, sample in group, channel, flattened spatial
        var_b = torch.var(x.float().reshape(groups, g, c, -1), dim=(1, 3), correction=0)  # (G, C)
        var_p = prior[1].float().expand(groups, c)  # (C,) or (G, C) -> (G, C)
        ratios = var_p / (var_b + module.eps)
        layer_ratio, group_ratio = float(ratios.mean()), ratios.mean(dim=1)  # scalar, (G,)
        self.layer_ratios.append(layer_ratio)
        self.group_ratios.append(group_ratio)
        layer = layer_ratio >= module.guard_ratio
        per_group = group_ratio >= module.guard_ratio
        fired = int(per_group.sum())
        self.calls += 1
        self.layer_fired += layer
        self.groups += groups
        self.groups_fired += fired
        self.disagree += fired != (groups if layer else 0)

    def summary(self) -> dict[str, float]:
        """Counts and rates (%): layer rule per layer call, group rule per group decision, calls where they differ;
        the median, 99th percentile and maximum of each rule's ratio (how far from ``guard_ratio`` they stay)."""
        rate = lambda n, d: 100.0 * n / d if d else float("nan")  # noqa: E731
        stats = {
            "calls": self.calls,
            "groups": self.groups,
            "layer_fire_pct": rate(self.layer_fired, self.calls),
            "group_fire_pct": rate(self.groups_fired, self.groups),
            "disagree_pct": rate(self.disagree, self.calls),
        }
        for rule, values in (("layer", np.asarray(self.layer_ratios)),
                             ("group", torch.cat(self.group_ratios).numpy() if self.group_ratios else np.zeros(0))):
            for name, q in (("p50", 50), ("p99", 99), ("max", 100)):
                stats[f"{rule}_ratio_{name}"] = float(np.percentile(values, q)) if values.size else float("nan")
        return stats

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# --------------------------------------------------------------------------------------------------------------
# Runs and their bookkeeping
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One cell of a study table: a norm at a batch setting. ``group_size`` set = ghost groups in a real batch;
    ``guard_scope``, ``guard_ratio``: BKN's BN-fallback decision per layer (default) or per ghost group, and its
    threshold (default 100); ``shortcut``: what a residual branch carries in the Kalman chain (default "prior");
    ``depth``: residual blocks per stage of the ResNet."""

    norm: str
    batch_size: int
    group_size: int | None = None
    guard_scope: str = "layer"
    guard_ratio: float = 100.0
    shortcut: str = "prior"
    depth: int = 1

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
        # the defaults add nothing, so runs made before the guard options keep their names
        scope = "" if self.guard_scope == "layer" else f"_guard-{self.guard_scope}"
        ratio = "" if self.guard_ratio == 100.0 else f"_ratio{self.guard_ratio:g}"
        shortcut = "" if self.shortcut == "prior" else f"_shortcut-{self.shortcut}"
        depth = "" if self.depth == 1 else f"_depth{self.depth}"
        return f"{self.norm}_b{self.batch_size}{ghost}{scope}{ratio}{shortcut}{depth}"


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


def study_runs_dir(name: str, runs_dir: str | None, quick: bool) -> Path:
    """Where a study keeps its runs: ``--runs-dir``, else ``runs/<name>`` (``runs/<name>_quick`` for smoke runs)."""
    return Path(runs_dir or REPO_ROOT / "runs" / (name + ("_quick" if quick else "")))


def run_study(
    name: str,
    train: Any,
    cells: Sequence[Cell],
    seeds: Sequence[int],
    kw: dict[str, Any],
    workers: int,
    threads: int,
) -> tuple[list[dict[str, Any]], float, tuple[float, float, float]]:
    """``train(cell, seed, kw)`` for every cell (in the given order) and seed, in ``workers`` processes with
    ``threads`` torch threads each; returns ``(results, wall seconds, load average at the start)``."""
    quiet_lightning()
    t0, load0 = time.perf_counter(), os.getloadavg()
    results = run_tasks(train, [(c, s, kw) for c in cells for s in seeds], workers, threads, name)
    return results, time.perf_counter() - t0, load0


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
    resume: bool = True,
    keep_checkpoints: bool = False,
    limit_train_batches: int | None = None,
    guard_stats: bool = False,
) -> dict[str, Any]:
    """Train one digits run (or load it when finished) and return its result dict; ``guard_stats``: count how
    often each guard rule would fire during training (:class:`GuardMonitor`, result key ``"guard"``)."""
    out = run_dir(root, cell, seed)
    done = load_result(out)
    if done is not None and resume and done.get("epochs") == epochs:
        return {**done, "reused": True}
    lr = base_lr * cell.batch_size / 128  # linear scaling from the reference's lr 0.1 at batch 128, for every norm
    pl.seed_everything(seed, workers=True, verbose=False)  # same init for every norm at a given seed
    model, p = build_resnet(
        cell.norm,
        cell.stat_batch,
        group_size=cell.group_size,
        depth=cell.depth,
        guard_scope=cell.guard_scope,
        guard_ratio=cell.guard_ratio,
        shortcut=cell.shortcut,
    )
    monitor = GuardMonitor(model) if guard_stats else None  # after convert: its hooks feed the priors first
    system = study_system(model, lr=lr, max_epochs=epochs)
    data = study_data(cell.batch_size, seed=seed)
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
    if monitor is not None:
        result["guard"] = monitor.summary()
        monitor.remove()
    save_result(out, result, keep_checkpoints)
    return result


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
    print(f"saved {path}")
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
