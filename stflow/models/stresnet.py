"""ST-ResNet (Zhang et al., AAAI 2017): closeness / period / trend residual CNNs, parametric-matrix fusion and an
external component, in the common ``forward(batch)`` interface.

Each present component stacks its frames along channels (most recent first, as DeepST does), then
conv3x3(2*l -> F) -> ``res_units`` x [norm -> ReLU -> conv3x3, norm -> ReLU -> conv3x3, + identity] -> ReLU ->
conv3x3(F -> 2). Outputs are fused as sum_k W_k * X_k with learned per-cell weights W_k (2, H, W); the external
vector of the target slot goes through Linear(D -> 10) -> ReLU -> Linear(10 -> 2*H*W) -> ReLU and is added; the
result passes a tanh. DeepST's code offers BatchNorm in the residual units as an option; the registered factories
use it by default because without it the residual stream grows until the tanh saturates and training stalls
(measured on BikeNYC: pre-tanh outputs reach -48 after 30 Adam steps at lr 2e-4, loss frozen at 0.0335).
``norm_layer=None`` gives the un-normalized network; any ``norm_layer(channels)`` can be plugged in. The registered
factories choose it by name (``norm="bn"|"gn"|"bkn"|"none"``); BKN chains the residual units' norms
(:func:`stflow.models.kalman.kalman_stresnet`).

``horizon=H > 1``: a direct multi-step head (:mod:`stflow.models.horizon`): every component's last conv and the
fusion weights give ``2H`` step-major channels, the external component is applied to each target slot's vector
(``ext_target (B, H, D)``), the output is ``(B, H, 2, h, w)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stflow.models.horizon import check_horizon, split_steps, target_ext

__all__ = ["STResNet", "STResNetConfig", "STRESNET_PRESETS"]

NormLayer = Callable[[int], nn.Module]

# The paper's settings: L12 with (lc, lp, lt) = (3, 1, 1) for TaxiBJ, L4 with (3, 4, 4) for BikeNYC.
STRESNET_PRESETS: dict[str, dict[str, Any]] = {
    "bikenyc": dict(grid_shape=(16, 8), len_closeness=3, len_period=4, len_trend=4, res_units=4),
    "taxibj": dict(grid_shape=(32, 32), len_closeness=3, len_period=1, len_trend=1, res_units=12),
}


@dataclass(frozen=True)
class STResNetConfig:
    grid_shape: tuple[int, int] = (16, 8)
    ext_dim: int = 8  # 0 = no external component
    len_closeness: int = 3
    len_period: int = 4
    len_trend: int = 4
    flow_channels: int = 2
    filters: int = 64
    res_units: int = 4
    ext_hidden: int = 10
    horizon: int = 1  # output steps: 1 = one slot (B, 2, H, W); > 1 = a direct head (B, horizon, 2, H, W)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_shape", tuple(int(s) for s in self.grid_shape))
        check_horizon("ST-ResNet", self.horizon)
        lengths = (self.len_closeness, self.len_period, self.len_trend)
        if min(lengths) < 0 or sum(lengths) < 1:
            raise ValueError(
                f"ST-ResNet needs non-negative lengths with at least one frame, got (lc, lp, lt)={lengths}"
            )
        if self.ext_dim < 0 or self.res_units < 0 or self.filters < 1 or self.ext_hidden < 1:
            raise ValueError(f"invalid STResNetConfig: {self}")
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {self.grid_shape}")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> STResNetConfig:
        if name not in STRESNET_PRESETS:
            raise ValueError(f"unknown ST-ResNet preset {name!r}; choose from {sorted(STRESNET_PRESETS)}")
        return cls(**{**STRESNET_PRESETS[name], **overrides})


class _ResUnit(nn.Module):
    """x + conv(ReLU(norm(conv(ReLU(norm(x))))))."""

    def __init__(self, channels: int, norm_layer: NormLayer | None) -> None:
        super().__init__()
        self.norm1 = norm_layer(channels) if norm_layer else nn.Identity()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = norm_layer(channels) if norm_layer else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, F, H, W) -> (N, F, H, W)."""
        y = self.conv1(torch.relu(self.norm1(x)))
        return x + self.conv2(torch.relu(self.norm2(y)))


class _Component(nn.Module):
    """One temporal component: frames stacked on channels -> residual CNN -> (N, 2, H, W)."""

    def __init__(self, in_channels: int, cfg: STResNetConfig, norm_layer: NormLayer | None) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, cfg.filters, 3, padding=1)
        self.units = nn.Sequential(*(_ResUnit(cfg.filters, norm_layer) for _ in range(cfg.res_units)))
        self.head = nn.Conv2d(cfg.filters, cfg.flow_channels * cfg.horizon, 3, padding=1)

    def forward(self, frames: Tensor) -> Tensor:
        """frames (B, l, 2, H, W) -> (B, 2 * horizon, H, W), steps major."""
        x = self.stem(frames.flatten(1, 2))  # (B, l, 2, H, W) -> (B, 2l, H, W): frame-major, as DeepST stacks
        return self.head(torch.relu(self.units(x)))


class STResNet(nn.Module):
    """ST-ResNet over the batch dict; see the module docstring."""

    trainable = True

    def __init__(self, config: STResNetConfig, norm_layer: NormLayer | None = None) -> None:
        super().__init__()
        self.config = cfg = config
        self.horizon = cfg.horizon
        h, w = cfg.grid_shape
        self.lengths = {"closeness": cfg.len_closeness, "period": cfg.len_period, "trend": cfg.len_trend}
        self.components = nn.ModuleDict(
            {k: _Component(n * cfg.flow_channels, cfg, norm_layer) for k, n in self.lengths.items() if n > 0}
        )
        # Parametric-matrix fusion: one (2, H, W) weight per component and step (DeepST draws them from U[0, 1)).
        self.fusion_weights = nn.ParameterDict(
            {k: nn.Parameter(torch.rand(cfg.flow_channels * cfg.horizon, h, w)) for k in self.components}
        )
        self.external = (
            nn.Sequential(
                nn.Linear(cfg.ext_dim, cfg.ext_hidden), nn.ReLU(),
                nn.Linear(cfg.ext_hidden, cfg.flow_channels * h * w), nn.ReLU(),
            )
            if cfg.ext_dim > 0
            else None
        )

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """batch: closeness (B, lc, 2, H, W), period (B, lp, 2, H, W), trend (B, lt, 2, H, W) scaled, most recent
        first; ext_target (B, D) when ext_dim > 0 -> prediction (B, 2, H, W), scaled. With ``horizon`` S > 1:
        ext_target (B, S, D) (one vector per target slot) -> (B, S, 2, H, W)."""
        cfg = self.config
        frame_shape = (cfg.flow_channels, *cfg.grid_shape)
        out = None
        for key, component in self.components.items():
            frames = batch.get(key)
            if frames is None or frames.ndim != 5 or tuple(frames.shape[1:]) != (self.lengths[key], *frame_shape):
                got = None if frames is None else tuple(frames.shape)
                raise ValueError(f"ST-ResNet expects {key} of shape (B, {self.lengths[key]}, "
                                 f"{', '.join(map(str, frame_shape))}), got {got}")
            term = self.fusion_weights[key] * component(frames)
            out = term if out is None else out + term
        out = split_steps(out, cfg.horizon)  # (B, 2S, H, W) -> (B, S, 2, H, W) when S > 1
        if self.external is not None:
            ext = target_ext("ST-ResNet", batch, cfg.horizon, cfg.ext_dim)
            # (B, 2*H*W) -> (B, 2, H, W), or per step (B, S, 2*H*W) -> (B, S, 2, H, W)
            out = out + self.external(ext).unflatten(-1, frame_shape)
        return torch.tanh(out)
