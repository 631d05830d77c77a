"""``python -m benchmarks multistep``: the per-step table's arithmetic, the direct rows' recipe, bad options."""

from __future__ import annotations

import statistics

import pytest

from benchmarks import bench_multistep
from benchmarks.__main__ import main


def test_summarise_means_and_sds_over_seeds() -> None:
    per_seed = [[1.0, 2.0, 4.0], [3.0, 2.0, 6.0]]
    row = bench_multistep.summarise("M", "direct", "src", per_seed, 235, [777, 778])
    assert row["rmse_step1"] == 2.0 and row["rmse_step1_sd"] == pytest.approx(statistics.stdev([1.0, 3.0]))
    assert row["rmse_step2_sd"] == 0.0
    assert row["rmse_mean"] == pytest.approx(statistics.fmean([7 / 3, 11 / 3]))
    assert row["seed_list"] == "777/778" and row["origins"] == 235
    single = bench_multistep.summarise("HA", "baseline", "src", [[1.0, 2.0, 3.0]], 235, [])
    assert single["rmse_step3_sd"] is None and single["seed_list"] == "-"
    table = bench_multistep.markdown_table([row, single], (1, 3), 3)
    assert table.splitlines()[0] == "| model | mode | seeds | epochs | step 1 | step 3 | mean 1..3 |"
    assert "| M | direct | 2 | - | 2.000 ± 1.414 | 5.000 ± 1.414 | 3.000 ± 0.943 |" in table
    assert "| HA | baseline | 1 | - | 1.000 | 3.000 | 2.000 |" in table


def test_direct_rows_use_the_leaderboard_recipe_with_a_direct_head(tmp_path) -> None:
    config = bench_multistep.direct_config("stresnet", 778, tmp_path, 6, None, str(tmp_path))
    assert (config.model, config.horizon, config.horizon_mode, config.direct) == ("stresnet", 6, "direct", True)
    assert config.run.max_epochs == 150 and config.seed == 778 and config.lr == 1e-3 and config.ema_decay == 0.99
    assert config.run.out_dir == str(tmp_path / "stresnet_direct" / "seed778")


@pytest.mark.parametrize(("args", "key"), [(["--horizon", "0"], "horizon"), (["--report-steps", "[7]"], "report_steps"),
                                           (["--seeds", "[]"], "seeds")])
def test_bad_options_are_refused_before_any_work(args, key, monkeypatch, capsys) -> None:
    def started(*_a, **_k):
        raise AssertionError("work started")

    monkeypatch.setattr(bench_multistep, "train_claimed", started)
    monkeypatch.setattr(bench_multistep, "report", started)
    assert main(["multistep", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], err
