"""Forecasts in original units: one step, a recursive rollout or a direct multi-step head, from a data module or
from any history.

- :func:`rollout`: for origin samples (targets ``t``), predict ``t, t+1, ..., t+H-1`` with a ONE-STEP model; step
  ``h`` feeds the model the observed frames before ``t`` and its OWN predictions for ``t .. t+h-1`` wherever the
  window needs them (historical average ignores history, persistence repeats the last observed frame).
- :func:`direct`: the same origins through a DIRECT head (``model.horizon`` K >= H, :mod:`stflow.models.horizon`):
  one call per origin on the observed window, ``ext_target`` (B, K, D) = the vectors of slots ``t .. t+K-1``; its
  first H steps. :func:`predict_samples` picks :func:`direct` or :func:`rollout` from ``model.horizon``.
- :func:`score`: the protocol metrics (:mod:`stflow.protocols`) per step and averaged over the steps.
- :class:`Forecaster`: ``Forecaster.from_checkpoint(path).predict(flows, timestamps, start=..., end=...)`` builds
  the windows and external vectors (calendar, holidays, meteorology, exactly as in training) from a history of
  frames and returns the forecasts with their timestamps; missing history is a ``ValueError`` naming the slots.

Shapes: flows ``(N, 2, H, W)`` original units; predictions ``(S, H_steps, 2, H, W)``; a direct head's
:class:`Forecast` ``(N, K, 2, H, W)`` (forecast n, step k: the slot ``timestamps[n] + k`` slots).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from stflow.data.windowing import WindowIndex, frame_offsets, origin_samples
from stflow.models.baselines import HistoricalAverage, slot_of_day
from stflow.protocols import check_protocol, protocol_metrics, stssl_split

__all__ = ["Forecast", "Forecaster", "direct", "model_horizon", "origin_samples", "predict_samples", "rollout", "score",
           "test_samples"]


def model_horizon(model: nn.Module) -> int:
    """Steps a network outputs at once: ``model.horizon`` for a direct head, else 1 (one-step models)."""
    return int(getattr(model, "horizon", 1))


def _batch(scaled: Tensor, ext_frame: Tensor, ext_target: Tensor, windows: WindowIndex, rows: np.ndarray,
           target_rows: np.ndarray, frames: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The model's batch dict for samples ``rows`` of ``windows`` (frames overridable), see CrowdFlowWindows.

    ``target_rows`` (B,) for a one-step model, (B, K) for a direct head (``ext_target`` then (B, K, D),
    ``index`` the first target row)."""
    batch: dict[str, Tensor] = {}
    for key, group in (("closeness", windows.closeness), ("period", windows.period), ("trend", windows.trend)):
        idx = torch.from_numpy(group[rows])  # (B, l)
        batch[key] = frames[key] if frames is not None else scaled[idx]  # (B, l, 2, H, W)
        batch[f"ext_{key}"] = ext_frame[idx]  # (B, l, D)
    target = torch.from_numpy(np.asarray(target_rows, dtype=np.int64))
    batch["ext_target"] = ext_target[target]  # (B, D), or (B, K, D)
    batch["index"] = target if target.ndim == 1 else target[:, 0]
    return batch


@torch.no_grad()
def rollout(model: nn.Module, scaled: Tensor, ext_frame: Tensor, ext_target: Tensor, windows: WindowIndex,
            origins: np.ndarray, horizon: int = 1, batch_size: int = 256) -> Tensor:
    """Scaled predictions (S, horizon, 2, H, W) for the origin samples ``origins`` (indices into ``windows``).

    ``windows`` must hold a sample for every target ``t + h`` (h < horizon) of every origin, with consecutive rows
    (:func:`origin_samples` picks such origins). Frames at rows ``>= t`` are replaced by the predictions of the
    earlier steps (recursive rollout). ``scaled`` (N, 2, H, W), ``ext_frame``/``ext_target`` (N, D) float32.
    """
    if model_horizon(model) != 1:
        raise ValueError(f"rollout needs a one-step model; {type(model).__name__} has a direct head of "
                         f"{model_horizon(model)} steps (use direct())")
    model.eval()
    origins = np.asarray(origins, dtype=np.int64)
    position = {int(r): i for i, r in enumerate(windows.target)}
    out = torch.empty(len(origins), horizon, *scaled.shape[1:], dtype=scaled.dtype)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        first = windows.target[chunk]  # (B,) row of each origin's first target
        for step in range(horizon):
            target_rows = first + step
            rows = np.array([position[int(r)] for r in target_rows], dtype=np.int64)
            frames: dict[str, Tensor] = {}
            for key, group in (("closeness", windows.closeness), ("period", windows.period),
                               ("trend", windows.trend)):
                frame_rows = group[rows]  # (B, l)
                x = scaled[torch.from_numpy(frame_rows)].clone()  # (B, l, 2, H, W)
                ahead = frame_rows - first[:, None]  # >= 0: a slot this rollout has predicted, not observed
                use = ahead >= 0
                if use.any():
                    b, j = np.nonzero(use)
                    x[torch.from_numpy(b), torch.from_numpy(j)] = out[start + b, ahead[b, j]]
                frames[key] = x
            batch = _batch(scaled, ext_frame, ext_target, windows, rows, target_rows, frames)
            out[start:start + len(chunk), step] = model(batch).to(out.dtype)
    return out


def test_samples(data: Any, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(test sample indices into ``data.windows``, training-slot mask) of a :class:`CrowdFlowData` under
    ``protocol`` (deepst: the data's own split; stssl: :func:`stssl_split` over all samples)."""
    n = len(data.windows)
    if check_protocol(protocol) == "stssl":
        train, val, test = stssl_split(n)
        first_held_out = data.windows.target[val.start]
        return np.arange(test.start, test.stop), np.asarray(data.timestamps < data.timestamps[first_held_out])
    start = data.n_train + data.n_val
    return np.arange(start, start + data.n_test), np.asarray(data.train_slot_mask)


@torch.no_grad()
def direct(model: nn.Module, scaled: Tensor, ext_frame: Tensor, ext_target: Tensor, windows: WindowIndex,
           origins: np.ndarray, horizon: int | None = None, batch_size: int = 256) -> Tensor:
    """Scaled predictions (S, horizon, 2, H, W) of a direct head (``model.horizon`` K >= ``horizon``, default K) for
    the origin samples ``origins``: one forward per origin on its observed window, with ``ext_target`` (B, K, D) =
    the target vectors of rows ``t .. t+K-1`` (consecutive slots: :func:`origin_samples` with K); first
    ``horizon`` steps. Arrays as in :func:`rollout`."""
    steps = model_horizon(model)
    horizon = steps if horizon is None else horizon
    if not 1 <= horizon <= steps:
        raise ValueError(f"the direct head of {type(model).__name__} predicts {steps} steps, asked for {horizon}")
    model.eval()
    origins = np.asarray(origins, dtype=np.int64)
    out = torch.empty(len(origins), horizon, *scaled.shape[1:], dtype=scaled.dtype)
    offsets = np.arange(steps, dtype=np.int64)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start:start + batch_size]
        target_rows = windows.target[chunk][:, None] + offsets[None, :]  # (B, K) rows t .. t+K-1
        pred = model(_batch(scaled, ext_frame, ext_target, windows, chunk, target_rows))  # (B, K, 2, H, W)
        out[start:start + len(chunk)] = pred[:, :horizon].to(out.dtype)
    return out


def predict_samples(model: nn.Module, datamodule: Any, samples: np.ndarray, horizon: int = 1,
                    batch_size: int = 256) -> Tensor:
    """Scaled predictions (S, horizon, 2, H, W) of a set-up ``CrowdFlowDataModule``'s samples: the direct head's
    steps when the model has one (``samples`` must then have ``model.horizon`` consecutive targets), else the
    recursive rollout."""
    ds = datamodule.test_dataset  # any split holds the full scaled arrays
    forecast = direct if model_horizon(model) > 1 else rollout
    return forecast(model, ds.scaled, ds.ext_frame, ds.ext_target, datamodule.data.windows, samples, horizon,
                    batch_size)


def score(model: nn.Module, datamodule: Any, protocol: str = "deepst", horizon: int = 1,
          batch_size: int = 256) -> dict[str, Any]:
    """Protocol metrics of ``model`` on ``datamodule``'s test samples: ``steps`` (one dict per step), ``mean``
    (each metric averaged over the steps), ``origins`` (samples scored at every step), ``protocol`` and ``mode``
    ("direct": a direct head's first ``horizon`` steps; "recursive": the rollout of a one-step model).

    Origins: test targets ``t`` whose ``t .. t+H-1`` all lie in the test period (H = ``horizon``), the same for both
    modes; a direct head of K > ``horizon`` steps is scored on those origins whose K targets exist too."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    steps_out = model_horizon(model)
    if horizon > steps_out > 1:
        raise ValueError(f"the direct head predicts {steps_out} steps; cannot score horizon {horizon}")
    data = datamodule.data
    candidates, _ = test_samples(data, protocol)
    last_row = int(data.windows.target[candidates[-1]])
    need = max(horizon, steps_out)  # a direct head reads the target vectors of all its K steps
    origins = origin_samples(data.windows, data.timestamps, data.slots_per_day, candidates, need, last_row)
    if not len(origins):
        raise ValueError(f"no test sample has {horizon} consecutive targets inside the test period")
    pred = predict_samples(model, datamodule, origins, horizon, batch_size)  # (S, H, 2, h, w) scaled
    scaler = datamodule.scaler
    flows = np.asarray(data.flows)
    active = (flows != 0).any(axis=(0, 1)) if data.metric_factor != 1.0 else None
    first = data.windows.target[origins]
    steps = []
    for h in range(horizon):
        p = np.asarray(scaler.inverse_transform(pred[:, h].double().numpy()))
        steps.append(protocol_metrics(protocol, p, flows[first + h], data.metric_factor, active))
    mean = {k: float(np.mean([s[k] for s in steps])) for k in steps[0]}
    return {"protocol": protocol, "horizon": horizon, "mode": "direct" if steps_out > 1 else "recursive",
            "origins": int(len(origins)), "steps": steps, "mean": mean, "test_first": str(data.timestamps[first[0]]),
            "test_last": str(data.timestamps[first[-1] + horizon - 1])}


# ---------------------------------------------------------------------------------------------- Forecaster
@dataclass
class Forecast:
    """Forecasts in original units: ``values`` (N, 2, H, W) for the slots starting at ``timestamps`` (N,); from a
    direct head of K steps ``values`` (N, K, 2, H, W): forecast n covers the K slots from ``timestamps[n]``."""

    timestamps: pd.DatetimeIndex
    values: np.ndarray
    slots_per_day: int

    @property
    def steps(self) -> int:
        """Slots per forecast: 1, or K for a direct head."""
        return 1 if self.values.ndim == 4 else int(self.values.shape[1])

    def target_timestamps(self) -> pd.DatetimeIndex:
        """(N * steps,) slot start of every value, forecast-major (step 1 .. K of forecast 0, then forecast 1 ...)."""
        slot = pd.Timedelta(minutes=24 * 60 // self.slots_per_day)
        stamps = self.timestamps.asi8[:, None] + np.arange(self.steps)[None, :] * slot.value  # (N, K) ns
        return pd.DatetimeIndex(stamps.ravel()).as_unit("ns")


class Forecaster:
    """A trained model with everything needed to forecast from a history of frames (see the module docstring).

    ``model``: the network (scaled in, scaled out); ``scaler``: the training min-max scaler; ``spec``: the
    :class:`~stflow.data.DatasetSpec` (slots per day, holiday / meteorology files); ``options``: the
    :class:`~stflow.data.CrowdFlowOptions` of training (window, features, compat switches); ``data_dir``: where the
    holiday / meteorology files are (None: no such files).
    """

    def __init__(self, model: nn.Module, scaler: Any, spec: Any, options: Any, data_dir: str | Path | None) -> None:
        from stflow.data.datasets import resolve_file
        from stflow.data.hdf5 import read_holidays, read_meteorology

        self.model = model.eval()
        self.scaler, self.spec, self.options = scaler, spec, options
        self.data_dir = None if data_dir is None else Path(data_dir)
        self.holidays = self.meteorology = None
        if options.features != "none" and self.data_dir is not None:
            if spec.holiday_file:
                self.holidays = read_holidays(resolve_file(self.data_dir, spec.holiday_file))
            if spec.meteorology_file:
                met_slots = spec.meteorology_slots_per_day or spec.slots_per_day
                self.meteorology = read_meteorology(resolve_file(self.data_dir, spec.meteorology_file), met_slots)
        elif options.features != "none" and (spec.holiday_file or spec.meteorology_file):
            raise ValueError(f"dataset {spec.name!r} needs its holiday/meteorology files: pass data_dir")

    @classmethod
    def from_checkpoint(cls, path: str | Path, model: str | None = None, data_dir: str | Path | None = None,
                        dataset: str | None = None) -> Forecaster:
        """From a ``stflow.train`` checkpoint (or the authors' state dict with ``model="acfm_reference_*"``);
        ``data_dir``/``dataset`` replace the stored ones (the holiday and meteorology files are read from there)."""
        from stflow.data.datasets import get_dataset_spec
        from stflow.data.options import CrowdFlowOptions
        from stflow.data.scaling import MinMaxScaler
        from stflow.evaluate import default_data_dir, load_checkpoint
        from stflow.system import ForecastingSystem

        loaded, data = load_checkpoint(path, model)
        net = loaded.eval_model if isinstance(loaded, ForecastingSystem) else loaded
        dataset = dataset or data["dataset"]
        data_dir = data_dir or data.get("data_dir") or default_data_dir(dataset)
        options = CrowdFlowOptions().replace(**dict(data.get("options") or {}))
        if data_dir is None and dataset == "synthetic":
            from stflow.data import ensure_synthetic_city

            data_dir = ensure_synthetic_city(options.synthetic_seed)
        if options.scale_min is None or options.scale_max is None:
            raise ValueError(f"{path}: the checkpoint does not record its scaler (scale_min/scale_max)")
        return cls(net, MinMaxScaler(options.scale_min, options.scale_max), get_dataset_spec(dataset), options,
                   data_dir)

    def _offsets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        o = self.options
        return frame_offsets(self.spec.slots_per_day, o.len_closeness, o.len_period, o.len_trend,
                             o.period_interval, o.trend_interval)

    def _external(self, stamps: pd.DatetimeIndex, previous: bool) -> np.ndarray:
        from stflow.data.features import external_features

        return external_features(stamps, self.options.features, self.spec.slots_per_day, holidays=self.holidays,
                                 meteorology=self.meteorology, previous_slot=previous,
                                 compat_weekend_bug=self.options.compat_weekend_bug,
                                 compat_meteorology_bug=self.options.compat_meteorology_bug)

    def targets(self, start: Any, end: Any | None = None) -> pd.DatetimeIndex:
        """Every slot start from ``start`` to ``end`` (inclusive; one slot when ``end`` is None)."""
        freq = pd.Timedelta(minutes=24 * 60 // self.spec.slots_per_day)
        start = pd.Timestamp(start)
        return pd.date_range(start, pd.Timestamp(end) if end is not None else start, freq=freq).as_unit("ns")

    def predict(self, flows: np.ndarray, timestamps: Sequence[Any] | pd.DatetimeIndex, start: Any | None = None,
                end: Any | None = None, batch_size: int = 256) -> Forecast:
        """One-step forecasts for every slot from ``start`` to ``end`` (default: the slot after the history); for a
        direct head of K steps, one K-step forecast from each of those slots (values (S, K, 2, H, W)).

        ``flows`` (N, 2, H, W) observed counts in original units, ``timestamps`` (N,) their slot starts. Each
        target needs the observed frames of its window (closeness / period / trend); when some are absent a
        ``ValueError`` lists the missing slots. A direct head reads only the window of its first slot.
        """
        flows = np.asarray(flows, dtype=np.float64)
        stamps = pd.DatetimeIndex(pd.to_datetime(timestamps)).as_unit("ns")
        if flows.ndim != 4 or flows.shape[1] != 2 or len(flows) != len(stamps):
            raise ValueError(f"flows must be (N, 2, H, W) with one timestamp per frame, got {flows.shape} and "
                             f"{len(stamps)} timestamps")
        slot = pd.Timedelta(minutes=24 * 60 // self.spec.slots_per_day)
        if start is None:
            start = stamps.max() + slot
        targets = self.targets(start, end)
        if stamps.has_duplicates:
            raise ValueError(f"timestamps repeat a slot: {stamps[stamps.duplicated()][0]}")
        lookup = pd.Index(stamps.asi8)
        groups = self._offsets()
        rows: list[np.ndarray] = []
        missing: list[pd.Timestamp] = []
        for offsets in groups:
            need = targets.asi8[:, None] - offsets[None, :] * slot.value  # (S, l) ns
            idx = lookup.get_indexer(need.ravel()).astype(np.int64).reshape(need.shape)  # -1: not in the history
            missing += [pd.Timestamp(v) for v in need[idx < 0]]
            rows.append(idx)
        if missing:
            gaps = sorted(set(missing))
            shown = ", ".join(str(t) for t in gaps[:10]) + (f" ... ({len(gaps)} in all)" if len(gaps) > 10 else "")
            raise ValueError(f"missing history: the forecasts for {targets[0]} .. {targets[-1]} need {len(gaps)} "
                             f"slot(s) absent from the given frames: {shown}")
        if isinstance(self.model, HistoricalAverage):
            t = self.spec.slots_per_day
            key = torch.from_numpy(np.asarray(targets.day_of_week) * t + slot_of_day(targets, t))
            pred = self.model.means[key].double().numpy()
            return Forecast(targets, np.asarray(self.scaler.inverse_transform(pred)), self.spec.slots_per_day)
        scaled = torch.from_numpy(np.asarray(self.scaler.transform(flows), dtype=np.float32))
        # History rows [0, N) then one row per target slot (its frame is never read; its external vector is): a
        # direct head of K steps has K target slots per forecast, rows N + s*K + k.
        steps = model_horizon(self.model)
        step_slots = Forecast(targets, np.zeros((len(targets), steps, 1, 1, 1)), self.spec.slots_per_day)
        slots = step_slots.target_timestamps() if steps > 1 else targets  # (S*K,) forecast-major
        target_ext = self._external(slots, previous=True)  # (S*K, D): each target's vector, previous-slot weather
        used = np.unique(np.concatenate([r.ravel() for r in rows]))  # history rows some window reads
        frame_ext = np.zeros((len(stamps) + len(slots), target_ext.shape[1]))
        frame_ext[used] = self._external(stamps[used], previous=False)
        ext_frame = torch.from_numpy(frame_ext.astype(np.float32))
        ext_target = torch.from_numpy(np.concatenate([np.zeros((len(stamps), target_ext.shape[1])),
                                                      target_ext]).astype(np.float32))
        scaled = torch.cat([scaled, torch.zeros(len(slots), *scaled.shape[1:])])
        target_rows = np.arange(len(stamps), len(stamps) + len(slots), dtype=np.int64)
        if steps > 1:
            target_rows = target_rows.reshape(len(targets), steps)  # (S*K,) -> (S, K), forecast-major
        windows = WindowIndex(target_rows if steps == 1 else target_rows[:, 0], *rows)
        out = []
        with torch.no_grad():
            for s in range(0, len(targets), batch_size):
                part = np.arange(s, min(s + batch_size, len(targets)))
                out.append(self.model(_batch(scaled, ext_frame, ext_target, windows, part, target_rows[part])))
        pred = torch.cat(out).double().numpy()
        return Forecast(targets, np.asarray(self.scaler.inverse_transform(pred)), self.spec.slots_per_day)


def write_forecast(forecast: Forecast, path: str | Path) -> Path:
    """Write forecasts by extension: ``.h5`` (DeepST layout: ``data`` + ``date``), ``.npz`` (``flows``,
    ``timestamps`` ISO strings, ``date``) or ``.csv`` (one row per slot and cell: timestamp, row, col, inflow,
    outflow).

    Multi-step forecasts (a direct head, ``values`` (N, K, 2, H, W)): ``.h5`` ``data`` (N, K, 2, H, W) with ``date``
    the FIRST slot of each forecast and attribute ``steps`` = K (not a DeepST flow file); ``.npz`` the same plus
    ``target_timestamps`` (N, K); ``.csv`` one row per forecast, step and cell with a ``step`` column (1..K) after
    ``timestamp``, which is the slot of that value."""
    from stflow.data.hdf5 import format_slot_dates, write_flow_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if forecast.steps > 1:
        return _write_multi_step(forecast, path, suffix)
    if suffix in (".h5", ".hdf5"):
        return write_flow_file(path, forecast.values, forecast.timestamps, forecast.slots_per_day)
    if suffix == ".npz":
        iso = np.array(list(forecast.timestamps.strftime("%Y-%m-%dT%H:%M")), dtype=str)
        np.savez(path, flows=forecast.values, timestamps=iso,
                 date=format_slot_dates(forecast.timestamps, forecast.slots_per_day))
        return path
    if suffix == ".csv":
        n, _, h, w = forecast.values.shape
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        frame = pd.DataFrame({
            "timestamp": np.repeat(forecast.timestamps.strftime("%Y-%m-%d %H:%M"), h * w),
            "row": np.tile(rows.ravel(), n), "col": np.tile(cols.ravel(), n),
            "inflow": forecast.values[:, 0].reshape(-1), "outflow": forecast.values[:, 1].reshape(-1),
        })
        frame.to_csv(path, index=False)
        return path
    raise ValueError(f"{path}: unknown output format {suffix!r}; use .h5, .npz or .csv")


def _write_multi_step(forecast: Forecast, path: Path, suffix: str) -> Path:
    """:func:`write_forecast` for K-step forecasts (values (N, K, 2, H, W)), see there."""
    from stflow.data.hdf5 import format_slot_dates

    n, k, _, h, w = forecast.values.shape
    targets = forecast.target_timestamps()  # (N*K,)
    if suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("data", data=np.asarray(forecast.values, dtype=np.float64))
            f.create_dataset("date", data=format_slot_dates(forecast.timestamps, forecast.slots_per_day))
            f.attrs["steps"] = k
        return path
    if suffix == ".npz":
        iso = np.array(list(forecast.timestamps.strftime("%Y-%m-%dT%H:%M")), dtype=str)
        np.savez(path, flows=forecast.values, timestamps=iso,
                 date=format_slot_dates(forecast.timestamps, forecast.slots_per_day),
                 target_timestamps=np.array(list(targets.strftime("%Y-%m-%dT%H:%M")), dtype=str).reshape(n, k))
        return path
    if suffix == ".csv":
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        frame = pd.DataFrame({
            "timestamp": np.repeat(targets.strftime("%Y-%m-%d %H:%M"), h * w),
            "step": np.tile(np.repeat(np.arange(1, k + 1), h * w), n),
            "row": np.tile(rows.ravel(), n * k), "col": np.tile(cols.ravel(), n * k),
            "inflow": forecast.values[:, :, 0].reshape(-1), "outflow": forecast.values[:, :, 1].reshape(-1),
        })
        frame.to_csv(path, index=False)
        return path
    raise ValueError(f"{path}: unknown output format {suffix!r}; use .h5, .npz or .csv")


def summary(values: Mapping[str, float], keys: Sequence[str]) -> str:
    """``key value`` pairs on one line (for the CLIs' tables)."""
    return "  ".join(f"{k} {values[k]:.4f}" for k in keys if k in values)
