"""``python -m stflow.train``: no-argument run, exact resume, DDP bookkeeping, configs and bad-config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stflow import train
from stflow.config import ConfigError, packaged_configs
from stflow.data import CrowdFlowDataModule, generate_synthetic_city, synthetic_cache_dir
from stflow.data.datamodule import SYNTHETIC_VERSION
from stflow.evaluate import evaluate

REPO = Path(__file__).resolve().parents[2]


def _args(city: Path, out: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(city), "--test-days", "2", "--batch-size", "32", "--no-progress-bar",
            "--out-dir", str(out), "--json", *extra]


def test_no_argument_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``main([])``: clean ACFM on the default synthetic dataset, made tiny: one epoch, and a 4x4 16-day city
    placed in the data module's cache (where the default city would be generated)."""
    monkeypatch.setenv("STFLOW_CACHE", str(tmp_path / "cache"))
    cache = synthetic_cache_dir(train.TrainConfig().data.synthetic_seed)  # not the training seed
    generate_synthetic_city(cache, seed=2, days=16, grid=(4, 4))
    (cache / "VERSION").write_text(SYNTHETIC_VERSION + "\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(train.DEFAULT_EPOCHS, "synthetic", 1)
    result = train.main([])
    assert result["model"] == "acfm_bikenyc" and result["dataset"] == "synthetic" and result["epochs"] == 1
    test = result["test"]
    assert {"test_rmse", "test_rmse_inflow", "test_rmse_outflow", "test_mae"} <= set(test)
    assert test["test_samples"] == 7 * 24  # the synthetic spec's 7 test days
    assert min(test["test_rmse_inflow"], test["test_rmse_outflow"]) <= test["test_rmse"] <= max(
        test["test_rmse_inflow"], test["test_rmse_outflow"]
    )
    saved = json.loads((tmp_path / "runs" / "acfm_bikenyc_synthetic" / "metrics.json").read_text())
    assert saved["test"] == test
    out = capsys.readouterr().out
    assert "RMSE inflow" in out and json.loads(out.strip().splitlines()[-1])["test_rmse"] == test["test_rmse"]


def test_resume_equals_uninterrupted_run(tiny_city: Path, tmp_path: Path) -> None:
    common = ["--lr", "1e-3", "--lr-milestones", '{"2": 5e-4}', "--limit-train-batches", "4"]  # lr step after the stop
    straight = train.main(_args(tiny_city, tmp_path / "straight", "--epochs", "3", *common))
    first = train.main(_args(tiny_city, tmp_path / "split", "--epochs", "1", *common))
    resumed = train.main(_args(tiny_city, tmp_path / "split", "--epochs", "3", "--resume", *common))
    a = torch.load(straight["last_checkpoint"], weights_only=False)
    b = torch.load(resumed["last_checkpoint"], weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["state_dict"].items():
        assert torch.allclose(value.double(), b["state_dict"][key].double(), atol=1e-6, rtol=0), key
    assert b["lr_schedulers"][0]["_last_lr"] == pytest.approx([5e-4])
    for key, value in straight["test"].items():
        assert resumed["test"][key] == pytest.approx(value, rel=1e-6), key
    assert abs(first["test"]["test_rmse"] - resumed["test"]["test_rmse"]) > 1e-3  # epochs 2-3 did change the model


def test_ddp_two_processes_match_single_process_evaluation(tiny_city: Path, tmp_path: Path) -> None:
    """A 2-process CPU DDP fit (gloo); its logged val/test metrics equal a single-process evaluation of the
    saved checkpoint. The validation split has an odd size, so DistributedSampler pads it with a duplicate."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "stflow.train", *_args(tiny_city, out, "--epochs", "1"),
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    assert ddp["val"]["val_samples"] % 2 == 1  # padding happened
    last = ddp["last_checkpoint"]
    single = evaluate(last, accelerator="cpu")
    for key in ("test_rmse", "test_rmse_inflow", "test_rmse_outflow", "test_mae", "test_samples"):
        assert single[key] == pytest.approx(ddp["test"][key], rel=1e-5, abs=1e-5), key

    import pytorch_lightning as pl

    from stflow.system import ForecastingSystem

    saved = torch.load(last, weights_only=False)
    system = ForecastingSystem.load_from_checkpoint(last, weights_only=False)
    datamodule = CrowdFlowDataModule.from_arguments(saved[train.CHECKPOINT_DATA_KEY])
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False)
    val = trainer.validate(system, datamodule=datamodule, verbose=False)[0]
    for key in ("val_rmse", "val_mae", "val_loss", "val_samples"):
        assert val[key] == pytest.approx(ddp["val"][key], rel=1e-5, abs=1e-7), key


def test_historical_average_runs_without_optimizer(tiny_city: Path, tmp_path: Path) -> None:
    """The non-trainable baseline is fitted on the training slots in setup and measured; numpy recomputation."""
    result = train.main(_args(tiny_city, tmp_path / "ha", "--model", "historical_average", "--epochs", "5"))
    assert result["epochs"] == 1  # one measuring epoch, whatever --epochs says
    dm = CrowdFlowDataModule(data_dir=str(tiny_city), test_days=2, batch_size=32, seed=777)
    dm.setup("fit")
    flows, ts, mask = dm.flows, dm.timestamps, dm.train_slot_mask
    key = ts.day_of_week.to_numpy() * 24 + ts.hour.to_numpy()
    test_index = dm.test_dataset.windows.target
    sq = []
    for i in test_index:
        hist = flows[mask & (key == key[i])]
        sq.append((hist.mean(axis=0) - flows[i]) ** 2)
    want = float(np.sqrt(np.mean(sq)) * dm.metric_factor)
    assert result["test"]["test_rmse"] == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("config", packaged_configs("stflow"))
def test_shipped_configs_are_valid(config: str) -> None:
    cfg, _ = train.parse_config(["--config", config])  # validated: a registered model, possible values
    assert cfg.model.split("_")[0] in config and cfg.max_epochs >= 1


def test_flags_override_config(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model: stresnet\nbatch_size: 16\ndata: {len_closeness: 3}\nrun: {max_epochs: 7}\n")
    cfg, _ = train.parse_config(["--config", str(path), "--epochs", "2", "--len-period", "1", "--devices", "2",
                                 "--norm", "bkn", "--norm_options.transition", "monte_carlo"])
    assert (cfg.model, cfg.max_epochs, cfg.batch_size, cfg.run.devices) == ("stresnet", 2, 16, 2)
    assert (cfg.data.len_closeness, cfg.data.len_period) == (3, 1)
    assert (cfg.norm, cfg.norm_options.transition) == ("bkn", "monte_carlo")
    # the same config written as YAML and as flags gives the same object
    same, _ = train.parse_config(["--model", "stresnet", "--batch_size", "16", "--data.len_closeness", "3",
                                  "--run.max_epochs", "2", "--data.len_period", "1", "--run.devices", "2",
                                  "--norm", "bkn", "--norm-options.transition", "monte_carlo"])
    assert same == cfg


def test_packaged_config_by_path_of_a_source_checkout() -> None:
    """``--config configs/acfm_bikenyc.yaml`` (the old source-tree path) still finds the packaged file."""
    by_name, _ = train.parse_config(["--config", "acfm_bikenyc"])
    by_path, _ = train.parse_config(["--config", "configs/acfm_bikenyc.yaml"])
    assert by_name == by_path and by_name.dataset == "bikenyc" and by_name.max_epochs == 200


@pytest.mark.parametrize(
    ("text", "flags", "match"),
    [
        (None, ["--model", "acfm_nope"], "unknown model 'acfm_nope'; registered models: .*acfm_bikenyc"),
        ("epoch: 3\n", [], 'unknown key "epoch"'),
        (None, ["--epochs", "-2"], "epochs must be >= 1, got -2"),
        (None, ["--val-fraction", "1.5"], r"val_fraction must be in \[0, 1\)"),
        (None, ["--lr", "0"], "lr must be a positive number"),
        ("data: {len_closness: 3}\n", [], 'unknown key "data.len_closness"'),
        (None, ["--model-kwargs", "[1]"], 'key "model_kwargs": expected dict'),
        ("- a\n- b\n", [], "Unexpected config"),
        ("run: {max_epochs: three}\n", [], 'key "run.max_epochs": expected int or None, got \'three\''),
        ("run: {max_epochs: 1.7}\n", [], 'key "run.max_epochs": expected int or None'),
        ("batch_size: true\n", [], 'key "batch_size": expected int'),
        ("norm: bkm\n", [], "key \"norm\": expected one of 'bn'\\|'gn'\\|'bkn'\\|'none'"),
        (None, ["--norm_options.transition", "exact"], "key \"norm_options.transition\""),
        (None, ["--len-closeness", "0", "--len-period", "0"], "the window is empty"),
    ],
)
def test_bad_config_is_rejected(tmp_path: Path, text: str | None, flags: list[str], match: str) -> None:
    args = list(flags)
    if text is not None:
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        args += ["--config", str(path)]
    with pytest.raises(ConfigError, match=match):
        train.parse_config(args)


def test_cli_prints_one_line_errors(tmp_path: Path) -> None:
    """A user error is one ``error:`` line on stderr, exit code 2, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "stflow.train", "--epochs", "three"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ['error: key "run.max_epochs": expected int or None, got \'three\'']


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config not found: .*absent.yaml"):
        train.parse_config(["--config", str(tmp_path / "absent.yaml")])


def _norm_layers(module: torch.nn.Module) -> dict[str, int]:
    from normlayers import BatchKalmanNorm

    kinds = {"bkn": BatchKalmanNorm, "bn": torch.nn.modules.batchnorm._BatchNorm, "gn": torch.nn.GroupNorm}
    return {name: sum(isinstance(m, cls) and not (name == "bn" and isinstance(m, BatchKalmanNorm))
                      for m in module.modules()) for name, cls in kinds.items()}


@pytest.mark.parametrize(("model", "norm"), [("acfm_bikenyc", "bkn"), ("acfm_bikenyc", "gn"),
                                             ("acfm_bikenyc", "none"), ("stresnet", "bkn")])
def test_norm_from_the_cli_trains_and_evaluates(tiny_city: Path, tmp_path: Path, model: str, norm: str) -> None:
    """``--norm`` builds the network with that norm, the run trains, and ``stflow.evaluate`` rebuilds the same
    network from the checkpoint and reproduces the run's test metrics."""
    out = tmp_path / f"{model}-{norm}"
    extra = ["--len-trend", "1"] if model == "stresnet" else []
    result = train.main(_args(tiny_city, out, "--model", model, "--norm", norm, "--epochs", "1",
                              "--limit-train-batches", "3", *extra))
    assert result["norm"] == norm and np.isfinite(result["test"]["test_rmse"])
    from stflow.evaluate import load_checkpoint

    system, _ = load_checkpoint(result["last_checkpoint"])
    counts = _norm_layers(system.model)
    if norm == "none":
        assert counts == {"bkn": 0, "bn": 0, "gn": 0}
    else:
        assert counts[norm] > 0 and sum(counts.values()) == counts[norm], counts
    if norm == "bkn":  # the Kalman chain is wired: every BKN layer after the first of a chain gets a prior
        from normlayers import BatchKalmanNorm

        layers = [m for m in system.model.modules() if isinstance(m, BatchKalmanNorm)]
        assert sum(m.prior_weight > 0 for m in layers) >= len(layers) - 2
    single = evaluate(result["last_checkpoint"], accelerator="cpu")
    for key in ("test_rmse", "test_mae", "test_samples"):
        assert single[key] == pytest.approx(result["test"][key], rel=1e-5), key


def test_norm_bkn_on_real_bikenyc(bikenyc_dir: Path, tmp_path: Path) -> None:
    """ACFM + BKN on the real BikeNYC history, a few steps, then evaluate on its checkpoint (standard test
    period: 240 hours)."""
    out = tmp_path / "bkn-bikenyc"
    result = train.main(["--model", "acfm_bikenyc", "--dataset", "bikenyc", "--data-dir", str(bikenyc_dir),
                         "--norm", "bkn", "--norm-options.transition", "monte_carlo", "--epochs", "1",
                         "--limit-train-batches", "4", "--limit-val-batches", "2", "--no-progress-bar",
                         "--out-dir", str(out), "--json"])
    assert result["test"]["test_samples"] == 240
    assert result["config"]["norm_options"]["transition"] == "monte_carlo"
    single = evaluate(result["last_checkpoint"], accelerator="cpu")
    assert single["test_rmse"] == pytest.approx(result["test"]["test_rmse"], rel=1e-5)


def test_ddp_with_bkn_synchronizes_the_norm_layers(tiny_city: Path, tmp_path: Path) -> None:
    """``--norm bkn --devices 2 --strategy ddp`` on CPU (gloo): every BKN layer becomes a SyncBatchKalmanNorm,
    the run trains, and the checkpoint evaluates like any other (same state_dict as the unsynchronized layer)."""
    out = tmp_path / "ddp-bkn"
    cmd = [sys.executable, "-m", "stflow.train", *_args(tiny_city, out, "--epochs", "1", "--norm", "bkn"),
           "--limit-train-batches", "2", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    from normlayers import BatchKalmanNorm
    from stflow.evaluate import load_checkpoint

    system, _ = load_checkpoint(ddp["last_checkpoint"])
    assert ddp["sync_bkn_layers"] == sum(isinstance(m, BatchKalmanNorm) for m in system.model.modules()) > 0
    single = evaluate(ddp["last_checkpoint"], accelerator="cpu")
    assert single["test_rmse"] == pytest.approx(ddp["test"]["test_rmse"], rel=1e-5)
