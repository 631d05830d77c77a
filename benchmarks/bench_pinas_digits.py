"""Pi-NAS on digits: the paper's ablation (cross-path learning x path-restricted mean teacher) against the
cross-validated stand-alone ground truth, beside DNA, BossNAS and the seed-vs-seed ceiling.

``python -m benchmarks pinas_digits [--seeds 0 1 2] [--variant full cross restricted moco] [--norm bn|bkn]
[--epochs N] [--rate-sample N] [--workers 2] [--search-config pinas_digits|FILE]``

Variants: ``full`` = cross-path on, restricted teacher on (Pi-NAS); ``cross`` = cross-path only; ``restricted`` =
restricted teacher only; ``moco`` = both off (a plain MoCo supernet, two paths per step, each query against its
own path's key, every key parameter moved by the EMA). Same ground truth and protocol as
``benchmarks/bench_dna_digits.py`` / ``bench_bossnas_digits.py``: Kendall / Spearman / Pearson between the Pi-NAS
score (probe accuracy after recalibration, cross-entropy as tie-break) and mean stand-alone accuracy of the 30
architectures; rating stability = mean pairwise Kendall between search seeds over every rated architecture; the
two shifts of each run (feature shift: per layer RMS ``|mu_A - mu_B| / sigma`` of the layer input under two random
prefixes, averaged over layers; parameter shift: ``||d theta_k|| / ||theta_k||`` per step, averaged). DNA and
BossNAS rows are read from ``{dna,bossnas}_digits.json`` in the output folder, else the committed ones in
``benchmarks/results/``. Writes ``pinas_digits.{csv,json,png}`` to the output folder (``runs/benchmarks/``;
``--results-dir DIR``; ``--update-results``: the committed ``benchmarks/results/``); finished runs in
``--out-dir`` are reused.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from benchmarks.harness import check_at_least, input_path, output_path, parse_bench, report
from benchmarks.nas_digits import GroundTruthOptions, describe_ground_truth, ground_truth, gt_path, plot_agreement
from nas.methods.pinas import DEFAULT_CONFIG, PiNASConfig, run_pinas
from nas.search.groundtruth import seed_ceiling
from nas.search.ranking import correlations, evaluate
from nas.search.ratings import ArchitectureRatings, load_any_ratings
from stflow.config import load_config, run_cli
from stflow.pool import run_tasks

VARIANTS = {  # name: (cross_path, restricted_teacher)
    "full": (True, True),
    "cross": (True, False),
    "restricted": (False, True),
    "moco": (False, False),
}


@dataclass
class PiNASDigitsBench(GroundTruthOptions):
    """The benchmark's options (fields = flags; ``--out`` is ``--out-dir``)."""

    search_config: str = DEFAULT_CONFIG  # Pi-NAS config (packaged name or YAML file)
    norm: str = "bn"  # bn | bkn
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # search seeds
    variant: list[str] = field(default_factory=lambda: list(VARIANTS))
    epochs: int | None = None  # override the config's epochs
    rate_sample: int | None = None  # rate this many random architectures plus the ground truth's (None: config)
    workers: int = 1  # searches run in parallel processes (1 torch thread each when > 1)
    out_dir: str = "runs/bench-pinas-digits"
    fresh: bool = False

    cli_aliases = {"--out": "--out_dir"}

    def validate(self) -> None:
        super().validate()
        if self.norm not in ("bn", "bkn"):
            raise ValueError(f"norm must be bn or bkn, got {self.norm!r}")
        if not self.variant or set(self.variant) - set(VARIANTS):
            raise ValueError(f"variant must be among {list(VARIANTS)}, got {self.variant}")
        check_at_least(self, seeds=0, epochs=1, rate_sample=0, workers=1)  # rate_sample 0: the ground truth only


def _search(cfg: PiNASConfig) -> dict[str, Any]:
    return run_pinas(cfg, log=lambda s: None)


def other_methods() -> list[dict[str, Any]]:
    """DNA and BossNAS means (Kendall; Spearman averaged over their seeds) from their saved benchmark JSONs."""
    rows = []
    for name, file in (("DNA", "dna_digits.json"), ("BossNAS", "bossnas_digits.json")):
        path = input_path(file)
        if not path.is_file():
            continue
        saved = json.loads(path.read_text()).get("rows", [])
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in saved:
            if r.get("rater") == name and isinstance(r.get("seed"), int):
                groups.setdefault(str(r.get("variant") or r.get("norm")), []).append(r)
        for label, rs in groups.items():
            rows.append({"rater": f"{name} {label} (from {file})", "variant": "-", "seed": f"{len(rs)} seeds",
                         "kendall": float(np.mean([r["kendall"] for r in rs])),
                         "spearman": float(np.mean([r["spearman"] for r in rs]))})
    return rows


def rating_stability(tables: list[ArchitectureRatings]) -> float:
    """Mean pairwise Kendall between seeds over the architectures every seed rated."""
    common = set.intersection(*[{json.dumps(r["encoding"]) for r in t.rows} for t in tables])
    encs = [json.loads(e) for e in sorted(common)]
    scores = [[t.score(e) for e in encs] for t in tables]
    taus = [stats.kendalltau(scores[i], scores[j]).statistic for i, j in itertools.combinations(range(len(tables)), 2)]
    return float(np.mean(taus))


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    args, _ = parse_bench(PiNASDigitsBench, argv, prog="python -m benchmarks pinas_digits",
                        description=__doc__.split("\n")[0], packages=("nas",))
    t_start = time.perf_counter()
    base = load_config(PiNASConfig, args.search_config, packages=("nas",), norm=args.norm, progress=False)
    if args.epochs is not None:
        base = dataclasses.replace(base, epochs=args.epochs)
    if args.rate_sample is not None:
        base = dataclasses.replace(base, rate_sample=args.rate_sample, rate_include=str(gt_path()))
    gt = ground_truth(base.space, args)
    encodings = [a["encoding"] for a in gt["architectures"]]
    acc = [a["accuracy"] for a in gt["architectures"]]
    rows: list[dict[str, Any]] = [
        {"rater": "seed-vs-seed ceiling", "variant": "-", "seed": "-", "kendall": seed_ceiling(gt)},
        {"rater": "more params is better", "variant": "-", "seed": "-",
         **_corr(correlations([a["params"] for a in gt["architectures"]], acc))},
        *other_methods(),
    ]
    out = Path(args.out_dir)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    runs = {}
    for variant in args.variant:
        cross, restricted = VARIANTS[variant]
        for seed in args.seeds:
            runs[(variant, seed)] = dataclasses.replace(
                base, cross_path=cross, restricted_teacher=restricted, seed=seed,
                out_dir=str(out / f"{variant}-{args.norm}-seed{seed}"))
    summaries = run_tasks(_search, [(c,) for c in runs.values()], args.workers, 1 if args.workers > 1 else None,
                          "pinas searches", progress=False)
    raters: dict[str, list[float]] = {}
    for variant in args.variant:
        tables, taus, spears = [], [], []
        for seed in args.seeds:
            cfg = runs[(variant, seed)]
            summary = summaries[list(runs).index((variant, seed))]
            table = load_any_ratings(Path(cfg.out_dir) / "ratings.json")
            assert isinstance(table, ArchitectureRatings)
            tables.append(table)
            res = evaluate(table, encodings, acc)
            info = json.loads((Path(cfg.out_dir) / "supernet" / "trained.json").read_text())
            rows.append({"rater": "Pi-NAS", "variant": variant, "seed": seed, **_corr(res),
                         "tau_vs_params": evaluate(table, encodings, [a["params"] for a in gt["architectures"]])[
                             "kendall"],
                         "feature_shift": info["feature_shift_mean"], "param_shift": info["param_shift_mean"],
                         "epochs": cfg.epochs, "rated": len(table.rows),
                         "seconds": info["train_seconds"] + info["probe_seconds"] + summary.get("rate_seconds", 0.0)})
            taus.append(res["kendall"])
            spears.append(res["spearman"])
        mean_row = {"rater": "Pi-NAS mean", "variant": variant, "seed": "all", "kendall": float(np.mean(taus)),
                    "spearman": float(np.mean(spears)),
                    "feature_shift": float(np.mean([r["feature_shift"] for r in rows[-len(args.seeds):]])),
                    "param_shift": float(np.mean([r["param_shift"] for r in rows[-len(args.seeds):]]))}
        rows.append(mean_row)
        if len(tables) > 1:
            rows.append({"rater": "Pi-NAS seed-vs-seed (rated archs)", "variant": variant, "seed": "pairs",
                         "kendall": rating_stability(tables)})
        raters[f"Pi-NAS {variant} ({len(tables)} seeds)"] = [
            float(np.mean([t.score(e) for t in tables])) for e in encodings]
    plot = plot_agreement(gt, raters, output_path("pinas_digits.png"))
    total = time.perf_counter() - t_start
    notes = [
        describe_ground_truth(gt),
        f"norm {args.norm}; {base.epochs} epochs, batch {base.batch_size}; "
        f"{'every architecture rated' if base.rate_sample is None else f'{base.rate_sample} random + the ground-truth architectures rated'}; "  # noqa: E501
        f"total {total:.0f} s",
        "variants: full = cross-path + restricted teacher (Pi-NAS), cross = cross-path only, restricted = restricted "
        "teacher only, moco = neither (plain MoCo supernet, two paths per step)",
        "feature_shift: mean over layers of RMS_c |mu_A - mu_B| / sigma (layer input, two random prefixes, training "
        "mode, final supernet); param_shift: mean per step of ||d theta_k|| / ||theta_k|| (whole key encoder)",
        "seed-vs-seed (rated archs): Kendall between two search seeds' scores of every architecture both rated",
        f"scatter of each variant's seed-mean score against accuracy: {plot}",
    ]
    report("pinas_digits", rows,
           columns=["rater", "variant", "seed", "kendall", "spearman", "pearson", "tau_vs_params", "feature_shift",
                    "param_shift", "epochs", "rated", "seconds"],
           notes=notes, extra={"ground_truth": str(gt_path()), "total_seconds": total, "config": base.to_json()})
    return 0


def _corr(res: dict) -> dict:
    return {k: float(res[k]) for k in ("kendall", "spearman", "pearson")}
