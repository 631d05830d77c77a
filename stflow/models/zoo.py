"""The named models: one-line registered factories that differ only in their arguments.

Every factory takes the data keywords of :mod:`stflow.models.registry` plus its model's own options:

- ``acfm_*``: any :class:`ACFMConfig` field except the data-given ones (e.g. ``res_units``, ``lstm_dropout``,
  ``cell``); ``acfm_reference_*`` also fix ``variant="reference"`` and need the authors'
  external vector (33 dims BikeNYC, 77 TaxiBJ);
- ``stresnet*``: any :class:`STResNetConfig` field except the data-given ones (``norm="none"`` gives DeepST's
  un-normalized network, which collapses into tanh saturation within one epoch on BikeNYC with torch's default
  init, measured at lr 2e-4 and 1e-3);
- ``deepstn``: any :class:`DeepSTNConfig` field except the data-given ones (``filters``, ``plus_channels``,
  ``pool_rate``, ``res_units``, ``dropout``, ...); every norm; BKN chains the ResPlus units (:func:`kalman_deepstn`);
- ``stid``: any :class:`STIDConfig` field except the data-given ones (``embed_dim``, ``layers``, ``time_embeddings``,
  ...); no norm layers (None or "none"); its time embeddings need the features="acfm" external vector;
- ``horizon=H`` (every factory registered with ``direct=True``: ``acfm_bikenyc``, ``acfm_taxibj``, ``stresnet*``,
  ``deepstn``, ``stid``): a direct head predicting H slots at once (:mod:`stflow.models.horizon`);
- ``persistence``: ``mode`` ("last" or "week"); ``historical_average``: no option (fit with ``fit_history``).

The trainable models also take ``norm`` ("bn", "gn", "bkn" or "none"; None = the model's default, BatchNorm) and
``norm_options`` (:class:`normlayers.NormOptions`): "gn" is GroupNorm(``gn_groups``); "bkn" builds the model
with BatchNorm, then chains its norms along the network (:mod:`stflow.models.kalman`) with the prior weight
``norm_options.prior_weight_value()`` and ``norm_options.transition``. The baselines accept only None or "none".
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from normlayers.select import NormFactory, NormOptions, check_norm_kind
from stflow.models.acfm import ACFM, ACFM_PRESETS, ACFMConfig
from stflow.models.baselines import HistoricalAverage, Persistence
from stflow.models.deepstn import DeepSTN, DeepSTNConfig
from stflow.models.kalman import kalman_acfm, kalman_deepstn, kalman_stresnet
from stflow.models.registry import register_model
from stflow.models.stid import STID, STIDConfig
from stflow.models.stresnet import STResNet, STResNetConfig

_DATA_FIELDS = {"grid_shape", "ext_dim", "len_closeness", "len_period", "len_trend"}


def _check_options(model: str, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{model}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")


def _base_norm(model: str, norm: str, options: NormOptions) -> NormFactory | None:
    """The norm factory the model is BUILT with (BKN models are built with BatchNorm, then chained)."""
    try:
        check_norm_kind(norm)
    except ValueError as err:
        raise ValueError(f"{model}: {err}") from err
    if norm == "none":
        return None
    if norm == "gn":
        return options.group_norm
    return nn.BatchNorm2d


def _check_baseline_norm(model: str, norm: str | None) -> None:
    if norm not in (None, "none"):
        raise ValueError(f"{model} has no norm layers: norm must be None or 'none', got {norm!r}")


def _acfm(
    preset: str,
    variant: str,
    *,
    grid_shape: tuple[int, int],
    ext_dim: int,
    len_closeness: int,
    len_period: int,
    len_trend: int,
    slots_per_day: int,
    norm: str | None = None,
    norm_options: NormOptions | None = None,
    **options: Any,
) -> ACFM:
    name = f"acfm_{'reference_' if variant == 'reference' else ''}{preset}"
    own = {f.name for f in dataclasses.fields(ACFMConfig)} - _DATA_FIELDS - {"variant"}
    if variant == "reference":
        own -= {"horizon"}  # the authors' one-step network
    _check_options(name, options, own)
    if variant == "reference" and ext_dim != ACFM_PRESETS[preset]["ext_dim"]:
        raise ValueError(
            f"{name} needs the authors' {ACFM_PRESETS[preset]['ext_dim']}-dim external vector (features='acfm'), "
            f"got ext_dim={ext_dim}"
        )
    try:
        config = ACFMConfig.preset(
            preset, grid_shape=tuple(grid_shape), ext_dim=ext_dim, len_closeness=len_closeness,
            len_period=len_period, len_trend=len_trend, variant=variant, **options,
        )
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from err
    norm, norm_options = norm or "bn", norm_options or NormOptions()
    base = _base_norm(name, norm, norm_options)
    if base is None:  # ACFM's residual units always call their norms: "none" is an identity layer
        base = lambda c: nn.Identity()  # noqa: E731
    model = ACFM(config, norm_layer=base)
    if norm == "bkn":
        model = kalman_acfm(model, norm_options.prior_weight_value(), norm_options.transition)
    return model


def _stresnet(
    preset: str,
    *,
    grid_shape: tuple[int, int],
    ext_dim: int,
    len_closeness: int,
    len_period: int,
    len_trend: int,
    slots_per_day: int,
    norm: str | None = None,
    norm_options: NormOptions | None = None,
    **options: Any,
) -> STResNet:
    own = {f.name for f in dataclasses.fields(STResNetConfig)} - _DATA_FIELDS
    _check_options(f"stresnet ({preset})", options, own)
    try:
        config = STResNetConfig.preset(
            preset, grid_shape=tuple(grid_shape), ext_dim=ext_dim, len_closeness=len_closeness,
            len_period=len_period, len_trend=len_trend, **options,
        )
    except ValueError as err:
        raise ValueError(f"stresnet ({preset}): {err}") from err
    norm, norm_options = norm or "bn", norm_options or NormOptions()
    model = STResNet(config, norm_layer=_base_norm(f"stresnet ({preset})", norm, norm_options))
    if norm == "bkn":
        model = kalman_stresnet(model, norm_options.prior_weight_value(), norm_options.transition)
    return model


def _deepstn(
    *, grid_shape: tuple[int, int], ext_dim: int, len_closeness: int, len_period: int, len_trend: int,
    slots_per_day: int, norm: str | None = None, norm_options: NormOptions | None = None, **options: Any,
) -> DeepSTN:
    own = {f.name for f in dataclasses.fields(DeepSTNConfig)} - _DATA_FIELDS
    _check_options("deepstn", options, own)
    try:
        config = DeepSTNConfig(grid_shape=tuple(grid_shape), ext_dim=ext_dim, len_closeness=len_closeness,
                               len_period=len_period, len_trend=len_trend, **options)
    except ValueError as err:
        raise ValueError(f"deepstn: {err}") from err
    norm, norm_options = norm or "bn", norm_options or NormOptions()
    model = DeepSTN(config, norm_layer=_base_norm("deepstn", norm, norm_options))
    if norm == "bkn":
        model = kalman_deepstn(model, norm_options.prior_weight_value(), norm_options.transition)
    return model


def _stid(
    *, grid_shape: tuple[int, int], ext_dim: int, len_closeness: int, len_period: int, len_trend: int,
    slots_per_day: int, norm: str | None = None, norm_options: NormOptions | None = None, **options: Any,
) -> STID:
    _check_baseline_norm("stid", norm)
    own = {f.name for f in dataclasses.fields(STIDConfig)} - _DATA_FIELDS - {"slots_per_day"}
    _check_options("stid", options, own)
    try:
        config = STIDConfig(grid_shape=tuple(grid_shape), ext_dim=ext_dim, len_closeness=len_closeness,
                            len_period=len_period, len_trend=len_trend, slots_per_day=slots_per_day, **options)
    except ValueError as err:
        raise ValueError(f"stid: {err}") from err
    return STID(config)


@register_model("acfm_bikenyc", direct=True)
def acfm_bikenyc(**kwargs: Any) -> ACFM:
    return _acfm("bikenyc", "clean", **kwargs)


@register_model("acfm_taxibj", direct=True)
def acfm_taxibj(**kwargs: Any) -> ACFM:
    return _acfm("taxibj", "clean", **kwargs)


@register_model("acfm_reference_bikenyc")
def acfm_reference_bikenyc(**kwargs: Any) -> ACFM:
    return _acfm("bikenyc", "reference", **kwargs)


@register_model("acfm_reference_taxibj")
def acfm_reference_taxibj(**kwargs: Any) -> ACFM:
    return _acfm("taxibj", "reference", **kwargs)


@register_model("stresnet", direct=True)
def stresnet(**kwargs: Any) -> STResNet:
    """ST-ResNet with the BikeNYC depth (4 residual units)."""
    return _stresnet("bikenyc", **kwargs)


@register_model("stresnet_taxibj", direct=True)
def stresnet_taxibj(**kwargs: Any) -> STResNet:
    """ST-ResNet with the TaxiBJ depth (12 residual units)."""
    return _stresnet("taxibj", **kwargs)


@register_model("deepstn", direct=True)
def deepstn(**kwargs: Any) -> DeepSTN:
    """DeepSTN+ (ResPlus units, closeness/period/trend stem, time maps; no POI gate)."""
    return _deepstn(**kwargs)


@register_model("stid", direct=True)
def stid(**kwargs: Any) -> STID:
    """STID: per-cell MLP over the window with spatial, time-of-day and day-of-week embeddings."""
    return _stid(**kwargs)


@register_model("persistence")
def persistence(
    *, grid_shape: tuple[int, int], ext_dim: int, len_closeness: int, len_period: int, len_trend: int,
    slots_per_day: int, norm: str | None = None, norm_options: NormOptions | None = None, **options: Any,
) -> Persistence:
    _check_baseline_norm("persistence", norm)
    _check_options("persistence", options, {"mode"})
    mode = options.get("mode", "last")
    if mode == "last" and len_closeness < 1:
        raise ValueError("persistence(mode='last') repeats closeness[:, 0]: it needs len_closeness >= 1")
    if mode == "week" and len_trend < 1:
        raise ValueError("persistence(mode='week') repeats trend[:, 0] (t - 7 days): it needs len_trend >= 1")
    return Persistence(mode)  # type: ignore[arg-type]


@register_model("historical_average")
def historical_average(
    *, grid_shape: tuple[int, int], ext_dim: int, len_closeness: int, len_period: int, len_trend: int,
    slots_per_day: int, norm: str | None = None, norm_options: NormOptions | None = None, **options: Any,
) -> HistoricalAverage:
    _check_baseline_norm("historical_average", norm)
    _check_options("historical_average", options, set())
    return HistoricalAverage(slots_per_day, (2, *grid_shape))
