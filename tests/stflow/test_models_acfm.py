"""ACFM: parameter counts of the authors' presets, shapes, norm_layer plumbing, gradients, variants, factories."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from stflow.layers.convlstm import fuse_literal_cells
from stflow.models import ACFM, ACFMConfig, build_model


def make_batch(cfg: ACFMConfig, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (cfg.flow_channels, *cfg.grid_shape)
    out = {}
    for key, n in (("closeness", cfg.len_closeness), ("period", cfg.len_period), ("trend", cfg.len_trend)):
        out[key] = torch.rand(batch, n, *shape, generator=g) * 2 - 1
        out[f"ext_{key}"] = torch.rand(batch, n, cfg.ext_dim, generator=g)
    out["ext_target"] = torch.rand(batch, cfg.ext_dim, generator=g)
    out["target"] = torch.rand(batch, *shape, generator=g) * 2 - 1
    out["index"] = torch.arange(batch)
    return out


# The authors' counts (acfm.md). Their cell has two conv biases per gate where one suffices; the fused cell
# folds them, so it has 3 cells x 4 gates x 16 channels = 192 fewer (redundant) parameters.
@pytest.mark.parametrize("preset, expected", [("bikenyc", 182_065), ("taxibj", 969_893)])
def test_reference_parameter_counts(preset, expected):
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    literal = ACFM(ACFMConfig.preset(preset, variant="reference", cell="literal"))
    fused = ACFM(ACFMConfig.preset(preset, variant="reference"))
    assert count(literal) == expected
    assert count(fused) == expected - 3 * 4 * 16


def test_fused_and_literal_models_agree_float64():
    cfg = ACFMConfig.preset("bikenyc", grid_shape=(6, 4), variant="reference", cell="literal", lstm_dropout=0.0)
    torch.manual_seed(0)
    literal = ACFM(cfg).double().eval()
    fused = ACFM(dataclasses.replace(cfg, cell="fused")).double().eval()
    fused.load_state_dict(fuse_literal_cells(literal.state_dict()), strict=True)
    batch = {k: (v.double() if v.is_floating_point() else v) for k, v in make_batch(cfg, 3).items()}
    torch.testing.assert_close(fused(batch), literal(batch), rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", ["clean", "reference"])
@pytest.mark.parametrize("ext_dim", [0, 5])
def test_any_grid_and_ext_dim(variant, ext_dim):
    cfg = ACFMConfig(grid_shape=(10, 6), ext_dim=ext_dim, len_closeness=3, len_period=1, len_trend=1,
                     res_units=1, ext_hidden=7, variant=variant)
    model = ACFM(cfg).eval()
    batch = make_batch(cfg, 2)
    if ext_dim == 0:
        batch = {k: v for k, v in batch.items() if not k.startswith("ext_")}
    out = model(batch)
    assert out.shape == (2, 2, 10, 6)
    assert out.abs().max() < 1  # tanh output in the scaled space
    assert (model.ext_embed is None) == (ext_dim == 0)


def test_norm_layer_is_the_only_source_of_norms():
    def group_norm(channels: int) -> nn.Module:
        return nn.GroupNorm(4, channels)

    cfg = ACFMConfig(grid_shape=(6, 4), res_units=2, ext_dim=3)
    model = ACFM(cfg, norm_layer=group_norm)
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(nn.GroupNorm) == 2 * cfg.res_units
    assert not any(issubclass(k, nn.modules.batchnorm._NormBase) for k in kinds)
    assert model(make_batch(cfg)).shape == (2, 2, 6, 4)


@pytest.mark.parametrize("variant", ["clean", "reference"])
def test_training_step_reaches_every_parameter(variant):
    cfg = ACFMConfig(grid_shape=(6, 4), ext_dim=4, len_closeness=2, len_period=2, res_units=1, ext_hidden=5,
                     variant=variant, lstm_dropout=0.5)
    torch.manual_seed(0)
    model = ACFM(cfg).train()
    batch = make_batch(cfg, 4)
    loss = nn.functional.mse_loss(model(batch), batch["target"])
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_variants_differ_in_attention_input():
    clean = ACFM(ACFMConfig(grid_shape=(4, 4), variant="clean"))
    ref = ACFM(ACFMConfig(grid_shape=(4, 4), variant="reference"))
    assert clean.attention_c[0][0].in_channels == 32  # own features (16) + hidden (16)
    assert ref.attention_c[0][0].in_channels == 18  # 2 channels of the first frame + hidden (16)


def test_reference_attention_reads_first_frame_only():
    """Reference quirk: head k's extra input is channels [2k, 2k+2) of the FIRST frame's features (no external
    vector here, so the features are the encoder output; the reference variant encodes frame by frame)."""
    cfg = ACFMConfig(grid_shape=(4, 4), ext_dim=0, len_closeness=3, len_period=1, res_units=0, variant="reference")
    model = ACFM(cfg).eval()
    head_inputs, encoder_outputs = [], []
    model.attention_c[2][0].register_forward_hook(lambda m, inp, out: head_inputs.append(inp[0]) and None)
    model.encoder.register_forward_hook(lambda m, inp, out: encoder_outputs.append(out) and None)
    model({k: v for k, v in make_batch(cfg).items() if not k.startswith("ext_")})
    first_frame = encoder_outputs[0]  # call 0 encodes closeness[:, 0]
    torch.testing.assert_close(head_inputs[0][:, :2], first_frame[:, 4:6])
    assert not torch.allclose(head_inputs[0][:, :2], encoder_outputs[2][:, 4:6])  # not frame 2's own features


def test_config_and_factory_validation():
    with pytest.raises(ValueError, match="len_closeness >= 1"):
        ACFMConfig(len_closeness=0)
    with pytest.raises(ValueError, match="len_period \\+ len_trend >= 1"):
        ACFMConfig(len_period=0, len_trend=0)
    with pytest.raises(ValueError, match="at most 8 frames"):
        ACFMConfig(len_closeness=9, variant="reference")
    data = dict(grid_shape=(16, 8), ext_dim=33, len_closeness=4, len_period=2, len_trend=0, slots_per_day=24)
    with pytest.raises(ValueError, match="acfm_reference_taxibj needs the authors' 77-dim external vector"):
        build_model("acfm_reference_taxibj", **data)
    with pytest.raises(ValueError, match="unknown option"):
        build_model("acfm_bikenyc", **data, dropout=0.1)
    with pytest.raises(ValueError, match="acfm_bikenyc: .*len_period"):
        build_model("acfm_bikenyc", **{**data, "len_period": 0})
    model = build_model("acfm_reference_bikenyc", **data, lstm_dropout=0.2)
    assert model.config.variant == "reference" and model.config.lstm_dropout == 0.2
    with pytest.raises(ValueError, match=r"closeness of shape \(B, 4, 2, 16, 8\)"):
        batch = make_batch(model.config)
        batch["closeness"] = batch["closeness"][:, :3]
        model(batch)
    with pytest.raises(KeyError, match="ext_target"):
        model({k: v for k, v in make_batch(model.config).items() if k != "ext_target"})
