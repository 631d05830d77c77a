"""Multi-step horizons on real BikeNYC: per-step test RMSE at H = 1..6 for baselines, recursive rollouts of the
leaderboard checkpoints and direct multi-output heads trained here.

``python -m benchmarks multistep [--horizon 6] [--direct-models stresnet] [--seeds 777] [--epochs N]
[--leaderboard-dir DIR] [--out-dir DIR] [--report-only]``.

Rows (every one scored by :func:`stflow.evaluate.evaluate` at ``--horizon`` H on the SAME origins: the test targets
``t`` whose ``t .. t+H-1`` all lie in the test period, 235 of the 240 for H = 6):

- historical average and persistence (no checkpoint; the average is fitted on the training slots, val_fraction 0.1);
- ``--recursive-models`` (default ACFM and ST-ResNet): the leaderboard runs
  ``<leaderboard_dir>/<row>/seed*/checkpoints/best-*.ckpt`` of FINISHED runs (``metrics.json`` written), rolled out
  recursively; mean ± sd over the seeds found; a row with no finished run is skipped with a note;
- ``--direct-models`` (default ST-ResNet): trained here with the leaderboard recipe
  ``stflow/configs/leaderboard_<row>.yaml`` plus ``horizon: H, horizon_mode: direct`` into
  ``<out_dir>/<row>_direct/seed<k>/`` (kept and resumed like the leaderboard's runs), one per ``--seeds``.

Protocol ``deepst``: test = the last 240 hours (2014-09-21..30), min-max scaling on the training slots, RMSE =
global RMSE in original units x sqrt(128/81) (81 active cells), per step. Writes ``multistep.{csv,json}`` (through
:func:`benchmarks.harness.report`) and ``multistep.png`` (per-step RMSE curves) to the output folder
(``runs/benchmarks/`` by default, ``--results-dir DIR``, or the committed ``benchmarks/results/`` with
``--update-results``).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.bench_leaderboard import bikenyc_dir, is_finished, train_claimed
from benchmarks.harness import check_at_least, output_path, parse_bench, report
from stflow.train import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]
LABELS = {"acfm": "ACFM", "stresnet": "ST-ResNet", "deepstn": "DeepSTN+", "stid": "STID"}


@dataclass(frozen=True)
class Multistep:
    """``python -m benchmarks multistep`` options (flags or ``--config FILE``)."""

    horizon: int = 6  # steps scored (every row at the same H, so the same origins)
    report_steps: tuple[int, ...] = (1, 3, 6)  # steps shown in the printed table (the CSV/JSON hold every step)
    recursive_models: tuple[str, ...] = ("acfm", "stresnet")  # leaderboard rows rolled out recursively
    direct_models: tuple[str, ...] = ("stresnet",)  # leaderboard recipes trained here with a direct head of H steps
    seeds: tuple[int, ...] = (777,)  # seeds of the direct rows
    epochs: int | None = None  # direct rows: None = the recipe's max_epochs
    leaderboard_dir: str | None = None  # default <repo>/runs/leaderboard (read only)
    out_dir: str | None = None  # direct runs, default <repo>/runs/benchmarks/multistep
    data_dir: str | None = None  # BikeNYC folder, default <shared>/data/bikenyc
    report_only: bool = False  # train nothing; score what exists
    threads: int | None = 1  # torch threads (None: torch's default)

    def validate(self) -> None:
        check_at_least(self, horizon=1, seeds=0, epochs=1, threads=1)
        bad = [s for s in self.report_steps if not 1 <= s <= self.horizon]
        if bad:
            raise ValueError(f"report_steps {bad} outside 1..{self.horizon}")


def direct_config(row: str, seed: int, root: Path, horizon: int, epochs: int | None, data_dir: str) -> TrainConfig:
    """The leaderboard recipe of ``row`` with a direct head of ``horizon`` steps, the seed and the run folder."""
    base = load_config(f"leaderboard_{row}")
    changes: dict[str, Any] = dict(out_dir=str(root / f"{row}_direct" / f"seed{seed}"), seed=seed,
                                   progress_bar=False, loggers=("csv",))
    if epochs is not None:
        changes["max_epochs"] = epochs
    return replace(base, data_dir=data_dir, horizon=horizon, horizon_mode="direct",
                   run=base.run.replace(**changes)).validate()


def finished_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(seed, best checkpoint) of every finished run ``root/seed*/`` (``metrics.json`` present)."""
    found = []
    for run in sorted(root.glob("seed*")):
        best = sorted((run / "checkpoints").glob("best-*.ckpt"))
        if (run / "metrics.json").is_file() and best:
            found.append((int(run.name[len("seed"):]), best[-1]))
    return found


def steps_of(result: dict[str, Any]) -> list[float]:
    """Per-step RMSE of a :func:`stflow.evaluate.evaluate` result."""
    return [float(s["rmse"]) for s in result["steps"]]


def summarise(label: str, mode: str, source: str, per_seed: list[list[float]], origins: int,
              seeds: list[int], epochs: str = "-") -> dict[str, Any]:
    """One table row: per-step RMSE (and the mean over the steps), mean ± sd over ``per_seed``."""
    horizon = len(per_seed[0])
    row: dict[str, Any] = {"model": label, "mode": mode, "source": source, "seeds": len(per_seed),
                           "seed_list": "/".join(map(str, seeds)) or "-", "epochs": epochs, "origins": origins}
    columns = [(f"rmse_step{k + 1}", [r[k] for r in per_seed]) for k in range(horizon)]
    columns.append(("rmse_mean", [statistics.fmean(r) for r in per_seed]))
    for key, values in columns:
        row[key] = statistics.fmean(values)
        row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else None
    return row


def _pm(value: float, sd: float | None) -> str:
    return f"{value:.3f}" if sd is None else f"{value:.3f} ± {sd:.3f}"


def markdown_table(rows: list[dict[str, Any]], steps: tuple[int, ...], horizon: int) -> str:
    """The docs / README table: the chosen steps and the mean over 1..H."""
    head = "| model | mode | seeds | epochs | " + " | ".join(f"step {k}" for k in steps) + f" | mean 1..{horizon} |"
    lines = [head, "|" + "---|" * (5 + len(steps))]
    for r in rows:
        cells = [_pm(r[f"rmse_step{k}"], r[f"rmse_step{k}_sd"]) for k in steps]
        lines.append(f"| {r['model']} | {r['mode']} | {r['seeds']} | {r['epochs']} | " + " | ".join(cells)
                     + f" | {_pm(r['rmse_mean'], r['rmse_mean_sd'])} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], horizon: int, path: Path) -> Path:
    """Per-step RMSE curves, one line per row (error bars: sd over seeds); the y axis fits the rows other than
    persistence, whose far larger errors are written in the legend instead of stretching the axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    steps = list(range(1, horizon + 1))
    scaled = [r for r in rows if r["model"] != "persistence"] or rows
    low = min(r[f"rmse_step{k}"] for r in scaled for k in steps)
    high = max(r[f"rmse_step{k}"] + (r[f"rmse_step{k}_sd"] or 0.0) for r in scaled for k in steps)
    for i, r in enumerate(rows):
        values = [r[f"rmse_step{k}"] for k in steps]
        sds = [r[f"rmse_step{k}_sd"] or 0.0 for k in steps]
        style = "--" if r["mode"] == "baseline" else ("-" if r["mode"] == "direct" else "-.")
        label = f"{r['model']} ({r['mode']}, n={r['seeds']})"
        if r not in scaled:
            label += f": {values[0]:.1f} .. {values[-1]:.1f}, off scale"
        ax.errorbar(steps, values, yerr=sds, fmt=style, marker="o", ms=4, capsize=3, color=f"C{i}", label=label)
    ax.set_ylim(low - 0.5, high + 0.5)
    ax.set_xticks(steps)
    ax.set_xlabel("step ahead (hours)")
    ax.set_ylabel("test RMSE (deepst protocol)")
    ax.set_title(f"BikeNYC, last 240 h: per-step RMSE, {rows[0]['origins'] if rows else 0} origins", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from stflow.evaluate import evaluate

    ns, _ = parse_bench(Multistep, argv, prog="python -m benchmarks multistep", description=__doc__.split("\n\n")[0])
    data_dir = bikenyc_dir(ns.data_dir)
    if data_dir is None:
        return 0
    if ns.threads is not None:
        import torch

        torch.set_num_threads(ns.threads)
    board = Path(ns.leaderboard_dir) if ns.leaderboard_dir else REPO / "runs" / "leaderboard"
    root = Path(ns.out_dir) if ns.out_dir else REPO / "runs" / "benchmarks" / "multistep"
    h = ns.horizon
    data = {"dataset": "bikenyc", "data_dir": data_dir}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    per_run: list[dict[str, Any]] = []

    if not ns.report_only:  # train (or resume) the direct rows first, then score everything
        for row in ns.direct_models:
            for seed in ns.seeds:
                config = direct_config(row, seed, root, h, ns.epochs, data_dir)
                if is_finished(Path(config.run.out_dir), config):
                    continue
                trained = train_claimed(config)
                if trained is None:
                    print(f"{row} direct seed {seed}: being trained by another process, skipped", flush=True)
                    continue
                print(f"{row} direct seed {seed}: test RMSE step 1 {trained['test']['test_rmse']:.3f}, mean "
                      f"{trained['test']['test_rmse_mean']:.3f} after {trained['epochs']} epochs "
                      f"({trained['wall_s']:.0f} s)", flush=True)

    for baseline, label in (("historical_average", "historical average"), ("persistence", "persistence")):
        result = evaluate(None, baseline, data, horizon=h)
        source = "last observed frame" if baseline == "persistence" else "fitted on the training slots"
        rows.append(summarise(label, "baseline", source, [steps_of(result)], int(result["test_samples"]), []))
        per_run.append({"row": label, "seed": None, "steps": steps_of(result)})

    for row in ns.recursive_models:
        found = finished_checkpoints(board / row)
        if not found:
            notes.append(f"{LABELS.get(row, row)} (recursive) skipped: no finished run under {board / row}")
            continue
        results = [(seed, evaluate(ckpt, horizon=h)) for seed, ckpt in found]
        epochs = "/".join(str(json.loads((ckpt.parents[1] / "metrics.json").read_text())["epochs"])
                          for _, ckpt in found)
        rows.append(summarise(LABELS.get(row, row), "recursive", str(board / row), [steps_of(r) for _, r in results],
                              int(results[0][1]["test_samples"]), [s for s, _ in results], epochs))
        per_run += [{"row": f"{row} recursive", "seed": s, "checkpoint": str(c), "steps": steps_of(r)}
                    for (s, c), (_, r) in zip(found, results)]

    for row in ns.direct_models:
        results, seeds, epochs = [], [], []
        for seed in ns.seeds:
            config = direct_config(row, seed, root, h, ns.epochs, data_dir)
            out = Path(config.run.out_dir)
            if not is_finished(out, config):
                notes.append(f"{row} direct seed {seed}: no finished run in {out}, not scored")
                continue
            saved = json.loads((out / "metrics.json").read_text())
            best = sorted((out / "checkpoints").glob("best-*.ckpt"))[-1]
            result = evaluate(best)  # a direct head: scored from its H-step output
            results.append(result)
            seeds.append(seed)
            epochs.append(f"{saved['epochs']} ({saved['wall_s'] / 60:.0f} min)")
            per_run.append({"row": f"{row} direct", "seed": seed, "checkpoint": str(best), "steps": steps_of(result),
                            "epochs": saved["epochs"], "wall_s": saved["wall_s"]})
        if results:
            rows.append(summarise(LABELS.get(row, row), "direct", str(root / f"{row}_direct"),
                                  [steps_of(r) for r in results], int(results[0]["test_samples"]), seeds,
                                  "/".join(epochs)))

    table = markdown_table(rows, tuple(ns.report_steps), h)
    print(table)
    step_columns = [c for k in range(1, h + 1) for c in (f"rmse_step{k}", f"rmse_step{k}_sd")]
    report(
        "multistep",
        rows,
        columns=["model", "mode", "seeds", "seed_list", "epochs", "origins", *step_columns, "rmse_mean",
                 "rmse_mean_sd", "source"],
        notes=[
            f"protocol deepst: real BikeNYC, test = last 240 h (2014-09-21..30), origins = test targets whose {h} "
            "targets all lie in the test period; min-max on the training slots; RMSE per step = global RMSE x "
            "sqrt(128/81) (81 active cells); mean ± sd (sample sd) over seeds",
            "recursive: a one-step model fed its own predictions; direct: one network output of H frames "
            f"(leaderboard recipe + horizon {h}, loss = mean over the steps, best epoch by the mean val loss)",
            *notes,
        ],
        extra={"markdown": table, "per_run": per_run, "horizon": h},
    )
    png = plot(rows, h, output_path("multistep.png"))
    print(f"saved {png}")
    for note in notes:
        print(f"note: {note}")
    return 0
