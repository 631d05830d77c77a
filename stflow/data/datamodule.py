"""Loading a crowd-flow dataset end to end, and the Lightning data module every model trains on.

Pipeline (:func:`load_crowd_flow`): read and validate each flow file -> drop incomplete days per
file -> concatenate kept slots -> closeness/period/trend windows -> split samples in time order
(test = the last ``test_days * T`` samples, validation = the last ``val_fraction`` of the rest) ->
fit the scaler on the TRAINING SLOTS, i.e. every kept slot strictly before the first validation
target (the first test target when there is no validation split). With ``val_fraction=0`` and no
gaps this is exactly the reference's choice (all slots before the last ``test_days * T`` slots).

External vectors: an input frame gets the vector of its own slot (its weather is already observed);
the target gets the vector of its slot with the weather of the PREVIOUS slot, as in the reference.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..runner import EpochShuffleSampler, ResumableLoader
from .datasets import DatasetSpec, get_dataset_spec, resolve_file
from .features import external_features
from .hdf5 import DataFormatError, read_flow_file, read_holidays, read_meteorology, remove_incomplete_days
from .options import CrowdFlowOptions
from .scaling import MinMaxScaler
from .synthetic import generate_synthetic_city
from .windowing import WindowIndex, build_windows

__all__ = [
    "CrowdFlowData",
    "CrowdFlowDataModule",
    "CrowdFlowWindows",
    "load_crowd_flow",
    "synthetic_cache_dir",
    "ensure_synthetic_city",
]

SYNTHETIC_VERSION = "1"


def synthetic_cache_dir(seed: int = 0) -> Path:
    """``$STFLOW_CACHE`` or ``$XDG_CACHE_HOME/stflow`` or ``~/.cache/stflow``, then ``synthetic-<seed>``."""
    root = os.environ.get("STFLOW_CACHE")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stflow")
    return Path(root) / f"synthetic-{seed}"


def ensure_synthetic_city(seed: int = 0) -> Path:
    """The cache directory of the default synthetic city for ``seed``, generated when absent or stale."""
    target = synthetic_cache_dir(seed)
    stamp = target / "VERSION"
    if stamp.is_file() and stamp.read_text().strip() == SYNTHETIC_VERSION:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    generate_synthetic_city(tmp, seed=seed)
    (tmp / "VERSION").write_text(SYNTHETIC_VERSION + "\n")
    if target.exists():  # stale version
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.rename(tmp, target)  # atomic: concurrent ranks either win or find the finished directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass
class CrowdFlowData:
    """Everything :func:`load_crowd_flow` derives from a data directory (see the module docstring)."""

    spec: DatasetSpec
    data_dir: Path
    files: list[Path]
    flows: np.ndarray  # float64 (N, 2, H, W) kept slots, original units
    timestamps: pd.DatetimeIndex  # (N,)
    file_ids: np.ndarray  # int (N,) which flow file each kept slot came from
    slots_read: int
    removed_days: dict[str, list[str]]  # file name -> YYYYMMDD days dropped as incomplete
    windows: WindowIndex
    n_train: int
    n_val: int
    n_test: int
    train_slot_mask: np.ndarray  # bool (N,)
    scaler: MinMaxScaler
    scaler_source: str
    ext_frame: np.ndarray  # float64 (N, D): vector of each slot as an input frame
    ext_target: np.ndarray  # float64 (N, D): vector of each slot as a target (previous-slot weather)
    metric_factor: float
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def slots_per_day(self) -> int:
        return self.spec.slots_per_day

    @property
    def grid_shape(self) -> tuple[int, int]:
        return (int(self.flows.shape[2]), int(self.flows.shape[3]))

    @property
    def ext_dim(self) -> int:
        return int(self.ext_frame.shape[1])

    def split(self, name: str) -> WindowIndex:
        bounds = {
            "train": slice(0, self.n_train),
            "val": slice(self.n_train, self.n_train + self.n_val),
            "test": slice(self.n_train + self.n_val, self.n_train + self.n_val + self.n_test),
        }
        return self.windows.subset(bounds[name])

    def info(self) -> dict[str, Any]:
        """A JSON-friendly summary of what the data layer sees."""

        def span(name: str) -> list[str | None]:
            part = self.split(name)
            if not len(part):
                return [None, None]
            return [str(self.timestamps[part.target[0]]), str(self.timestamps[part.target[-1]])]

        removed = [d for days in self.removed_days.values() for d in days]
        return {
            "dataset": self.spec.name,
            "data_dir": str(self.data_dir),
            "files": [str(p) for p in self.files],
            "slots_per_day": self.slots_per_day,
            "grid": list(self.grid_shape),
            "slots_read": self.slots_read,
            "slots_kept": int(len(self.timestamps)),
            "slots_removed": int(self.slots_read - len(self.timestamps)),
            "removed_days": removed,
            "removed_days_per_file": self.removed_days,
            "date_first": str(self.timestamps[0]),
            "date_last": str(self.timestamps[-1]),
            "samples": {"total": len(self.windows), "train": self.n_train, "val": self.n_val, "test": self.n_test},
            "train_period": span("train"),
            "val_period": span("val"),
            "test_period": span("test"),
            "train_slots": int(self.train_slot_mask.sum()),
            "scaler": {"min": self.scaler.min, "max": self.scaler.max, "source": self.scaler_source},
            "features": self.options.get("features"),
            "ext_dim": self.ext_dim,
            "metric_factor": self.metric_factor,
            "window": {
                k: self.options.get(k)
                for k in ("len_closeness", "len_period", "len_trend", "period_interval", "trend_interval")
            },
        }


def _external(
    spec: DatasetSpec,
    data_dir: Path,
    timestamps: pd.DatetimeIndex,
    windows: WindowIndex,
    features: str,
    compat_weekend_bug: bool,
    compat_meteorology_bug: bool,
) -> tuple[np.ndarray, np.ndarray]:
    holidays = meteorology = None
    if features != "none" and spec.holiday_file:
        holidays = read_holidays(resolve_file(data_dir, spec.holiday_file))
    if features != "none" and spec.meteorology_file:
        met_slots = spec.meteorology_slots_per_day or spec.slots_per_day
        meteorology = read_meteorology(resolve_file(data_dir, spec.meteorology_file), met_slots)
    # Only the slots some sample uses need a vector (meteorology may not cover every other slot).
    frame_rows = np.unique(np.concatenate([windows.closeness.ravel(), windows.period.ravel(), windows.trend.ravel()]))
    out = []
    for rows, previous in ((frame_rows, False), (windows.target, True)):
        vec = external_features(
            timestamps[rows],
            features,
            spec.slots_per_day,
            holidays=holidays,
            meteorology=meteorology,
            previous_slot=previous,
            compat_weekend_bug=compat_weekend_bug,
            compat_meteorology_bug=compat_meteorology_bug,
        )
        full = np.zeros((len(timestamps), vec.shape[1]))
        full[rows] = vec
        out.append(full)
    return out[0], out[1]


def load_crowd_flow(
    dataset: str | DatasetSpec,
    data_dir: str | os.PathLike,
    options: CrowdFlowOptions | None = None,
    **changes: Any,
) -> CrowdFlowData:
    """Read, clean, window, split and scale one dataset (see the module docstring).

    ``options`` (default :class:`CrowdFlowOptions`) with ``changes`` applied, e.g. ``len_closeness=3``.
    """
    spec = get_dataset_spec(dataset)
    opts = (options or CrowdFlowOptions()).replace(**changes)
    len_closeness, len_period, len_trend = opts.len_closeness, opts.len_period, opts.len_trend
    period_interval, trend_interval, val_fraction = opts.period_interval, opts.trend_interval, opts.val_fraction
    test_days = spec.test_days if opts.test_days is None else opts.test_days
    data_dir = Path(data_dir)
    T = spec.slots_per_day

    files = [resolve_file(data_dir, pattern) for pattern in spec.flow_files]
    grid = spec.grid
    chunks, stamps, ids, removed = [], [], [], {}
    slots_read = 0
    for i, path in enumerate(files):
        flow = read_flow_file(path, T, grid)
        grid = grid or tuple(flow.data.shape[2:])  # later files must match the first one
        slots_read += len(flow.data)
        cleaned = remove_incomplete_days(flow.timestamps, T, keep_edge_days=spec.keep_edge_days)
        removed[path.name] = cleaned.removed_days
        chunks.append(flow.data[cleaned.keep])
        stamps.append(flow.timestamps[cleaned.keep])
        ids.append(np.full(int(cleaned.keep.sum()), i))
    flows = np.concatenate(chunks)
    timestamps = pd.DatetimeIndex(np.concatenate([s.values for s in stamps])).as_unit("ns")
    file_ids = np.concatenate(ids)
    if not len(flows):
        raise DataFormatError(f"{data_dir}: no complete day left after removing incomplete days")
    if not np.any(flows):  # one quiet file among others is data; nothing but zeros is not
        names = ", ".join(str(p) for p in files)
        raise DataFormatError(f"{names}: every flow value is 0 ({len(flows)} slots), nothing to learn or scale")
    overlap = np.flatnonzero(np.diff(timestamps.asi8) <= 0)
    if overlap.size:
        path = files[file_ids[overlap[0] + 1]]
        raise DataFormatError(
            f"{path}: starts at {timestamps[overlap[0] + 1]}, "
            f"not after the previous file's last slot {timestamps[overlap[0]]}"
        )

    windows = build_windows(
        timestamps, file_ids, T, len_closeness, len_period, len_trend, period_interval, trend_interval
    )
    window_desc = (
        f"len_closeness={len_closeness}, len_period={len_period}, len_trend={len_trend}, "
        f"intervals {period_interval}/{trend_interval} days"
    )
    if not len(windows):
        raise DataFormatError(f"{data_dir}: the window ({window_desc}) leaves no samples in {len(flows)} kept slots")
    n_test = test_days * T
    if n_test >= len(windows):
        raise DataFormatError(
            f"{data_dir}: {len(windows)} samples ({window_desc}) "
            f"leave nothing for training after the {n_test} test samples"
        )
    n_val = int(round(val_fraction * (len(windows) - n_test)))
    n_train = len(windows) - n_test - n_val
    if n_train < 1:
        raise DataFormatError(f"{data_dir}: val_fraction={val_fraction} leaves no training sample")

    if n_val + n_test:  # training slots: everything before the first held-out target
        train_slot_mask = np.asarray(timestamps < timestamps[windows.target[n_train]])
    else:
        train_slot_mask = np.ones(len(flows), dtype=bool)
    scale_min, scale_max = opts.scale_min, opts.scale_max
    overridden = [name for name, value in (("min", scale_min), ("max", scale_max)) if value is not None]
    if len(overridden) < 2:
        fitted = MinMaxScaler.fit(flows[train_slot_mask])
        scale_min = fitted.min if scale_min is None else scale_min
        scale_max = fitted.max if scale_max is None else scale_max
    source = "train slots" if not overridden else f"override ({'/'.join(overridden)})"
    if not scale_max > scale_min:
        raise DataFormatError(f"{data_dir}: cannot scale, min {scale_min} >= max {scale_max} ({source})")
    scaler = MinMaxScaler(float(scale_min), float(scale_max))

    ext_frame, ext_target = _external(
        spec, data_dir, timestamps, windows, opts.features, opts.compat_weekend_bug, opts.compat_meteorology_bug
    )
    if spec.metric_factor == "active_cells":
        active = int((flows != 0).any(axis=(0, 1)).sum())
        metric_factor = math.sqrt(grid[0] * grid[1] / max(active, 1))
    else:
        metric_factor = float(spec.metric_factor)
    options = {**opts.as_dict(), "test_days": test_days}
    return CrowdFlowData(
        spec, data_dir, files, flows, timestamps, file_ids, slots_read, removed, windows, n_train, n_val, n_test,
        train_slot_mask, scaler, source, ext_frame, ext_target, metric_factor, options,
    )


class CrowdFlowWindows(Dataset):
    """Samples of one split as dict items (float32 tensors scaled to [-1, 1], see the data module)."""

    def __init__(self, scaled: torch.Tensor, ext_frame: torch.Tensor, ext_target: torch.Tensor, windows: WindowIndex):
        self.scaled = scaled  # (N, 2, H, W) float32
        self.ext_frame = ext_frame  # (N, D) float32
        self.ext_target = ext_target  # (N, D) float32
        self.windows = windows
        self._c = torch.from_numpy(windows.closeness)
        self._p = torch.from_numpy(windows.period)
        self._t = torch.from_numpy(windows.trend)
        self._y = torch.from_numpy(windows.target)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        c, p, t, y = self._c[i], self._p[i], self._t[i], self._y[i]
        return {
            "closeness": self.scaled[c],  # (lc, 2, H, W)
            "period": self.scaled[p],  # (lp, 2, H, W)
            "trend": self.scaled[t],  # (lt, 2, H, W)
            "ext_closeness": self.ext_frame[c],  # (lc, D)
            "ext_period": self.ext_frame[p],  # (lp, D)
            "ext_trend": self.ext_frame[t],  # (lt, D)
            "ext_target": self.ext_target[y],  # (D,)
            "target": self.scaled[y],  # (2, H, W)
            "index": y,  # () int64 into timestamps / flows
        }


class CrowdFlowDataModule(pl.LightningDataModule):
    """Crowd-flow samples for training, validation and test (the contract every model codes against).

    Batches are dicts of float32 tensors: ``closeness`` (B, lc, 2, H, W), ``period`` (B, lp, 2, H, W),
    ``trend`` (B, lt, 2, H, W), ``target`` (B, 2, H, W), all scaled to [-1, 1], frames most recent
    first; ``ext_closeness``/``ext_period``/``ext_trend`` (B, l, D), ``ext_target`` (B, D); and
    ``index`` (B,) int64, the target's row in ``timestamps`` / ``flows``.
    ``dataset`` is a registered name, a ``.yaml`` spec path or a :class:`DatasetSpec`; with
    ``dataset="synthetic"`` and no ``data_dir`` a synthetic city (``options.synthetic_seed``, not ``seed``,
    which only shuffles) is generated into the user cache.
    """

    def __init__(
        self,
        dataset: str | DatasetSpec = "synthetic",
        data_dir: str | None = None,
        options: CrowdFlowOptions | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_train: bool = True,
        **changes: Any,
    ) -> None:
        super().__init__()
        self.spec = get_dataset_spec(dataset)
        if data_dir is None and self.spec.name != "synthetic":
            raise ValueError(f"dataset {self.spec.name!r} needs data_dir (only 'synthetic' can be generated)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.options = (options or CrowdFlowOptions()).replace(**changes)
        self.save_hyperparameters({"dataset": self.spec.name if isinstance(dataset, DatasetSpec) else dataset,
                                   "data_dir": data_dir, "options": self.options.as_dict(), "batch_size": batch_size,
                                   "num_workers": num_workers, "seed": seed, "shuffle_train": shuffle_train})
        self.data_dir = data_dir
        self.batch_size, self.num_workers, self.seed, self.shuffle_train = batch_size, num_workers, seed, shuffle_train
        self.data: CrowdFlowData | None = None

    @property
    def len_closeness(self) -> int:
        return self.options.len_closeness

    @property
    def len_period(self) -> int:
        return self.options.len_period

    @property
    def len_trend(self) -> int:
        return self.options.len_trend

    def arguments(self) -> dict[str, Any]:
        """Plain (JSON-able) arguments that rebuild this data module with :meth:`from_arguments`."""
        data_dir = None if self.data_dir is None else str(Path(self.data_dir).resolve())
        return {"dataset": self.hparams["dataset"], "data_dir": data_dir, "options": self.options.as_dict(),
                "batch_size": self.batch_size, "seed": self.seed}

    @classmethod
    def from_arguments(cls, arguments: dict[str, Any], **changes: Any) -> CrowdFlowDataModule:
        """The data module :meth:`arguments` describe; ``changes`` replace arguments or single options."""
        arguments = {**arguments, "options": dict(arguments.get("options") or {})}
        for key, value in changes.items():
            if key in arguments and key != "options":
                arguments[key] = value
            else:
                arguments["options"][key] = value
        options = CrowdFlowOptions().replace(**arguments.pop("options"))
        return cls(options=options, **arguments)

    def _resolved_dir(self) -> Path:
        return Path(self.data_dir) if self.data_dir is not None else synthetic_cache_dir(self.options.synthetic_seed)

    def prepare_data(self) -> None:
        if self.data_dir is None:
            ensure_synthetic_city(self.options.synthetic_seed)

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        if self.data_dir is None:
            ensure_synthetic_city(self.options.synthetic_seed)
        data = load_crowd_flow(self.spec, self._resolved_dir(), self.options)
        self.data = data
        self.scaler = data.scaler
        self.timestamps = data.timestamps
        self.flows = data.flows
        self.slots_per_day = data.slots_per_day
        self.grid_shape = data.grid_shape
        self.ext_dim = data.ext_dim
        self.metric_factor = data.metric_factor
        self.train_slot_mask = data.train_slot_mask
        scaled = torch.from_numpy(data.scaler.transform(data.flows).astype(np.float32))
        ext_frame = torch.from_numpy(data.ext_frame.astype(np.float32))
        ext_target = torch.from_numpy(data.ext_target.astype(np.float32))
        self.train_dataset, self.val_dataset, self.test_dataset = (
            CrowdFlowWindows(scaled, ext_frame, ext_target, data.split(name)) for name in ("train", "val", "test")
        )

    def info(self) -> dict[str, Any]:
        if self.data is None:
            self.setup()
        return self.data.info()

    def _loader(self, dataset: CrowdFlowWindows, train: bool) -> DataLoader:
        """Training: a :class:`~stflow.runner.ResumableLoader` (a run stopped mid-epoch resumes at its next batch)
        over the ``(seed, epoch)`` shuffle; evaluation: a plain ordered loader."""
        shuffle = train and self.shuffle_train and len(dataset) > 0
        sampler = EpochShuffleSampler(len(dataset), self.seed) if shuffle else None
        return (ResumableLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, train=False)
