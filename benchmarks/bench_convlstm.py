"""Fused one-convolution ConvLSTM cell vs the literal eight-convolution cell, inside ACFM and alone.

``python -m benchmarks convlstm [--batch 64] [--taxibj-batch 64] [--devices cpu,cuda] [--repeats 10]``

For the BikeNYC (16x8, ext 33, R=2) and TaxiBJ (32x32, ext 77, R=12) shapes it builds ACFM with literal cells,
copies the weights into the same model with fused cells (:func:`fuse_literal_cells`), asserts identical
training-mode outputs (max abs diff < 1e-5, same dropout masks via the same seed), then times one training step
(forward + MSE + backward) of each; then the same for the ConvLSTM alone over a 6-frame sequence. Ratios are
literal / fused time in the same run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from benchmarks.harness import check_at_least, check_not_empty, parse_bench, report, time_fn
from stflow.layers.convlstm import ConvLSTM, fuse_literal_cells
from stflow.models.acfm import ACFM, ACFMConfig

SHAPES = {"bikenyc": "BikeNYC 16x8, ext 33, R=2", "taxibj": "TaxiBJ 32x32, ext 77, R=12"}
SEQ_LEN = 6  # lc + lp of the ACFM setting


def _batch(cfg: ACFMConfig, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    frame = (cfg.flow_channels, *cfg.grid_shape)
    out: dict[str, torch.Tensor] = {}
    for key, n in (("closeness", cfg.len_closeness), ("period", cfg.len_period), ("trend", cfg.len_trend)):
        out[key] = torch.rand(batch, n, *frame, generator=g) * 2 - 1
        out[f"ext_{key}"] = (torch.rand(batch, n, cfg.ext_dim, generator=g) > 0.8).float()
    out["ext_target"] = (torch.rand(batch, cfg.ext_dim, generator=g) > 0.8).float()
    out["target"] = torch.rand(batch, *frame, generator=g) * 2 - 1
    return {k: v.to(device) for k, v in out.items()}


def _step(
    model: nn.Module, inputs: Callable[[], torch.Tensor], target: torch.Tensor | None = None
) -> Callable[[], torch.Tensor]:
    """One fwd + bwd; returns the output (gradients cleared before each step)."""

    def run() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1234)  # identical dropout masks for both cells
        out = inputs()
        loss = out.float().pow(2).mean() if target is None else nn.functional.mse_loss(out, target)
        loss.backward()
        return out.detach()

    return run


def _pair(literal: nn.Module, fused: nn.Module, make_run: Callable[[nn.Module], Callable[[], torch.Tensor]],
          warmup: int, repeats: int) -> dict[str, float]:
    run_literal, run_fused = make_run(literal), make_run(fused)
    diff = (run_literal() - run_fused()).abs().max().item()
    if not diff < 1e-5:
        raise AssertionError(f"fused and literal outputs differ by {diff:.3g} (>= 1e-5); not timing")
    t_literal = time_fn(run_literal, warmup=warmup, repeats=repeats)
    t_fused = time_fn(run_fused, warmup=warmup, repeats=repeats)
    return {
        "literal_ms": t_literal["p50_ms"],
        "fused_ms": t_fused["p50_ms"],
        "speedup": t_literal["p50_ms"] / t_fused["p50_ms"],
        "literal_p20_p80": f"{t_literal['p20_ms']:.1f}-{t_literal['p80_ms']:.1f}",
        "fused_p20_p80": f"{t_fused['p20_ms']:.1f}-{t_fused['p80_ms']:.1f}",
        "max_abs_diff": diff,
    }


@dataclass(frozen=True)
class Options:
    """``python -m benchmarks convlstm`` options."""

    batch: int = 64  # batch size at the BikeNYC shape
    taxibj_batch: int = 64  # batch size at the TaxiBJ shape
    shapes: tuple[Literal["bikenyc", "taxibj"], ...] = ("bikenyc", "taxibj")
    devices: tuple[Literal["cpu", "cuda"], ...] = ("cpu", "cuda")  # cuda is skipped when unavailable
    warmup: int = 2
    repeats: int = 10

    cli_aliases = {"--out-dir": "--results_dir"}  # its former name: convlstm.{csv,json} go to the output folder

    def validate(self) -> None:
        check_at_least(self, batch=1, taxibj_batch=1, warmup=0, repeats=1)
        check_not_empty(self, "shapes", "devices")


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_bench(Options, argv, prog="python -m benchmarks convlstm", description=__doc__.splitlines()[0])
    devices = [d for d in args.devices if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    rows = []
    for device_name in devices:
        device = torch.device(device_name)
        for shape in args.shapes:
            batch_size = args.batch if shape == "bikenyc" else args.taxibj_batch
            cfg = ACFMConfig.preset(shape, cell="literal")
            torch.manual_seed(0)
            literal = ACFM(cfg).to(device).train()
            fused = ACFM(dataclasses.replace(cfg, cell="fused")).to(device).train()
            fused.load_state_dict(fuse_literal_cells(literal.state_dict()), strict=True)
            batch = _batch(cfg, batch_size, device)
            common = {"shape": SHAPES[shape], "device": device_name, "batch": batch_size}
            step = lambda m, batch=batch: _step(m, lambda m=m, batch=batch: m(batch), batch["target"])  # noqa: E731
            row = _pair(literal, fused, step, args.warmup, args.repeats)
            rows.append({**common, "part": "ACFM train step", **row})

            hid, grid = cfg.hidden_channels, cfg.grid_shape
            cell_literal = ConvLSTM(hid, hid, grid, dropout=cfg.lstm_dropout, cell="literal").to(device).train()
            cell_fused = ConvLSTM(hid, hid, grid, dropout=cfg.lstm_dropout, cell="fused").to(device).train()
            cell_fused.load_state_dict(fuse_literal_cells(cell_literal.state_dict()), strict=True)
            seq = torch.randn(batch_size, SEQ_LEN, hid, *grid, device=device, requires_grad=True)
            step = lambda m, seq=seq: _step(m, lambda m=m, seq=seq: m(seq)[0])  # noqa: E731
            row = _pair(cell_literal, cell_fused, step, args.warmup, args.repeats)
            rows.append({**common, "part": f"ConvLSTM x{SEQ_LEN} steps", **row})
            print(f"done: {common} ", flush=True)

    notes = [
        "time per training step (forward + MSE + backward), median of repeats; speedup = literal / fused",
        "outputs checked identical (max abs diff < 1e-5, same seed for dropout) before timing",
        f"torch threads: {torch.get_num_threads()}",
    ]
    report("convlstm", rows, notes=notes,
           columns=["shape", "device", "batch", "part", "literal_ms", "fused_ms", "speedup",
                    "literal_p20_p80", "fused_p20_p80", "max_abs_diff"])
    return 0
