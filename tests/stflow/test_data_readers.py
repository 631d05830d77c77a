"""HDF5 / holiday readers, incomplete-day removal and every bad-input error of the data layer."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from stflow.data import (
    DataFormatError,
    DatasetSpec,
    format_slot_dates,
    get_dataset_spec,
    load_crowd_flow,
    read_flow_file,
    read_holidays,
    read_meteorology,
    remove_incomplete_days,
    write_flow_file,
)


def _hourly(start: str, hours: int) -> pd.DatetimeIndex:
    return pd.date_range(start, periods=hours, freq="60min")


def _counts(n: int, grid: tuple[int, int] = (3, 2), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).poisson(5.0, size=(n, 2, *grid)).astype(np.float64)


def _raw_file(path: Path, data: np.ndarray, dates: list[bytes] | np.ndarray) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("date", data=np.asarray(dates, dtype="S10"))
    return path


def test_dates_parse_to_slot_start_times(tmp_path: Path) -> None:
    ts = pd.DatetimeIndex(["2014-09-21 00:00", "2014-09-21 00:30", "2014-09-21 23:30"])
    dates = format_slot_dates(ts, 48)
    assert dates.tolist() == [b"2014092101", b"2014092102", b"2014092148"]
    path = _raw_file(tmp_path / "f.h5", _counts(3), dates)
    flow = read_flow_file(path, 48, grid=(3, 2))
    assert flow.data.dtype == np.float64 and flow.data.shape == (3, 2, 3, 2)
    assert list(flow.timestamps) == list(ts)


def test_remove_incomplete_days_on_crafted_file(tmp_path: Path) -> None:
    ts = _hourly("2014-01-01", 72).delete(24 + 13)  # 2014-01-02 loses its 13:00 slot
    path = write_flow_file(tmp_path / "f.h5", _counts(len(ts)), ts, 24)
    flow = read_flow_file(path, 24)
    result = remove_incomplete_days(flow.timestamps, 24)
    assert result.removed_days == ["20140102"]
    kept = flow.timestamps[result.keep]
    assert len(kept) == 48 and set(kept.normalize().strftime("%Y%m%d")) == {"20140101", "20140103"}


def test_edge_days_are_kept_only_on_request() -> None:
    ts = _hourly("2014-08-04 23:00", 1 + 48 + 5)  # starts at 23:00, ends at 04:00 two days later
    strict = remove_incomplete_days(ts, 24)
    assert strict.removed_days == ["20140804", "20140807"] and strict.keep.sum() == 48
    edge = remove_incomplete_days(ts, 24, keep_edge_days=True)
    assert edge.removed_days == [] and edge.keep.all()
    # An edge day with an interior gap is still removed.
    gap = remove_incomplete_days(ts.delete(len(ts) - 3), 24, keep_edge_days=True)
    assert gap.removed_days == ["20140807"]


def test_bj_holiday_file_with_crlf(shared: Path) -> None:
    path = shared / "data" / "taxibj" / "BJ_Holiday.txt"
    raw = path.read_bytes()
    assert raw.count(b"\r\n") == 105 and not raw.endswith(b"\n")
    days = read_holidays(path)
    # 105 CRLF-terminated lines plus a last line without a line ending (20160611): 106 distinct dates,
    # as the reference's readlines() + strip() also finds.
    assert len(days) == 106
    assert days[0] == pd.Timestamp("2013-01-01") and days[-1] == pd.Timestamp("2016-06-11")
    assert pd.Timestamp("2015-10-01") in days and days.is_monotonic_increasing


def test_real_taxinyc_meteorology_and_holidays(shared: Path) -> None:
    met = read_meteorology(shared / "data" / "taxinyc" / "Meteorology.h5", 48)
    assert met.weather.shape == (17520, 17) and met.wind_speed.shape == met.temperature.shape == (17520,)
    np.testing.assert_array_equal(met.weather.sum(axis=1), 1.0)  # one-hot
    assert met.timestamps[0] == pd.Timestamp("2014-01-01 00:00")
    assert met.timestamps[-1] == pd.Timestamp("2014-12-31 23:30")
    assert 0 <= met.temperature.min() < met.temperature.max() <= 110  # Fahrenheit
    assert 0 <= met.wind_speed.min() < met.wind_speed.max() < 60
    holidays = read_holidays(shared / "data" / "taxinyc" / "Holiday.txt")
    assert len(holidays) == 11 and pd.Timestamp("2014-07-04") in holidays


# --- bad input -> DataFormatError naming the file and the problem ---------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"nope\.h5: file not found"):
        read_flow_file(tmp_path / "nope.h5", 24)
    with pytest.raises(DataFormatError, match=r"holidays\.txt: file not found"):
        read_holidays(tmp_path / "holidays.txt")
    with pytest.raises(DataFormatError, match=r"NYC14_M16x8_T60_NewEnd\*\.h5: file not found"):
        load_crowd_flow("bikenyc", tmp_path)


def test_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data", data=_counts(2))
    with pytest.raises(DataFormatError, match=r"f\.h5: missing key 'date'"):
        read_flow_file(path, 24)
    met = tmp_path / "met.h5"
    with h5py.File(met, "w") as f:
        f.create_dataset("date", data=format_slot_dates(_hourly("2014-01-01", 2), 24))
        f.create_dataset("Temperature", data=np.zeros(2))
    with pytest.raises(DataFormatError, match=r"met\.h5: missing key 'WindSpeed'"):
        read_meteorology(met, 24)


def test_not_hdf5(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    path.write_text("hello")
    with pytest.raises(DataFormatError, match=r"f\.h5: not a readable HDF5 file"):
        read_flow_file(path, 24)


def test_wrong_shape_or_ndim(tmp_path: Path) -> None:
    dates = format_slot_dates(_hourly("2014-01-01", 4), 24)
    path = _raw_file(tmp_path / "f.h5", np.zeros((4, 2, 3)), dates)
    with pytest.raises(DataFormatError, match=r"f\.h5: 'data' must have shape \(N, 2, H, W\), got \(4, 2, 3\)"):
        read_flow_file(path, 24)
    path = _raw_file(tmp_path / "g.h5", np.zeros((4, 3, 3, 2)), dates)
    with pytest.raises(DataFormatError, match=r"g\.h5: 'data' must have shape \(N, 2, H, W\)"):
        read_flow_file(path, 24)
    path = _raw_file(tmp_path / "h.h5", np.zeros((5, 2, 3, 2)), dates)
    with pytest.raises(DataFormatError, match=r"h\.h5: 'date' has shape \(4,\) but 'data' has 5 slots"):
        read_flow_file(path, 24)
    path = _raw_file(tmp_path / "i.h5", np.zeros((4, 2, 3, 2)), dates)
    with pytest.raises(DataFormatError, match=r"i\.h5: grid \(3, 2\) does not match the expected \(16, 8\)"):
        read_flow_file(path, 24, grid=(16, 8))
    met = tmp_path / "met.h5"
    with h5py.File(met, "w") as f:
        f.create_dataset("date", data=dates)
        f.create_dataset("Temperature", data=np.zeros(4))
        f.create_dataset("WindSpeed", data=np.zeros(3))
        f.create_dataset("Weather", data=np.zeros((4, 17)))
    with pytest.raises(DataFormatError, match=r"met\.h5: 'WindSpeed' must have shape \(4,\), got \(3,\)"):
        read_meteorology(met, 24)


def test_non_monotonic_dates(tmp_path: Path) -> None:
    dates = [b"2014010101", b"2014010103", b"2014010102"]
    path = _raw_file(tmp_path / "f.h5", _counts(3), dates)
    with pytest.raises(DataFormatError, match=r"f\.h5: dates are not strictly increasing"):
        read_flow_file(path, 24)
    path = _raw_file(tmp_path / "dup.h5", _counts(2), [b"2014010101", b"2014010101"])
    with pytest.raises(DataFormatError, match=r"dup\.h5: dates are not strictly increasing"):
        read_flow_file(path, 24)


@pytest.mark.parametrize(
    "bad, message",
    [
        (b"2014010125", r"bad slot number 25 in '2014010125' at row 1 \(slots are 01\.\.24\)"),
        (b"2014010100", r"bad slot number 00"),
        (b"2014023102", r"bad calendar date '20140231'"),
        (b"2014-01-01", r"malformed date '2014-01-01' at row 1 \(expected YYYYMMDDSS\)"),
    ],
)
def test_malformed_dates(tmp_path: Path, bad: bytes, message: str) -> None:
    path = _raw_file(tmp_path / "f.h5", _counts(2), [b"2014010101", bad])
    with pytest.raises(DataFormatError, match=r"f\.h5: " + message):
        read_flow_file(path, 24)


def test_malformed_holiday_line(tmp_path: Path) -> None:
    path = tmp_path / "Holiday.txt"
    path.write_bytes(b"20140101\r\n2014013\r\n")
    with pytest.raises(DataFormatError, match=r"Holiday\.txt: line 2 '2014013' is not a YYYYMMDD date"):
        read_holidays(path)


def test_nan_and_negative_counts(tmp_path: Path) -> None:
    dates = format_slot_dates(_hourly("2014-01-01", 3), 24)
    data = _counts(3)
    data[1, 0, 0, 0] = np.nan
    with pytest.raises(DataFormatError, match=r"nan\.h5: 'data' contains NaN or infinite values"):
        read_flow_file(_raw_file(tmp_path / "nan.h5", data, dates), 24)
    data[1, 0, 0, 0] = -2.0
    with pytest.raises(DataFormatError, match=r"neg\.h5: 'data' contains negative counts \(min -2\.0\)"):
        read_flow_file(_raw_file(tmp_path / "neg.h5", data, dates), 24)


def test_grid_mismatch_between_files(tmp_path: Path) -> None:
    write_flow_file(tmp_path / "a.h5", _counts(72, (3, 2)), _hourly("2014-01-01", 72), 24)
    write_flow_file(tmp_path / "b.h5", _counts(72, (4, 2)), _hourly("2014-01-04", 72), 24)
    spec = DatasetSpec(name="two", slots_per_day=24, flow_files=("a.h5", "b.h5"), test_days=1)
    with pytest.raises(DataFormatError, match=r"b\.h5: grid \(4, 2\) does not match the expected \(3, 2\)"):
        load_crowd_flow(spec, tmp_path, len_closeness=2, len_period=0)


def test_overlapping_files(tmp_path: Path) -> None:
    write_flow_file(tmp_path / "a.h5", _counts(72), _hourly("2014-01-01", 72), 24)
    write_flow_file(tmp_path / "b.h5", _counts(48), _hourly("2014-01-03", 48), 24)
    spec = DatasetSpec(name="two", slots_per_day=24, flow_files=("a.h5", "b.h5"), test_days=1)
    with pytest.raises(DataFormatError, match=r"b\.h5: starts at 2014-01-03 00:00:00, not after"):
        load_crowd_flow(spec, tmp_path, len_closeness=2, len_period=0)


def test_window_that_leaves_no_samples(tmp_path: Path) -> None:
    write_flow_file(tmp_path / "a.h5", _counts(72), _hourly("2014-01-01", 72), 24)
    spec = DatasetSpec(name="short", slots_per_day=24, flow_files=("a.h5",), test_days=1)
    with pytest.raises(DataFormatError, match=r"len_trend=1.*leaves no samples in 72 kept slots"):
        load_crowd_flow(spec, tmp_path, len_closeness=3, len_period=1, len_trend=1)
    with pytest.raises(DataFormatError, match=r"48 samples .* leave nothing for training after the 48 test samples"):
        load_crowd_flow(spec, tmp_path, len_closeness=3, len_period=1, test_days=2)


def test_unknown_dataset_name() -> None:
    known = r"\['bikenyc', 'synthetic', 'taxibj', 'taxinyc'\]"  # registered + packaged specs
    with pytest.raises(DataFormatError, match=rf"unknown dataset 'taxiparis'; known: {known}"):
        get_dataset_spec("taxiparis")


def test_custom_spec_from_yaml(tmp_path: Path) -> None:
    write_flow_file(tmp_path / "city.h5", _counts(96), _hourly("2014-01-01", 96), 24)
    (tmp_path / "city.yaml").write_text(
        "name: city\nslots_per_day: 24\nflow_files: [city.h5]\ngrid: [3, 2]\ntest_days: 1\n"
        "metric_factor: active_cells\n"
    )
    data = load_crowd_flow(str(tmp_path / "city.yaml"), tmp_path, len_closeness=2, len_period=1, val_fraction=0.0)
    assert len(data.windows) == 96 - 24 and data.n_test == 24 and data.n_val == 0
    assert data.ext_dim == 7 + 1 + 24 + 1 and data.metric_factor == pytest.approx(1.0)  # every cell active
    (tmp_path / "bad.yaml").write_text("name: city\nslots_per_day: 24\nflow_files: [city.h5]\ncolour: red\n")
    with pytest.raises(ValueError, match=r"unknown dataset spec field\(s\) \['colour'\]"):
        load_crowd_flow(str(tmp_path / "bad.yaml"), tmp_path)


def test_shipped_custom_spec_reads_real_taxinyc_weather(shared: Path, tmp_path: Path) -> None:
    spec = get_dataset_spec("taxinyc")  # the packaged spec, found by name through importlib.resources
    assert (spec.slots_per_day, spec.grid, spec.test_days) == (48, (15, 5), 28)
    # A short flow file next to the real TaxiNYC weather and holidays: 77-dim ACFM vectors.
    ts = pd.date_range("2014-07-01", periods=30 * 48, freq="30min")
    write_flow_file(tmp_path / "NYC2014.h5", _counts(len(ts), (15, 5)), ts, 48)
    for name in ("Meteorology.h5", "Holiday.txt"):
        (tmp_path / name).symlink_to(shared / "data" / "taxinyc" / name)
    data = load_crowd_flow(spec, tmp_path, test_days=5, compat_meteorology_bug=True)
    assert data.ext_dim == 77 and data.n_test == 5 * 48
    july4 = np.flatnonzero(data.timestamps.normalize() == pd.Timestamp("2014-07-04"))
    target_rows = np.intersect1d(july4, data.windows.target)
    np.testing.assert_array_equal(data.ext_target[target_rows, 57], 1)  # holiday bit
