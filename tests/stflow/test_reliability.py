"""Reliability and security of the stflow CLIs: no code runs from a checkpoint, nothing lost on resume or rerun,
``--json`` output, batch limits, the synthetic city's own seed, impossible values and ambiguous data files."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from stflow import evaluate, train
from stflow.data import CrowdFlowDataModule, generate_synthetic_city, load_crowd_flow
from stflow.data.hdf5 import DataFormatError
from stflow.safeload import UnsafeCheckpointError

REPO = Path(__file__).resolve().parents[2]


def _args(city: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(city), "--test-days", "2", "--batch-size", "32", "--no-progress-bar",
            "--out-dir", str(out), "--json", "--limit-train-batches", "2", *extra]


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=600)


class _Payload:
    """Unpickling it (weights_only=False) would create the directory ``marker``: stands for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _crafted_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"state_dict": {}, "hyper_parameters": {"model": "acfm_bikenyc", "x": _Payload(marker)}}, path)
    return path


def test_crafted_pickle_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    # Sanity: the payload does run under a plain (unsafe) load.
    probe = tmp_path / "probe-marker"
    torch.load(_crafted_checkpoint(tmp_path / "probe.ckpt", probe), weights_only=False)
    assert probe.exists()

    marker = tmp_path / "marker"
    evil = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="evil.ckpt: refused"):
        evaluate.load_checkpoint(evil)
    done = _cli("stflow.evaluate", "--checkpoint", str(evil), "--json")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(evil) in lines[0] and "refused" in lines[0]
    assert not marker.exists()


def test_crafted_pickle_is_not_resumed_from(tiny_city: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    evil = _crafted_checkpoint(tmp_path / "evil.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        train.main(_args(tiny_city, tmp_path / "run", "--epochs", "1", "--resume", str(evil)))
    assert not marker.exists()


def test_real_checkpoint_loads_with_weights_only(tiny_city: Path, tmp_path: Path) -> None:
    result = train.main(_args(tiny_city, tmp_path / "run", "--epochs", "1"))
    torch.load(result["best_checkpoint"], weights_only=True)  # plain data only, no allow-list needed
    evaluated = evaluate.evaluate(result["best_checkpoint"], accelerator="cpu")
    assert evaluated["test_rmse"] == pytest.approx(result["test"]["test_rmse"], rel=1e-9)


def _csv_epochs(out: Path) -> list[int]:
    """The epochs with a validation row in ``metrics.csv`` (test rows carry the epoch after the last one)."""
    with (out / "logs" / "metrics.csv").open() as file:
        return sorted({int(float(row["epoch"])) for row in csv.DictReader(file) if row.get("val_loss")})


def test_resume_keeps_the_csv_history_and_reruns_need_a_flag(tiny_city: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train.main(_args(tiny_city, out, "--epochs", "1"))
    assert _csv_epochs(out) == [0]
    train.main(_args(tiny_city, out, "--epochs", "3", "--resume"))
    assert _csv_epochs(out) == [0, 1, 2]  # Lightning alone deleted epoch 0's rows here

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="already holds a previous run .*--resume.*--overwrite"):
        train.main(_args(tiny_city, out, "--epochs", "1"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched

    stale = out / "checkpoints" / "best-epoch=099.ckpt"  # an old run's best epoch, not reached by the new run
    shutil.copy(next((out / "checkpoints").glob("best-*.ckpt")), stale)
    result = train.main(_args(tiny_city, out, "--epochs", "1", "--overwrite"))
    assert not stale.exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("best-*.ckpt")) == ["best-epoch=000.ckpt"]
    assert result["epochs"] == 1 and _csv_epochs(out) == [0]


def test_failed_resume_deletes_nothing(tiny_city: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileNotFoundError, match="cannot resume: no checkpoint"):
        train.main(_args(tiny_city, out, "--epochs", "1", "--resume"))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(ValueError, match="exclude each other"):
        train.main(_args(tiny_city, out, "--epochs", "1", "--resume", "--overwrite"))


def test_json_stdout_is_only_json_and_one_val_batch(tiny_city: Path, tmp_path: Path) -> None:
    """With progress bars on: stdout is one JSON document; ``--limit-val-batches 1`` is one batch."""
    args = ["--data-dir", str(tiny_city), "--test-days", "2", "--batch-size", "8", "--epochs", "1",
            "--limit-train-batches", "2", "--limit-val-batches", "1", "--out-dir", str(tmp_path / "run"), "--json"]
    done = _cli("stflow.train", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = json.loads(done.stdout)
    assert printed["test_rmse"] > 0
    assert "reading " in done.stderr and "SYN_M4x4_T60_InOut.h5" in done.stderr
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["val"]["val_samples"] == 8  # one batch of 8, not the whole validation split

    done = _cli("stflow.evaluate", "--checkpoint", saved["best_checkpoint"], "--json", "--accelerator", "cpu")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["test_rmse"] == pytest.approx(printed["test_rmse"], rel=1e-9)
    assert "reading " in done.stderr


def test_training_seed_does_not_change_the_synthetic_city(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STFLOW_CACHE", str(tmp_path / "cache"))
    calls = []

    def tiny(out, seed=0):
        calls.append(seed)
        return generate_synthetic_city(out, seed, days=16, grid=(4, 4))

    monkeypatch.setattr("stflow.data.datamodule.generate_synthetic_city", tiny)
    a = train.build_datamodule(train.parse_config(["--seed", "1", "--test-days", "2"])[0])
    b = train.build_datamodule(train.parse_config(["--seed", "2", "--test-days", "2"])[0])
    a.setup("fit")
    b.setup("fit")
    assert a.seed != b.seed and calls == [0]  # one city, generated once, for both training seeds
    np.testing.assert_array_equal(a.flows, b.flows)
    c = CrowdFlowDataModule(options=a.options.replace(synthetic_seed=3), seed=1)
    c.setup("fit")
    assert calls == [0, 3] and not np.array_equal(a.flows, c.flows)


@pytest.mark.parametrize(("flags", "match"), [
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--test-days", "0"], "test_days must be >= 1 for stflow.train"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--data.synthetic_seed", "-1"], "synthetic_seed must be an integer >= 0"),
])
def test_impossible_training_values_are_refused(flags: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train.parse_config(flags)


def test_synthetic_grid_of_zero_is_refused(tmp_path: Path) -> None:
    done = _cli("stflow.data", "synthetic", "--out", str(tmp_path / "city"), "--grid", "[0, 4]")
    assert done.returncode == 2 and done.stderr.strip().startswith("error: ") and "grid" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "city").exists()


def test_several_files_matching_a_pattern_are_refused(tiny_city: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_city, data)
    flow = next(data.glob("SYN_M*_T60_InOut.h5"))
    shutil.copy(flow, data / flow.name.replace("SYN_M4x4", "SYN_M4x4b"))
    with pytest.raises(DataFormatError, match=r"2 files match the pattern \(SYN_M4x4_T60_InOut.h5, SYN_M4x4b"):
        load_crowd_flow("synthetic", data)


def test_all_zero_flow_file_is_a_clear_error(tiny_city: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_city, data)
    flow = next(data.glob("SYN_M*_T60_InOut.h5"))
    with h5py.File(flow, "r+") as f:
        f["data"][...] = 0
    with pytest.raises(DataFormatError, match=f"{flow.name}: every flow value is 0"):
        load_crowd_flow("synthetic", data)
