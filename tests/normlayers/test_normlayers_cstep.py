"""The whole CPU training step in C (normlayers/ops/csrc/bkn_step.c), run two ways -- through the C++ operator with its
own autograd node (csrc/bkn_op.cpp, mode "auto") and through the Python Functions _NchwPriorFn / _GroupedPriorFn
(mode "step"), every test below for each:
float64 parity with the plain-torch reference to ~1e-10 and float32 to ~1e-5 (y, posterior, running buffers and
every gradient, with and without posterior gradients), NCHW and channels-last, 1/2/4 ghost groups, (C,) and (G, C)
priors, the guard firing for the layer and per group, odd sizes (C not a multiple of the vector width, H*W = 3),
one or two threads, a far-off-centre channel, bad priors, and that modes "finalize"/"torch" keep the torch kernels.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from normlayers import BatchKalmanNorm2d, batch_kalman_norm_reference, set_cpu_finalize
from normlayers.ops import cfinalize, torch_backend
from normlayers.ops.torch_backend import hot_train
from normlayers.reference import update_running_stats_reference

CL = torch.channels_last
P, MOMENTUM, EPS, GUARD = 0.8, 0.1, 1e-5, 100.0

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@pytest.fixture(autouse=True, params=["auto", "step"], ids=["cpp-op", "python-function"])
def c_step(request, monkeypatch):
    """Mode "auto" (the C++ operator) or "step" (the C step from the Python Functions), built; every size takes the
    hot path."""
    saved = cfinalize._mode
    set_cpu_finalize(request.param)
    if cfinalize.load_step() is None:
        pytest.skip("the C step could not be built here")
    if request.param == "auto" and cfinalize.load_op() is None:
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip("no C++ compiler: the operator cannot be built here (mode 'step' still runs)")
        pytest.fail("the C++ operator did not build although the C step did (see the normlayers log)")
    monkeypatch.setattr(torch_backend, "_GROUP_NORM_MIN_NUMEL", 1)
    yield request.param
    cfinalize._mode = saved


def _ran_c_step(y, mode="auto") -> bool:
    """Whether ``y`` came from the C step the way ``mode`` runs it (the C++ operator's node, or a Python Function
    that holds the library)."""
    if mode == "auto":
        return "BknStep" in y.grad_fn.name()
    return getattr(y.grad_fn, "step", None) is not None


def _inputs(shape, layout, groups, prior, dtype=torch.float64, seed=0, prior_scale=1.0, quiet=None, offset=0.6):
    """(x, gamma, beta, mu_P, var_P) leaves; ``prior``: "c" (C,) or "gc" (G, C); ``quiet``: samples scaled by 1e-3
    (their group's guard fires against a unit prior)."""
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.7 + offset
    if quiet is not None:
        x[quiet] = (x[quiet] - offset) * 1e-3 + offset
    x = x.to(dtype).contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)
    prior_shape = (c,) if prior == "c" else (groups, c)
    w = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(c, generator=gen, dtype=torch.float64).to(dtype)
    pm = (torch.randn(prior_shape, generator=gen, dtype=torch.float64) * 0.5 + offset).to(dtype)
    pv = ((torch.rand(prior_shape, generator=gen, dtype=torch.float64) + 0.5) * prior_scale).to(dtype)
    return [t.requires_grad_() for t in (x, w, b, pm, pv)]


def _run(leaves, group_size, scope, running=True):
    x, w, b, pm, pv = leaves
    c = x.shape[1]
    rm = torch.zeros(c, dtype=x.dtype) if running else None
    rv = torch.ones(c, dtype=x.dtype) if running else None
    out = hot_train(x, rm, rv, w, b, (pm, pv), P, MOMENTUM, EPS, GUARD, group_size, scope)
    assert out is not None and _ran_c_step(out[0], cfinalize._mode)  # the C step ran (not the torch kernels)
    return out, rm, rv


def _reference(leaves, group_size, scope):
    """The reference in float64 on the same values (leaves of their own)."""
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y, m, v = batch_kalman_norm_reference(*ref, P, EPS, GUARD, group_size=group_size, guard_scope=scope)
    if group_size is None or group_size == leaves[0].shape[0]:
        m, v = m[0], v[0]  # one group: the hot path's posteriors are (C,)
    return ref, (y, m, v)


def _check(leaves, group_size, scope, rtol, atol, grad_rtol, grad_atol):
    (y, m, v), rm, rv = _run(leaves, group_size, scope)
    x = leaves[0]
    assert y.dtype == x.dtype and y.stride() == x.stride()  # in x's layout
    ref, (y_ref, m_ref, v_ref) = _reference(leaves, group_size, scope)
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(m.double(), m_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(v.double(), v_ref, rtol=rtol, atol=atol)
    c, n = x.shape[1], x.shape[0]
    groups = 1 if group_size is None else n // group_size
    rm_ref, rv_ref = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    update_running_stats_reference(rm_ref, rv_ref, m_ref.detach().view(-1, c), v_ref.detach().view(-1, c), MOMENTUM,
                                   x.numel() // (groups * c))
    torch.testing.assert_close(rm.double(), rm_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(rv.double(), rv_ref, rtol=rtol, atol=atol)
    gen = torch.Generator().manual_seed(3)
    gy = torch.randn(y.shape, generator=gen, dtype=torch.float64).contiguous(memory_format=CL if not x.is_contiguous()
                                                                               else torch.contiguous_format)
    gm = torch.randn(m.shape, generator=gen, dtype=torch.float64)
    gv = torch.randn(v.shape, generator=gen, dtype=torch.float64)
    other = gy.contiguous(memory_format=torch.contiguous_format if not x.is_contiguous() else CL)
    cases = [((y,), (y_ref,), (gy,)),  # y alone: the prior-only backward
             ((y, m, v), (y_ref, m_ref, v_ref), (gy, gm, gv)),  # a chain: the posterior has gradients too
             ((y, v), (y_ref, v_ref), (gy, gv)),
             ((m, v), (m_ref, v_ref), (gm, gv)),  # no gradient reaches y
             ((y,), (y_ref,), (other,))]  # a gradient in the other layout (converted)
    fast = None
    for outputs, ref_outputs, grads in cases:
        fast = torch.autograd.grad(outputs, leaves, [t.to(x.dtype) for t in grads], retain_graph=True,
                                   materialize_grads=True)
        expect = torch.autograd.grad(ref_outputs, ref, grads, retain_graph=True, materialize_grads=True)
        for name, got, want in zip(("dx", "dgamma", "dbeta", "dmu_P", "dvar_P"), fast, expect):
            scale = max(want.abs().max().item(), 1.0)
            torch.testing.assert_close(got.double(), want, rtol=grad_rtol, atol=grad_atol * scale, msg=name)
    return fast


# (layout, shape, group_size, prior) -- C = 5 and 19 and 40 exercise the channels-last vector blocks and their tails,
# H*W = 3 (and 1x3) the NCHW row tails, 8 samples in 1, 2, 4 ghost groups
SIZES = [
    ("nchw", (8, 5, 3, 4), None, "c"),
    ("cl", (8, 5, 3, 4), None, "c"),
    ("nchw", (8, 19, 5, 7), 2, "c"),
    ("cl", (8, 19, 5, 7), 2, "gc"),
    ("nchw", (8, 40, 6, 6), 4, "gc"),
    ("cl", (8, 40, 6, 6), 4, "c"),
    ("cl", (4, 3, 1, 3), 2, "gc"),
    ("nchw", (4, 3, 1, 3), 1, "c"),
    ("cl", (8, 64, 9, 9), None, "c"),
    ("nchw", (6, 33, 8, 8), 3, "gc"),
]


@pytest.mark.parametrize("layout,shape,group_size,prior", SIZES)
def test_c_step_matches_the_reference_float64(layout, shape, group_size, prior):
    groups = 1 if group_size is None else shape[0] // group_size
    leaves = _inputs(shape, layout, groups, prior)
    _check(leaves, group_size, "layer", rtol=1e-10, atol=1e-11, grad_rtol=1e-9, grad_atol=1e-10)


@pytest.mark.parametrize("layout,shape,group_size,prior", SIZES)
def test_c_step_matches_the_reference_float32(layout, shape, group_size, prior):
    groups = 1 if group_size is None else shape[0] // group_size
    leaves = _inputs(shape, layout, groups, prior, dtype=torch.float32, seed=5)
    _check(leaves, group_size, "layer", rtol=1e-5, atol=1e-5, grad_rtol=1e-4, grad_atol=2e-5)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("layout,shape,group_size,prior", SIZES[:7])
def test_c_step_with_several_threads_matches_the_reference_float64(layout, shape, group_size, prior, threads):
    """The suite runs on one thread (tests/conftest.py); here 2 and 3: channels-last splits the positions between the
    threads (ranges that cross ghost groups, uneven shares) and adds their partial sums, NCHW splits the channels."""
    groups = 1 if group_size is None else shape[0] // group_size
    leaves = _inputs(shape, layout, groups, prior, seed=7)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check(leaves, group_size, "layer", rtol=1e-10, atol=1e-11, grad_rtol=1e-9, grad_atol=1e-10)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("guard", ["all", "some_group", "some_layer"])
@pytest.mark.parametrize("prior", ["c", "gc"])
def test_c_step_guard_fires_per_layer_and_per_group(layout, guard, prior, c_step):
    """"all": a huge prior variance (the layer's guard fires); "some_group": the first ghost group is nearly
    constant, its own guard fires (scope "group"), the others use the prior; "some_layer": the same data with one
    decision for the layer (its mean ratio is above the threshold, so every group falls back)."""
    shape, group_size = (8, 19, 4, 5), 2
    leaves = _inputs(shape, layout, 4, prior, prior_scale=1e4 if guard == "all" else 1.0,
                     quiet=slice(0, 2) if guard != "all" else None)
    scope = "group" if guard == "some_group" else "layer"
    grads = _check(leaves, group_size, scope, rtol=1e-10, atol=1e-11, grad_rtol=1e-9, grad_atol=1e-10)
    set_cpu_finalize("step")  # the Python Function's saved tensors show the decisions (the C++ node keeps them)
    try:
        (y, _, _), _, _ = _run(leaves, group_size, scope, running=False)
    finally:
        set_cpu_finalize(c_step)
    p_used = y.grad_fn.saved_tensors[-1]  # the prior weight each group used
    if guard == "some_group":
        assert p_used.tolist() == [0.0, P, P, P]
    else:
        assert p_used.tolist() == [0.0] * 4
    # grads of the last case (y alone, gradient in the other layout): no gradient to a fired group's prior
    dpm, dpv = grads[3], grads[4]
    if guard == "some_group" and prior == "gc":
        assert torch.all(dpm[0] == 0) and torch.all(dpv[0] == 0) and torch.any(dpm[1] != 0)
    elif guard != "some_group":
        assert torch.all(dpm == 0) and torch.all(dpv == 0)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("group_size", [None, 2])
def test_c_step_at_benchmark_size_with_two_threads_equals_the_torch_kernels(layout, group_size, c_step):
    """fp32 at (8, 64, 32, 32): the C step (threads as torch has them, then 1) against the same Function with the
    torch kernels (mode "torch"): outputs, running buffers and gradients."""
    shape = (8, 64, 32, 32)
    groups = 1 if group_size is None else 8 // group_size
    leaves = _inputs(shape, layout, groups, "gc" if groups > 1 else "c", dtype=torch.float32, seed=11)
    gy = torch.randn(shape).contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)
    results = {}
    saved_threads = torch.get_num_threads()
    try:
        for mode, threads in ((c_step, 2), (c_step, 1), ("torch", saved_threads)):
            torch.set_num_threads(threads)
            set_cpu_finalize(mode)
            rm, rv = torch.zeros(64), torch.ones(64)
            x, w, b, pm, pv = leaves
            y, m, v = hot_train(x, rm, rv, w, b, (pm, pv), 0.9, MOMENTUM, EPS, GUARD, group_size)
            assert _ran_c_step(y, mode) == (mode == c_step)
            results[mode, threads] = (y, m, v, rm, rv, *torch.autograd.grad(y, leaves, gy))
    finally:
        torch.set_num_threads(saved_threads)
        set_cpu_finalize(c_step)
    want = results["torch", saved_threads]
    for key in ((c_step, 2), (c_step, 1)):
        for got, expect in zip(results[key], want):
            scale = max(expect.abs().max().item(), 1.0)
            torch.testing.assert_close(got, expect, rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_c_step_moments_of_a_far_off_centre_channel(layout, c_step):
    """fp32 data with mean 1000 and deviation 0.01: the shifted sums keep the variance (a plain sum of squares in
    fp32 would lose it entirely). A huge prior variance fires the guard, so the posterior is the batch moments."""
    gen = torch.Generator().manual_seed(2)
    x64 = torch.randn(4, 16, 8, 8, generator=gen, dtype=torch.float64) * 0.01 + 1000.0
    x = x64.float().contiguous(memory_format=CL if layout == "cl" else torch.contiguous_format)
    pm, pv = torch.full((16,), 1000.0), torch.full((16,), 1e4)
    x.requires_grad_()
    y, m, v = hot_train(x, None, None, torch.ones(16), torch.zeros(16), (pm, pv), 0.5, 0.1, 1e-8, 100.0)
    assert _ran_c_step(y, c_step)
    xd = x.detach().double()
    torch.testing.assert_close(v.double(), xd.var(dim=(0, 2, 3), unbiased=False), rtol=1e-5, atol=0)
    torch.testing.assert_close(m.double(), xd.mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("bad,match", [("nan_mean", "prior mean contains NaN"), ("inf_var", "prior var contains"),
                                       ("negative_var", "non-negative")])
def test_c_step_rejects_bad_priors_and_writes_nothing(layout, bad, match):
    x, w, b, pm, pv = [t.detach() for t in _inputs((4, 6, 5, 5), layout, 2, "gc", dtype=torch.float32)]
    if bad == "nan_mean":
        pm[1, 3] = float("nan")
    elif bad == "inf_var":
        pv[0, 2] = float("inf")
    else:
        pv[1, 5] = -0.1
    rm, rv, count = torch.zeros(6), torch.ones(6), torch.tensor(4)
    with pytest.raises(ValueError, match=match):
        hot_train(x, rm, rv, w, b, (pm, pv), 0.9, None, 1e-5, 100.0, 2, num_batches_tracked=count)
    assert torch.equal(rm, torch.zeros(6)) and torch.equal(rv, torch.ones(6)) and int(count) == 4


@pytest.mark.parametrize("layout,group_size,prior", [("nchw", None, "c"), ("cl", None, "c"), ("cl", 2, "gc")])
def test_the_layer_counts_its_steps_and_averages_cumulatively_in_the_step(layout, group_size, prior, c_step):
    """momentum=None: the hot path (the operator counts the step itself) increments num_batches_tracked and updates
    the running buffers with momentum 1/k at step k, as BatchNorm does, from the reference posteriors."""
    layer = BatchKalmanNorm2d(6, momentum=None, prior_weight=P, group_size=group_size).double()
    rm_ref, rv_ref = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    versions = []
    for step in range(1, 4):
        x, w, b, pm, pv = [t.detach() for t in _inputs((4, 6, 5, 5), layout, 2, prior, seed=step, offset=step)]
        layer.weight.data.copy_(w)
        layer.bias.data.copy_(b)
        y = layer(x.requires_grad_(), prior=(pm, pv))
        assert _ran_c_step(y, c_step) and int(layer.num_batches_tracked) == step
        versions.append(layer.num_batches_tracked._version)
        _, m_ref, v_ref = batch_kalman_norm_reference(x.detach(), w, b, pm, pv, P, group_size=group_size)
        update_running_stats_reference(rm_ref, rv_ref, m_ref.view(-1, 6), v_ref.view(-1, 6), 1.0 / step,
                                       x.numel() // (m_ref.numel()))
    assert versions == sorted(set(versions))  # written in place each step, and autograd told
    torch.testing.assert_close(layer.running_mean, rm_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.running_var, rv_ref, rtol=1e-10, atol=1e-12)


def test_running_buffers_are_version_bumped_and_backward_twice_is_stable():
    x, w, b, pm, pv = _inputs((4, 6, 5, 5), "cl", 2, "gc", dtype=torch.float32, seed=9)
    rm, rv = torch.zeros(6), torch.ones(6)
    versions = rm._version, rv._version
    y = hot_train(x, rm, rv, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0, 2)[0]
    assert rm._version > versions[0] and rv._version > versions[1]
    gy = torch.randn_like(y)
    first = torch.autograd.grad(y, (x, w, b, pm, pv), gy, retain_graph=True)
    second = torch.autograd.grad(y, (x, w, b, pm, pv), gy)
    for one, two in zip(first, second):
        assert torch.equal(one, two)


def test_only_the_needed_gradients_are_computed():
    x, w, b, pm, pv = _inputs((4, 6, 5, 5), "nchw", 1, "c", seed=4)
    y = hot_train(x, None, None, w, b, (pm.detach(), pv.detach()), 0.9, 0.1, 1e-5, 100.0)[0]
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    ref = [t.detach().clone().requires_grad_() for t in (x, w)]
    y_ref = batch_kalman_norm_reference(ref[0], ref[1], b.detach(), pm.detach(), pv.detach(), 0.9)[0]
    want = torch.autograd.grad(y_ref, ref, torch.ones_like(y_ref))
    torch.testing.assert_close(dx, want[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dw, want[1], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["finalize", "torch"])
def test_other_modes_keep_the_torch_kernels(mode, c_step):
    x, w, b, pm, pv = _inputs((4, 6, 5, 5), "cl", 2, "gc", dtype=torch.float32)
    set_cpu_finalize(mode)
    try:
        y = hot_train(x, None, None, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0, 2)[0]
        assert not _ran_c_step(y, "auto") and not _ran_c_step(y, "step")
        assert cfinalize.cpu_step() == ("c-finalize" if mode == "finalize" else "torch")
    finally:
        set_cpu_finalize(c_step)
    assert cfinalize.cpu_step().startswith("cpp-op" if c_step == "auto" else "c-step")


def test_the_layer_takes_the_operator_in_auto_mode(c_step):
    """BatchKalmanNorm2d in training with a prior, channels-last with ghost groups: the C++ node in mode "auto",
    the Python Function in mode "step"; same output either way (the same C step)."""
    torch.manual_seed(0)
    layer = BatchKalmanNorm2d(8, prior_weight=0.9, group_size=2)
    x = torch.randn(4, 8, 6, 6).contiguous(memory_format=CL).requires_grad_()
    prior = (torch.zeros(2, 8), torch.ones(2, 8))
    y = layer(x, prior=prior)
    assert _ran_c_step(y, c_step) and not _ran_c_step(y, "step" if c_step == "auto" else "auto")
    set_cpu_finalize("torch")
    try:
        other = BatchKalmanNorm2d(8, prior_weight=0.9, group_size=2)(x, prior=prior)
    finally:
        set_cpu_finalize(c_step)
    torch.testing.assert_close(y, other, rtol=1e-5, atol=1e-5)


def test_the_operator_library_is_verified_like_the_ctypes_one(c_step):
    """The operator was built through the same trust rules: its file matches the hash recorded next to it."""
    if c_step != "auto":
        assert cfinalize.load_op() is None and cfinalize.op_library() is None  # it only loads in mode "auto"
        return
    library = cfinalize.op_library()
    assert library is not None and library.name.startswith("bkn_op-")
    cfinalize._verify(library)  # raises UntrustedCache otherwise
    runtime = cfinalize._openmp_runtime()
    if runtime is not None and shutil.which("ldd"):  # linked against torch's libgomp: one runtime for torch and it
        assert cfinalize.cpu_step() == "cpp-op-openmp"
        needed = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
        gomp = [line.split("=>")[-1].split("(")[0].strip() for line in needed.splitlines() if "libgomp" in line]
        assert [os.path.realpath(p) for p in gomp] == [os.path.realpath(runtime)], needed


def test_the_layer_routes_the_same_cases_to_the_c_step_in_either_mode(c_step, monkeypatch):
    """NCHW, channels-last and ghost groups run the C step (the operator in mode "auto", a Python Function in mode
    "step"); what the hot path declines (too small, a (1, C) prior, no prior, mixed dtypes) still goes to the general
    Function."""
    monkeypatch.setattr(torch_backend, "_GROUP_NORM_MIN_NUMEL", 1 << 15)  # the library's threshold
    bkn = BatchKalmanNorm2d(8)
    x = torch.randn(4, 8, 48, 48, requires_grad=True)
    pm, pv = torch.zeros(8), torch.ones(8)
    assert _ran_c_step(bkn(x, prior=(pm, pv)), c_step)
    assert _ran_c_step(bkn(x.contiguous(memory_format=CL), prior=(pm, pv)), c_step)
    assert _ran_c_step(BatchKalmanNorm2d(8, group_size=2)(x, prior=(pm, pv)), c_step)
    general = "_BatchKalmanNormFnBackward"
    assert type(bkn(x[:, :, :8, :8], prior=(pm, pv)).grad_fn).__name__ == general  # too small
    assert type(bkn(x, prior=(pm[None], pv[None])).grad_fn).__name__ == general  # (1, C) prior
    assert type(bkn(x).grad_fn).__name__ == general  # no prior
    assert type(bkn.double()(x, prior=(pm.double(), pv.double())).grad_fn).__name__ == general  # dtypes differ


@pytest.mark.parametrize("bad,match", [
    ("prior_shape", "prior must be"), ("weight_dtype", "weight and bias"), ("groups", "groups must divide"),
    ("layout", "contiguous"), ("one_running_buffer", "both running buffers"),
])
def test_a_direct_operator_call_with_mismatched_inputs_is_refused(c_step, bad, match):
    """A direct torch.ops call is checked before the C step reads raw memory; what does not fit is a
    NotImplementedError, which hot_train turns into the general path."""
    if c_step != "auto":
        assert cfinalize.load_op() is None
        return
    x, w, b, pm, pv = [t.detach() for t in _inputs((4, 6, 5, 5), "cl", 2, "gc", dtype=torch.float32)]
    rm, rv, groups = torch.zeros(6), torch.ones(6), 2
    if bad == "prior_shape":
        pm, pv = pm[:, :5].contiguous(), pv[:, :5].contiguous()
    elif bad == "weight_dtype":
        w = w.double()
    elif bad == "groups":
        groups = 3
    elif bad == "layout":
        x = x.permute(0, 2, 1, 3)
    else:
        rv = None
    with pytest.raises(NotImplementedError, match=match):
        cfinalize.load_op()(x, w, b, pm, pv, 0.9, 1e-5, 100.0, True, groups, rm, rv, 0.1)
    assert hot_train(x, rm, rv, w, b, (pm, pv), 0.9, 0.1, 1e-5, 100.0, 4 // groups) is None
