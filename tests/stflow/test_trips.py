"""Trip records -> in/out flows: known counts on a generated CSV with bad rows, the schema readers, and the result
accepted by ``stflow.data info`` and ``stflow.train``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stflow import train
from stflow.data import load_crowd_flow, read_flow_file
from stflow.data.__main__ import main as data_main
from stflow.data.trips import GridGeometry, read_grid_file, trips_to_flows, write_grid_npz

BBOX = (40.70, 40.73, -74.02, -73.98)
DAYS = 16


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Trips between known cells and slots (expected flows counted independently), plus 8 bad rows."""
    geo = GridGeometry(*BBOX, cell_size=1000.0)
    assert geo.shape == (4, 4)
    rng = np.random.default_rng(0)
    n = 3000
    h, w = geo.shape
    cells0, cells1 = rng.integers(0, h * w, n), rng.integers(0, h * w, n)
    t0 = pd.Timestamp("2024-05-01") + pd.to_timedelta(rng.integers(0, DAYS * 24 * 60 - 90, n), unit="min")
    t1 = t0 + pd.to_timedelta(rng.integers(0, 90, n), unit="min")

    def centre(cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r, c = cell // w, cell % w
        return BBOX[1] - (r + 0.25) * geo.dlat, BBOX[2] + (c + 0.25) * geo.dlon  # row 0 = north; inside the box

    lat0, lon0 = centre(cells0)
    lat1, lon1 = centre(cells1)
    expected = np.zeros((DAYS * 24, 2, h, w))
    s0 = ((t0 - pd.Timestamp("2024-05-01")) // pd.Timedelta(hours=1)).to_numpy()
    s1 = ((t1 - pd.Timestamp("2024-05-01")) // pd.Timedelta(hours=1)).to_numpy()
    for k in range(n):
        expected[s0[k], 1, cells0[k] // w, cells0[k] % w] += 1  # outflow at the start
        expected[s1[k], 0, cells1[k] // w, cells1[k] % w] += 1  # inflow at the end
    rows = pd.DataFrame({"start_time": t0.strftime("%Y-%m-%d %H:%M:%S"), "end_time": t1.strftime("%Y-%m-%d %H:%M:%S"),
                         "start_lat": lat0, "start_lon": lon0, "end_lat": lat1, "end_lon": lon1})
    inside = [f"{BBOX[0] + 0.001}", f"{BBOX[2] + 0.001}"]  # the south-west cell (row 3, col 0)
    bad = pd.DataFrame([
        ["yesterday", "2024-05-02 10:00", *inside, *inside],  # unparsable time
        ["2024-05-02 10:00", "not a time", *inside, *inside],  # unparsable time
        ["2024-05-02 10:30", "2024-05-02 10:00", *inside, *inside],  # end before start
        ["2024-05-02 10:00", "2024-05-02 10:10", "", BBOX[2], *inside],  # missing coordinate
        ["2024-05-03 07:10", "2024-05-03 07:20", "41.5", "-74.0", *inside],  # start outside: inflow counts
        ["2024-05-03 07:10", "2024-05-03 08:20", *inside, "40.0", "-74.0"],  # end outside: outflow counts
        ["2024-05-03 07:10", "2024-05-03 08:20", "41.5", "-74.0", "40.0", "-74.0"],  # both outside
        ["2024-05-03 07:10", "2024-05-03 07:20", *inside, f"{BBOX[1]}", f"{BBOX[3] - 0.001}"],  # lat_max: outside
    ], columns=rows.columns)
    expected[55, 0, 3, 0] += 1  # row 5 (end at 2024-05-03 07:20, slot 2 * 24 + 7)
    expected[55, 1, 3, 0] += 2  # rows 6 and 8 start in the south-west cell at 07:10
    root = tmp_path_factory.mktemp("trips")
    csv = root / "trips.csv"
    pd.concat([rows, bad]).sample(frac=1.0, random_state=1).to_csv(csv, index=False)
    return {"csv": csv, "expected": expected, "geo": geo, "root": root, "n": n}


def test_known_counts_and_bad_rows(generated: dict) -> None:
    flows, stamps, report = trips_to_flows(generated["csv"], generated["geo"], slot_minutes=60)
    assert report.rows == generated["n"] + 8
    assert report.bad == {"unparsable_time": 2, "bad_coordinates": 1, "end_before_start": 1, "start_outside_box": 2,
                          "end_outside_box": 3}
    assert report.used_trips == generated["n"] + 3  # rows 5, 6, 8 count one endpoint each; row 7 none
    assert stamps[0] == pd.Timestamp("2024-05-01") and len(stamps) == DAYS * 24
    np.testing.assert_array_equal(flows, generated["expected"])


def test_cli_info_and_train_accept_the_result(generated: dict, capsys: pytest.CaptureFixture) -> None:
    out = generated["root"] / "city"
    assert data_main(["trips", "--csv", str(generated["csv"]), "--out", str(out), "--bbox", *map(str, BBOX),
                      "--cell-size", "1000", "--name", "demo", "--test-days", "2"]) == 0
    text = capsys.readouterr().out
    assert "bad records: unparsable_time 2, bad_coordinates 1, end_before_start 1, start_outside_box 2, " \
           "end_outside_box 3" in text
    assert "grid 4x4, 384 slots" in text
    spec = out / "demo.yaml"
    written = read_flow_file(out / "demo_M4x4_T60_InOut.h5", 24)
    np.testing.assert_array_equal(written.data, generated["expected"])
    assert data_main(["info", "--dataset", str(spec), "--data-dir", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["grid"] == [4, 4] and info["samples"]["test"] == 48 and info["slots_kept"] == 384
    result = train.main(["--model", "historical_average", "--dataset", str(spec), "--data-dir", str(out),
                         "--out-dir", str(generated["root"] / "run"), "--no-progress-bar", "--json"])
    assert result["test"]["test_samples"] == 48 and np.isfinite(result["test"]["test_rmse"])


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_schema_files_read_like_hdf5(generated: dict, tmp_path: Path, suffix: str) -> None:
    flows, stamps = generated["expected"], pd.date_range("2024-05-01", periods=DAYS * 24, freq="h")
    if suffix == ".npz":
        path = write_grid_npz(tmp_path / "city.npz", flows, stamps)
    else:
        from stflow.forecast import Forecast, write_forecast

        path = write_forecast(Forecast(stamps, flows, 24), tmp_path / "city.csv")
    read = read_grid_file(path, 24, grid=(4, 4))
    np.testing.assert_array_equal(read.data, flows)
    assert list(read.timestamps) == list(stamps)
    (tmp_path / "spec.yaml").write_text(f"name: mine\nslots_per_day: 24\nflow_files: [city{suffix}]\ntest_days: 2\n")
    data = load_crowd_flow(str(tmp_path / "spec.yaml"), tmp_path)
    assert data.flows.shape == (DAYS * 24, 2, 4, 4) and data.n_test == 48


def test_schema_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", flows=np.zeros((2, 2, 3, 3)), timestamps=np.array(["2024-05-01T00:00", "noon"]))
    with pytest.raises(ValueError, match="timestamp 'noon' at row 1 is not a date and time"):
        read_grid_file(tmp_path / "a.npz", 24)
    np.savez(tmp_path / "b.npz", flows=np.zeros((2, 2, 3, 3)), timestamps=np.array(["2024-05-01T00:00",
                                                                                     "2024-05-01T00:30"]))
    with pytest.raises(ValueError, match="is not the start of a 60-minute slot"):
        read_grid_file(tmp_path / "b.npz", 24)
    np.savez(tmp_path / "c.npz", data=np.zeros((2, 2, 3, 3)))
    with pytest.raises(ValueError, match="missing key 'flows'"):
        read_grid_file(tmp_path / "c.npz", 24)
