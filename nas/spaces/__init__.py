"""Search spaces: the block-wise protocol and dataclasses (:mod:`nas.spaces.base`, MBConv ops) and HyTra
(:mod:`nas.spaces.hytra`, BossNAS's hybrid CNN-transformer space)."""

from nas.spaces.base import (
    SKIP,
    SPACE_PRESETS,
    BlockSpec,
    Candidate,
    CellSpec,
    LayerSpec,
    OpSpec,
    SearchSpace,
    candidate_key,
    mbconv,
    op_from_dict,
    parse_candidate_key,
    space_preset,
)

__all__ = [
    "Candidate",
    "OpSpec",
    "LayerSpec",
    "CellSpec",
    "BlockSpec",
    "SearchSpace",
    "candidate_key",
    "parse_candidate_key",
    "SKIP",
    "mbconv",
    "op_from_dict",
    "SPACE_PRESETS",
    "space_preset",
]
