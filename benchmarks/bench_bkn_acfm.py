"""ACFM on the real BikeNYC segment with BatchNorm vs Batch Kalman Normalization, batches 4 and 64 (issue 8, study 2).

``python -m benchmarks bkn_acfm [--quick] [--seeds 0 1] [--epochs N] [--workers 2]``

ACFM (``acfm_bikenyc``, clean variant) is built with BatchNorm; for BKN its frame encoder (the only part with norm
layers) becomes a Kalman chain through :class:`KalmanFrameEncoder`, an explicit wiring: ``normlayers.convert``
chains ReLU nets only, and ACFM's residual units use SELU, so the transitions here push the posterior through SELU
(Monte Carlo, or closed-form SELU moments for the analytic transition). Same recipe and epoch budget for every cell:
Adam 3e-4, grad-norm clip 0.1 (the reference's), the data module's seeded shuffling, selection of the epoch with
the lowest val_loss, then the test RMSE per the protocol (test period, original units, x sqrt(128/81)).
BKN's prior weight follows ``bkn_study.prior_weight_for(batch)`` with the number of SAMPLES in the batch (the
6 frames of one sample are consecutive hours of the same city, not independent images). Skipped, with a
message, when the real data is absent.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from benchmarks.bkn_study import (
    NORMS,
    Cell,
    EpochRecorder,
    aggregate,
    load_result,
    norm_spec,
    plot_by_batch,
    plot_curves,
    prior_weight_for,
    quiet_lightning,
    run_config,
    run_dir,
    run_tasks,
    save_result,
    timing_note,
)
from benchmarks.harness import RESULTS_DIR, report
from stflow.paths import REPO_ROOT, shared_dir
from stflow.runner import fit

NAME = "bkn_acfm"
BATCHES = (4, 64)
ACFM_NORMS = ("bn", "bkn_mc")  # the reference transition; add bkn_an with --norms
GRAD_CLIP = 0.1  # the reference's grad-norm clip


def bikenyc_dir() -> Path | None:
    """The real BikeNYC folder under the shared data, or None when absent."""
    root = shared_dir()
    path = None if root is None else root / "data" / "bikenyc"
    return path if path is not None and any(path.glob("*.h5")) else None


SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _ncdf(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))


def selu_gaussian_moments(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of ``selu(z)``, ``z ~ N(mean, var)``, in closed form (elementwise, differentiable).

    ``selu(z) = s*z`` for ``z > 0`` and ``s*a*(exp(z) - 1)`` otherwise, so with ``sd = sqrt(var)``,
    ``P = Phi(mean/sd)``, ``phi`` the normal density at ``mean/sd`` and ``E_k = E[exp(k z) 1{z <= 0}] =
    exp(k mean + k^2 var / 2) Phi(-(mean + k var)/sd)``:
    ``E[selu] = s (mean P + sd phi + a (E_1 - (1 - P)))`` and
    ``E[selu^2] = s^2 ((mean^2 + var) P + mean sd phi + a^2 (E_2 - 2 E_1 + 1 - P))``.
    """
    sd = (var.clamp_min(0.0) + 1e-12).sqrt()
    t = mean / sd
    p_pos = _ncdf(t)
    pdf = torch.exp(-0.5 * t * t) / math.sqrt(2.0 * math.pi)
    # exp(k*mean + k^2 var/2) can overflow for large positive means, but then Phi(.) underflows to 0 faster:
    # combine them in log space.
    def e_k(k: float) -> Tensor:
        z = -(mean + k * var) / sd
        return torch.exp(k * mean + 0.5 * k * k * var + torch.special.log_ndtr(z))

    e1, e2 = e_k(1.0), e_k(2.0)
    m1 = SELU_SCALE * (mean * p_pos + sd * pdf + SELU_ALPHA * (e1 - (1.0 - p_pos)))
    m2 = SELU_SCALE**2 * ((mean * mean + var) * p_pos + mean * sd * pdf + SELU_ALPHA**2 * (e2 - 2.0 * e1 + 1.0 - p_pos))
    return m1, (m2 - m1 * m1).clamp_min(0.0)


def selu_transition(
    post: tuple[Tensor, Tensor], conv: nn.Conv2d, size: tuple[int, int], transition: str
) -> tuple[Tensor, Tensor]:
    """Prior of the norm after ``conv(selu(.))`` from the posterior ``post`` of the norm before (``(G, C_out)``).

    ``monte_carlo``: the reference's recipe with SELU in place of ReLU (one random image per group drawn from
    N(mean, var) at the conv input's ``size``, SELU, the conv's own weights, spatial moments); ``analytic``:
    closed-form SELU moments, then ``normlayers.analytic_prior``'s linear conv moments.
    """
    from normlayers import analytic_prior

    mean, var = post
    mean, var = mean.reshape(-1, mean.shape[-1]), var.reshape(-1, var.shape[-1])  # (C,) or (G, C) -> (G, C)
    if transition == "analytic":
        return analytic_prior(*selu_gaussian_moments(mean, var), conv, relu=False)
    sd = (var.clamp_min(0.0) + 1e-12).sqrt()
    noise = torch.randn(mean.shape[0], mean.shape[1], *size, device=mean.device, dtype=mean.dtype)
    z = mean[:, :, None, None] + sd[:, :, None, None] * noise  # (G, C) -> (G, C, 1, 1) over (G, C, H, W)
    out = conv(torch.nn.functional.selu(z))
    var_o, mean_o = torch.var_mean(out.flatten(2), dim=2, correction=0)  # (G, C_out, H*W) -> (G, C_out)
    return mean_o, var_o


class KalmanFrameEncoder(nn.Module):
    """ACFM's frame encoder with its BatchNorms as a Kalman chain, wired explicitly (an adapter of this study).

    ``normlayers.convert`` chains ReLU nets only and ACFM uses SELU, so this module re-runs the encoder's own
    submodules (same names, hence the same state-dict keys) with BatchKalmanNorm2d layers and priors computed by
    :func:`selu_transition`: unit k's ``norm2`` gets ``norm1``'s posterior through SELU -> ``conv1``; unit k+1's
    ``norm1`` gets the residual sum: unit k's input statistics (``norm1``'s posterior) plus ``norm2``'s
    posterior through SELU -> ``conv2``. The first norm (fed by the stem conv of the data) has no prior.
    Eval: plain BN with running statistics.
    """

    def __init__(self, encoder: nn.Module, prior_weight: float, transition: str) -> None:
        super().__init__()
        from normlayers import BatchKalmanNorm2d

        if transition not in ("monte_carlo", "analytic"):
            raise ValueError(f"unknown transition {transition!r}; choose 'monte_carlo' or 'analytic'")
        self.transition = transition
        self.stem, self.units, self.act, self.head = encoder.stem, encoder.units, encoder.act, encoder.head
        for unit in self.units:
            if not isinstance(unit.act, nn.SELU):
                raise ValueError(f"KalmanFrameEncoder expects SELU residual units, got {type(unit.act).__name__}")
            for name in ("norm1", "norm2"):
                bn = getattr(unit, name)
                bkn = BatchKalmanNorm2d(bn.num_features, eps=bn.eps, momentum=bn.momentum, prior_weight=prior_weight)
                bkn.load_state_dict(bn.state_dict())
                setattr(unit, name, bkn)

    def forward(self, x: Tensor) -> Tensor:
        """x (N, 2, H, W) -> (N, C, H, W); records which norms received a prior in ``self.wired``."""
        x = self.stem(x)
        size = tuple(x.shape[2:])
        prior = None
        self.wired: list[bool] = []
        for unit in self.units:
            chain = self.training
            h = unit.norm1(x, prior=prior if chain else None)
            self.wired.append(chain and prior is not None)
            y = unit.conv1(unit.act(h))
            prior2 = selu_transition(unit.norm1.posterior, unit.conv1, size, self.transition) if chain else None
            h2 = unit.norm2(y, prior=prior2)
            self.wired.append(prior2 is not None)
            x = x + unit.conv2(unit.act(h2))
            if chain:  # statistics of the residual sum: the unit's input plus its branch
                branch = selu_transition(unit.norm2.posterior, unit.conv2, size, self.transition)
                m1, v1 = unit.norm1.posterior
                prior = (m1 + branch[0], v1 + branch[1])
        return self.head(self.act(x))


def build_acfm(norm: str, batch_size: int, datamodule: Any) -> tuple[nn.Module, float | None]:
    """``acfm_bikenyc`` for a set-up data module; BKN = its frame encoder as a Kalman chain."""
    from stflow.models.registry import build_model
    from stflow.system import data_keywords

    spec = norm_spec(norm)
    if spec.kind == "gn":
        raise ValueError("the ACFM study compares BatchNorm and BKN only")
    model = build_model("acfm_bikenyc", **data_keywords(datamodule))
    if spec.kind != "bkn":
        return model, None
    p = prior_weight_for(batch_size)
    model.encoder = KalmanFrameEncoder(model.encoder, prior_weight=p, transition=spec.transition)
    return model, p


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
        out, epochs, seed, "val_loss", "min", resume, gradient_clip_val=GRAD_CLIP, limit_train_batches=limit_train_batches
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks {NAME}", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 1 epoch of 3 batches")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (quick: 0)")
    ap.add_argument("--epochs", type=int, default=None, help="default 4 (quick: 1); the same for every cell")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCHES))
    ap.add_argument("--norms", nargs="+", default=list(ACFM_NORMS), choices=[n for n in NORMS if n != "gn"])
    ap.add_argument("--workers", type=int, default=1, help="parallel training processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--data-dir", type=Path, default=None, help="BikeNYC folder (default: the shared data)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    ap.add_argument("--runs-dir", type=Path, default=None, help=f"per-run checkpoints/results (default runs/{NAME})")
    ap.add_argument("--no-resume", action="store_true")
    args = ap.parse_args(argv)

    data_dir = args.data_dir or bikenyc_dir()
    if data_dir is None or not Path(data_dir).is_dir():
        print(f"{NAME}: skipped: the real BikeNYC data is absent (looked in {data_dir or 'shared_dir()/data/bikenyc'}; "
              "set STFLOW_SHARED or pass --data-dir)")
        return 0
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1])
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 4)
    if epochs < 1:
        ap.error(f"--epochs must be >= 1, got {epochs}")
    cells = [Cell(n, b) for b in args.batch_sizes for n in args.norms]
    runs_dir = args.runs_dir or (REPO_ROOT / "runs" / (NAME + ("_quick" if args.quick else "")))
    kw: dict[str, Any] = dict(epochs=epochs, root=runs_dir, data_dir=Path(data_dir), resume=not args.no_resume)
    if args.quick:
        kw["limit_train_batches"] = 3
    quiet_lightning()
    t0, load0 = time.perf_counter(), os.getloadavg()
    tasks = [(c, s, kw) for c in cells for s in seeds]
    results = run_tasks(_train, tasks, args.workers, args.threads, NAME)
    wall = time.perf_counter() - t0
    rows = table_rows(results)
    args.out.mkdir(parents=True, exist_ok=True)
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        series.setdefault(NORMS[r["norm"]].label, []).append((r["batch"], r["rmse"], r["rmse_std"]))
    plot = plot_by_batch(series, args.out / f"{NAME}.png", "test RMSE (bikes, protocol)",
                         f"ACFM on BikeNYC, {epochs} epochs: RMSE vs batch", xlabel="batch size (samples)")
    panels: dict[str, dict[str, list[list[float]]]] = {}
    for r in results:
        lines = panels.setdefault(f"batch {r['batch_size']}", {})
        lines.setdefault(NORMS[r["norm"]].label, []).append([h["val_rmse"] for h in r["history"]])
    curves = plot_curves(panels, args.out / f"{NAME}_curves.png", "validation RMSE",
                         "ACFM on BikeNYC: validation RMSE per epoch (mean, min-max band)", sharey=False)
    notes = [
        f"{len(results)} runs ({len(cells)} cells x {len(seeds)} seeds), {epochs} epochs each; "
        + timing_note(results, wall, args.workers, args.threads, load0),
        "rmse: test RMSE (original units, x sqrt(128/81)) of the epoch with the lowest val_loss; mean/std over seeds; "
        "d_rmse_vs_bn: minus BatchNorm's at the same batch (negative = BKN better)",
        "BKN: ACFM's frame encoder as a Kalman chain (KalmanFrameEncoder, SELU transitions); p = prior_weight_for(batch in samples)",
        f"epoch_s: median training seconds per epoch; plots: {plot.name}, {curves.name}",
    ]
    columns = ["norm", "batch", "p", "seeds", "rmse", "rmse_std", "rmse_in", "rmse_out", "mae", "d_rmse_vs_bn",
               "epoch_s", "time_vs_bn"]
    runs = [{k: r[k] for k in ("cell", "seed", "test_rmse", "best_val_rmse", "epoch_s", "history")} for r in results]
    report(NAME, rows, columns=columns, notes=notes, out_dir=args.out,
           extra={"epochs": epochs, "seeds": list(seeds), "wall_s": wall, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
