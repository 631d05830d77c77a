"""CPU training cost of Batch Kalman Normalization: forward + backward vs nn.BatchNorm2d (same run).

``python -m benchmarks bkn_cpu [--threads 1 2] [--ghost 0 2] [--repeats 100] [--no-reference] [--malloc both]``.
Every (shape, layout, ghost group size) is one interleaved loop: NCHW and channels-last, without ghost groups
(``ghost = 0``) and with ghost groups of ``--ghost`` samples (the BKN layers get ``group_size`` and a ``(G, C)``
prior, as a Kalman chain over ghost groups hands them; BatchNorm2d and GroupNorm are the same modules).
Rows: nn.BatchNorm2d (baseline), BKN fast path (``BatchKalmanNorm2d(backend="torch")`` with a prior, p=0.9, gradients to
the prior too; the posterior is not used downstream; the whole step in C, ``csrc/bkn_step.c``, inside a torch
operator with a C++ autograd node, ``csrc/bkn_op.cpp``, where it builds), the same C step called through ctypes from
a Python ``autograd.Function`` (``set_cpu_finalize("step")``, the design before the operator; left out where the fast
row runs it already), the same layer with only the per-channel C finalize between torch's x-sized kernels
(``set_cpu_finalize("finalize")``, the design before the C step; left out where the fast row runs it
already), the same layer with the torch-ops finalize instead of the C one
(``normlayers.set_cpu_finalize("torch")``; the row is left out where no C compiler is found and the
fast row already uses the torch ops), the fast layer with gradients
reaching its posterior as well (what a Kalman chain's backward does), the plain-torch reference
(autograd through ``batch_kalman_norm_reference``) and nn.GroupNorm(32); fp32, NCHW and channels-last. ``ratio_bn`` =
median / BatchNorm2d's median and ``ratio_p20`` = p20 / BatchNorm2d's p20, for the same shape, layout
and thread count; methods are timed round-robin (``--burst`` consecutive calls each per round, their
mean one sample) so a shared machine's load hits all of them alike while each is timed in its steady
state. Issue targets: BKN fast <= 1.5x BatchNorm2d (NCHW, 2 threads); "scale-out": <= 1.0x at both shapes, NCHW and
channels-last, with and without ghost groups of 2. ``cpu_ratio`` = the median of the process CPU time per call
(all threads) over BatchNorm2d's: less sensitive than wall time to other processes sharing the cores.
``ratio_first`` / ``ratio_warm``: the same ratio for the first call of each burst (caches as the previous method
left them, as for a layer between other layers) and for the burst's second half (warm).

``faults`` = minor page faults per call. With glibc's default heap trimming, freeing the x-sized
buffers of a step can hand the top of the heap back to the OS, and the next step faults it in
again (~0.2 ms per 50 faults at these sizes). Whether that happens depends on the exact sequence of
allocations, so it hits BKN (more small per-channel tensors between the large buffers) and not
BatchNorm. ``--malloc both`` (default) repeats every measurement in a child process with
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set (no trimming: what jemalloc/tcmalloc,
recommended by PyTorch's CPU tuning guide, also give) and reports both as the ``malloc`` column.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from benchmarks.harness import parse_bench, report, time_fn
from normlayers import BatchKalmanNorm2d, batch_kalman_norm_reference, cpu_finalize, set_cpu_finalize
from normlayers.ops.cfinalize import cpu_step

TORCH_FINALIZE = "BKN fast, torch-ops finalize"
PYTHON_STEP = "BKN fast, C step from Python"
C_FINALIZE = "BKN fast, C finalize only"
CHAINED = "BKN fast, posterior grads too"
SHAPES = ((8, 64, 32, 32), (2, 256, 16, 16))
NO_TRIM_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}


def _step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, extra: tuple[torch.Tensor, ...] = (),
          forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], None]:
    inputs = [x, *module.parameters(), *extra]
    run = forward or module

    def fn() -> None:
        y = run(x)
        torch.autograd.grad(y, inputs, grad)

    return fn


def _cases(shape: tuple[int, ...], channels_last: bool, reference: bool = True,
           ghost: int = 0) -> dict[str, Callable[[], None]]:
    gen = torch.Generator().manual_seed(0)
    c = shape[1]
    group_size = ghost if ghost else None
    groups = 1 if group_size is None else shape[0] // group_size
    stat_shape = (c,) if groups == 1 else (groups, c)  # the prior and the posterior: (C,), or (G, C) per ghost group
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=gen) * 1.5 + 0.3).to(memory_format=fmt).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(memory_format=fmt)
    prior = (torch.randn(stat_shape, generator=gen).requires_grad_(),
             (torch.rand(stat_shape, generator=gen) + 0.5).requires_grad_())

    bn = nn.BatchNorm2d(c)
    bkn = BatchKalmanNorm2d(c, prior_weight=0.9, group_size=group_size, backend="torch")
    gn = nn.GroupNorm(32, c)
    ref = BatchKalmanNorm2d(c, prior_weight=0.9, group_size=group_size)

    def reference_forward(inp: torch.Tensor) -> torch.Tensor:
        return batch_kalman_norm_reference(inp, ref.weight, ref.bias, prior[0], prior[1], 0.9,
                                           group_size=group_size)[0]

    def forward_in_mode(mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The fast layer with this call's CPU path set to ``mode`` (its backward follows the forward)."""

        def forward(inp: torch.Tensor) -> torch.Tensor:
            set_cpu_finalize(mode)
            try:
                return bkn(inp, prior=prior)
            finally:
                set_cpu_finalize("auto")

        return forward

    posterior_grads = (torch.randn(stat_shape, generator=gen), torch.randn(stat_shape, generator=gen))
    chain_inputs = [x, *bkn.parameters(), *prior]

    def chained() -> None:  # as inside a Kalman chain: the next layer's prior was computed from this posterior
        y = bkn(x, prior=prior)
        torch.autograd.grad((y, *bkn.posterior), chain_inputs, (grad, *posterior_grads))

    cases = {
        "BatchNorm2d": _step(bn, x, grad),
        "BKN fast (prior, p=0.9)": _step(bkn, x, grad, prior, forward=lambda inp: bkn(inp, prior=prior)),
        PYTHON_STEP: _step(bkn, x, grad, prior, forward=forward_in_mode("step")),  # (the design before the operator)
        # per-channel C calls between torch's x-sized kernels (the design before the C step)
        C_FINALIZE: _step(bkn, x, grad, prior, forward=forward_in_mode("finalize")),
        TORCH_FINALIZE: _step(bkn, x, grad, prior, forward=forward_in_mode("torch")),  # no C at all
        CHAINED: chained,
        "BKN reference": _step(ref, x, grad, prior, forward=reference_forward),
        "GroupNorm(32)": _step(gn, x, grad),
    }
    if not reference:
        del cases["BKN reference"]
    if cpu_finalize() != "c":  # the fast row already runs the torch ops
        del cases[TORCH_FINALIZE]
    if not cpu_step().startswith("cpp-op"):  # the fast row already runs the C step from Python (or less)
        del cases[PYTHON_STEP]
    if not cpu_step().startswith(("cpp-op", "c-step")):  # the fast row already runs the C finalize alone (or torch)
        del cases[C_FINALIZE]
    return cases


def _interleaved(cases: dict[str, Callable[[], None]], *, warmup: int, repeats: int,
                 burst: int) -> dict[str, dict[str, float]]:
    """Round-robin timing: every method sees the same machine load (the cores may be shared).

    Each round runs ``burst`` consecutive calls of one method, then of the next, and records their
    mean: steady state per method (a single call right after the autograd reference, hundreds of
    small ops, measures cache refill more than the method), load drift still shared by all. Each call is
    also timed alone: ``first_ms`` is the median first call of a burst (caches as the previous method left
    them), ``warm_ms`` the median of the burst's second half (as warm as this loop gets).
    """
    samples: dict[str, list[float]] = {name: [] for name in cases}
    first: dict[str, list[float]] = {name: [] for name in cases}
    warm: dict[str, list[float]] = {name: [] for name in cases}
    cpu: dict[str, list[float]] = {name: [] for name in cases}  # process CPU time (all threads)
    faults: dict[str, int] = {name: 0 for name in cases}
    clock = time.perf_counter
    for fn in cases.values():
        time_fn(fn, warmup=warmup, repeats=1)
    for _ in range(repeats):
        for name, fn in cases.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), clock()
            ends = []
            for _ in range(burst):
                fn()
                ends.append(clock())
            samples[name].append((ends[-1] - t0) * 1e3 / burst)
            cpu[name].append((time.process_time() - c0) * 1e3 / burst)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            calls = [(end - start) * 1e3 for start, end in zip([t0, *ends[:-1]], ends)]
            first[name].append(calls[0])
            warm[name].extend(calls[burst // 2:] if burst > 1 else calls)
    out = {}
    for name, values in samples.items():
        q = statistics.quantiles(values, n=10)
        out[name] = {"p20_ms": q[1], "p50_ms": statistics.median(values), "p80_ms": q[7],
                     "first_ms": statistics.median(first[name]), "warm_ms": statistics.median(warm[name]),
                     "cpu_p50_ms": statistics.median(cpu[name]), "faults": faults[name] / (repeats * burst)}
    return out


def _measure(threads: list[int], repeats: int, warmup: int, burst: int, reference: bool, malloc: str,
             ghost: tuple[int, ...] = (0, 2)) -> list[dict]:
    rows = []
    previous_threads = torch.get_num_threads()
    try:
        for n_threads in threads:
            torch.set_num_threads(n_threads)
            for shape in SHAPES:
                for layout in ("nchw", "channels_last"):
                    for group_size in ghost:
                        cases = _cases(shape, layout == "channels_last", reference=reference, ghost=group_size)
                        timings = _interleaved(cases, warmup=warmup, repeats=repeats, burst=burst)
                        base = timings["BatchNorm2d"]
                        for name, t in timings.items():
                            rows.append({
                                "shape": "x".join(map(str, shape)), "layout": layout, "ghost": group_size,
                                "threads": n_threads, "malloc": malloc, "method": name, "p20_ms": t["p20_ms"],
                                "p50_ms": t["p50_ms"], "p80_ms": t["p80_ms"], "ratio_bn": t["p50_ms"] / base["p50_ms"],
                                "ratio_p20": t["p20_ms"] / base["p20_ms"],
                                "ratio_first": t["first_ms"] / base["first_ms"],
                                "ratio_warm": t["warm_ms"] / base["warm_ms"],
                                "cpu_ratio": t["cpu_p50_ms"] / base["cpu_p50_ms"], "faults": t["faults"],
                            })
    finally:
        torch.set_num_threads(previous_threads)
    return rows


def _child_rows(argv: list[str]) -> list[dict]:
    """The same measurements in a child process with glibc heap trimming off."""
    with tempfile.TemporaryDirectory(prefix="bkn-cpu-") as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        cmd = [sys.executable, "-m", "benchmarks.bench_bkn_cpu", *argv, "--malloc", "no-trim", "--rows-out", rows_path]
        subprocess.run(cmd, check=True, env={**os.environ, **NO_TRIM_ENV})
        with open(rows_path) as fh:
            return json.load(fh)


@dataclass(frozen=True)
class Options:
    """``python -m benchmarks bkn_cpu`` options."""

    threads: tuple[int, ...] = (1, 2)
    ghost: tuple[int, ...] = (0, 2)  # ghost group sizes (0: no ghost groups), each an interleaved loop
    repeats: int = 100  # rounds (each method once per round)
    burst: int = 10  # consecutive calls per method and round
    no_reference: bool = False  # skip the (slow) plain-torch reference rows
    warmup: int = 5
    malloc: Literal["default", "no-trim", "both"] = "both"  # glibc heap: as found, trimming off (a child), or both
    rows_out: str | None = None  # child process: write rows as JSON, no report

    cli_aliases = {"--out-dir": "--results_dir"}  # its former name: bkn_cpu.{csv,json} go to the output folder

    def validate(self) -> None:
        if min(self.threads, default=0) < 1 or self.repeats < 1 or self.burst < 1 or self.warmup < 0:
            raise ValueError("threads, repeats and burst must be >= 1, warmup >= 0")
        if not self.ghost or min(self.ghost) < 0:
            raise ValueError("ghost: group sizes >= 0 (0: no ghost groups)")


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_bench(Options, argv, prog="python -m benchmarks bkn_cpu", description=__doc__.splitlines()[0])

    measure_args = dict(threads=args.threads, repeats=args.repeats, warmup=args.warmup, burst=args.burst,
                        reference=not args.no_reference, ghost=tuple(args.ghost))
    if args.rows_out:  # the no-trim child
        with open(args.rows_out, "w") as fh:
            json.dump(_measure(**measure_args, malloc=args.malloc), fh)
        return 0
    rows = []
    if args.malloc in ("default", "both"):
        rows += _measure(**measure_args, malloc="default")
    if args.malloc in ("no-trim", "both"):
        child_argv = ["--threads", *map(str, args.threads), "--repeats", str(args.repeats),
                      "--warmup", str(args.warmup), "--burst", str(args.burst), "--ghost", *map(str, args.ghost)]
        rows += _child_rows(child_argv + (["--no-reference"] if args.no_reference else []))
    load = " ".join(f"{v:.1f}" for v in os.getloadavg())  # other processes sharing the cores inflate every figure
    report(
        "bkn_cpu",
        rows,
        columns=["shape", "layout", "ghost", "threads", "malloc", "method", "p20_ms", "p50_ms", "p80_ms", "ratio_bn",
                 "ratio_p20", "ratio_first", "ratio_warm", "cpu_ratio", "faults"],
        notes=["fp32 training forward + backward (grads of input, affine params and, for BKN, the prior); "
               f"per round each method runs {args.burst} consecutive calls (their mean is one sample), "
               f"{args.repeats} rounds",
               "ratio_bn: median over BatchNorm2d's median (ratio_p20: p20 over p20), same shape/layout/threads/"
               "malloc and ghost group size (ghost 0: none); targets BKN fast <= 1.5 (NCHW), <= 1.0 (scale-out)",
               "ratio_first / ratio_warm: the median first call of a burst (caches as the previous method left "
               "them) / the median call of a burst's second half, each over BatchNorm2d's",
               "cpu_ratio: median process CPU time per call over BatchNorm2d's (all threads; robust to shared cores)",
               f"BKN fast's per-channel finalize: {cpu_finalize()} (normlayers.cpu_finalize()); "
               f"CPU hot path: {cpu_step()} (normlayers.ops.cfinalize.cpu_step())",
               "faults: minor page faults per call; malloc no-trim = MALLOC_MMAP_THRESHOLD_=64 MiB, "
               "MALLOC_TRIM_THRESHOLD_=256 MiB (glibc stops returning the heap top to the OS)",
               f"load average at the end: {load}"],
        extra={"load_average": load, "repeats": args.repeats, "burst": args.burst, "cpu_finalize": cpu_finalize(),
               "cpu_step": cpu_step()},
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
