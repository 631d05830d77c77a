"""Evaluation figures (matplotlib, Agg backend): flow maps for one hour, RMSE by hour of day, per-cell RMSE.

All inputs are numpy arrays in ORIGINAL units: ``pred`` / ``true`` (N, 2, H, W) for the test samples and their
target ``timestamps`` (N,). Every function writes one PNG and returns its path.
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = [
    "plot_flow_maps",
    "plot_rmse_by_hour",
    "plot_cell_rmse",
    "rmse_by_hour",
    "cell_rmse",
    "write_evaluation_plots",
]

CHANNELS = ("inflow", "outflow")


def _check(pred: np.ndarray, true: np.ndarray) -> None:
    if pred.shape != true.shape or pred.ndim != 4:
        raise ValueError(f"pred and true must both be (N, C, H, W), got {pred.shape} and {true.shape}")


def plot_flow_maps(pred: np.ndarray, true: np.ndarray, title: str, path: str | os.PathLike) -> Path:
    """One sample: rows inflow / outflow; columns true, predicted, error. pred/true (2, H, W)."""
    fig, axes = plt.subplots(2, 3, figsize=(9, 6), constrained_layout=True)
    for c, name in enumerate(CHANNELS):
        vmax = float(max(true[c].max(), pred[c].max(), 1e-9))
        for col, (label, image, cmap, lim) in enumerate(
            (
                ("true", true[c], "viridis", (0, vmax)),
                ("predicted", pred[c], "viridis", (0, vmax)),
                ("predicted - true", pred[c] - true[c], "coolwarm", None),
            )
        ):
            ax = axes[c, col]
            if lim is None:
                bound = float(np.abs(image).max()) or 1.0
                lim = (-bound, bound)
            shown = ax.imshow(image, cmap=cmap, vmin=lim[0], vmax=lim[1])
            ax.set_title(f"{name}: {label}")
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(shown, ax=ax, shrink=0.8)
    fig.suptitle(title)
    return _save(fig, path)


def rmse_by_hour(
    pred: np.ndarray, true: np.ndarray, timestamps: pd.DatetimeIndex, metric_factor: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(hours present, RMSE per hour): global RMSE (both channels, every cell) of the samples at each hour,
    times ``metric_factor`` as in the protocol."""
    _check(pred, true)
    hours = np.asarray(pd.DatetimeIndex(timestamps).hour)
    sq = ((pred - true) ** 2).reshape(len(pred), -1).mean(axis=1)  # (N,) per-sample mean square
    present = np.unique(hours)
    rmse = np.array([np.sqrt(sq[hours == h].mean()) * metric_factor for h in present])
    return present, rmse


def plot_rmse_by_hour(
    pred: np.ndarray,
    true: np.ndarray,
    timestamps: pd.DatetimeIndex,
    path: str | os.PathLike,
    metric_factor: float = 1.0,
) -> Path:
    hours, rmse = rmse_by_hour(pred, true, timestamps, metric_factor)
    fig, ax = plt.subplots(figsize=(7, 3.5), constrained_layout=True)
    ax.bar(hours, rmse, color="tab:blue")
    ax.set_xlabel("hour of day (target slot start)")
    ax.set_ylabel("RMSE (original units)")
    ax.set_title("Test RMSE by hour of day")
    ax.set_xticks(hours)
    return _save(fig, path)


def cell_rmse(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """(H, W) RMSE of every cell over the samples and both channels."""
    _check(pred, true)
    return np.sqrt(((pred - true) ** 2).mean(axis=(0, 1)))


def plot_cell_rmse(pred: np.ndarray, true: np.ndarray, path: str | os.PathLike) -> Path:
    fig, ax = plt.subplots(figsize=(4, 6), constrained_layout=True)
    shown = ax.imshow(cell_rmse(pred, true), cmap="magma")
    ax.set_title("Test RMSE per cell")
    fig.colorbar(shown, ax=ax)
    return _save(fig, path)


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_evaluation_plots(
    pred: np.ndarray,
    true: np.ndarray,
    timestamps: pd.DatetimeIndex,
    out_dir: str | os.PathLike,
    hour: str | pd.Timestamp | None = None,
    metric_factor: float = 1.0,
) -> list[Path]:
    """The three figures for a test split; ``hour`` picks the flow-map sample (default: the busiest hour)."""
    _check(pred, true)
    timestamps = pd.DatetimeIndex(timestamps)
    if len(timestamps) != len(pred):
        raise ValueError(f"{len(timestamps)} timestamps for {len(pred)} samples")
    if hour is None:
        row = int(true.reshape(len(true), -1).sum(axis=1).argmax())
    else:
        wanted = pd.Timestamp(hour)
        hits = np.flatnonzero(timestamps == wanted)
        if not hits.size:
            raise ValueError(
                f"hour {wanted} is not a test target; the test period is {timestamps[0]} .. {timestamps[-1]}"
            )
        row = int(hits[0])
    out = Path(out_dir)
    stamp = timestamps[row].strftime("%Y-%m-%d_%H%M")
    return [
        plot_flow_maps(pred[row], true[row], f"flows at {timestamps[row]}", out / f"flow_maps_{stamp}.png"),
        plot_rmse_by_hour(pred, true, timestamps, out / "rmse_by_hour.png", metric_factor),
        plot_cell_rmse(pred, true, out / "cell_rmse.png"),
    ]
