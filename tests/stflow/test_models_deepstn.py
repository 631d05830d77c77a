"""DeepSTN+: shapes, a hand count of its parameters, every norm (BKN chained), training on the synthetic city,
state-dict and CLI checkpoint round trips."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch

from normlayers import BatchKalmanNorm
from stflow import train
from stflow.data import CrowdFlowDataModule
from stflow.evaluate import evaluate
from stflow.models import DeepSTN, DeepSTNConfig, build_model

TINY = dict(grid_shape=(4, 4), ext_dim=5, len_closeness=2, len_period=1, len_trend=1)
TINY_OPTIONS = dict(stem_channels=3, ext_hidden=6, ext_channels=2, filters=8, plus_channels=2, pool_rate=2,
                    res_units=2, dropout=0.0)
KW = dict(**TINY, slots_per_day=24)


def _batch(b: int = 3, lc: int = 2, lp: int = 1, lt: int = 1, hw: tuple[int, int] = (4, 4), d: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    frames = lambda n: torch.rand(b, n, 2, *hw, generator=g) * 2 - 1  # noqa: E731
    return {"closeness": frames(lc), "period": frames(lp), "trend": frames(lt),
            "ext_target": torch.rand(b, d, generator=g)}


def test_shapes_and_range() -> None:
    model = build_model("deepstn", **KW, **TINY_OPTIONS)
    out = model(_batch())
    assert out.shape == (3, 2, 4, 4) and out.abs().max() < 1
    # The default (BikeNYC) network on a 16x8 grid with ACFM's window and 33-dim external vector.
    big = build_model("deepstn", grid_shape=(16, 8), ext_dim=33, len_closeness=4, len_period=2, len_trend=0,
                      slots_per_day=24)
    assert big(_batch(2, 4, 2, 0, (16, 8), 33)).shape == (2, 2, 16, 8)
    with pytest.raises(ValueError, match=r"expects closeness of shape \(B, 2, 2, 4, 4\)"):
        model({**_batch(), "closeness": torch.rand(3, 3, 2, 4, 4)})


def test_parameter_count_by_hand() -> None:
    """Tiny config (grid 4x4, D=5, lc/lp/lt = 2/1/1, S=3, E=2, F=8, Fp=2, pool 2, 2 units), weights + biases:"""
    stems = (4 * 3 + 3) + (2 * 3 + 3) + (2 * 3 + 3)  # 1x1 convs of the three components: 33
    external = (5 * 6 + 6) + (6 * 2 * 16 + 2 * 16)  # Linear(5->6), Linear(6->2*4*4): 260
    fuse = (3 * 3 + 2) * 8 * 9 + 8  # conv3x3(11 -> 8): 800
    unit = (
        2 * 8  # norm1 (BatchNorm affine)
        + 8 * 6 * 9 + 6  # conv1 3x3 (F -> F - Fp)
        + 8 * 2 + 2  # plus_reduce 1x1 (F -> Fp)
        + (2 * 2 * 2) * (2 * 16) + 2 * 16  # plus_dense: Fp * 2 * 2 pooled cells -> Fp * 4 * 4
        + 2 * 8  # norm2
        + 8 * 8 * 9 + 8  # conv2 3x3 (F -> F)
    )  # 1360
    head = 2 * 8 + (8 * 2 * 9 + 2)  # output norm + conv3x3(F -> 2): 162
    expected = stems + external + fuse + 2 * unit + head
    assert expected == 3975
    model = build_model("deepstn", **KW, **TINY_OPTIONS)
    assert sum(p.numel() for p in model.parameters()) == expected
    # BikeNYC defaults (S=32, E=4, F=64, Fp=8, pool 2 -> 8x4, 2 units), lc/lp = 4/2, D=33:
    unit = 2 * 64 + (64 * 56 * 9 + 56) + (64 * 8 + 8) + (8 * 8 * 4 * 1024 + 1024) + 2 * 64 + (64 * 64 * 9 + 64)
    default = (8 * 32 + 32) + (4 * 32 + 32) + (33 * 10 + 10 + 10 * 512 + 512) + (68 * 64 * 9 + 64) + 2 * unit \
        + 2 * 64 + (64 * 2 * 9 + 2)
    big = build_model("deepstn", grid_shape=(16, 8), ext_dim=33, len_closeness=4, len_period=2, len_trend=0,
                      slots_per_day=24)
    assert sum(p.numel() for p in big.parameters()) == default == 713_302


@pytest.mark.parametrize("norm", ["bn", "gn", "bkn", "none"])
def test_every_norm(norm: str) -> None:
    torch.manual_seed(0)
    model = build_model("deepstn", **KW, **TINY_OPTIONS, norm=norm)
    kinds = {type(m).__name__ for m in model.modules()}
    expected = {"bn": "BatchNorm2d", "gn": "GroupNorm", "bkn": "BatchKalmanNorm2d", "none": None}[norm]
    norms = {k for k in kinds if "Norm" in k}
    assert norms == (set() if expected is None else {expected})
    out = model.train()(_batch(4))
    out.mean().backward()
    assert out.shape == (4, 2, 4, 4)
    if norm == "bkn":  # norm1 of every unit and the output norm are chained; norm2 (after a concat) is not
        plan = model.body.kalman_chain.plan
        assert plan["0.norm1"] is None and plan["1.norm1"] is not None and plan["2"] is not None
        assert "0.norm2" not in plan and "1.norm2" not in plan
        # BatchNorm's names are kept: a BN model's state dict loads into the BKN model.
        bn = build_model("deepstn", **KW, **TINY_OPTIONS, norm="bn")
        model.load_state_dict(bn.state_dict())
        assert all(isinstance(m, BatchKalmanNorm) for m in model.modules() if "Norm" in type(m).__name__)
    if norm == "none":
        assert sum(p.numel() for p in model.parameters()) == 3975 - 5 * 2 * 8  # 5 affine norms of 8 channels


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="deepstn: unknown option"):
        build_model("deepstn", **KW, width=3)
    with pytest.raises(ValueError, match="plus_channels < filters"):
        build_model("deepstn", **KW, plus_channels=64)
    with pytest.raises(ValueError, match="unknown norm|norm"):
        build_model("deepstn", **KW, norm="layer")


def test_adam_steps_lower_the_loss_on_the_synthetic_city(tiny_city: Path) -> None:
    dm = CrowdFlowDataModule(dataset="synthetic", data_dir=str(tiny_city), len_closeness=4, len_period=2,
                             batch_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = build_model("deepstn", grid_shape=dm.grid_shape, ext_dim=dm.ext_dim, len_closeness=4, len_period=2,
                        len_trend=0, slots_per_day=dm.slots_per_day, filters=16, plus_channels=4, stem_channels=8)
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
    model = build_model("deepstn", **KW, **TINY_OPTIONS)
    model.train()(_batch(4))  # move the running statistics away from their initial values
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = build_model("deepstn", **KW, **TINY_OPTIONS)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval(), clone.eval()
    assert torch.equal(model(_batch()), clone(_batch()))
    assert isinstance(clone, DeepSTN) and clone.config == DeepSTNConfig(**TINY, **TINY_OPTIONS)


@pytest.mark.parametrize("norm", ["bn", "bkn"])
def test_train_cli_and_evaluate_round_trip(tiny_city: Path, tmp_path: Path, norm: str) -> None:
    out = tmp_path / f"deepstn-{norm}"
    result = train.main(["--model", "deepstn", "--norm", norm, "--data-dir", str(tiny_city), "--test-days", "2",
                         "--batch-size", "32", "--epochs", "1", "--limit-train-batches", "2", "--no-progress-bar",
                         "--model-kwargs", '{"filters": 16, "plus_channels": 4}', "--out-dir", str(out), "--json"])
    assert result["model"] == "deepstn" and np.isfinite(result["test"]["test_rmse"])
    single = evaluate(result["last_checkpoint"], accelerator="cpu")
    for key in ("test_rmse", "test_rmse_inflow", "test_rmse_outflow", "test_mae", "test_samples"):
        assert single[key] == pytest.approx(result["test"][key], rel=1e-5), key
