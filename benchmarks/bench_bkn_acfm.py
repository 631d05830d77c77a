"""ACFM on the real BikeNYC segment with BatchNorm vs Batch Kalman Normalization, batches 4 and 64 (issue 8, study 2).

``python -m benchmarks bkn_acfm [--quick] [--seeds 0 1] [--epochs N] [--workers 2]``

ACFM (``acfm_bikenyc``, clean variant) is built by ``build_model(..., norm="bn" | "bkn")``; for BKN its frame
encoder (the only part with norm layers) becomes a Kalman chain (``stflow.models.kalman.KalmanFrameEncoder``:
transitions through SELU, Monte Carlo or closed-form SELU moments for the analytic one). Same recipe and epoch
budget for every cell:
Adam 3e-4, grad-norm clip 0.1 (the reference's), the data module's seeded shuffling, selection of the epoch with
the lowest val_loss, then the test RMSE per the protocol (test period, original units, x sqrt(128/81)).
BKN's prior weight follows ``normlayers.prior_weight_for(batch)`` with the number of SAMPLES in the batch (the
6 frames of one sample are consecutive hours of the same city, not independent images). Skipped, with a
message, when the real data is absent. Writes ``bkn_acfm.{csv,json}`` and two PNGs to the output folder
(``runs/benchmarks/``; ``--results-dir DIR``, formerly ``--out``; ``--update-results``: the committed
``benchmarks/results/``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch import nn

from benchmarks.bkn_study import (
    Cell,
    aggregate,
    load_result,
    plot_by_batch,
    plot_curves,
    run_config,
    run_dir,
    run_study,
    save_result,
    study_runs_dir,
    timing_note,
)
from benchmarks.harness import check_at_least, check_not_empty, output_dir, parse_bench, report
from normlayers.select import NORMS, NormOptions, norm_spec, prior_weight_for
from stflow.callbacks import EpochRecorder
from stflow.models import build_model
from stflow.paths import shared_dir
from stflow.runner import fit
from stflow.system import data_keywords

NAME = "bkn_acfm"
BATCHES = (4, 64)
ACFM_NORMS = ("bn", "bkn_mc")  # the reference transition; add bkn_an with --norms
GRAD_CLIP = 0.1  # the reference's grad-norm clip


def bikenyc_dir() -> Path | None:
    """The real BikeNYC folder under the shared data, or None when absent."""
    root = shared_dir()
    path = None if root is None else root / "data" / "bikenyc"
    return path if path is not None and any(path.glob("*.h5")) else None


def build_acfm(norm: str, batch_size: int, datamodule: Any) -> tuple[nn.Module, float | None]:
    """``acfm_bikenyc`` for a set-up data module with the study's norm ``norm`` (``bn``, ``bkn_mc``, ``bkn_an``);
    BKN (the frame encoder as a Kalman chain, ``stflow.models.kalman``) gets ``p = prior_weight_for(batch_size)``."""
    spec = norm_spec(norm)
    if spec.kind == "gn":
        raise ValueError("the ACFM study compares BatchNorm and BKN only")
    if spec.kind != "bkn":
        return build_model("acfm_bikenyc", **data_keywords(datamodule), norm="bn"), None
    p = prior_weight_for(batch_size)
    options = NormOptions(transition=spec.transition, prior_weight=p)
    return build_model("acfm_bikenyc", **data_keywords(datamodule), norm="bkn", norm_options=options), p


def train_acfm_cell(
    cell: Cell,
    seed: int,
    epochs: int,
    root: Path,
    data_dir: Path,
    resume: bool = True,
    keep_checkpoints: bool = False,
    limit_train_batches: int | None = None,
) -> dict[str, Any]:
    """One ACFM run through ``stflow.runner.fit`` (or its saved result); returns the result dict."""
    from stflow.data import CrowdFlowDataModule
    from stflow.system import ForecastingSystem

    out = run_dir(root, cell, seed)
    done = load_result(out)
    if done is not None and resume and done.get("epochs") == epochs:
        return {**done, "reused": True}
    dm = CrowdFlowDataModule(dataset="bikenyc", data_dir=str(data_dir), batch_size=cell.batch_size, seed=seed)
    dm.setup()
    pl.seed_everything(seed, workers=True, verbose=False)  # same init for both norms at a given seed
    model, p = build_acfm(cell.norm, cell.batch_size, dm)
    system = ForecastingSystem(
        model,
        scaler_min=float(dm.scaler.min),
        scaler_max=float(dm.scaler.max),
        metric_factor=float(dm.metric_factor),
        num_slots=len(dm.timestamps),
    )
    recorder = EpochRecorder(["val_loss", "val_rmse"], ["train_loss_epoch"])
    cfg = run_config(
        out, epochs, seed, "val_loss", "min", resume, gradient_clip_val=GRAD_CLIP,
        limit_train_batches=limit_train_batches,
    )
    t0 = time.perf_counter()
    res = fit(system, dm, cfg, callbacks=[recorder])
    wall = time.perf_counter() - t0
    hist = recorder.history
    times = [h["train_s"] for h in hist]
    result = {
        "norm": cell.norm,
        "batch_size": cell.batch_size,
        "cell": cell.name,
        "seed": seed,
        "epochs": epochs,
        "prior_weight": p,
        "test_rmse": res.test_metrics["test_rmse"],
        "test_rmse_inflow": res.test_metrics["test_rmse_inflow"],
        "test_rmse_outflow": res.test_metrics["test_rmse_outflow"],
        "test_mae": res.test_metrics["test_mae"],
        "best_val_rmse": min(h["val_rmse"] for h in hist),
        "epoch_s": sorted(times)[len(times) // 2],
        "wall_s": wall,
        "history": hist,
    }
    save_result(out, result, keep_checkpoints)
    return result


def _train(cell: Cell, seed: int, kw: dict[str, Any]) -> dict[str, Any]:
    return train_acfm_cell(cell, seed, **kw)


def table_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    metrics = ["test_rmse", "test_rmse_inflow", "test_rmse_outflow", "test_mae", "epoch_s"]
    rows = aggregate(results, metrics, ["norm", "batch_size", "prior_weight"])
    bn = {r["batch_size"]: r for r in rows if r["norm"] == "bn"}
    out = []
    for r in rows:
        base = bn.get(r["batch_size"])
        out.append(
            {
                "norm": r["norm"],
                "batch": r["batch_size"],
                "p": "" if r["prior_weight"] is None else round(r["prior_weight"], 3),
                "seeds": r["n_seeds"],
                "rmse": r["test_rmse_mean"],
                "rmse_std": r["test_rmse_std"],
                "rmse_in": r["test_rmse_inflow_mean"],
                "rmse_out": r["test_rmse_outflow_mean"],
                "mae": r["test_mae_mean"],
                "d_rmse_vs_bn": r["test_rmse_mean"] - base["test_rmse_mean"] if base else None,
                "epoch_s": r["epoch_s_mean"],
                "time_vs_bn": r["epoch_s_mean"] / base["epoch_s_mean"] if base else None,
            }
        )
    return out


@dataclass(frozen=True)
class Options:
    """``python -m benchmarks bkn_acfm`` options (flags or ``--config FILE``; ``--out`` is ``--results-dir``)."""

    quick: bool = False  # smoke run: 1 seed, 1 epoch of 3 batches
    seeds: tuple[int, ...] | None = None  # default 0 1 (quick: 0)
    epochs: int | None = None  # default 4 (quick: 1); the same for every cell
    batch_sizes: tuple[int, ...] = BATCHES
    norms: tuple[str, ...] = ACFM_NORMS  # bn and the BKN variants (bkn_mc, bkn_an)
    workers: int = 1  # parallel training processes
    threads: int = 1  # torch threads per process
    data_dir: str | None = None  # BikeNYC folder (default: the shared data)
    runs_dir: str | None = None  # per-run checkpoints/results (default runs/bkn_acfm)
    no_resume: bool = False  # retrain runs that already finished

    cli_aliases = {"--out": "--results_dir"}

    def validate(self) -> None:
        check_at_least(self, seeds=0, epochs=1, batch_sizes=2, workers=1, threads=1)
        check_not_empty(self, "norms")
        allowed = [n for n in NORMS if n != "gn"]
        unknown = [n for n in self.norms if n not in allowed]
        if unknown:
            raise ValueError(f"norms: unknown norm(s) {unknown}; choose from {', '.join(allowed)}")


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_bench(Options, argv, prog=f"python -m benchmarks {NAME}", description=__doc__.split("\n")[0])
    data_dir = args.data_dir or bikenyc_dir()
    if data_dir is None or not Path(data_dir).is_dir():
        print(f"{NAME}: skipped: the real BikeNYC data is absent (looked in {data_dir or 'shared_dir()/data/bikenyc'}; "
              "set STFLOW_SHARED or pass --data-dir)")
        return 0
    seeds = list(args.seeds) if args.seeds is not None else ([0] if args.quick else [0, 1])
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 4)
    cells = [Cell(n, b) for b in args.batch_sizes for n in args.norms]
    runs_dir = study_runs_dir(NAME, args.runs_dir, args.quick)
    kw: dict[str, Any] = dict(epochs=epochs, root=runs_dir, data_dir=Path(data_dir), resume=not args.no_resume)
    if args.quick:
        kw["limit_train_batches"] = 3
    results, wall, load0 = run_study(NAME, _train, cells, seeds, kw, args.workers, args.threads)
    rows = table_rows(results)
    out = output_dir()
    out.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        series.setdefault(NORMS[r["norm"]].label, []).append((r["batch"], r["rmse"], r["rmse_std"]))
    plot = plot_by_batch(series, out / f"{NAME}.png", "test RMSE (bikes, protocol)",
                         f"ACFM on BikeNYC, {epochs} epochs: RMSE vs batch", xlabel="batch size (samples)")
    panels: dict[str, dict[str, list[list[float]]]] = {}
    for r in results:
        lines = panels.setdefault(f"batch {r['batch_size']}", {})
        lines.setdefault(NORMS[r["norm"]].label, []).append([h["val_rmse"] for h in r["history"]])
    curves = plot_curves(panels, out / f"{NAME}_curves.png", "validation RMSE",
                         "ACFM on BikeNYC: validation RMSE per epoch (mean, min-max band)", sharey=False)
    notes = [
        f"{len(results)} runs ({len(cells)} cells x {len(seeds)} seeds), {epochs} epochs each; "
        + timing_note(results, wall, args.workers, args.threads, load0),
        "rmse: test RMSE (original units, x sqrt(128/81)) of the epoch with the lowest val_loss; mean/std over seeds; "
        "d_rmse_vs_bn: minus BatchNorm's at the same batch (negative = BKN better)",
        "BKN: ACFM's frame encoder as a Kalman chain (KalmanFrameEncoder, SELU transitions); "
        "p = prior_weight_for(batch in samples)",
        f"epoch_s: median training seconds per epoch; plots: {plot.name}, {curves.name}",
    ]
    columns = ["norm", "batch", "p", "seeds", "rmse", "rmse_std", "rmse_in", "rmse_out", "mae", "d_rmse_vs_bn",
               "epoch_s", "time_vs_bn"]
    runs = [{k: r[k] for k in ("cell", "seed", "test_rmse", "best_val_rmse", "epoch_s", "history")} for r in results]
    report(NAME, rows, columns=columns, notes=notes, out_dir=out,
           extra={"epochs": epochs, "seeds": list(seeds), "wall_s": wall, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
