"""``python -m stflow.evaluate``: protocol metrics (and optional figures) of a checkpoint on a test split.

Two kinds of checkpoint:

- a Lightning checkpoint written by ``stflow.train`` (``.../checkpoints/best-*.ckpt`` or ``last.ckpt``): the
  system is rebuilt from its hyper-parameters and the data module from the arguments stored in it (flags
  ``--dataset/--data-dir/...`` override them; the scaler is always the checkpoint's);
- the ACFM authors' plain state dict with ``--model acfm_reference_bikenyc``: loaded strictly by
  :func:`stflow.models.load_reference_checkpoint`, evaluated with the data switches the authors' model needs
  (``compat_weekend_bug=True``, scale 0..267, lc=4, lp=2, lt=0).

Multi-step: ``--horizon H`` scores H steps (per step and averaged) over the test origins whose H targets all lie in
the test period: a checkpoint with a DIRECT head (``stflow.train --horizon K``, direct mode; the model's
``horizon``) is scored from its direct output (default ``--horizon`` = its K; more than K is an error); a one-step
model (default 1) by recursive rollout (:mod:`stflow.forecast`).

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
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch

from stflow.config import parse_cli, run_cli
from stflow.forecast import model_horizon, score, test_samples
from stflow.models.baselines import HistoricalAverage
from stflow.paths import shared_dir
from stflow.plots import write_evaluation_plots
from stflow.protocols import PROTOCOL_DESCRIPTIONS, check_protocol
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
    # 77-dim vector (calendar, holidays, previous-slot meteorology) with both of the authors' slips; min-max fitted
    # on every slot before the last 28 days (val_fraction 0), as their code does. Built and tested with a state
    # dict generated from the model itself: the authors' TaxiBJ file is not available here.
    "acfm_reference_taxibj": dict(
        dataset="taxibj", data_dir=None,
        options=dict(len_closeness=4, len_period=2, len_trend=0, features="acfm", compat_weekend_bug=True,
                     compat_meteorology_bug=True, val_fraction=0.0),
    ),
}
BASELINES = ("historical_average", "persistence")  # evaluated without a checkpoint (fitted on the protocol's train)


def default_data_dir(dataset: str) -> str | None:
    """The shared data folder of a real dataset (None for the others)."""
    if dataset not in SHARED_DATA_DIRS:
        return None
    shared = shared_dir()
    if shared is None:
        raise FileNotFoundError(f"--data-dir is required for {dataset!r} (no shared data folder here)")
    return str(shared / SHARED_DATA_DIRS[dataset])


def recognise_reference(state: Any) -> str | None:
    """The ``acfm_reference_*`` model an authors' state dict fits (from its tensor shapes), else None."""
    if not isinstance(state, dict) or "extnn.model.0.weight" not in state:
        return None
    ext_dim = int(state["extnn.model.0.weight"].shape[1])
    return {33: "acfm_reference_bikenyc", 77: "acfm_reference_taxibj"}.get(ext_dim)


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
        guess = recognise_reference(raw)
        hint = f"--model {guess}" if guess else f"--model ({' or '.join(REFERENCE_DATA)})"
        raise ValueError(
            f"{path} is a plain state dict, not a stflow checkpoint: pass {hint} to evaluate the authors' weights"
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
    protocol: str = "deepst",
    horizon: int | None = None,
) -> dict[str, Any]:
    """Test metrics of ``checkpoint`` under ``protocol`` (:mod:`stflow.protocols`) and ``horizon``.

    ``horizon`` None: the checkpoint's direct head's steps, 1 for a one-step model. ``deepst`` with horizon 1 and a
    one-step model runs the Lightning test loop: keys ``test_rmse``, ``test_rmse_inflow``, ``test_rmse_outflow``,
    ``test_mae``, ``test_samples``. Otherwise (``stssl``, ``horizon > 1`` or a direct head:
    :func:`stflow.forecast.score`): ``test_<metric>`` = the mean over the steps (also ``test_<metric>_mean``),
    ``test_<metric>_step<k>`` and ``steps`` = one dict per step, ``mode`` "direct" or "recursive". Every result
    holds ``protocol`` and ``horizon``; ``plots`` (PNG paths) when ``plots_dir`` is given.
    ``checkpoint=None`` with ``model="historical_average"|"persistence"``: the baseline, fitted on the protocol's
    training slots of ``data_overrides``' dataset.
    """
    check_protocol(protocol)
    if horizon is not None and horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    if checkpoint is None:
        return _evaluate_baseline(model, data_overrides or {}, protocol, horizon or 1)
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
    steps = model_horizon(system.eval_model)  # > 1: a direct head
    horizon = steps if horizon is None else horizon
    if horizon > steps > 1:
        raise ValueError(f"{checkpoint} has a direct head of {steps} steps: --horizon must be <= {steps}, got "
                         f"{horizon}")
    if protocol != "deepst" or horizon > 1 or steps > 1:
        if plots_dir is not None:
            raise ValueError("--plots is available with the deepst protocol at horizon 1 of a one-step model only")
        scores = score(system.eval_model, datamodule, protocol, horizon)
        return {"checkpoint": str(checkpoint), "model": model or system.hparams.get("model"),
                "dataset": datamodule.hparams["dataset"], "data_files": [str(p) for p in datamodule.data.files],
                **_flatten(scores)}
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
        "protocol": "deepst",
        "horizon": 1,
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


def _flatten(scores: dict[str, Any]) -> dict[str, Any]:
    """:func:`stflow.forecast.score`'s result as the CLI's flat JSON (``test_*`` = the mean over the steps, also as
    ``test_*_mean``; ``test_*_step<k>`` per step)."""
    per_step = {f"test_{k}_step{i}": step[k] for k in scores["mean"] for i, step in enumerate(scores["steps"], 1)}
    return {"protocol": scores["protocol"], "horizon": scores["horizon"], "mode": scores["mode"],
            "test_samples": float(scores["origins"]), **{f"test_{k}": v for k, v in scores["mean"].items()},
            **{f"test_{k}_mean": v for k, v in scores["mean"].items()}, **per_step, "steps": scores["steps"],
            "test_period": [scores["test_first"], scores["test_last"]]}


def _evaluate_baseline(model: str | None, overrides: dict[str, Any], protocol: str, horizon: int) -> dict[str, Any]:
    """A parameter-free baseline on ``overrides``' dataset (ACFM's window), fitted on the protocol's train slots."""
    if model not in BASELINES:
        raise ValueError(f"--checkpoint is required (only the baselines {', '.join(BASELINES)} run without one)")
    from stflow.data import CrowdFlowDataModule
    from stflow.models.registry import build_model
    from stflow.system import data_keywords

    overrides = {k: v for k, v in overrides.items() if v is not None}
    dataset = overrides.pop("dataset", "synthetic")
    data_dir = overrides.pop("data_dir", None) or default_data_dir(dataset)
    datamodule = CrowdFlowDataModule(dataset=dataset, data_dir=data_dir, **overrides)
    datamodule.setup("test")
    print(f"reading {', '.join(str(p) for p in datamodule.data.files)}", flush=True)
    net = build_model(model, **data_keywords(datamodule))
    if isinstance(net, HistoricalAverage):
        _, train_mask = test_samples(datamodule.data, protocol)
        net.fit_history(datamodule.flows, datamodule.timestamps, train_mask, datamodule.scaler)
    scores = score(net, datamodule, protocol, horizon)
    return {"checkpoint": None, "model": model, "dataset": dataset,
            "data_files": [str(p) for p in datamodule.data.files], **_flatten(scores)}


def format_result(result: dict[str, Any]) -> str:
    """The metric table of an evaluation, protocol named in the header; one column per step when horizon > 1."""
    protocol = result.get("protocol", "deepst")
    if protocol == "deepst" and result.get("horizon", 1) == 1:
        return f"protocol {PROTOCOL_DESCRIPTIONS['deepst']}\n" + format_metrics(result)
    keys = list(result["steps"][0])
    header = f"{'metric':<14}" + "".join(f"{'step ' + str(i + 1):>10}" for i in range(len(result["steps"])))
    header += f"{'mean':>10}"
    lines = [f"protocol {PROTOCOL_DESCRIPTIONS[protocol]}; horizon {result['horizon']} ({result['mode']}), "
             f"{int(result['test_samples'])} origins", header, "-" * len(header)]
    for key in keys:
        fmt = "{:>10.0f}" if key.endswith("_values") else "{:>10.4f}"
        lines.append(f"{key:<14}" + "".join(fmt.format(s[key]) for s in result["steps"])
                     + fmt.format(result[f"test_{key}"]))
    return "\n".join(lines)


@dataclass(frozen=True)
class EvaluateConfig:
    """``python -m stflow.evaluate`` options (also YAML keys through ``--config``)."""

    checkpoint: str | None = None  # a stflow .ckpt, or the authors' .pt with --model; None: a baseline by --model
    model: str | None = None  # the authors' state dict: acfm_reference_bikenyc|taxibj; no checkpoint: a baseline
    protocol: Literal["deepst", "stssl"] = "deepst"  # stflow.protocols
    horizon: int | None = None  # steps ahead, metrics per step and averaged; None: a direct head's steps, else 1
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
        if self.horizon is not None and self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if self.checkpoint is None and self.model not in BASELINES:
            raise ValueError(f"--checkpoint is required (only the baselines {', '.join(BASELINES)} run without one)")


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
                          progress_bar=not json_only, protocol=cfg.protocol, horizon=cfg.horizon)
    if not json_only:
        print(f"\n{result['model']} on {result['dataset']} ({result['checkpoint']}): original units")
        print(format_result(result))
        for path in result.get("plots", []):
            print(f"wrote {path}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
