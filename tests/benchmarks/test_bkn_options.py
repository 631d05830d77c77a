"""The BKN options study: the guard monitor agrees with what the layers do, the options reach every layer, runs of
different options never share a directory, and the table's paired differences are recomputed from the runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import bench_bkn_options
from benchmarks.bkn_study import Cell, GuardMonitor, build_resnet
from normlayers import BatchKalmanNorm, BatchKalmanNorm2d

GUARD_RATIO = 10.0
EPS = 1e-5


def two_groups(quiet_scale: float, seed: int = 0) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``(x, prior)``: two ghost groups of two samples, 3 channels; group 1's batch variance is 1 in every
    channel, group 0's ``quiet_scale**2``; the prior variance averages 1 over the channels. With guard ratio 10,
    scale 0.2 makes the layer mean (~13) fire while only group 0 (~25) would fire alone; scale 0.25 makes group
    0 (~16) fire alone while the layer mean (~8.5) does not."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((2, 2, 3, 6))  # (G, g, C, L)
    z = (z - z.mean(axis=(1, 3), keepdims=True)) / z.std(axis=(1, 3), keepdims=True)
    z = z * np.array([quiet_scale, 1.0])[:, None, None, None] + rng.standard_normal((2, 1, 3, 1))
    x = torch.tensor(z.reshape(4, 3, 2, 3), dtype=torch.float64)  # (G, g, C, L) -> (N, C, H, W)
    prior = (torch.zeros(3, dtype=torch.float64), torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64))
    return x, prior


def fired_groups(layer: BatchKalmanNorm, x: torch.Tensor) -> list[bool]:
    """Which ghost groups the layer itself sent to plain BN: their posterior mean is the batch mean."""
    batch_mean = x.reshape(2, 2, 3, -1).mean(dim=(1, 3))  # (G, C)
    post_mean = layer.posterior[0].detach()
    return [bool(torch.allclose(post_mean[k], batch_mean[k], atol=1e-12)) for k in range(2)]


@pytest.mark.parametrize(("quiet_scale", "layer_fires", "groups_fired"), [(0.2, True, 1), (0.25, False, 1)])
def test_monitor_counts_what_each_scope_decides(quiet_scale, layer_fires, groups_fired):
    x, prior = two_groups(quiet_scale)
    decisions = {}
    for scope in ("layer", "group"):
        layer = BatchKalmanNorm2d(3, prior_weight=0.6, guard_ratio=GUARD_RATIO, group_size=2, guard_scope=scope,
                                  eps=EPS).double()
        monitor = GuardMonitor(layer)
        layer(x, prior=prior)
        decisions[scope] = fired_groups(layer, x)
        # the monitor sees the same statistics whatever the layer's own scope
        assert (monitor.calls, monitor.layer_fired, monitor.groups, monitor.groups_fired) == (
            1, layer_fires, 2, groups_fired)
        assert monitor.disagree == 1  # the two rules differ on one group in both cases
        var_b = x.reshape(2, 2, 3, -1).var(dim=(1, 3), correction=0)  # (G, C), recomputed here
        ratios = (prior[1] / (var_b + EPS)).numpy()
        assert monitor.layer_ratios[0] == pytest.approx(ratios.mean(), rel=1e-6)
        np.testing.assert_allclose(monitor.group_ratios[0].numpy(), ratios.mean(axis=1), rtol=1e-6)
    # ... and what it counts is what the layers did: one decision for all groups, or one per group
    assert decisions["layer"] == [layer_fires, layer_fires]
    assert decisions["group"] == [True, False]
    summary = monitor.summary()
    assert summary["disagree_pct"] == 100.0 and summary["group_fire_pct"] == 50.0


def test_monitor_ignores_eval_prior_free_and_bn_layers():
    x, prior = two_groups(0.2)
    bkn = BatchKalmanNorm2d(3, prior_weight=0.6, guard_ratio=GUARD_RATIO, group_size=2).double()
    ghost_bn = BatchKalmanNorm2d(3, prior_weight=0.0, group_size=2).double()
    monitor = GuardMonitor(torch.nn.ModuleList([bkn, ghost_bn]))
    bkn(x)  # no prior: the start of a chain
    ghost_bn(x, prior=prior)  # prior weight 0: plain (ghost) BatchNorm
    bkn.eval()
    bkn(x, prior=prior)
    assert monitor.calls == 0 and np.isnan(monitor.summary()["layer_fire_pct"])
    monitor.remove()
    bkn.train()
    bkn(x, prior=prior)
    assert monitor.calls == 0


@pytest.mark.parametrize("norm", ["bkn_mc", "bkn_an"])
def test_options_reach_every_layer_of_the_study_resnet(norm):
    model, _ = build_resnet(norm, 2, group_size=2, guard_scope="group", guard_ratio=0.2, shortcut="posterior")
    layers = [m for m in model.modules() if isinstance(m, BatchKalmanNorm)]
    assert layers and all((m.guard_scope, m.guard_ratio, m.group_size) == ("group", 0.2, 2) for m in layers)
    assert model.kalman_chain.shortcut == "posterior"
    default, _ = build_resnet(norm, 2, group_size=2)
    assert {(m.guard_scope, m.guard_ratio) for m in default.modules() if isinstance(m, BatchKalmanNorm)} == {
        ("layer", 100.0)}
    assert default.kalman_chain.shortcut == "prior"


def test_cells_of_different_guard_settings_never_share_a_run():
    cells = bench_bkn_options.option_cells([2, 4], ["bn", "bkn_mc", "bkn_an"], 128, [100.0, 0.2], ["posterior"])
    assert len(cells) == 2 * (1 + 2 * (2 * 2 + 2)) and len({c.name for c in cells}) == len(cells)
    assert {(c.shortcut, c.depth) for c in cells if c.depth == 2} == {("prior", 2), ("posterior", 2)}
    assert bench_bkn_options.option_cells([2], ["bkn_mc"], 128, [100.0], ["prior"]) == [  # "prior" is the default
        Cell("bkn_mc", 128, 2), Cell("bkn_mc", 128, 2, "group")]
    assert Cell("bkn_mc", 128, 2).name == "bkn_mc_b128_g2"  # the defaults keep the bkn_digits run names
    assert {c.guard_scope for c in cells if c.norm == "bn"} == {"layer"}
    with pytest.raises(ValueError, match="does not divide"):
        bench_bkn_options.option_cells([3], ["bkn_mc"], 128, [100.0])


def test_quick_study_options_differ_only_where_they_act(tmp_path):
    out = tmp_path / "out"
    argv = ["--quick", "--norms", "bkn_an", "--guard-ratios", "100", "0.3", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(out)]  # 0.3: in the first 4 steps the rules then disagree in most calls
    assert bench_bkn_options.main(argv) == 0
    payload = json.loads((out / "bkn_options.json").read_text())
    assert (out / "bkn_options.png").is_file()
    runs = {(r["cell"], r["seed"]): r for r in payload["runs"]}
    rows = {(r["guard_ratio"], r["option"], r["depth"]): r for r in payload["rows"]}
    assert set(rows) == {(100.0, "default", 1), (100.0, "guard per group", 1), (0.3, "default", 1),
                         (0.3, "guard per group", 1), (100.0, "default", 2), (100.0, "posterior shortcut", 2)}
    rows = {key[:2]: row for key, row in rows.items() if key[2] == 1 or key[1] == "posterior shortcut"}
    # at the default threshold the guard never fires, so the two scopes train the same network
    default = runs[("bkn_an_b128_g2", 0)], runs[("bkn_an_b128_g2_guard-group", 0)]
    assert default[0]["guard"]["layer_fire_pct"] == 0 == default[1]["guard"]["group_fire_pct"]
    assert default[0]["final_test_acc"] == default[1]["final_test_acc"]
    assert rows[(100.0, "guard per group")]["d_acc_vs_default"] == 0
    # at 0.3 it fires, the rules disagree, and the paired difference is the runs' difference
    low = runs[("bkn_an_b128_g2_ratio0.3", 0)], runs[("bkn_an_b128_g2_guard-group_ratio0.3", 0)]
    assert low[0]["guard"]["layer_fire_pct"] > 0 and low[1]["guard"]["disagree_pct"] > 0
    expected = 100 * (low[1]["final_test_acc"] - low[0]["final_test_acc"])
    assert low[0]["final_test_acc"] != low[1]["final_test_acc"]
    assert rows[(0.3, "guard per group")]["d_acc_vs_default"] == pytest.approx(expected)
    assert rows[(0.3, "guard per group")]["better_worse_seeds"] == f"{int(expected > 0)}/{int(expected < 0)}/1"
    # the posterior shortcut is compared with the default cell at the same depth (2 blocks per stage), and with
    # identity shortcuts inside the chain it feeds other priors (the variance ratios the monitor saw differ)
    posterior, prior = runs[("bkn_an_b128_g2_shortcut-posterior_depth2", 0)], runs[("bkn_an_b128_g2_depth2", 0)]
    expected = 100 * (posterior["final_test_acc"] - prior["final_test_acc"])
    assert rows[(100.0, "posterior shortcut")]["d_acc_vs_default"] == pytest.approx(expected)
    assert posterior["guard"]["layer_ratio_p50"] != prior["guard"]["layer_ratio_p50"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--norms", "gn", "bkn_mc"], "GroupNorm"),
        (["--norms", "bn"], "at least one BKN norm"),
        (["--guard-ratios", "0"], "guard_ratios"),
        (["--groups", "3"], "does not divide"),
        (["--shortcuts", "sum"], "shortcuts"),
    ],
)
def test_bad_options_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        bench_bkn_options.main(args)
