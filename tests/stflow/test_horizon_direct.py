"""Direct multi-step heads (``--horizon H --horizon-mode direct``): shapes, the H targets of a sample against the raw
file, the loss over the steps, per-step metrics recomputed with numpy from ``stflow.predict``'s file, the checkpoint
through ``stflow.evaluate`` and ``stflow.export``, and horizon 1 unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from stflow import evaluate, predict, train
from stflow.data import (
    CrowdFlowDataModule,
    DirectHorizonDataModule,
    external_features,
    read_flow_file,
    read_holidays,
    read_meteorology,
)
from stflow.models import build_model, direct_models, supports_direct
from stflow.safeload import safe_load
from stflow.system import ForecastingSystem
from stflow.train import CHECKPOINT_HORIZON_KEY, TrainConfig, build_datamodule, model_options

H = 3
DATA = dict(grid_shape=(4, 4), ext_dim=33, len_closeness=4, len_period=2, len_trend=0, slots_per_day=24)


def _batch(b: int, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ext_target = torch.rand(b, 33, generator=g) if steps == 1 else torch.rand(b, steps, 33, generator=g)
    ext_target[..., :7] = torch.nn.functional.one_hot(torch.arange(b * steps).reshape(ext_target.shape[:-1]) % 7, 7)
    return {"closeness": torch.rand(b, 4, 2, 4, 4, generator=g) * 2 - 1,
            "period": torch.rand(b, 2, 2, 4, 4, generator=g) * 2 - 1, "trend": torch.zeros(b, 0, 2, 4, 4),
            "ext_closeness": torch.rand(b, 4, 33, generator=g), "ext_period": torch.rand(b, 2, 33, generator=g),
            "ext_trend": torch.zeros(b, 0, 33), "ext_target": ext_target, "index": torch.arange(b)}


def _raw(city: Path):
    return read_flow_file(next(city.glob("SYN_M*_T60_InOut.h5")), 24)


# ------------------------------------------------------------------------------------------------ models
@pytest.mark.parametrize("name", ["acfm_bikenyc", "acfm_taxibj", "stresnet", "stresnet_taxibj", "deepstn", "stid"])
def test_direct_head_shapes_and_horizon_one_unchanged(name: str) -> None:
    assert supports_direct(name) and name in direct_models()
    torch.manual_seed(0)
    model = build_model(name, **DATA, horizon=H).eval()
    assert model.horizon == H
    with torch.no_grad():
        out = model(_batch(5, H))
    assert out.shape == (5, H, 2, 4, 4) and out.abs().max() <= 1
    with pytest.raises(ValueError, match=rf"ext_target of shape \(B, {H}, 33\)"):
        model(_batch(5, 1))
    # horizon=1 is today's network: same parameters drawn in the same order, same output
    torch.manual_seed(1)
    plain = build_model(name, **DATA).eval()
    torch.manual_seed(1)
    one = build_model(name, **DATA, horizon=1).eval()
    assert plain.state_dict().keys() == one.state_dict().keys()
    assert all(torch.equal(v, one.state_dict()[k]) for k, v in plain.state_dict().items())
    with torch.no_grad():
        assert torch.equal(plain(_batch(3, 1)), one(_batch(3, 1)))
        assert plain(_batch(3, 1)).shape == (3, 2, 4, 4)


def test_stresnet_steps_use_their_own_target_vector() -> None:
    """ST-ResNet's external component is applied per step: changing step 2's vector moves step 2 only."""
    torch.manual_seed(0)
    model = build_model("stresnet", **DATA, horizon=H).eval()
    batch = _batch(4, H)
    other = {**batch, "ext_target": batch["ext_target"].clone()}
    other["ext_target"][:, 1] = torch.rand(4, 33)
    with torch.no_grad():
        a, b = model(batch), model(other)
    assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2]) and not torch.equal(a[:, 1], b[:, 1])


def test_impossible_combinations_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="horizon must be an integer >= 1"):
        build_model("stresnet", **DATA, horizon=0)
    with pytest.raises(ValueError, match="unknown option"):
        build_model("acfm_reference_bikenyc", **DATA, horizon=2)
    with pytest.raises(ValueError, match="unknown option"):
        build_model("persistence", **DATA, horizon=2)
    with pytest.raises(ValueError, match="horizon must be >= 1"):
        TrainConfig(horizon=0).validate()
    for name in ("persistence", "historical_average", "acfm_reference_bikenyc"):
        with pytest.raises(ValueError, match=f"{name} has no direct multi-step head.*--horizon-mode recursive"):
            TrainConfig(model=name, horizon=3, horizon_mode="direct").validate()
    with pytest.raises(ValueError, match="not model_kwargs.horizon"):
        TrainConfig(model="stresnet", model_kwargs={"horizon": 3}).validate()
    with pytest.raises(ValueError, match="unknown horizon_mode"):
        TrainConfig(horizon_mode="both").validate()  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs horizon >= 2"):
        DirectHorizonDataModule(horizon=1)


def test_mode_resolution_and_horizon_one_config() -> None:
    assert TrainConfig(model="stresnet", horizon=3).validate().direct  # auto: direct where the model can
    assert not TrainConfig(model="persistence", horizon=3).validate().direct  # auto: rollout for the baselines
    assert not TrainConfig(model="stresnet", horizon=3, horizon_mode="recursive").validate().direct
    one = TrainConfig(model="stresnet", horizon=1, horizon_mode="direct").validate()
    assert not one.direct and "horizon" not in model_options(one)
    assert type(build_datamodule(one)) is CrowdFlowDataModule
    assert model_options(TrainConfig(model="stresnet", horizon=3))["horizon"] == 3


# ------------------------------------------------------------------------------------------------ data
def test_direct_targets_are_the_raw_frames_t_to_t_plus_h(tiny_city: Path) -> None:
    dm = DirectHorizonDataModule(dataset="synthetic", data_dir=str(tiny_city), test_days=2, horizon=H)
    dm.setup("fit")
    raw = _raw(tiny_city)
    holidays = read_holidays(tiny_city / "SYN_Holiday.txt")
    weather = read_meteorology(tiny_city / "SYN_Meteorology.h5", 24)
    train_mask = np.asarray(raw.timestamps < dm.timestamps[dm.data.windows.target[dm.data.n_train]])
    lo, hi = float(raw.data[train_mask].min()), float(raw.data[train_mask].max())
    n = len(raw.data)
    test = dm.test_dataset
    assert len(test) == 48 - (H - 1)  # test targets whose H targets all lie in the 2 test days
    for name, split in (("train", dm.train_dataset), ("val", dm.val_dataset), ("test", test)):
        base = split.base.windows.target
        for i in (0, len(split) // 2, len(split) - 1):
            item = split[i]
            row = raw.timestamps.get_loc(dm.timestamps[int(item["index"])])
            want = 2 * (raw.data[row:row + H] - lo) / (hi - lo) - 1  # (H, 2, 4, 4) frames t .. t+H-1, scaled
            np.testing.assert_allclose(item["target"].numpy(), want, atol=1e-6, err_msg=f"{name} item {i}")
            stamps = raw.timestamps[row:row + H]
            assert (np.diff(stamps.asi8) == 3600 * 10**9).all()
            vectors = external_features(stamps, "acfm", 24, holidays=holidays, meteorology=weather,
                                        previous_slot=True)  # each target slot's vector
            np.testing.assert_allclose(item["ext_target"].numpy(), vectors, atol=1e-6)
            assert item["closeness"].shape == (4, 2, 4, 4)
        # no step of a sample lies after its split's last target (no leak into validation / test)
        assert int(split.windows.target[-1]) + H - 1 <= int(base[-1])
    assert int(test.windows.target[0]) == n - 48 and int(test.windows.target[-1]) == n - H


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def trained(tiny_city: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("direct") / "run"
    return train.main(["--model", "stresnet", "--data-dir", str(tiny_city), "--test-days", "2", "--epochs", "2",
                       "--batch-size", "32", "--no-progress-bar", "--out-dir", str(out), "--horizon", str(H),
                       "--json"])


def test_loss_is_the_mean_over_steps_and_training_lowers_it(tiny_city: Path) -> None:
    dm = DirectHorizonDataModule(dataset="synthetic", data_dir=str(tiny_city), test_days=2, horizon=H, batch_size=32,
                                 shuffle_train=False)
    dm.setup("fit")
    torch.manual_seed(0)
    system = ForecastingSystem.from_datamodule("stresnet", dm, model_kwargs={"horizon": H}, lr=1e-3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["target"].shape == (32, H, 2, 4, 4) and batch["ext_target"].shape == (32, H, dm.ext_dim)
    pred = system.model(batch).detach().requires_grad_(True)
    loss = system.step_loss(pred, batch["target"])
    err = (pred.detach().numpy() - batch["target"].numpy()).astype(np.float64)
    per_step = (err**2).mean(axis=(0, 2, 3, 4))  # (H,)
    assert float(loss.detach()) == pytest.approx(per_step.mean(), rel=1e-5)
    loss.backward()  # every step pulls on the network with equal weight
    np.testing.assert_allclose(pred.grad.numpy(), 2 * err / err.size, rtol=1e-4, atol=1e-9)

    optimizer = torch.optim.Adam(system.model.parameters(), lr=1e-3)
    system.model.train()
    before = float(system.step_loss(system.model(batch), batch["target"]))
    for _ in range(15):
        optimizer.zero_grad()
        system.step_loss(system.model(batch), batch["target"]).backward()
        optimizer.step()
    after = float(system.step_loss(system.model(batch), batch["target"]))
    assert after < 0.7 * before, (before, after)


def test_per_step_metrics_recomputed_from_predictions(trained: dict, tiny_city: Path, tmp_path: Path) -> None:
    test = trained["test"]
    assert trained["horizon"] == H and trained["horizon_mode"] == "direct"
    assert test["test_samples"] == 48 - (H - 1)
    out = predict.main(["--checkpoint", trained["best_checkpoint"], "--out", str(tmp_path / "f.npz"), "--json"])
    assert out["slots"] == 48 - (H - 1) and out["steps"] == H  # default: the test slots evaluate scores
    saved = np.load(tmp_path / "f.npz")
    flows = saved["flows"]  # (46, H, 2, 4, 4): one H-step forecast from each of those test slots
    assert flows.shape == (48 - (H - 1), H, 2, 4, 4)
    raw = _raw(tiny_city)
    first = raw.timestamps.get_indexer(pd.DatetimeIndex(saved["timestamps"]))
    assert (first == np.arange(len(raw.data) - 48, len(raw.data) - (H - 1))).all()
    assert list(saved["target_timestamps"][0]) == [str(raw.timestamps[first[0] + k])[:16].replace(" ", "T")
                                                    for k in range(H)]
    origins = first  # their H targets lie in the test period
    active = (raw.data != 0).any(axis=(0, 1))
    factor = np.sqrt(active.size / active.sum())
    result = evaluate.evaluate(trained["best_checkpoint"])  # default: the head's H steps
    assert result["mode"] == "direct" and result["horizon"] == H and result["test_samples"] == len(origins)
    means = []
    for k in range(H):
        err = flows[: len(origins), k] - raw.data[origins + k]
        rmse = np.sqrt((err**2).mean()) * factor
        mae = np.abs(err[:, :, active]).mean()
        means.append(rmse)
        assert result["steps"][k]["rmse"] == pytest.approx(rmse, rel=1e-5), k
        assert result["steps"][k]["mae"] == pytest.approx(mae, rel=1e-5), k
        assert result[f"test_rmse_step{k + 1}"] == result["steps"][k]["rmse"]
        assert test[f"test_rmse_step{k + 1}"] == pytest.approx(rmse, rel=1e-5), k  # the Lightning test loop
        inflow = np.sqrt((err[:, 0] ** 2).mean()) * factor
        assert test[f"test_rmse_inflow_step{k + 1}"] == pytest.approx(inflow, rel=1e-5), k
    assert test["test_rmse"] == pytest.approx(means[0], rel=1e-5)  # step 1 keeps today's name
    assert test["test_rmse_mean"] == pytest.approx(np.mean(means), rel=1e-5)
    assert result["test_rmse"] == result["test_rmse_mean"] == pytest.approx(np.mean(means), rel=1e-5)
    for step, ours in zip(trained["test_horizon"]["steps"], result["steps"]):
        assert step["rmse"] == pytest.approx(ours["rmse"], rel=1e-9)

    predict.main(["--checkpoint", trained["best_checkpoint"], "--out", str(tmp_path / "f.csv"),
                  "--start", "2015-03-17 05:00"])
    csv = pd.read_csv(tmp_path / "f.csv")
    assert list(csv.columns) == ["timestamp", "step", "row", "col", "inflow", "outflow"] and len(csv) == H * 16
    cell = csv[(csv.step == 2) & (csv.row == 1) & (csv.col == 3)].iloc[0]
    row = list(pd.DatetimeIndex(saved["timestamps"])).index(pd.Timestamp("2015-03-17 05:00"))
    assert cell.timestamp == "2015-03-17 06:00"
    assert cell.inflow == pytest.approx(flows[row, 1, 0, 1, 3], abs=1e-4)


def test_checkpoint_round_trip(trained: dict, tmp_path: Path) -> None:
    raw = safe_load(Path(trained["best_checkpoint"]))
    assert raw["hyper_parameters"]["model_kwargs"]["horizon"] == H
    assert raw[CHECKPOINT_HORIZON_KEY] == {"horizon": H, "mode": "direct"}
    full = evaluate.evaluate(trained["best_checkpoint"], horizon=H)
    two = evaluate.evaluate(trained["best_checkpoint"], horizon=2)  # the head's first two steps, same origins
    assert two["test_samples"] == full["test_samples"]
    assert [s["rmse"] for s in two["steps"]] == pytest.approx([s["rmse"] for s in full["steps"][:2]], rel=1e-9)
    with pytest.raises(ValueError, match=f"direct head of {H} steps: --horizon must be <= {H}"):
        evaluate.evaluate(trained["best_checkpoint"], horizon=H + 1)
    cli = evaluate.main(["--checkpoint", trained["best_checkpoint"], "--json"])
    assert cli["mode"] == "direct" and len(cli["steps"]) == H
    assert "horizon 3 (direct)" in evaluate.format_result(cli)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_direct_head(fmt: str, trained: dict, tmp_path: Path) -> None:
    from stflow import export

    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"m.{'pt' if fmt == 'torchscript' else 'onnx'}"
    sidecar = export.main(["--checkpoint", trained["best_checkpoint"], "--format", fmt, "--out", str(out),
                           "--check", "false"])
    assert sidecar["inputs"]["ext_target"] == ["batch", H, 53]  # the synthetic city's vector: calendar, weather
    assert sidecar["output"]["prediction"] == ["batch", H, 2, 4, 4]
    model, keywords, _ = export.load_for_export(trained["best_checkpoint"])
    assert export.check_export(out, fmt, model, keywords, batch=3) < 1e-4  # batch 3: the batch axis is dynamic


def test_horizon_one_run_has_no_direct_head(tiny_city: Path, tmp_path: Path) -> None:
    result = train.main(["--model", "stresnet", "--data-dir", str(tiny_city), "--test-days", "2", "--epochs", "1",
                         "--batch-size", "32", "--no-progress-bar", "--out-dir", str(tmp_path / "run"),
                         "--horizon-mode", "direct", "--json"])
    raw = safe_load(Path(result["best_checkpoint"]))
    assert "horizon" not in raw["hyper_parameters"]["model_kwargs"] and CHECKPOINT_HORIZON_KEY not in raw
    assert "horizon" not in result and "test_horizon" not in result
    assert not any("_step" in k or k.endswith("_mean") for k in result["test"])
    assert result["test"]["test_samples"] == 48
    assert evaluate.evaluate(result["best_checkpoint"])["test_rmse"] == pytest.approx(result["test"]["test_rmse"])
