"""FlowMetrics against numpy recomputations of the acfm.md protocol (global RMSE, channels, MAE, factor, DDP)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stflow.metrics import FlowMetrics, protocol_metrics

SCALE = 267.0 / 2  # BikeNYC: min 0, max 267
FACTOR = math.sqrt(128 / 81)


def _data(n: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 2, 16, 8, generator=g) * 2 - 1
    pred = target + 0.05 * torch.randn(n, 2, 16, 8, generator=g)
    # Error magnitudes differ a lot between samples, so per-batch averaging differs from the global value.
    pred[n // 2 :] += 0.3 * torch.randn(n - n // 2, 2, 16, 8, generator=g)
    active = np.zeros((16, 8), dtype=bool)
    active.reshape(-1)[np.random.default_rng(seed).permutation(128)[:81]] = True
    return pred, target, active


def _numpy_protocol(pred: np.ndarray, target: np.ndarray, active: np.ndarray) -> dict[str, float]:
    err = (pred.astype(np.float64) - target.astype(np.float64)) * SCALE  # original units
    return {
        "rmse": math.sqrt(np.sum(err**2) / (err.shape[0] * 2 * 81)),  # = RMSE_all * sqrt(128/81)
        "rmse_inflow": math.sqrt(np.mean(err[:, 0] ** 2)) * FACTOR,
        "rmse_outflow": math.sqrt(np.mean(err[:, 1] ** 2)) * FACTOR,
        "mae": float(np.mean(np.abs(err[:, :, active]))),
        "mae_all": float(np.mean(np.abs(err))),
    }


def test_global_metrics_match_numpy_and_differ_from_per_batch_average() -> None:
    pred, target, active = _data(10)
    metric = FlowMetrics(num_slots=50, scale=SCALE, metric_factor=FACTOR, active_mask=torch.from_numpy(active))
    index = torch.arange(20, 30)
    per_batch_rmse = []
    for rows in (slice(0, 3), slice(3, 7), slice(7, 10)):  # uneven batches
        metric.update(pred[rows], target[rows], index[rows])
        err = (pred[rows] - target[rows]).double() * SCALE
        per_batch_rmse.append(float(err.square().mean().sqrt()) * FACTOR)
    got = {k: float(v) for k, v in metric.compute().items()}
    want = _numpy_protocol(pred.numpy(), target.numpy(), active)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12), key
    assert got["n_samples"] == 10
    wrong = float(np.mean(per_batch_rmse))
    assert abs(wrong - want["rmse"]) > 1e-3 * want["rmse"]  # the per-batch average is a different number
    assert got["mse_scaled"] == pytest.approx(float(((pred.double() - target.double()) ** 2).mean()), rel=1e-12)
    assert got["mae_scaled"] == pytest.approx(float((pred.double() - target.double()).abs().mean()), rel=1e-12)


def test_mae_convention_active_cells_not_factor_squared() -> None:
    """Errors on never-active cells enter RMSE (through the factor rule) but not MAE (mean over active cells)."""
    target = torch.full((4, 2, 16, 8), -1.0, dtype=torch.float64)
    active = torch.zeros(16, 8, dtype=torch.bool)
    active.view(-1)[:81] = True  # 81 active cells
    pred = target.clone()
    pred[:, :, active] += 2.0 / 267  # error of exactly 1 bike on every active cell
    pred[:, :, ~active] += 6.0 / 267  # error of 3 bikes elsewhere
    values = protocol_metrics(pred, target, SCALE, FACTOR, active)
    assert values["mae"] == pytest.approx(1.0, rel=1e-9)
    assert values["mae_all"] == pytest.approx((81 * 1 + 47 * 3) / 128, rel=1e-9)
    assert values["rmse"] == pytest.approx(math.sqrt((81 * 1 + 47 * 9) / 81), rel=1e-9)


def test_sampler_padding_and_process_split_do_not_bias() -> None:
    """Two 'ranks' as a DistributedSampler would split 7 samples (one duplicated as padding); summing their
    states (what dist_reduce_fx='sum' does) gives the single-process numbers."""
    pred, target, active = _data(7, seed=3)
    index = torch.arange(100, 107)
    single = FlowMetrics(200, SCALE, FACTOR, torch.from_numpy(active))
    single.update(pred, target, index)
    order = list(range(7)) + [0]  # padded to 8, sample 0 twice
    ranks = [FlowMetrics(200, SCALE, FACTOR, torch.from_numpy(active)) for _ in range(2)]
    for r, metric in enumerate(ranks):
        rows = torch.tensor(order[r::2])
        metric.update(pred[rows], target[rows], index[rows])
    merged = FlowMetrics(200, SCALE, FACTOR, torch.from_numpy(active))
    merged.update(pred[:1], target[:1], index[:1])  # mark as updated; states overwritten below
    for name in ("sse", "sae", "sae_active", "hits"):
        setattr(merged, name, getattr(ranks[0], name) + getattr(ranks[1], name))
    want = {k: float(v) for k, v in single.compute().items()}
    got = {k: float(v) for k, v in merged.compute().items()}
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key
    # Without the per-slot de-duplication the padded sample would count twice:
    naive = FlowMetrics(200, SCALE, FACTOR)
    naive.update(pred[order], target[order], torch.arange(8))
    assert abs(float(naive.compute()["rmse"]) - want["rmse"]) > 1e-6


def test_bad_inputs_raise() -> None:
    metric = FlowMetrics(5, SCALE)
    x = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="expects pred and target"):
        metric.update(x, torch.zeros(2, 2, 4, 3), torch.arange(2))
    with pytest.raises(IndexError, match="out of range"):
        metric.update(x, x, torch.tensor([0, 5]))
    with pytest.raises(RuntimeError, match="before any update"):
        metric.compute()
    with pytest.raises(ValueError, match="scale"):
        FlowMetrics(5, 0.0)
    with pytest.raises(ValueError, match="active_mask is"):
        FlowMetrics(5, SCALE, active_mask=torch.ones(3, 3, dtype=torch.bool)).update(x, x, torch.arange(2))
