"""STID-style forecaster (Shao et al., CIKM 2022, "Spatial-Temporal Identity"): an MLP over each cell's recent
history with learned spatial, time-of-day and day-of-week embeddings, in the common ``forward(batch)`` interface.

Per cell (H*W of them, all sharing the weights):

* history: every input frame of the window at that cell — closeness, period and trend, most recent first, both
  flow channels -> ``2 * (lc + lp + lt)`` numbers -> Linear -> ``embed_dim``;
* spatial identity: a learned ``node_dim`` vector per cell;
* time of day and day of week OF THE TARGET SLOT: learned ``tod_dim`` / ``dow_dim`` vectors, looked up with the
  slot and weekday read from ``batch["ext_target"]``. This needs the ``features="acfm"`` external vector, whose
  layout starts with the weekday one-hot (7, Monday first), the working-day flag (1), then the slot-of-day one-hot
  (T = ``slots_per_day``) (``stflow.data.features``); the model reads ``argmax`` of those two one-hots.
  ``time_embeddings=False`` drops both (then any external vector, or none, is accepted and ignored).

``horizon=H > 1``: a direct multi-step head (:mod:`stflow.models.horizon`), STID's own multi-step design: the
regression head gives ``2H`` numbers per cell (step-major) -> ``(B, H, 2, h, w)``; the time embeddings are those of
the FIRST target slot (``ext_target (B, H, D)``, step 0; the later steps' slots follow from it).

The concatenation (``hidden = embed_dim + node_dim [+ tod_dim + dow_dim]``) goes through ``layers`` residual MLP
blocks ``x + fc2(dropout(ReLU(fc1(x))))`` and a Linear(hidden -> 2) regression head, then tanh (outputs are scaled
to [-1, 1] like every model here). There are no normalization layers: the registry's ``norm`` must be None or
"none" (STID's design has none; LayerNorm-free by choice, so the model is the paper's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stflow.models.horizon import check_horizon, split_steps, target_ext

__all__ = ["STID", "STIDConfig", "WEEKDAY_SLICE", "slot_slice"]

WEEKDAY_SLICE = slice(0, 7)  # weekday one-hot in the features="acfm" vector


def slot_slice(slots_per_day: int) -> slice:
    """Where the slot-of-day one-hot sits in the features="acfm" vector (after weekday one-hot and flag)."""
    return slice(8, 8 + slots_per_day)


@dataclass(frozen=True)
class STIDConfig:
    grid_shape: tuple[int, int] = (16, 8)
    ext_dim: int = 33
    len_closeness: int = 4
    len_period: int = 2
    len_trend: int = 0
    slots_per_day: int = 24
    flow_channels: int = 2
    embed_dim: int = 32
    node_dim: int = 32
    tod_dim: int = 32
    dow_dim: int = 32
    layers: int = 3
    dropout: float = 0.15
    time_embeddings: bool = True
    horizon: int = 1  # output steps: 1 = one slot (B, 2, H, W); > 1 = a direct head (B, horizon, 2, H, W)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_shape", tuple(int(s) for s in self.grid_shape))
        check_horizon("STID", self.horizon)
        lengths = (self.len_closeness, self.len_period, self.len_trend)
        if min(lengths) < 0 or sum(lengths) < 1:
            raise ValueError(f"STID needs non-negative lengths with at least one frame, got (lc, lp, lt)={lengths}")
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
            raise ValueError(f"grid_shape must be two positive ints, got {self.grid_shape}")
        if min(self.embed_dim, self.node_dim, self.slots_per_day) < 1 or self.layers < 0:
            raise ValueError(f"invalid STIDConfig: {self}")
        if self.time_embeddings:
            if min(self.tod_dim, self.dow_dim) < 1:
                raise ValueError("tod_dim and dow_dim must be >= 1 with time_embeddings")
            if self.ext_dim < slot_slice(self.slots_per_day).stop:
                raise ValueError(
                    f"STID's time embeddings read weekday and slot of day from the features='acfm' external vector "
                    f"(>= {slot_slice(self.slots_per_day).stop} dims for {self.slots_per_day} slots a day), got "
                    f"ext_dim={self.ext_dim}; use features='acfm' or time_embeddings=False"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def frames(self) -> int:
        return self.len_closeness + self.len_period + self.len_trend

    @property
    def hidden(self) -> int:
        return self.embed_dim + self.node_dim + (self.tod_dim + self.dow_dim if self.time_embeddings else 0)


class _Block(nn.Module):
    """x + fc2(dropout(ReLU(fc1(x)))), on the last axis."""

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., width) -> (..., width)."""
        return x + self.fc2(self.drop(torch.relu(self.fc1(x))))


class STID(nn.Module):
    """STID over the batch dict; see the module docstring."""

    trainable = True

    def __init__(self, config: STIDConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.horizon = cfg.horizon
        h, w = cfg.grid_shape
        self.lengths = {"closeness": cfg.len_closeness, "period": cfg.len_period, "trend": cfg.len_trend}
        self.history = nn.Linear(cfg.frames * cfg.flow_channels, cfg.embed_dim)
        self.node = nn.Parameter(torch.empty(h * w, cfg.node_dim))
        nn.init.xavier_uniform_(self.node)
        if cfg.time_embeddings:
            self.time_of_day = nn.Parameter(torch.empty(cfg.slots_per_day, cfg.tod_dim))
            self.day_of_week = nn.Parameter(torch.empty(7, cfg.dow_dim))
            nn.init.xavier_uniform_(self.time_of_day)
            nn.init.xavier_uniform_(self.day_of_week)
        self.blocks = nn.Sequential(*(_Block(cfg.hidden, cfg.dropout) for _ in range(cfg.layers)))
        self.head = nn.Linear(cfg.hidden, cfg.flow_channels * cfg.horizon)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """batch: closeness (B, lc, 2, H, W), period (B, lp, 2, H, W), trend (B, lt, 2, H, W) scaled, most recent
        first; ext_target (B, D) with the features='acfm' layout when time_embeddings -> (B, 2, H, W) in [-1, 1].
        With ``horizon`` S > 1: ext_target (B, S, D) (step 0's time is embedded) -> (B, S, 2, H, W)."""
        cfg = self.config
        h, w = cfg.grid_shape
        frame_shape = (cfg.flow_channels, h, w)
        parts = []
        for key, length in self.lengths.items():
            if length == 0:
                continue
            frames = batch.get(key)
            if frames is None or frames.ndim != 5 or tuple(frames.shape[1:]) != (length, *frame_shape):
                got = None if frames is None else tuple(frames.shape)
                raise ValueError(f"STID expects {key} of shape (B, {length}, {', '.join(map(str, frame_shape))}), "
                                 f"got {got}")
            parts.append(frames)
        x = torch.cat(parts, dim=1)  # (B, L, 2, H, W), L = lc + lp + lt
        b = x.shape[0]
        x = x.flatten(1, 2).flatten(2).transpose(1, 2)  # (B, L, 2, H, W) -> (B, 2L, H*W) -> (B, H*W, 2L): per cell
        features = [self.history(x), self.node.expand(b, -1, -1)]  # (B, H*W, embed_dim), (B, H*W, node_dim)
        if cfg.time_embeddings:
            ext = target_ext("STID", batch, cfg.horizon, cfg.ext_dim)
            if cfg.horizon > 1:
                ext = ext[:, 0]  # (B, S, D) -> (B, D): the first target slot's time
            weekday = ext[:, WEEKDAY_SLICE].argmax(dim=1)  # (B,) 0 = Monday
            slot = ext[:, slot_slice(cfg.slots_per_day)].argmax(dim=1)  # (B,) slot of day of the target
            features.append(self.time_of_day[slot].unsqueeze(1).expand(-1, h * w, -1))  # (B, H*W, tod_dim)
            features.append(self.day_of_week[weekday].unsqueeze(1).expand(-1, h * w, -1))  # (B, H*W, dow_dim)
        y = self.head(self.blocks(torch.cat(features, dim=2)))  # (B, H*W, hidden) -> (B, H*W, 2S)
        y = y.transpose(1, 2).unflatten(2, (h, w))  # (B, H*W, 2S) -> (B, 2S, H*W) -> (B, 2S, H, W)
        return torch.tanh(split_steps(y, cfg.horizon))  # (B, 2, H, W), or (B, 2S, H, W) -> (B, S, 2, H, W)
