"""Closeness/period/trend windows (gaps, order, per-file) and the min-max scaler."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from stflow.data import DatasetSpec, MinMaxScaler, build_windows, load_crowd_flow, write_flow_file


def _hourly(start: str, hours: int) -> pd.DatetimeIndex:
    return pd.date_range(start, periods=hours, freq="60min")


def test_sample_dropped_exactly_when_a_needed_frame_is_missing() -> None:
    full = _hourly("2014-01-01", 5 * 24)
    gap = pd.Timestamp("2014-01-03 10:00")
    ts = full[full != gap]
    w = build_windows(ts, np.zeros(len(ts), int), 24, len_closeness=3, len_period=2, len_trend=0)
    # Expected by brute force: a target needs t-1h..t-3h and t-24h, t-48h, all present.
    present = set(ts)
    expected = [
        t for t in ts
        if all(t - pd.Timedelta(hours=k) in present for k in (1, 2, 3, 24, 48))
    ]
    assert list(ts[w.target]) == expected
    dropped = set(ts[48:]) - set(expected)  # targets with a full 2-day history but a missing frame
    assert dropped == {gap + pd.Timedelta(hours=k) for k in (1, 2, 3, 24, 48)}


def test_frames_are_most_recent_first() -> None:
    ts = _hourly("2014-01-01", 20 * 24)
    w = build_windows(ts, np.zeros(len(ts), int), 24, 4, 2, 2, period_interval=1, trend_interval=7)
    assert len(w) == len(ts) - 14 * 24
    t = ts[w.target]
    for k in range(4):
        assert (ts[w.closeness[:, k]] == t - pd.Timedelta(hours=k + 1)).all()
    for k in range(2):
        assert (ts[w.period[:, k]] == t - pd.Timedelta(days=k + 1)).all()
        assert (ts[w.trend[:, k]] == t - pd.Timedelta(days=7 * (k + 1))).all()


def test_windows_stay_inside_their_file(tmp_path) -> None:
    # Two consecutive files: the second file's first targets cannot reach back into the first.
    write_flow_file(tmp_path / "a.h5", np.zeros((72, 2, 2, 2)), _hourly("2014-01-01", 72), 24)
    values = np.arange(72 * 8, dtype=np.float64).reshape(72, 2, 2, 2)  # (72, 2, 2, 2)
    write_flow_file(tmp_path / "b.h5", values, _hourly("2014-01-04", 72), 24)
    spec = DatasetSpec(name="pair", slots_per_day=24, flow_files=("a.h5", "b.h5"), test_days=1)
    data = load_crowd_flow(spec, tmp_path, len_closeness=2, len_period=1, val_fraction=0.0)
    assert len(data.windows) == 2 * (72 - 24)
    second = data.windows.target[48:]
    assert data.timestamps[second[0]] == pd.Timestamp("2014-01-05 00:00")
    assert (np.diff(data.timestamps[data.windows.target].asi8) > 0).all()  # time order
    # Closeness values, most recent first, read back in original units.
    np.testing.assert_array_equal(data.flows[data.windows.closeness[48, 0]], values[23])
    np.testing.assert_array_equal(data.flows[data.windows.closeness[48, 1]], values[22])


def test_scaler_round_trip_numpy_and_torch() -> None:
    scaler = MinMaxScaler(3.0, 267.0)
    x = np.random.default_rng(0).uniform(0, 300, size=(5, 2, 4, 3))
    np.testing.assert_allclose(scaler.inverse_transform(scaler.transform(x)), x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scaler.transform(np.array([3.0, 267.0])), [-1.0, 1.0])
    xt = torch.from_numpy(x)
    torch.testing.assert_close(scaler.inverse_transform(scaler.transform(xt)), xt)
    assert scaler.scale == pytest.approx(132.0)
    fitted = MinMaxScaler.fit(x)
    assert (fitted.min, fitted.max) == (x.min(), x.max())
    with pytest.raises(ValueError, match="finite min < max"):
        MinMaxScaler(5.0, 5.0)
