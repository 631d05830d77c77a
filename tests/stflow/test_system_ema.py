"""ForecastingSystem's optional training aids: the cosine lr schedule and weight averaging (EMA) used for
validation, test and prediction, saved in checkpoints and reproduced by stflow.evaluate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stflow import train
from stflow.data import generate_synthetic_city
from stflow.evaluate import evaluate
from stflow.system import CosineSchedule, ForecastingSystem

KW = dict(grid_shape=(4, 4), ext_dim=5, len_closeness=2, len_period=1, len_trend=0, slots_per_day=24)


def _batch(b: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"closeness": torch.rand(b, 2, 2, 4, 4, generator=g), "period": torch.rand(b, 1, 2, 4, 4, generator=g),
            "trend": torch.rand(b, 0, 2, 4, 4), "ext_target": torch.rand(b, 5, generator=g),
            "target": torch.rand(b, 2, 4, 4, generator=g) * 2 - 1, "index": torch.arange(b)}


def test_cosine_schedule_values() -> None:
    f = CosineSchedule(total_epochs=10, warmup_epochs=0, final_factor=0.01)
    assert f(0) == pytest.approx(1.0) and f(10) == pytest.approx(0.01) and f(50) == pytest.approx(0.01)
    assert f(5) == pytest.approx(0.01 + 0.99 * 0.5)  # half way: the mean of the two ends
    w = CosineSchedule(total_epochs=12, warmup_epochs=2, final_factor=0.0)
    assert [w(0), w(1), w(2)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert w(7) == pytest.approx(0.5)


def test_cosine_schedule_through_the_system() -> None:
    system = ForecastingSystem("stid", 0.0, 10.0, model_kwargs={**KW, "time_embeddings": False}, lr=1e-3,
                               lr_schedule="cosine", lr_final_factor=0.1)
    system.trainer = type("T", (), {"max_epochs": 4})()  # configure_optimizers reads the trainer's max_epochs
    opt = system.configure_optimizers()
    lrs = []
    for _ in range(5):
        lrs.append(opt["optimizer"].param_groups[0]["lr"])
        opt["lr_scheduler"]["scheduler"].step()
    expected = [1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * e / 4))) for e in range(5)]
    assert lrs == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown lr_schedule"):
        ForecastingSystem("stid", 0.0, 1.0, model_kwargs=KW, lr_schedule="linear")


def test_ema_update_rule_and_which_weights_are_used() -> None:
    torch.manual_seed(0)
    system = ForecastingSystem("stid", 0.0, 10.0, model_kwargs={**KW, "time_embeddings": False}, ema_decay=0.9,
                               num_slots=10)
    assert system.ema_model is not None and not any(p.requires_grad for p in system.ema_model.parameters())
    name = "history.weight"
    before = system.ema_model.state_dict()[name].clone()
    with torch.no_grad():
        system.model.get_parameter(name).add_(0.05)
    system.update_ema()  # first update: decay = min(0.9, 1/10) = 0.1
    after = system.ema_model.state_dict()[name].clone()
    assert torch.allclose(after, 0.1 * before + 0.9 * (before + 0.05))
    assert int(system.ema_updates) == 1
    system.update_ema()  # second: min(0.9, 2/11)
    d = 2 / 11
    assert torch.allclose(system.ema_model.state_dict()[name], d * after + (1 - d) * (before + 0.05))
    # the optimiser sees only the trained weights; forward (eval) runs the average
    optimised = system.configure_optimizers()["optimizer"].param_groups[0]["params"]
    assert len(optimised) == len(list(system.model.parameters()))
    system.eval()
    batch = _batch()
    assert torch.equal(system(batch), system.ema_model(batch))
    assert not torch.equal(system(batch), system.model(batch))
    # checkpoint: the average is in the state dict and a rebuild from hparams restores it
    clone = ForecastingSystem(**system.hparams)
    clone.load_state_dict(system.state_dict())
    clone.eval()
    assert torch.equal(clone(batch), system(batch))
    with pytest.raises(ValueError, match="ema_decay"):
        ForecastingSystem("stid", 0.0, 1.0, model_kwargs=KW, ema_decay=1.0)


def test_cli_with_ema_and_cosine_round_trips_through_evaluate(tmp_path: Path) -> None:
    city = tmp_path / "city"
    generate_synthetic_city(city, seed=1, days=16, grid=(4, 4))
    result = train.main(["--model", "stid", "--data-dir", str(city), "--test-days", "2", "--batch-size", "32",
                         "--epochs", "2", "--limit-train-batches", "2", "--no-progress-bar", "--ema-decay", "0.9",
                         "--lr-schedule", "cosine", "--lr-warmup-epochs", "1", "--out-dir", str(tmp_path / "run"),
                         "--json"])
    assert result["config"]["ema_decay"] == 0.9 and result["config"]["lr_schedule"] == "cosine"
    assert {"val_rmse", "val_raw_rmse"} <= set(result["val"])  # the average and the raw weights, same run
    assert result["val"]["val_rmse"] != result["val"]["val_raw_rmse"]
    # evaluate() rebuilds the system from the checkpoint and tests with the weight average, as the run did
    single = evaluate(result["best_checkpoint"], accelerator="cpu")
    assert single["test_rmse"] == pytest.approx(result["test"]["test_rmse"], rel=1e-5)
