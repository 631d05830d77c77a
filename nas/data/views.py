"""Random views of small images for self-supervised (BYOL-style) supernet training.

Everything is batched torch on the input's device (no PIL, no per-sample Python loop), so two
or more views of a 256-image digits batch cost well under a millisecond each on one CPU core.
Every random draw goes through an optional ``torch.Generator``: the same generator state gives
the same views, which the rater relies on (fixed validation views for every candidate).

Layout: images are ``(B, C, H, W)`` floats; every transform keeps shape and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ViewConfig", "random_crop", "random_rotate", "random_noise", "random_cutout", "make_view", "make_views"]


@dataclass(frozen=True)
class ViewConfig:
    """Strength of each transform; 0 switches a transform off.

    pad: crops of the image zero-padded by ``pad`` pixels (a random shift of up to ``pad`` px).
    rotate_deg: uniform rotation angle in [-rotate_deg, rotate_deg] (bilinear, zero fill).
    scale: uniform zoom factor in [1 - scale, 1 + scale], applied with the rotation.
    noise_std: additive Gaussian noise of this standard deviation (on standardized pixels).
    cutout: side of a square zeroed at a random position, with probability ``cutout_prob``.
    """

    pad: int = 1
    rotate_deg: float = 15.0
    scale: float = 0.1
    noise_std: float = 0.1
    cutout: int = 3
    cutout_prob: float = 0.5

    def __post_init__(self) -> None:
        if self.pad < 0 or self.cutout < 0:
            raise ValueError(f"ViewConfig: pad and cutout must be >= 0, got pad={self.pad}, cutout={self.cutout}")
        if self.rotate_deg < 0 or self.noise_std < 0 or not 0 <= self.scale < 1:
            raise ValueError(
                f"ViewConfig: need rotate_deg >= 0, noise_std >= 0, 0 <= scale < 1; got rotate_deg={self.rotate_deg}, "
                f"noise_std={self.noise_std}, scale={self.scale}"
            )
        if not 0.0 <= self.cutout_prob <= 1.0:
            raise ValueError(f"ViewConfig: cutout_prob must be in [0, 1], got {self.cutout_prob}")


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"views expect images of shape (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"views expect floating-point images, got dtype {x.dtype}")


def _rand(shape: tuple[int, ...], x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its own device), moved to ``x``'s device/dtype."""
    device = generator.device if generator is not None else x.device
    return torch.rand(shape, generator=generator, device=device).to(device=x.device, dtype=x.dtype)


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample crop of size (H, W) from the image zero-padded by ``pad`` on every side."""
    _check(x)
    if pad == 0:
        return x
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
    offsets = (_rand((b, 2), x, generator) * (2 * pad + 1)).long().clamp_max(2 * pad)  # (B, 2) in [0, 2p]
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]  # (B, 1, 1)
    crops = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return crops.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)


def random_rotate(
    x: torch.Tensor, max_deg: float, scale: float = 0.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Rotate each image by a uniform angle in [-max_deg, max_deg] and zoom by [1-scale, 1+scale]."""
    _check(x)
    if max_deg == 0 and scale == 0:
        return x
    b = x.shape[0]
    draws = _rand((b, 2), x, generator)  # (B, 2)
    angle = (2 * draws[:, 0] - 1) * math.radians(max_deg)
    zoom = 1 + (2 * draws[:, 1] - 1) * scale
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    zeros = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_noise(x: torch.Tensor, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Add N(0, std^2) noise."""
    _check(x)
    if std == 0:
        return x
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=device).to(device=x.device, dtype=x.dtype)
    return x + std * noise


def random_cutout(
    x: torch.Tensor, size: int, prob: float = 1.0, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero a ``size`` x ``size`` square (clipped at the border) at a random centre, per sample with ``prob``."""
    _check(x)
    if size == 0 or prob == 0:
        return x
    b, _, h, w = x.shape
    draws = _rand((b, 3), x, generator)  # (B, 3): centre row, centre col, apply?
    cy = (draws[:, 0] * h).long().clamp_max(h - 1)
    cx = (draws[:, 1] * w).long().clamp_max(w - 1)
    apply = draws[:, 2] < prob
    half = size // 2
    rows = torch.arange(h, device=x.device)[None, :]  # (1, H)
    cols = torch.arange(w, device=x.device)[None, :]  # (1, W)
    in_rows = (rows >= (cy - half)[:, None]) & (rows < (cy - half + size)[:, None])  # (B, H)
    in_cols = (cols >= (cx - half)[:, None]) & (cols < (cx - half + size)[:, None])  # (B, W)
    hole = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]  # (B, H, W)
    return x.masked_fill(hole[:, None], 0.0)


def make_view(x: torch.Tensor, cfg: ViewConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """One random view: crop -> rotate/zoom -> cutout -> noise."""
    x = random_crop(x, cfg.pad, generator)
    x = random_rotate(x, cfg.rotate_deg, cfg.scale, generator)
    x = random_cutout(x, cfg.cutout, cfg.cutout_prob, generator)
    return random_noise(x, cfg.noise_std, generator)


def make_views(
    x: torch.Tensor, cfg: ViewConfig, num_views: int = 2, generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """``num_views`` independent random views of the batch ``x``."""
    if num_views < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    return [make_view(x, cfg, generator) for _ in range(num_views)]
