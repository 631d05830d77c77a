"""ACFM training speed: seconds per epoch, samples/s and peak memory at the BikeNYC and TaxiBJ shapes.

``python -m benchmarks acfm_speed [--batch 64] [--repeats 5]``. One training step = forward + MSE + backward +
grad-norm clip 0.1 + Adam, on random tensors with the data module's batch layout (lc=4, lp=2, lt=0). An epoch is
the real training-set size (acfm.md: 4,104 BikeNYC samples, 15,120 TaxiBJ) / batch, times the median step.
CPU peak memory: the growth of the process's max RSS (``resource.getrusage``) during the shape's steps (shapes
run small to large, so each growth is that shape's extra peak); GPU: ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from typing import Any, Literal

import torch

from benchmarks.harness import check_at_least, check_not_empty, parse_bench, report, time_fn
from stflow.models import build_model

# name -> (model, grid, ext_dim, training samples per epoch)
SHAPES: dict[str, tuple[str, tuple[int, int], int, int]] = {
    "bikenyc": ("acfm_bikenyc", (16, 8), 33, 4104),
    "taxibj": ("acfm_taxibj", (32, 32), 77, 15120),
}


def _batch(batch: int, grid: tuple[int, int], ext_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    h, w = grid

    def frames(n: int) -> torch.Tensor:
        return (torch.rand(batch, n, 2, h, w, generator=g) * 2 - 1).to(device)  # (B, n, 2, H, W)

    def ext(*shape: int) -> torch.Tensor:
        return torch.rand(batch, *shape, generator=g).to(device)

    return {
        "closeness": frames(4), "period": frames(2), "trend": frames(0),
        "ext_closeness": ext(4, ext_dim), "ext_period": ext(2, ext_dim), "ext_trend": ext(0, ext_dim),
        "ext_target": ext(ext_dim), "target": (torch.rand(batch, 2, h, w, generator=g) * 2 - 1).to(device),
    }


def _measure(shape: str, batch: int, device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    name, grid, ext_dim, samples = SHAPES[shape]
    torch.manual_seed(0)
    model = build_model(name, grid_shape=grid, ext_dim=ext_dim, len_closeness=4, len_period=2, len_trend=0,
                        slots_per_day=24 if shape == "bikenyc" else 48).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4)
    data = _batch(batch, grid, ext_dim, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(data), data["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux reports KiB)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timing = time_fn(step, warmup=warmup, repeats=repeats)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    step_s = timing["p50_ms"] / 1e3
    steps = math.ceil(samples / batch)
    return {
        "shape": shape, "device": device.type, "grid": f"{grid[0]}x{grid[1]}", "ext": ext_dim, "batch": batch,
        "threads": torch.get_num_threads(), "step_ms_p50": timing["p50_ms"], "step_ms_p20": timing["p20_ms"],
        "step_ms_p80": timing["p80_ms"], "samples_per_s": batch / step_s, "s_per_epoch": steps * step_s,
        "epoch_samples": samples, "peak_mem_mib": peak, "params": sum(p.numel() for p in model.parameters()),
    }


@dataclass(frozen=True)
class Options:
    """``python -m benchmarks acfm_speed`` options."""

    batch: int = 64
    shapes: tuple[Literal["bikenyc", "taxibj"], ...] = ("bikenyc", "taxibj")
    warmup: int = 1
    repeats: int = 5
    cpu_only: bool = False

    def validate(self) -> None:
        check_at_least(self, batch=1, warmup=0, repeats=1)
        check_not_empty(self, "shapes")


def main(argv: list[str] | None = None) -> int:
    ns, _ = parse_bench(Options, argv, prog="python -m benchmarks acfm_speed", description=__doc__.split("\n\n")[0])
    devices = [torch.device("cpu")]
    if torch.cuda.is_available() and not ns.cpu_only:
        devices.append(torch.device("cuda"))
    rows = []
    for device in devices:
        for shape in ns.shapes:
            rows.append(_measure(shape, ns.batch, device, ns.warmup, ns.repeats))
            print(f"{shape} on {device.type}: {rows[-1]['step_ms_p50']:.0f} ms/step", flush=True)
    report(
        "acfm_speed",
        rows,
        columns=["shape", "device", "grid", "ext", "batch", "threads", "params", "step_ms_p50", "step_ms_p20",
                 "step_ms_p80", "samples_per_s", "s_per_epoch", "epoch_samples", "peak_mem_mib"],
        notes=[
            "step = fwd + MSE + bwd + clip 0.1 + Adam on random tensors; epoch = real training-set size / batch",
            "CPU peak memory = max-RSS growth during that shape's steps (small shape first); "
            "GPU = max_memory_allocated",
        ],
    )
    return 0
