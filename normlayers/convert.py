"""``convert``: swap BatchNorm for BatchKalmanNorm and wire the Kalman chain across layers.

How it works. The model is traced once with ``torch.fx.symbolic_trace`` (analysis only: the user's
module is kept, its class and state-dict keys do not change). For every norm layer, in forward
order, the statistics of its input are derived backwards through the graph into a *recipe*:

* ``FromPosterior(bkn)``: the tensor is the input of a BKN that ran earlier (its posterior), or the
  output of a BKN (the reference convention: the statistics propagated are the un-normalized ones
  of the BKN input; the affine in between is ignored);
* ``Through(source, layer, relu)``: an ``nn.ConvNd``/``nn.Linear`` applied to ``source`` (optionally
  after a ReLU: ``nn.ReLU``, ``F.relu``, ``torch.relu``, ``.relu()``) -> a transition
  (:mod:`normlayers.transition`; the CONSUMING layer's ``transition`` picks Monte Carlo or analytic);
* ``Merge(parts)``: a residual addition (``+``, ``torch.add``, ``.add``) -> means and variances add.

A norm layer whose input comes from the model input through convs only starts the chain (no
prior). At run time a small :class:`KalmanChain` (attached as ``model.kalman_chain``) keeps the
posteriors of the current forward (reset by a pre-hook on the root module) and feeds each BKN its
prior through a forward pre-hook (training only; eval is plain BN with running statistics).

Not supported (``ConvertError`` with ``strict=True``; with ``strict=False`` the layer is swapped but
left un-chained, with a warning): models fx cannot trace (data-dependent control flow), a norm fed by
anything else (pooling, concatenation, interpolation, a zero-padded/strided option-A shortcut,
non-ReLU activations, a scaled residual, ...). Use :func:`normlayers.transition.pad_channels` and a
manual ``bkn(x, prior=...)`` call for those.
"""

from __future__ import annotations

import functools
import operator
import warnings
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from normlayers.modules import BatchKalmanNorm, BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d
from normlayers.transition import analytic_prior, monte_carlo_prior

__all__ = ["convert", "ConvertError", "KalmanChain", "FromPosterior", "Through", "Merge"]

_BN_TO_BKN: dict[type, type] = {
    nn.BatchNorm1d: BatchKalmanNorm1d,
    nn.BatchNorm2d: BatchKalmanNorm2d,
    nn.BatchNorm3d: BatchKalmanNorm3d,
}
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


class ConvertError(RuntimeError):
    """The model (or one of its norm layers) cannot be wired into a Kalman chain."""


@dataclass(frozen=True)
class FromPosterior:
    layer: str  # module path of a BKN; its posterior estimates its input's statistics


@dataclass(frozen=True)
class Through:
    source: "Recipe"
    layer: str  # module path of the nn.ConvNd / nn.Linear
    relu: bool


@dataclass(frozen=True)
class Merge:
    parts: tuple["Recipe", ...]


Recipe = Union[FromPosterior, Through, Merge]


class _Unsupported(Exception):
    pass


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.ReLU)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _plan(model: nn.Module) -> tuple[dict[str, Recipe | None], dict[str, str]]:
    """Trace ``model`` and return (recipe per BN path in forward order, error per un-wirable BN path)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises several types (TraceError, TypeError, ...)
        raise ConvertError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
            "data-dependent control flow is not supported: wire priors by hand with bkn(x, prior=...)"
        ) from exc
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}

    def is_norm(node: torch.fx.Node) -> bool:
        return node.op == "call_module" and isinstance(modules[node.target], tuple(_BN_TO_BKN) + (BatchKalmanNorm,))

    norm_nodes = [n for n in nodes if is_norm(n)]

    def stats(t: Any, before: torch.fx.Node) -> Recipe | None:
        if not isinstance(t, torch.fx.Node):
            raise _Unsupported(f"a constant {t!r} where a tensor with statistics was expected")
        earlier = [u for u in t.users if is_norm(u) and u.args[0] is t and position[u] < position[before]]
        if earlier:
            return FromPosterior(earlier[0].target)
        if t.op == "placeholder":
            return None
        if is_norm(t):
            return FromPosterior(t.target)
        if t.op == "call_module" and isinstance(modules[t.target], (nn.modules.conv._ConvNd, nn.Linear)):
            src, relu = t.args[0], False
            if isinstance(src, torch.fx.Node) and _is_relu(src, modules):
                src, relu = src.args[0], True
            inner = stats(src, before)
            return None if inner is None else Through(inner, t.target, relu)
        if _is_add(t) and len(t.args) == 2 and not t.kwargs:
            parts = tuple(stats(a, before) for a in t.args)
            if any(p is None for p in parts):
                raise _Unsupported(f"residual add {t.name!r} has a branch without statistics")
            return Merge(parts)
        raise _Unsupported(f"node {t.name!r} ({t.op} {getattr(t.target, '__name__', t.target)})")

    plan: dict[str, Recipe | None] = {}
    errors: dict[str, str] = {}
    for node in norm_nodes:
        if node.target in plan or node.target in errors:
            errors[node.target] = "the layer is called more than once per forward"
            plan.pop(node.target, None)
            continue
        try:
            plan[node.target] = stats(node.args[0], node)
        except _Unsupported as exc:
            errors[node.target] = f"its input cannot be traced to a prior: {exc}"
    return plan, errors


def _conv_output_size(layer: nn.Module, size: tuple[int, ...]) -> tuple[int, ...]:
    if isinstance(layer, nn.Linear):
        return size
    out = []
    for i, s in enumerate(size):
        k, st, d = layer.kernel_size[i], layer.stride[i], layer.dilation[i]
        pad = layer.padding[i] if not isinstance(layer.padding, str) else (0 if layer.padding == "valid" else None)
        out.append(s if pad is None else (s + 2 * pad - d * (k - 1) - 1) // st + 1)
    return tuple(out)


class KalmanChain:
    """Run-time wiring: records posteriors during a forward and hands each BKN its prior.

    ``plan`` maps each BKN module path (forward order) to its recipe (``None`` = start of the chain);
    ``unchained`` lists the paths left without prior (``strict=False``). Hooks are bound methods, so
    ``copy.deepcopy(model)`` copies a working chain.
    """

    def __init__(self, model: nn.Module, plan: dict[str, Recipe | None], unchained: dict[str, str],
                 generator: torch.Generator | None = None) -> None:
        self.plan = plan
        self.unchained = unchained
        self.generator = generator
        self.layers: dict[str, nn.Module] = dict(model.named_modules())
        self._posteriors: dict[str, tuple[Tensor, Tensor, tuple[int, ...]]] = {}
        self._handles = [model.register_forward_pre_hook(self._reset)]
        for name in plan:
            bkn = self.layers[name]
            self._handles.append(bkn.register_forward_pre_hook(functools.partial(self._feed, name), with_kwargs=True))
        for name in list(plan) + list(unchained):
            self._handles.append(self.layers[name].register_forward_hook(functools.partial(self._record, name)))

    def remove(self) -> None:
        """Detach the hooks (the BKN layers stay; they behave as independent layers)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._posteriors.clear()

    def _reset(self, module: nn.Module, args: Any) -> None:
        self._posteriors.clear()

    def _record(self, name: str, module: nn.Module, args: Any, output: Tensor) -> None:
        if module.posterior is not None:
            mean, var = module.posterior
            self._posteriors[name] = (mean, var, tuple(args[0].shape[2:]))

    def _feed(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not module.training or len(args) > 1 or kwargs.get("prior") is not None:
            return None
        recipe = self.plan[name]
        if recipe is None:
            return None
        stats = self._evaluate(recipe, module.transition)
        if stats is None:
            return None
        mean, var, _ = stats
        if mean.dim() == 2 and mean.shape[0] == 1:  # (1, C) -> (C,): one group
            mean, var = mean[0], var[0]
        return args, {**kwargs, "prior": (mean, var)}

    def _evaluate(self, recipe: Recipe, transition: str) -> tuple[Tensor, Tensor, tuple[int, ...]] | None:
        if isinstance(recipe, FromPosterior):
            return self._posteriors.get(recipe.layer)
        if isinstance(recipe, Through):
            src = self._evaluate(recipe.source, transition)
            if src is None:
                return None
            mean, var, size = src
            layer = self.layers[recipe.layer]
            if transition == "analytic":
                m, v = analytic_prior(mean, var, layer, relu=recipe.relu)
            else:
                spatial = size if size or not isinstance(layer, nn.Linear) else None
                m, v = monte_carlo_prior(mean, var, layer, spatial, generator=self.generator, relu=recipe.relu)
            return m, v, _conv_output_size(layer, size)
        parts = [self._evaluate(p, transition) for p in recipe.parts]
        if any(p is None for p in parts):
            return None
        mean = functools.reduce(operator.add, [p[0] for p in parts])
        var = functools.reduce(operator.add, [p[1] for p in parts])
        return mean, var, parts[0][2]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _to_bkn(bn: nn.modules.batchnorm._BatchNorm, **options: Any) -> BatchKalmanNorm:
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    bkn = _BN_TO_BKN[type(bn)](
        bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
        track_running_stats=bn.track_running_stats, **options, **factory,
    )
    bkn.load_state_dict(bn.state_dict())
    bkn.train(bn.training)
    return bkn


def convert(
    model: nn.Module,
    prior_weight: float = 0.9,
    transition: str = "monte_carlo",
    group_size: int | None = None,
    *,
    guard_ratio: float = 100.0,
    backend: str = "auto",
    strict: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replace every ``nn.BatchNorm{1,2,3}d`` by a BKN (weights and buffers copied) and chain them.

    Returns ``model`` (modified in place) with ``model.kalman_chain`` (a :class:`KalmanChain`).
    Raises :class:`ConvertError` for models or layers it cannot wire (see the module docstring);
    ``strict=False`` swaps such layers anyway and leaves them without prior, with a warning.
    """
    if hasattr(model, "kalman_chain"):
        raise ConvertError("model is already converted (it has a kalman_chain)")
    if isinstance(model, tuple(_BN_TO_BKN)):
        raise ConvertError("convert a model that contains BatchNorm layers, not a single BatchNorm layer")
    plan, errors = _plan(model)
    if not plan and not errors:
        raise ConvertError(f"{type(model).__name__} has no nn.BatchNorm1d/2d/3d layer to convert")
    if errors and strict:
        detail = "; ".join(f"{name}: {msg}" for name, msg in errors.items())
        raise ConvertError(f"cannot chain {len(errors)} norm layer(s): {detail} (use strict=False to leave them "
                           "un-chained)")
    for name, msg in errors.items():
        warnings.warn(f"normlayers.convert: {name} left without prior ({msg})", stacklevel=2)
    options = dict(prior_weight=prior_weight, guard_ratio=guard_ratio, group_size=group_size,
                   transition=transition, backend=backend)
    for name in list(plan) + list(errors):
        module = model.get_submodule(name)
        if isinstance(module, BatchKalmanNorm):
            continue
        _swap(model, name, _to_bkn(module, **options))
    model.kalman_chain = KalmanChain(model, plan, errors, generator)
    return model

