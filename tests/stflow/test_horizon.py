"""Multi-step horizons (recursive rollout): per-step metrics recomputed independently, the recursion checked through
the Forecaster, and ``stflow.train --horizon``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stflow import evaluate, train
from stflow.data import generate_synthetic_city, read_flow_file
from stflow.forecast import Forecaster


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("horizon")
    generate_synthetic_city(root / "city", seed=6, days=16, grid=(4, 4))
    return root / "city"


@pytest.fixture(scope="module")
def trained(city: Path) -> dict:
    return train.main(["--data-dir", str(city), "--test-days", "2", "--epochs", "1", "--batch-size", "32",
                       "--no-progress-bar", "--out-dir", str(city.parent / "run"), "--horizon", "3", "--horizon-mode",
                       "recursive", "--json"])


def test_persistence_per_step_rmse_recomputed(city: Path) -> None:
    result = evaluate.evaluate(None, "persistence", {"dataset": "synthetic", "data_dir": str(city), "test_days": 2},
                               horizon=3)
    raw = read_flow_file(next(city.glob("SYN_M*_T60_InOut.h5")), 24)
    flows = raw.data
    n = len(flows)
    first = np.arange(n - 48, n - 2)  # test targets whose next two slots are test targets too
    active = (flows != 0).any(axis=(0, 1))
    factor = np.sqrt(active.size / active.sum())
    assert result["test_samples"] == len(first) == 46
    for h in range(3):
        err = flows[first - 1] - flows[first + h]  # persistence repeats the last observed frame at every step
        rmse = np.sqrt((err**2).mean()) * factor
        assert result["steps"][h]["rmse"] == pytest.approx(rmse, rel=1e-6), h
        assert result["steps"][h]["mae"] == pytest.approx(np.abs(err[:, :, active]).mean(), rel=1e-6), h
    assert result["test_rmse"] == pytest.approx(np.mean([s["rmse"] for s in result["steps"]]))
    assert result["steps"][0]["rmse"] < result["steps"][2]["rmse"]


def test_rollout_feeds_back_its_own_predictions(trained: dict, city: Path) -> None:
    """Step 2 of the rollout = a one-step forecast from a history where slot t holds the step-1 forecast."""
    result = evaluate.evaluate(trained["best_checkpoint"], horizon=2)
    one = evaluate.evaluate(trained["best_checkpoint"])
    assert result["steps"][0]["rmse"] != result["steps"][1]["rmse"]
    forecaster = Forecaster.from_checkpoint(trained["best_checkpoint"])
    raw = read_flow_file(next(city.glob("SYN_M*_T60_InOut.h5")), 24)
    t = pd.Timestamp("2015-03-17 10:00")
    row = raw.timestamps.get_loc(t)
    step1 = forecaster.predict(raw.data[:row], raw.timestamps[:row], start=t)
    history = np.concatenate([raw.data[:row], step1.values])
    step2 = forecaster.predict(history, raw.timestamps[:row + 1], start=t + pd.Timedelta(hours=1))

    from stflow.evaluate import _datamodule, load_checkpoint
    from stflow.forecast import predict_samples

    system, data = load_checkpoint(trained["best_checkpoint"])
    dm = _datamodule(data, {})
    dm.setup("test")
    sample = int(np.flatnonzero(dm.data.windows.target == row)[0])
    pred = predict_samples(system.eval_model, dm, np.array([sample]), horizon=2)
    values = dm.scaler.inverse_transform(pred.double().numpy())[0]  # (2, 2, H, W)
    np.testing.assert_allclose(values[0], step1.values[0], atol=1e-4)
    np.testing.assert_allclose(values[1], step2.values[0], atol=1e-4)
    # Horizon 1 of the rollout path equals the Lightning test loop's metrics (different origin sets aside).
    h1 = evaluate.evaluate(trained["best_checkpoint"], protocol="deepst", horizon=1)
    assert h1["test_rmse"] == pytest.approx(one["test_rmse"], rel=1e-9)


def test_train_horizon_reports_per_step(trained: dict) -> None:
    steps = trained["test_horizon"]["steps"]
    assert len(steps) == 3 and trained["test_horizon"]["protocol"] == "deepst"
    assert trained["horizon_mode"] == trained["test_horizon"]["mode"] == "recursive"
    again = evaluate.evaluate(trained["best_checkpoint"], horizon=3)
    for mine, theirs in zip(steps, again["steps"]):
        assert mine["rmse"] == pytest.approx(theirs["rmse"], rel=1e-6)
