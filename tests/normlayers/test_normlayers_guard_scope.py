"""The guard's scope (``guard_scope="layer"``, the default and the authors', vs ``"group"``) on a hand-built case
whose ghost groups disagree (tests/normlayers/_guard_cases.py): the reference against an independent numpy forward,
then every CPU backend (the general torch Function, its torch.compile branch, the grouped hot path with the C and
the torch-ops finalize, NCHW and channels-last) against the reference, forward and backward; the option's
plumbing (functional, modules, convert, convert_sync, checkpoints). The Triton kernels: test_bkn_triton.py."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from _guard_cases import EPS, FIRED, GROUP_SIZE, GUARD_RATIO, SHAPE, P, hand_built, numpy_forward
from torch import nn

from normlayers import (
    GUARD_SCOPES,
    BatchKalmanNorm,
    BatchKalmanNorm2d,
    SyncBatchKalmanNorm,
    batch_kalman_norm,
    batch_kalman_norm_reference,
    convert,
    convert_sync,
)
from normlayers.ops import torch_backend
from normlayers.ops.torch_backend import bkn_train, hot_train
from normlayers.reference import elements_per_group, update_running_stats_reference

CASES = ["layer_fires", "layer_mixes"]
CL = torch.channels_last


def _reference(leaves, scope, group_size=GROUP_SIZE):
    x, w, b, pm, pv = leaves
    return batch_kalman_norm_reference(x, w, b, pm, pv, P, EPS, GUARD_RATIO, group_size, guard_scope=scope)


def _leaves(case, prior, dtype=torch.float64, layout="nchw"):
    x, w, b, pm, pv = hand_built(case, prior, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    return [t.requires_grad_() for t in (x, w, b, pm, pv)]


def _upstream(y, post_mean, seed=1):
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gm = torch.randn(post_mean.shape, generator=gen, dtype=torch.float64)
    gv = torch.randn(post_mean.shape, generator=gen, dtype=torch.float64)
    return gy, gm, gv


def _grads(outputs, leaves, upstream):
    """Gradients of ``y`` alone, then of ``y`` with both posterior parts (a Kalman chain)."""
    gy, gm, gv = upstream
    y_only = torch.autograd.grad(outputs[:1], leaves, (gy.to(outputs[0].dtype),), retain_graph=True)
    chain = torch.autograd.grad(outputs, leaves, (gy.to(outputs[0].dtype), gm, gv), retain_graph=True)
    return y_only + chain


def _assert_matches_reference(outputs, leaves, scope, upstream_seed=1, rtol=1e-9, atol=1e-10):
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    ref = _reference(ref_leaves, scope)
    for got, want in zip(outputs, ref):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    upstream = _upstream(ref[0], ref[1], upstream_seed)
    for got, want in zip(_grads(outputs, leaves, upstream), _grads(ref, ref_leaves, upstream)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


def test_the_hand_built_groups_disagree():
    """The case's premise: group 0's ratio is above the threshold, group 1's below, the layer mean on either side."""
    for case, layer_above in (("layer_fires", True), ("layer_mixes", False)):
        *_, ratios = numpy_forward(*hand_built(case), "group")
        per_group = ratios.mean(axis=1)
        assert per_group[0] >= 1.4 * GUARD_RATIO and per_group[1] <= 0.2 * GUARD_RATIO
        assert (ratios.mean() >= GUARD_RATIO) == layer_above
        assert abs(ratios.mean() - GUARD_RATIO) >= 0.1 * GUARD_RATIO  # a clear margin: no rounding can flip it
    assert GUARD_SCOPES[0] == "layer"  # the default


@pytest.mark.parametrize("prior", ["c", "gc"])
@pytest.mark.parametrize("scope", GUARD_SCOPES)
@pytest.mark.parametrize("case", CASES)
def test_reference_matches_an_independent_numpy_forward(case, scope, prior):
    leaves = _leaves(case, prior)
    y, post_mean, post_var = _reference(leaves, scope)
    y_np, m_np, v_np, fired, _ = numpy_forward(*leaves, scope)
    assert tuple(fired) == FIRED[case, scope]
    np.testing.assert_allclose(y.detach().numpy(), y_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(post_mean.detach().numpy(), m_np, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(post_var.detach().numpy(), v_np, rtol=1e-12, atol=1e-12)
    # a fired group: the posterior is its batch moments, and its prior gets no gradient
    x = leaves[0].detach().numpy().reshape(2, GROUP_SIZE, SHAPE[1], -1)
    for k, f in enumerate(fired):
        batch = np.allclose(post_mean[k].detach().numpy(), x[k].mean(axis=(0, 2)), rtol=0, atol=1e-12)
        assert batch == bool(f)
    dpm, dpv = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum() + post_var.sum(),
                                   leaves[3:])
    if prior == "gc":
        for k, f in enumerate(fired):
            assert bool((dpv[k] == 0).all()) == bool(f) and bool((dpm[k] == 0).all()) == bool(f)
    else:  # a shared prior sums the groups' gradients
        assert bool((dpv == 0).all()) == bool(fired.all())


@pytest.mark.parametrize("case", CASES)
def test_the_two_scopes_give_different_outputs(case):
    leaves = _leaves(case, "c")
    layer, group = (_reference(leaves, scope) for scope in GUARD_SCOPES)
    differ = 1 if case == "layer_fires" else 0  # the group where the two decisions differ
    for a, b in zip(layer, group):
        rows = a.detach().reshape(2, -1) if a.dim() == 4 else a.detach()  # (G, ...) rows
        rows_b = b.detach().reshape(2, -1) if b.dim() == 4 else b.detach()
        assert not torch.allclose(rows[differ], rows_b[differ])
        torch.testing.assert_close(rows[1 - differ], rows_b[1 - differ], rtol=0, atol=0)


@pytest.mark.parametrize("compile_branch", [False, True], ids=["eager", "compile_branch"])
@pytest.mark.parametrize("prior", ["c", "gc"])
@pytest.mark.parametrize("scope", GUARD_SCOPES)
@pytest.mark.parametrize("case", CASES)
def test_general_torch_function_matches_the_reference(monkeypatch, case, scope, prior, compile_branch):
    """bkn_train's closed-form Function; ``compile_branch``: the guard as a tensor (its torch.compile graph form)."""
    if compile_branch:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    leaves = _leaves(case, prior)
    x, w, b, pm, pv = leaves
    outputs = bkn_train(x, w, b, (pm, pv), P, EPS, GUARD_RATIO, GROUP_SIZE, guard_scope=scope)
    assert type(outputs[0].grad_fn).__name__ == "_BatchKalmanNormFnBackward"
    _assert_matches_reference(outputs, leaves, scope)


@pytest.mark.usefixtures("finalize")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("prior", ["c", "gc"])
@pytest.mark.parametrize("scope", GUARD_SCOPES)
@pytest.mark.parametrize("case", CASES)
def test_grouped_hot_path_matches_the_reference(monkeypatch, case, scope, prior, layout):
    """_GroupedPriorFn with the C finalize (``bkn_forward_finalize_grouped``) and with the torch ops."""
    monkeypatch.setattr(torch_backend, "_GROUP_NORM_MIN_NUMEL", 1)
    leaves = _leaves(case, prior, layout=layout)
    x, w, b, pm, pv = leaves
    c = SHAPE[1]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    outputs = hot_train(x, rm, rv, w, b, (pm, pv), P, 0.1, EPS, GUARD_RATIO, GROUP_SIZE, scope)
    assert type(outputs[0].grad_fn).__name__ == "_GroupedPriorFnBackward"
    _assert_matches_reference(outputs, leaves, scope)
    _, m_np, v_np, _, _ = numpy_forward(*leaves, scope)
    rm_ref, rv_ref = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    update_running_stats_reference(rm_ref, rv_ref, torch.from_numpy(m_np), torch.from_numpy(v_np), 0.1,
                                   elements_per_group(x, GROUP_SIZE))
    torch.testing.assert_close(rm, rm_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.usefixtures("finalize")
@pytest.mark.parametrize("hot", [False, True], ids=["general", "hot"])
@pytest.mark.parametrize("scope", GUARD_SCOPES)
@pytest.mark.parametrize("case", CASES)
def test_layer_passes_its_scope_through(monkeypatch, case, scope, hot):
    """BatchKalmanNorm2d(guard_scope=...) through the functional API, on the general path and the hot path."""
    if hot:
        monkeypatch.setattr(torch_backend, "_GROUP_NORM_MIN_NUMEL", 1)
    x, w, b, pm, pv = hand_built(case, "c", torch.float32)
    bkn = BatchKalmanNorm2d(3, prior_weight=P, guard_ratio=GUARD_RATIO, guard_scope=scope, group_size=GROUP_SIZE,
                            backend="torch")
    with torch.no_grad():
        bkn.weight.copy_(w)
        bkn.bias.copy_(b)
    y = bkn(x, prior=(pm, pv))
    assert (type(y.grad_fn).__name__ == "_GroupedPriorFnBackward") == hot
    y_np, m_np, v_np, _, _ = numpy_forward(x, w, b, pm, pv, scope)
    np.testing.assert_allclose(y.detach().numpy(), y_np, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bkn.posterior[0].detach().numpy(), m_np, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bkn.posterior[1].detach().numpy(), v_np, rtol=1e-5, atol=1e-5)
    assert f"guard_scope={scope!r}" in repr(bkn)


@pytest.mark.parametrize("case", CASES)
def test_without_ghost_groups_the_scopes_are_identical(case):
    leaves = _leaves(case, "c")
    x, w, b, pm, pv = leaves
    ref = [_reference(leaves, scope, group_size=None) for scope in GUARD_SCOPES]
    fast = [bkn_train(x, w, b, (pm, pv), P, EPS, GUARD_RATIO, None, guard_scope=scope) for scope in GUARD_SCOPES]
    for outputs in (ref, fast):
        for a, b_ in zip(*outputs):
            assert torch.equal(a, b_)


def test_unknown_scopes_are_rejected():
    x, w, b, pm, pv = hand_built("layer_fires", "c", torch.float32)
    with pytest.raises(ValueError, match="guard_scope must be one of"):
        BatchKalmanNorm2d(3, guard_scope="channel")
    with pytest.raises(ValueError, match="guard_scope must be one of"):
        batch_kalman_norm(x, None, None, w, b, prior=(pm, pv), prior_weight=P, guard_scope="channel")
    with pytest.raises(ValueError, match="guard_scope must be one of"):
        batch_kalman_norm_reference(x, w, b, pm, pv, P, guard_scope="Layer")
    with pytest.raises(ValueError, match="guard_scope must be one of"):
        bkn_train(x, w, b, (pm, pv), P, EPS, GUARD_RATIO, GROUP_SIZE, guard_scope="per-group")
    assert hot_train(x, None, None, w, b, (pm, pv), P, 0.1, EPS, GUARD_RATIO, GROUP_SIZE, "channel") is None
    with pytest.raises(ValueError, match="guard_scope must be one of"):
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), guard_scope="none")


def test_checkpoints_load_and_the_default_is_the_layer():
    """The scope is a setting, not state: strict state_dict loads both ways with nn.BatchNorm2d; a layer pickled
    before the option existed (no attribute) gets the class default, "layer"."""
    assert BatchKalmanNorm2d(3).guard_scope == "layer"
    bn = nn.BatchNorm2d(3)
    bn.running_mean.normal_()
    bkn = BatchKalmanNorm2d(3, guard_scope="group")
    bkn.load_state_dict(bn.state_dict(), strict=True)
    assert bkn.guard_scope == "group" and torch.equal(bkn.running_mean, bn.running_mean)
    assert set(bkn.state_dict()) == set(bn.state_dict())
    nn.BatchNorm2d(3).load_state_dict(bkn.state_dict(), strict=True)
    old = BatchKalmanNorm2d(3, group_size=2)
    del old.__dict__["guard_scope"]  # as unpickled from a version without the option
    restored = pickle.loads(pickle.dumps(old))
    assert "guard_scope" not in restored.__dict__ and restored.guard_scope == "layer"
    x, _, _, pm, pv = hand_built("layer_fires", "c", torch.float32)
    restored(x, prior=(pm, pv))
    assert "guard_scope='layer'" in repr(restored)


@pytest.mark.parametrize("scope", GUARD_SCOPES)
def test_convert_and_convert_sync_keep_the_scope(scope):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    convert(model, group_size=2, guard_scope=scope)
    layers = [m for m in model.modules() if isinstance(m, BatchKalmanNorm2d)]
    assert len(layers) == 2 and all(m.guard_scope == scope for m in layers)
    model(torch.randn(4, 3, 5, 5)).sum().backward()
    convert_sync(model)
    layers = [m for m in model.modules() if isinstance(m, BatchKalmanNorm)]
    assert len(layers) == 2 and all(isinstance(m, SyncBatchKalmanNorm) and m.guard_scope == scope for m in layers)
