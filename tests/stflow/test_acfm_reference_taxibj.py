"""``acfm_reference_taxibj``: the authors' TaxiBJ layout loads strictly and evaluates from the CLI.

The authors' TaxiBJ checkpoint is not available here: the state dict is generated from the model itself
(:func:`to_reference_state_dict`, the inverse key mapping) and loaded back strictly, then evaluated on a small
TaxiBJ-shaped folder (four yearly 32x32 files, meteorology, holidays: the 77-dim external vector)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stflow import evaluate
from stflow.data import write_flow_file, write_meteorology
from stflow.models import build_model, load_reference_checkpoint
from stflow.models.acfm_reference import to_reference_state_dict

KW = dict(grid_shape=(32, 32), ext_dim=77, len_closeness=4, len_period=2, len_trend=0, slots_per_day=48)


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(3)
    model = build_model("acfm_reference_taxibj", cell="literal", **KW).eval()
    path = tmp_path_factory.mktemp("taxibj") / "taxibj.pt"
    torch.save(to_reference_state_dict(model), path)
    return path, model


@pytest.fixture(scope="module")
def taxibj_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("taxibj_data")
    rng = np.random.default_rng(0)
    days = {13: ("2013-07-01", 1), 14: ("2014-03-01", 1), 15: ("2015-03-01", 1), 16: ("2016-03-01", 4)}
    for year, (first, n) in days.items():
        stamps = pd.date_range(first, periods=n * 48, freq="30min")
        write_flow_file(root / f"BJ{year}_M32x32_T30_InOut.h5", rng.poisson(40, (len(stamps), 2, 32, 32)), stamps, 48)
    met = pd.date_range("2013-07-01", "2016-03-05", freq="30min", inclusive="left")
    weather = np.eye(17)[rng.integers(0, 17, len(met))]
    write_meteorology(root / "BJ_Meteorology.h5", met, weather, rng.uniform(0, 10, len(met)),
                      rng.uniform(-5, 30, len(met)), 48)
    (root / "BJ_Holiday.txt").write_text("20160302\r\n20150101\r\n")
    return root


def test_strict_round_trip(authors_file: tuple[Path, torch.nn.Module]) -> None:
    path, literal = authors_file
    loaded = load_reference_checkpoint(path)  # shapes -> config (R=12, ext 77, 32x32), fused cells, strict
    assert loaded.config.res_units == 12 and loaded.config.ext_dim == 77 and loaded.config.grid_shape == (32, 32)
    g = torch.Generator().manual_seed(0)
    batch = {"closeness": torch.rand(2, 4, 2, 32, 32, generator=g) * 2 - 1,
             "period": torch.rand(2, 2, 2, 32, 32, generator=g) * 2 - 1, "trend": torch.zeros(2, 0, 2, 32, 32),
             "ext_closeness": torch.rand(2, 4, 77, generator=g), "ext_period": torch.rand(2, 2, 77, generator=g),
             "ext_trend": torch.zeros(2, 0, 77), "ext_target": torch.rand(2, 77, generator=g)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), literal(batch), atol=1e-5, rtol=1e-5)
    state = torch.load(path, weights_only=True)
    del state["extnn.model.0.bias"]
    torch.save(state, path.with_name("broken.pt"))
    with pytest.raises(ValueError, match=r"missing \(model keys not filled\): ext_embed.net.0.bias"):
        load_reference_checkpoint(path.with_name("broken.pt"))


def test_evaluate_recognises_and_scores(authors_file: tuple[Path, torch.nn.Module], taxibj_dir: Path) -> None:
    path, _ = authors_file
    with pytest.raises(ValueError, match="pass --model acfm_reference_taxibj to evaluate the authors' weights"):
        evaluate.load_checkpoint(path)
    result = evaluate.main(["--checkpoint", str(path), "--model", "acfm_reference_taxibj", "--data-dir",
                            str(taxibj_dir), "--test-days", "1", "--json", "--accelerator", "cpu"])
    assert result["test_samples"] == 48 and result["protocol"] == "deepst"
    assert np.isfinite(result["test_rmse"]) and result["test_rmse"] > 0
    from stflow.evaluate import REFERENCE_DATA, _datamodule

    dm = _datamodule(REFERENCE_DATA["acfm_reference_taxibj"], {"data_dir": str(taxibj_dir), "test_days": 1})
    dm.setup("test")
    assert dm.ext_dim == 77  # 7 + 1 + 48 + 1 calendar, holiday, 17 weather + wind + temperature
