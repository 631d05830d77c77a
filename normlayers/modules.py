"""BatchKalmanNorm layers with torch's BatchNorm signature, parameter and buffer names.

Checkpoints move both ways between ``nn.BatchNorm2d`` and ``BatchKalmanNorm2d`` (strict
``load_state_dict``): ``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``.
Without a prior the layer IS BatchNorm, in training and eval. See ``normlayers/__init__.py`` for the
decisions this implementation makes where the spec leaves a choice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlayers.functional import BACKENDS, general_path, try_hot_path
from normlayers.reference import GUARD_SCOPES, check_guard_scope

__all__ = ["BatchKalmanNorm", "BatchKalmanNorm1d", "BatchKalmanNorm2d", "BatchKalmanNorm3d", "TRANSITIONS"]

TRANSITIONS = ("monte_carlo", "analytic")


class BatchKalmanNorm(nn.Module):
    """Batch Kalman Normalization over ``(N, C, *)`` inputs.

    ``forward(x, prior=None)``: ``prior`` is ``(mean, var)`` of shape ``(C,)`` or ``(G, C)`` predicted
    for this layer's input (see :mod:`normlayers.transition`). After a training forward,
    ``self.posterior`` is ``(mean, var)`` (``(C,)``, or ``(G, C)`` with ``group_size``), float32, with
    autograd graph, for the next layer; it is ``None`` after an eval forward. ``transition`` says how
    :func:`normlayers.convert` predicts this layer's prior from the previous posterior. ``guard_scope``
    (one of :data:`normlayers.reference.GUARD_SCOPES`): the fallback to plain BN is decided once for the layer
    over all ghost groups (``"layer"``, the authors') or once per ghost group (``"group"``); it is a setting,
    not state (not in ``state_dict``, so BatchNorm checkpoints still load strictly both ways).
    """

    _version = 2
    guard_scope: str = GUARD_SCOPES[0]  # class default: modules pickled before the option existed get it

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        prior_weight: float = 0.9,
        guard_ratio: float = 100.0,
        group_size: int | None = None,
        transition: str = "monte_carlo",
        backend: str = "auto",
        guard_scope: str = "layer",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= prior_weight <= 1.0:
            raise ValueError(f"prior_weight must lie in [0, 1], got {prior_weight}")
        if group_size is not None and group_size <= 0:
            raise ValueError(f"group_size must be a positive integer or None, got {group_size}")
        if transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {TRANSITIONS}, got {transition!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        check_guard_scope(guard_scope)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.prior_weight = float(prior_weight)
        self.guard_ratio = float(guard_ratio)
        self.group_size = group_size
        self.guard_scope = guard_scope
        self.transition = transition
        self.backend = backend
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, **{k: v for k, v in factory.items() if k != "dtype"}),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.posterior: tuple[Tensor, Tensor] | None = None
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, *) (got {x.dim()}D input)")

    def forward(self, x: Tensor, prior: tuple[Tensor, Tensor] | None = None) -> Tensor:
        self._check_input_dim(x)
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with {x.shape[1]} channels "
                f"(shape {tuple(x.shape)})"
            )
        # hot path: nn.Module's __getattr__ costs ~1 us per parameter/buffer (more with cold caches), so read
        # its registries directly, once
        params, buffers = self._parameters, self._buffers
        weight, bias = params["weight"], params["bias"]
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        training, momentum = self.training, self.momentum
        counting = training and self.track_running_stats
        counter = buffers["num_batches_tracked"] if counting else None
        track = not training or self.track_running_stats
        if not track:
            running_mean = running_var = None
        backend = self.backend
        batch_stats = training or (running_mean is None and running_var is None)  # eval without buffers: batch stats
        # the common case in one call (the C++ operator counts the step too); None: the general path below
        out = try_hot_path(x, running_mean, running_var, weight, bias, prior, self.prior_weight, batch_stats,
                           momentum, self.eps, self.guard_ratio, self.group_size, backend, self.guard_scope, counter)
        if out is not None:
            self.__dict__["posterior"] = (out[1], out[2])  # a plain attribute: skip nn.Module.__setattr__
            return out[0]
        if counter is not None:
            counter.add_(1)
            if momentum is None:  # cumulative moving average, like torch
                momentum = 1.0 / float(counter)
        y, post_mean, post_var = general_path(  # posteriors (C,) ungrouped, (G, C) with groups
            x,
            running_mean,
            running_var,
            weight,
            bias,
            prior=prior,
            prior_weight=self.prior_weight,
            training=batch_stats,
            momentum=0.0 if momentum is None else momentum,
            eps=self.eps,
            guard_ratio=self.guard_ratio,
            group_size=self.group_size,
            backend=backend,
            flat=True,
            guard_scope=self.guard_scope,
        )
        posterior = None if post_mean is None or post_var is None else (post_mean, post_var)
        self.__dict__["posterior"] = posterior
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, prior_weight={self.prior_weight}, "
            f"guard_ratio={self.guard_ratio}, guard_scope={self.guard_scope!r}, group_size={self.group_size}, "
            f"transition={self.transition!r}"
        )

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # checkpoints older than BatchNorm's version 2 lack the counter (torch does the same)
            state_dict[key] = (
                self.num_batches_tracked if self.num_batches_tracked is not None
                and self.num_batches_tracked.device != torch.device("meta")
                else torch.tensor(0, dtype=torch.long)
            )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class BatchKalmanNorm1d(BatchKalmanNorm):
    """BKN for ``(N, C)`` or ``(N, C, L)`` inputs (like ``nn.BatchNorm1d``)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 2 and x.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


class BatchKalmanNorm2d(BatchKalmanNorm):
    """BKN for ``(N, C, H, W)`` inputs (like ``nn.BatchNorm2d``)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class BatchKalmanNorm3d(BatchKalmanNorm):
    """BKN for ``(N, C, D, H, W)`` inputs (like ``nn.BatchNorm3d``)."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"expected 5D input (got {x.dim()}D input)")
