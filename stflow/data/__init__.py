"""Crowd-flow data layer: DeepST-layout readers, external features, windows, scaling, synthetic city.

The contract other packages code against is :class:`CrowdFlowDataModule` (see its docstring).
"""

from .datamodule import (
    CrowdFlowData,
    CrowdFlowDataModule,
    CrowdFlowWindows,
    ensure_synthetic_city,
    load_crowd_flow,
    synthetic_cache_dir,
)
from .datasets import DATASETS, DatasetSpec, get_dataset_spec, register_dataset, resolve_file
from .features import (
    FEATURE_KINDS,
    acfm_time_features,
    external_dim,
    external_features,
    holiday_features,
    meteorology_features,
    stresnet_time_features,
)
from .hdf5 import (
    DataFormatError,
    FlowFile,
    IncompleteDays,
    MeteorologyFile,
    format_slot_dates,
    parse_slot_dates,
    read_flow_file,
    read_holidays,
    read_meteorology,
    remove_incomplete_days,
    write_flow_file,
    write_meteorology,
)
from .horizon import DirectHorizonDataModule, DirectHorizonWindows
from .options import CrowdFlowOptions
from .scaling import MinMaxScaler
from .synthetic import RAINY_WEATHER, SyntheticCity, generate_synthetic_city, synthetic_file_names
from .windowing import WindowIndex, build_windows, frame_offsets, origin_samples

__all__ = [
    "CrowdFlowData",
    "CrowdFlowDataModule",
    "CrowdFlowOptions",
    "CrowdFlowWindows",
    "DATASETS",
    "DataFormatError",
    "DatasetSpec",
    "DirectHorizonDataModule",
    "DirectHorizonWindows",
    "FEATURE_KINDS",
    "FlowFile",
    "IncompleteDays",
    "MeteorologyFile",
    "MinMaxScaler",
    "RAINY_WEATHER",
    "SyntheticCity",
    "WindowIndex",
    "acfm_time_features",
    "build_windows",
    "ensure_synthetic_city",
    "external_dim",
    "external_features",
    "format_slot_dates",
    "frame_offsets",
    "generate_synthetic_city",
    "get_dataset_spec",
    "holiday_features",
    "load_crowd_flow",
    "meteorology_features",
    "origin_samples",
    "parse_slot_dates",
    "read_flow_file",
    "read_holidays",
    "read_meteorology",
    "register_dataset",
    "remove_incomplete_days",
    "resolve_file",
    "stresnet_time_features",
    "synthetic_cache_dir",
    "synthetic_file_names",
    "write_flow_file",
    "write_meteorology",
]
