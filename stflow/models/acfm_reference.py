"""Load the ACFM authors' PyTorch state dict (``liulingbo918/ATFM``) into :class:`ACFM` (``variant="reference"``).

Their key layout -> ours:

- ``resnn.resblocks.{0..T-1}.*``: T identical copies of the shared frame encoder (one per input frame). All copies
  are checked to be identical and copy 0 is loaded: ``.0`` -> ``encoder.stem``, ``.{u}.layer{1,2}.0`` ->
  ``encoder.units.{u-1}.norm{1,2}``, ``.{u}.layer{1,2}.2`` -> ``...conv{1,2}``, ``.{R+2}`` -> ``encoder.head``;
- ``extnn.model.{0,3}`` -> ``ext_embed.net.{0,3}``; ``time_aware_extnn.model.{0,2}`` -> ``fusion.{0,2}``;
- ``concat_conv_{c,t}.model.{k}.{0,2}`` -> ``attention_{c,p}.{k}.{0,2}``;
- ``conv_lstm._lstm_cell``, ``conv_lstm_{c,t}._lstm_cell`` -> ``attention_lstm.cell``, ``lstm_{c,p}.cell``
  (fused with :func:`fuse_literal_state` for the default fused cell, copied as is for ``cell="literal"``);
  ``conv_lstm_{c,t}._conv_layer`` -> ``head_{c,p}``.

Loading is STRICT: every checkpoint tensor must be used, every model tensor filled, every shape equal; otherwise
:class:`ReferenceCheckpointError` lists the missing / unexpected / mismatched keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stflow.layers.convlstm import fuse_literal_state
from stflow.models.acfm import ACFM, ACFMConfig, NormLayer

__all__ = [
    "ReferenceCheckpointError", "load_reference_checkpoint", "load_reference_state_dict", "infer_reference_config",
    "to_reference_state_dict",
]

_CELLS = {"conv_lstm": "attention_lstm", "conv_lstm_c": "lstm_c", "conv_lstm_t": "lstm_p"}
_LITERAL_CELL_KEY = re.compile(r"[fico]_gate\.(conv_[xh]\.(weight|bias)|w|b)")
_ENCODER = re.compile(r"resnn\.resblocks\.(\d+)\.(.+)")


class ReferenceCheckpointError(ValueError):
    """The authors' state dict does not fit the model (names the offending keys)."""


def _encoder_key(rest: str, res_units: int) -> str | None:
    """Key inside one ``resnn.resblocks.N`` copy -> our ``encoder.*`` key (None when it has no counterpart)."""
    m = re.fullmatch(r"(\d+)\.(weight|bias)", rest)
    if m and int(m[1]) == 0:
        return f"encoder.stem.{m[2]}"
    if m and int(m[1]) == res_units + 2:
        return f"encoder.head.{m[2]}"
    m = re.fullmatch(r"(\d+)\.layer([12])\.([02])\.(.+)", rest)
    if m and 1 <= int(m[1]) <= res_units:
        part = "norm" if m[3] == "0" else "conv"
        return f"encoder.units.{int(m[1]) - 1}.{part}{m[2]}.{m[4]}"
    return None


def _simple_key(key: str) -> str | None:
    """Non-encoder, non-cell keys -> ours."""
    for pattern, repl in (
        (r"extnn\.model\.(\d+)\.(.+)", r"ext_embed.net.\1.\2"),
        (r"time_aware_extnn\.model\.(\d+)\.(.+)", r"fusion.\1.\2"),
        (r"concat_conv_c\.model\.(.+)", r"attention_c.\1"),
        (r"concat_conv_t\.model\.(.+)", r"attention_p.\1"),
        (r"conv_lstm_c\._conv_layer\.(.+)", r"head_c.\1"),
        (r"conv_lstm_t\._conv_layer\.(.+)", r"head_p.\1"),
    ):
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    return None


def _translate(state: Mapping[str, Tensor], config: ACFMConfig) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Authors' state -> (our state, unused checkpoint keys, consistency problems)."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()
    problems: list[str] = []

    # Encoder: the copies must agree; copy 0 is loaded.
    copies: dict[int, dict[str, Tensor]] = {}
    for key, value in state.items():
        m = _ENCODER.fullmatch(key)
        if m:
            copies.setdefault(int(m[1]), {})[m[2]] = value
    expected_copies = config.len_closeness + config.len_periodic
    if copies and sorted(copies) != list(range(expected_copies)):
        problems.append(f"expected encoder copies resnn.resblocks.0..{expected_copies - 1}, found {sorted(copies)}")
    first = copies.get(0, {})
    for index, copy in sorted(copies.items()):
        if index == 0:
            continue
        if set(copy) != set(first):
            problems.append(f"resnn.resblocks.{index} has keys {sorted(set(copy) ^ set(first))} that copy 0 lacks/has")
        differing = [k for k in copy if k in first and not torch.equal(copy[k], first[k])]
        if differing:
            problems.append(f"resnn.resblocks.{index} differs from resnn.resblocks.0 at {differing}")
        used.update(f"resnn.resblocks.{index}.{k}" for k in copy)
    for rest, value in first.items():
        ours = _encoder_key(rest, config.res_units)
        if ours is not None:
            out[ours] = value
            used.add(f"resnn.resblocks.0.{rest}")

    # ConvLSTM cells: the authors' gate-by-gate weights, fused unless the model uses literal cells.
    for theirs, ours in _CELLS.items():
        prefix = f"{theirs}._lstm_cell."
        cell_keys = [k for k in state if k.startswith(prefix)]
        if not cell_keys:
            continue
        if config.cell == "literal":
            out.update({f"{ours}.cell.{k[len(prefix):]}": state[k] for k in cell_keys})
            used.update(cell_keys)
            continue
        try:
            fused = fuse_literal_state(state, prefix)
        except (KeyError, ValueError) as err:
            problems.append(f"cannot fuse {prefix}*: {err}")
            continue
        out.update({f"{ours}.cell.{k}": v for k, v in fused.items()})
        used.update(k for k in cell_keys if _LITERAL_CELL_KEY.fullmatch(k[len(prefix):]))

    for key, value in state.items():
        ours = _simple_key(key)
        if ours is not None:
            out[ours] = value
            used.add(key)
    unused = [k for k in state if k not in used]
    return out, unused, problems


def load_reference_state_dict(model: ACFM, state: Mapping[str, Tensor], source: str = "state dict") -> ACFM:
    """Strictly load the authors' ``state`` into ``model`` (reference variant); returns ``model``."""
    if model.config.variant != "reference":
        raise ReferenceCheckpointError(
            f"{source}: the authors' weights need ACFM(variant='reference'), got variant={model.config.variant!r}"
        )
    translated, unexpected, problems = _translate(state, model.config)
    target = model.state_dict()
    missing = sorted(k for k in target if k not in translated)
    unexpected += sorted(k for k in translated if k not in target)
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in translated.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or mismatched or problems:
        lines = [f"{source} does not match ACFM({model.config})"]
        for title, items in (("missing (model keys not filled)", missing),
                             ("unexpected (checkpoint keys not used)", unexpected),
                             ("shape mismatch", mismatched), ("inconsistent", problems)):
            if items:
                lines.append(f"{title}: " + "; ".join(items))
        raise ReferenceCheckpointError("\n".join(lines))
    model.load_state_dict({k: v.to(target[k].dtype) for k, v in translated.items()}, strict=True)
    return model


def infer_reference_config(state: Mapping[str, Tensor], source: str = "state dict", **overrides: Any) -> ACFMConfig:
    """The reference-variant :class:`ACFMConfig` implied by the authors' tensor shapes (+ field overrides).

    Inferred: grid and hidden width (peephole ``w``), ext_dim and E (``extnn.model.0``), R (residual units),
    len_closeness / len_periodic (attention heads). Not inferable (pass as overrides): ``len_trend`` (default 0,
    i.e. the periodic heads are all period frames) and the dropout rates (default: BikeNYC's 0.5).
    """
    needed = ["conv_lstm._lstm_cell.f_gate.w", "extnn.model.0.weight"]
    absent = [k for k in needed if k not in state]
    if absent:
        raise ReferenceCheckpointError(f"{source}: cannot infer the ACFM configuration, missing keys {absent}")
    w = state["conv_lstm._lstm_cell.f_gate.w"]  # (C, H, W)
    ext_hidden, ext_dim = state["extnn.model.0.weight"].shape  # (E, D)
    units = {int(m[1]) for k in state if (m := re.fullmatch(r"resnn\.resblocks\.0\.(\d+)\.layer1\.0\.weight", k))}
    heads_c = {int(m[1]) for k in state if (m := re.fullmatch(r"concat_conv_c\.model\.(\d+)\.0\.weight", k))}
    heads_p = {int(m[1]) for k in state if (m := re.fullmatch(r"concat_conv_t\.model\.(\d+)\.0\.weight", k))}
    len_trend = int(overrides.pop("len_trend", 0))
    fields: dict[str, Any] = dict(
        grid_shape=tuple(w.shape[1:]), hidden_channels=int(w.shape[0]), ext_dim=int(ext_dim),
        ext_hidden=int(ext_hidden), res_units=len(units), len_closeness=len(heads_c),
        len_period=len(heads_p) - len_trend, len_trend=len_trend, lstm_dropout=0.5, variant="reference",
    )
    fields.update(overrides)
    try:
        return ACFMConfig(**fields)
    except ValueError as err:
        raise ReferenceCheckpointError(f"{source}: inferred configuration is invalid: {err}") from err


def load_reference_checkpoint(
    path: str | os.PathLike,
    *,
    norm_layer: NormLayer = nn.BatchNorm2d,
    config: ACFMConfig | None = None,
    **overrides: Any,
) -> ACFM:
    """Build ``ACFM(variant="reference")`` and strictly load the authors' state dict file at ``path``.

    ``config`` fixes the architecture (it must then match the file); by default it is inferred from the tensor
    shapes (:func:`infer_reference_config`, with ``overrides`` such as ``cell="literal"`` or ``lstm_dropout``).
    The returned model is in eval mode, on CPU. Evaluate it on data built with ``compat_weekend_bug=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ACFM reference checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors vary by torch version
        raise ReferenceCheckpointError(f"{path}: not a readable torch state dict ({err})") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ReferenceCheckpointError(f"{path}: expected a plain state dict of tensors, got {type(state).__name__}")
    if config is None:
        config = infer_reference_config(state, source=str(path), **overrides)
    elif overrides:
        raise TypeError("pass either config or field overrides, not both")
    model = ACFM(config, norm_layer=norm_layer)
    load_reference_state_dict(model, state, source=str(path))
    return model.eval()


def to_reference_state_dict(model: ACFM) -> dict[str, Tensor]:
    """The inverse of :func:`load_reference_state_dict`: ``model``'s weights under the authors' key layout (one
    encoder copy per input frame). Needs ``variant="reference"`` and ``cell="literal"`` (the authors' gate-by-gate
    cells). Used to test the loading path of a checkpoint that is not available here (TaxiBJ)."""
    cfg = model.config
    if cfg.variant != "reference" or cfg.cell != "literal":
        raise ValueError(f"to_reference_state_dict needs variant='reference' and cell='literal', got {cfg.variant!r}, "
                         f"{cfg.cell!r}")
    rules = [
        (r"ext_embed\.net\.(.+)", r"extnn.model.\1"), (r"fusion\.(.+)", r"time_aware_extnn.model.\1"),
        (r"attention_c\.(.+)", r"concat_conv_c.model.\1"), (r"attention_p\.(.+)", r"concat_conv_t.model.\1"),
        (r"head_c\.(.+)", r"conv_lstm_c._conv_layer.\1"), (r"head_p\.(.+)", r"conv_lstm_t._conv_layer.\1"),
        (r"attention_lstm\.cell\.(.+)", r"conv_lstm._lstm_cell.\1"),
        (r"lstm_c\.cell\.(.+)", r"conv_lstm_c._lstm_cell.\1"),
        (r"lstm_p\.cell\.(.+)", r"conv_lstm_t._lstm_cell.\1"),
    ]
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        m = re.fullmatch(r"encoder\.(stem|head)\.(.+)", key)
        u = re.fullmatch(r"encoder\.units\.(\d+)\.(norm|conv)([12])\.(.+)", key)
        if m or u:
            if m:
                rest = f"{0 if m[1] == 'stem' else cfg.res_units + 2}.{m[2]}"
            else:
                rest = f"{int(u[1]) + 1}.layer{u[3]}.{0 if u[2] == 'norm' else 2}.{u[4]}"
            for copy in range(cfg.len_closeness + cfg.len_periodic):
                out[f"resnn.resblocks.{copy}.{rest}"] = value.clone()
            continue
        for pattern, repl in rules:
            if re.fullmatch(pattern, key):
                out[re.sub(pattern, repl, key)] = value.clone()
                break
        else:
            raise ValueError(f"no authors' counterpart for {key}")
    return out
