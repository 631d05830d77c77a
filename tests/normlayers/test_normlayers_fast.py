"""The fast torch path (closed-form autograd.Function) against the reference and float64 gradcheck."""

from __future__ import annotations

import pytest
import torch

from normlayers import BatchKalmanNorm2d, batch_kalman_norm, batch_kalman_norm_reference
from normlayers.ops.torch_backend import bkn_train


def _make(shape, dtype, group_size, prior_kind, seed=0, channels_last=False):
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    groups = 1 if group_size is None else n // group_size
    x = torch.randn(*shape, generator=gen, dtype=dtype) * 1.3 + 0.4
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    b = torch.randn(c, generator=gen, dtype=dtype)
    pshape = (groups, c) if prior_kind == "group" else (c,)
    pm = torch.randn(*pshape, generator=gen, dtype=dtype) * 0.5
    pv = torch.rand(*pshape, generator=gen, dtype=dtype) + 0.5
    tensors = [x, w, b, pm, pv]
    return [t.requires_grad_() for t in tensors]


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("prior_kind", ["shared", "group", None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gradcheck_float64_through_fast_function(group_size, prior_kind, channels_last):
    x, w, b, pm, pv = _make((4, 3, 3, 5), torch.float64, group_size, prior_kind or "shared",
                            channels_last=channels_last)

    def fn(x, w, b, pm, pv):  # y and both posterior outputs are differentiated
        prior = (pm, pv) if prior_kind else None
        return bkn_train(x, w, b, prior, 0.7, 1e-5, 100.0, group_size)

    inputs = (x, w, b, pm, pv) if prior_kind else (x, w, b, pm.detach(), pv.detach())
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("scope", ["group", "layer"])
def test_gradcheck_with_guard_fired_and_no_affine(scope):
    x, _, _, pm, pv = _make((4, 3, 2, 3), torch.float64, 2, "group", seed=1)
    with torch.no_grad():
        pv[0] *= 1e4  # group 0's ratio: far above the threshold, and so is the layer's mean

    def fn(x, pm, pv):
        return bkn_train(x, None, None, (pm, pv), 0.9, 1e-5, 100.0, 2, guard_scope=scope)

    assert torch.autograd.gradcheck(fn, (x, pm, pv), fast_mode=True)
    y, m, v = fn(x, pm, pv)
    (y.square().sum() + m.sum() + v.sum()).backward()
    assert torch.all(pm.grad[0] == 0) and torch.all(pv.grad[0] == 0)  # fell back to BN: no gradient to its prior
    if scope == "group":  # group 1 mixed its prior in
        assert torch.all(pm.grad[1] != 0) and torch.all(pv.grad[1] != 0)
    else:  # the layer fell back as a whole
        assert torch.all(pm.grad == 0) and torch.all(pv.grad == 0)


@pytest.mark.parametrize("group_size", [None, 2])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("fire_guard", [False, True])
def test_gradcheck_y_only_backward(group_size, channels_last, fire_guard):
    """Only ``y`` is differentiated: the fused single-BN-backward path (and the guard in every group)."""
    x, w, b, pm, pv = _make((4, 3, 3, 5), torch.float64, group_size, "shared", seed=2, channels_last=channels_last)
    if fire_guard:
        with torch.no_grad():
            pv *= 1e4  # every ghost group falls back to BatchNorm

    def fn(x, w, b, pm, pv):
        return bkn_train(x, w, b, (pm, pv), 0.7, 1e-5, 100.0, group_size)[0]

    assert torch.autograd.gradcheck(fn, (x, w, b, pm, pv), fast_mode=True)
    ref_inputs = [t.detach().clone().requires_grad_() for t in (x, w, b, pm, pv)]
    y_ref = batch_kalman_norm_reference(
        ref_inputs[0], ref_inputs[1], ref_inputs[2], ref_inputs[3], ref_inputs[4], 0.7, group_size=group_size
    )[0]
    y = fn(x, w, b, pm, pv)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    for fast, ref in zip((x, w, b, pm, pv), ref_inputs):
        torch.testing.assert_close(fast.grad, ref.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "shape,group_size,channels_last",
    [
        ((4, 6, 5, 7), None, False),
        ((4, 6, 5, 7), None, True),
        ((4, 6, 5, 7), 2, False),
        ((4, 6, 5, 7), 2, True),
        ((2, 8, 48, 48), None, False),  # large enough for the native_group_norm statistics path
        ((4, 8, 32, 36), 2, False),
        ((5, 3, 11), None, False),
        ((6, 5), 3, False),
    ],
)
def test_fast_matches_reference_float32(shape, group_size, channels_last):
    xf, wf, bf, pmf, pvf = _make(shape, torch.float32, group_size, "group", seed=2, channels_last=channels_last)
    xr, wr, br, pmr, pvr = [t.detach().clone().requires_grad_() for t in (xf, wf, bf, pmf, pvf)]
    yf, mf, vf = bkn_train(xf, wf, bf, (pmf, pvf), 0.8, 1e-5, 100.0, group_size)
    yr, mr, vr = batch_kalman_norm_reference(xr, wr, br, pmr, pvr, 0.8, group_size=group_size)
    torch.testing.assert_close(yf, yr, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(mf, mr, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(vf, vr, atol=2e-6, rtol=1e-5)
    gen = torch.Generator().manual_seed(4)
    gy = torch.randn(yf.shape, generator=gen)
    gm, gv = torch.randn(mf.shape, generator=gen), torch.randn(vf.shape, generator=gen)
    torch.autograd.backward((yf, mf, vf), (gy, gm, gv))
    torch.autograd.backward((yr, mr, vr), (gy, gm, gv))
    for fast, ref in zip((xf, wf, bf, pmf, pvf), (xr, wr, br, pmr, pvr)):
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(fast.grad, ref.grad, atol=2e-5 * max(scale, 1.0), rtol=1e-4)
    if channels_last:
        assert yf.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_fp32_statistics(dtype):
    x32, w, b, pm, pv = [t.detach() for t in _make((4, 5, 6, 6), torch.float32, None, "shared", seed=6)]
    x = x32.to(dtype).requires_grad_()
    running_mean, running_var = torch.zeros(5), torch.ones(5)
    y, post_mean, post_var = batch_kalman_norm(x, running_mean, running_var, w, b, prior=(pm, pv), prior_weight=0.5,
                                               backend="torch")
    assert y.dtype == dtype
    assert post_mean.dtype == post_var.dtype == running_mean.dtype == running_var.dtype == torch.float32
    y_ref, m_ref, v_ref = batch_kalman_norm_reference(x.detach().float(), w, b, pm, pv, 0.5)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(y.float(), y_ref, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(post_mean, m_ref, atol=1e-5, rtol=1e-5)  # statistics of the rounded input, in fp32
    torch.testing.assert_close(post_var, v_ref, atol=1e-5, rtol=1e-5)
    y.float().sum().backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad.float()).all()
    # against the fp32 input: only the input rounding differs
    y32, _, _ = batch_kalman_norm_reference(x32, w, b, pm, pv, 0.5)
    torch.testing.assert_close(y.float(), y32, atol=tol * 8, rtol=tol * 2)
    # eval: fp32 running buffers, output in the input dtype
    y_eval, none_mean, none_var = batch_kalman_norm(x.detach(), running_mean, running_var, w, b, training=False,
                                                    backend="torch")
    assert y_eval.dtype == dtype and none_mean is None and none_var is None
    expect = torch.nn.functional.batch_norm(x.detach().float(), running_mean, running_var, w, b, training=False)
    torch.testing.assert_close(y_eval.float(), expect, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("shape", [(4, 5, 6, 6), (2, 8, 48, 48)])  # broadcast path; group-norm statistics path
def test_flat_posteriors_equal_the_grouped_api(shape):
    x, w, b, pm, pv = _make(shape, torch.float32, None, "shared", seed=8)
    y, m, v = batch_kalman_norm(x, None, None, w, b, prior=(pm, pv), prior_weight=0.6, backend="torch")
    yf, mf, vf = batch_kalman_norm(x, None, None, w, b, prior=(pm, pv), prior_weight=0.6, backend="torch", flat=True)
    c = shape[1]
    assert m.shape == v.shape == (1, c) and mf.shape == vf.shape == (c,)
    torch.testing.assert_close(yf, y, rtol=0, atol=0)
    torch.testing.assert_close(mf, m[0], rtol=0, atol=0)
    torch.testing.assert_close(vf, v[0], rtol=0, atol=0)
    grads = torch.autograd.grad((yf.square().sum() + mf.sum() + vf.sum()), (x, pm, pv))
    grads_ref = torch.autograd.grad((y.square().sum() + m.sum() + v.sum()), (x, pm, pv))
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want)


def test_torch_compile_aot_eager_matches_eager():
    torch._dynamo.reset()
    bkn = BatchKalmanNorm2d(4, backend="torch")
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    prior = (torch.zeros(4, requires_grad=True), torch.ones(4, requires_grad=True))

    def step(x, m, v):
        y = bkn(x, prior=(m, v))
        return y, bkn.posterior[0], bkn.posterior[1]

    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)
    y_c, m_c, v_c = compiled(x, *prior)
    (y_c.square().sum() + m_c.sum()).backward()
    grads_c = [t.grad.clone() for t in (x, *prior)]
    for t in (x, *prior):
        t.grad = None
    y_e, m_e, v_e = step(x, *prior)
    (y_e.square().sum() + m_e.sum()).backward()
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(v_c, v_e)
    for g_c, t in zip(grads_c, (x, *prior)):
        torch.testing.assert_close(g_c, t.grad)
