"""``python -m stflow.train``: train and test any registered model on TaxiBJ / BikeNYC / the synthetic city.

With no argument: the clean ACFM (``acfm_bikenyc`` preset) trained for a short run on the embedded synthetic city,
then tested; test RMSE / MAE / inflow / outflow are printed as a table and as JSON and written to
``<out_dir>/metrics.json``. Otherwise ``--config acfm_bikenyc`` (a packaged config, or a YAML path) and/or flags
(flags win over the config, the config over the defaults). Every :class:`TrainConfig` field is a YAML key and a
flag (``--data.len_closeness 3``, ``--norm bkn``, ``--norm_options.transition monte_carlo``); the common runner
and window flags have short forms (``--epochs``, ``--out-dir``, ``--resume``, ``--devices``, ``--len-closeness``,
...). Training goes through :func:`stflow.runner.fit` (checkpoint every epoch, ``--resume``, CSV/TensorBoard
logs, early stopping on ``val_loss``, DDP with ``--devices N --strategy ddp``). Ctrl-C stops at the next batch,
saves ``<out_dir>/checkpoints/last.ckpt``, prints the command that continues the run exactly (``--resume``) and
exits with code 130.

Multi-step (``--horizon H``, H > 1): ``--horizon-mode direct`` trains a DIRECT head that outputs the H slots
``t .. t+H-1`` at once (the model's ``horizon`` option; samples from
:class:`stflow.data.horizon.DirectHorizonDataModule`; loss = mean over the steps; val/test metrics per step:
``test_rmse`` is step 1, ``test_rmse_step<k>``, ``test_rmse_mean``); ``recursive`` trains today's one-step model
and rolls it out; ``auto`` (default) is direct for the models that have a direct head
(``stflow.models.direct_models()``: ACFM clean, ST-ResNet, DeepSTN+, STID) and recursive for the others
(persistence, historical average, the authors' ACFM). Either way the best checkpoint is then scored H steps ahead
by ``stflow.evaluate`` (``test_horizon`` in the result and ``metrics.json``).

The defaults are the reference recipe: Adam 3e-4 with lr steps {50: 2e-4, 150: 1e-4, 250: 5e-5, 350: 2e-5,
450: 1e-5}, gradient-norm clip 0.1, batch 64, seed 777; 200 epochs on BikeNYC, 500 on TaxiBJ.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from normlayers.select import DEFAULT_STAT_BATCH
from stflow.config import config_to_dict, normalise_flags, parse_cli, run_cli
from stflow.config import load_config as load_typed_config
from stflow.data.options import CrowdFlowOptions
from stflow.models import NormOptions
from stflow.models.registry import direct_models, list_models, supports_direct
from stflow.paths import shared_dir
from stflow.pool import keep_heap
from stflow.runner import RunConfig, TrainingInterrupted, fit, prepare_out_dir
from stflow.system import REFERENCE_LR_MILESTONES, ForecastingSystem

__all__ = ["TrainConfig", "DEFAULT_EPOCHS", "build_datamodule", "cli", "interrupt_message", "load_config", "main",
           "parse_config", "resume_arguments", "run"]

# Epochs when neither the config nor a flag gives them: short on the synthetic city, the paper's on real sets.
DEFAULT_EPOCHS: dict[str, int] = {"synthetic": 12, "bikenyc": 200, "taxibj": 500}
# Where a real set lives under the shared data folder when --data-dir is not given.
SHARED_DATA_DIRS: dict[str, str] = {"bikenyc": "data/bikenyc", "taxibj": "data/taxibj"}
CHECKPOINT_DATA_KEY = "stflow_data"  # the data module arguments, stored in every checkpoint for stflow.evaluate
CHECKPOINT_HORIZON_KEY = "stflow_horizon"  # {"horizon": H, "mode": "direct"|"recursive"}, in runs with H > 1
HORIZON_MODES = ("auto", "direct", "recursive")


def _default_run() -> RunConfig:
    """The runner settings of a training run: out_dir and max_epochs None = derived from model and dataset."""
    return RunConfig(out_dir=None, max_epochs=None, gradient_clip_val=0.1, loggers=("csv", "tensorboard"))


@dataclass(frozen=True)
class TrainConfig:
    """One training run. YAML configs hold these keys, flags override them (unknown keys are an error)."""

    model: str = "acfm_bikenyc"  # a registered model (stflow.models.list_models())
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # the model's own options
    norm: Literal["bn", "gn", "bkn", "none"] | None = None  # None: the model's own default (BatchNorm for ACFM)
    norm_options: NormOptions = field(default_factory=NormOptions)  # BKN transition / prior weight, GN groups
    dataset: str = "synthetic"  # synthetic | bikenyc | taxibj | a registered spec or a .yaml spec path
    data_dir: str | None = None  # None: synthetic -> generated cache; real sets -> the shared data folder
    data: CrowdFlowOptions = field(default_factory=CrowdFlowOptions)  # window, split, features, scaling
    batch_size: int = 64
    lr: float = 3e-4
    lr_milestones: dict[int, float] = field(default_factory=lambda: dict(REFERENCE_LR_MILESTONES))
    weight_decay: float = 0.0
    loss: Literal["mse", "l1"] = "mse"
    lr_schedule: Literal["step", "cosine"] = "step"  # step: lr_milestones; cosine: lr -> lr * lr_final_factor
    lr_warmup_epochs: int = 0  # cosine only: linear warm-up epochs
    lr_final_factor: float = 0.01  # cosine only: the last epoch's lr / lr
    ema_decay: float | None = None  # weight averaging (EMA) used for validation/test; None: off
    horizon: int = 1  # > 1: forecast H slots ahead (per-step metrics); how: horizon_mode
    horizon_mode: Literal["auto", "direct", "recursive"] = "auto"  # auto: direct when the model has a direct head
    run: RunConfig = field(default_factory=_default_run)  # how to run: epochs, out_dir, resume, devices, seed ...

    cli_aliases: ClassVar[dict[str, str]] = {
        **{f"--{name}": f"--run.{name}" for name in (
            "out_dir", "resume", "overwrite", "seed", "accelerator", "devices", "strategy", "num_nodes", "precision",
            "early_stopping_patience", "limit_train_batches", "limit_val_batches")},
        "--epochs": "--run.max_epochs",
        "--grad_clip": "--run.gradient_clip_val",
        "--no_progress_bar": "--run.progress_bar=false",
        **{f"--{name}": f"--data.{name}" for name in (
            "len_closeness", "len_period", "len_trend", "period_interval", "trend_interval", "test_days",
            "val_fraction", "features")},
    }

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first impossible value."""
        known = list_models()
        if self.model not in known:
            raise ValueError(f"unknown model {self.model!r}; registered models: {', '.join(known)}")
        run = self.run
        if run.max_epochs is not None and run.max_epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {run.max_epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        if self.horizon_mode not in HORIZON_MODES:
            raise ValueError(f"unknown horizon_mode {self.horizon_mode!r}; choose from {HORIZON_MODES}")
        if self.horizon_mode == "direct" and not supports_direct(self.model):
            raise ValueError(f"{self.model} has no direct multi-step head (those with one: "
                             f"{', '.join(direct_models())}); use --horizon-mode recursive")
        if "horizon" in self.model_kwargs:
            raise ValueError("set the horizon with --horizon (and --horizon-mode), not model_kwargs.horizon")
        if self.data.test_days == 0:
            raise ValueError("test_days must be >= 1 for stflow.train (0 test days leaves nothing to test), got 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if run.gradient_clip_val is not None and run.gradient_clip_val <= 0:
            raise ValueError(f"gradient_clip_val must be positive (or null), got {run.gradient_clip_val}")
        if run.early_stopping_patience is not None and run.early_stopping_patience < 1:
            raise ValueError(f"early_stopping_patience must be >= 1, got {run.early_stopping_patience}")
        if run.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {run.num_nodes}")
        if isinstance(run.devices, int) and run.devices < 1 and run.devices != -1:
            raise ValueError(f"devices must be >= 1, -1 or 'auto', got {run.devices}")
        return self

    @property
    def direct(self) -> bool:
        """Whether this run trains a direct head of ``horizon`` > 1 steps (else a one-step model)."""
        if self.horizon == 1 or self.horizon_mode == "recursive":
            return False
        return self.horizon_mode == "direct" or supports_direct(self.model)

    @property
    def resolved_horizon_mode(self) -> str:
        """"direct" or "recursive" (how steps beyond the first are made; "recursive" at horizon 1)."""
        return "direct" if self.direct else "recursive"

    @property
    def seed(self) -> int:
        """The training seed (initial weights, shuffling); ``run.seed``."""
        return 777 if self.run.seed is None else int(self.run.seed)

    @property
    def max_epochs(self) -> int:
        return self.run.max_epochs if self.run.max_epochs is not None else DEFAULT_EPOCHS.get(self.dataset, 100)

    @property
    def resolved_out_dir(self) -> str:
        return self.run.out_dir or str(Path("runs") / f"{self.model}_{self.dataset}")

    def resolved_run(self) -> RunConfig:
        """``run`` with out_dir and max_epochs filled in."""
        return self.run.replace(out_dir=self.resolved_out_dir, max_epochs=self.max_epochs)


def _extra_flags(parser: Any) -> None:
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")


def load_config(name_or_path: str | Path, **overrides: Any) -> TrainConfig:
    """A validated :class:`TrainConfig` from a YAML file or a packaged config name (``acfm_bikenyc``)."""
    return load_typed_config(TrainConfig, name_or_path, **overrides)


def parse_config(args: Sequence[str] | None = None) -> tuple[TrainConfig, bool]:
    """(validated config, json_only) from command-line ``args`` (defaults < --config < flags)."""
    config, extras = parse_cli(TrainConfig, args, prog="python -m stflow.train",
                               description=__doc__.split("\n\n")[0], extra=_extra_flags)
    return config, bool(extras.get("json"))


def build_datamodule(config: TrainConfig) -> pl.LightningDataModule:
    """The configured ``CrowdFlowDataModule`` (a real set's data dir defaults to the shared data folder); a
    ``DirectHorizonDataModule`` (H targets per sample) for a direct multi-step run."""
    from stflow.data import CrowdFlowDataModule, DirectHorizonDataModule

    data_dir = config.data_dir
    if data_dir is None and config.dataset in SHARED_DATA_DIRS:
        shared = shared_dir()
        if shared is None:
            raise FileNotFoundError(f"--data-dir is required for {config.dataset!r} (no shared data folder here)")
        data_dir = str(shared / SHARED_DATA_DIRS[config.dataset])
    if config.direct:
        return DirectHorizonDataModule(dataset=config.dataset, data_dir=data_dir, options=config.data,
                                       batch_size=config.batch_size, seed=config.seed, horizon=config.horizon)
    return CrowdFlowDataModule(
        dataset=config.dataset, data_dir=data_dir, options=config.data, batch_size=config.batch_size, seed=config.seed
    )


class RecordDataConfig(Callback):
    """Stores the data module's arguments in every checkpoint, so ``stflow.evaluate`` can rebuild the data (and,
    when given, ``horizon``: the run's ``{"horizon": H, "mode": ...}`` under :data:`CHECKPOINT_HORIZON_KEY`)."""

    def __init__(self, data_arguments: Mapping[str, Any], horizon: Mapping[str, Any] | None = None) -> None:
        self.data_arguments = dict(data_arguments)
        self.horizon = dict(horizon) if horizon else None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_DATA_KEY] = dict(self.data_arguments)
        if self.horizon is not None:
            checkpoint[CHECKPOINT_HORIZON_KEY] = dict(self.horizon)


def data_arguments(datamodule: Any) -> dict[str, Any]:
    """The plain (JSON-able) arguments that rebuild ``datamodule`` with ``CrowdFlowDataModule.from_arguments``."""
    return datamodule.arguments()


def model_options(config: TrainConfig) -> dict[str, Any]:
    """The model's keyword options: its own ``model_kwargs`` plus the norm choice when one is given.

    BKN's prior weight, when not set, follows the batch size: ``norm_options.stat_batch`` left at its default
    becomes ``batch_size`` (the number of samples each layer's statistics come from).
    """
    options = dict(config.model_kwargs)
    if config.direct:
        options["horizon"] = config.horizon  # the direct head; absent at horizon 1 (today's one-step model)
    if config.norm is not None:
        norm_options = config_to_dict(config.norm_options)
        if config.norm_options.stat_batch == DEFAULT_STAT_BATCH:
            norm_options["stat_batch"] = config.batch_size
        options.update(norm=config.norm, norm_options=norm_options)
    return options


def synchronize_norms(system: ForecastingSystem, run_cfg: RunConfig) -> int:
    """Under data-parallel training (a ``ddp*`` strategy on several devices or nodes) BKN layers become
    :class:`normlayers.SyncBatchKalmanNorm`: the batch moments and the backward's sums are reduced over the
    ranks, so the statistics are those of the whole batch (as ``nn.SyncBatchNorm`` does for BatchNorm). Returns the
    number of synchronized layers (0 when nothing is distributed or the model has no BKN)."""
    devices = run_cfg.devices
    several = (isinstance(devices, int) and (devices > 1 or devices == -1)) or (
        isinstance(devices, list) and len(devices) > 1) or run_cfg.num_nodes > 1
    if not (str(run_cfg.strategy).startswith("ddp") and several):
        return 0
    from normlayers import BatchKalmanNorm, SyncBatchKalmanNorm, convert_sync

    if not any(isinstance(m, BatchKalmanNorm) for m in system.model.modules()):
        return 0
    system.model = convert_sync(system.model)
    return sum(isinstance(m, SyncBatchKalmanNorm) for m in system.model.modules())


def run(config: TrainConfig) -> dict[str, Any]:
    """Train, test, write ``<out_dir>/metrics.json``; return the result dict (see :func:`main`)."""
    start = time.perf_counter()
    prepare_out_dir(config.resolved_run())  # before any work: refuse to clobber a previous run
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    print(f"reading {', '.join(str(p) for p in datamodule.data.files)}", flush=True)
    pl.seed_everything(config.seed, workers=True, verbose=False)  # the initial weights depend on the seed only
    system = ForecastingSystem.from_datamodule(
        config.model,
        datamodule,
        model_kwargs=model_options(config),
        lr=config.lr,
        lr_milestones=config.lr_milestones,
        weight_decay=config.weight_decay,
        loss=config.loss,
        lr_schedule=config.lr_schedule,
        lr_warmup_epochs=config.lr_warmup_epochs,
        lr_final_factor=config.lr_final_factor,
        ema_decay=config.ema_decay,
    )
    run_cfg = config.resolved_run()
    if not system.trainable:
        # No optimiser: one epoch fits/measures the baseline; DDP refuses a module without trainable parameters.
        if run_cfg.devices not in (1, "auto") or run_cfg.num_nodes != 1 or run_cfg.strategy != "auto":
            warnings.warn(f"{config.model} has no trainable parameters: running it on a single device", stacklevel=2)
        run_cfg = run_cfg.replace(max_epochs=1, gradient_clip_val=None, devices=1, strategy="auto", num_nodes=1)
    sync_layers = synchronize_norms(system, run_cfg)
    horizon = {"horizon": config.horizon, "mode": config.resolved_horizon_mode} if config.horizon > 1 else None
    result = fit(system, datamodule, run_cfg, callbacks=[RecordDataConfig(data_arguments(datamodule), horizon)])
    payload: dict[str, Any] = {
        "model": config.model,
        "dataset": config.dataset,
        "norm": config.norm,
        "epochs": int(result.trainer.current_epoch),
        "test": {k: v for k, v in result.test_metrics.items()},
        "val": {k: v for k, v in result.val_metrics.items() if k.startswith("val_")},
        "best_checkpoint": result.best_checkpoint,
        "last_checkpoint": result.last_checkpoint,
        "out_dir": run_cfg.out_dir,
        "data_files": [str(p) for p in datamodule.data.files],
        "sync_bkn_layers": sync_layers,
        "wall_s": time.perf_counter() - start,
        "config": config_to_dict(config),
    }
    payload["protocol"] = "deepst"
    if config.horizon > 1:
        payload["horizon"], payload["horizon_mode"] = config.horizon, config.resolved_horizon_mode
    if config.horizon > 1 and result.trainer.global_rank == 0:
        from stflow.evaluate import evaluate

        checkpoint = result.best_checkpoint or result.last_checkpoint
        multi = evaluate(checkpoint, horizon=config.horizon, accelerator="cpu")
        payload["test_horizon"] = {k: multi[k] for k in ("protocol", "horizon", "mode", "test_samples", "steps")}
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
    keep_heap()  # glibc: no re-faulting of freed buffers every step (2026-12-07: default run 39.5 -> 35.4 s)
    # --json: stdout carries the JSON object only; progress bars and messages go to stderr.
    with contextlib.redirect_stdout(sys.stderr) if json_only else contextlib.nullcontext():
        result = run(config)
    if result["global_rank"] == 0:
        if not json_only:
            print(f"\n{config.model} on {config.dataset}: test metrics (original units, protocol deepst)")
            print(format_metrics(result["test"]))
            if result.get("test_horizon"):
                print(f"(step 1 above; {config.horizon} steps, {result['horizon_mode']})")
            for h, step in enumerate(result.get("test_horizon", {}).get("steps", [])[1:], start=2):
                print(f"step {h} ({result['horizon_mode']}): RMSE {step['rmse']:.4f}, MAE {step['mae']:.4f}")
            print(f"wall time {result['wall_s']:.1f} s; out dir {result['out_dir']}")
        print(json.dumps({"model": config.model, "dataset": config.dataset, **result["test"]}))
    return result


def resume_arguments(argv: Sequence[str]) -> list[str]:
    """The arguments that continue an interrupted run: ``argv`` with ``--resume`` (its ``last.ckpt``) in place of
    any ``--resume``/``--overwrite`` it had (``--overwrite false`` added when its config file overwrites)."""
    dropped = {"--run.resume", "--run.overwrite"}
    kept: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if normalise_flags([token], TrainConfig.cli_aliases)[0].partition("=")[0] in dropped:
            while "=" not in token and i < len(argv) and not argv[i].startswith("--"):
                i += 1  # the flag's value
            continue
        kept.append(token)
    kept.append("--resume")
    with contextlib.suppress(Exception):  # a config file may set overwrite: the command must not
        if parse_config([a for a in kept if a != "--debug"])[0].run.overwrite:
            kept += ["--overwrite", "false"]
    return kept


def interrupt_message(stop: TrainingInterrupted, argv: Sequence[str]) -> str:
    """The one line printed when Ctrl-C stops a run: where it stopped, and the command that continues it."""
    where = str(stop) if stop.stage == "fit" else f"{stop} (while testing)"
    if stop.checkpoint is None:
        return f"{where}; no checkpoint was saved, nothing to resume"
    command = shlex.join(["python", "-m", "stflow.train", *resume_arguments(argv)])
    return f"{where}; state saved to {stop.checkpoint}; continue with: {command}"


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m stflow.train``: :func:`main` through ``run_cli``; Ctrl-C prints :func:`interrupt_message` on
    stderr (after Lightning saved ``last.ckpt``) and returns 130, the shell's code for an interrupted command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return run_cli(main, argv)
    except TrainingInterrupted as stop:
        if stop.rank == 0:  # one line, not one per DDP process
            print(interrupt_message(stop, argv), file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # before training started (reading data, building the model)
        print("interrupted before training started; nothing saved", file=sys.stderr, flush=True)
    return 130


if __name__ == "__main__":
    sys.exit(cli())
