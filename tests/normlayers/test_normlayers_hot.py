"""The layer's hot path (normlayers.ops.torch_backend._NchwPriorFn via hot_train): taken when it should be, same
numbers and gradients as the reference and the general Function, the guard and the value checks.
Every test runs with both per-channel finalizes: the C call and the torch ops."""

from __future__ import annotations

import pytest
import torch

from normlayers import (
    BatchKalmanNorm2d,
    BatchKalmanNorm3d,
    batch_kalman_norm,
    batch_kalman_norm_reference,
)
from normlayers.ops import torch_backend
from normlayers.ops.torch_backend import _BatchKalmanNormFn, hot_train
from normlayers.reference import update_running_stats_reference

HOT_SHAPE = (2, 8, 48, 48)  # 36,864 elements: above _GROUP_NORM_MIN_NUMEL, like the layer's CIFAR-size calls


pytestmark = pytest.mark.usefixtures("finalize")  # every test with the C finalize and with the torch ops


def _inputs(shape, dtype=torch.float64, seed=0, prior_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, generator=gen, dtype=dtype) * 1.7 + 0.6
    w = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    b = torch.randn(c, generator=gen, dtype=dtype)
    pm = torch.randn(c, generator=gen, dtype=dtype) * 0.5
    pv = (torch.rand(c, generator=gen, dtype=dtype) + 0.5) * prior_scale
    return [t.requires_grad_() for t in (x, w, b, pm, pv)]


def _node_name(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


def test_layer_takes_the_hot_path_only_where_it_applies():
    bkn = BatchKalmanNorm2d(8, backend="torch")
    x, _, _, pm, pv = _inputs(HOT_SHAPE, torch.float32)
    assert _node_name(bkn(x, prior=(pm, pv))) == "_NchwPriorFnBackward"
    assert bkn.posterior[0].shape == (8,)
    # channels-last and ghost groups: the grouped hot path (tests/normlayers/test_normlayers_hot_grouped.py)
    assert _node_name(bkn(x.to(memory_format=torch.channels_last), prior=(pm, pv))) == "_GroupedPriorFnBackward"
    # everything else goes through the general Function
    assert _node_name(bkn(x[:, :, :8, :8], prior=(pm, pv))) == "_BatchKalmanNormFnBackward"  # too small
    assert _node_name(bkn(x, prior=(pm[None], pv[None]))) == "_BatchKalmanNormFnBackward"  # (1, C) prior
    assert _node_name(bkn(x)) == "_BatchKalmanNormFnBackward"  # no prior
    grouped = BatchKalmanNorm2d(8, group_size=1, backend="torch")
    assert _node_name(grouped(x, prior=(pm, pv))) == "_GroupedPriorFnBackward"
    bkn.double()  # fp32 input with fp64 parameters: dtypes differ
    assert _node_name(bkn(x, prior=(pm.double(), pv.double()))) == "_BatchKalmanNormFnBackward"


def test_hot_train_declines_invalid_inputs_so_the_general_path_reports_them():
    x, w, b, pm, pv = [t.detach() for t in _inputs(HOT_SHAPE, torch.float32)]
    rm, rv = torch.zeros(8), torch.ones(8)
    assert hot_train(x, rm, rv, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0) is not None
    assert hot_train(x, rm, rv, w, b, (pm[:4], pv[:4]), 0.9, 0.1, 1e-5, 100.0) is None  # wrong prior shape
    assert hot_train(x, rm, rv, w, b, [pm, pv], 0.9, 0.1, 1e-5, 100.0) is None  # not a tuple
    assert hot_train(x, rm, rv, w, b, (pm, pv), 1.5, 0.1, 1e-5, 100.0) is None  # impossible prior weight
    assert hot_train(x, rm[:4], rv, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0) is None  # wrong buffer shape
    assert hot_train(x.half(), rm, rv, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0) is None  # low precision
    with pytest.raises(ValueError, match="prior mean has shape"):
        batch_kalman_norm(x, rm, rv, w, b, prior=(pm[:4], pv), prior_weight=0.9, backend="torch")
    with pytest.raises(ValueError, match="prior_weight"):
        batch_kalman_norm(x, rm, rv, w, b, prior=(pm, pv), prior_weight=1.5, backend="torch")


@pytest.mark.parametrize("prior_scale", [1.0, 1e4])  # 1e4: the guard fires, plain BN for this step
def test_hot_path_matches_the_reference_float64(prior_scale):
    x, w, b, pm, pv = _inputs(HOT_SHAPE, prior_scale=prior_scale)
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b, pm, pv)]
    rm, rv = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    y, post_mean, post_var = hot_train(x, rm, rv, w, b, (pm, pv), 0.8, 0.1, 1e-5, 100.0)
    assert _node_name(y) == "_NchwPriorFnBackward"
    y_ref, m_ref, v_ref = batch_kalman_norm_reference(*ref, 0.8)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(post_mean, m_ref[0], rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(post_var, v_ref[0], rtol=1e-12, atol=1e-13)
    rm_ref, rv_ref = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    update_running_stats_reference(rm_ref, rv_ref, m_ref.detach(), v_ref.detach(), 0.1, HOT_SHAPE[0] * 48 * 48)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-12, atol=1e-13)
    # gradients of y alone (the fused backward) and of all three outputs (the closed-form fallback)
    gen = torch.Generator().manual_seed(3)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gm, gv = torch.randn(8, generator=gen, dtype=torch.float64), torch.randn(8, generator=gen, dtype=torch.float64)
    ones = torch.ones(1, dtype=torch.float64).expand(8)  # a stride-0 gradient, as from post_mean.sum()
    for outputs, ref_outputs, grads in (((y,), (y_ref,), (gy,)),  # y alone: the fused backward
                                        # a chain: the posterior has gradients too (one or both of its parts)
                                        ((y, post_mean, post_var), (y_ref, m_ref[0], v_ref[0]), (gy, gm, gv)),
                                        ((y, post_mean), (y_ref, m_ref[0]), (gy, ones)),
                                        ((y, post_var), (y_ref, v_ref[0]), (gy, gv))):
        fast = torch.autograd.grad(outputs, (x, w, b, pm, pv), grads, retain_graph=True)
        expect = torch.autograd.grad(ref_outputs, ref, grads, retain_graph=True)
        for got, want in zip(fast, expect):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    if prior_scale > 1.0:  # the guard fired: BatchNorm's statistics, no gradient to the prior
        assert torch.all(fast[3] == 0) and torch.all(fast[4] == 0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_hot_path_equals_the_general_function(dtype, tol):
    """Same numbers from both Functions at the same size (the hot path only reorders the per-channel
    arithmetic); both write y into group norm's spare output, in either statistics dtype."""
    x, w, b, pm, pv = _inputs(HOT_SHAPE, dtype, seed=5)
    hot = hot_train(x, None, None, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0)
    general = _BatchKalmanNormFn.apply(x, w, b, pm, pv, 0.9, 1e-5, 100.0, True, 1, True, None)
    assert _node_name(hot[0]) == "_NchwPriorFnBackward" and _node_name(general[0]) == "_BatchKalmanNormFnBackward"
    for got, want in zip(hot, general):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    gy = torch.randn_like(x)
    g_hot = torch.autograd.grad(hot[0], (x, w, b, pm, pv), gy)
    g_gen = torch.autograd.grad(general[0], (x, w, b, pm, pv), gy)
    for got, want in zip(g_hot, g_gen):
        torch.testing.assert_close(got, want, rtol=50 * tol, atol=50 * tol * max(want.abs().max().item(), 1.0))


@pytest.mark.parametrize("fire_guard", [False, True])
def test_gradcheck_float64_through_the_hot_function(monkeypatch, fire_guard):
    """gradcheck on small tensors: the size threshold is lowered so the hot path takes them."""
    monkeypatch.setattr(torch_backend, "_GROUP_NORM_MIN_NUMEL", 1)
    x, w, b, pm, pv = _inputs((3, 4, 3, 5), seed=7, prior_scale=1e4 if fire_guard else 1.0)

    def y_only(x, w, b, pm, pv):  # the fused backward
        return hot_train(x, None, None, w, b, (pm, pv), 0.7, 0.1, 1e-5, 100.0)[0]

    def all_outputs(x, w, b, pm, pv):  # posterior gradients: the closed-form fallback
        return hot_train(x, None, None, w, b, (pm, pv), 0.7, 0.1, 1e-5, 100.0)

    assert _node_name(y_only(x, w, b, pm, pv)) == "_NchwPriorFnBackward"
    assert torch.autograd.gradcheck(y_only, (x, w, b, pm, pv), fast_mode=True)
    assert torch.autograd.gradcheck(all_outputs, (x, w, b, pm, pv), fast_mode=True)


def test_hot_path_backward_twice_with_retain_graph_is_stable():
    """The backward writes none of its saved tensors: a second pass gives the same gradients."""
    x, w, b, pm, pv = _inputs(HOT_SHAPE, torch.float32, seed=9)
    y = hot_train(x, None, None, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0)[0]
    gy = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, w, b, pm, pv), gy, retain_graph=True)
    second = torch.autograd.grad(y, (x, w, b, pm, pv), gy)
    for one, two in zip(first, second):
        assert torch.equal(one, two)


@pytest.mark.parametrize(
    "bad,match",
    [("nan_mean", "prior mean contains NaN"), ("inf_var", "prior var contains NaN or inf"),
     ("negative_var", "non-negative")],
)
def test_hot_path_rejects_bad_prior_values(bad, match):
    bkn = BatchKalmanNorm2d(8, backend="torch")
    x, _, _, pm, pv = [t.detach() for t in _inputs(HOT_SHAPE, torch.float32)]
    if bad == "nan_mean":
        pm[3] = float("nan")
    elif bad == "inf_var":
        pv[2] = float("inf")
    else:
        pv[5] = -0.1
    with pytest.raises(ValueError, match=match):
        bkn(x, prior=(pm, pv))


def test_hot_path_in_3d_layers_and_layer_state():
    """(N, C, D, H, W) input, running statistics and the cumulative-average momentum through the layer."""
    bkn = BatchKalmanNorm3d(4, momentum=None, prior_weight=0.6, backend="torch")
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 4, 8, 24, 24, generator=gen)
    prior = (torch.randn(4, generator=gen) * 0.3, torch.rand(4, generator=gen) + 0.5)
    versions = bkn.running_mean._version, bkn.running_var._version
    y = bkn(x, prior=prior)
    # the buffers were written (by the C loop too): autograd's saved-tensor checks can see it
    assert bkn.running_mean._version > versions[0] and bkn.running_var._version > versions[1]
    assert _node_name(y) == "_NchwPriorFnBackward"
    y_ref, m_ref, v_ref = batch_kalman_norm_reference(x, bkn.weight, bkn.bias, *prior, 0.6)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    rm, rv = torch.zeros(4), torch.ones(4)
    update_running_stats_reference(rm, rv, m_ref.detach(), v_ref.detach(), 1.0, 2 * 8 * 24 * 24)  # 1st batch: 1/1
    torch.testing.assert_close(bkn.running_mean, rm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bkn.running_var, rv, rtol=1e-5, atol=1e-6)
    assert int(bkn.num_batches_tracked) == 1


def test_the_layer_tries_the_hot_path_once_per_step(monkeypatch):
    """A step the hot path declines (an input below its size threshold) goes straight to the general path: the
    layer asks hot_train once, not again through batch_kalman_norm; the step is still counted once."""
    import normlayers.functional as functional

    calls = []

    def counting_hot_train(*args, **kwargs):
        calls.append(args[0].shape)
        return hot_train(*args, **kwargs)

    monkeypatch.setattr(functional, "hot_train", counting_hot_train)
    layer = BatchKalmanNorm2d(4, prior_weight=0.5, backend="torch")
    y = layer(torch.randn(2, 4, 3, 3), prior=(torch.zeros(4), torch.ones(4)))
    assert _node_name(y) == "_BatchKalmanNormFnBackward"  # the general path ran
    assert len(calls) == 1 and int(layer.num_batches_tracked) == 1
