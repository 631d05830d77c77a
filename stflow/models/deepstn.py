"""DeepSTN+ (Lin et al., AAAI 2019): a closeness / period / trend stem and ResPlus units, in the common
``forward(batch)`` interface.

A ResPlus unit is a pre-activation residual unit whose first convolution gives only ``filters - plus_channels``
channels; the other ``plus_channels`` come from a *plus* branch that sees the whole grid at once: a 1x1 conv to
``plus_channels``, average pooling by ``pool_rate``, then ONE dense layer from the pooled grid to a full
``(plus_channels, H, W)`` map, so every cell can draw on every other cell (long-range dependence) in one layer::

    h = dropout(ReLU(norm1(x)))
    y = concat(conv3x3(h) -> F - Fp,  dense(avgpool(conv1x1(h) -> Fp)) -> (Fp, H, W))      # (B, F, H, W)
    out = x + conv3x3(dropout(ReLU(norm2(y))))

Stem: each present component stacks its frames on channels (most recent first, as DeepST does) and a 1x1 conv
maps them to ``stem_channels``; the external vector of the target slot, when there is one, becomes
``ext_channels`` maps through Linear(D -> ext_hidden) -> ReLU -> Linear(ext_hidden -> ext_channels*H*W) -> ReLU
(DeepSTN+'s time maps; the point-of-interest gate of the paper is left out, BikeNYC has no POI data); the maps are
concatenated and a 3x3 conv gives ``filters`` channels; ``res_units`` ResPlus units; then norm -> ReLU ->
conv3x3(F -> 2) -> tanh.

``horizon=H > 1``: a direct multi-step head (:mod:`stflow.models.horizon`): the external maps are made from EVERY
target slot's vector (``ext_target (B, H, D)`` -> ``H * ext_channels`` maps into the stem, so the shared trunk
knows the time of each step) and the head conv gives ``2H`` step-major channels -> ``(B, H, 2, h, w)``.

BKN (``norm="bkn"``, :func:`stflow.models.kalman.kalman_deepstn`): ``normlayers.convert`` chains ``body`` (the units
and the output norm): each unit's ``norm1`` and the output norm get priors (the residual sum: the unit's input
statistics plus ``norm2``'s posterior through ReLU and ``conv2``); ``norm2`` sees a concatenation of the local and
the plus branch, which the chain cannot predict, so it runs on its batch statistics alone (no prior).

Deviation from the authors' Keras code (ReLU -> BatchNorm -> Dropout -> conv): the norm comes BEFORE the ReLU, as
in ST-ResNet, so every norm choice of the registry (``bn``, ``gn``, ``bkn``, ``none``) plugs in the same way; and
the plus branch reduces to ``plus_channels`` with a 1x1 conv before its dense layer instead of applying the dense
layer to all ``filters`` channels (16x8 BikeNYC: 0.26 M weights per unit instead of 2.1 M).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stflow.models.horizon import check_horizon, split_steps, target_ext

__all__ = ["DeepSTN", "DeepSTNConfig"]

NormLayer = Callable[[int], nn.Module]


@dataclass(frozen=True)
class DeepSTNConfig:
    grid_shape: tuple[int, int] = (16, 8)
    ext_dim: int = 33  # 0 = no external maps
    len_closeness: int = 4
    len_period: int = 2
    len_trend: int = 0
    flow_channels: int = 2
    stem_channels: int = 32  # per component, after the 1x1 stem conv
    ext_hidden: int = 10
    ext_channels: int = 4  # maps made from the external vector
    filters: int = 64  # F
    plus_channels: int = 8  # Fp: channels of the whole-grid dense branch
    pool_rate: int = 2  # average pooling before the dense layer
    res_units: int = 2
    dropout: float = 0.1
    horizon: int = 1  # output steps: 1 = one slot (B, 2, H, W); > 1 = a direct head (B, horizon, 2, H, W)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_shape", tuple(int(s) for s in self.grid_shape))
        check_horizon("DeepSTN+", self.horizon)
        lengths = (self.len_closeness, self.len_period, self.len_trend)
        if min(lengths) < 0 or sum(lengths) < 1:
            raise ValueError(f"DeepSTN+ needs non-negative lengths with at least one frame, got (lc, lp, lt)={lengths}")
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {self.grid_shape}")
        if not 0 < self.plus_channels < self.filters:
            raise ValueError(f"need 0 < plus_channels < filters, got {self.plus_channels} and {self.filters}")
        if min(self.stem_channels, self.ext_hidden, self.pool_rate) < 1 or self.res_units < 0 or self.ext_dim < 0:
            raise ValueError(f"invalid DeepSTNConfig: {self}")
        if self.ext_dim > 0 and self.ext_channels < 1:
            raise ValueError("ext_channels must be >= 1 when ext_dim > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def pooled_shape(self) -> tuple[int, int]:
        """Grid after the plus branch's pooling (ceil mode: no cell is dropped)."""
        return tuple(math.ceil(s / self.pool_rate) for s in self.grid_shape)  # type: ignore[return-value]


class ResPlus(nn.Module):
    """One ResPlus unit (see the module docstring); x (B, F, H, W) -> (B, F, H, W)."""

    def __init__(self, cfg: DeepSTNConfig, norm_layer: NormLayer | None) -> None:
        super().__init__()
        f, fp = cfg.filters, cfg.plus_channels
        h, w = cfg.grid_shape
        ph, pw = cfg.pooled_shape
        self.plus_shape = (fp, h, w)
        self.norm1 = norm_layer(f) if norm_layer else nn.Identity()
        self.drop1 = nn.Dropout(cfg.dropout)
        self.conv1 = nn.Conv2d(f, f - fp, 3, padding=1)
        self.plus_reduce = nn.Conv2d(f, fp, 1)
        self.plus_pool = nn.AvgPool2d(cfg.pool_rate, ceil_mode=True)
        self.plus_dense = nn.Linear(fp * ph * pw, fp * h * w)
        self.norm2 = norm_layer(f) if norm_layer else nn.Identity()
        self.drop2 = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(f, f, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, F, H, W) -> (B, F, H, W)."""
        h = self.drop1(torch.relu(self.norm1(x)))
        local = self.conv1(h)  # (B, F - Fp, H, W)
        pooled = self.plus_pool(self.plus_reduce(h))  # (B, Fp, H/r, W/r)
        wide = self.plus_dense(pooled.flatten(1))  # (B, Fp*H/r*W/r) -> (B, Fp*H*W)
        wide = wide.unflatten(1, self.plus_shape)  # (B, Fp*H*W) -> (B, Fp, H, W): channel-major, as flattened
        y = torch.cat([local, wide], dim=1)  # (B, F, H, W)
        return x + self.conv2(self.drop2(torch.relu(self.norm2(y))))


class DeepSTN(nn.Module):
    """DeepSTN+ over the batch dict; see the module docstring."""

    trainable = True

    def __init__(self, config: DeepSTNConfig, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        self.horizon = cfg.horizon
        h, w = cfg.grid_shape
        self.lengths = {"closeness": cfg.len_closeness, "period": cfg.len_period, "trend": cfg.len_trend}
        self.stems = nn.ModuleDict(
            {k: nn.Conv2d(n * cfg.flow_channels, cfg.stem_channels, 1) for k, n in self.lengths.items() if n > 0}
        )
        self.external = (
            nn.Sequential(
                nn.Linear(cfg.ext_dim, cfg.ext_hidden), nn.ReLU(),
                nn.Linear(cfg.ext_hidden, cfg.ext_channels * h * w), nn.ReLU(),
            )
            if cfg.ext_dim > 0
            else None
        )
        ext_maps = cfg.ext_channels * cfg.horizon if self.external is not None else 0  # one set per target slot
        fused = len(self.stems) * cfg.stem_channels + ext_maps
        self.fuse = nn.Conv2d(fused, cfg.filters, 3, padding=1)
        # ResPlus units then the output norm, in ONE Sequential: the BKN wiring chains them with normlayers.convert.
        self.body = nn.Sequential(
            *(ResPlus(cfg, norm_layer) for _ in range(cfg.res_units)),
            norm_layer(cfg.filters) if norm_layer else nn.Identity(),
        )
        self.head = nn.Conv2d(cfg.filters, cfg.flow_channels * cfg.horizon, 3, padding=1)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """batch: closeness (B, lc, 2, H, W), period (B, lp, 2, H, W), trend (B, lt, 2, H, W) scaled, most recent
        first; ext_target (B, D) when ext_dim > 0 -> prediction (B, 2, H, W), scaled to [-1, 1]. With ``horizon``
        K > 1: ext_target (B, K, D) (one vector per target slot) -> (B, K, 2, H, W)."""
        cfg = self.config
        frame_shape = (cfg.flow_channels, *cfg.grid_shape)
        parts = []
        for key, stem in self.stems.items():
            frames = batch.get(key)
            if frames is None or frames.ndim != 5 or tuple(frames.shape[1:]) != (self.lengths[key], *frame_shape):
                got = None if frames is None else tuple(frames.shape)
                raise ValueError(f"DeepSTN+ expects {key} of shape (B, {self.lengths[key]}, "
                                 f"{', '.join(map(str, frame_shape))}), got {got}")
            parts.append(stem(frames.flatten(1, 2)))  # (B, l, 2, H, W) -> (B, 2l, H, W) -> (B, S, H, W)
        if self.external is not None:
            ext = target_ext("DeepSTN+", batch, cfg.horizon, cfg.ext_dim)
            maps = self.external(ext)  # (B, E*H*W), or (B, K, E*H*W) per target slot
            if cfg.horizon > 1:
                maps = maps.flatten(1)  # (B, K, E*H*W) -> (B, K*E*H*W), step-major
            parts.append(maps.unflatten(1, (-1, *cfg.grid_shape)))  # -> (B, E, H, W), or (B, K*E, H, W)
        x = self.fuse(torch.cat(parts, dim=1))  # (B, n*S [+ K*E], H, W) -> (B, F, H, W)
        x = self.body(x)  # ResPlus units, then the output norm: (B, F, H, W)
        return torch.tanh(split_steps(self.head(torch.relu(x)), cfg.horizon))  # (B, 2, H, W) or (B, K, 2, H, W)
