"""``python -m stflow.train``: train and test any registered model on TaxiBJ / BikeNYC / the synthetic city.

With no argument: the clean ACFM (``acfm_bikenyc`` preset) trained for a short run on the embedded synthetic city,
then tested; test RMSE / MAE / inflow / outflow are printed as a table and as JSON and written to
``<out_dir>/metrics.json``. Otherwise ``--config configs/acfm_bikenyc.yaml`` and/or flags (flags win over the
config, the config over the defaults). Training goes through :func:`stflow.runner.fit` (checkpoint every epoch,
``--resume``, CSV/TensorBoard logs, early stopping on ``val_loss``, DDP with ``--devices N --strategy ddp``).

The defaults are the reference recipe: Adam 3e-4 with lr steps {50: 2e-4, 150: 1e-4, 250: 5e-5, 350: 2e-5,
450: 1e-5}, gradient-norm clip 0.1, batch 64, seed 777; 200 epochs on BikeNYC, 500 on TaxiBJ.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import Callback

from stflow.models.registry import list_models
from stflow.paths import shared_dir
from stflow.runner import RunConfig, fit
from stflow.system import REFERENCE_LR_MILESTONES, ForecastingSystem

__all__ = ["TrainConfig", "DEFAULT_EPOCHS", "build_datamodule", "load_config", "main", "parse_config", "run"]

# Epochs when neither the config nor a flag gives them: short on the synthetic city, the paper's on real sets.
DEFAULT_EPOCHS: dict[str, int] = {"synthetic": 12, "bikenyc": 200, "taxibj": 500}
# Where a real set lives under the shared data folder when --data-dir is not given.
SHARED_DATA_DIRS: dict[str, str] = {"bikenyc": "data/bikenyc", "taxibj": "data/taxibj"}
CHECKPOINT_DATA_KEY = "stflow_data"  # the data module arguments, stored in every checkpoint for stflow.evaluate


@dataclass
class TrainConfig:
    """One training run. YAML configs hold these keys (unknown keys are an error)."""

    model: str = "acfm_bikenyc"  # a registered model (stflow.models.list_models())
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the model's own options
    dataset: str = "synthetic"  # synthetic | bikenyc | taxibj | a registered spec
    data_dir: str | None = None  # None: synthetic -> generated cache; real sets -> the shared data folder
    data: dict[str, Any] = field(default_factory=dict)  # other CrowdFlowDataModule arguments (len_closeness, ...)
    val_fraction: float = 0.1
    batch_size: int = 64
    epochs: int | None = None  # None: DEFAULT_EPOCHS[dataset]
    lr: float = 3e-4
    lr_milestones: dict[int, float] = field(default_factory=lambda: dict(REFERENCE_LR_MILESTONES))
    weight_decay: float = 0.0
    loss: str = "mse"
    gradient_clip_val: float | None = 0.1
    seed: int = 777
    out_dir: str | None = None  # None: runs/<model>_<dataset> under the current directory
    resume: bool | str = False  # True: <out_dir>/checkpoints/last.ckpt, or a checkpoint path
    accelerator: str = "auto"
    devices: int | str = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    early_stopping_patience: int | None = None
    progress_bar: bool = True
    loggers: list[str] = field(default_factory=lambda: ["csv", "tensorboard"])
    limit_train_batches: float | int | None = None
    limit_val_batches: float | int | None = None

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first impossible value."""
        known = list_models()
        if self.model not in known:
            raise ValueError(f"unknown model {self.model!r}; registered models: {', '.join(known)}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be positive (or null), got {self.gradient_clip_val}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1, got {self.early_stopping_patience}")
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        if isinstance(self.devices, int) and self.devices < 1 and self.devices != -1:
            raise ValueError(f"devices must be >= 1, -1 or 'auto', got {self.devices}")
        for name in ("model_kwargs", "data", "lr_milestones"):
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"{name} must be a mapping, got {type(getattr(self, name)).__name__}")
        overlap = {"dataset", "data_dir", "val_fraction", "batch_size", "seed"} & set(self.data)
        if overlap:
            raise ValueError(f"set {sorted(overlap)} as top-level keys, not inside 'data'")
        _check_datamodule_kwargs(self.data)
        return self

    @property
    def max_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS.get(self.dataset, 100)

    @property
    def resolved_out_dir(self) -> str:
        return self.out_dir or str(Path("runs") / f"{self.model}_{self.dataset}")


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _datamodule_class() -> type:
    from stflow.data import CrowdFlowDataModule

    return CrowdFlowDataModule


def _check_datamodule_kwargs(data: Mapping[str, Any]) -> None:
    accepted = set(inspect.signature(_datamodule_class().__init__).parameters) - {"self"}
    unknown = sorted(set(data) - accepted)
    if unknown:
        raise ValueError(f"unknown data module argument(s) {unknown} in 'data'; accepted: {sorted(accepted)}")


def load_config(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML config, its keys checked against :class:`TrainConfig`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config must be a mapping of keys, got {type(values).__name__}")
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{path}: unknown config key(s) {unknown}; allowed keys: {sorted(_FIELDS)}")
    return values


def _json_mapping(text: str, flag: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} must be a JSON object, got {text!r} ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, got {text!r}")
    return value


def _devices(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def _resume(text: str) -> bool | str:
    return True if text.lower() in ("true", "last", "1", "yes") else text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stflow.train", description=__doc__.split("\n\n")[0])
    s = argparse.SUPPRESS  # flags not given stay absent, so the config's values survive
    p.add_argument("--config", help="YAML config (keys of TrainConfig); flags override it")
    p.add_argument("--model", default=s, help=f"registered model: {', '.join(list_models())}")
    p.add_argument("--model-kwargs", dest="model_kwargs", default=s, help="model options as a JSON object")
    p.add_argument("--dataset", default=s, help="synthetic | bikenyc | taxibj")
    p.add_argument("--data-dir", dest="data_dir", default=s)
    p.add_argument("--data-kwargs", dest="data", default=s, help="other data module arguments, JSON object")
    p.add_argument("--len-closeness", dest="len_closeness", type=int, default=s)
    p.add_argument("--len-period", dest="len_period", type=int, default=s)
    p.add_argument("--len-trend", dest="len_trend", type=int, default=s)
    p.add_argument("--test-days", dest="test_days", type=int, default=s)
    p.add_argument("--features", default=s, help="external features: acfm | stresnet | none")
    p.add_argument("--val-fraction", dest="val_fraction", type=float, default=s)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=s)
    p.add_argument("--epochs", type=int, default=s)
    p.add_argument("--lr", type=float, default=s)
    p.add_argument("--lr-milestones", dest="lr_milestones", default=s, help='JSON, e.g. {"50": 2e-4}')
    p.add_argument("--weight-decay", dest="weight_decay", type=float, default=s)
    p.add_argument("--loss", choices=["mse", "l1"], default=s)
    p.add_argument("--grad-clip", dest="gradient_clip_val", type=float, default=s)
    p.add_argument("--seed", type=int, default=s)
    p.add_argument("--out-dir", dest="out_dir", default=s)
    p.add_argument("--resume", nargs="?", const=True, type=_resume, default=s,
                   help="resume from <out-dir>/checkpoints/last.ckpt, or from the given checkpoint")
    p.add_argument("--accelerator", default=s, help="auto | cpu | gpu | ...")
    p.add_argument("--devices", type=_devices, default=s)
    p.add_argument("--strategy", default=s, help="auto | ddp | ddp_spawn | ...")
    p.add_argument("--num-nodes", dest="num_nodes", type=int, default=s)
    p.add_argument("--precision", default=s)
    p.add_argument("--early-stopping-patience", dest="early_stopping_patience", type=int, default=s)
    p.add_argument("--no-progress-bar", dest="progress_bar", action="store_false", default=s)
    p.add_argument("--limit-train-batches", dest="limit_train_batches", type=float, default=s)
    p.add_argument("--limit-val-batches", dest="limit_val_batches", type=float, default=s)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    return p


_DATA_FLAGS = ("len_closeness", "len_period", "len_trend", "test_days", "features")


def parse_config(args: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """(validated config, json_only) from command-line ``args`` (defaults < --config < flags)."""
    ns = vars(_parser().parse_args(list(sys.argv[1:] if args is None else args)))
    json_only = bool(ns.pop("json"))
    config_path = ns.pop("config", None)
    values: dict[str, Any] = load_config(config_path) if config_path else {}
    for key in ("model_kwargs", "data", "lr_milestones"):
        if isinstance(ns.get(key), str):
            ns[key] = _json_mapping(ns[key], "--" + key.replace("_", "-"))
    data = dict(values.get("data") or {})
    data.update(ns.pop("data", {}))
    data.update({k: ns.pop(k) for k in _DATA_FLAGS if k in ns})
    values.update(ns)
    values["data"] = data
    for key in ("limit_train_batches", "limit_val_batches"):  # 5.0 from the flag means 5 batches
        if isinstance(values.get(key), float) and values[key].is_integer() and values[key] > 1:
            values[key] = int(values[key])
    if "lr_milestones" in values and isinstance(values["lr_milestones"], Mapping):
        values["lr_milestones"] = {int(k): float(v) for k, v in values["lr_milestones"].items()}
    try:
        config = TrainConfig(**values)
    except TypeError as err:
        raise ValueError(f"bad config: {err}") from err
    return config.validate(), json_only


def build_datamodule(config: TrainConfig) -> pl.LightningDataModule:
    """The configured ``CrowdFlowDataModule`` (a real set's data dir defaults to the shared data folder)."""
    data_dir = config.data_dir
    if data_dir is None and config.dataset in SHARED_DATA_DIRS:
        shared = shared_dir()
        if shared is None:
            raise FileNotFoundError(f"--data-dir is required for {config.dataset!r} (no shared data folder here)")
        data_dir = str(shared / SHARED_DATA_DIRS[config.dataset])
    return _datamodule_class()(
        dataset=config.dataset,
        data_dir=data_dir,
        val_fraction=config.val_fraction,
        batch_size=config.batch_size,
        seed=config.seed,
        **config.data,
    )


class RecordDataConfig(Callback):
    """Stores the data module's arguments in every checkpoint, so ``stflow.evaluate`` can rebuild the data."""

    def __init__(self, data_kwargs: Mapping[str, Any]) -> None:
        self.data_kwargs = dict(data_kwargs)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_DATA_KEY] = dict(self.data_kwargs)


def data_kwargs_of(config: TrainConfig, datamodule: Any) -> dict[str, Any]:
    """The arguments that rebuild ``datamodule`` (the data dir as resolved)."""
    data_dir = getattr(datamodule, "data_dir", None) if config.data_dir is None else config.data_dir
    return dict(
        dataset=config.dataset,
        data_dir=None if data_dir is None else str(Path(data_dir).resolve()),
        val_fraction=config.val_fraction,
        batch_size=config.batch_size,
        seed=config.seed,
        **config.data,
    )


def run(config: TrainConfig) -> dict[str, Any]:
    """Train, test, write ``<out_dir>/metrics.json``; return the result dict (see :func:`main`)."""
    start = time.perf_counter()
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    pl.seed_everything(config.seed, workers=True, verbose=False)  # the initial weights depend on the seed only
    system = ForecastingSystem.from_datamodule(
        config.model,
        datamodule,
        model_kwargs=config.model_kwargs,
        lr=config.lr,
        lr_milestones=config.lr_milestones,
        weight_decay=config.weight_decay,
        loss=config.loss,
    )
    run_cfg = RunConfig(
        out_dir=config.resolved_out_dir,
        max_epochs=config.max_epochs,
        seed=config.seed,
        accelerator=config.accelerator,
        devices=config.devices,
        strategy=config.strategy,
        num_nodes=config.num_nodes,
        precision=config.precision,
        gradient_clip_val=config.gradient_clip_val,
        early_stopping_patience=config.early_stopping_patience,
        resume=config.resume,
        progress_bar=config.progress_bar,
        loggers=tuple(config.loggers),
        limit_train_batches=config.limit_train_batches,
        limit_val_batches=config.limit_val_batches,
    )
    if not system.trainable:
        # No optimiser: one epoch fits/measures the baseline; DDP refuses a module without trainable parameters.
        if config.devices not in (1, "auto") or config.num_nodes != 1 or config.strategy != "auto":
            warnings.warn(f"{config.model} has no trainable parameters: running it on a single device")
        run_cfg = run_cfg.replace(max_epochs=1, gradient_clip_val=None, devices=1, strategy="auto", num_nodes=1)
    result = fit(system, datamodule, run_cfg, callbacks=[RecordDataConfig(data_kwargs_of(config, datamodule))])
    payload: dict[str, Any] = {
        "model": config.model,
        "dataset": config.dataset,
        "epochs": int(result.trainer.current_epoch),
        "test": {k: v for k, v in result.test_metrics.items()},
        "val": {k: v for k, v in result.val_metrics.items() if k.startswith("val_")},
        "best_checkpoint": result.best_checkpoint,
        "last_checkpoint": result.last_checkpoint,
        "out_dir": run_cfg.out_dir,
        "wall_s": time.perf_counter() - start,
        "config": dataclasses.asdict(config),
    }
    if result.trainer.global_rank == 0:
        Path(run_cfg.out_dir, "metrics.json").write_text(json.dumps(payload, indent=2, default=str))
    payload["global_rank"] = result.trainer.global_rank
    return payload


def format_metrics(metrics: Mapping[str, float], prefix: str = "test_") -> str:
    """A two-column table of the protocol metrics."""
    rows = [("RMSE", "rmse"), ("RMSE inflow", "rmse_inflow"), ("RMSE outflow", "rmse_outflow"), ("MAE", "mae")]
    lines = [f"{'metric':<14}{'value':>10}", "-" * 24]
    lines += [f"{label:<14}{metrics[prefix + key]:>10.4f}" for label, key in rows if prefix + key in metrics]
    if prefix + "samples" in metrics:
        lines.append(f"{'samples':<14}{int(metrics[prefix + 'samples']):>10d}")
    return "\n".join(lines)


def main(args: list[str] | None = None) -> dict[str, Any]:
    """Parse ``args`` (``sys.argv[1:]`` when None), train, test, print; return the result dict
    (``test``: test_rmse, test_rmse_inflow, test_rmse_outflow, test_mae, ...; ``val``; checkpoints; ``wall_s``)."""
    config, json_only = parse_config(args)
    result = run(config)
    if result["global_rank"] == 0:
        if not json_only:
            print(f"\n{config.model} on {config.dataset}: test metrics (original units, protocol of acfm.md)")
            print(format_metrics(result["test"]))
            print(f"wall time {result['wall_s']:.1f} s; out dir {result['out_dir']}")
        print(json.dumps({"model": config.model, "dataset": config.dataset, **result["test"]}))
    return result


if __name__ == "__main__":
    main()
