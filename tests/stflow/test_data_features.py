"""External feature vectors written out by hand, the two reference-bug switches, meteorology lookup."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stflow.data import (
    DataFormatError,
    acfm_time_features,
    external_dim,
    external_features,
    read_flow_file,
    read_holidays,
    read_meteorology,
    write_meteorology,
)


def _acfm_by_hand(weekday: int, weekday_flag: int, hour: int, day_flag: int) -> list[float]:
    vec = [0.0] * 33
    vec[weekday] = 1.0
    vec[7] = float(weekday_flag)
    vec[8 + hour] = 1.0
    vec[32] = float(day_flag)
    return vec


def test_bikenyc_33_vectors_by_hand() -> None:
    ts = pd.DatetimeIndex(["2014-09-21 00:00", "2014-09-22 08:00", "2014-09-27 17:00", "2014-09-27 18:00"])
    expected = [
        # Sunday midnight: one-hot Sunday, weekend, slot 0, night.
        [0, 0, 0, 0, 0, 0, 1, 0] + [1] + [0] * 23 + [0],
        # Monday 08:00: working day, slot 8, day.
        [1, 0, 0, 0, 0, 0, 0, 1] + [0] * 8 + [1] + [0] * 15 + [1],
        # Saturday 17:00 is still day, 18:00 is night.
        _acfm_by_hand(5, 0, 17, 1),
        _acfm_by_hand(5, 0, 18, 0),
    ]
    got = external_features(ts, "acfm", 24)
    assert got.shape == (4, 33)
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float64))
    assert external_dim("acfm", 24, False, None) == 33


def test_weekend_bug_flips_exactly_monday_and_saturday() -> None:
    ts = pd.date_range("2014-09-22", periods=7 * 24, freq="60min")  # Monday .. Sunday
    fixed = acfm_time_features(ts, 24)
    compat = acfm_time_features(ts, 24, compat_weekend_bug=True)
    differ = np.argwhere(fixed != compat)
    assert set(differ[:, 1]) == {7}  # only the weekday flag
    flipped_days = set(ts[np.unique(differ[:, 0])].day_name())
    assert flipped_days == {"Monday", "Saturday"}
    monday, saturday = ts[0], ts[5 * 24]
    assert fixed[0, 7] == 1 and compat[0, 7] == 0
    assert fixed[5 * 24, 7] == 0 and compat[5 * 24, 7] == 1
    assert monday.day_name() == "Monday" and saturday.day_name() == "Saturday"
    # The bugged flag is the reference's: 0 exactly on Monday and Sunday.
    np.testing.assert_array_equal(compat[:, 7], ~np.isin(ts.day_of_week, [0, 6]))


def test_compat_vectors_on_every_real_bikenyc_slot(bikenyc_dir: Path) -> None:
    flow = read_flow_file(next(bikenyc_dir.glob("NYC14_M16x8_T60_NewEnd*.h5")), 24, (16, 8))
    got = external_features(flow.timestamps, "acfm", 24, compat_weekend_bug=True)
    # Independent derivation from the raw YYYYMMDDSS strings with the standard library.
    import h5py

    with h5py.File(flow.path, "r") as f:
        raw = [d.decode() for d in f["date"][()]]
    expected = []
    for s in raw:
        weekday = dt.date(int(s[:4]), int(s[4:6]), int(s[6:8])).weekday()
        hour = int(s[8:]) - 1
        expected.append(_acfm_by_hand(weekday, 0 if weekday in (0, 6) else 1, hour, 1 if 6 <= hour < 18 else 0))
    np.testing.assert_array_equal(got, np.array(expected))


def test_stresnet_vectors() -> None:
    ts = pd.DatetimeIndex(["2014-09-20 10:00", "2014-09-22 10:00"])  # Saturday, Monday
    got = external_features(ts, "stresnet", 24)
    np.testing.assert_array_equal(got, [[0, 0, 0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0, 1]])
    assert external_dim("stresnet", 48, True, 17) == 28
    assert external_dim("acfm", 48, True, 17) == 77
    assert external_features(ts, "none", 24).shape == (2, 0)


@pytest.fixture()
def tiny_meteorology(tmp_path: Path):
    """Two days of half-hourly weather; row r has weather class r % 17, wind r, temperature -r."""
    ts = pd.date_range("2015-06-01", periods=96, freq="30min")
    rows = np.arange(96)
    path = write_meteorology(tmp_path / "Meteorology.h5", ts, np.eye(17)[rows % 17], rows, -rows.astype(float), 48)
    return read_meteorology(path, 48)


def _row_vector(row: int) -> np.ndarray:
    return np.concatenate([np.eye(17)[row % 17], [row / 95.0, (95 - row) / 95.0]])


def test_meteorology_previous_slot_and_hh30_bug(tiny_meteorology) -> None:
    met = tiny_meteorology
    ts = pd.DatetimeIndex(["2015-06-02 10:00", "2015-06-02 10:30"])
    row_0930, row_1000, row_0030 = 48 + 19, 48 + 20, 48 + 1
    prev = external_features(ts, "acfm", 48, meteorology=met, previous_slot=True)
    assert prev.shape == (2, 7 + 1 + 48 + 1 + 19)
    np.testing.assert_allclose(prev[0, -19:], _row_vector(row_0930))
    np.testing.assert_allclose(prev[1, -19:], _row_vector(row_1000))
    # With the reference bug, the HH:30 lookup (10:00 -> 09:30) reads slot 02 (00:30) of that day.
    bug = external_features(ts, "acfm", 48, meteorology=met, previous_slot=True, compat_meteorology_bug=True)
    np.testing.assert_allclose(bug[0, -19:], _row_vector(row_0030))
    np.testing.assert_allclose(bug[1, -19:], _row_vector(row_1000))
    np.testing.assert_array_equal(bug[:, :-19], prev[:, :-19])
    # Own-slot lookup (input frames): 10:30 is the HH:30 case there.
    own = external_features(ts, "acfm", 48, meteorology=met, previous_slot=False, compat_meteorology_bug=True)
    np.testing.assert_allclose(own[0, -19:], _row_vector(row_1000))
    np.testing.assert_allclose(own[1, -19:], _row_vector(row_0030))
    # An hourly flow (T = 24) looks one hour back.
    hourly = external_features(ts[:1], "acfm", 24, meteorology=met, previous_slot=True)
    np.testing.assert_allclose(hourly[0, -19:], _row_vector(48 + 18))


def test_meteorology_not_covering_a_slot(tiny_meteorology) -> None:
    ts = pd.DatetimeIndex(["2015-06-01 00:00"])  # its previous slot is 2015-05-31 23:30
    with pytest.raises(
        DataFormatError, match=r"Meteorology\.h5: no meteorology for 1 needed slot\(s\), first 2015-05-31 23:30"
    ):
        external_features(ts, "acfm", 48, meteorology=tiny_meteorology, previous_slot=True)


def test_77_vector_on_real_taxinyc_files(shared: Path) -> None:
    met = read_meteorology(shared / "data" / "taxinyc" / "Meteorology.h5", 48)
    holidays = read_holidays(shared / "data" / "taxinyc" / "Holiday.txt")
    ts = pd.DatetimeIndex(["2014-07-04 12:00", "2014-07-07 12:00"])  # Independence Day (Friday), a Monday
    vec = external_features(ts, "acfm", 48, holidays=holidays, meteorology=met, previous_slot=True)
    assert vec.shape == (2, 77)
    np.testing.assert_array_equal(vec[:, 57], [1, 0])  # holiday bit after 7 + 1 + 48 + 1 time dims
    np.testing.assert_array_equal(vec[:, 58:75].sum(axis=1), 1)  # weather one-hot
    row = met.timestamps.get_loc(pd.Timestamp("2014-07-04 11:30"))
    t = met.temperature
    assert vec[0, 76] == pytest.approx((t[row] - t.min()) / (t.max() - t.min()))
    w = met.wind_speed
    assert vec[0, 75] == pytest.approx((w[row] - w.min()) / (w.max() - w.min()))
    st = external_features(ts, "stresnet", 48, holidays=holidays, meteorology=met)
    assert st.shape == (2, 28)
    np.testing.assert_array_equal(st[:, 8:], vec[:, 57:])
