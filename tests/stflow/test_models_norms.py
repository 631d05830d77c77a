"""Any forecasting model with any norm: ``build_model(..., norm=..., norm_options=...)`` and the BKN wiring.

The Kalman chain is checked against an independent recomputation: every prior a BKN layer receives must equal
the previous posterior pushed through the activation (Gaussian moments by dense quadrature here, not the closed
forms of the library) and the conv (linear moments written out), plus the block input's moments at residual sums.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlayers import BatchKalmanNorm2d
from stflow.data import CrowdFlowDataModule, generate_synthetic_city
from stflow.models import NORM_KINDS, KalmanFrameEncoder, NormOptions, build_model
from stflow.models.kalman import selu_gaussian_moments
from stflow.system import data_keywords

DATA = dict(grid_shape=(4, 3), ext_dim=5, len_closeness=3, len_period=1, len_trend=1, slots_per_day=24)
SMALL = {"acfm_bikenyc": dict(hidden_channels=8, res_units=2), "stresnet": dict(filters=8, res_units=3)}
ACTIVATION = {"acfm_bikenyc": F.selu, "stresnet": F.relu}


def _model(name: str, norm: str | None = None, options: NormOptions | None = None, **kw) -> nn.Module:
    return build_model(name, **DATA, **SMALL[name], **kw, norm=norm, norm_options=options)


def _batch(b: int = 6, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = DATA["grid_shape"]
    d = DATA["ext_dim"]
    out = {}
    for key, n in (("closeness", 3), ("period", 1), ("trend", 1)):
        out[key] = torch.rand(b, n, 2, h, w, generator=g) * 2 - 1
        out[f"ext_{key}"] = torch.rand(b, n, d, generator=g)
    out["ext_target"] = torch.rand(b, d, generator=g)
    return out


def _chains(model: nn.Module) -> list[list[tuple[nn.Module, nn.Module, nn.Module, nn.Module, nn.Module]]]:
    """Per independent chain, its residual units as (norm1, conv1, norm2, conv2) plus the unit itself."""
    if hasattr(model, "encoder"):  # ACFM: one shared frame encoder
        stacks = [model.encoder.units]
    else:  # ST-ResNet: one chain per temporal component
        stacks = [c.units for c in model.components.values()]
    return [[(u.norm1, u.conv1, u.norm2, u.conv2, u) for u in units] for units in stacks]


class _Recorder:
    """Records, per BKN layer, the prior it was called with and its posterior after the call."""

    def __init__(self, model: nn.Module) -> None:
        self.prior: dict[nn.Module, tuple[Tensor, Tensor] | None] = {}
        self.posterior: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        for m in model.modules():
            if isinstance(m, BatchKalmanNorm2d):
                m.register_forward_pre_hook(self._pre, with_kwargs=True)
                m.register_forward_hook(self._post)

    def _pre(self, module, args, kwargs):
        prior = kwargs.get("prior")
        self.prior[module] = None if prior is None else (prior[0].detach().double(), prior[1].detach().double())

    def _post(self, module, args, output):
        if module.posterior is not None:
            self.posterior[module] = tuple(t.detach().double() for t in module.posterior)


def _gauss_moments(f, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of f(z), z ~ N(mean, var), by a dense quadrature on +-12 sd (float64)."""
    u = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
    w = torch.exp(-0.5 * u * u)
    w = w / w.sum()
    vals = f(mean[..., None] + var.clamp_min(0).sqrt()[..., None] * u)
    m = (vals * w).sum(-1)
    return m, ((vals - m[..., None]) ** 2 * w).sum(-1)


def _through(f, post: tuple[Tensor, Tensor], conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """Moments of conv(f(z)) for independent inputs: mean sum_i,k W mu_i + b, variance sum_i,k W^2 var_i."""
    m, v = _gauss_moments(f, *post)
    w = conv.weight.detach().double()  # (C_out, C_in, 3, 3)
    mean = torch.einsum("oikl,i->o", w, m) + conv.bias.detach().double()
    var = torch.einsum("oikl,i->o", w * w, v)
    return mean, var


def _close(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> bool:
    return all(torch.allclose(x.reshape(-1), y.reshape(-1), rtol=1e-4, atol=1e-5) for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------------------
# The Kalman chain
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["acfm_bikenyc", "stresnet"])
def test_bkn_priors_are_the_analytic_transition_of_the_previous_posterior(name):
    torch.manual_seed(0)
    model = _model(name, "bkn", NormOptions(prior_weight=0.6))
    rec = _Recorder(model)
    model.train()
    model(_batch())
    act = ACTIVATION[name]
    chains = _chains(model)
    assert len(chains) == (1 if name == "acfm_bikenyc" else 3)
    for units in chains:
        x_stats = None  # statistics of the current unit's input (the residual stream)
        for k, (norm1, conv1, norm2, conv2, _) in enumerate(units):
            if k == 0:
                assert rec.prior[norm1] is None  # the chain starts at the first norm (fed from the data)
            else:
                assert rec.prior[norm1] is not None, f"unit {k}.norm1 got no prior"
                assert _close(rec.prior[norm1], x_stats), f"unit {k}.norm1: prior != summed residual moments"
            assert rec.prior[norm2] is not None, f"unit {k}.norm2 got no prior"
            assert _close(rec.prior[norm2], _through(act, rec.posterior[norm1], conv1)), f"unit {k}.norm2"
            # the residual sum x + branch: means add, variances add. What the identity branch carries: ACFM's
            # hand wiring carries norm1's posterior; ST-ResNet goes through normlayers.convert, whose default is
            # the authors' prior sum (norm1's prior; its posterior only at the chain start, where it has none)
            branch = _through(act, rec.posterior[norm2], conv2)
            carried = rec.posterior[norm1]
            if name == "stresnet" and rec.prior[norm1] is not None:
                carried = rec.prior[norm1]
            x_stats = (carried[0] + branch[0], carried[1] + branch[1])
    # eval: plain BN with running statistics, no prior anywhere
    model.eval()
    rec.prior.clear()
    model(_batch())
    assert rec.prior and all(p is None for p in rec.prior.values())


@pytest.mark.parametrize("transition", ["monte_carlo", "analytic"])
def test_kalman_frame_encoder_wiring_and_batchnorm_equivalence(transition):
    torch.manual_seed(0)
    encoder = _model("acfm_bikenyc").encoder
    x = torch.randn(6, 2, 4, 3)
    bn_out = copy.deepcopy(encoder)(x)
    drop_in = KalmanFrameEncoder(copy.deepcopy(encoder), prior_weight=0.0, transition=transition)
    assert torch.allclose(drop_in(x), bn_out, atol=1e-5)  # p = 0: BatchNorm exactly
    assert set(drop_in.state_dict()) == set(encoder.state_dict())  # same keys: checkpoints move across
    kalman = KalmanFrameEncoder(copy.deepcopy(encoder), prior_weight=0.8, transition=transition)
    out = kalman(x)
    assert kalman.wired == [False, True, True, True]  # every norm but the first gets a prior
    assert not torch.allclose(out, bn_out, atol=1e-3)
    out.square().mean().backward()
    conv1 = kalman.units[0].conv1.weight.grad  # reaches the priors' transitions too
    assert conv1 is not None and torch.isfinite(conv1).all()
    kalman.eval()
    kalman(x)
    assert kalman.wired == [False] * 4  # inference: plain BN with running statistics


def test_selu_gaussian_moments_match_quadrature_and_sampling():
    mean = torch.tensor([-4.0, -1.0, 0.0, 0.7, 3.0, 40.0], dtype=torch.float64)
    var = torch.tensor([0.05, 1.0, 2.0, 0.3, 4.0, 9.0], dtype=torch.float64)
    m, v = selu_gaussian_moments(mean, var)
    mq, vq = _gauss_moments(F.selu, mean, var)
    assert torch.allclose(m, mq, rtol=1e-6, atol=1e-9) and torch.allclose(v, vq, rtol=1e-6, atol=1e-9)
    # a large Monte-Carlo estimate (250k samples): means within 5 standard errors, variances within 2%
    rng = np.random.default_rng(0)
    z = mean.numpy() + np.sqrt(var.numpy()) * rng.standard_normal((250_000, 6))
    s = 1.0507009873554805 * np.where(z > 0, z, 1.6732632423543772 * np.expm1(z))  # SELU, written out
    se_mean = s.std(0) / 500.0  # standard error of the sample mean
    assert np.all(np.abs(m.numpy() - s.mean(0)) < 5 * se_mean + 1e-12)
    assert np.allclose(v.numpy(), s.var(0), rtol=2e-2)
    assert torch.isfinite(m).all() and torch.isfinite(v).all()  # no overflow of exp(mean) at mean = 40


@pytest.mark.parametrize("name", ["acfm_bikenyc", "stresnet"])
def test_bkn_with_prior_weight_zero_is_batchnorm(name):
    torch.manual_seed(0)
    kw = dict(lstm_dropout=0.0, ext_dropout=0.0) if name == "acfm_bikenyc" else {}
    bn = _model(name, "bn", **kw)
    bkn = _model(name, "bkn", NormOptions(prior_weight=0.0), **kw)
    bkn.load_state_dict(bn.state_dict())  # strict: same keys, checkpoints move between BN and BKN
    rec = _Recorder(bkn)
    batch = _batch()
    bn.train(), bkn.train()
    assert torch.allclose(bkn(batch), bn(batch), atol=1e-5)
    assert sum(p is not None for p in rec.prior.values()) == len(rec.prior) - len(_chains(bkn))  # priors fed
    bn_stats, bkn_stats = bn.state_dict(), bkn.state_dict()
    assert all(torch.allclose(bn_stats[k].float(), bkn_stats[k].float(), atol=1e-6) for k in bn_stats)
    bn.eval(), bkn.eval()
    assert torch.allclose(bkn(batch), bn(batch), atol=1e-5)
    # and a real prior weight changes the training forward
    bkn6 = _model(name, "bkn", NormOptions(prior_weight=0.6), **kw)
    bkn6.load_state_dict(bn.state_dict())
    bn.train(), bkn6.train()
    assert not torch.allclose(bkn6(batch), bn(batch), atol=1e-3)


@pytest.mark.parametrize("name", ["acfm_bikenyc", "stresnet"])
def test_monte_carlo_transition_is_really_sampled(name):
    def priors(model: nn.Module, seed: int) -> list[Tensor]:
        rec = _Recorder(model)
        torch.manual_seed(seed)
        model(_batch())
        return [p[0] for p in rec.prior.values() if p is not None]

    torch.manual_seed(0)
    mc = _model(name, "bkn", NormOptions(transition="monte_carlo", prior_weight=0.5))
    an = _model(name, "bkn", NormOptions(transition="analytic", prior_weight=0.5))
    an.load_state_dict(mc.state_dict())
    assert {m.transition for m in mc.modules() if isinstance(m, BatchKalmanNorm2d)} == {"monte_carlo"}
    mc_a, mc_b, mc_a2 = priors(mc, 1), priors(mc, 2), priors(mc, 1)
    assert mc_a and all(torch.equal(a, b) for a, b in zip(mc_a, mc_a2))  # same seed: same draws
    assert not any(torch.allclose(a, b) for a, b in zip(mc_a, mc_b))  # other seed: other draws
    an_a, an_b = priors(an, 1), priors(an, 2)
    assert all(torch.equal(a, b) for a, b in zip(an_a, an_b))  # analytic: deterministic
    assert not any(torch.allclose(a, b, atol=1e-4) for a, b in zip(mc_a, an_a))


# --------------------------------------------------------------------------------------------------------------
# Norm choice through the registry
# --------------------------------------------------------------------------------------------------------------


def _norm_types(model: nn.Module) -> set[str]:
    kinds = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, BatchKalmanNorm2d)
    return {type(m).__name__ for m in model.modules() if isinstance(m, kinds)}


@pytest.mark.parametrize("name", ["acfm_bikenyc", "stresnet"])
def test_every_norm_kind_builds_the_right_layers_and_trains(name):
    expected = {None: {"BatchNorm2d"}, "bn": {"BatchNorm2d"}, "gn": {"GroupNorm"}, "bkn": {"BatchKalmanNorm2d"},
                "none": set()}
    assert set(expected) - {None} == set(NORM_KINDS)
    for norm, types in expected.items():
        torch.manual_seed(0)
        model = _model(name, norm, NormOptions(gn_groups=2))
        assert _norm_types(model) == types, norm
        if norm == "gn":
            assert {m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)} == {2}
        out = model(_batch())
        out.square().mean().backward()
        assert torch.isfinite(out).all() and all(
            p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
        )
    norms = sum(isinstance(m, BatchKalmanNorm2d) for m in _model(name, "bkn").modules())
    assert norms == sum(isinstance(m, nn.BatchNorm2d) for m in _model(name, "bn").modules()) > 0


def test_norm_choice_errors():
    with pytest.raises(ValueError, match="unknown norm 'layernorm'; choose from bn, gn, bkn, none"):
        build_model("stresnet", **DATA, norm="layernorm")
    with pytest.raises(ValueError, match="gn_groups=3 does not divide the 8 channels"):
        _model("acfm_bikenyc", "gn", NormOptions(gn_groups=3))
    for baseline in ("persistence", "historical_average"):
        with pytest.raises(ValueError, match=f"{baseline} has no norm layers"):
            build_model(baseline, **DATA, norm="bkn")
        build_model(baseline, **DATA, norm="none", norm_options=NormOptions())  # accepted
    with pytest.raises(ValueError, match="transition must be one of analytic, monte_carlo"):
        NormOptions(transition="kalman")
    with pytest.raises(ValueError, match=r"prior_weight must be in \[0, 1\)"):
        NormOptions(prior_weight=1.5)
    with pytest.raises(ValueError, match="unknown transition 'kalman'"):
        KalmanFrameEncoder(_model("acfm_bikenyc").encoder, prior_weight=0.5, transition="kalman")


def test_norm_options_defaults_and_mapping():
    assert NormOptions().transition == "analytic"
    assert NormOptions().prior_weight_value() == pytest.approx(0.9 + (math.log2(64) - 1) / 6 * (0.05 - 0.9))
    assert NormOptions(stat_batch=2).prior_weight_value() == pytest.approx(0.9)
    assert NormOptions(prior_weight=0.3, stat_batch=2).prior_weight_value() == 0.3
    model = build_model("stresnet", **DATA, **SMALL["stresnet"], norm="bkn",
                        norm_options={"transition": "monte_carlo", "prior_weight": 0.25})  # YAML-style mapping
    layers = [m for m in model.modules() if isinstance(m, BatchKalmanNorm2d)]
    assert {(m.prior_weight, m.transition) for m in layers} == {(0.25, "monte_carlo")}
    acfm = _model("acfm_bikenyc", "bkn")
    weights = [m.prior_weight for m in acfm.modules() if isinstance(m, BatchKalmanNorm2d)]
    assert weights == [pytest.approx(0.19166666)] * 4


# --------------------------------------------------------------------------------------------------------------
# Training on the synthetic city
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> CrowdFlowDataModule:
    out = tmp_path_factory.mktemp("city")
    generate_synthetic_city(out, seed=1, days=20)
    dm = CrowdFlowDataModule("synthetic", str(out), len_closeness=3, len_period=1, len_trend=1, test_days=3,
                             val_fraction=0.2, batch_size=8)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("name", ["acfm_bikenyc", "stresnet"])
def test_bkn_models_learn_on_the_synthetic_city(city, name):
    torch.manual_seed(0)
    kw = data_keywords(city)
    small = dict(hidden_channels=8, res_units=2, lstm_dropout=0.0, ext_dropout=0.0) if name == "acfm_bikenyc" \
        else dict(filters=8, res_units=2)
    model = build_model(name, **kw, **small, norm="bkn", norm_options=NormOptions(stat_batch=8))
    assert _norm_types(model) == {"BatchKalmanNorm2d"}
    batches = [b for _, b in zip(range(4), city.train_dataloader())]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_on_all() -> float:
        model.eval()
        with torch.no_grad():
            return float(sum(F.mse_loss(model(b), b["target"]) for b in batches) / len(batches))

    before = loss_on_all()
    model.train()
    for _ in range(8):
        for b in batches:
            opt.zero_grad()
            F.mse_loss(model(b), b["target"]).backward()
            opt.step()
    after = loss_on_all()
    assert after < 0.7 * before, (before, after)
