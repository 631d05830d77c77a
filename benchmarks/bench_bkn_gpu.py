"""GPU benchmark of the fused Triton BKN kernels: parity at real shapes, then timings vs cuDNN BN.

``python -m benchmarks bkn_gpu`` on a CUDA machine:

1. parity: kernel vs the float64 reference at real shapes (fp32 and bf16, with/without groups and
   channels-last, one case where the guard fires), within 2x torch's own error in that dtype plus a
   small floor (the rule of tests/normlayers/test_bkn_triton.py), and bitwise determinism of two runs;
2. timings (p20/p50/p80 ms, ``harness.time_fn``) of fwd / bwd / fwd+bwd for ``triton`` (BKN with a
   prior), ``triton_bn`` (the same kernels, no prior), ``cudnn`` (nn.BatchNorm2d), ``reference``
   (normlayers.reference in eager torch) and ``compiled`` (torch.compile of the reference), on CIFAR
   ResNet, ConvLSTM gate and >= 32 MiB shapes. Achieved GB/s = minimum bytes / time with the byte
   model of the kernel path used (fwd 2 or 3 tensor passes, bwd 3 or 5: 8/12 and 12/20 B/elem in
   fp32), the copy bandwidth of the same tensor measured in the same run, ratios vs cuDNN, and
   PASS/FAIL for the targets (triton <= 1.2x cuDNN time; >= 70% of copy bandwidth from 32 MiB up).

Without CUDA it prints "no CUDA device: GPU benchmark skipped" and exits 0; ``--interpret-smoke``
then runs one tiny shape through Triton's CPU interpreter to prove the script's plumbing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from benchmarks.harness import check_at_least, parse_bench, report, time_fn

# (name, shape, dtype): CIFAR ResNet stages, micro-batch, ConvLSTM gates (TaxiBJ), large tensors.
SHAPES: list[tuple[str, tuple[int, int, int, int], torch.dtype]] = [
    ("cifar_s1", (128, 16, 32, 32), torch.float32),
    ("cifar_s2", (128, 32, 16, 16), torch.float32),
    ("cifar_s3", (128, 64, 8, 8), torch.float32),
    ("cifar_micro", (2, 16, 32, 32), torch.float32),
    ("convlstm_taxibj", (64, 64, 32, 32), torch.float32),
    ("convlstm_small", (64, 64, 16, 8), torch.float32),
    ("large", (256, 64, 56, 56), torch.float32),
    ("cifar_s1_bf16", (128, 16, 32, 32), torch.bfloat16),
    ("large_bf16", (256, 64, 56, 56), torch.bfloat16),
]
FLOOR = {torch.float32: 5e-7, torch.float16: 2e-4, torch.bfloat16: 2e-3}
MODES = ("fwd", "bwd", "full")


@dataclass(frozen=True)
class ParityCase:
    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    prior: str  # "none" | "shared" | "group" | "guard" (group prior, group 0's ratio forced far above the threshold)
    group_size: int | None
    prior_weight: float
    channels_last: bool = False
    guard_scope: str = "layer"  # "layer": the guard case falls back in every group; "group": in group 0 only


PARITY = [
    ParityCase((128, 16, 32, 32), torch.float32, "shared", None, 0.05),
    ParityCase((128, 16, 32, 32), torch.bfloat16, "shared", None, 0.05, channels_last=True),
    ParityCase((2, 16, 32, 32), torch.float32, "shared", None, 0.9),
    ParityCase((64, 64, 32, 32), torch.float32, "group", 2, 0.9),
    ParityCase((64, 64, 16, 8), torch.bfloat16, "group", 2, 0.9, channels_last=True),
    ParityCase((128, 64, 8, 8), torch.float32, "none", None, 0.0, channels_last=True),
    ParityCase((32, 32, 16, 16), torch.float32, "guard", 4, 0.5),
    ParityCase((32, 32, 16, 16), torch.float32, "guard", 4, 0.5, guard_scope="group"),
]


def _forward_backward(impl: str, case: ParityCase, data: dict, dtype: torch.dtype) -> list[torch.Tensor | None]:
    """Outputs and gradients (float64) of one training step through ``impl`` ("triton" / "torch")."""
    from normlayers.ops.triton_backend import batch_kalman_norm_triton
    from normlayers.reference import batch_kalman_norm_reference, elements_per_group, update_running_stats_reference

    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = data["x"].detach().to(dtype, copy=True)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    params = {k: None if data[k] is None else data[k].detach().to(pdt, copy=True).requires_grad_()
              for k in ("weight", "bias", "prior_mean", "prior_var")}
    rm, rv = (data[k].to(pdt, copy=True) for k in ("running_mean", "running_var"))
    prior = None if params["prior_mean"] is None else (params["prior_mean"], params["prior_var"])
    if impl == "triton":
        y, pm, pv = batch_kalman_norm_triton(x, rm, rv, params["weight"], params["bias"], prior=prior,
                                             prior_weight=case.prior_weight, group_size=case.group_size,
                                             guard_scope=case.guard_scope)
    else:
        y, pm, pv = batch_kalman_norm_reference(x, params["weight"], params["bias"], params["prior_mean"],
                                                params["prior_var"], case.prior_weight, group_size=case.group_size,
                                                guard_scope=case.guard_scope)
        update_running_stats_reference(rm, rv, pm, pv, 0.1, elements_per_group(x, case.group_size))
    loss = (y.double() * data["gy"]).sum() + (pm.double() * data["gm"]).sum() + (pv.double() * data["gv"]).sum()
    loss.backward()
    out = [y, pm, pv, rm, rv, x.grad] + [None if params[k] is None else params[k].grad
                                        for k in ("weight", "bias", "prior_mean", "prior_var")]
    return [None if t is None else t.detach().double() for t in out]


def _parity_data(case: ParityCase, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    n, c = case.shape[:2]
    groups = 1 if case.group_size is None else n // case.group_size
    f64 = dict(device=device, dtype=torch.float64, generator=gen)
    pshape = {"shared": (c,), "group": (groups, c), "guard": (groups, c)}.get(case.prior)
    data = {
        "x": (torch.randn(case.shape, **f64) * 1.5 + 0.3).to(case.dtype).double(),  # same rounded input for all
        "weight": torch.randn(c, **f64), "bias": torch.randn(c, **f64),
        "prior_mean": None if pshape is None else torch.randn(pshape, **f64),
        "prior_var": None if pshape is None else torch.rand(pshape, **f64) + 0.5,
        "running_mean": torch.randn(c, **f64), "running_var": torch.rand(c, **f64) + 0.5,
        "gy": torch.randn(case.shape, **f64), "gm": torch.randn(groups, c, **f64), "gv": torch.randn(groups, c, **f64),
    }
    if case.prior == "guard":
        data["prior_var"][0] = 1e4
    return data


def run_parity(device: torch.device) -> list[dict]:
    names = ("y", "post_mean", "post_var", "running_mean", "running_var",
             "dx", "dweight", "dbias", "dprior_mean", "dprior_var")
    rows = []
    for case in PARITY:
        data = _parity_data(case, device)
        ref = _forward_backward("torch", case, data, torch.float64)
        low = _forward_backward("torch", case, data, case.dtype)
        kern = _forward_backward("triton", case, data, case.dtype)
        again = _forward_backward("triton", case, data, case.dtype)
        worst, worst_name, ok = 0.0, "", True
        for name, k, lo, r in zip(names, kern, low, ref):
            if r is None:
                continue
            err_k = (k - r).abs().max().item()
            bound = 2 * (lo - r).abs().max().item() + FLOOR[case.dtype] * max(1.0, r.abs().max().item())
            ok &= err_k <= bound
            if err_k / bound > worst:
                worst, worst_name = err_k / bound, name
        deterministic = all(a is None or torch.equal(a, b) for a, b in zip(kern, again))
        rows.append({
            "shape": "x".join(map(str, case.shape)), "dtype": str(case.dtype).replace("torch.", ""),
            "prior": case.prior if case.prior != "guard" else f"guard ({case.guard_scope})",
            "group_size": case.group_size, "channels_last": case.channels_last,
            "worst_err_over_bound": worst, "worst_output": worst_name, "deterministic": deterministic,
            "result": "PASS" if ok and deterministic else "FAIL",
        })
        print(f"parity {rows[-1]}", flush=True)
    return rows


def _bytes_model(shape: tuple[int, ...], dtype: torch.dtype, group_size: int | None) -> dict:
    """Minimum bytes of the kernel path chosen for this shape (tensor passes x element size)."""
    from normlayers.ops import triton_backend as bt

    x = torch.empty(shape, dtype=dtype, device="meta")
    geo = bt._geometry(x, group_size)
    cfg = bt.KernelConfig()
    fwd = bt._plan(geo, cfg.single_pass_max_fwd, cfg.tile_fwd, cfg, torch.device("cuda"))
    bwd = bt._plan(geo, cfg.single_pass_max_bwd, cfg.tile_bwd, cfg, torch.device("cuda"))
    nbytes = x.numel() * x.element_size()
    fwd_passes, bwd_passes = (2 if fwd.single else 3), (3 if bwd.single else 5)
    return {
        "path": f"fwd:{'single' if fwd.single else 'split'}/bwd:{'single' if bwd.single else 'split'}",
        "fwd": fwd_passes * nbytes, "bwd": bwd_passes * nbytes, "full": (fwd_passes + bwd_passes) * nbytes,
        "tensor_bytes": nbytes,
    }


def _providers(shape, dtype, device, use_compile: bool) -> dict[str, Callable[[torch.Tensor], tuple]]:
    """Each provider maps x to the tensors a loss is taken of (y first); parameters live in the closure."""
    from normlayers.ops.triton_backend import batch_kalman_norm_triton
    from normlayers.reference import batch_kalman_norm_reference, elements_per_group, update_running_stats_reference

    n, c = shape[:2]
    p = 0.9 if n <= 8 else 0.05  # the reference's prior weights: micro-batch 2 vs batch 128
    weight = torch.ones(c, device=device, requires_grad=True)
    bias = torch.zeros(c, device=device, requires_grad=True)
    prior = (torch.zeros(c, device=device, requires_grad=True), torch.ones(c, device=device, requires_grad=True))
    rm, rv = torch.zeros(c, device=device), torch.ones(c, device=device)
    bn = torch.nn.BatchNorm2d(c).to(device=device)  # fp32 parameters, also for bf16 input (autocast layout)

    def reference(x):
        y, pm, pv = batch_kalman_norm_reference(x, weight, bias, prior[0], prior[1], p)
        update_running_stats_reference(rm, rv, pm, pv, 0.1, elements_per_group(x, None))
        return y, pm, pv

    providers: dict[str, Callable] = {
        "triton": lambda x: batch_kalman_norm_triton(x, rm, rv, weight, bias, prior=prior, prior_weight=p),
        "triton_bn": lambda x: batch_kalman_norm_triton(x, rm, rv, weight, bias)[:1],
        "cudnn": lambda x: (bn(x),),
        "reference": reference,
    }
    if use_compile and dtype == torch.float32:  # fp32 only: each dtype / prior weight is a recompile
        compiled = torch.compile(batch_kalman_norm_reference, dynamic=True)

        def compiled_ref(x):
            y, pm, pv = compiled(x, weight, bias, prior[0], prior[1], p)
            update_running_stats_reference(rm, rv, pm, pv, 0.1, elements_per_group(x, None))
            return y, pm, pv

        providers["compiled"] = compiled_ref
    return providers


def _time_modes(fn: Callable, x: torch.Tensor, warmup: int, repeats: int) -> dict[str, dict]:
    """fwd under no_grad; bwd = backward of a retained graph; full = both. ``x.grad`` is reset each time
    so the timed backward writes dx instead of accumulating into it (an extra elementwise pass)."""
    gy = torch.randn_like(x)

    def fwd():
        with torch.no_grad():
            fn(x)

    def full():
        x.grad = None
        torch.autograd.backward(fn(x)[0], gy)

    out = fn(x)
    results = {"fwd": time_fn(fwd, warmup=warmup, repeats=repeats)}

    def bwd():
        x.grad = None
        torch.autograd.backward(out[0], gy, retain_graph=True)

    results["bwd"] = time_fn(bwd, warmup=warmup, repeats=repeats)
    results["full"] = time_fn(full, warmup=warmup, repeats=repeats)
    return results


def run_timings(device: torch.device, warmup: int, repeats: int, use_compile: bool, only: set[str]) -> list[dict]:
    rows = []
    for name, shape, dtype in SHAPES:
        if only and name not in only:
            continue
        x = torch.randn(shape, device=device, dtype=dtype).requires_grad_()
        model = _bytes_model(shape, dtype, None)
        copy = time_fn(lambda x=x: torch.empty_like(x).copy_(x), warmup=warmup, repeats=repeats)
        copy_gbs = 2 * model["tensor_bytes"] / (copy["p50_ms"] * 1e6)
        per_provider = {}
        for provider, fn in _providers(shape, dtype, device, use_compile).items():
            # compiled backward graphs donate buffers unless told not to; bwd timing retains the graph
            with torch._functorch.config.patch(donated_buffer=provider != "compiled"):
                per_provider[provider] = _time_modes(fn, x, warmup, repeats)
        for mode in MODES:
            cudnn_ms = per_provider["cudnn"][mode]["p50_ms"]
            for provider, timings in per_provider.items():
                t = timings[mode]
                gbs = model[mode] / (t["p50_ms"] * 1e6)
                row = {
                    "shape": "x".join(map(str, shape)), "dtype": str(dtype).replace("torch.", ""),
                    "mode": mode, "provider": provider, "path": model["path"],
                    "p20_ms": t["p20_ms"], "p50_ms": t["p50_ms"], "p80_ms": t["p80_ms"],
                    "gb_s": gbs, "copy_gb_s": copy_gbs, "vs_cudnn": t["p50_ms"] / cudnn_ms, "target": "",
                }
                if provider == "triton":
                    ok = row["vs_cudnn"] <= 1.2
                    if model["tensor_bytes"] >= 32 * 2**20:
                        ok &= gbs >= 0.7 * copy_gbs
                    row["target"] = "PASS" if ok else "FAIL"
                rows.append(row)
        print(f"timed {name}", flush=True)
        del x
        torch.cuda.empty_cache()
    return rows


def interpret_smoke() -> int:
    """One tiny shape through the CPU interpreter: the script's plumbing without a GPU."""
    if "normlayers.ops.triton_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        print("kernels were already imported without TRITON_INTERPRET=1; rerun in a fresh process")
        return 1
    os.environ["TRITON_INTERPRET"] = "1"
    from normlayers.ops.triton_interpret_compat import patch_interpreter

    patch_interpreter()
    case = ParityCase((2, 3, 5, 5), torch.float32, "shared", None, 0.5, channels_last=True)
    data = _parity_data(case, torch.device("cpu"))
    ref = _forward_backward("torch", case, data, torch.float64)
    kern = _forward_backward("triton", case, data, case.dtype)
    err = max((k - r).abs().max().item() for k, r in zip(kern, ref) if r is not None)
    ok = err < 1e-5
    print(f"interpret smoke (2,3,5,5) channels_last fp32: max abs err vs float64 reference {err:.2e}: "
          f"{'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


@dataclass(frozen=True)
class Options:
    """``python -m benchmarks bkn_gpu`` options."""

    warmup: int = 5
    repeats: int = 20
    no_compile: bool = False  # skip the torch.compile provider
    no_parity: bool = False  # skip the parity checks
    shapes: tuple[str, ...] = ()  # a subset of the SHAPES names (default: all)
    interpret_smoke: bool = False  # without CUDA: run one tiny shape through the Triton CPU interpreter

    def validate(self) -> None:
        check_at_least(self, warmup=0, repeats=1)
        unknown = sorted(set(self.shapes) - {s[0] for s in SHAPES})
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; choose from {[s[0] for s in SHAPES]}")


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_bench(Options, argv, prog="python -m benchmarks bkn_gpu", description=__doc__.splitlines()[0])
    if not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark skipped")
        return interpret_smoke() if args.interpret_smoke else 0
    from normlayers.ops.triton_backend import is_available

    if not is_available():
        print("triton is not importable: GPU benchmark skipped")
        return 0
    device = torch.device("cuda")
    parity_rows = [] if args.no_parity else run_parity(device)
    if parity_rows:
        report("bkn_gpu_parity", parity_rows,
               notes=["kernel error vs float64 reference <= 2x torch's error in that dtype + floor "
                      "(worst_err_over_bound <= 1 passes)"])
    rows = run_timings(device, args.warmup, args.repeats, not args.no_compile, set(args.shapes))
    report(
        "bkn_gpu", rows,
        notes=[
            "gb_s = minimum bytes of the Triton path / p50 time; fwd 2 passes single / 3 split, bwd 3 / 5, full = sum "
            "(fp32: 8/12 and 12/20 B per element); the same byte count is used for every provider of a shape",
            "copy_gb_s = 2 x tensor bytes / p50 of torch.empty_like(x).copy_(x), same run",
            "target (triton rows): p50 <= 1.2x cuDNN BatchNorm2d; and >= 70% of copy_gb_s for tensors >= 32 MiB",
            "triton = BKN with a (C,) prior (p=0.9 for N<=8, 0.05 otherwise); triton_bn = same kernels without prior",
        ],
    )
    return 0 if all(r["result"] == "PASS" for r in parity_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
