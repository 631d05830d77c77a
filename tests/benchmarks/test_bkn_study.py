"""The BKN study's building blocks: the ResNet with every norm, the BKN wiring, the accuracy metric, the quick study."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from benchmarks import bench_bkn_digits
from benchmarks.bkn_study import (
    Cell,
    build_resnet,
    run_config,
    study_data,
    study_system,
)
from normlayers.select import NORMS, prior_weight_for
from stflow.callbacks import EpochRecorder
from stflow.pool import quiet_lightning
from stflow.runner import RunConfig, fit


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("group_size", [None, 2])
def test_resnet_builds_and_trains_with_every_norm(norm, group_size):
    if group_size and NORMS[norm].kind == "gn":
        with pytest.raises(ValueError, match="ghost groups make no sense"):
            build_resnet(norm, 2, group_size=group_size)
        return
    torch.manual_seed(0)
    model, p = build_resnet(norm, stat_batch=group_size or 4, group_size=group_size)
    assert (p is not None) == (NORMS[norm].kind == "bkn")
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    logits = model(x)
    assert logits.shape == (4, 10)
    nn.functional.cross_entropy(logits, y).backward()
    grads = [q.grad for q in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    assert torch.isfinite(model(x[:2])).all()  # inference: running statistics


def test_unknown_norm_is_rejected():
    with pytest.raises(ValueError, match="unknown norm 'ln'"):
        build_resnet("ln", 2)


@pytest.mark.parametrize("transition", ["bkn_mc", "bkn_an"])
def test_bkn_conversion_wires_a_prior_into_every_norm_but_the_first(transition):
    from normlayers import BatchKalmanNorm

    torch.manual_seed(0)
    model, p = build_resnet(transition, stat_batch=2, depth=2)
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, BatchKalmanNorm))]
    assert len(norms) == 2 * 6 + 1 and all(isinstance(m, BatchKalmanNorm) for m in norms)
    assert all(m.prior_weight == pytest.approx(0.9) for m in norms) and p == pytest.approx(0.9)
    seen: dict[int, bool] = {}
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out: seen.__setitem__(id(mod), _got_prior(mod, kwargs)),
                                     with_kwargs=True) for m in norms]
    model.train()
    model(torch.randn(2, 1, 8, 8))
    for h in hooks:
        h.remove()
    got = [seen[id(m)] for m in norms]
    assert got == [False] + [True] * (len(norms) - 1)


def _got_prior(module: nn.Module, kwargs: dict) -> bool:
    return kwargs.get("prior") is not None  # the chain hands the prior to forward(x, prior=...)


def _fit_digits(tmp_path: Path, eval_batch: int, epochs: int = 2):
    torch.manual_seed(0)
    model, _ = build_resnet("gn", 8)
    system = study_system(model, lr=0.05, max_epochs=epochs)
    data = study_data(batch_size=32, seed=0, eval_batch_size=eval_batch)
    recorder = EpochRecorder(["val_acc", "epoch_test_acc"], ["train_acc"])
    cfg = RunConfig(out_dir=str(tmp_path), max_epochs=epochs, seed=0, accelerator="cpu", devices=1,
                    progress_bar=False, loggers=(), checkpoint=False, limit_train_batches=3)
    return fit(system, data, cfg, callbacks=[recorder]), system, data, recorder


def test_accuracy_metric_equals_numpy_accuracy_of_the_same_predictions(tmp_path):
    quiet_lightning()
    res, system, data, recorder = _fit_digits(tmp_path, eval_batch=64)  # uneven last batch: per-batch means differ
    x, y = data.splits["test"]
    system.eval()
    with torch.no_grad():
        pred = system(x).argmax(1).numpy()
    numpy_acc = float(np.mean(pred == y.numpy()))
    per_batch = float(np.mean([np.mean(pred[i:i + 64] == y.numpy()[i:i + 64]) for i in range(0, len(y), 64)]))
    assert 0.15 < numpy_acc < 1.0 and per_batch != pytest.approx(numpy_acc, abs=1e-9)  # learned (chance: 0.1)
    assert res.test_metrics["test_acc"] == pytest.approx(numpy_acc, abs=1e-6)
    assert recorder.history[-1]["epoch_test_acc"] == pytest.approx(numpy_acc, abs=1e-6)  # same weights, val loop
    assert [h["epoch"] for h in recorder.history] == [0.0, 1.0]


def test_epoch_history_survives_resume_and_the_final_test_restore(tmp_path):
    """A run stopped after epoch 1 and resumed equals the uninterrupted run, epoch by epoch; the runner's
    ``trainer.test(ckpt_path=best)`` does not roll the history back to the best epoch."""
    quiet_lightning()

    def run(out: Path, epochs: int, resume: bool) -> EpochRecorder:
        pl.seed_everything(0)
        model, _ = build_resnet("bn", 32)
        recorder = EpochRecorder(["val_loss", "epoch_test_acc"], ["train_loss"])
        cfg = run_config(out, epochs, 0, "val_loss", "min", resume, limit_train_batches=3, loggers=())
        fit(study_system(model, lr=0.025, max_epochs=3), study_data(32, seed=0), cfg, callbacks=[recorder])
        return recorder

    full = run(tmp_path / "full", 3, False).history
    assert [h["epoch"] for h in full] == [0.0, 1.0, 2.0]
    assert run(tmp_path / "cut", 2, False).history[-1]["epoch"] == 1.0
    resumed = run(tmp_path / "cut", 3, True).history
    assert [h["epoch"] for h in resumed] == [0.0, 1.0, 2.0]
    for a, b in zip(full, resumed):
        for key in ("val_loss", "epoch_test_acc", "train_loss"):
            assert a[key] == pytest.approx(b[key], abs=1e-6)


def test_digits_data_adapter_batches_and_rejects_bad_sizes():
    data = study_data(batch_size=128, seed=3)
    batches = list(data.train_dataloader())
    n_train = len(data.splits["train"][1])
    assert len(batches) == n_train // 128 and all(len(b[1]) == 128 for b in batches)  # drop_last
    assert len(data.val_dataloader()) == 2  # validation, then the per-epoch test curve
    with pytest.raises(ValueError, match="batch_size must be >= 2"):
        study_data(batch_size=1)
    with pytest.raises(ValueError, match="exceeds the"):
        study_data(batch_size=5000).setup()


def test_quick_digits_study_writes_one_row_per_norm_and_batch(tmp_path):
    out = tmp_path / "results"
    argv = ["--quick", "--norms", "bn", "gn", "bkn_an", "--batch-sizes", "2", "16", "--ghost-groups", "4",
            "--large", "16", "--out", str(out), "--runs-dir", str(tmp_path / "runs")]
    assert bench_bkn_digits.main(argv) == 0
    with open(out / "bkn_digits.csv") as fh:
        rows = list(csv.DictReader(fh))
    got = sorted((r["norm"], r["mode"], r["batch"], r["group"]) for r in rows)
    expected = sorted(
        [(n, "real", b, "") for n in ("bn", "gn", "bkn_an") for b in ("2", "16")]
        + [(n, "ghost", "16", "4") for n in ("bn", "bkn_an")]
    )
    assert got == expected
    payload = json.loads((out / "bkn_digits.json").read_text())
    for row in rows:  # the table's mean is the mean of the per-run accuracies
        runs = [r for r in payload["runs"]
                if r["cell"] == Cell(row["norm"], int(row["batch"]), int(row["group"]) if row["group"] else None).name]
        assert len(runs) == 1 and float(row["test_acc"]) == pytest.approx(100 * runs[0]["final_test_acc"], rel=1e-6)
        stat_batch = int(row["group"] or row["batch"])
        assert row["p"] == ("" if row["norm"] in ("bn", "gn") else f"{round(prior_weight_for(stat_batch), 3)}")
    for name in ("bkn_digits_curves.png", "bkn_digits_ghost_curves.png", "bkn_digits_by_batch.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000
    # finished runs are reused (resume): a second call trains nothing and gives the same table
    before = (out / "bkn_digits.csv").read_text()
    assert bench_bkn_digits.main(argv) == 0
    assert (out / "bkn_digits.csv").read_text() == before
