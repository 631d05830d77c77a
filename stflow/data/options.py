"""One frozen object for everything that defines a crowd-flow sample set: window, split, features, scaling.

It travels whole from the CLI / YAML (``data:`` section of a training config) to the data module and the
reader (:func:`stflow.data.load_crowd_flow`); adding an option is one field here plus the code that uses it.
See ``docs/background/acfm.md`` for the window (closeness / period / trend) and the split protocol.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["CrowdFlowOptions"]


@dataclass(frozen=True)
class CrowdFlowOptions:
    """How samples are cut from a dataset (the dataset itself and its folder are chosen separately).

    Window: ``len_closeness`` recent slots, ``len_period`` slots at the same time ``period_interval`` days
    apart, ``len_trend`` slots ``trend_interval`` days apart. Split: the last ``test_days`` days of targets
    are the test set (None: the dataset's standard, 10 BikeNYC / 28 TaxiBJ), the last ``val_fraction`` of the
    rest validation. Features: the external vector (``acfm`` 33/77 dims, ``stresnet`` 8/28, ``none``);
    ``compat_*`` reproduce two bugs of the reference code (off by default). Scaling: min-max fitted on the
    training slots unless ``scale_min`` / ``scale_max`` are given (e.g. 0..267 for the authors' BikeNYC weights).
    ``synthetic_seed`` picks the generated synthetic city when no data folder is given (the training seed only
    shuffles and initialises, so two training seeds see the same city).
    """

    len_closeness: int = 4
    len_period: int = 2
    len_trend: int = 0
    period_interval: int = 1
    trend_interval: int = 7
    test_days: int | None = None
    val_fraction: float = 0.1
    features: Literal["acfm", "stresnet", "none"] = "acfm"
    compat_weekend_bug: bool = False
    compat_meteorology_bug: bool = False
    scale_min: float | None = None
    scale_max: float | None = None
    synthetic_seed: int = 0  # which generated synthetic city (no --data-dir); independent of the training seed

    def __post_init__(self) -> None:
        for name in ("len_closeness", "len_period", "len_trend"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.len_closeness + self.len_period + self.len_trend == 0:
            raise ValueError("the window is empty: len_closeness, len_period and len_trend are all 0")
        for name in ("period_interval", "trend_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (days), got {value!r}")
        if self.test_days is not None and (isinstance(self.test_days, bool) or self.test_days < 0):
            raise ValueError(f"test_days must be >= 0 (or null for the dataset's standard), got {self.test_days!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0.0 <= self.val_fraction < 1.0):
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if self.features not in ("acfm", "stresnet", "none"):
            raise ValueError(f"unknown features {self.features!r}; choose from ('acfm', 'stresnet', 'none')")
        if isinstance(self.synthetic_seed, bool) or not isinstance(self.synthetic_seed, int) or self.synthetic_seed < 0:
            raise ValueError(f"synthetic_seed must be an integer >= 0, got {self.synthetic_seed!r}")
        for name in ("scale_min", "scale_max"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

    def replace(self, **changes: Any) -> CrowdFlowOptions:
        """A copy with ``changes``; an unknown option is a ``ValueError`` naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown data option(s) {unknown}; options: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **changes) if changes else self

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
