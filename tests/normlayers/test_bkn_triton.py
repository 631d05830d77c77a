"""Triton BKN kernels vs the plain-torch spec (normlayers.reference), run by Triton's CPU interpreter.

Tolerance per dtype (flash-attention's rule): the kernel's error against the float64 reference must
be at most 2x the error of the same reference computed by torch in that dtype, plus a small floor.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process's kernels

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the fused BKN kernels cannot be tested")

from normlayers.ops import triton_backend  # noqa: E402
from normlayers.ops.triton_backend import KernelConfig, batch_kalman_norm_triton  # noqa: E402
from normlayers.ops.triton_interpret_compat import patch_interpreter  # noqa: E402
from normlayers.reference import (  # noqa: E402
    batch_kalman_norm_reference,
    elements_per_group,
    update_running_stats_reference,
)

patch_interpreter()

from _guard_cases import FIRED, GROUP_SIZE, GUARD_RATIO, P, hand_built, numpy_forward  # noqa: E402

# Force the split path: 16-element tiles, 32-element chunks (two tiles merged per chunk).
SPLIT = KernelConfig(chunk=32, tile_fwd=16, tile_bwd=16)
SINGLE = KernelConfig()
FLOOR = {torch.float32: 5e-7, torch.float16: 2e-4, torch.bfloat16: 2e-3}
NAMES = ("y", "post_mean", "post_var", "running_mean", "running_var",
         "dx", "dweight", "dbias", "dprior_mean", "dprior_var")


def _inputs(shape, prior_kind, group_size, seed):
    """Float64 leaves + upstream gradients; the prior is (C,), (G, C) or absent."""
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[:2]
    groups = 1 if group_size is None else n // group_size
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5 + 0.3
    pshape = {"shared": (c,), "group": (groups, c)}.get(prior_kind)
    leaves = {
        "x": x,
        "weight": torch.randn(c, generator=gen, dtype=torch.float64),
        "bias": torch.randn(c, generator=gen, dtype=torch.float64),
        "prior_mean": None if pshape is None else torch.randn(pshape, generator=gen, dtype=torch.float64),
        "prior_var": None if pshape is None else torch.rand(pshape, generator=gen, dtype=torch.float64) + 0.5,
        "running_mean": torch.randn(c, generator=gen, dtype=torch.float64),
        "running_var": torch.rand(c, generator=gen, dtype=torch.float64) + 0.5,
    }
    upstream = {
        "y": torch.randn(shape, generator=gen, dtype=torch.float64),
        "post_mean": torch.randn(groups, c, generator=gen, dtype=torch.float64),
        "post_var": torch.randn(groups, c, generator=gen, dtype=torch.float64),
    }
    return leaves, upstream


def _run(impl, leaves, upstream, *, dtype, channels_last, p, group_size, config=SINGLE, guard_ratio=100.0,
         guard_scope="layer"):
    """Forward + backward through ``impl`` ("triton" or "torch"); x in ``dtype``, parameters in fp32/fp64."""
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = leaves["x"].detach().to(dtype, copy=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = {k: (None if leaves[k] is None else leaves[k].detach().to(pdt, copy=True).requires_grad_())
              for k in ("weight", "bias", "prior_mean", "prior_var")}
    rm, rv = (leaves[k].to(pdt, copy=True) for k in ("running_mean", "running_var"))
    prior = None if params["prior_mean"] is None else (params["prior_mean"], params["prior_var"])
    if impl == "triton":
        y, pm, pv = batch_kalman_norm_triton(
            x, rm, rv, params["weight"], params["bias"], prior=prior, prior_weight=p, training=True,
            guard_ratio=guard_ratio, group_size=group_size, config=config, guard_scope=guard_scope,
        )
        if channels_last:
            assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        y, pm, pv = batch_kalman_norm_reference(
            x, params["weight"], params["bias"], params["prior_mean"], params["prior_var"], p,
            guard_ratio=guard_ratio, group_size=group_size, guard_scope=guard_scope,
        )
        update_running_stats_reference(rm, rv, pm, pv, 0.1, elements_per_group(x, group_size))
    loss = (y.double() * upstream["y"]).sum() + (pm.double() * upstream["post_mean"]).sum()
    loss = loss + (pv.double() * upstream["post_var"]).sum()
    loss.backward()
    grads = [None if params[k] is None else params[k].grad for k in ("weight", "bias", "prior_mean", "prior_var")]
    out = [y, pm, pv, rm, rv, x.grad, *grads]
    return [None if t is None else t.detach().double() for t in out]


def _assert_within_torch_error(kern, low, ref, dtype, label):
    for name, k, lo, r in zip(NAMES, kern, low, ref):
        if r is None:
            assert k is None or bool((k == 0).all()), f"{label}: {name} should be absent/zero"
            continue
        err_k = (k - r).abs().max().item()
        err_t = (lo - r).abs().max().item()
        scale = max(1.0, r.abs().max().item())
        bound = 2 * err_t + FLOOR[dtype] * scale
        assert err_k <= bound, f"{label}: {name} kernel err {err_k:.3g} > 2*torch err {err_t:.3g} + floor"


# (shape, channels_last, dtype, prior, group_size, path, prior_weight): every N, C, H, W value of the
# brief (N 1/2/3, C 1/3/8, H, W 1/5/8), both layouts, three dtypes, both paths, shared/per-group priors.
CASES = [
    ((2, 3, 5, 5), False, torch.float32, "shared", None, "single", 0.3),
    ((2, 3, 5, 5), True, torch.float32, "shared", None, "split", 0.3),
    ((3, 8, 5, 8), False, torch.float16, "group", None, "single", 0.5),
    ((3, 8, 8, 5), True, torch.bfloat16, "shared", None, "split", 0.5),
    ((1, 1, 8, 8), False, torch.float32, None, None, "split", 0.0),
    ((1, 3, 5, 1), True, torch.float16, "shared", None, "single", 0.9),
    ((2, 1, 1, 5), False, torch.bfloat16, "group", 1, "split", 0.9),
    ((2, 8, 1, 1), True, torch.float16, "shared", None, "single", 0.9),
    ((3, 3, 1, 8), False, torch.float16, None, None, "split", 0.0),
    ((2, 8, 5, 5), True, torch.float32, "group", 1, "split", 0.5),
    ((3, 1, 5, 5), True, torch.float32, "group", 1, "single", 0.05),
    ((2, 3, 8, 8), False, torch.bfloat16, "group", 1, "single", 0.9),
    ((1, 8, 5, 5), True, torch.bfloat16, None, None, "single", 0.0),
    ((3, 8, 8, 8), True, torch.float32, "shared", 3, "split", 0.3),
    ((2, 3, 8, 1), True, torch.float16, "shared", 2, "split", 0.7),
    ((3, 3, 5, 5), False, torch.float32, "shared", 1, "single", 1.0),
]


@pytest.mark.parametrize("shape,channels_last,dtype,prior,group_size,path,p", CASES)
def test_parity_with_reference(shape, channels_last, dtype, prior, group_size, path, p):
    leaves, upstream = _inputs(shape, prior, group_size, seed=sum(shape) + int(10 * p))
    leaves["x"] = leaves["x"].to(dtype).double()  # both runs see the same rounded input
    common = dict(channels_last=channels_last, p=p, group_size=group_size)
    ref = _run("torch", leaves, upstream, dtype=torch.float64, **common)
    low = _run("torch", leaves, upstream, dtype=dtype, **common)
    kern = _run("triton", leaves, upstream, dtype=dtype, config=SPLIT if path == "split" else SINGLE, **common)
    _assert_within_torch_error(kern, low, ref, dtype, f"{shape} {dtype} {path}")


@pytest.mark.parametrize("path", ["single", "split"])
def test_guard_fires_per_group(path):
    """guard_scope="group": group 0's prior variance is 1e4 x its batch variance: it falls back to BN; group 1
    mixes."""
    leaves, upstream = _inputs((4, 3, 5, 5), "group", 2, seed=7)
    leaves["prior_var"][0] = 1e4
    common = dict(channels_last=False, p=0.5, group_size=2, guard_scope="group")
    ref = _run("torch", leaves, upstream, dtype=torch.float64, **common)
    low = _run("torch", leaves, upstream, dtype=torch.float32, **common)
    kern = _run("triton", leaves, upstream, dtype=torch.float32, config=SPLIT if path == "split" else SINGLE,
                **common)
    _assert_within_torch_error(kern, low, ref, torch.float32, f"guard {path}")
    xs = leaves["x"][:2].transpose(0, 1).reshape(3, -1)  # (2, C, H, W) -> (C, 2*H*W): group 0's slice
    torch.testing.assert_close(kern[1][0], xs.mean(dim=1), rtol=0, atol=1e-6)  # posterior = batch mean
    torch.testing.assert_close(kern[2][0], xs.var(dim=1, unbiased=False), rtol=0, atol=1e-5)
    assert bool((kern[8][0] == 0).all()) and bool((kern[9][0] == 0).all())  # no gradient to its prior
    assert bool((kern[8][1] != 0).all())  # group 1 used its prior


@pytest.mark.parametrize("channels_last,path", [(False, "single"), (True, "split")])
@pytest.mark.parametrize("scope", ["layer", "group"])
@pytest.mark.parametrize("case", ["layer_fires", "layer_mixes"])
def test_guard_scope_on_groups_that_disagree(case, scope, channels_last, path):
    """The hand-built case of _guard_cases.py: the kernels follow the reference in both scopes, and their
    posteriors and prior gradients show each scope's decisions (the independent numpy forward's)."""
    x, w, b, pm, pv = hand_built(case, "gc")
    c = x.shape[1]
    leaves = {"x": x, "weight": w, "bias": b, "prior_mean": pm, "prior_var": pv,
              "running_mean": torch.zeros(c, dtype=torch.float64), "running_var": torch.ones(c, dtype=torch.float64)}
    _, upstream = _inputs(tuple(x.shape), "group", GROUP_SIZE, seed=23)
    common = dict(channels_last=channels_last, p=P, group_size=GROUP_SIZE, guard_ratio=GUARD_RATIO,
                  guard_scope=scope)
    ref = _run("torch", leaves, upstream, dtype=torch.float64, **common)
    low = _run("torch", leaves, upstream, dtype=torch.float32, **common)
    kern = _run("triton", leaves, upstream, dtype=torch.float32, config=SPLIT if path == "split" else SINGLE,
                **common)
    _assert_within_torch_error(kern, low, ref, torch.float32, f"{case} {scope} {path}")
    _, m_np, v_np, fired, _ = numpy_forward(x, w, b, pm, pv, scope)
    assert tuple(fired) == FIRED[case, scope]
    torch.testing.assert_close(kern[1], torch.from_numpy(m_np), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kern[2], torch.from_numpy(v_np), rtol=1e-5, atol=1e-5)
    for k, f in enumerate(fired):  # a fired group's prior gets no gradient
        assert bool((kern[8][k] == 0).all()) == bool(f) and bool((kern[9][k] == 0).all()) == bool(f)


def test_disabled_guard_keeps_the_mixture():
    """guard_ratio=inf: the same 1e4 prior variance is mixed in (no fallback) and gets a gradient."""
    leaves, upstream = _inputs((4, 3, 5, 5), "group", 2, seed=7)
    leaves["prior_var"][0] = 1e4
    common = dict(channels_last=True, p=0.5, group_size=2, guard_ratio=float("inf"))
    ref = _run("torch", leaves, upstream, dtype=torch.float64, **common)
    low = _run("torch", leaves, upstream, dtype=torch.float32, **common)
    kern = _run("triton", leaves, upstream, dtype=torch.float32, **common)
    _assert_within_torch_error(kern, low, ref, torch.float32, "guard disabled")
    assert kern[2][0].min().item() > 1e3  # posterior variance carries the prior's 0.5 * 1e4
    assert bool((kern[9][0] != 0).all())


@pytest.mark.parametrize("channels_last,path", [(False, "single"), (True, "split")])
def test_no_prior_is_batch_norm(channels_last, path):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 8, 5, 5, generator=gen)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(8, generator=gen), torch.randn(8, generator=gen)
    gy = torch.randn(3, 8, 5, 5, generator=gen)
    outs = []
    for use_triton in (True, False):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        rm, rv = torch.zeros(8), torch.ones(8)
        if use_triton:
            y = batch_kalman_norm_triton(xx, rm, rv, ww, bb, momentum=0.2,
                                         config=SPLIT if path == "split" else SINGLE)[0]
        else:
            y = F.batch_norm(xx, rm, rv, ww, bb, training=True, momentum=0.2, eps=1e-5)
        (y * gy).sum().backward()
        outs.append([y.detach(), rm, rv, xx.grad, ww.grad, bb.grad])
    for name, a, r in zip(("y", "running_mean", "running_var", "dx", "dweight", "dbias"), *outs):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False)])
def test_eval_mode_is_batch_norm_with_running_stats(dtype, channels_last):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 8, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, generator=gen), torch.randn(3, generator=gen)
    rm, rv = torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    gy = torch.randn(2, 3, 5, 8, generator=gen)
    outs = []
    for use_triton in (True, False):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        if use_triton:
            y, pm, pv = batch_kalman_norm_triton(xx, rm, rv, ww, bb, training=False)
            assert pm is None and pv is None
        else:
            y = F.batch_norm(xx.float(), rm, rv, ww, bb, training=False, eps=1e-5).to(dtype)
        (y.float() * gy).sum().backward()
        outs.append([y.detach().float(), xx.grad.float(), ww.grad, bb.grad])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, r in zip(("y", "dx", "dweight", "dbias"), *outs):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol, msg=name)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)


def test_only_posterior_gradients():
    """y unused (dy is None in the kernels): gradients come from the posterior outputs alone."""
    leaves, _ = _inputs((2, 3, 5, 5), "shared", None, seed=11)
    grads = []
    for impl in ("triton", "torch"):
        x, pm_, pv_ = (leaves[k].float().requires_grad_() for k in ("x", "prior_mean", "prior_var"))
        if impl == "triton":
            _, pm, pv = batch_kalman_norm_triton(x, None, None, prior=(pm_, pv_), prior_weight=0.4)
        else:
            _, pm, pv = batch_kalman_norm_reference(x, None, None, pm_, pv_, 0.4)
        (pm.sum() + (pv * pv).sum()).backward()
        grads.append([x.grad, pm_.grad, pv_.grad])
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_single_and_split_paths_agree():
    leaves, upstream = _inputs((2, 8, 8, 8), "group", 1, seed=13)
    common = dict(dtype=torch.float32, channels_last=True, p=0.5, group_size=1)
    single = _run("triton", leaves, upstream, config=SINGLE, **common)
    split = _run("triton", leaves, upstream, config=SPLIT, **common)
    for name, a, b in zip(NAMES, single, split):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, msg=name)


@pytest.mark.parametrize("config", [SINGLE, SPLIT], ids=["single", "split"])
def test_two_runs_are_bitwise_identical(config):
    leaves, upstream = _inputs((3, 8, 5, 8), "group", 1, seed=17)
    common = dict(dtype=torch.float16, channels_last=False, p=0.3, group_size=1, config=config)
    first = _run("triton", leaves, upstream, **common)
    second = _run("triton", leaves, upstream, **common)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


def test_functional_backend_dispatch():
    from normlayers.functional import batch_kalman_norm

    leaves, _ = _inputs((2, 3, 5, 5), "shared", None, seed=19)
    x = leaves["x"].float()
    prior = (leaves["prior_mean"].float(), leaves["prior_var"].float())
    y, pm, pv = batch_kalman_norm(x, None, None, prior=prior, prior_weight=0.3, backend="triton")
    y_r, pm_r, pv_r = batch_kalman_norm_reference(x, None, None, *prior, 0.3)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack([pm, pv]), torch.stack([pm_r, pv_r]), rtol=1e-5, atol=1e-6)


def test_bad_inputs_are_rejected(monkeypatch):
    x = torch.randn(4, 3, 5, 5)
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        batch_kalman_norm_triton(x.double(), rm, rv)
    with pytest.raises(ValueError, match="contiguous \\(NCHW\\) or channels_last"):
        batch_kalman_norm_triton(x.transpose(2, 3), rm, rv)
    with pytest.raises(ValueError, match="group_size=3 must be a positive divisor"):
        batch_kalman_norm_triton(x, rm, rv, group_size=3)
    with pytest.raises(ValueError, match="weight has shape \\(4,\\)"):
        batch_kalman_norm_triton(x, rm, rv, torch.ones(4))
    with pytest.raises(ValueError, match="prior mean has shape \\(2, 3\\)"):
        batch_kalman_norm_triton(x, rm, rv, prior=(torch.zeros(2, 3), torch.ones(2, 3)), prior_weight=0.5)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_kalman_norm_triton(torch.randn(1, 3, 1, 1), rm, rv)
    with pytest.raises(ValueError, match="prior_weight must lie in \\[0, 1\\]"):
        batch_kalman_norm_triton(x, rm, rv, prior=(torch.zeros(3), torch.ones(3)), prior_weight=1.5)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="need a CUDA tensor"):
        batch_kalman_norm_triton(x, rm, rv)


def test_module_imports_without_triton(monkeypatch):
    """A fresh copy of triton_backend loads with triton unimportable; using it raises a clear ImportError."""
    monkeypatch.setitem(sys.modules, "triton", None)
    spec = importlib.util.spec_from_file_location("_triton_backend_copy", triton_backend.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    assert module.is_available() is False
    with pytest.raises(ImportError, match="needs the 'triton' package"):
        module.batch_kalman_norm_triton(torch.randn(2, 3, 4, 4), None, None)


_COMPILE_ALL = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from normlayers.ops import triton_kernels as kernels

floats = {"p", "q", "pq", "eps", "momentum", "momentum_var", "guard_ratio"}
ints = {"C", "L", "S", "G", "M", "CHUNK"}
pointer_types = {"X": "*bf16", "Y": "*bf16", "DY": "*bf16", "DX": "*bf16", "FIRE": "*i32", "RV": "*fp16"}
flags = dict(HAS_W=True, HAS_B=True, USE_PRIOR=True, UPDATE_RUNNING=True, GUARD=True, HAS_DY=True,
             HAS_DPOST=True, STATS_FROM_X=True, STAT2_IS_VAR=False, ONLY_FIRED=True,
             BLOCK_C=4, BLOCK_M=256, BLOCK_S=64, BLOCK_G=16, L=25)
names = sorted(n for n in dir(kernels) if n.endswith("_kernel"))
for name in names:
    fn = getattr(kernels, name)
    is_constexpr = {param.name: param.is_constexpr for param in fn.params}
    for layer_guard in ((True, False) if "LAYER_GUARD" in fn.arg_names else (None,)):  # both guard scopes
        consts = {a: flags[a] for a in fn.arg_names if a in flags and is_constexpr[a]}
        if layer_guard is not None:
            consts["LAYER_GUARD"] = layer_guard
        signature = {
            a: "constexpr" if a in consts else "fp32" if a in floats else
            pointer_types.get(a, "*fp32") if a.isupper() and a not in ints else "i32"
            for a in fn.arg_names
        }
        src = ASTSource(fn=fn, signature=signature,
                        constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()})
        assert triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"], name
print("compiled", len(names))
"""


def test_kernels_compile_for_a_gpu_target(tmp_path):
    """The interpreter skips type checks: compile every kernel to sm_90 PTX (no GPU needed, ptxas is bundled).

    Runs in a subprocess because this process's triton is in interpreter mode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE_ALL], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiled 9" in proc.stdout
