"""Historical average (recomputed with numpy), persistence, ST-ResNet shapes and the registry."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from stflow.models import HistoricalAverage, STResNet, STResNetConfig, build_model, list_models

DATA = dict(grid_shape=(3, 2), ext_dim=4, len_closeness=2, len_period=1, len_trend=1, slots_per_day=4)


class _Scaler:
    """Min-max to [-1, 1] (the data module's convention)."""

    def __init__(self, lo: float, hi: float) -> None:
        self.min, self.max = lo, hi

    def transform(self, x):
        return 2.0 * (x - self.min) / (self.max - self.min) - 1.0


def _history(days: int = 15, slots: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    timestamps = pd.date_range("2021-03-01", periods=days * slots, freq=f"{24 // slots}h")  # 2021-03-01 is a Monday
    flows = rng.poisson(20, size=(len(timestamps), 2, 3, 2)).astype(np.float64)
    return flows, timestamps


def test_historical_average_matches_numpy():
    flows, timestamps = _history()
    n = len(flows)
    train = np.zeros(n, dtype=bool)
    train[: 10 * 4] = True  # 10 training days: Mon..Wed twice, Thu..Sun once
    train[1] = False  # the first Monday 06:00 slot held out -> that key averages the other Monday only
    scaler = _Scaler(0.0, 50.0)
    model = build_model("historical_average", **DATA)
    assert model.trainable is False and not list(model.parameters())
    model.fit_history(flows, timestamps, train, scaler)

    test_index = np.arange(10 * 4, n)
    pred = model({"index": torch.from_numpy(test_index)}).numpy()
    expected = []
    for t in test_index:  # independent recomputation
        same = [
            i
            for i in range(n)
            if train[i]
            and timestamps[i].weekday() == timestamps[t].weekday()
            and timestamps[i].hour == timestamps[t].hour
        ]
        expected.append(scaler.transform(np.mean([flows[i] for i in same], axis=0)))
    np.testing.assert_allclose(pred, np.array(expected), rtol=1e-6, atol=1e-6)
    # The held-out Monday 06:00: the target on day 14 (a Monday) uses only day 7's value.
    monday_0600 = 14 * 4 + 1
    np.testing.assert_allclose(pred[monday_0600 - 40], scaler.transform(flows[7 * 4 + 1]), rtol=1e-6)


def test_historical_average_fallback_and_state_roundtrip():
    flows, timestamps = _history(days=8)
    train = np.zeros(len(flows), dtype=bool)
    train[:8] = True  # only Monday and Tuesday are history
    model = HistoricalAverage(4, (2, 3, 2))
    model.fit_history(flows, timestamps, train, _Scaler(0.0, 50.0))
    wednesday_0000 = 2 * 4
    slot0 = flows[[0, 4]].mean(axis=0)  # no Wednesday in history -> mean of slot 0 over all training days
    np.testing.assert_allclose(
        model({"index": torch.tensor([wednesday_0000])})[0].numpy(), _Scaler(0.0, 50.0).transform(slot0), rtol=1e-6
    )
    clone = HistoricalAverage(4, (2, 3, 2))
    clone.load_state_dict(model.state_dict())
    index = torch.arange(len(flows))
    torch.testing.assert_close(clone({"index": index}), model({"index": index}))


def test_historical_average_bad_input():
    flows, timestamps = _history(days=2)
    model = HistoricalAverage(4, (2, 3, 2))
    with pytest.raises(RuntimeError, match="not fitted"):
        model({"index": torch.tensor([0])})
    with pytest.raises(ValueError, match="selects no slot"):
        model.fit_history(flows, timestamps, np.zeros(len(flows), dtype=bool), _Scaler(0, 1))
    with pytest.raises(ValueError, match="disagree"):
        model.fit_history(flows, timestamps[:-1], np.ones(len(flows), dtype=bool), _Scaler(0, 1))
    bad = flows.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        model.fit_history(bad, timestamps, np.ones(len(flows), dtype=bool), _Scaler(0, 1))
    model.fit_history(flows, timestamps, np.ones(len(flows), dtype=bool), _Scaler(0, 1))
    with pytest.raises(IndexError, match="out of range"):
        model({"index": torch.tensor([len(flows)])})


def test_persistence():
    closeness = torch.randn(3, 2, 2, 3, 2)
    trend = torch.randn(3, 1, 2, 3, 2)
    last = build_model("persistence", **DATA)
    assert last.trainable is False and not list(last.parameters())
    assert torch.equal(last({"closeness": closeness}), closeness[:, 0])
    week = build_model("persistence", **DATA, mode="week")
    assert torch.equal(week({"closeness": closeness, "trend": trend}), trend[:, 0])
    with pytest.raises(ValueError, match="needs len_trend >= 1"):
        build_model("persistence", **{**DATA, "len_trend": 0}, mode="week")
    with pytest.raises(ValueError, match="unknown option"):
        build_model("persistence", **DATA, horizon=2)


@pytest.mark.parametrize("preset, name", [("bikenyc", "stresnet"), ("taxibj", "stresnet_taxibj")])
def test_stresnet_presets_forward_shapes(preset, name):
    cfg = STResNetConfig.preset(preset, ext_dim=8)
    model = build_model(
        name,
        grid_shape=cfg.grid_shape,
        ext_dim=8,
        len_closeness=cfg.len_closeness,
        len_period=cfg.len_period,
        len_trend=cfg.len_trend,
        slots_per_day=24,
    )
    assert isinstance(model, STResNet) and model.config.res_units == cfg.res_units
    h, w = cfg.grid_shape
    n = 2 if preset == "bikenyc" else 1  # keep the 32x32, 12-unit model cheap
    batch = {
        "closeness": torch.randn(n, cfg.len_closeness, 2, h, w),
        "period": torch.randn(n, cfg.len_period, 2, h, w),
        "trend": torch.randn(n, cfg.len_trend, 2, h, w),
        "ext_target": torch.rand(n, 8),
    }
    out = model(batch)
    assert out.shape == (n, 2, h, w) and out.abs().max() < 1
    if preset == "bikenyc":
        out.pow(2).mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_stresnet_norm_layer_and_validation():
    cfg = STResNetConfig(grid_shape=(4, 3), ext_dim=0, len_closeness=2, len_period=0, len_trend=0, res_units=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in STResNet(cfg).modules())  # DeepST: no normalisation
    model = STResNet(cfg, norm_layer=nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    assert list(model.components) == ["closeness"]
    with pytest.raises(ValueError, match=r"closeness of shape \(B, 2, 2, 4, 3\)"):
        model({"closeness": torch.randn(1, 3, 2, 4, 3)})
    with pytest.raises(ValueError, match="at least one frame"):
        STResNetConfig(len_closeness=0, len_period=0, len_trend=0)


def test_registry():
    names = list_models()
    for required in (
        "acfm_bikenyc",
        "acfm_taxibj",
        "acfm_reference_bikenyc",
        "acfm_reference_taxibj",
        "historical_average",
        "persistence",
        "stresnet",
    ):
        assert required in names
    with pytest.raises(KeyError, match="unknown model 'acfm'; registered models: acfm_bikenyc"):
        build_model("acfm", **DATA)
    with pytest.raises(TypeError, match="slots_per_day"):
        build_model("persistence", grid_shape=(3, 2), ext_dim=0, len_closeness=1, len_period=0, len_trend=0)


def test_naive_baselines_reproduce_bikenyc_readme_figures(bikenyc_dir):
    """../shared/data/README.md: HA 8.64, repeat last hour 11.76, same hour last week 10.66 (RMSE, 81 cells)."""
    data = pytest.importorskip("stflow.data")
    dm = data.CrowdFlowDataModule(
        dataset="bikenyc",
        data_dir=str(bikenyc_dir),
        len_closeness=1,
        len_period=0,
        len_trend=1,
        val_fraction=0.0,
        batch_size=512,
        shuffle_train=False,
    )
    dm.setup("test")
    (batch,) = list(dm.test_dataloader())
    assert len(batch["target"]) == 240
    keywords = dict(
        grid_shape=dm.grid_shape,
        ext_dim=dm.ext_dim,
        len_closeness=1,
        len_period=0,
        len_trend=1,
        slots_per_day=dm.slots_per_day,
    )

    def rmse(model) -> float:
        err = (model(batch) - batch["target"]).double().numpy() * (dm.scaler.max - dm.scaler.min) / 2
        return float(np.sqrt(np.mean(err**2)) * dm.metric_factor)

    ha = build_model("historical_average", **keywords)
    ha.fit_history(dm.flows, dm.timestamps, dm.train_slot_mask, dm.scaler)  # history = every pre-test slot
    assert rmse(ha) == pytest.approx(8.64, abs=0.01)
    assert rmse(build_model("persistence", **keywords)) == pytest.approx(11.76, abs=0.01)
    assert rmse(build_model("persistence", **keywords, mode="week")) == pytest.approx(10.66, abs=0.01)
