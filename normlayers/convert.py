"""``convert``: swap BatchNorm for BatchKalmanNorm and wire the Kalman chain across layers.

How it works. The model is traced once with ``torch.fx.symbolic_trace`` (analysis only: the user's
module is kept, its class and state-dict keys do not change). For every norm layer, in forward
order, the statistics of its input are derived backwards through the graph into a *recipe*:

* ``FromPosterior(bkn)``: the tensor is the input of a BKN that ran earlier (its posterior), or the
  output of a BKN (the reference convention: the statistics propagated are the un-normalized ones
  of the BKN input; the affine in between is ignored);
* ``Through(source, layer, activation)``: an ``nn.ConvNd``/``nn.Linear`` applied to ``source``,
  optionally after ONE elementwise activation (:data:`ACTIVATION_MODULES`, :data:`ACTIVATION_FUNCTIONS`,
  :data:`ACTIVATION_METHODS`: ReLU, ReLU6, SiLU/swish, GELU (exact and tanh), Hardswish, Sigmoid,
  Tanh; ``nn.Identity`` and ``nn.Dropout`` are transparent) -> a transition
  (:mod:`normlayers.transition`; the CONSUMING layer's ``transition`` picks Monte Carlo, which applies
  the activation to the sampled image, or analytic: closed form for ReLU/identity, Gauss-Hermite
  quadrature otherwise). Grouped and depthwise convs (``groups=C``) are ordinary transitions;
* ``Activate(source, activation)``: an activation whose output is used without a conv (e.g. the
  identity branch of a residual after ``silu(bn(x))``) -> the activation's moments (closed form or
  quadrature, :func:`normlayers.transition.activation_moments`, for both transitions);
* ``Merge(parts)``: a residual addition (``+``, ``torch.add``, ``.add``) -> means and variances add.
  What a branch carries (``shortcut``): ``"prior"`` (default, the authors' code) -- a branch whose
  statistics are a BKN's own input (an identity shortcut into the block's first BKN, or a branch ending
  in a BKN) carries that BKN's PRIOR of this forward (its posterior only when it had none: a chain
  start), so a residual stream carries the sum of priors, ``m + m3`` in the authors' ResNet; or
  ``"posterior"`` -- such a branch carries the BKN's posterior (the batch observation mixed in);
* ``Pool(source, layer)``: average pooling (``nn.AvgPool1d/2d/3d``, ``F.avg_pool1d/2d/3d``) -> mean and
  variance kept (the authors' option-A shortcut pools and keeps the statistics), spatial size pooled;
* ``Pad(source, before, after)``: ``F.pad`` of the CHANNEL dimension only (option-A zero-padded
  shortcut) -> the new channels get mean 0 and variance 0 (:func:`normlayers.transition.pad_channels`);
* ``FromInput(name)``: the model input ``name`` -- only used when the caller supplies its statistics
  (:meth:`KalmanChain.set_input_statistics`, e.g. a weight-sharing supernet chaining the ops of a
  path); otherwise a norm layer whose input comes from the model input through convs starts the
  chain (no prior, ``plan[name] is None``).

At run time a small :class:`KalmanChain` (attached as ``model.kalman_chain``) keeps the posteriors
of the current forward (reset by a pre-hook on the root module) and feeds each BKN its prior through
a forward pre-hook (training only; eval is plain BN with running statistics). After a training
forward, :meth:`KalmanChain.output_statistics` predicts the statistics of the model OUTPUT (when it
is a norm input/output or a residual sum of such), which a caller can hand to the next module.

Not supported (``ConvertError`` with ``strict=True``; with ``strict=False`` the layer is swapped but
left un-chained, with a warning): models fx cannot trace (data-dependent control flow), a norm fed by
anything else (max pooling, concatenation, interpolation, a strided-slice shortcut, a scaled residual,
two activations in a row, ...). Squeeze-excite (``x * sigmoid(fc(pool(x)))``, a
multiplicative data-dependent gate) is such a case: the norm after it (MBConv's projection norm)
is left un-chained, and the chain resumes at the next layer since that norm's posterior is still
recorded. Use :func:`normlayers.transition.pad_channels` and a manual ``bkn(x, prior=...)`` call
for those.
"""

from __future__ import annotations

import functools
import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from normlayers.modules import BatchKalmanNorm, BatchKalmanNorm1d, BatchKalmanNorm2d, BatchKalmanNorm3d
from normlayers.reference import check_guard_scope
from normlayers.transition import activation_moments, analytic_prior, monte_carlo_prior, pad_channels

__all__ = [
    "convert",
    "ConvertError",
    "KalmanChain",
    "FromPosterior",
    "FromInput",
    "Through",
    "Activate",
    "Merge",
    "Pool",
    "Pad",
    "SHORTCUTS",
    "ACTIVATION_MODULES",
    "ACTIVATION_FUNCTIONS",
    "ACTIVATION_METHODS",
]

_BN_TO_BKN: dict[type, type] = {
    nn.BatchNorm1d: BatchKalmanNorm1d,
    nn.BatchNorm2d: BatchKalmanNorm2d,
    nn.BatchNorm3d: BatchKalmanNorm3d,
}
# Elementwise activations recognized between a norm and the next conv/linear -> transition name
# (names of normlayers.transition.ACTIVATIONS). nn.GELU / F.gelu map to "gelu" or "gelu_tanh".
ACTIVATION_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.SiLU: "silu",
    nn.GELU: "gelu",
    nn.Hardswish: "hardswish",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
}
ACTIVATION_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.relu_: "relu",
    F.relu6: "relu6",
    F.silu: "silu",
    F.gelu: "gelu",
    F.hardswish: "hardswish",
    torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.tanh: "tanh",
}
ACTIVATION_METHODS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "tanh": "tanh", "tanh_": "tanh",
}
_TRANSPARENT_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout3d)  # statistics unchanged (eval-like)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_AVG_POOL_MODULES = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_AVG_POOL_FUNCTIONS = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)
SHORTCUTS = ("prior", "posterior")  # what a residual branch that is a BKN's own input carries (see Merge)


class ConvertError(RuntimeError):
    """The model (or one of its norm layers) cannot be wired into a Kalman chain."""


@dataclass(frozen=True)
class FromPosterior:
    layer: str  # module path of a BKN; its posterior estimates its input's statistics


@dataclass(frozen=True)
class FromInput:
    name: str  # placeholder (forward argument) of the traced model; statistics supplied by the caller


@dataclass(frozen=True)
class Through:
    """``layer(activation(source))``. ``relu`` is kept for ReLU-only callers: ``Through(s, l, relu=True)``
    equals ``Through(s, l, activation="relu")``."""

    source: Recipe
    layer: str  # module path of the nn.ConvNd / nn.Linear
    relu: bool = False
    activation: str | None = None  # name in normlayers.transition.ACTIVATIONS; None -> from ``relu``

    def __post_init__(self) -> None:  # normalize the two spellings so equality is by meaning
        act = self.activation if self.activation is not None else ("relu" if self.relu else "identity")
        object.__setattr__(self, "activation", act)
        object.__setattr__(self, "relu", act == "relu")


@dataclass(frozen=True)
class Activate:
    source: Recipe
    activation: str  # name in normlayers.transition.ACTIVATIONS


@dataclass(frozen=True)
class Merge:
    parts: tuple[Recipe, ...]


@dataclass(frozen=True)
class Pool:
    """Average pooling of ``source``: statistics kept, spatial size ``(s + 2p - k) // stride + 1``."""

    source: Recipe
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] = ()


@dataclass(frozen=True)
class Pad:
    """``source`` zero-padded with ``before`` / ``after`` channels (mean 0, variance 0)."""

    source: Recipe
    before: int
    after: int


Recipe = FromPosterior | FromInput | Through | Activate | Merge | Pool | Pad


class _Unsupported(Exception):
    pass


def _activation(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The transition name of an elementwise activation node, or None."""
    if node.op == "call_module":
        module = modules[node.target]
        name = ACTIVATION_MODULES.get(type(module))
        if name == "gelu" and getattr(module, "approximate", "none") == "tanh":
            return "gelu_tanh"
        return name
    if node.op == "call_function":
        name = ACTIVATION_FUNCTIONS.get(node.target)
        if name == "gelu" and node.kwargs.get("approximate", "none") == "tanh":
            return "gelu_tanh"
        return name
    if node.op == "call_method":
        return ACTIVATION_METHODS.get(node.target)
    return None


def _skip_transparent(node: Any, modules: dict[str, nn.Module]) -> Any:
    while isinstance(node, torch.fx.Node) and node.op == "call_module" and isinstance(
        modules[node.target], _TRANSPARENT_MODULES
    ):
        node = node.args[0]
    return node


def _pool_geometry(node: torch.fx.Node, modules: dict[str, nn.Module]) -> tuple[tuple[int, ...], ...] | None:
    """(kernel, stride, padding) of an average-pooling node, else None."""
    if node.op == "call_module" and isinstance(modules[node.target], _AVG_POOL_MODULES):
        m = modules[node.target]
        nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(m)]
        k = _ints(m.kernel_size, nd)
        return k, _ints(m.stride if m.stride is not None else m.kernel_size, nd), _ints(m.padding, nd)
    if node.op == "call_function" and node.target in _AVG_POOL_FUNCTIONS:
        nd = _AVG_POOL_FUNCTIONS.index(node.target) + 1
        args = list(node.args) + [None] * 3
        k = node.kwargs.get("kernel_size", args[1])
        stride = node.kwargs.get("stride", args[2]) or k
        pad = node.kwargs.get("padding", args[3]) or 0
        return _ints(k, nd), _ints(stride, nd), _ints(pad, nd)
    return None


def _ints(v: Any, nd: int) -> tuple[int, ...]:
    return tuple(int(i) for i in v) if isinstance(v, (tuple, list)) else (int(v),) * nd


def _channel_pad(node: torch.fx.Node) -> tuple[int, int] | None:
    """(before, after) of an ``F.pad`` that pads only the channel dimension of an (N, C, ...) tensor."""
    if node.op != "call_function" or node.target is not F.pad:
        return None
    pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(pad, (tuple, list)) or len(pad) < 4:
        return None
    if len(pad) % 2 or any(int(p) != 0 for p in pad[:-2]):
        return None  # pads a spatial dimension too (or the batch): not a channel pad
    shape = getattr(node.args[0], "meta", {}).get("tensor_meta")
    if shape is not None and len(pad) // 2 != len(shape.shape) - 1:
        return None
    return int(pad[-2]), int(pad[-1])


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


class _Tracer(torch.fx.Tracer):
    """fx tracer that keeps BKN layers as leaves (a model built with BKN layers is converted too)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, BatchKalmanNorm) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Plan:
    recipes: dict[str, Recipe | None]  # per norm path, forward order; None = start of the chain
    errors: dict[str, str]  # per un-wirable norm path
    from_input: dict[str, Recipe]  # recipes of chain starts in terms of FromInput (caller-supplied stats)
    output: Recipe | None  # statistics of the model output, when derivable


def _plan(model: nn.Module) -> _Plan:
    """Trace ``model`` and derive the recipe of every norm layer's input (and of the output)."""
    try:
        graph = _Tracer().trace(model)
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

    def stats(t: Any, before: torch.fx.Node, use_input: bool) -> Recipe | None:
        t = _skip_transparent(t, modules)
        if not isinstance(t, torch.fx.Node):
            raise _Unsupported(f"a constant {t!r} where a tensor with statistics was expected")
        earlier = [u for u in t.users if is_norm(u) and u.args[0] is t and position[u] < position[before]]
        if earlier:
            return FromPosterior(earlier[0].target)
        if t.op == "placeholder":
            return FromInput(t.target) if use_input else None
        if is_norm(t):
            return FromPosterior(t.target)
        if t.op == "call_module" and isinstance(modules[t.target], (nn.modules.conv._ConvNd, nn.Linear)):
            src = _skip_transparent(t.args[0], modules)
            act = _activation(src, modules) if isinstance(src, torch.fx.Node) else None
            if act is not None:
                src = src.args[0]
            inner = stats(src, before, use_input)
            return None if inner is None else Through(inner, t.target, activation=act or "identity")
        act = _activation(t, modules)
        if act is not None:
            inner = stats(t.args[0], before, use_input)
            return None if inner is None else Activate(inner, act)
        geometry = _pool_geometry(t, modules)
        if geometry is not None:
            inner = stats(t.args[0], before, use_input)
            return None if inner is None else Pool(inner, *geometry)
        channels = _channel_pad(t)
        if channels is not None:
            inner = stats(t.args[0], before, use_input)
            return None if inner is None else Pad(inner, *channels)
        if _is_add(t) and len(t.args) == 2 and not t.kwargs:
            parts = tuple(stats(a, before, use_input) for a in t.args)
            if any(p is None for p in parts):
                raise _Unsupported(f"residual add {t.name!r} has a branch without statistics")
            return Merge(parts)
        raise _Unsupported(f"node {t.name!r} ({t.op} {getattr(t.target, '__name__', t.target)})")

    plan: dict[str, Recipe | None] = {}
    errors: dict[str, str] = {}
    from_input: dict[str, Recipe] = {}
    for node in norm_nodes:
        if node.target in plan or node.target in errors:
            errors[node.target] = "the layer is called more than once per forward"
            plan.pop(node.target, None)
            from_input.pop(node.target, None)
            continue
        try:
            plan[node.target] = stats(node.args[0], node, use_input=False)
            if plan[node.target] is None:
                from_input[node.target] = stats(node.args[0], node, use_input=True)
        except _Unsupported as exc:
            errors[node.target] = f"its input cannot be traced to a prior: {exc}"
    output: Recipe | None = None
    out_node = nodes[-1]
    if out_node.op == "output" and isinstance(out_node.args[0], torch.fx.Node):
        try:
            output = stats(out_node.args[0], out_node, use_input=True)
        except _Unsupported:
            output = None
    return _Plan(plan, errors, from_input, output)


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
    ``unchained`` lists the paths left without prior (``strict=False``); ``from_input`` gives the
    chain starts' recipes in terms of the model input, used only for a forward preceded by
    :meth:`set_input_statistics`; ``output`` is the recipe of the model output (or None). Hooks are
    bound methods, so ``copy.deepcopy(model)`` copies a working chain.
    """

    def __init__(self, model: nn.Module, plan: dict[str, Recipe | None], unchained: dict[str, str],
                 generator: torch.Generator | None = None, from_input: dict[str, Recipe] | None = None,
                 output: Recipe | None = None, shortcut: str = "prior") -> None:
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        self.shortcut = shortcut
        self.plan = plan
        self.unchained = unchained
        self.generator = generator
        self.from_input = dict(from_input or {})
        self.output = output
        self.layers: dict[str, nn.Module] = dict(model.named_modules())
        self._posteriors: dict[str, tuple[Tensor, Tensor, tuple[int, ...]]] = {}
        self._priors: dict[str, tuple[Tensor, Tensor, tuple[int, ...]]] = {}  # priors fed in this forward
        self._pending_input: tuple[Tensor, Tensor, tuple[int, ...]] | None = None
        self._input: tuple[Tensor, Tensor, tuple[int, ...]] | None = None
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
        self._priors.clear()
        self._pending_input = self._input = None

    def set_input_statistics(self, stats: tuple[Tensor, Tensor, tuple[int, ...]] | None) -> None:
        """Statistics ``(mean, var, spatial size)`` of the model input for the NEXT forward only
        (e.g. :meth:`output_statistics` of the previous module of a supernet path); ``None`` clears."""
        if stats is not None:
            mean, var, size = stats
            if mean.shape != var.shape or mean.dim() not in (1, 2):
                raise ValueError(f"input statistics must be (C,) or (G, C) mean/var; got {tuple(mean.shape)}, "
                                 f"{tuple(var.shape)}")
            stats = (mean, var, tuple(int(s) for s in size))
        self._pending_input = stats

    def output_statistics(self) -> tuple[Tensor, Tensor, tuple[int, ...]] | None:
        """Predicted ``(mean, var, spatial size)`` of the model output after the last TRAINING forward
        (un-normalized statistics, affine ignored, as for priors); None if not derivable."""
        if self.output is None:
            return None
        transition = next((self.layers[n].transition for n in self.plan), "monte_carlo")
        return self._evaluate(self.output, transition)

    def _reset(self, module: nn.Module, args: Any) -> None:
        self._posteriors.clear()
        self._priors.clear()
        self._input, self._pending_input = self._pending_input, None

    def _record(self, name: str, module: nn.Module, args: Any, output: Tensor) -> None:
        if module.posterior is not None:
            mean, var = module.posterior
            self._posteriors[name] = (mean, var, tuple(args[0].shape[2:]))

    def _feed(self, name: str, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not module.training or len(args) > 1 or kwargs.get("prior") is not None:
            return None
        recipe = self.plan[name]
        if recipe is None:
            recipe = self.from_input.get(name) if self._input is not None else None
            if recipe is None:
                return None
        stats = self._evaluate(recipe, module.transition)
        if stats is None:
            return None
        mean, var, _ = stats
        if mean.dim() == 2 and mean.shape[0] == 1:  # (1, C) -> (C,): one group
            mean, var = mean[0], var[0]
        self._priors[name] = (mean, var, tuple(args[0].shape[2:]))
        return args, {**kwargs, "prior": (mean, var)}

    def _evaluate(self, recipe: Recipe, transition: str,
                  carried: bool = False) -> tuple[Tensor, Tensor, tuple[int, ...]] | None:
        """Statistics of ``recipe``; ``carried``: inside a residual branch (no conv since the merge), where
        ``shortcut="prior"`` makes a BKN's own input carry that BKN's prior (the authors' prior sum)."""
        if isinstance(recipe, FromPosterior):
            if carried and self.shortcut == "prior" and recipe.layer in self._priors:
                return self._priors[recipe.layer]
            return self._posteriors.get(recipe.layer)
        if isinstance(recipe, FromInput):
            return self._input
        if isinstance(recipe, Through):
            src = self._evaluate(recipe.source, transition)
            if src is None:
                return None
            mean, var, size = src
            layer = self.layers[recipe.layer]
            if transition == "analytic":
                m, v = analytic_prior(mean, var, layer, activation=recipe.activation)
            else:
                spatial = size if size or not isinstance(layer, nn.Linear) else None
                m, v = monte_carlo_prior(mean, var, layer, spatial, generator=self.generator,
                                         activation=recipe.activation)
            return m, v, _conv_output_size(layer, size)
        if isinstance(recipe, Activate):
            src = self._evaluate(recipe.source, transition, carried)
            if src is None:
                return None
            mean, var = activation_moments(src[0], src[1], recipe.activation)
            return mean, var, src[2]
        if isinstance(recipe, Pool):
            src = self._evaluate(recipe.source, transition, carried)
            if src is None:
                return None
            size = tuple((s + 2 * p - k) // st + 1 for s, k, st, p in
                         zip(src[2], recipe.kernel, recipe.stride, recipe.padding or (0,) * len(recipe.kernel)))
            return src[0], src[1], size
        if isinstance(recipe, Pad):
            src = self._evaluate(recipe.source, transition, carried)
            if src is None:
                return None
            mean, var = pad_channels((src[0], src[1]), recipe.before, recipe.after)
            return mean, var, src[2]
        parts = [self._evaluate(p, transition, carried=True) for p in recipe.parts]
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
    guard_scope: str = "layer",
    backend: str = "auto",
    strict: bool = True,
    generator: torch.Generator | None = None,
    shortcut: str = "prior",
) -> nn.Module:
    """Replace every ``nn.BatchNorm{1,2,3}d`` by a BKN (weights and buffers copied) and chain them.

    Returns ``model`` (modified in place) with ``model.kalman_chain`` (a :class:`KalmanChain`).
    Raises :class:`ConvertError` for models or layers it cannot wire (see the module docstring);
    ``strict=False`` swaps such layers anyway and leaves them without prior, with a warning.
    ``shortcut``: what a residual branch that is a BKN's own input carries, ``"prior"`` (the authors')
    or ``"posterior"`` (see the module docstring, ``Merge``). ``guard_ratio``, ``guard_scope``, ``group_size``,
    ``prior_weight``, ``transition``, ``backend``: passed to every :class:`BatchKalmanNorm` (``guard_scope``
    ``"layer"``: one fallback decision per layer and step over all ghost groups, the authors'; ``"group"``: one
    per ghost group).
    """
    if hasattr(model, "kalman_chain"):
        raise ConvertError("model is already converted (it has a kalman_chain)")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
    if isinstance(model, tuple(_BN_TO_BKN)):
        raise ConvertError("convert a model that contains BatchNorm layers, not a single BatchNorm layer")
    planned = _plan(model)
    plan, errors = planned.recipes, planned.errors
    if not plan and not errors:
        raise ConvertError(f"{type(model).__name__} has no nn.BatchNorm1d/2d/3d layer to convert")
    if errors and strict:
        detail = "; ".join(f"{name}: {msg}" for name, msg in errors.items())
        raise ConvertError(f"cannot chain {len(errors)} norm layer(s): {detail} (use strict=False to leave them "
                           "un-chained)")
    for name, msg in errors.items():
        warnings.warn(f"normlayers.convert: {name} left without prior ({msg})", stacklevel=2)
    check_guard_scope(guard_scope)
    options = dict(prior_weight=prior_weight, guard_ratio=guard_ratio, guard_scope=guard_scope,
                   group_size=group_size, transition=transition, backend=backend)
    for name in list(plan) + list(errors):
        module = model.get_submodule(name)
        if isinstance(module, BatchKalmanNorm):
            continue
        _swap(model, name, _to_bkn(module, **options))
    model.kalman_chain = KalmanChain(model, plan, errors, generator, planned.from_input, planned.output, shortcut)
    return model

