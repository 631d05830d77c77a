"""ONE Lightning system for every forecasting model of the registry (tsl's "predictor" pattern).

The model is a plain ``nn.Module`` taking the data module's batch dict and returning a (B, 2, H, W) prediction
scaled to [-1, 1]. The system owns the loss (on scaled values), the optimiser and lr steps of the reference
recipe, and three :class:`~stflow.metrics.FlowMetrics` instances (train / val / test) computed in ORIGINAL units.
Models with ``trainable = False`` (historical average, persistence) are run with manual optimisation and no
optimiser: an epoch of "training" only fits their history (``fit_history``) and measures them.

Two optional training aids (off by default, so the reference recipe is unchanged): ``lr_schedule="cosine"``
(cosine decay from ``lr`` to ``lr * lr_final_factor`` over the run's epochs, after ``lr_warmup_epochs`` of linear
warm-up; ``lr_milestones`` are then ignored) and ``ema_decay`` (an exponential moving average of the weights and
buffers, updated after every optimiser step; validation, test, prediction and ``forward`` use the averaged copy
``ema_model``, which is saved in checkpoints, so ``stflow.evaluate`` and the best-validation checkpoint see it too).

Logged: ``train_loss`` (per step and epoch), ``train_rmse``; ``val_loss`` (the scaled loss over the whole
validation split), ``val_rmse``, ``val_mae``...; ``test_loss``, ``test_rmse``, ``test_rmse_inflow``,
``test_rmse_outflow``, ``test_mae``, ``test_samples``.

Direct multi-step models (``model.horizon`` H > 1, :mod:`stflow.models.horizon`, trained on a
:class:`~stflow.data.horizon.DirectHorizonDataModule`): prediction and target are (B, H, 2, h, w), ``index`` (B,) the
first target's row. The loss is the mean over the steps of each step's loss (= the loss over every value: the
steps hold equally many); ``<stage>_loss`` is that mean (so the best checkpoint is chosen on all steps). Metrics:
``<stage>_rmse`` / ``_rmse_inflow`` / ``_rmse_outflow`` / ``_mae`` keep today's names for STEP 1 (comparable with a
one-step model), ``<stage>_<metric>_step<k>`` for every step k = 1..H and ``<stage>_<metric>_mean`` their mean.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from stflow.metrics import FlowMetrics
from stflow.models.registry import DATA_KEYWORDS, build_model

__all__ = ["ForecastingSystem", "StepSchedule", "CosineSchedule", "REFERENCE_LR_MILESTONES", "LR_SCHEDULES",
           "data_keywords"]

# The reference recipe: epoch -> learning rate (Adam, 3e-4 before epoch 50).
REFERENCE_LR_MILESTONES: dict[int, float] = {50: 2e-4, 150: 1e-4, 250: 5e-5, 350: 2e-5, 450: 1e-5}
LOSSES = ("mse", "l1")
LR_SCHEDULES = ("step", "cosine")


@dataclass
class StepSchedule:
    """Multiplicative factor of ``LambdaLR`` giving ``milestones[e]`` from epoch e on (``base_lr`` before).

    A dataclass rather than a lambda so ``LambdaLR.state_dict`` (hence checkpoints and resume) keeps it.
    """

    base_lr: float
    milestones: dict[int, float]

    def __call__(self, epoch: int) -> float:
        lr = self.base_lr
        for start in sorted(self.milestones):
            if epoch >= start:
                lr = self.milestones[start]
        return lr / self.base_lr


@dataclass
class CosineSchedule:
    """``LambdaLR`` factor: linear warm-up over ``warmup_epochs`` (from 1/(warmup+1)), then cosine decay from 1 to
    ``final_factor`` at epoch ``total_epochs`` (and ``final_factor`` after it). A dataclass, so it is checkpointed."""

    total_epochs: int
    warmup_epochs: int = 0
    final_factor: float = 0.01

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup_epochs:
            return (epoch + 1) / (self.warmup_epochs + 1)
        span = max(1, self.total_epochs - self.warmup_epochs)
        progress = min(1.0, (epoch - self.warmup_epochs) / span)
        return self.final_factor + (1.0 - self.final_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def data_keywords(datamodule: Any) -> dict[str, Any]:
    """The six data keywords every registered factory takes, read from a set-up data module."""
    values: dict[str, Any] = {}
    hparams = getattr(datamodule, "hparams", {})
    for key in DATA_KEYWORDS:
        value = getattr(datamodule, key, None)
        if value is None and key in hparams:
            value = hparams[key]
        if value is None:
            raise AttributeError(f"the data module has no {key!r}; call datamodule.setup() first")
        values[key] = tuple(int(v) for v in value) if key == "grid_shape" else int(value)
    return values


def _check_milestones(milestones: Mapping[Any, Any]) -> dict[int, float]:
    checked: dict[int, float] = {}
    for epoch, lr in milestones.items():
        try:
            e, value = int(epoch), float(lr)
        except (TypeError, ValueError) as err:
            raise ValueError(f"lr_milestones must map epoch (int) -> lr (float), got {epoch!r}: {lr!r}") from err
        if e < 0 or not (math.isfinite(value) and value > 0):
            raise ValueError(f"lr_milestones entry {epoch!r}: {lr!r} needs epoch >= 0 and a positive lr")
        checked[e] = value
    return checked


class ForecastingSystem(pl.LightningModule):
    """Train / validate / test any registered crowd-flow model.

    Args:
        model: a registered model NAME (rebuilt by ``load_from_checkpoint``) or an ``nn.Module`` (then
            ``load_from_checkpoint(path, model=...)`` must be given the same architecture).
        scaler_min, scaler_max: the data module's min-max scaler (converts scaled errors to original units).
        metric_factor: sqrt(H*W / n_active_cells), from the data module (sqrt(128/81) for BikeNYC).
        model_kwargs: for a model name: the six data keywords (:func:`data_keywords`) plus the model's options.
        lr, lr_milestones, weight_decay: Adam and its epoch -> lr steps (the reference recipe by default).
        loss: "mse" (reference) or "l1", on scaled values.
        num_slots: number of slots of the data (``len(datamodule.timestamps)``); read from the trainer's data
            module in ``setup`` when there is one.
    """

    def __init__(
        self,
        model: str | nn.Module,
        scaler_min: float,
        scaler_max: float,
        metric_factor: float = 1.0,
        model_kwargs: dict[str, Any] | None = None,
        lr: float = 3e-4,
        lr_milestones: Mapping[int, float] | None = None,
        weight_decay: float = 0.0,
        loss: str = "mse",
        num_slots: int | None = None,
        lr_schedule: str = "step",
        lr_warmup_epochs: int = 0,
        lr_final_factor: float = 0.01,
        ema_decay: float | None = None,
    ) -> None:
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {lr_schedule!r}; choose from {LR_SCHEDULES}")
        if lr_warmup_epochs < 0 or not (0.0 <= lr_final_factor <= 1.0):
            raise ValueError(f"need lr_warmup_epochs >= 0 and 0 <= lr_final_factor <= 1, got {lr_warmup_epochs}, "
                             f"{lr_final_factor}")
        if ema_decay is not None and not (0.0 < ema_decay < 1.0):
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        if not (math.isfinite(scaler_min) and math.isfinite(scaler_max) and scaler_max > scaler_min):
            raise ValueError(f"scaler needs finite min < max, got min={scaler_min}, max={scaler_max}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be positive, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {LOSSES}")
        if lr_milestones is None:
            lr_milestones = REFERENCE_LR_MILESTONES
        self.lr_steps = _check_milestones(lr_milestones)
        if isinstance(model, str):
            self.save_hyperparameters()
            self.model = build_model(model, **(model_kwargs or {}))
        elif isinstance(model, nn.Module):
            self.save_hyperparameters(ignore=["model"])
            self.model = model
        else:
            raise TypeError(f"model must be a registered model name or an nn.Module, got {type(model).__name__}")
        self.horizon = int(getattr(self.model, "horizon", 1))  # > 1: a direct multi-step head (module docstring)
        self.scale = (float(scaler_max) - float(scaler_min)) / 2.0
        self.metric_factor = float(metric_factor)
        self.trainable = bool(getattr(self.model, "trainable", True))
        # Parameter-free baselines: no optimiser, no backward; an epoch only measures them.
        self.automatic_optimization = self.trainable
        # Weight averaging: a frozen copy updated after every optimiser step (see the module docstring).
        self.ema_model: nn.Module | None = None
        if ema_decay is not None and self.trainable:
            self.ema_model = copy.deepcopy(self.model).requires_grad_(False)
            self.register_buffer("ema_updates", torch.zeros((), dtype=torch.long))
        self.train_metrics: FlowMetrics | None = None
        self.val_metrics: FlowMetrics | None = None
        self.test_metrics: FlowMetrics | None = None
        self.val_raw_metrics: FlowMetrics | None = None
        self.later_step_metrics: nn.ModuleDict | None = None
        if num_slots is not None:
            self._build_metrics(int(num_slots))

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_datamodule(
        cls, model: str, datamodule: Any, model_kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> ForecastingSystem:
        """A system for ``model`` (registered name) on a set-up ``datamodule`` (scaler, factor, data keywords)."""
        kwargs = {**data_keywords(datamodule), **dict(model_kwargs or {})}
        return cls(
            model,
            scaler_min=float(datamodule.scaler.min),
            scaler_max=float(datamodule.scaler.max),
            metric_factor=float(datamodule.metric_factor),
            model_kwargs=kwargs,
            num_slots=len(datamodule.timestamps),
            **options,
        )

    def _build_metrics(self, num_slots: int, active_mask: Tensor | None = None) -> None:
        """(Re)create the train/val/test metrics for ``num_slots`` target slots and the MAE cell mask."""
        make = lambda: FlowMetrics(num_slots, self.scale, self.metric_factor, active_mask)  # noqa: E731
        self.train_metrics, self.val_metrics, self.test_metrics = make(), make(), make()
        # With weight averaging, validation also scores the raw (un-averaged) weights of the same run
        # (``val_raw_*``): the averaging does not change the training trajectory, so this compares the two.
        self.val_raw_metrics = make() if self.ema_model is not None else None
        # A direct head of H steps: steps 2..H get metrics of their own per stage (step 1 uses the ones above);
        # keyed "<stage>_steps" ("train" would clash with nn.Module.train).
        self.later_step_metrics = None
        if self.horizon > 1:
            stages = ("train", "val", "test") + (("val_raw",) if self.val_raw_metrics is not None else ())
            self.later_step_metrics = nn.ModuleDict(
                {f"{stage}_steps": nn.ModuleList(make() for _ in range(self.horizon - 1)) for stage in stages}
            )

    def _active_mask(self, datamodule: Any) -> Tensor | None:
        """Cells that are ever non-zero in the data module's flows, when the protocol factor says some never
        are (metric_factor != 1); MAE is averaged over them (see stflow.metrics)."""
        flows = getattr(datamodule, "flows", None)
        if self.metric_factor == 1.0 or flows is None:
            return None
        return torch.from_numpy((flows != 0).any(axis=(0, 1)))  # (H, W) bool

    def setup(self, stage: str) -> None:
        """Size the metrics for the data module's slots, check its scaler, fit history-based baselines."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and getattr(datamodule, "timestamps", None) is not None:
            self._check_scaler(datamodule)
            self._build_metrics(len(datamodule.timestamps), self._active_mask(datamodule))
        elif self.val_metrics is None:
            raise RuntimeError("ForecastingSystem needs num_slots (or a trainer data module with .timestamps)")
        fit_history = getattr(self.model, "fit_history", None)
        if stage == "fit" and callable(fit_history):
            if datamodule is None:
                raise RuntimeError(f"{type(self.model).__name__} must be fitted on the data module's history")
            mask = getattr(datamodule, "train_slot_mask", None)
            if mask is None:
                raise AttributeError("the data module has no train_slot_mask (needed by fit_history)")
            fit_history(datamodule.flows, datamodule.timestamps, mask, datamodule.scaler)

    def _check_scaler(self, datamodule: Any) -> None:
        scaler = getattr(datamodule, "scaler", None)
        if scaler is None:
            return
        mine = (float(self.hparams.scaler_min), float(self.hparams.scaler_max))
        theirs = (float(scaler.min), float(scaler.max))
        if not all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(mine, theirs)):
            raise ValueError(
                f"the data module scales with min/max {theirs} but the system was built for {mine}: the model "
                "would see differently scaled inputs; pass scale_min/scale_max to the data module"
            )

    # ------------------------------------------------------------------ steps
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """batch: the data module's dict (closeness (B, lc, 2, H, W), ..., target (B, 2, H, W), index (B,))
        -> prediction (B, 2, H, W) scaled to [-1, 1] (by the weight average when ``ema_decay`` is set)."""
        return self.eval_model(batch)

    @property
    def eval_model(self) -> nn.Module:
        """The network used for validation, test and prediction: the weight average when there is one."""
        return self.ema_model if self.ema_model is not None else self.model

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema <- d * ema + (1 - d) * model for float parameters and buffers (integer buffers are copied), with the
        usual warm-up d = min(ema_decay, (1 + n) / (10 + n)) after n updates."""
        if self.ema_model is None:
            return
        n = int(self.ema_updates)
        decay = min(float(self.hparams.ema_decay), (1.0 + n) / (10.0 + n))
        model_state = self.model.state_dict()
        for key, avg in self.ema_model.state_dict().items():
            value = model_state[key]
            if avg.is_floating_point():
                avg.lerp_(value.to(avg.dtype), 1.0 - decay)
            else:
                avg.copy_(value)
        self.ema_updates += 1

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's step, then the weight average: both belong to the batch, so a checkpoint saved from any
        ``on_train_batch_end`` (a Ctrl-C) holds the average of the weights it holds."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def step_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """The training loss: ``pred``/``target`` (B, 2, h, w), or (B, H, 2, h, w) for a direct head, where the
        loss over every value is the mean over the steps of each step's loss (the steps hold equally many)."""
        if self.hparams.loss == "mse":
            return nn.functional.mse_loss(pred, target)
        return nn.functional.l1_loss(pred, target)

    def _update(self, stage: str, metrics: FlowMetrics, pred: Tensor, target: Tensor, index: Tensor) -> None:
        """Update ``metrics`` (step 1) and, for a direct head, the stage's later-step metrics (row index + k)."""
        if self.horizon == 1:
            metrics.update(pred, target, index)
            return
        metrics.update(pred[:, 0], target[:, 0], index)
        for k, later in enumerate(self.later_step_metrics[f"{stage}_steps"], start=1):
            later.update(pred[:, k], target[:, k], index + k)

    def _step(self, batch: Mapping[str, Tensor], metrics: FlowMetrics | None, stage: str) -> tuple[Tensor, Tensor]:
        if metrics is None:
            raise RuntimeError("metrics are not built: the system was not set up with a data module or num_slots")
        pred = (self.model if self.training else self.eval_model)(batch)
        target = batch["target"]
        if pred.shape != target.shape:
            raise ValueError(
                f"{type(self.model).__name__} returned {tuple(pred.shape)}, target is {tuple(target.shape)}"
            )
        self._update(stage, metrics, pred, target, batch["index"])
        return pred, self.step_loss(pred, target)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor | None:
        _, loss = self._step(batch, self.train_metrics, "train")
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["target"]))
        return loss if self.trainable else None

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, self.val_metrics, "val")
        if self.val_raw_metrics is not None:
            self._update("val_raw", self.val_raw_metrics, self.model(batch), batch["target"], batch["index"])

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._step(batch, self.test_metrics, "test")

    def predict_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """{"pred", "target"} (B, 2, H, W) scaled (a direct head: (B, H, 2, h, w)) and "index" (B,): what the
        evaluation plots need."""
        return {"pred": self.eval_model(batch), "target": batch["target"], "index": batch["index"]}

    # ------------------------------------------------------------------ epoch ends: log the global metrics
    def _log_metrics(self, stage: str, metrics: FlowMetrics | None) -> None:
        if metrics is None or not metrics.update_called:
            return
        values = metrics.compute()  # already reduced over processes (sum states)
        metrics.reset()
        loss_key = "mse_scaled" if self.hparams.loss == "mse" else "mae_scaled"
        loss = values[loss_key]
        logged = {
            f"{stage}_rmse": values["rmse"],
            f"{stage}_rmse_inflow": values["rmse_inflow"],
            f"{stage}_rmse_outflow": values["rmse_outflow"],
            f"{stage}_mae": values["mae"],
            f"{stage}_samples": values["n_samples"],
        }
        if self.horizon > 1:  # a direct head: every step, the mean over the steps, and the loss over all steps
            steps = [values]
            for later in self.later_step_metrics[f"{stage}_steps"]:
                steps.append(later.compute())
                later.reset()
            for name in ("rmse", "rmse_inflow", "rmse_outflow", "mae"):
                for k, step in enumerate(steps, start=1):
                    logged[f"{stage}_{name}_step{k}"] = step[name]
                logged[f"{stage}_{name}_mean"] = torch.stack([step[name] for step in steps]).mean()
            loss = torch.stack([step[loss_key] for step in steps]).mean()
        if stage in ("val", "test"):
            logged[f"{stage}_loss"] = loss
        # Identical on every rank (the states were reduced), so sync_dist's mean changes nothing.
        self.log_dict(logged, sync_dist=True, prog_bar=stage == "val")

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)
        self._log_metrics("val_raw", getattr(self, "val_raw_metrics", None))

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> Any:
        if not self.trainable:
            return None
        optimizer = torch.optim.Adam(
            self.model.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        if self.hparams.get("lr_schedule", "step") == "cosine":
            max_epochs = getattr(self.trainer, "max_epochs", None) if self._trainer is not None else None
            if max_epochs is None or max_epochs < 1:
                raise ValueError("lr_schedule='cosine' needs the trainer's max_epochs")
            factor: Any = CosineSchedule(int(max_epochs), int(self.hparams.lr_warmup_epochs),
                                         float(self.hparams.lr_final_factor))
        else:
            factor = StepSchedule(float(self.hparams.lr), self.lr_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
