"""Model registry: named factories with one calling convention, so every model is built the same way.

Every factory is called as ``factory(*, grid_shape, ext_dim, len_closeness, len_period, len_trend, slots_per_day,
**model_kwargs)``: the six data keywords come from the data module (a factory may ignore some), ``model_kwargs``
are the model's own options. A factory raises ``ValueError`` when the model cannot work with its arguments.

The normalization is chosen by name: ``build_model(name, ..., norm="bkn", norm_options=NormOptions(...))`` with
``norm`` in ``normlayers.NORM_KINDS`` ("bn", "gn", "bkn", "none"; None = the model's default) and
:class:`normlayers.NormOptions` (a mapping of its fields is accepted too). Both are handed to the factory only when
given, so a factory without norm layers need not know them.

Multi-step: a factory registered with ``direct=True`` also takes ``horizon=H`` (a model option) and then builds a
DIRECT head: the network returns all H steps at once, ``(B, H, 2, h, w)``, from a batch whose ``ext_target`` is
``(B, H, D)`` (each target slot's vector). ``horizon`` absent or 1 builds today's one-step network unchanged.
Other models (the baselines, the authors' ACFM) are one-step; several steps are their recursive rollout
(:func:`stflow.forecast.rollout`). :func:`supports_direct` says which is which.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from normlayers.select import NormOptions, check_norm_kind

__all__ = ["register_model", "build_model", "list_models", "direct_models", "supports_direct", "DATA_KEYWORDS"]

DATA_KEYWORDS = ("grid_shape", "ext_dim", "len_closeness", "len_period", "len_trend", "slots_per_day")
_FACTORIES: dict[str, Callable[..., nn.Module]] = {}
_DIRECT: set[str] = set()  # factories that take horizon=H and build a direct multi-step head


def register_model(
    name: str, *, direct: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory`` under ``name`` (names are unique); ``direct``: it takes ``horizon``."""

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered by {_FACTORIES[name].__module__}")
        _FACTORIES[name] = factory
        if direct:
            _DIRECT.add(name)
        return factory

    return decorator


def _ensure_builtin_models() -> None:
    import stflow.models  # noqa: F401  (importing the package registers the built-in models)


def list_models() -> list[str]:
    """Sorted names of every registered model."""
    _ensure_builtin_models()
    return sorted(_FACTORIES)


def supports_direct(name: str) -> bool:
    """Whether model ``name`` has a direct multi-step head (``horizon=H`` option)."""
    _ensure_builtin_models()
    return name in _DIRECT


def direct_models() -> list[str]:
    """Sorted names of the models with a direct multi-step head."""
    _ensure_builtin_models()
    return sorted(_DIRECT)


def build_model(
    name: str,
    *,
    norm: str | None = None,
    norm_options: NormOptions | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build the registered model ``name`` (see the module docstring for the keywords, ``norm`` and
    ``norm_options``); an unknown ``norm`` is a ValueError naming the choices."""
    _ensure_builtin_models()
    if name not in _FACTORIES:
        raise KeyError(f"unknown model {name!r}; registered models: {', '.join(sorted(_FACTORIES))}")
    if norm is not None:
        kwargs["norm"] = check_norm_kind(norm)
    if norm_options is not None:
        kwargs["norm_options"] = (
            norm_options if isinstance(norm_options, NormOptions) else NormOptions(**dict(norm_options))
        )
    missing = [k for k in DATA_KEYWORDS if k not in kwargs]
    if missing:
        raise TypeError(f"build_model({name!r}) needs the data keywords {missing} (from the data module)")
    return _FACTORIES[name](**kwargs)
