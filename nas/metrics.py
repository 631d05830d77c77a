"""Block rating metrics shared by DNA (teacher targets) and DNA++ (EMA targets).

A candidate's rating is an error between its block output ``pred`` and a target ``target`` over ALL validation
batches, accumulated as ``(error sum, count)`` per batch (:func:`block_score`) and divided by a target scale
(:func:`target_scale`); lower is better.

* ``relative_l1`` (DNA's default): ``mean |pred - target| / std(target)`` over every element.
* ``mse``: ``mean (pred - target)^2 / var(target)``.
* ``cosine`` (DNA++'s default): ``mean_i (1 - cos(pred_i, target_i))`` over samples ``i``, each output
  flattened to one vector (C*H*W); blind to each sample's scale, as BYOL's normalized distance is. Candidates'
  feature scales differ, and a scale-blind distance rates what the features encode rather than their size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["RATING_METRICS", "block_score", "check_metric", "target_scale"]

RATING_METRICS = ("relative_l1", "mse", "cosine")


def check_metric(metric: str) -> str:
    """``metric`` if it is one of :data:`RATING_METRICS`, else ``ValueError``."""
    if metric not in RATING_METRICS:
        raise ValueError(f"rating metric must be one of {RATING_METRICS}, got {metric!r}")
    return metric


def block_score(pred: torch.Tensor, target: torch.Tensor, metric: str) -> tuple[float, float]:
    """Per-batch sums ``(error sum, count)`` of ``metric``: elements for the L1/MSE metrics, samples for cosine."""
    if metric == "cosine":
        # (B, C, H, W) -> (B, C*H*W): one vector per sample
        cos = F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1, eps=1e-8)
        return float((1.0 - cos).sum()), float(len(cos))
    diff = pred - target
    err = diff.abs().sum() if metric == "relative_l1" else diff.pow(2).sum()
    return float(err), float(diff.numel())


def target_scale(targets: torch.Tensor, metric: str, what: str) -> float:
    """The divisor of ``metric`` for these (flattened) targets: std, variance, or 1 for cosine. A target without
    spread is a ``ValueError`` naming ``what`` (a constant target cannot rate anything, whatever the metric)."""
    std = float(targets.std())
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"{what} has no spread (std {std}); cannot rate")
    return {"relative_l1": std, "mse": std * std, "cosine": 1.0}[check_metric(metric)]
