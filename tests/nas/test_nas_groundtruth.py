"""Stand-alone ground truth: cross-validated digits folds, pooled accuracies, seed reuse, the ceiling."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

pytest.importorskip("sklearn")

from nas.data import digits_split_indices, load_digits_split  # noqa: E402
from nas.methods.dna import digits_config  # noqa: E402
from nas.search import groundtruth  # noqa: E402


def test_folds_partition_every_image_once_and_stay_stratified():
    tests = [digits_split_indices(seed=3, fold=f, num_folds=5) for f in range(5)]
    pooled = np.concatenate([t["test"] for t in tests])
    assert sorted(pooled.tolist()) == list(range(1797))  # disjoint and complete
    from sklearn.datasets import load_digits

    labels = load_digits().target
    for t in tests:
        assert not set(t["test"]) & set(t["train"]) and not set(t["test"]) & set(t["val"])
        assert not set(t["train"]) & set(t["val"])
        counts = np.bincount(labels[t["test"]], minlength=10)
        expected = np.bincount(labels, minlength=10) / 5
        assert np.all(np.abs(counts - expected) <= 1)  # stratified


def test_fold_none_keeps_the_fixed_split_and_bad_folds_are_rejected():
    parts = digits_split_indices(seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [1077, 360, 360]
    split = load_digits_split(seed=1, fold=2)
    assert (
        split["train"][0].mean().abs() < 1e-5 and abs(float(split["train"][0].std()) - 1) < 1e-3
    )  # train-standardized
    assert [len(split[k][1]) for k in ("train", "val", "test")] == [1078, 360, 359]
    with pytest.raises(ValueError, match="fold must be in"):
        digits_split_indices(fold=5, num_folds=5)
    with pytest.raises(ValueError, match="fold must be in"):
        digits_split_indices(fold=0, num_folds=1)


def test_ground_truth_pools_folds_and_reuses_finished_seeds(tmp_path, monkeypatch):
    space = digits_config().space
    calls: list[tuple[int, int | None]] = []

    def fake_job(space, arch, seed, epochs, fold, num_folds):  # accuracy depends on (arch, seed, fold)
        calls.append((seed, fold))
        n = 360 if fold in (0, 1) else 359
        return (sum(map(sum, arch)) % 7 + seed + fold) / 20.0, n

    monkeypatch.setattr(groundtruth, "_fold_job", fake_job)
    path = tmp_path / "gt.json"
    data = groundtruth.build_ground_truth(space, path, 4, seeds=[0, 1], epochs=3, folds=5, progress=False)
    assert len(calls) == 4 * 2 * 5
    archs = groundtruth.sample_architectures(space, 4)
    for entry, arch in zip(data["architectures"], archs):
        for s, acc in zip([0, 1], entry["accuracies"]):
            runs = [((sum(map(sum, arch)) % 7 + s + f) / 20.0, 360 if f < 2 else 359) for f in range(5)]
            assert acc == pytest.approx(sum(a * n for a, n in runs) / 1797)  # pooled correct / all images
        assert entry["accuracy"] == pytest.approx(np.mean(entry["accuracies"]))

    calls.clear()
    more = groundtruth.build_ground_truth(space, path, 4, seeds=[0, 1, 2], epochs=3, folds=5, progress=False)
    assert {s for s, _ in calls} == {2} and len(calls) == 4 * 5  # seeds 0 and 1 reused
    assert [e["accuracies"][:2] for e in more["architectures"]] == [e["accuracies"] for e in data["architectures"]]
    assert json.loads(path.read_text())["seeds"] == [0, 1, 2]

    calls.clear()
    subset = groundtruth.build_ground_truth(space, path, 4, seeds=[2, 0], epochs=3, folds=5, progress=False)
    assert not calls and subset["seeds"] == [2, 0]  # a subset in the asked order, nothing retrained...
    assert [e["accuracies"] for e in subset["architectures"]] == [
        [e["accuracies"][2], e["accuracies"][0]] for e in more["architectures"]
    ]
    assert json.loads(path.read_text())["seeds"] == [0, 1, 2]  # ...and the file keeps every seed

    calls.clear()
    with pytest.raises(ValueError, match=r"gt.json \(ground truth\) was made with another config \(epochs: 3 -> 4"):
        groundtruth.build_ground_truth(space, path, 4, seeds=[0, 1, 2], epochs=4, folds=5, progress=False)
    assert not calls and json.loads(path.read_text())["epochs"] == 3  # other settings: refused, file kept
    groundtruth.build_ground_truth(space, path, 4, seeds=[0, 1, 2], epochs=4, folds=5, progress=False, overwrite=True)
    assert len(calls) == 4 * 3 * 5 and json.loads(path.read_text())["epochs"] == 4  # overwrite: nothing reused


def test_seed_ceiling_is_the_mean_pairwise_kendall():
    rng = np.random.default_rng(0)
    accs = rng.random((8, 3))
    data = {"architectures": [{"accuracies": list(a)} for a in accs]}
    pairs = [stats.kendalltau(accs[:, i], accs[:, j]).statistic for i, j in ((0, 1), (0, 2), (1, 2))]
    assert groundtruth.seed_ceiling(data) == pytest.approx(np.mean(pairs))


def test_parallel_workers_give_the_same_pooled_accuracies(tmp_path):
    """Real stand-alone training (1 epoch) in 2 spawned workers equals the in-process run, and the
    folds' test parts add up to all 1,797 images."""
    space = digits_config().space
    kwargs = dict(num_archs=2, seeds=[0], epochs=1, folds=2, progress=False)
    serial = groundtruth.build_ground_truth(space, tmp_path / "serial.json", workers=1, **kwargs)
    parallel = groundtruth.build_ground_truth(space, tmp_path / "parallel.json", workers=2, **kwargs)
    accs = [e["accuracies"] for e in serial["architectures"]]
    assert accs == [e["accuracies"] for e in parallel["architectures"]]
    for (acc,) in accs:
        assert 0.0 < acc <= 1.0 and abs(acc * 1797 - round(acc * 1797)) < 1e-3  # whole images out of 1,797
