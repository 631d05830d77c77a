"""Forecasting models (ACFM, ST-ResNet, baselines), all built by name through :func:`build_model`."""

from stflow.models import zoo  # noqa: F401  (registers the named factories)
from stflow.models.acfm import ACFM, ACFMConfig
from stflow.models.acfm_reference import ReferenceCheckpointError, load_reference_checkpoint, load_reference_state_dict
from stflow.models.baselines import HistoricalAverage, Persistence
from stflow.models.registry import build_model, list_models, register_model
from stflow.models.stresnet import STResNet, STResNetConfig

__all__ = [
    "ACFM",
    "ACFMConfig",
    "HistoricalAverage",
    "Persistence",
    "ReferenceCheckpointError",
    "STResNet",
    "STResNetConfig",
    "build_model",
    "list_models",
    "load_reference_checkpoint",
    "load_reference_state_dict",
    "register_model",
]
