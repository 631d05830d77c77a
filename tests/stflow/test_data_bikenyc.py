"""The data layer on the real BikeNYC segment: sample counts, test period, scaler, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from stflow.config import run_cli
from stflow.data import CrowdFlowDataModule, load_crowd_flow
from stflow.data.__main__ import main


def test_counts_and_test_period(bikenyc_dir: Path) -> None:
    data = load_crowd_flow("bikenyc", bikenyc_dir, len_closeness=4, len_period=2, len_trend=0)
    assert len(data.windows) == 1321
    assert data.n_test == 240 and data.n_train + data.n_val == 1081
    assert data.n_val == round(0.1 * 1081)
    test = data.split("test")
    assert data.timestamps[test.target[0]] == pd.Timestamp("2014-09-21 00:00")
    assert data.timestamps[test.target[-1]] == pd.Timestamp("2014-09-30 23:00")
    assert data.slots_read == len(data.timestamps) == 1369
    assert data.removed_days == {"NYC14_M16x8_T60_NewEnd_last1369h.h5": []}
    assert data.ext_dim == 33 and data.metric_factor == pytest.approx(math.sqrt(128 / 81))
    # 81 active cells, as the metric factor assumes.
    assert (data.flows != 0).any(axis=(0, 1)).sum() == 81


def test_scaler_fitted_on_training_slots(bikenyc_dir: Path) -> None:
    with h5py.File(bikenyc_dir / "NYC14_M16x8_T60_NewEnd_last1369h.h5", "r") as f:
        raw = f["data"][()]
    # No validation split: the training slots are every slot before the last 240 (the reference's choice).
    data = load_crowd_flow("bikenyc", bikenyc_dir, val_fraction=0.0)
    assert data.train_slot_mask.sum() == 1369 - 240
    assert (data.scaler.min, data.scaler.max) == (raw[:-240].min(), raw[:-240].max())
    # With a validation split the scaler stops before the first validation target.
    data = load_crowd_flow("bikenyc", bikenyc_dir, val_fraction=0.1)
    first_val = data.split("val").target[0]
    assert data.train_slot_mask.sum() == first_val
    assert data.scaler.max == raw[:first_val].max() and data.scaler.min == raw[:first_val].min()
    x = raw[-240:]
    np.testing.assert_allclose(data.scaler.inverse_transform(data.scaler.transform(x)), x, atol=1e-12)
    override = load_crowd_flow("bikenyc", bikenyc_dir, scale_min=0, scale_max=267)
    assert (override.scaler.min, override.scaler.max) == (0.0, 267.0)
    assert override.info()["scaler"]["source"] == "override (min/max)"


def test_cli_info_json(bikenyc_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["info", "--dataset", "bikenyc", "--data-dir", str(bikenyc_dir), "--len-closeness", "4",
            "--len-period", "2", "--len-trend", "0", "--json"]
    assert main(argv) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["samples"]["total"] == 1321 and info["samples"]["test"] == 240
    assert info["samples"]["train"] + info["samples"]["val"] == 1081
    assert info["test_period"] == ["2014-09-21 00:00:00", "2014-09-30 23:00:00"]
    assert info["slots_kept"] == 1369 and info["slots_removed"] == 0 and info["removed_days"] == []
    assert info["ext_dim"] == 33 and info["grid"] == [16, 8] and info["slots_per_day"] == 24
    assert main(argv[:-1]) == 0  # the text report
    assert "1321 total" in capsys.readouterr().out
    bad = ["info", "--dataset", "bikenyc", "--data-dir", str(bikenyc_dir), "--len-trend", "9"]
    assert run_cli(main, bad) == 2  # one line on stderr, no traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "leaves no samples" in err and len(err.strip().splitlines()) == 1


def test_datamodule_with_authors_scaling(bikenyc_dir: Path) -> None:
    dm = CrowdFlowDataModule("bikenyc", str(bikenyc_dir), val_fraction=0.0, scale_min=0, scale_max=267,
                             compat_weekend_bug=True, batch_size=240)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["closeness"].shape == (240, 4, 2, 16, 8) and batch["ext_target"].shape == (240, 33)
    first = pd.Timestamp("2014-09-21 00:00")
    assert dm.timestamps[int(batch["index"][0])] == first
    expected = (dm.flows[batch["index"].numpy()] / 267.0) * 2 - 1
    np.testing.assert_allclose(batch["target"].numpy(), expected, rtol=0, atol=1e-6)
    # Sunday 2014-09-21 00:00: bugged flag 0 (Sunday), its closeness frame t-1 is Saturday 23:00 (flag 1 under the bug).
    assert batch["ext_target"][0, 6] == 1 and batch["ext_target"][0, 7] == 0
    assert batch["ext_closeness"][0, 0, 5] == 1 and batch["ext_closeness"][0, 0, 7] == 1
    assert batch["ext_closeness"][0, 0, 8 + 23] == 1
