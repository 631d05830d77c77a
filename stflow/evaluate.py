"""``python -m stflow.evaluate``: protocol metrics (and optional figures) of a checkpoint on a test split.

Two kinds of checkpoint:

- a Lightning checkpoint written by ``stflow.train`` (``.../checkpoints/best-*.ckpt`` or ``last.ckpt``): the
  system is rebuilt from its hyper-parameters and the data module from the arguments stored in it (flags
  ``--dataset/--data-dir/...`` override them; the scaler is always the checkpoint's);
- the ACFM authors' plain state dict with ``--model acfm_reference_bikenyc``: loaded strictly by
  :func:`stflow.models.load_reference_checkpoint`, evaluated with the data switches the authors' model needs
  (``compat_weekend_bug=True``, scale 0..267, lc=4, lp=2, lt=0).

Prints RMSE, inflow/outflow RMSE and MAE in original units per the protocol (``--json``: one JSON object);
``--plots DIR`` writes flow maps for ``--hour`` (default: the busiest test hour), RMSE by hour and RMSE per cell.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from stflow.config import parse_cli, run_cli
from stflow.paths import shared_dir
from stflow.plots import write_evaluation_plots
from stflow.safeload import safe_load
from stflow.system import ForecastingSystem
from stflow.train import CHECKPOINT_DATA_KEY, SHARED_DATA_DIRS, format_metrics

__all__ = ["REFERENCE_DATA", "evaluate", "load_checkpoint", "main"]

# Data settings under which the authors' checkpoints were trained (see ../shared/docs/acfm.md).
# Plain data-module arguments (``CrowdFlowDataModule.from_arguments``).
REFERENCE_DATA: dict[str, dict[str, Any]] = {
    "acfm_reference_bikenyc": dict(
        dataset="bikenyc", data_dir=None,
        options=dict(len_closeness=4, len_period=2, len_trend=0, features="acfm", compat_weekend_bug=True,
                     scale_min=0.0, scale_max=267.0),
    ),
}


def load_checkpoint(
    path: str | Path, model: str | None = None
) -> tuple[ForecastingSystem | torch.nn.Module, dict[str, Any]]:
    """(system or bare reference model, data module arguments) from a checkpoint file."""
    path = Path(path)
    raw = safe_load(path)  # weights_only: a crafted pickle is refused, never run
    if isinstance(raw, dict) and "state_dict" in raw and "hyper_parameters" in raw:
        saved = raw["hyper_parameters"].get("model")
        if model is not None and model != saved:
            raise ValueError(f"{path} holds model {saved!r}, not {model!r}")
        if not isinstance(saved, str):
            raise ValueError(f"{path}: the system was built from an nn.Module, not a registered name; load it in code")
        system = ForecastingSystem.load_from_checkpoint(path, map_location="cpu", weights_only=True)
        data = dict(raw.get(CHECKPOINT_DATA_KEY, {}))
        data["options"] = {**dict(data.get("options") or {}), "scale_min": float(system.hparams.scaler_min),
                           "scale_max": float(system.hparams.scaler_max)}
        return system, data
    if model is None:
        raise ValueError(
            f"{path} is a plain state dict, not a stflow checkpoint: pass --model "
            f"({' or '.join(REFERENCE_DATA)}) to evaluate the authors' weights"
        )
    if model not in REFERENCE_DATA:
        raise ValueError(f"a plain state dict can only be loaded as {sorted(REFERENCE_DATA)}, got --model {model!r}")
    from stflow.models import load_reference_checkpoint

    return load_reference_checkpoint(path), copy.deepcopy(REFERENCE_DATA[model])


def _datamodule(data: dict[str, Any], overrides: dict[str, Any]) -> Any:
    from stflow.data import CrowdFlowDataModule

    data = {**data}
    if "dataset" in overrides and "data_dir" not in overrides:
        data["data_dir"] = None  # another dataset: its own default location
    if overrides.get("data_dir", data.get("data_dir")) is None and overrides.get("dataset", data.get("dataset")) in \
            SHARED_DATA_DIRS:
        shared = shared_dir()
        dataset = overrides.get("dataset", data.get("dataset"))
        if shared is None:
            raise FileNotFoundError(f"--data-dir is required for {dataset!r} (no shared data folder here)")
        overrides = {**overrides, "data_dir": str(shared / SHARED_DATA_DIRS[dataset])}
    return CrowdFlowDataModule.from_arguments(data, **overrides)


def evaluate(
    checkpoint: str | Path,
    model: str | None = None,
    data_overrides: dict[str, Any] | None = None,
    plots_dir: str | Path | None = None,
    hour: str | None = None,
    accelerator: str = "auto",
    progress_bar: bool = False,
) -> dict[str, Any]:
    """Test metrics of ``checkpoint`` (keys ``test_rmse``, ``test_rmse_inflow``, ``test_rmse_outflow``,
    ``test_mae``, ``test_samples``), plus ``plots`` (written PNG paths) when ``plots_dir`` is given."""
    loaded, data = load_checkpoint(checkpoint, model)
    overrides = {k: v for k, v in (data_overrides or {}).items() if v is not None}
    datamodule = _datamodule(data, overrides)
    datamodule.setup("test")
    print(f"reading {', '.join(str(p) for p in datamodule.data.files)}", flush=True)
    if isinstance(loaded, ForecastingSystem):
        system = loaded
    else:
        system = ForecastingSystem(
            loaded,
            scaler_min=float(datamodule.scaler.min),
            scaler_max=float(datamodule.scaler.max),
            metric_factor=float(datamodule.metric_factor),
            num_slots=len(datamodule.timestamps),
        )
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=progress_bar, enable_model_summary=False,
    )
    results = trainer.test(system, datamodule=datamodule, verbose=False)
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "model": model or system.hparams.get("model"),
        "dataset": datamodule.hparams["dataset"],
        "data_files": [str(p) for p in datamodule.data.files],
        **{k: float(v) for k, v in results[0].items()},
    }
    if plots_dir is not None:
        batches = trainer.predict(system, dataloaders=datamodule.test_dataloader())
        scaler = datamodule.scaler
        pred = scaler.inverse_transform(torch.cat([b["pred"] for b in batches]).double().numpy())  # (N, 2, H, W)
        true = scaler.inverse_transform(torch.cat([b["target"] for b in batches]).double().numpy())
        index = torch.cat([b["index"] for b in batches]).numpy()
        paths = write_evaluation_plots(
            np.asarray(pred), np.asarray(true), datamodule.timestamps[index], plots_dir, hour, datamodule.metric_factor
        )
        out["plots"] = [str(p) for p in paths]
    return out


@dataclass(frozen=True)
class EvaluateConfig:
    """``python -m stflow.evaluate`` options (also YAML keys through ``--config``)."""

    checkpoint: str  # a stflow .ckpt, or the authors' .pt with --model
    model: str | None = None  # for the authors' state dict: acfm_reference_bikenyc
    dataset: str | None = None  # evaluate on another dataset than the checkpoint's
    data_dir: str | None = None
    batch_size: int | None = None
    test_days: int | None = None
    accelerator: str = "auto"
    plots: str | None = None  # write PNG figures into this folder
    hour: str | None = None  # flow-map hour, e.g. "2014-09-25 08:00" (default: the busiest test hour)

    def validate(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.test_days is not None and self.test_days < 1:
            raise ValueError(f"test_days must be >= 1, got {self.test_days}")


def _json_flag(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object only")


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (``sys.argv[1:]`` when None), evaluate, print; return the metrics dict."""
    cfg, extras = parse_cli(EvaluateConfig, args, prog="python -m stflow.evaluate",
                            description=__doc__.split("\n\n")[0], extra=_json_flag)
    json_only = bool(extras.get("json"))
    overrides = {k: getattr(cfg, k) for k in ("dataset", "data_dir", "batch_size", "test_days")}
    # --json: stdout carries the JSON object only; progress bars and messages go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if json_only else contextlib.nullcontext():
        result = evaluate(cfg.checkpoint, cfg.model, overrides, cfg.plots, cfg.hour, cfg.accelerator,
                          progress_bar=not json_only)
    if not json_only:
        print(f"\n{result['model']} on {result['dataset']} ({result['checkpoint']}): original units, acfm.md protocol")
        print(format_metrics(result))
        for path in result.get("plots", []):
            print(f"wrote {path}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
