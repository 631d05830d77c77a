"""ForecastingSystem: the reference lr steps, rebuild-by-name from hparams, argument and scaler checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stflow.system import REFERENCE_LR_MILESTONES, ForecastingSystem, StepSchedule

KW = dict(grid_shape=(4, 4), ext_dim=5, len_closeness=2, len_period=1, len_trend=0, slots_per_day=24)


def test_reference_lr_steps_through_lambda_lr() -> None:
    system = ForecastingSystem("acfm_bikenyc", 0.0, 10.0, model_kwargs=KW)
    opt = system.configure_optimizers()
    scheduler = opt["lr_scheduler"]["scheduler"]
    seen = {}
    for epoch in range(460):
        seen[epoch] = opt["optimizer"].param_groups[0]["lr"]
        scheduler.step()
    expected = {
        0: 3e-4,
        49: 3e-4,
        50: 2e-4,
        149: 2e-4,
        150: 1e-4,
        250: 5e-5,
        350: 2e-5,
        449: 2e-5,
        450: 1e-5,
        459: 1e-5,
    }
    for epoch, lr in expected.items():
        assert seen[epoch] == pytest.approx(lr), epoch
    assert StepSchedule(3e-4, REFERENCE_LR_MILESTONES)(500) == pytest.approx(1e-5 / 3e-4)


def test_hparams_rebuild_the_same_model() -> None:
    torch.manual_seed(0)
    system = ForecastingSystem("stresnet", -1.0, 5.0, metric_factor=1.2, model_kwargs=KW, num_slots=10)
    clone = ForecastingSystem(**system.hparams)
    clone.load_state_dict(system.state_dict())
    batch = {
        "closeness": torch.rand(3, 2, 2, 4, 4),
        "period": torch.rand(3, 1, 2, 4, 4),
        "trend": torch.rand(3, 0, 2, 4, 4),
        "ext_closeness": torch.rand(3, 2, 5),
        "ext_period": torch.rand(3, 1, 5),
        "ext_trend": torch.rand(3, 0, 5),
        "ext_target": torch.rand(3, 5),
    }
    system.eval(), clone.eval()
    assert torch.equal(system(batch), clone(batch))
    assert system.hparams.model == "stresnet" and system.scale == 3.0


def test_baselines_have_no_optimizer() -> None:
    system = ForecastingSystem("persistence", 0.0, 1.0, model_kwargs=KW)
    assert not system.trainable and not system.automatic_optimization
    assert system.configure_optimizers() is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(scaler_min=3.0, scaler_max=3.0), "scaler needs finite min < max"),
        (dict(loss="huber"), "unknown loss 'huber'"),
        (dict(lr=-1.0), "lr must be positive"),
        (dict(lr_milestones={-5: 1e-4}), "needs epoch >= 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = dict(model="persistence", scaler_min=0.0, scaler_max=1.0, model_kwargs=KW) | kwargs
    with pytest.raises(ValueError, match=match):
        ForecastingSystem(**args)


def test_unknown_model_name() -> None:
    with pytest.raises(KeyError, match="unknown model 'nope'; registered models: .*historical_average"):
        ForecastingSystem("nope", 0.0, 1.0, model_kwargs=KW)


def test_scaler_mismatch_with_data_module_is_refused() -> None:
    system = ForecastingSystem("persistence", 0.0, 267.0, model_kwargs=KW)
    dm = SimpleNamespace(scaler=SimpleNamespace(min=0.0, max=239.0))
    with pytest.raises(
        ValueError, match=r"scales with min/max \(0.0, 239.0\) but the system was built for \(0.0, 267.0\)"
    ):
        system._check_scaler(dm)
