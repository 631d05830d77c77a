"""Choosing a normalization by name: the norm kinds, their options, the named study variants, the prior-weight rule.

Two levels, both plain data so that a config file can express them:

* :data:`NORM_KINDS` (``"bn"``, ``"gn"``, ``"bkn"``, ``"none"``) plus :class:`NormOptions` is what a model factory
  takes (``stflow.models.build_model(..., norm="bkn", norm_options=NormOptions(transition="analytic"))``);
* :data:`NORMS` names the variants the BKN studies compare (``"bn"``, ``"gn"``, ``"bkn_mc"``, ``"bkn_an"``), each a
  :class:`NormSpec`; :func:`base_norm_factory` and :func:`finalize_norms` build a ReLU net with one of them
  (BKN nets are built with BatchNorm, then chained by :func:`normlayers.convert`).

The prior weight ``p`` follows :func:`prior_weight_for` unless given: the reference's two settings (0.9 for
micro-batches of 2, 0.05 for batch 128) joined linearly in log2(batch). Background: ``docs/normlayers.md``,
``docs/bkn_experiments.md`` and ``docs/background/bkn.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from normlayers.convert import convert
from normlayers.modules import BatchKalmanNorm2d

__all__ = [
    "NORM_KINDS",
    "TRANSITIONS",
    "DEFAULT_STAT_BATCH",
    "REFERENCE_PRIOR_WEIGHTS",
    "NormKind",
    "Transition",
    "NormFactory",
    "NormOptions",
    "NormSpec",
    "NORMS",
    "check_norm_kind",
    "norm_spec",
    "prior_weight_for",
    "base_norm_factory",
    "finalize_norms",
]

NormKind = Literal["bn", "gn", "bkn", "none"]
Transition = Literal["analytic", "monte_carlo"]
NormFactory = Callable[[int], nn.Module]

NORM_KINDS: tuple[str, ...] = ("bn", "gn", "bkn", "none")
TRANSITIONS: tuple[str, ...] = ("analytic", "monte_carlo")
REFERENCE_PRIOR_WEIGHTS = {2: 0.9, 128: 0.05}  # the authors' settings: micro-batch 2 and batch 128
DEFAULT_STAT_BATCH = 64  # stflow.train's default batch size: NormOptions().prior_weight_value() = 0.192


def prior_weight_for(stat_batch: int) -> float:
    """The prior weight p for a layer whose statistics come from ``stat_batch`` samples.

    Linear in log2(batch) between the reference's two settings (0.9 at 2, 0.05 at 128), clamped outside:
    2 -> 0.9, 4 -> 0.758, 8 -> 0.617, 16 -> 0.475, 32 -> 0.333, 64 -> 0.192, >= 128 -> 0.05.
    ``stat_batch`` is the ghost-group size when the batch is split into groups, else the real batch size.
    """
    if stat_batch < 1:
        raise ValueError(f"stat_batch must be >= 1, got {stat_batch}")
    lo, hi = math.log2(2), math.log2(128)
    t = min(max((math.log2(stat_batch) - lo) / (hi - lo), 0.0), 1.0)
    return REFERENCE_PRIOR_WEIGHTS[2] + t * (REFERENCE_PRIOR_WEIGHTS[128] - REFERENCE_PRIOR_WEIGHTS[2])


def check_norm_kind(norm: str) -> str:
    """``norm`` itself when it is one of :data:`NORM_KINDS`, else a ValueError naming the choices."""
    if norm not in NORM_KINDS:
        raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORM_KINDS)}")
    return norm


@dataclass(frozen=True)
class NormOptions:
    """Options of the norm kinds (each kind reads its own; the others are ignored).

    * ``transition`` (bkn): how a layer's posterior becomes the next layer's prior: ``"analytic"`` (closed-form
      moments of the activation, then the conv's linear moments; deterministic, the default) or ``"monte_carlo"``
      (the reference's: one random image through the activation and the conv).
    * ``prior_weight`` (bkn): the fixed prior weight p in [0, 1); ``None`` = ``prior_weight_for(stat_batch)``.
    * ``stat_batch`` (bkn): the number of samples per batch the prior-weight rule assumes when ``prior_weight`` is
      None (default 64, the training CLI's default batch size; set it to your batch size).
    * ``gn_groups`` (gn): GroupNorm's number of groups (4, the reference's GN baseline); must divide the width.
    """

    transition: Transition = "analytic"
    prior_weight: float | None = None
    stat_batch: int = DEFAULT_STAT_BATCH
    gn_groups: int = 4

    def __post_init__(self) -> None:
        problems = []
        if self.transition not in TRANSITIONS:
            problems.append(f"transition must be one of {', '.join(TRANSITIONS)}, got {self.transition!r}")
        if self.prior_weight is not None and not 0.0 <= self.prior_weight < 1.0:
            problems.append(f"prior_weight must be in [0, 1) or None, got {self.prior_weight}")
        if self.stat_batch < 1:
            problems.append(f"stat_batch must be >= 1, got {self.stat_batch}")
        if self.gn_groups < 1:
            problems.append(f"gn_groups must be >= 1, got {self.gn_groups}")
        if problems:
            raise ValueError("invalid NormOptions: " + "; ".join(problems))

    def prior_weight_value(self) -> float:
        """The prior weight BKN layers get: ``prior_weight``, or ``prior_weight_for(stat_batch)`` when None."""
        return prior_weight_for(self.stat_batch) if self.prior_weight is None else float(self.prior_weight)

    def group_norm(self, channels: int) -> nn.GroupNorm:
        """``nn.GroupNorm(gn_groups, channels)``, with a clear error when the groups do not divide the width."""
        if channels % self.gn_groups:
            raise ValueError(f"gn_groups={self.gn_groups} does not divide the {channels} channels of a norm layer")
        return nn.GroupNorm(self.gn_groups, channels)


# --------------------------------------------------------------------------------------------------------------
# The named variants of the BKN studies
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormSpec:
    """One normalization of the BKN studies.

    ``kind``: "bn" (torch BatchNorm, or BKN without prior = BatchNorm per ghost group when grouped), "gn"
    (GroupNorm with ``gn_groups`` groups), "bkn" (BatchNorm layers converted to a Kalman chain with
    ``normlayers.convert`` and the given ``transition``).
    """

    name: str
    kind: str
    label: str
    transition: str | None = None
    gn_groups: int = 4  # the reference's GN baseline uses 4 groups; divides every width of the study nets


NORMS: dict[str, NormSpec] = {
    spec.name: spec
    for spec in (
        NormSpec("bn", "bn", "BatchNorm"),
        NormSpec("gn", "gn", "GroupNorm(4)"),
        NormSpec("bkn_mc", "bkn", "BKN Monte-Carlo", transition="monte_carlo"),
        NormSpec("bkn_an", "bkn", "BKN analytic", transition="analytic"),
    )
}


def norm_spec(name: str) -> NormSpec:
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose from {sorted(NORMS)}")
    return NORMS[name]


def base_norm_factory(spec: NormSpec, group_size: int | None = None) -> NormFactory:
    """The factory a model is BUILT with (BKN models are built with BatchNorm, then converted).

    With ``group_size`` (ghost groups) the BatchNorm is ``BatchKalmanNorm2d`` without a prior, i.e. BatchNorm
    whose statistics are computed per group of ``group_size`` samples (ghost BatchNorm).
    """
    if spec.kind == "gn":
        if group_size is not None:
            raise ValueError("GroupNorm does not depend on the batch: ghost groups make no sense for it")
        return lambda c: nn.GroupNorm(spec.gn_groups, c)
    if group_size is None:
        return nn.BatchNorm2d
    return lambda c: BatchKalmanNorm2d(c, prior_weight=0.0, group_size=group_size)


def finalize_norms(
    model: nn.Module,
    spec: NormSpec,
    stat_batch: int,
    group_size: int | None = None,
    guard_scope: str = "layer",
    guard_ratio: float = 100.0,
    shortcut: str = "prior",
) -> tuple[nn.Module, float | None]:
    """For BKN specs: convert the model's BatchNorms into a Kalman chain; returns ``(model, prior_weight)``.
    ``guard_scope``, ``guard_ratio``: when BKN falls back to plain BN; ``shortcut``: what a residual branch
    carries (see :func:`normlayers.convert`)."""
    if spec.kind != "bkn":
        return model, None
    p = prior_weight_for(stat_batch)
    options = dict(prior_weight=p, transition=spec.transition, group_size=group_size)
    return convert(model, **options, guard_scope=guard_scope, guard_ratio=guard_ratio, shortcut=shortcut), p
