"""The FFN ground-truth builder (nas/ffn/groundtruth.py): accuracies pooled over folds then averaged over seeds,
every example tested once, a cached file reused or refused by its settings, the seed-vs-seed ceiling."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import stats

import nas.ffn.groundtruth as gt
from nas.ffn.expressions import STANDARD_FFN

EXPRS = [STANDARD_FFN, "linear(relu(linear(x,wb1)),wb2)", "linear(x,wb2)"]


def fake_job(calls: list):
    """(correct, tested) from a fixed table: fold f of seed s tests 100 + f examples, expression e gets a known
    number right, so the pooled accuracy is known in closed form."""

    def job(task, expr, layers, width, seed, fold, folds, epochs, d, val_fraction):
        calls.append((expr, seed, fold))
        n = 100 + fold
        return (EXPRS.index(expr) * 10 + seed * 3 + fold) % n, n

    return job


def test_accuracy_is_pooled_over_folds_then_averaged_over_seeds_and_cached(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(gt, "_job", fake_job(calls))
    path = tmp_path / "gt.json"
    data = gt.build_expr_ground_truth("seqdigits", path, EXPRS, seeds=(0, 1), folds=3, epochs=1, progress=False)
    assert len(calls) == 3 * 2 * 3  # every expression x seed x fold once
    for e, entry in enumerate(data["architectures"]):
        per_seed = []
        for s in (0, 1):
            correct = sum((e * 10 + s * 3 + f) % (100 + f) for f in range(3))
            per_seed.append(correct / (100 + 101 + 102))
        assert entry["expr"] == EXPRS[e]
        assert entry["accuracies"] == pytest.approx(per_seed) and entry["accuracy"] == pytest.approx(np.mean(per_seed))
    assert json.loads(path.read_text()) == data
    # the same settings: the file is returned, nothing is trained again
    assert gt.build_expr_ground_truth("seqdigits", path, EXPRS, seeds=(0, 1), folds=3, epochs=1, progress=False) == data
    assert len(calls) == 18
    # other settings: refused with the differing key named, unless overwrite
    with pytest.raises(ValueError, match="epochs"):
        gt.build_expr_ground_truth("seqdigits", path, EXPRS, seeds=(0, 1), folds=3, epochs=2, progress=False)
    gt.build_expr_ground_truth("seqdigits", path, EXPRS, seeds=(0, 1), folds=3, epochs=2, progress=False,
                               overwrite=True)
    assert len(calls) == 36 and json.loads(path.read_text())["epochs"] == 2


def test_seed_ceiling_is_the_mean_pairwise_kendall_between_seeds():
    rng = np.random.default_rng(0)
    accs = rng.uniform(0.8, 0.9, size=(6, 3))  # (expressions, seeds)
    data = {"architectures": [{"accuracies": list(row)} for row in accs]}
    taus = [stats.kendalltau(accs[:, i], accs[:, j]).statistic for i, j in itertools.combinations(range(3), 2)]
    assert gt.expr_seed_ceiling(data) == pytest.approx(np.mean(taus))
    identical = {"architectures": [{"accuracies": [a, a]} for a in accs[:, 0]]}
    assert gt.expr_seed_ceiling(identical) == pytest.approx(1.0)


def test_real_folds_test_every_example_exactly_once(tmp_path, monkeypatch):
    """A real (tiny) build on sequential digits: over the folds of one seed, every one of the 1,797 images is
    tested once, so the pooled accuracy is over the whole dataset."""
    seen: list = []
    real = gt.standalone_accuracy

    def counting(*args, **kwargs):
        correct, n = real(*args, **kwargs)
        seen.append((correct, n))
        return correct, n

    monkeypatch.setattr(gt, "standalone_accuracy", counting)
    data = gt.build_expr_ground_truth("seqdigits", tmp_path / "gt.json", EXPRS[:1], seeds=(0,), folds=3,
                                      epochs=0.05, d=16, width=32, progress=False)
    assert sum(n for _, n in seen) == 1797
    pooled = sum(c for c, _ in seen) / 1797
    assert data["architectures"][0]["accuracy"] == pytest.approx(pooled)


def test_a_listops_truth_made_on_other_generated_data_is_refused(tmp_path, monkeypatch):
    """ListOps is procedural: its generator settings are in the header, so a truth of another ListOps is not reused."""
    from nas.ffn.distill import TASKS

    calls: list = []
    monkeypatch.setattr(gt, "_job", fake_job(calls))
    path = tmp_path / "gt.json"
    data = gt.build_expr_ground_truth("listops", path, EXPRS, seeds=(0, 1), folds=2, epochs=1, progress=False)
    assert data["data"] == TASKS["listops"].data and data["data"]["n"] == 4000
    monkeypatch.setitem(TASKS["listops"].data, "max_depth", 3)  # as if the generator's size had changed
    with pytest.raises(ValueError, match="data"):
        gt.build_expr_ground_truth("listops", path, EXPRS, seeds=(0, 1), folds=2, epochs=1, progress=False)


@pytest.mark.parametrize("task", ["seqdigits", "listops"])
def test_committed_truths_match_the_current_task_and_parameter_count(task):
    from pathlib import Path

    from nas.ffn.distill import TASKS
    from nas.ffn.transformer import FFNArch

    data = json.loads((Path(__file__).parents[2] / f"benchmarks/results/mlp_{task}_ground_truth.json").read_text())
    assert data.get("data") == TASKS[task].data
    assert len(data["architectures"]) >= 30 and len(data["seeds"]) >= 3
    for a in data["architectures"]:
        assert a["ffn_params"] == FFNArch.uniform(a["expr"], data["layers"], data["width"]).ffn_params(data["d"])
