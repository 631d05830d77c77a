"""``python -m benchmarks leaderboard``: every recipe is a valid packaged config, a run is trained once and
then skipped (resumable queue), the table and plot are written with mean ± sd over seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import bench_leaderboard as lb
from stflow.models import list_models


@pytest.mark.parametrize("row", lb.ROWS)
def test_every_row_has_a_valid_recipe(row: str, tmp_path: Path) -> None:
    config = lb.row_config(row, 778, tmp_path, None, "/data")
    assert config.model in list_models() and config.dataset == "bikenyc" and config.data_dir == "/data"
    assert config.run.seed == 778 and Path(config.run.out_dir) == tmp_path / row / "seed778"
    if row != "historical_average":  # the same validation rule for every trained model
        assert config.data.val_fraction == 0.1 and config.run.max_epochs <= 150
        assert config.run.early_stopping_patience is not None and config.run.monitor == "val_loss"
    assert lb.row_config(row, 1, tmp_path, 3, None).run.max_epochs == (1 if row == "historical_average" else 3)


def test_claim_refuses_a_run_held_by_a_live_process(tmp_path: Path) -> None:
    assert lb.claim(tmp_path / "run")
    assert not lb.claim(tmp_path / "run")  # held by this (live) process
    (tmp_path / "run" / ".running").write_text("999999999")  # no such process: a stale lock
    assert lb.claim(tmp_path / "run")


def test_leaderboard_trains_skips_and_reports(bikenyc_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--models", "historical_average", "stid", "--seeds", "1", "2", "--epochs", "1", "--out-dir",
            str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"), "--data-dir", str(bikenyc_dir)]
    assert lb.main(args) == 0
    saved = json.loads((tmp_path / "results" / "leaderboard.json").read_text())
    rows = {r["model"]: r for r in saved["rows"]}
    assert rows["historical_average"]["rmse"] == pytest.approx(8.643, abs=1e-3)  # the data README's figure
    assert rows["historical_average"]["seeds"] == 1 and rows["stid"]["seeds"] == 2
    seeds = [s["rmse"] for s in saved["per_seed"] if s["row"] == "stid"]
    assert rows["stid"]["rmse"] == pytest.approx(sum(seeds) / 2) and rows["stid"]["rmse_sd"] > 0
    assert rows["stid"]["params"] == 104_834
    assert "protocol deepst" in saved["notes"][0] and "| STID | 2 |" in saved["markdown"]
    assert (tmp_path / "results" / "leaderboard.png").is_file()
    capsys.readouterr()
    assert lb.main(args) == 0  # everything finished: nothing is trained again
    out = capsys.readouterr().out
    assert out.count("done already") == 3 and "after 1 epochs" not in out  # nothing trained this time
