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

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from stflow.paths import shared_dir
from stflow.plots import write_evaluation_plots
from stflow.system import ForecastingSystem
from stflow.train import CHECKPOINT_DATA_KEY, SHARED_DATA_DIRS, format_metrics

__all__ = ["REFERENCE_DATA", "evaluate", "load_checkpoint", "main"]

# Data settings under which the authors' checkpoints were trained (see ../shared/docs/acfm.md).
REFERENCE_DATA: dict[str, dict[str, Any]] = {
    "acfm_reference_bikenyc": dict(
        dataset="bikenyc", len_closeness=4, len_period=2, len_trend=0, features="acfm",
        compat_weekend_bug=True, scale_min=0.0, scale_max=267.0,
    ),
}


def load_checkpoint(path: str | Path, model: str | None = None) -> tuple[ForecastingSystem | torch.nn.Module, dict[str, Any]]:
    """(system or bare reference model, data module arguments) from a checkpoint file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # zip/pickle errors vary by torch version
        raise ValueError(f"{path}: not a readable torch checkpoint ({err})") from err
    if isinstance(raw, dict) and "state_dict" in raw and "hyper_parameters" in raw:
        saved = raw["hyper_parameters"].get("model")
        if model is not None and model != saved:
            raise ValueError(f"{path} holds model {saved!r}, not {model!r}")
        if not isinstance(saved, str):
            raise ValueError(f"{path}: the system was built from an nn.Module, not a registered name; load it in code")
        system = ForecastingSystem.load_from_checkpoint(path, map_location="cpu", weights_only=False)
        data = dict(raw.get(CHECKPOINT_DATA_KEY, {}))
        data.update(scale_min=float(system.hparams.scaler_min), scale_max=float(system.hparams.scaler_max))
        return system, data
    if model is None:
        raise ValueError(
            f"{path} is a plain state dict, not a stflow checkpoint: pass --model "
            f"({' or '.join(REFERENCE_DATA)}) to evaluate the authors' weights"
        )
    if model not in REFERENCE_DATA:
        raise ValueError(f"a plain state dict can only be loaded as {sorted(REFERENCE_DATA)}, got --model {model!r}")
    from stflow.models import load_reference_checkpoint

    return load_reference_checkpoint(path), dict(REFERENCE_DATA[model])


def _datamodule(data: dict[str, Any]) -> Any:
    from stflow.data import CrowdFlowDataModule

    if data.get("data_dir") is None and data.get("dataset") in SHARED_DATA_DIRS:
        shared = shared_dir()
        if shared is None:
            raise FileNotFoundError(f"--data-dir is required for {data['dataset']!r} (no shared data folder here)")
        data["data_dir"] = str(shared / SHARED_DATA_DIRS[data["dataset"]])
    return CrowdFlowDataModule(**data)


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
    if "dataset" in overrides and "data_dir" not in overrides:
        data.pop("data_dir", None)  # another dataset: its own default location
    data.update(overrides)
    datamodule = _datamodule(data)
    datamodule.setup("test")
    if isinstance(loaded, ForecastingSystem):
        system = loaded
    else:
        system = ForecastingSystem(
            loaded,
            scaler_min=float(data["scale_min"]),
            scaler_max=float(data["scale_max"]),
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
        "dataset": data.get("dataset"),
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stflow.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a stflow .ckpt, or the authors' .pt with --model")
    p.add_argument("--model", help="for the authors' state dict: " + ", ".join(REFERENCE_DATA))
    p.add_argument("--dataset")
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--test-days", dest="test_days", type=int)
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--plots", help="write PNG figures into this folder")
    p.add_argument("--hour", help='flow-map hour, e.g. "2014-09-25 08:00" (default: the busiest test hour)')
    p.add_argument("--json", action="store_true", help="print one JSON object only")
    return p


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (``sys.argv[1:]`` when None), evaluate, print; return the metrics dict."""
    ns = _parser().parse_args(list(sys.argv[1:] if args is None else args))
    overrides = {k: getattr(ns, k) for k in ("dataset", "data_dir", "batch_size", "test_days")}
    result = evaluate(ns.checkpoint, ns.model, overrides, ns.plots, ns.hour, ns.accelerator, progress_bar=not ns.json)
    if not ns.json:
        print(f"\n{result['model']} on {result['dataset']} ({result['checkpoint']}): original units, acfm.md protocol")
        print(format_metrics(result))
        for path in result.get("plots", []):
            print(f"wrote {path}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
