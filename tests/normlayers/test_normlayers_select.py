"""normlayers.select: the prior-weight rule, the named study variants and their factories, NormOptions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from normlayers import BatchKalmanNorm2d
from normlayers.select import (
    NORM_KINDS,
    NORMS,
    NormOptions,
    base_norm_factory,
    finalize_norms,
    norm_spec,
    prior_weight_for,
)


def test_prior_weight_rule_hits_the_reference_points_and_is_monotone():
    assert prior_weight_for(2) == pytest.approx(0.9)
    assert prior_weight_for(128) == pytest.approx(0.05)
    assert prior_weight_for(1077) == pytest.approx(0.05)  # clamped
    ps = [prior_weight_for(b) for b in (2, 4, 8, 16, 32, 64, 128)]
    assert np.all(np.diff(ps) < 0)
    assert np.allclose(np.diff(ps), np.diff(ps)[0])  # linear in log2(batch)
    with pytest.raises(ValueError, match="stat_batch must be >= 1"):
        prior_weight_for(0)


def test_study_variants_and_factories():
    assert sorted(NORMS) == ["bkn_an", "bkn_mc", "bn", "gn"] and set(NORM_KINDS) == {"bn", "gn", "bkn", "none"}
    with pytest.raises(ValueError, match="unknown norm 'ln'"):
        norm_spec("ln")
    assert base_norm_factory(norm_spec("bn")) is nn.BatchNorm2d
    gn = base_norm_factory(norm_spec("gn"))(8)
    assert isinstance(gn, nn.GroupNorm) and gn.num_groups == 4
    ghost = base_norm_factory(norm_spec("bkn_an"), group_size=2)(8)
    assert isinstance(ghost, BatchKalmanNorm2d) and ghost.prior_weight == 0.0 and ghost.group_size == 2
    with pytest.raises(ValueError, match="ghost groups make no sense"):
        base_norm_factory(norm_spec("gn"), group_size=2)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    assert finalize_norms(net, norm_spec("bn"), 4) == (net, None)
    net, p = finalize_norms(net, norm_spec("bkn_an"), 4)
    assert p == pytest.approx(prior_weight_for(4)) and isinstance(net[4], BatchKalmanNorm2d)
    assert net[4].transition == "analytic" and net.kalman_chain.plan["4"] is not None
    net(torch.randn(2, 1, 8, 8))


def test_norm_options_validation():
    assert NormOptions().prior_weight_value() == pytest.approx(prior_weight_for(64))
    assert NormOptions(stat_batch=4).prior_weight_value() == pytest.approx(prior_weight_for(4))
    assert NormOptions(prior_weight=0.0).prior_weight_value() == 0.0
    for bad in (dict(transition="kalman"), dict(prior_weight=1.0), dict(stat_batch=0), dict(gn_groups=0)):
        with pytest.raises(ValueError, match="invalid NormOptions"):
            NormOptions(**bad)
    with pytest.raises(ValueError, match="gn_groups=3 does not divide the 8 channels"):
        NormOptions(gn_groups=3).group_norm(8)
