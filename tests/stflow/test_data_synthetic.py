"""The synthetic city: deterministic, in the DeepST layout, with daily/weekly/weather structure."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from stflow.data import RAINY_WEATHER, generate_synthetic_city, read_flow_file, read_holidays, read_meteorology


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    out = tmp_path_factory.mktemp("city0")
    start = time.perf_counter()
    files = generate_synthetic_city(out, seed=0)
    return files, time.perf_counter() - start


def test_fast_and_byte_identical_per_seed(city, tmp_path: Path) -> None:
    files, seconds = city
    assert seconds < 1.0
    again = generate_synthetic_city(tmp_path / "again", seed=0)
    for a, b in zip((files.flow, files.meteorology, files.holidays), (again.flow, again.meteorology, again.holidays)):
        assert a.read_bytes() == b.read_bytes()
    other = generate_synthetic_city(tmp_path / "other", seed=1)
    x0 = read_flow_file(files.flow, 24).data
    x1 = read_flow_file(other.flow, 24).data
    assert x0.shape == x1.shape == (60 * 24, 2, 16, 8)
    assert not np.array_equal(x0, x1)


def test_layout_and_structure(city) -> None:
    files, _ = city
    flow = read_flow_file(files.flow, 24, grid=(16, 8))
    met = read_meteorology(files.meteorology, 24)
    holidays = read_holidays(files.holidays)
    x, ts = flow.data, flow.timestamps
    assert met.weather.shape[1] == 17 and met.timestamps[0] < ts[0]  # previous slot always available
    assert np.array_equal(x, np.round(x)) and x.min() == 0  # counts

    active = (x != 0).any(axis=(0, 1))  # (H, W)
    assert 0 < (~active).sum() < 0.5 * active.size  # some always-zero cells

    busiest = np.unravel_index(np.argmax(x.sum(axis=(0, 1))), active.shape)
    series = x[:, 0, busiest[0], busiest[1]]
    assert np.corrcoef(series[24:], series[:-24])[0, 1] > 0.5  # daily rhythm

    off = (ts.day_of_week >= 5) | ts.normalize().isin(holidays)
    total = x.sum(axis=(1, 2, 3))
    assert total[~off].mean() > 1.2 * total[off].mean()  # working days busier than weekends
    assert ts.normalize().isin(holidays).sum() >= 24  # at least one holiday inside the period
    hour = ts.hour
    # Residential vs business: some cells have their inflow peak in the morning, others in the evening.
    work = ~off
    morning_in = x[work & (hour == 8), 0].mean(axis=0)
    evening_in = x[work & (hour == 18), 0].mean(axis=0)
    morning_out = x[work & (hour == 8), 1].mean(axis=0)
    evening_out = x[work & (hour == 18), 1].mean(axis=0)
    business = active & (morning_in > 1.3 * evening_in)
    residential = active & (evening_in > 1.3 * morning_in)
    assert business.any() and residential.any()
    assert (evening_out[business] > morning_out[business]).all()  # outflow peak swaps
    assert (morning_out[residential] > evening_out[residential]).all()

    # Rain lowers flows: same hour of working days, rainy vs dry slots.
    met_rows = met.timestamps.get_indexer(ts)
    rainy = met.weather[met_rows][:, list(RAINY_WEATHER)].sum(axis=1) > 0
    daytime_work = work & (hour >= 7) & (hour <= 19)
    assert rainy[daytime_work].sum() > 10
    assert total[daytime_work & rainy].mean() < 0.8 * total[daytime_work & ~rainy].mean()
