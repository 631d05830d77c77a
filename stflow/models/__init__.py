"""Forecasting models (ACFM, ST-ResNet, DeepSTN+, STID, baselines), all built by name through :func:`build_model`,
with any norm (``norm="bn"|"gn"|"bkn"|"none"``, :class:`NormOptions`; the BKN wiring is :mod:`stflow.models.kalman`)."""

from normlayers.select import NORM_KINDS, NormOptions
from stflow.models import zoo  # noqa: F401  (registers the named factories)
from stflow.models.acfm import ACFM, ACFMConfig
from stflow.models.acfm_reference import ReferenceCheckpointError, load_reference_checkpoint, load_reference_state_dict
from stflow.models.baselines import HistoricalAverage, Persistence
from stflow.models.deepstn import DeepSTN, DeepSTNConfig
from stflow.models.kalman import KalmanFrameEncoder, kalman_acfm, kalman_deepstn, kalman_stresnet
from stflow.models.registry import build_model, direct_models, list_models, register_model, supports_direct
from stflow.models.stid import STID, STIDConfig
from stflow.models.stresnet import STResNet, STResNetConfig

__all__ = [
    "ACFM",
    "ACFMConfig",
    "DeepSTN",
    "DeepSTNConfig",
    "HistoricalAverage",
    "KalmanFrameEncoder",
    "NORM_KINDS",
    "NormOptions",
    "Persistence",
    "ReferenceCheckpointError",
    "STID",
    "STIDConfig",
    "STResNet",
    "STResNetConfig",
    "build_model",
    "direct_models",
    "kalman_acfm",
    "kalman_deepstn",
    "kalman_stresnet",
    "list_models",
    "load_reference_checkpoint",
    "load_reference_state_dict",
    "register_model",
    "supports_direct",
]
