"""ACFM: the Attentive Crowd Flow Machine (Liu et al., ACM MM 2018), clean and reference variants.

Batch layout (``forward(batch)``), float32, flows scaled to [-1, 1], frames MOST RECENT FIRST::

    closeness (B, lc, 2, H, W)   period (B, lp, 2, H, W)   trend (B, lt, 2, H, W)
    ext_closeness (B, lc, D)     ext_period (B, lp, D)     ext_trend (B, lt, D)     ext_target (B, D)

-> prediction (B, 2, H, W), scaled. Period and trend frames form one "periodic" branch (period first), as in
the authors' code. Pipeline per sample (see ../shared/docs/acfm.md):

1. every frame through ONE shared residual encoder (2 -> C channels), plus its external embedding;
2. an attention ConvLSTM (shared by both branches, each run oldest frame first from a zero state) gives a hidden
   state per frame; a per-frame head turns (features, hidden) into an attention map A_k;
3. attended features F_k * (1 + A_k) go through a branch ConvLSTM; its last hidden state -> conv -> P_c / P_p;
4. time-aware fusion: r = sigmoid(MLP(ext_target)); prediction = tanh(r * P_c + (1 - r) * P_p).

Variants:

- ``"clean"`` (default): the attention head of frame k sees ``concat(F_k, H_k)`` (its own frame's features and
  hidden state) and A_k = sigmoid(head(...)), so attention re-weights each feature by a factor in (1, 2).
- ``"reference"``: the authors' quirks kept for their checkpoint: the head of frame k sees channels
  ``[2k, 2k+2)`` of the FIRST frame's features (instead of frame k's) next to H_k, and no sigmoid. The authors'
  BikeNYC checkpoint also needs the data switch ``compat_weekend_bug=True`` (their weekend flag marks Monday and
  Sunday); without it the score moves from 5.598 to ~5.80 RMSE.

Direct multi-step head (``horizon=H > 1``, :mod:`stflow.models.horizon`, clean variant only): both branch heads
give ``2H`` step-major channels and the time-aware fusion weight is computed per step from that target slot's
vector (``ext_target (B, H, D)``): prediction_k = tanh(r_k * P_c,k + (1 - r_k) * P_p,k), output ``(B, H, 2, h, w)``.

Normalisation layers are created ONLY through the ``norm_layer`` constructor argument (channels -> module); the
registered factories choose it by name (``norm="bn"|"gn"|"bkn"|"none"``), BKN being the BatchNorm model with its
frame encoder chained by :mod:`stflow.models.kalman`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from stflow.layers.convlstm import CellKind, ConvLSTM, ConvLSTMCell, LiteralConvLSTMCell
from stflow.models.horizon import check_horizon, split_steps, target_ext

__all__ = ["ACFM", "ACFMConfig", "ACFM_PRESETS", "NormLayer"]

NormLayer = Callable[[int], nn.Module]
Variant = Literal["clean", "reference"]

# Dataset presets of the authors' ModelConfiguration classes.
ACFM_PRESETS: dict[str, dict[str, Any]] = {
    "bikenyc": dict(grid_shape=(16, 8), ext_dim=33, res_units=2, ext_hidden=30, lstm_dropout=0.5),
    "taxibj": dict(grid_shape=(32, 32), ext_dim=77, res_units=12, ext_hidden=40, lstm_dropout=0.0),
}


@dataclass(frozen=True)
class ACFMConfig:
    """Architecture of one ACFM; ``ACFMConfig.preset("bikenyc", ...)`` gives the authors' settings."""

    grid_shape: tuple[int, int] = (16, 8)
    ext_dim: int = 33  # 0 = no external features
    len_closeness: int = 4
    len_period: int = 2
    len_trend: int = 0
    flow_channels: int = 2
    hidden_channels: int = 16  # encoder width = ConvLSTM width = attention width
    res_units: int = 2  # R residual units in the frame encoder
    ext_hidden: int = 30  # E, hidden width of the external embedding
    ext_dropout: float = 0.5
    lstm_dropout: float = 0.5  # Dropout2d on every ConvLSTM input
    fusion_hidden: int = 32
    variant: Variant = "clean"
    cell: CellKind = "fused"
    horizon: int = 1  # output steps: 1 = one slot (B, 2, H, W); > 1 = a direct head (B, horizon, 2, H, W)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid_shape", tuple(int(s) for s in self.grid_shape))
        check_horizon("ACFM", self.horizon)
        problems = []
        if len(self.grid_shape) != 2 or min(self.grid_shape) < 1:
            problems.append(f"grid_shape must be two positive ints, got {self.grid_shape}")
        if self.len_closeness < 1:
            problems.append(f"ACFM needs len_closeness >= 1, got {self.len_closeness}")
        if self.len_period < 0 or self.len_trend < 0 or self.len_period + self.len_trend < 1:
            problems.append(
                f"ACFM needs a periodic branch: len_period + len_trend >= 1 "
                f"(got len_period={self.len_period}, len_trend={self.len_trend})"
            )
        if self.ext_dim < 0:
            problems.append(f"ext_dim must be >= 0, got {self.ext_dim}")
        for name in ("flow_channels", "hidden_channels", "ext_hidden", "fusion_hidden"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.res_units < 0:
            problems.append(f"res_units must be >= 0, got {self.res_units}")
        for name in ("ext_dropout", "lstm_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.variant not in ("clean", "reference"):
            problems.append(f"variant must be 'clean' or 'reference', got {self.variant!r}")
        if self.cell not in ("fused", "literal"):
            problems.append(f"cell must be 'fused' or 'literal', got {self.cell!r}")
        if self.variant == "reference" and self.horizon != 1:
            problems.append(f"variant='reference' is the authors' one-step network: horizon must be 1, got "
                            f"{self.horizon} (use the clean variant or a recursive rollout)")
        if self.variant == "reference":
            longest = max(self.len_closeness, self.len_period + self.len_trend)
            if longest * self.flow_channels > self.hidden_channels:
                problems.append(
                    f"variant='reference' slices {self.flow_channels} channels per frame out of the first frame's "
                    f"{self.hidden_channels} features, so a branch may hold at most "
                    f"{self.hidden_channels // self.flow_channels} frames (got {longest})"
                )
        if problems:
            raise ValueError("invalid ACFMConfig: " + "; ".join(problems))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ACFMConfig:
        """The authors' ``bikenyc`` / ``taxibj`` settings, with field overrides."""
        if name not in ACFM_PRESETS:
            raise ValueError(f"unknown ACFM preset {name!r}; choose from {sorted(ACFM_PRESETS)}")
        return cls(**{**ACFM_PRESETS[name], **overrides})

    @property
    def len_periodic(self) -> int:
        return self.len_period + self.len_trend


class ResidualUnit(nn.Module):
    """x + conv(SELU(norm(conv(SELU(norm(x)))))): the authors' pre-activation unit with SELU."""

    def __init__(self, channels: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.norm1 = norm_layer(channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = norm_layer(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SELU()

    def forward(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) -> (N, C, H, W)."""
        y = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(y)))


class FrameEncoder(nn.Module):
    """conv3x3(2 -> C) -> R residual units -> SELU -> conv3x3(C -> C); one module shared by every frame."""

    def __init__(self, in_channels: int, channels: int, res_units: int, norm_layer: NormLayer) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.units = nn.ModuleList(ResidualUnit(channels, norm_layer) for _ in range(res_units))
        self.act = nn.SELU()
        self.head = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 2, H, W) -> (N, C, H, W)."""
        x = self.stem(x)
        for unit in self.units:
            x = unit(x)
        return self.head(self.act(x))


class ExternalEmbedding(nn.Module):
    """Per-frame external vector -> (C, H, W) map: Linear -> Dropout -> SELU -> Linear -> SELU."""

    def __init__(self, ext_dim: int, hidden: int, channels: int, grid_shape: tuple[int, int], dropout: float):
        super().__init__()
        self.out_shape = (channels, *grid_shape)
        out_features = channels * grid_shape[0] * grid_shape[1]
        self.net = nn.Sequential(
            nn.Linear(ext_dim, hidden), nn.Dropout(dropout), nn.SELU(), nn.Linear(hidden, out_features), nn.SELU()
        )

    def forward(self, ext: Tensor) -> Tensor:
        """ext (B, T, D) -> (B, T, C, H, W)."""
        return self.net(ext).unflatten(-1, self.out_shape)  # (B, T, C*H*W) -> (B, T, C, H, W)


def _attention_head(in_channels: int, channels: int) -> nn.Sequential:
    """conv3x3(in -> C) -> SELU -> conv3x3(C -> C): the attention map of one frame."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1), nn.SELU(), nn.Conv2d(channels, channels, 3, padding=1)
    )


class ACFM(nn.Module):
    """Attentive Crowd Flow Machine; see the module docstring for the batch layout and the variants."""

    trainable = True

    def __init__(self, config: ACFMConfig, norm_layer: NormLayer = nn.BatchNorm2d) -> None:
        super().__init__()
        self.config = cfg = config
        self.horizon = cfg.horizon
        c, grid = cfg.hidden_channels, cfg.grid_shape
        self.encoder = FrameEncoder(cfg.flow_channels, c, cfg.res_units, norm_layer)
        self.ext_embed = (
            ExternalEmbedding(cfg.ext_dim, cfg.ext_hidden, c, grid, cfg.ext_dropout) if cfg.ext_dim > 0 else None
        )
        lstm_args = dict(kernel_size=3, dropout=cfg.lstm_dropout, cell=cfg.cell)
        self.attention_lstm = ConvLSTM(c, c, grid, **lstm_args)
        head_in = c + (cfg.flow_channels if cfg.variant == "reference" else c)
        self.attention_c = nn.ModuleList(_attention_head(head_in, c) for _ in range(cfg.len_closeness))
        self.attention_p = nn.ModuleList(_attention_head(head_in, c) for _ in range(cfg.len_periodic))
        self.lstm_c = ConvLSTM(c, c, grid, **lstm_args)
        self.lstm_p = ConvLSTM(c, c, grid, **lstm_args)
        self.head_c = nn.Conv2d(c, cfg.flow_channels * cfg.horizon, 3, padding=1)
        self.head_p = nn.Conv2d(c, cfg.flow_channels * cfg.horizon, 3, padding=1)
        if cfg.ext_dim > 0:
            self.fusion = nn.Sequential(
                nn.Linear(cfg.ext_dim, cfg.fusion_hidden), nn.SELU(), nn.Linear(cfg.fusion_hidden, 1)
            )
        else:  # no external vector: the branch weight is one learned constant (per step)
            self.fusion_logit = nn.Parameter(torch.zeros(cfg.horizon))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The authors' training initialisation: Xavier-normal convs, Kaiming-normal (fan_in) linears.

        ConvLSTM cells initialise themselves with the same laws (per gate block for the fused kernel).
        """
        in_cells = {id(m) for cell in self.modules() if isinstance(cell, (ConvLSTMCell, LiteralConvLSTMCell))
                    for m in cell.modules()}
        for module in self.modules():
            if id(module) in in_cells:
                continue
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_normal_(module.weight)
            elif isinstance(module, nn.Linear):
                nn.init.kaiming_normal_(module.weight, a=0, mode="fan_in")

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """batch: closeness (B, lc, 2, H, W), period (B, lp, 2, H, W), trend (B, lt, 2, H, W), ext_closeness
        (B, lc, D), ext_period (B, lp, D), ext_trend (B, lt, D), ext_target (B, D); frames most recent first,
        flows scaled to [-1, 1]. Returns the scaled prediction (B, 2, H, W). With ``horizon`` K > 1: ext_target
        (B, K, D) (one vector per target slot) -> (B, K, 2, H, W)."""
        cfg = self.config
        frames, ext = self._gather(batch)  # (B, T, 2, H, W), (B, T, D) or None; T = lc + lp + lt
        feats = self._encode(frames)  # (B, T, C, H, W)
        if self.ext_embed is not None:
            feats = feats + self.ext_embed(ext)
        feats_c, feats_p = feats.split([cfg.len_closeness, cfg.len_periodic], dim=1)
        pred_c = split_steps(self._branch(feats_c, self.attention_c, self.lstm_c, self.head_c), cfg.horizon)
        pred_p = split_steps(self._branch(feats_p, self.attention_p, self.lstm_p, self.head_p), cfg.horizon)
        if cfg.ext_dim > 0:
            logit = self.fusion(batch["ext_target"])  # (B, 1), or (B, K, 1) per target slot
        else:
            logit = self.fusion_logit.expand(frames.shape[0], cfg.horizon)  # (B, 1) or (B, K)
        if cfg.horizon == 1:
            logit = logit.view(-1, 1, 1, 1)  # (B, 1) -> (B, 1, 1, 1), broadcast over channels and grid
        else:
            logit = logit.reshape(-1, cfg.horizon, 1, 1, 1)  # (B, K[, 1]) -> (B, K, 1, 1, 1), per step
        return torch.tanh(torch.sigmoid(logit) * pred_c + torch.sigmoid(-logit) * pred_p)

    def _gather(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        """Validate the batch and stack closeness, period, trend along time (and their external vectors)."""
        cfg = self.config
        lengths = {"closeness": cfg.len_closeness, "period": cfg.len_period, "trend": cfg.len_trend}
        needed = [k for k, n in lengths.items() if n > 0]
        if cfg.ext_dim > 0:
            needed += [f"ext_{k}" for k, n in lengths.items() if n > 0] + ["ext_target"]
        missing = [k for k in needed if k not in batch]
        if missing:
            raise KeyError(f"ACFM batch lacks {missing}; it has {sorted(batch)}")
        frame_shape = (cfg.flow_channels, *cfg.grid_shape)
        frames, exts = [], []
        for key, n in lengths.items():
            if n == 0:
                continue
            x = batch[key]
            if x.ndim != 5 or x.shape[1] != n or tuple(x.shape[2:]) != frame_shape:
                raise ValueError(f"ACFM expects {key} of shape (B, {n}, {', '.join(map(str, frame_shape))}), "
                                 f"got {tuple(x.shape)}")
            frames.append(x)
            if cfg.ext_dim > 0:
                e = batch[f"ext_{key}"]
                if e.shape[1:] != (n, cfg.ext_dim):
                    raise ValueError(f"ACFM expects ext_{key} of shape (B, {n}, {cfg.ext_dim}), got {tuple(e.shape)}")
                exts.append(e)
        if cfg.ext_dim > 0:
            target_ext("ACFM", batch, cfg.horizon, cfg.ext_dim)
        return torch.cat(frames, dim=1), (torch.cat(exts, dim=1) if exts else None)

    def _encode(self, frames: Tensor) -> Tensor:
        """frames (B, T, 2, H, W) -> features (B, T, C, H, W) through the shared encoder.

        The clean variant encodes all B*T frames in one pass; the reference variant encodes frame by frame, as
        the authors do, so training-mode BatchNorm statistics (and running-stat updates) match theirs.
        """
        if self.config.variant == "reference":
            return torch.stack([self.encoder(frame) for frame in frames.unbind(1)], dim=1)
        flat = self.encoder(frames.flatten(0, 1))  # (B*T, 2, H, W) -> (B*T, C, H, W)
        return flat.unflatten(0, frames.shape[:2])  # (B*T, C, H, W) -> (B, T, C, H, W)

    def _branch(self, feats: Tensor, heads: nn.ModuleList, lstm: ConvLSTM, out_conv: nn.Conv2d) -> Tensor:
        """feats (B, T, C, H, W), most recent first -> branch prediction (B, 2, H, W) before fusion."""
        hidden, _ = self.attention_lstm(feats.flip(1))  # oldest first; hidden (B, T, C, H, W)
        hiddens = hidden.flip(1).unbind(1)  # most recent first again: hiddens[k] belongs to frame k
        frames = feats.unbind(1)  # (B, C, H, W) each; unbind, not indexing, keeps backward cheap
        if self.config.variant == "reference":  # authors' quirk: head k sees channels [2k, 2k+2) of the FIRST frame
            contexts = frames[0].split(self.config.flow_channels, dim=1)
        attended = []
        for k, head in enumerate(heads):
            if self.config.variant == "reference":
                attn = head(torch.cat([contexts[k], hiddens[k]], dim=1))
            else:
                attn = torch.sigmoid(head(torch.cat([frames[k], hiddens[k]], dim=1)))
            attended.append(frames[k] * (1 + attn))
        _, (h_last, _) = lstm(torch.stack(attended, dim=1).flip(1))  # oldest first; last state = most recent
        return out_conv(h_last)

    def extra_repr(self) -> str:
        fields = dataclasses.asdict(self.config)
        return ", ".join(f"{k}={v}" for k, v in fields.items())
