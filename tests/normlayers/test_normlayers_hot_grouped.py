"""The hot path for channels-last input and ghost groups (normlayers.ops.torch_backend._GroupedPriorFn via
hot_train): taken when it should be; float64 parity with the reference (outputs, running buffers, gradients of
y alone and of y with the posterior); fp32 equality with the general Function; gradcheck; the guard per group
(none, some, all fired; decided per group or once for the layer); bad prior values. Every test runs with both
per-channel finalizes (C call, torch ops)."""

from __future__ import annotations

import pytest
import torch

from normlayers import BatchKalmanNorm2d, batch_kalman_norm, batch_kalman_norm_reference
from normlayers.ops import torch_backend
from normlayers.ops.torch_backend import _BatchKalmanNormFn, hot_train
from normlayers.reference import update_running_stats_reference

SHAPE = (8, 8, 24, 24)  # 36,864 elements: above _GROUP_NORM_MIN_NUMEL
CL = torch.channels_last


pytestmark = pytest.mark.usefixtures("finalize")  # every test with the C finalize and with the torch ops


def _inputs(shape, layout, prior_shape, dtype=torch.float64, seed=0, prior_scale=1.0, quiet_group=None):
    """(x, gamma, beta, mu_P, var_P), leaves requiring grad; ``quiet_group``: samples whose batch variance is
    tiny (their ghost group's guard fires against a unit prior)."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, generator=gen, dtype=dtype) * 1.7 + 0.6
    if quiet_group is not None:
        x[quiet_group] *= 1e-3
    x = x.contiguous(memory_format=CL if layout == "channels_last" else torch.contiguous_format)
    w = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    b = torch.randn(c, generator=gen, dtype=dtype)
    pm = torch.randn(prior_shape, generator=gen, dtype=dtype) * 0.5
    pv = (torch.rand(prior_shape, generator=gen, dtype=dtype) + 0.5) * prior_scale
    return [t.requires_grad_() for t in (x, w, b, pm, pv)]


def _node_name(y: torch.Tensor) -> str:
    return type(y.grad_fn).__name__


# (layout, group_size, prior of shape (C,) or (G, C), guard): the cases the hot path adds. "some": the first
# group's ratio is far above the threshold, the others' below, decided per group (guard_scope="group"); the
# layer's mean is above it too, so "some_layer" (guard_scope="layer") falls back in every group
CASES = [
    ("channels_last", None, "c", "none"),
    ("channels_last", None, "c", "all"),
    ("channels_last", 2, "c", "none"),
    ("channels_last", 2, "gc", "none"),
    ("channels_last", 2, "c", "some"),
    ("channels_last", 4, "gc", "all"),
    ("nchw", 2, "c", "none"),
    ("nchw", 2, "gc", "none"),
    ("nchw", 2, "c", "some"),
    ("nchw", 4, "gc", "all"),
    ("channels_last", 2, "gc", "some_layer"),
    ("nchw", 2, "gc", "some_layer"),
]


def _scope(guard):
    return "group" if guard == "some" else "layer"


def _case_inputs(layout, group_size, prior, guard, dtype=torch.float64, seed=0, shape=SHAPE):
    groups = 1 if group_size is None else shape[0] // group_size
    prior_shape = (shape[1],) if prior == "c" else (groups, shape[1])
    return _inputs(shape, layout, prior_shape, dtype, seed=seed, prior_scale=1e4 if guard == "all" else 1.0,
                   quiet_group=slice(0, group_size) if guard in ("some", "some_layer") else None)


def test_layer_takes_the_grouped_hot_path_where_it_applies():
    x, _, _, pm, pv = _inputs(SHAPE, "nchw", (8,), torch.float32)
    xc = x.detach().contiguous(memory_format=CL).requires_grad_()
    bkn = BatchKalmanNorm2d(8, backend="torch")
    y = bkn(xc, prior=(pm, pv))
    assert _node_name(y) == "_GroupedPriorFnBackward" and y.is_contiguous(memory_format=CL)
    assert bkn.posterior[0].shape == (8,)
    grouped = BatchKalmanNorm2d(8, group_size=2, backend="torch")
    for inp in (x, xc):
        y = grouped(inp, prior=(pm, pv))
        assert _node_name(y) == "_GroupedPriorFnBackward" and grouped.posterior[0].shape == (4, 8)
        assert _node_name(grouped(inp, prior=(pm.expand(4, 8).contiguous(), pv.expand(4, 8).contiguous()))) == (
            "_GroupedPriorFnBackward")
    # one ghost group spanning the batch is the ungrouped NCHW hot path
    assert _node_name(BatchKalmanNorm2d(8, group_size=8, backend="torch")(x, prior=(pm, pv))) == "_NchwPriorFnBackward"
    # the rest stays on the general Function: a 5-D channels-last input, a too small one, a (G, C) prior
    # of the wrong G, mixed prior shapes
    x5 = torch.randn(2, 8, 4, 24, 24).contiguous(memory_format=torch.channels_last_3d)
    y5, _, _ = batch_kalman_norm(x5, None, None, torch.ones(8), torch.zeros(8), prior=(pm, pv), prior_weight=0.9,
                                 backend="torch")
    assert _node_name(y5) != "_GroupedPriorFnBackward"
    assert _node_name(grouped(xc[:, :, :8, :8].contiguous(memory_format=CL), prior=(pm, pv))) == (
        "_BatchKalmanNormFnBackward")
    assert hot_train(x, None, None, grouped.weight, grouped.bias, (pm.expand(2, 8), pv.expand(2, 8)), 0.9, 0.1,
                     1e-5, 100.0, 2) is None
    assert hot_train(x, None, None, grouped.weight, grouped.bias, (pm, pv.expand(4, 8).contiguous()), 0.9, 0.1,
                     1e-5, 100.0, 2) is None
    assert hot_train(x, None, None, grouped.weight, grouped.bias, (pm, pv), 0.9, 0.1, 1e-5, 100.0, 3) is None


@pytest.mark.parametrize("layout,group_size,prior,guard", CASES)
def test_grouped_hot_path_matches_the_reference_float64(layout, group_size, prior, guard):
    x, w, b, pm, pv = _case_inputs(layout, group_size, prior, guard)
    ref = [t.detach().clone().requires_grad_() for t in (x, w, b, pm, pv)]
    c = SHAPE[1]
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    y, post_mean, post_var = hot_train(x, rm, rv, w, b, (pm, pv), 0.8, 0.1, 1e-5, 100.0, group_size, _scope(guard))
    assert _node_name(y) == "_GroupedPriorFnBackward"
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=CL)
    y_ref, m_ref, v_ref = batch_kalman_norm_reference(*ref, 0.8, group_size=group_size, guard_scope=_scope(guard))
    if group_size is None:  # one group: (C,) posteriors, as the layer exposes them
        m_ref, v_ref = m_ref[0], v_ref[0]
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(post_mean, m_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(post_var, v_ref, rtol=1e-12, atol=1e-13)
    groups = 1 if group_size is None else SHAPE[0] // group_size
    rm_ref, rv_ref = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    update_running_stats_reference(rm_ref, rv_ref, m_ref.detach(), v_ref.detach(), 0.1,
                                   x.numel() // (groups * c))
    torch.testing.assert_close(rm, rm_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-12, atol=1e-13)
    gen = torch.Generator().manual_seed(3)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.contiguous_format
                                                                               if layout == "nchw" else CL)
    gm = torch.randn(m_ref.shape, generator=gen, dtype=torch.float64)
    gv = torch.randn(v_ref.shape, generator=gen, dtype=torch.float64)
    ones = torch.ones(1, dtype=torch.float64).expand(m_ref.shape)  # a stride-0 gradient, as from post_mean.sum()
    for outputs, ref_outputs, grads in (((y,), (y_ref,), (gy,)),  # y alone
                                        # a chain: the posterior has gradients too (one or both of its parts)
                                        ((y, post_mean, post_var), (y_ref, m_ref, v_ref), (gy, gm, gv)),
                                        ((y, post_mean), (y_ref, m_ref), (gy, ones)),
                                        ((y, post_var), (y_ref, v_ref), (gy, gv)),
                                        # a gradient in the other layout: the general closed form
                                        ((y,), (y_ref,), (gy.contiguous(memory_format=CL if layout == "nchw"
                                                                        else torch.contiguous_format),))):
        fast = torch.autograd.grad(outputs, (x, w, b, pm, pv), grads, retain_graph=True)
        expect = torch.autograd.grad(ref_outputs, ref, grads, retain_graph=True)
        for got, want in zip(fast, expect):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    if guard in ("all", "some_layer"):  # every guard fired: BatchNorm's statistics, no gradient to the prior
        assert torch.all(fast[3] == 0) and torch.all(fast[4] == 0)
    if guard == "some" and prior == "gc":
        assert torch.all(fast[3][0] == 0) and torch.any(fast[3][1] != 0)


@pytest.mark.parametrize("layout,group_size,prior,guard", CASES)
def test_grouped_hot_path_equals_the_general_function_fp32(layout, group_size, prior, guard):
    x, w, b, pm, pv = _case_inputs(layout, group_size, prior, guard, dtype=torch.float32, seed=5)
    groups = 1 if group_size is None else SHAPE[0] // group_size
    hot = hot_train(x, None, None, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0, group_size, _scope(guard))
    general = _BatchKalmanNormFn.apply(x, w, b, pm, pv, 0.9, 1e-5, 100.0, _scope(guard) == "layer", groups, True,
                                       None)
    assert _node_name(hot[0]) == "_GroupedPriorFnBackward" and _node_name(general[0]) == "_BatchKalmanNormFnBackward"
    for got, want in zip(hot, general):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    gy = torch.randn_like(x)
    gm, gv = torch.randn_like(hot[1]), torch.randn_like(hot[2])
    for grads in ((gy,), (gy, gm, gv)):
        g_hot = torch.autograd.grad(hot[:len(grads)], (x, w, b, pm, pv), grads, retain_graph=True)
        g_gen = torch.autograd.grad(general[:len(grads)], (x, w, b, pm, pv), grads, retain_graph=True)
        for got, want in zip(g_hot, g_gen):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * max(want.abs().max().item(), 1.0))


@pytest.mark.parametrize("layout,group_size,prior", [("channels_last", None, "c"), ("channels_last", 2, "gc"),
                                                     ("nchw", 2, "c"), ("nchw", 3, "gc")])
def test_gradcheck_float64_through_the_grouped_function(monkeypatch, layout, group_size, prior):
    monkeypatch.setattr(torch_backend, "_GROUP_NORM_MIN_NUMEL", 1)
    x, w, b, pm, pv = _case_inputs(layout, group_size, prior, "none", seed=7, shape=(6, 3, 3, 4))

    def y_only(x, w, b, pm, pv):
        return hot_train(x, None, None, w, b, (pm, pv), 0.7, 0.1, 1e-5, 100.0, group_size)[0]

    def all_outputs(x, w, b, pm, pv):
        return hot_train(x, None, None, w, b, (pm, pv), 0.7, 0.1, 1e-5, 100.0, group_size)

    assert _node_name(y_only(x, w, b, pm, pv)) == "_GroupedPriorFnBackward"
    assert torch.autograd.gradcheck(y_only, (x, w, b, pm, pv), fast_mode=True)
    assert torch.autograd.gradcheck(all_outputs, (x, w, b, pm, pv), fast_mode=True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("bad,match", [("nan_mean", "prior mean contains NaN"), ("negative_var", "non-negative")])
def test_grouped_hot_path_rejects_bad_prior_values(layout, bad, match):
    x, _, _, pm, pv = [t.detach() for t in _inputs(SHAPE, layout, (4, 8), torch.float32)]
    if bad == "nan_mean":
        pm[2, 3] = float("nan")
    else:
        pv[3, 5] = -0.1
    bkn = BatchKalmanNorm2d(8, group_size=2, backend="torch")
    before = bkn.running_mean.clone()
    with pytest.raises(ValueError, match=match):
        bkn(x, prior=(pm, pv))
    assert torch.equal(bkn.running_mean, before)  # nothing written on a rejected prior
