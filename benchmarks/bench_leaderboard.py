"""Seeded leaderboard on the shared BikeNYC history: every model with its own recipe, 3 seeds, mean ± sd.

``python -m benchmarks leaderboard [--models acfm deepstn] [--seeds 777 778 779] [--epochs N] [--out-dir DIR]``.
Each row is a packaged training config ``stflow/configs/leaderboard_<row>.yaml`` (its recipe is documented there);
every run goes through :func:`stflow.train.run` into ``<out_dir>/<row>/seed<k>/`` and is kept: a run whose
``metrics.json`` exists is skipped, an interrupted one (``checkpoints/last.ckpt``) is resumed, so killing and
restarting the command continues where it stopped. ``--report-only`` aggregates what has finished.

Protocol ``deepst`` (../shared/docs/acfm.md): test = the last 240 hours (2014-09-21..30), min-max scaling fitted
on the training slots, RMSE = global RMSE in original units x sqrt(128/81) (the 81 active cells), MAE over the
81 active cells; validation = the last 10 % of the training history, the best epoch on validation loss is the one
tested (stflow.runner.fit), early stopping after ``run.early_stopping_patience`` epochs without a gain. The test set
is never used to choose anything. Writes ``leaderboard.{csv,json}`` (one row per model, per-seed figures in the
JSON), ``leaderboard.png`` (test RMSE, mean ± sd, with the historical-average line) and
``leaderboard_acfm_curves.png`` (ACFM validation RMSE per epoch against the 6.3 goal) to the output folder:
``runs/benchmarks/`` by default, ``--results-dir DIR``, or the committed ``benchmarks/results/`` with
``--update-results`` (e.g. ``--report-only --update-results`` to refresh the published table from finished runs).
"""

from __future__ import annotations

import csv
import json
import statistics
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from benchmarks.harness import check_at_least, check_not_empty, output_dir, parse_bench, report
from stflow.paths import shared_dir
from stflow.train import TrainConfig, load_config, run

REPO = Path(__file__).resolve().parents[1]
ROWS = ("historical_average", "acfm", "acfm_bkn", "deepstn", "stid", "stresnet")
LABELS = {
    "historical_average": "historical average (weekday x hour)",
    "acfm": "ACFM (authors' attention wiring, BatchNorm)",
    "acfm_bkn": "ACFM + BKN",
    "deepstn": "DeepSTN+",
    "stid": "STID",
    "stresnet": "ST-ResNet (L4, BatchNorm)",
}
METRICS = (("rmse", "test_rmse"), ("rmse_inflow", "test_rmse_inflow"), ("rmse_outflow", "test_rmse_outflow"),
           ("mae", "test_mae"))
GOAL_RMSE, STRETCH_RMSE = 6.3, 6.0
NORM_FREE = ("historical_average", "persistence", "stid")


@dataclass(frozen=True)
class Leaderboard:
    """``python -m benchmarks leaderboard`` options (flags or ``--config FILE``)."""

    models: tuple[str, ...] = ROWS  # rows: packaged configs leaderboard_<row>.yaml
    seeds: tuple[int, ...] = (777, 778, 779)  # the historical average (nothing trained) runs the first seed only
    epochs: int | None = None  # None: each recipe's own max_epochs
    out_dir: str | None = None  # run folders (default: <repo>/runs/leaderboard)
    data_dir: str | None = None  # BikeNYC folder (default: <shared>/data/bikenyc)
    report_only: bool = False  # aggregate finished runs only, train nothing
    threads: int | None = 1  # torch threads per run (None: torch's default)
    # leaderboard.{csv,json,png}: the shared --results-dir / --update-results flags (benchmarks.harness)

    def validate(self) -> None:
        check_not_empty(self, "models")
        unknown = [r for r in self.models if r not in ROWS]
        if unknown:
            raise ValueError(f"unknown leaderboard row(s) {unknown}; rows: {', '.join(ROWS)}")
        check_at_least(self, seeds=0, epochs=1, threads=1)


def run_dir(root: Path, row: str, seed: int) -> Path:
    return root / row / f"seed{seed}"


def row_config(row: str, seed: int, root: Path, epochs: int | None, data_dir: str | None) -> TrainConfig:
    """The row's packaged recipe with the seed, the run folder and (optionally) the epoch budget replaced."""
    base = load_config(f"leaderboard_{row}")
    changes: dict[str, Any] = dict(out_dir=str(run_dir(root, row, seed)), seed=seed, progress_bar=False,
                                   loggers=("csv",))
    if epochs is not None and base.model != "historical_average":
        changes["max_epochs"] = epochs
    return replace(base, data_dir=data_dir or base.data_dir, run=base.run.replace(**changes)).validate()


def is_finished(out: Path, config: TrainConfig) -> bool:
    """metrics.json is written at the very end of stflow.train.run; it must be for the same epoch budget."""
    path = out / "metrics.json"
    if not path.is_file():
        return False
    saved = json.loads(path.read_text())
    return saved.get("config", {}).get("run", {}).get("max_epochs") == config.run.max_epochs


def claim(out: Path) -> bool:
    """Take ``out/.running`` (this process id) unless a live process holds it: several leaderboard processes can
    then share the queue (e.g. one per model) without two of them training the same run."""
    import os

    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".running"
    if lock.is_file():
        try:
            os.kill(int(lock.read_text().strip()), 0)
            return False
        except (ValueError, ProcessLookupError, PermissionError):
            pass  # a stale lock: its process is gone
    lock.write_text(str(os.getpid()))
    return True


def bikenyc_dir(data_dir: str | None) -> str | None:
    """``data_dir``, else the shared BikeNYC folder; None (after printing why) when there is none."""
    if data_dir is not None:
        return data_dir
    shared = shared_dir()
    if shared is None or not (shared / "data" / "bikenyc").is_dir():
        print("skipped: no shared BikeNYC data (../shared/data/bikenyc); pass --data-dir")
        return None
    return str(shared / "data" / "bikenyc")


def train_claimed(config: TrainConfig) -> dict[str, Any] | None:
    """Train (or resume) the run of ``config`` unless another process holds it (then None); the claim is released
    whatever happens."""
    out = Path(config.run.out_dir)
    if not claim(out):
        return None
    try:
        return train_one(config)
    finally:
        (out / ".running").unlink(missing_ok=True)


def train_one(config: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one seed; returns stflow.train.run's result."""
    out = Path(config.run.out_dir)
    resume = (out / "checkpoints" / "last.ckpt").is_file()
    run_fields = {f.name for f in fields(config.run)}
    changes: dict[str, Any] = {"resume": True} if resume else {}
    if not resume and "overwrite" in run_fields:
        changes["overwrite"] = True  # leftovers of a run killed before its first checkpoint
    return run(replace(config, run=config.run.replace(**changes)))


def best_validation(out: Path) -> dict[str, Any]:
    """Epoch of the lowest val_loss in the run's CSV log, and val RMSE there (EMA and raw weights when logged)."""
    log = out / "logs" / "metrics.csv"
    if not log.is_file():
        return {}
    rows = [r for r in csv.DictReader(log.open()) if r.get("val_loss")]
    if not rows:
        return {}
    best = min(rows, key=lambda r: float(r["val_loss"]))
    raw = [float(r["val_raw_rmse"]) for r in rows if r.get("val_raw_rmse")]
    return {
        "best_epoch": int(best["epoch"]), "epochs_run": int(rows[-1]["epoch"]) + 1,
        "val_rmse": float(best["val_rmse"]), "best_val_raw_rmse": min(raw) if raw else None,
        "curve": [(int(r["epoch"]), float(r["val_rmse"]), float(r["val_raw_rmse"]) if r.get("val_raw_rmse")
                   else None) for r in rows],
    }


def parameter_count(out: Path) -> int | None:
    """Trainable parameters of the model in the run's best (else last) checkpoint (the EMA copy not counted)."""
    import torch

    ckpts = sorted((out / "checkpoints").glob("best-*.ckpt")) or sorted((out / "checkpoints").glob("last.ckpt"))
    if not ckpts:
        return None
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)["state_dict"]
    hp = torch.load(ckpts[-1], map_location="cpu", weights_only=False).get("hyper_parameters", {})
    from stflow.models import build_model

    model = build_model(hp["model"], **hp.get("model_kwargs", {}))
    model.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def collect(root: Path, rows: tuple[str, ...], seeds: tuple[int, ...], epochs: int | None,
            data_dir: str | None) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(one summary row per model, one row per finished seed, one row per unfinished run) from the run folders."""
    summary, per_seed, in_progress = [], [], []
    for row in rows:
        runs = []
        for seed in seeds[:1] if row == "historical_average" else seeds:
            config = row_config(row, seed, root, epochs, data_dir)
            out = run_dir(root, row, seed)
            if not is_finished(out, config):
                val = best_validation(out)
                if val:  # started but not finished: its validation progress only (no test figure)
                    in_progress.append({"row": row, "seed": seed, "max_epochs": config.run.max_epochs, **val})
                continue
            saved = json.loads((out / "metrics.json").read_text())
            val = best_validation(out)
            entry = {"row": row, "seed": seed, **{k: saved["test"][key] for k, key in METRICS},
                     "val_rmse": val.get("val_rmse"), "best_val_raw_rmse": val.get("best_val_raw_rmse"),
                     "best_epoch": val.get("best_epoch"), "epochs_run": val.get("epochs_run", saved["epochs"]),
                     "max_epochs": config.run.max_epochs, "wall_s": saved["wall_s"], "curve": val.get("curve")}
            runs.append(entry)
            per_seed.append(entry)
        if not runs:
            continue
        config = row_config(row, seeds[0], root, epochs, data_dir)
        line: dict[str, Any] = {"model": row, "label": LABELS.get(row, row), "registered": config.model,
                                "norm": config.norm or ("-" if config.model in NORM_FREE else "bn"),
                                "seeds": len(runs), "max_epochs": config.run.max_epochs,
                                "epochs_run": "/".join(str(r["epochs_run"]) for r in runs),
                                "best_epoch": "/".join(str(r["best_epoch"]) for r in runs)}
        for key in ("rmse", "rmse_inflow", "rmse_outflow", "mae", "val_rmse"):
            values = [r[key] for r in runs if r[key] is not None]
            line[key] = statistics.fmean(values) if values else None
            line[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        line["wall_s"] = statistics.fmean(r["wall_s"] for r in runs)
        line["params"] = parameter_count(run_dir(root, row, runs[0]["seed"]))
        summary.append(line)
    return summary, per_seed, in_progress


def _pm(value: float | None, sd: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if sd is None else f"{value:.3f} ± {sd:.3f}"


def markdown_table(summary: list[dict[str, Any]]) -> str:
    """The README / docs table (protocol deepst)."""
    lines = ["| model | seeds | epochs (max; run per seed) | test RMSE | inflow | outflow | MAE | val RMSE | params "
             "| wall / seed |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        params = f"{r['params']:,}" if r.get("params") else "0"
        lines.append(
            f"| {r['label']} | {r['seeds']} | {r['max_epochs']}; {r['epochs_run']} "
            f"| **{_pm(r['rmse'], r['rmse_sd'])}** | {_pm(r['rmse_inflow'], r['rmse_inflow_sd'])} "
            f"| {_pm(r['rmse_outflow'], r['rmse_outflow_sd'])} "
            f"| {_pm(r['mae'], r['mae_sd'])} | {_pm(r['val_rmse'], r['val_rmse_sd'])} | {params} "
            f"| {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def plot(summary: list[dict[str, Any]], per_seed: list[dict[str, Any]], results: Path,
         in_progress: list[dict[str, Any]] = ()) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    bars = [r for r in summary if r["model"] != "historical_average"]
    ha = next((r["rmse"] for r in summary if r["model"] == "historical_average"), None)
    if bars:
        fig, ax = plt.subplots(figsize=(8, 4))
        x = range(len(bars))
        ax.bar(x, [r["rmse"] for r in bars], yerr=[r["rmse_sd"] or 0.0 for r in bars], capsize=5, color="tab:blue")
        for i, r in enumerate(bars):
            seeds = [s["rmse"] for s in per_seed if s["row"] == r["model"]]
            ax.plot([i] * len(seeds), seeds, "k.", markersize=4)
            ax.text(i, r["rmse"] + (r["rmse_sd"] or 0) + 0.05, f"{r['rmse']:.2f}\n(n={r['seeds']})", ha="center",
                    fontsize=8)
        if ha is not None:
            ax.axhline(ha, color="tab:red", ls="--", label=f"historical average {ha:.2f}")
        ax.axhline(GOAL_RMSE, color="tab:green", ls=":", label=f"ACFM goal {GOAL_RMSE}")
        ax.set_xticks(list(x), [r["model"] for r in bars])
        ax.set_ylabel("test RMSE (deepst protocol)")
        ax.set_ylim(5.0, max(9.0, (ha or 0) + 0.5))
        ax.set_title("BikeNYC, last 240 h; mean ± sd over seeds (dots: seeds)")
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        path = results / "leaderboard.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    acfm = sorted([s for s in [*per_seed, *in_progress] if s["row"] == "acfm" and s.get("curve")],
                  key=lambda s: s["seed"])
    if acfm:
        fig, ax = plt.subplots(figsize=(8, 4))
        for i, s in enumerate(acfm):
            epochs = [c[0] for c in s["curve"]]
            color = f"C{i}"
            state = "" if "rmse" in s else f" (running: {s['epochs_run']}/{s['max_epochs']} epochs)"
            ax.plot(epochs, [c[1] for c in s["curve"]], color=color, label=f"seed {s['seed']}: val (EMA){state}")
            if s["curve"][0][2] is not None:
                ax.plot(epochs, [c[2] for c in s["curve"]], color=color, alpha=0.35, lw=0.8)
            if "rmse" in s:
                ax.plot([s["best_epoch"]], [s["rmse"]], "o", color=color,
                        label=f"seed {s['seed']}: test {s['rmse']:.2f}")
        ax.axhline(GOAL_RMSE, color="tab:green", ls=":", label=f"goal {GOAL_RMSE} (mean of 3 seeds)")
        ax.axhline(STRETCH_RMSE, color="tab:olive", ls=":", label=f"stretch {STRETCH_RMSE}")
        ax.set_ylim(5.0, 9.0)
        ax.set_xlabel("epoch")
        ax.set_ylabel("RMSE (deepst protocol)")
        ax.set_xlim(0, max(s["max_epochs"] for s in acfm))
        ax.set_title("ACFM from scratch: val RMSE per epoch (faint: raw weights); dots: test at the best epoch",
                     fontsize=9)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = results / "leaderboard_acfm_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ns, _ = parse_bench(Leaderboard, argv, prog="python -m benchmarks leaderboard",
                        description=__doc__.split("\n\n")[0])
    data_dir = bikenyc_dir(ns.data_dir)
    if data_dir is None:
        return 0
    root = Path(ns.out_dir) if ns.out_dir else REPO / "runs" / "leaderboard"
    results = output_dir()
    if ns.threads is not None:
        import torch

        torch.set_num_threads(ns.threads)
    if not ns.report_only:
        for seed in ns.seeds:  # seed-major: every row gets its first seed before any row gets a third
            for row in ns.models:
                if row == "historical_average" and seed != ns.seeds[0]:
                    continue
                config = row_config(row, seed, root, ns.epochs, data_dir)
                if is_finished(Path(config.run.out_dir), config):
                    print(f"{row} seed {seed}: done already ({config.run.out_dir})", flush=True)
                    continue
                result = train_claimed(config)
                if result is None:
                    print(f"{row} seed {seed}: being trained by another process, skipped", flush=True)
                    continue
                print(f"{row} seed {seed}: test RMSE {result['test']['test_rmse']:.3f} after {result['epochs']} "
                      f"epochs ({result['wall_s']:.0f} s)", flush=True)
    summary, per_seed, in_progress = collect(root, tuple(ns.models), tuple(ns.seeds), ns.epochs, data_dir)
    table = markdown_table(summary)
    print(table)
    report(
        "leaderboard",
        summary,
        columns=["model", "registered", "norm", "seeds", "max_epochs", "epochs_run", "best_epoch", "rmse", "rmse_sd",
                 "rmse_inflow", "rmse_inflow_sd", "rmse_outflow", "rmse_outflow_sd", "mae", "mae_sd", "val_rmse",
                 "val_rmse_sd", "params", "wall_s"],
        notes=[
            "protocol deepst: real BikeNYC segment, test = last 240 h (2014-09-21..30), min-max on the training "
            "slots, RMSE = global RMSE x sqrt(128/81) (81 active cells), MAE over the 81 active cells",
            "validation = last 10 % of the 1081-sample history; best epoch by val_loss is tested; recipes: "
            "stflow/configs/leaderboard_<model>.yaml; mean ± sd (sample sd) over the finished seeds",
            f"ACFM goal: test RMSE <= {GOAL_RMSE} (stretch {STRETCH_RMSE}) within 150 epochs, mean of 3 seeds",
        ],
        extra={"per_seed": [{k: v for k, v in s.items() if k != "curve"} for s in per_seed],
               "in_progress": [{k: v for k, v in s.items() if k != "curve"} for s in in_progress],
               "markdown": table, "seeds": list(ns.seeds), "epochs": ns.epochs},
        out_dir=results,
    )
    for s in in_progress:
        print(f"{s['row']} seed {s['seed']}: unfinished, {s['epochs_run']}/{s['max_epochs']} epochs, best val RMSE "
              f"{s['val_rmse']:.3f} at epoch {s['best_epoch']}")
    for path in plot(summary, per_seed, results, in_progress):
        print(f"saved {path}")
    return 0
