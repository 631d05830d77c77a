"""EfficientBERT-style FFN search: does the warm-up-distilled fitness rank FFN expressions like stand-alone training,
does the learned partition beat random search, and is the searched FFN as good as the standard one for less?

``python -m benchmarks mlp_search [--tasks seqdigits listops] [--search-seeds 0 1] [--evals 24] [--workers 1]``

Per task (the packaged ``mlp_<task>`` config; every part cached under ``--out-dir``):

1. ground truth: 30 functionally distinct expressions (the standard FFN first, the rest sampled by the search's own
   proposal), shared by both layers at width 4d, each trained from scratch with 3 seeds, cross-validated over 2
   stratified folds (every example tested once per seed); mean accuracy; the seed-vs-seed ceiling (mean pairwise
   Kendall of single-seed accuracies) (``mlp_<task>_ground_truth.json`` in the output folder, started from the
   committed one in ``benchmarks/results/``);
2. fitness of the same expressions as the search computes it: inherit the warm-up-distilled supernet, distill for
   ``candidate_epochs``, validation accuracy; and the same without warm-up (from a fresh initialization); Kendall
   against the truth beside "more FFN parameters is better";
3. learned partition vs random search at equal evaluations (stage 1, ``--evals`` each, ``--search-seeds``): best
   fitness found and mean fitness of the guided evaluations;
4. the full search (``python -m nas.search mlp``): the searched network and the standard one, stand-alone with the
   ground truth's protocol; accuracy difference in points and FFN parameter ratio.

Writes ``mlp_search.{csv,json,png}`` to the output folder (``runs/benchmarks/``; ``--results-dir DIR``;
``--update-results``: the committed ``benchmarks/results/``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import cache_path, check_at_least, check_not_empty, output_path, parse_bench, report
from stflow.config import run_cli

INIT_SAMPLES = 8  # the packaged mlp configs' init_samples: stage-1 evaluations before the guided ones


@dataclass
class MLPSearchBench:
    """Options (fields = flags)."""

    tasks: list[str] = field(default_factory=lambda: ["seqdigits", "listops"])
    num_exprs: int = 30
    gt_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    gt_folds: int = 2
    gt_epochs: dict[str, float] = field(default_factory=lambda: {"seqdigits": 12, "listops": 10})
    search_seeds: list[int] = field(default_factory=lambda: [0, 1])
    evals: int = 24
    workers: int = 1
    out_dir: str = "runs/bench-mlp"  # every part's cache (fitness, searches, full search)

    def validate(self) -> None:
        check_not_empty(self, "tasks")
        missing = [t for t in self.tasks if t not in self.gt_epochs]
        if missing:
            raise ValueError(f"tasks: no gt_epochs for {missing} (gt_epochs has {sorted(self.gt_epochs)})")
        if self.num_exprs < 3 or len(self.gt_seeds) < 2:
            raise ValueError("need >= 3 expressions (--num-exprs) and >= 2 ground-truth seeds (--gt-seeds)")
        check_at_least(self, gt_seeds=0, gt_folds=2, search_seeds=0, workers=1)
        if isinstance(self.evals, bool) or self.evals <= INIT_SAMPLES:
            raise ValueError(f"evals must be >= {INIT_SAMPLES + 1} ({INIT_SAMPLES} initial samples, then guided "
                             f"ones), got {self.evals}")
        bad = {t: e for t, e in self.gt_epochs.items() if isinstance(e, bool) or not e > 0}
        if bad:
            raise ValueError(f"gt_epochs must be > 0, got {bad}")


def _cached(path: Path, fn, task: str, search: dict[str, Any] | None = None) -> Any:
    """``fn()``, stored in ``path`` with the task's data settings (and ``search``: the config values that determine
    a search's result); a file made on other data or by another search config is refused."""
    from nas.cache import differences, write_json
    from nas.ffn.distill import TASKS

    key = {"task": task, "data": TASKS[task].data, **({"search": search} if search is not None else {})}
    if path.is_file():
        data = json.loads(path.read_text())
        stored = data.get("made_on", {"task": task, "data": None})
        if stored != key:
            raise ValueError(f"{path} was made on other data or by another search config "
                             f"({differences(stored, key)}); remove it or pass another --out-dir")
        return data
    data = {**fn(), "made_on": key}
    write_json(path, data)
    return data


def _method(task: str, out_dir: Path, **changes: Any):
    from nas.cli import method_config
    from nas.methods.mlp import MLPSearch

    argv = ["--config", f"mlp_{task}", "--out-dir", str(out_dir), "--no-progress"]
    for k, v in changes.items():
        argv += [f"--{k}", json.dumps(v) if isinstance(v, list) else str(v)]
    _, cfg = method_config("mlp", argv)
    return MLPSearch(cfg)


def ground_truth(task: str, opts: MLPSearchBench) -> dict[str, Any]:
    from nas.ffn.groundtruth import build_expr_ground_truth, sample_distinct

    exprs = sample_distinct(opts.num_exprs, seed=0)
    return build_expr_ground_truth(task, cache_path(f"mlp_{task}_ground_truth.json"), exprs, opts.gt_seeds,
                                   opts.gt_folds, opts.gt_epochs[task], val_fraction=0.05, workers=opts.workers)


def fitness_of(task: str, exprs: list[str], opts: MLPSearchBench) -> dict[str, Any]:
    """Warm-up fitness and no-warm-up fitness of every expression (cached)."""
    out = Path(opts.out_dir) / task

    def compute() -> dict[str, Any]:
        m = _method(task, out / "fitness")
        m.prepare()
        layers = m.cfg.layers
        t0 = time.perf_counter()
        warm = [m.fitness((e,) * layers) for e in exprs]
        t_warm = time.perf_counter() - t0
        fresh = m._new_student()  # the supernet before warm-up: same init, no distillation
        m.warm, kept = fresh, m.warm
        cold = [m.fitness((e,) * layers) for e in exprs]
        m.warm = kept
        return {"exprs": exprs, "warm": warm, "cold": cold, "seconds_per_candidate": t_warm / len(exprs)}

    return _cached(out / "fitness.json", compute, task)


def search_compare(task: str, opts: MLPSearchBench) -> dict[str, Any]:
    """Stage-1 search with the learned partition and with random proposals, ``evals`` each, per seed (cached)."""
    out = Path(opts.out_dir) / task
    rows = {}
    for searcher in ("partition", "random"):
        for s in opts.search_seeds:
            def compute(searcher: str = searcher, s: int = s) -> dict[str, Any]:
                m = _method(task, out / "fitness", stage1_evals=opts.evals)  # reuses the teacher and warm-up
                m.prepare()
                m.cfg.searcher, m.cfg.seed = searcher, s
                m.out_dir = out / f"search_{searcher}_{s}"  # (prepare() above loaded the shared warm-up)
                m.out_dir.mkdir(parents=True, exist_ok=True)
                m.train_block(0)
                st = m.stages[0]
                return {"fitness": list(st["ratings"].values()), "in_region": st["in_region"], "best": st["best"][0]}

            rows[f"{searcher}_{s}"] = _cached(out / f"search_{searcher}_{s}.json", compute, task)
    return rows


def full_search(task: str, opts: MLPSearchBench) -> dict[str, Any]:
    """The packaged search end to end, then searched vs standard stand-alone with the ground-truth protocol."""
    from nas.ffn.groundtruth import standalone_accuracy
    from nas.ffn.transformer import FFNArch

    out = Path(opts.out_dir) / task

    def compute() -> dict[str, Any]:
        run_dir = Path(f"runs/mlp-{task}")  # the packaged out_dir: reuses a finished `python -m nas.search mlp`
        res = _method(task, run_dir).run()
        m = _method(task, run_dir)
        parts = ["teacher/teacher.json", "warmup/warmup.json", *(f"stage_{k}/ratings.json" for k in range(3))]
        seconds = sum(json.loads((run_dir / p).read_text())["seconds"] for p in parts)  # training + search
        arch = FFNArch(**{k: tuple(v) for k, v in res["arch"].items()})
        std = FFNArch.standard(m.cfg.layers, m.cfg.max_width)
        accs = {}
        for name, a in (("searched", arch), ("standard", std)):
            per_seed = []
            for s in opts.gt_seeds:
                runs = [standalone_accuracy(task, a, s, f, opts.gt_folds, opts.gt_epochs[task], val_fraction=0.05)
                        for f in range(opts.gt_folds)]
                per_seed.append(sum(c for c, _ in runs) / sum(n for _, n in runs))
            accs[name] = per_seed
        return {"arch": res["arch"], "param_ratio": res["param_ratio"], "ffn_params": res["ffn_params"],
                "standard_ffn_params": res["standard_ffn_params"], "search_seconds": seconds,
                "searched_acc": accs["searched"], "standard_acc": accs["standard"]}

    from nas.cache import plain

    record = plain(_method(task, Path(f"runs/mlp-{task}")).artefacts()[-1].fields)  # the searched arch's config
    return _cached(out / "full_search.json", compute, task, search=record)


def plot(results: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 8), squeeze=False)
    for j, t in enumerate(tasks):
        r = results[t]
        truth = [a["accuracy"] for a in r["gt"]["architectures"]]
        ax = axes[0, j]
        ax.scatter(r["fit"]["warm"], truth, label="warm-up fitness")
        ax.scatter(r["fit"]["cold"], truth, marker="x", label="no warm-up")
        ax.set_xlabel("fitness (val acc after short distillation)")
        ax.set_ylabel("stand-alone CV accuracy")
        ax.set_title(f"{t}: Kendall {r['row']['kendall_warm']:.2f} (ceiling {r['row']['ceiling']:.2f})")
        ax.legend()
        ax = axes[1, j]
        for key, fit in r["search"].items():
            ax.plot(np.maximum.accumulate(fit), color="C0" if key.startswith("partition") else "C1", label=key)
        ax.set_xlabel("evaluations")
        ax.set_ylabel("best fitness so far")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"saved {path}")


def main(argv: list[str] | None = None) -> int:
    from nas.ffn.groundtruth import expr_seed_ceiling
    from nas.ffn.transformer import FFNArch
    from nas.search.ranking import correlations

    opts, _ = parse_bench(MLPSearchBench, argv, prog="python -m benchmarks mlp_search")
    rows, results = [], {}
    for task in opts.tasks:
        gt = ground_truth(task, opts)
        exprs = [a["expr"] for a in gt["architectures"]]
        truth = [a["accuracy"] for a in gt["architectures"]]
        fit = fitness_of(task, exprs, opts)
        params = [FFNArch.uniform(e, gt["layers"], gt["width"]).ffn_params(gt["d"]) for e in exprs]  # current count
        search = search_compare(task, opts)
        guided = lambda k, search=search: float(np.mean(search[k]["fitness"][8:]))  # noqa: E731  (after 8 inits)
        full = full_search(task, opts)
        row = {
            "task": task,
            "exprs": len(exprs),
            "ceiling": expr_seed_ceiling(gt),
            "kendall_warm": correlations(fit["warm"], truth)["kendall"],
            "kendall_cold": correlations(fit["cold"], truth)["kendall"],
            "kendall_params": correlations(params, truth)["kendall"],
            "s_per_candidate": fit["seconds_per_candidate"],
            "best_partition": float(np.mean([max(v["fitness"]) for k, v in search.items() if k[0] == "p"])),
            "best_random": float(np.mean([max(v["fitness"]) for k, v in search.items() if k[0] == "r"])),
            "mean_guided_partition": float(np.mean([guided(k) for k in search if k[0] == "p"])),
            "mean_guided_random": float(np.mean([guided(k) for k in search if k[0] == "r"])),
            "searched_acc": float(np.mean(full["searched_acc"])),
            "standard_acc": float(np.mean(full["standard_acc"])),
            "delta_points": 100 * (float(np.mean(full["searched_acc"])) - float(np.mean(full["standard_acc"]))),
            "param_ratio": full["param_ratio"],
            "search_s": full["search_seconds"],
        }
        rows.append(row)
        results[task] = {"gt": gt, "fit": fit, "row": row,
                         "search": {k: v["fitness"] for k, v in search.items()}, "full": full}
    notes = [
        "kendall_*: Kendall tau-b vs the mean stand-alone accuracy (3 seeds x 2-fold CV) of the same expressions",
        "kendall_params: 'more FFN parameters is better'; ceiling: mean pairwise Kendall between single seeds",
        "best_*/mean_guided_*: stage-1 fitness (val acc), mean over search seeds, equal evaluations per searcher",
        "delta_points: searched - standard FFN, stand-alone accuracy with the ground-truth protocol",
    ]
    report("mlp_search", rows, notes=notes, extra={"options": opts.__dict__,
                                                  "details": {t: {k: v for k, v in r.items() if k != "gt"}
                                                              for t, r in results.items()}})
    plot(results, output_path("mlp_search.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
