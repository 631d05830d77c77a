"""Block rating metrics (nas.metrics): each equals numpy, cosine is blind to a sample's scale, and DNA++'s rater
uses the configured metric on the EMA target of the other view."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nas import cli
from nas.data.views import ViewConfig
from nas.methods.dna_selfsup import fixed_views, rate_block_selfsup
from nas.metrics import RATING_METRICS, block_score, target_scale
from nas.spaces import SearchSpace
from nas.supernet import BlockSupernet, make_stem


def rated(pred: torch.Tensor, target: torch.Tensor, metric: str) -> float:
    err, count = block_score(pred, target, metric)
    return err / count / target_scale(target.flatten(), metric, "target")


def numpy_rating(pred: np.ndarray, target: np.ndarray, metric: str) -> float:
    if metric == "cosine":
        p, t = pred.reshape(len(pred), -1), target.reshape(len(target), -1)
        cos = (p * t).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(t, axis=1)
        return float(np.mean(1 - cos))
    d = pred - target
    if metric == "relative_l1":
        return float(np.abs(d).mean() / target.std(ddof=1))
    return float((d**2).mean() / target.var(ddof=1))


@pytest.mark.parametrize("metric", RATING_METRICS)
def test_each_metric_equals_numpy(metric):
    g = torch.Generator().manual_seed(0)
    target = torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64) * 2 + 1
    pred = target + 0.7 * torch.randn(6, 3, 4, 4, generator=g, dtype=torch.float64)
    assert rated(pred, target, metric) == pytest.approx(numpy_rating(pred.numpy(), target.numpy(), metric), rel=1e-9)


def test_cosine_is_blind_to_each_samples_scale_and_the_others_are_not():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    pred = target + 0.5 * torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    scaled = pred * torch.tensor([0.2, 1.0, 3.0, 7.0, 0.5], dtype=torch.float64).view(5, 1, 1, 1)
    assert rated(scaled, target, "cosine") == pytest.approx(rated(pred, target, "cosine"), rel=1e-12)
    for metric in ("relative_l1", "mse"):
        assert abs(rated(scaled, target, metric) - rated(pred, target, metric)) > 0.1
    assert rated(target * 4.0, target, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert rated(-target, target, "cosine") == pytest.approx(2.0)


def test_bad_metric_and_constant_target_are_refused():
    with pytest.raises(ValueError, match="rating metric must be one of"):
        target_scale(torch.randn(10), "l2", "target")
    for metric in RATING_METRICS:
        with pytest.raises(ValueError, match="block 2: the teacher's targets has no spread"):
            target_scale(torch.ones(10), metric, "block 2: the teacher's targets")


TINY = {"name": "tiny", "stem_channels": 4, "ops": [{"kernel": 3, "expansion": 1}, {"kernel": 3, "expansion": 2}],
        "blocks": [{"out_channels": 6, "stride": 1, "layers": 1}]}


@pytest.mark.parametrize("metric", RATING_METRICS)
def test_selfsup_rater_scores_the_last_candidate_like_numpy(metric):
    """The rater's error for a candidate, recomputed here from the recalibrated online block on view A and the
    recalibrated EMA block on view B (after rating, the modules hold the LAST candidate's statistics)."""
    torch.manual_seed(0)
    space = SearchSpace.from_dict(TINY)
    student, ema = BlockSupernet(space.blocks[0]), BlockSupernet(space.blocks[0])
    with torch.no_grad():  # the EMA copy differs from the online block, as after training
        for p in ema.parameters():
            p.add_(0.3 * torch.randn_like(p))
    on, off = make_stem(space, torch.nn.BatchNorm2d), make_stem(space, torch.nn.BatchNorm2d)
    on.eval()
    off.eval()
    g = torch.Generator().manual_seed(2)
    recal = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]
    val = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]
    views = ViewConfig(pad=1, rotate_deg=10.0, scale=0.1, noise_std=0.1, cutout=0, cutout_prob=0.0)
    ratings = rate_block_selfsup(student, ema, on, off, recal, val, views, metric, "path")
    last = student.candidates()[-1]
    view_a, view_b = fixed_views(val, views)
    with torch.no_grad():
        pred = torch.cat([student(on(v), last) for v in view_a]).numpy()
        target = torch.cat([ema(off(v), last) for v in view_b]).numpy()
    assert ratings[space.blocks[0].key(last)] == pytest.approx(numpy_rating(pred, target, metric), rel=1e-5)
    assert len(set(ratings.values())) == len(ratings)  # the candidates are told apart


def test_packaged_dna_configs_pick_their_metric():
    _, plain = cli.method_config("dna", [])
    _, selfsup = cli.method_config("dna", ["--variant", "selfsup"])
    assert (plain.rating_metric, selfsup.rating_metric) == ("relative_l1", "cosine")
    _, chosen = cli.method_config("dna", ["--variant", "selfsup", "--rating-metric", "relative_l1"])
    assert chosen.rating_metric == "relative_l1"
