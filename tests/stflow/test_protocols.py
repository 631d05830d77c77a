"""Named evaluation protocols: the stssl split and masked metrics by hand-built arrays, deepst against FlowMetrics,
and ``evaluate --protocol stssl`` on real BikeNYC recomputed from the raw file."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from stflow import evaluate
from stflow.metrics import protocol_metrics as flow_protocol_metrics
from stflow.protocols import check_protocol, deepst_metrics, stssl_metrics, stssl_split


def test_stssl_split() -> None:
    train, val, test = stssl_split(2000)
    assert (train.start, train.stop, val.start, val.stop, test.start, test.stop) == (0, 705, 705, 1136, 1136, 2000)
    assert test.stop - test.start == 864 and val.stop - val.start == 431
    with pytest.raises(ValueError, match="more than 864 \\+ 431 samples"):
        stssl_split(1295)
    with pytest.raises(ValueError, match="unknown protocol 'paper'; choose from deepst, stssl"):
        check_protocol("paper")


def test_stssl_masked_metrics_by_hand() -> None:
    true = np.zeros((1, 2, 1, 3))
    pred = np.zeros((1, 2, 1, 3))
    true[0, 0, 0], pred[0, 0, 0] = [10, 5, 20], [12, 100, 15]  # inflow: the 5 is not > 5 -> left out
    true[0, 1, 0], pred[0, 1, 0] = [6, 0, 8], [3, 9, 8]  # outflow: the 0 is left out
    m = stssl_metrics(pred, true)
    assert m["inflow_mae"] == pytest.approx((2 + 5) / 2)
    assert m["inflow_mape"] == pytest.approx((2 / 10 + 5 / 20) / 2 * 100)
    assert m["outflow_mae"] == pytest.approx((3 + 0) / 2)
    assert m["outflow_mape"] == pytest.approx((3 / 6 + 0 / 8) / 2 * 100)
    assert m["inflow_values"] == 2 and m["outflow_values"] == 2
    with pytest.raises(ValueError, match="no inflow value is > 5"):
        stssl_metrics(pred, np.full_like(true, 5.0))


def test_deepst_metrics_match_streaming_flow_metrics() -> None:
    rng = np.random.default_rng(0)
    true = rng.integers(0, 30, size=(7, 2, 4, 3)).astype(float)
    true[:, :, 0, 0] = 0  # a never-active cell
    pred = true + rng.normal(0, 3, size=true.shape)
    active = (true != 0).any(axis=(0, 1))
    factor = np.sqrt(12 / active.sum())
    mine = deepst_metrics(pred, true, factor, active)
    lo, hi = 0.0, 40.0  # FlowMetrics works on scaled values
    scale = lambda x: torch.from_numpy((x - lo) / (hi - lo) * 2 - 1)  # noqa: E731
    theirs = flow_protocol_metrics(scale(pred), scale(true), (hi - lo) / 2, factor, torch.from_numpy(active))
    for key in ("rmse", "rmse_inflow", "rmse_outflow", "mae"):
        assert mine[key] == pytest.approx(theirs[key], rel=1e-9), key


def test_evaluate_stssl_persistence_on_bikenyc(bikenyc_dir: Path) -> None:
    """Persistence under stssl, recomputed from the raw file: the last 864 hours, prediction = previous hour."""
    result = evaluate.evaluate(None, "persistence", {"dataset": "bikenyc", "data_dir": str(bikenyc_dir)},
                               protocol="stssl")
    with h5py.File(bikenyc_dir / "NYC14_M16x8_T60_NewEnd_last1369h.h5") as f:
        flows, dates = f["data"][()], f["date"][()]
    true, pred = flows[-864:], flows[-865:-1]
    assert result["test_samples"] == 864 and result["protocol"] == "stssl"
    assert result["test_period"] == ["2014-08-26 00:00:00", "2014-09-30 23:00:00"] and dates[-864] == b"2014082601"
    for c, name in enumerate(("inflow", "outflow")):
        keep = true[:, c] > 5
        err = np.abs(pred[:, c][keep] - true[:, c][keep])
        assert result[f"test_{name}_mae"] == pytest.approx(err.mean(), rel=1e-6)  # float32 scaled frames
        assert result[f"test_{name}_mape"] == pytest.approx((err / true[:, c][keep]).mean() * 100, rel=1e-6)


def test_evaluate_cli_prints_the_protocol(bikenyc_dir: Path, capsys: pytest.CaptureFixture) -> None:
    evaluate.main(["--model", "historical_average", "--dataset", "bikenyc", "--data-dir", str(bikenyc_dir),
                   "--protocol", "stssl"])
    out = capsys.readouterr().out
    assert "protocol stssl: test = last 864 targets, val = the 431 before" in out
    assert '"protocol": "stssl"' in out and "inflow_mape" in out
    code = evaluate.run_cli(evaluate.main, ["--model", "acfm_bikenyc", "--dataset", "bikenyc"])
    assert code == 2 and "--checkpoint is required" in capsys.readouterr().err
