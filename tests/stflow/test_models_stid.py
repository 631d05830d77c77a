"""STID: shapes, a hand count of its parameters, the time embeddings read from ext_target, training on the
synthetic city, state-dict and CLI checkpoint round trips."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from stflow import train
from stflow.data import CrowdFlowDataModule
from stflow.evaluate import evaluate
from stflow.models import STID, build_model

KW = dict(grid_shape=(4, 4), ext_dim=33, len_closeness=2, len_period=1, len_trend=0, slots_per_day=24)
SMALL = dict(embed_dim=4, node_dim=3, tod_dim=2, dow_dim=2, layers=2, dropout=0.0)


def _ext(weekday: list[int], slot: list[int], d: int = 33) -> torch.Tensor:
    """The features='acfm' layout: weekday one-hot (7) | working-day flag | slot one-hot (24) | day flag."""
    ext = torch.zeros(len(weekday), d)
    ext[torch.arange(len(weekday)), torch.tensor(weekday)] = 1
    ext[:, 7] = torch.tensor([float(w < 5) for w in weekday])
    ext[torch.arange(len(slot)), 8 + torch.tensor(slot)] = 1
    return ext


def _batch(b: int = 3) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"closeness": torch.rand(b, 2, 2, 4, 4, generator=g) * 2 - 1,
            "period": torch.rand(b, 1, 2, 4, 4, generator=g) * 2 - 1, "trend": torch.zeros(b, 0, 2, 4, 4),
            "ext_target": _ext([i % 7 for i in range(b)], [(5 * i) % 24 for i in range(b)])}


def test_shapes_and_range() -> None:
    model = build_model("stid", **KW, **SMALL)
    out = model(_batch())
    assert out.shape == (3, 2, 4, 4) and out.abs().max() < 1
    with pytest.raises(ValueError, match=r"expects period of shape \(B, 1, 2, 4, 4\)"):
        model({**_batch(), "period": torch.rand(3, 2, 2, 4, 4)})


def test_parameter_count_by_hand() -> None:
    hidden = 4 + 3 + 2 + 2  # embed | node | time of day | day of week
    expected = (
        (2 + 1) * 2 * 4 + 4  # history: Linear(2 * (lc + lp) -> embed_dim)
        + 16 * 3  # one node_dim vector per cell of the 4x4 grid
        + 24 * 2 + 7 * 2  # time-of-day (24 slots) and day-of-week tables
        + 2 * 2 * (hidden * hidden + hidden)  # 2 residual blocks of two Linear(hidden -> hidden)
        + hidden * 2 + 2  # head Linear(hidden -> 2)
    )
    assert expected == 690
    assert sum(p.numel() for p in build_model("stid", **KW, **SMALL).parameters()) == expected
    # BikeNYC defaults: 32-dim embeddings (hidden 128), 3 blocks, 16x8 grid, lc/lp = 4/2.
    default = (6 * 2 * 32 + 32) + 128 * 32 + 24 * 32 + 7 * 32 + 3 * 2 * (128 * 128 + 128) + (128 * 2 + 2)
    big = build_model("stid", grid_shape=(16, 8), ext_dim=33, len_closeness=4, len_period=2, len_trend=0,
                      slots_per_day=24)
    assert sum(p.numel() for p in big.parameters()) == default == 104_834
    no_time = build_model("stid", **KW, **{**SMALL, "time_embeddings": False})
    assert sum(p.numel() for p in no_time.parameters()) == (6 * 4 + 4) + 48 + 2 * 2 * (7 * 7 + 7) + (7 * 2 + 2)


def test_time_embeddings_follow_the_target_slot_and_weekday() -> None:
    torch.manual_seed(0)
    model = build_model("stid", **KW, **SMALL).eval()
    batch = _batch(2)
    base = model(batch)
    other_day_flag = batch["ext_target"].clone()
    other_day_flag[:, -1] = 1 - other_day_flag[:, -1]  # the 06-18 h flag is not read
    assert torch.equal(model({**batch, "ext_target": other_day_flag}), base)
    # the batch's targets: (Monday, slot 0) and (Tuesday, slot 5); change one sample's slot or weekday only
    for weekday, slot in (([0, 1], [7, 5]), ([3, 1], [0, 5])):
        changed = model({**batch, "ext_target": _ext(weekday, slot)})
        assert not torch.allclose(changed[0], base[0]) and torch.equal(changed[1], base[1])
    # the lookup is exactly the table rows: zeroing Tuesday's day-of-week row changes only sample 1
    with torch.no_grad():
        model.day_of_week[1] = 0
    changed = model(batch)
    assert torch.equal(changed[0], base[0]) and not torch.allclose(changed[1], base[1])


def test_norms_and_features_are_checked() -> None:
    with pytest.raises(ValueError, match="stid has no norm layers"):
        build_model("stid", **KW, norm="bn")
    assert isinstance(build_model("stid", **KW, norm="none"), STID)
    with pytest.raises(ValueError, match="features='acfm'"):
        build_model("stid", **{**KW, "ext_dim": 8})
    assert build_model("stid", **{**KW, "ext_dim": 0}, time_embeddings=False)(_batch()).shape == (3, 2, 4, 4)


def test_adam_steps_lower_the_loss_on_the_synthetic_city(tiny_city: Path) -> None:
    dm = CrowdFlowDataModule(dataset="synthetic", data_dir=str(tiny_city), len_closeness=4, len_period=2,
                             batch_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    # the synthetic city has meteorology and holidays too (53 dims); the acfm layout starts the same way
    assert dm.slots_per_day == 24 and dm.ext_dim == 53
    ext = batch["ext_target"]
    ones = torch.ones(len(ext))
    assert torch.equal(ext[:, 0:7].sum(1), ones) and torch.equal(ext[:, 8:32].sum(1), ones)  # weekday, slot
    torch.manual_seed(0)
    model = build_model("stid", grid_shape=dm.grid_shape, ext_dim=dm.ext_dim, len_closeness=4, len_period=2,
                        len_trend=0, slots_per_day=dm.slots_per_day)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(batch), batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * losses[0], losses


def test_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = build_model("stid", **KW, **SMALL)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = build_model("stid", **KW, **SMALL)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval(), clone.eval()
    assert torch.equal(model(_batch()), clone(_batch()))


def test_train_cli_and_evaluate_round_trip(tiny_city: Path, tmp_path: Path) -> None:
    out = tmp_path / "stid"
    result = train.main(["--model", "stid", "--data-dir", str(tiny_city), "--test-days", "2", "--batch-size", "32",
                         "--epochs", "1", "--limit-train-batches", "2", "--no-progress-bar", "--out-dir", str(out),
                         "--json"])
    assert result["model"] == "stid" and np.isfinite(result["test"]["test_rmse"])
    single = evaluate(result["last_checkpoint"], accelerator="cpu")
    for key in ("test_rmse", "test_rmse_inflow", "test_rmse_outflow", "test_mae", "test_samples"):
        assert single[key] == pytest.approx(result["test"][key], rel=1e-5), key
