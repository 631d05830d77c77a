"""The authors' BikeNYC state dict loads STRICTLY into ACFM(variant="reference"); mangled dicts fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from stflow.models import (
    ACFM,
    ACFMConfig,
    ReferenceCheckpointError,
    load_reference_checkpoint,
    load_reference_state_dict,
)
from stflow.models.acfm_reference import infer_reference_config


def make_batch(cfg: ACFMConfig, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    frame = (cfg.flow_channels, *cfg.grid_shape)
    out = {"ext_target": (torch.rand(batch, cfg.ext_dim, generator=g) > 0.8).float()}
    for key, n in (("closeness", cfg.len_closeness), ("period", cfg.len_period), ("trend", cfg.len_trend)):
        out[key] = torch.rand(batch, n, *frame, generator=g) * 2 - 1
        out[f"ext_{key}"] = (torch.rand(batch, n, cfg.ext_dim, generator=g) > 0.8).float()
    return out


@pytest.fixture(scope="module")
def checkpoint(shared: Path) -> Path:
    path = shared / "checkpoints" / "atfm" / "bikenyc.pt"
    if not path.is_file():
        pytest.skip(f"authors' checkpoint missing: {path}")
    return path


@pytest.fixture(scope="module")
def state(checkpoint: Path) -> dict[str, torch.Tensor]:
    return dict(torch.load(checkpoint, map_location="cpu", weights_only=True))


def test_loads_strictly_and_fused_equals_literal(checkpoint, state):
    assert len(state) == 294
    fused = load_reference_checkpoint(checkpoint)
    cfg = fused.config
    assert (cfg.grid_shape, cfg.ext_dim, cfg.res_units, cfg.ext_hidden) == ((16, 8), 33, 2, 30)
    assert (cfg.len_closeness, cfg.len_period, cfg.variant) == (4, 2, "reference")
    assert not fused.training
    # Spot checks that tensors landed where they belong.
    torch.testing.assert_close(
        fused.encoder.units[1].norm2.running_var, state["resnn.resblocks.0.2.layer2.0.running_var"]
    )
    torch.testing.assert_close(fused.fusion[2].weight, state["time_aware_extnn.model.2.weight"])
    torch.testing.assert_close(fused.lstm_p.cell.peephole_weight[2], state["conv_lstm_t._lstm_cell.o_gate.w"])
    literal = load_reference_checkpoint(checkpoint, cell="literal")
    batch = make_batch(cfg, 4)
    with torch.no_grad():
        torch.testing.assert_close(fused(batch), literal(batch), rtol=0, atol=1e-5)


def _model(state):
    return ACFM(infer_reference_config(state))


def test_missing_key_is_named(state):
    mangled = dict(state)
    del mangled["conv_lstm_c._conv_layer.bias"]
    del mangled["concat_conv_t.model.1.2.weight"]
    with pytest.raises(
        ReferenceCheckpointError, match=r"missing \(model keys not filled\): attention_p\.1\.2\.weight; head_c\.bias"
    ):
        load_reference_state_dict(_model(state), mangled)
    mangled = dict(state)
    del mangled["conv_lstm._lstm_cell.i_gate.b"]
    with pytest.raises(
        ReferenceCheckpointError, match=r"cannot fuse conv_lstm\._lstm_cell\.\*.*conv_lstm\._lstm_cell\.i_gate\.b"
    ):
        load_reference_state_dict(_model(state), mangled)


def test_wrong_shape_and_unexpected_keys_are_named(state):
    mangled = dict(state)
    mangled["extnn.model.3.weight"] = torch.zeros(2048, 31)
    mangled["extra.weight"] = torch.zeros(3)
    with pytest.raises(ReferenceCheckpointError) as info:
        load_reference_state_dict(_model(state), mangled)
    message = str(info.value)
    assert "ext_embed.net.3.weight: checkpoint (2048, 31) vs model (2048, 30)" in message
    assert "unexpected (checkpoint keys not used): extra.weight" in message


def test_encoder_copies_must_be_identical(state):
    mangled = dict(state)
    mangled["resnn.resblocks.3.4.bias"] = state["resnn.resblocks.3.4.bias"] + 1
    with pytest.raises(
        ReferenceCheckpointError, match=r"resnn\.resblocks\.3 differs from resnn\.resblocks\.0 at \['4\.bias'\]"
    ):
        load_reference_state_dict(_model(state), mangled)


def test_wrong_model_is_rejected(state, checkpoint, tmp_path):
    cfg = infer_reference_config(state)
    with pytest.raises(ReferenceCheckpointError, match="running_mean"):  # GroupNorm has no running statistics
        load_reference_state_dict(ACFM(cfg, norm_layer=lambda c: nn.GroupNorm(4, c)), state)
    with pytest.raises(ReferenceCheckpointError, match="need ACFM\\(variant='reference'\\)"):
        load_reference_state_dict(ACFM(cfg.__class__(**{**cfg.__dict__, "variant": "clean"})), state)
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_reference_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ReferenceCheckpointError, match="bad.pt: not a readable torch state dict"):
        load_reference_checkpoint(bad)
