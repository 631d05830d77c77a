"""``stflow.predict`` / :class:`stflow.forecast.Forecaster`: forecasts in original units equal the evaluation's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stflow import predict, train
from stflow.data import generate_synthetic_city, read_flow_file
from stflow.evaluate import _datamodule, load_checkpoint
from stflow.forecast import Forecaster


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("predict")
    generate_synthetic_city(root / "city", seed=5, days=16, grid=(4, 4))
    return train.main(["--data-dir", str(root / "city"), "--test-days", "2", "--epochs", "1", "--batch-size", "32",
                       "--no-progress-bar", "--out-dir", str(root / "run"), "--json"])


@pytest.fixture(scope="module")
def evaluation(trained: dict) -> dict:
    """The evaluation's own test predictions (Lightning predict loop), in original units."""
    import pytorch_lightning as pl

    system, data = load_checkpoint(trained["best_checkpoint"])
    dm = _datamodule(data, {})
    dm.setup("test")
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    batches = trainer.predict(system, dataloaders=dm.test_dataloader())
    pred = dm.scaler.inverse_transform(torch.cat([b["pred"] for b in batches]).double().numpy())
    index = torch.cat([b["index"] for b in batches]).numpy()
    return {"pred": pred, "timestamps": dm.timestamps[index], "dm": dm}


def test_forecaster_equals_evaluation_on_test_period(trained: dict, evaluation: dict) -> None:
    dm = evaluation["dm"]
    forecaster = Forecaster.from_checkpoint(trained["best_checkpoint"])
    stamps = evaluation["timestamps"]
    forecast = forecaster.predict(dm.flows, dm.timestamps, start=stamps[0], end=stamps[-1])
    assert list(forecast.timestamps) == list(stamps)
    assert forecast.values.shape == evaluation["pred"].shape == (48, 2, 4, 4)
    np.testing.assert_allclose(forecast.values, evaluation["pred"], rtol=0, atol=1e-4)
    assert np.abs(forecast.values).max() > 1.0  # original units, not scaled


def test_cli_writes_h5_npz_csv(trained: dict, evaluation: dict, tmp_path: Path) -> None:
    out = predict.main(["--checkpoint", trained["best_checkpoint"], "--out", str(tmp_path / "f.h5"), "--json"])
    assert out["slots"] == 48 and out["first"] == str(evaluation["timestamps"][0])
    written = read_flow_file(tmp_path / "f.h5", slots_per_day=24)
    np.testing.assert_allclose(written.data, evaluation["pred"], atol=1e-4)
    assert list(written.timestamps) == list(evaluation["timestamps"])

    predict.main(["--checkpoint", trained["best_checkpoint"], "--out", str(tmp_path / "f.npz"),
                  "--start", "2015-03-17 05:00", "--end", "2015-03-17 06:00"])
    npz = np.load(tmp_path / "f.npz")
    assert list(npz["timestamps"]) == ["2015-03-17T05:00", "2015-03-17T06:00"]
    row = list(evaluation["timestamps"]).index(pd.Timestamp("2015-03-17 05:00"))
    np.testing.assert_allclose(npz["flows"], evaluation["pred"][row:row + 2], atol=1e-4)

    predict.main(["--checkpoint", trained["best_checkpoint"], "--out", str(tmp_path / "f.csv"),
                  "--start", "2015-03-17 05:00"])
    csv = pd.read_csv(tmp_path / "f.csv")
    assert list(csv.columns) == ["timestamp", "row", "col", "inflow", "outflow"] and len(csv) == 16
    cell = csv[(csv.row == 2) & (csv.col == 3)].iloc[0]
    assert cell.inflow == pytest.approx(evaluation["pred"][row, 0, 2, 3], abs=1e-4)
    assert cell.outflow == pytest.approx(evaluation["pred"][row, 1, 2, 3], abs=1e-4)


def test_missing_history_names_the_slots(trained: dict, evaluation: dict, capsys: pytest.CaptureFixture) -> None:
    dm = evaluation["dm"]
    forecaster = Forecaster.from_checkpoint(trained["best_checkpoint"])
    keep = ~dm.timestamps.isin(pd.DatetimeIndex(["2015-03-16 02:00", "2015-03-15 03:00"]))
    with pytest.raises(ValueError, match=r"need 2 slot\(s\) absent from the given frames: 2015-03-15 03:00:00, "
                                         r"2015-03-16 02:00:00"):
        forecaster.predict(dm.flows[keep], dm.timestamps[keep], start="2015-03-16 03:00")
    forecast = forecaster.predict(dm.flows[keep], dm.timestamps[keep], start="2015-03-16 07:00")  # not needed there
    assert forecast.values.shape == (1, 2, 4, 4)
    # The next slot after the history, by default: a true forecast.
    future = forecaster.predict(dm.flows, dm.timestamps)
    assert future.timestamps[0] == dm.timestamps[-1] + pd.Timedelta(hours=1)
    code = predict.run_cli(predict.main, ["--checkpoint", trained["best_checkpoint"], "--out", "x.txt"])
    assert code == 2 and "--out must end with .h5, .npz or .csv" in capsys.readouterr().err
    for period, message in ((["--start", "2015-03-16 05:00", "--end", "2015-03-16 04:00"],
                             "error: --start 2015-03-16 05:00:00 is after --end 2015-03-16 04:00:00\n"),
                            (["--start", "yesterday"], "error: --start: cannot read 'yesterday' as a time")):
        code = predict.run_cli(predict.main, ["--checkpoint", trained["best_checkpoint"], "--out", "x.npz", *period])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_written_h5_reads_back_as_input_layout(trained: dict, tmp_path: Path) -> None:
    result = predict.main(["--checkpoint", trained["best_checkpoint"], "--out", str(tmp_path / "g.h5"), "--json"])
    assert json.loads(json.dumps(result))["units"].startswith("original")
    import h5py

    with h5py.File(tmp_path / "g.h5") as f:
        assert f["data"].dtype == np.float64 and f["date"].dtype == np.dtype("S10")
        assert f["date"][0] == b"2015031601"
