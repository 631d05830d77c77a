"""Dataset specs: which files make a crowd-flow dataset and how to read them.

A :class:`DatasetSpec` covers any grid dataset in the DeepST layout. Built-ins are registered by
name ("bikenyc", "taxibj", "synthetic"); :func:`register_dataset` adds more and
:meth:`DatasetSpec.from_yaml` reads one from a YAML file.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .hdf5 import DataFormatError

__all__ = ["DatasetSpec", "DATASETS", "register_dataset", "get_dataset_spec", "resolve_file"]


@dataclass(frozen=True)
class DatasetSpec:
    """How to find and interpret one dataset's files inside a data directory.

    File entries are names or glob patterns relative to the data directory; a pattern must match
    exactly one file (several matches are an error that lists them). ``metric_factor``: a number, or
    ``"active_cells"`` for ``sqrt(H*W / number of cells that are ever non-zero)`` (the papers report RMSE over
    active cells).
    """

    name: str
    slots_per_day: int
    flow_files: tuple[str, ...]
    grid: tuple[int, int] | None = None  # None: taken from the first flow file
    meteorology_file: str | None = None
    holiday_file: str | None = None
    meteorology_slots_per_day: int | None = None  # None: same as the flow files
    test_days: int = 10
    metric_factor: float | str = 1.0
    keep_edge_days: bool = False  # see remove_incomplete_days

    def __post_init__(self) -> None:
        if self.slots_per_day < 1 or (24 * 60) % self.slots_per_day:
            raise ValueError(f"spec {self.name!r}: slots_per_day must divide 1440, got {self.slots_per_day}")
        if not self.flow_files:
            raise ValueError(f"spec {self.name!r}: flow_files is empty")
        if isinstance(self.metric_factor, str) and self.metric_factor != "active_cells":
            raise ValueError(f"spec {self.name!r}: metric_factor must be a number or 'active_cells'")
        object.__setattr__(self, "flow_files", tuple(self.flow_files))
        if self.grid is not None:
            object.__setattr__(self, "grid", tuple(int(g) for g in self.grid))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DatasetSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown dataset spec field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> DatasetSpec:
        path = Path(path)
        if not path.is_file():
            raise DataFormatError(f"{path}: dataset spec file not found")
        values = yaml.safe_load(path.read_text())
        if not isinstance(values, dict):
            raise DataFormatError(f"{path}: a dataset spec must be a YAML mapping")
        return cls.from_dict(values)


def resolve_file(data_dir: str | os.PathLike, pattern: str) -> Path:
    """The file ``pattern`` names inside ``data_dir`` (a glob must match exactly one file)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataFormatError(f"{data_dir}: data directory not found")
    if any(c in pattern for c in "*?["):
        matches = sorted(p for p in data_dir.glob(pattern) if p.is_file())
        if not matches:
            raise DataFormatError(f"{data_dir / pattern}: file not found (no file matches the pattern)")
        if len(matches) > 1:
            names = ", ".join(p.name for p in matches)
            raise DataFormatError(f"{data_dir / pattern}: {len(matches)} files match the pattern ({names}); "
                                  "keep one, or point --data-dir at a folder that holds only the one to read")
        return matches[0]
    path = data_dir / pattern
    if not path.is_file():
        raise DataFormatError(f"{path}: file not found")
    return path


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
    """Make ``spec`` available by its (case-insensitive) name."""
    key = spec.name.lower()
    if key in DATASETS and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[key] = spec
    return spec


def get_dataset_spec(dataset: str | DatasetSpec | os.PathLike) -> DatasetSpec:
    """A spec by registered name, a packaged spec name (``taxinyc``: ``stflow/configs/data/taxinyc.yaml``), a
    ``.yaml``/``.yml`` file, or the spec itself."""
    if isinstance(dataset, DatasetSpec):
        return dataset
    text = str(dataset)
    if text.endswith((".yaml", ".yml")):
        if not Path(text).is_file() and _packaged_spec(Path(text).stem) is not None:
            text = Path(text).stem  # configs/data/taxinyc.yaml of a source checkout -> the packaged copy
        else:
            return DatasetSpec.from_yaml(text)
    if text.lower() in DATASETS:
        return DATASETS[text.lower()]
    packaged = _packaged_spec(text)
    if packaged is not None:
        return packaged
    known = sorted(DATASETS) + [name for name in packaged_dataset_specs() if name not in DATASETS]
    raise DataFormatError(f"unknown dataset {text!r}; known: {known} (or pass a .yaml spec)")


def packaged_dataset_specs() -> list[str]:
    """Names of the dataset specs shipped under ``stflow/configs/data/``."""
    root = importlib.resources.files("stflow") / "configs" / "data"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml")) if root.is_dir() else []


def _packaged_spec(name: str) -> DatasetSpec | None:
    resource = importlib.resources.files("stflow") / "configs" / "data" / f"{name}.yaml"
    if not resource.is_file():
        return None
    with importlib.resources.as_file(resource) as path:
        return DatasetSpec.from_yaml(path)


register_dataset(
    DatasetSpec(
        name="bikenyc",
        slots_per_day=24,
        grid=(16, 8),
        # The published file, or a segment of it such as NYC14_M16x8_T60_NewEnd_last1369h.h5.
        flow_files=("NYC14_M16x8_T60_NewEnd*.h5",),
        test_days=10,
        metric_factor=math.sqrt(16 * 8 / 81),
        # The published file is complete; a segment of it starts mid-day only because it was cut.
        keep_edge_days=True,
    )
)
register_dataset(
    DatasetSpec(
        name="taxibj",
        slots_per_day=48,
        grid=(32, 32),
        flow_files=tuple(f"BJ{y}_M32x32_T30_InOut.h5" for y in (13, 14, 15, 16)),
        meteorology_file="BJ_Meteorology.h5",
        holiday_file="BJ_Holiday.txt",
        test_days=28,
    )
)
register_dataset(
    DatasetSpec(
        name="synthetic",
        slots_per_day=24,
        flow_files=("SYN_M*_T60_InOut.h5",),
        meteorology_file="SYN_Meteorology.h5",
        holiday_file="SYN_Holiday.txt",
        test_days=7,
        metric_factor="active_cells",
    )
)
