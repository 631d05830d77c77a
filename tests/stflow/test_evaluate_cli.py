"""``python -m stflow.evaluate``: same numbers as the training run's test, figures, the authors' checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stflow import evaluate, train
from stflow.data import generate_synthetic_city


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    generate_synthetic_city(root / "city", seed=4, days=16, grid=(4, 4))
    return train.main(["--data-dir", str(root / "city"), "--test-days", "2", "--epochs", "2", "--batch-size", "32",
                       "--no-progress-bar", "--out-dir", str(root / "run"), "--json"])


def test_checkpoint_evaluation_matches_training_test(
    trained: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    result = evaluate.main(
        [
            "--checkpoint",
            trained["best_checkpoint"],
            "--json",
            "--accelerator",
            "cpu",
            "--plots",
            str(tmp_path / "plots"),
            "--hour",
            "2015-03-16 08:00",
        ]
    )
    for key in ("test_rmse", "test_rmse_inflow", "test_rmse_outflow", "test_mae", "test_samples", "test_loss"):
        assert result[key] == pytest.approx(trained["test"][key], rel=1e-9), key
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["test_rmse"] == result["test_rmse"]
    names = sorted(Path(p).name for p in result["plots"])
    assert names == ["cell_rmse.png", "flow_maps_2015-03-16_0800.png", "rmse_by_hour.png"]
    for path in result["plots"]:
        data = Path(path).read_bytes()
        assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_hour_outside_test_period(trained: dict, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="is not a test target; the test period is 2015-03-16 00:00:00 .. 2015-03-17 23:00:00"
    ):
        evaluate.evaluate(trained["best_checkpoint"], plots_dir=tmp_path, hour="2015-03-02 08:00", accelerator="cpu")


def test_authors_checkpoint_reproduces_published_figures(shared: Path, bikenyc_dir: Path) -> None:
    """acfm.md: RMSE 5.598, inflow 5.419, outflow 5.770, MAE over the 81 active cells 3.382."""
    result = evaluate.main(
        [
            "--checkpoint",
            str(shared / "checkpoints" / "atfm" / "bikenyc.pt"),
            "--model",
            "acfm_reference_bikenyc",
            "--data-dir",
            str(bikenyc_dir),
            "--json",
            "--accelerator",
            "cpu",
        ]
    )
    assert result["test_samples"] == 240
    assert result["test_rmse"] == pytest.approx(5.598, abs=0.01)
    assert result["test_rmse_inflow"] == pytest.approx(5.419, abs=0.01)
    assert result["test_rmse_outflow"] == pytest.approx(5.770, abs=0.01)
    assert result["test_mae"] == pytest.approx(3.382, abs=0.01)


def test_bad_checkpoints(shared: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        evaluate.load_checkpoint(tmp_path / "absent.ckpt")
    with pytest.raises(ValueError, match="plain state dict, not a stflow checkpoint: pass --model"):
        evaluate.load_checkpoint(shared / "checkpoints" / "atfm" / "bikenyc.pt")
    with pytest.raises(ValueError, match="can only be loaded as"):
        evaluate.load_checkpoint(shared / "checkpoints" / "atfm" / "bikenyc.pt", model="stresnet")
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        evaluate.load_checkpoint(garbage)
