"""Searched backbones transferred to semantic parsing of digit scenes, scored by mIoU.

``python -m benchmarks transfer_seg [--parts searched correlation] [--seeds 0 1 2] [--num-random 3]
[--gt-seeds 0] [--workers 2] [--transfer-config transfer_seg_digits] [--freeze]``

* ``searched``: the DNA-searched digits net (``nas.transfer.DNA_DIGITS_ARCH``) against ``--num-random``
  architectures sampled from the digits space whose backbone parameter count is within ``--params-tolerance``
  (10 %) of the searched one, every architecture with every ``--seeds`` seed; the gap in mIoU points;
* ``correlation``: the 30 ground-truth architectures (``nas_digits_ground_truth.json`` in the output folder, else
  the committed one in ``benchmarks/results/``; 5-fold cross-validated classification accuracy, mean of 3 seeds)
  with every ``--gt-seeds`` seed; Kendall / Spearman / Pearson between classification truth and mIoU, beside
  "more parameters is better".

Every run is one :func:`nas.transfer.transfer_seg` with the packaged ``transfer_seg_digits`` protocol, run in a
``stflow.pool.run_tasks`` worker (one torch thread each); each run's result is cached in
``--out-dir/runs/<key>.json`` as soon as it finishes, so an interrupted benchmark resumes with the runs left.
Writes ``transfer_seg.{csv,json,png}`` to the output folder (``runs/benchmarks/``; ``--results-dir DIR``;
``--update-results``: the committed ``benchmarks/results/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import check_at_least, input_path, output_path, parse_bench, report
from benchmarks.nas_digits import GT_NAME
from stflow.config import config_to_dict, load_config, run_cli
from stflow.pool import run_tasks

PARTS = ("searched", "correlation")


@dataclass
class TransferSegBench:
    """The benchmark's options (fields = flags)."""

    parts: list[str] = field(default_factory=lambda: list(PARTS))
    transfer_config: str = "transfer_seg_digits"  # packaged nas config (or YAML file) of every transfer run
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # seeds of the searched-vs-random comparison
    num_random: int = 3
    random_sample_seed: int = 1
    params_tolerance: float = 0.10
    gt_seeds: list[int] = field(default_factory=lambda: [0])  # seeds per ground-truth architecture
    freeze: bool = False
    workers: int = 2
    out_dir: str = "runs/bench-transfer-seg"
    cached_only: bool = False  # report from the cached runs only (architectures missing a run are left out)
    reverse: bool = False  # run the ground-truth architectures last first (a 2nd process sharing --out-dir)
    progress: bool = True

    def validate(self) -> None:
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"unknown parts {sorted(unknown)}; parts: {', '.join(PARTS)}")
        check_at_least(self, num_random=1, seeds=0, gt_seeds=0, random_sample_seed=0, params_tolerance=0.0, workers=1)


# SegConfig fields that cannot change a run's result and came after the cache existed: left out of the key, so
# the cached runs keep their names (the fields the key was first made of stay in it).
_NOT_IN_KEY = ("overwrite",)


def _key(cfg: dict[str, Any]) -> str:
    kept = {k: v for k, v in cfg.items() if k not in _NOT_IN_KEY}
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def transfer_job(cfg_dict: dict[str, Any], cache: str) -> dict[str, Any]:
    """One transfer run in a worker; the result is written to ``cache`` when it finishes (and read from it when
    another process sharing ``--out-dir`` finished it meanwhile)."""
    from nas.transfer import SegConfig, transfer_seg

    if Path(cache).is_file():
        return json.loads(Path(cache).read_text())
    result = transfer_seg(SegConfig(**cfg_dict))
    Path(cache).parent.mkdir(parents=True, exist_ok=True)
    Path(cache).write_text(json.dumps(result))
    return result


def _run_all(args: TransferSegBench, cfgs: list[dict[str, Any]]) -> list[dict[str, Any] | None]:
    """Results of every config (cached ones read, the others run in the pool; None if ``cached_only``)."""
    cache_dir = Path(args.out_dir) / "runs"
    paths = [cache_dir / f"{_key(c)}.json" for c in cfgs]
    todo = [(c, str(p)) for c, p in zip(cfgs, paths) if not p.is_file()]
    if todo and not args.cached_only:
        threads = 1 if args.workers > 1 else None
        run_tasks(transfer_job, todo, args.workers, threads, "transfer runs", args.progress)
    return [json.loads(p.read_text()) if p.is_file() else None for p in paths]


def _miou_fg(result: dict[str, Any]) -> float:
    """mIoU of the 10 digits (background excluded), recomputed from the per-class IoU of a run."""
    from nas.data.scenes import BACKGROUND

    return float(np.nanmean([v for k, v in enumerate(result["test_iou"]) if k != BACKGROUND]))


def _complete(groups: list[list[dict[str, Any] | None]]) -> list[int]:
    """Indices of the groups (architectures) whose runs all finished."""
    return [i for i, g in enumerate(groups) if all(r is not None for r in g)]


def _random_archs(space: Any, target: int, args: TransferSegBench, exclude: Any) -> list[list[list[int]]]:
    from nas.export import build_network
    from nas.search.groundtruth import sample_architectures
    from nas.transfer import backbone_params

    out = []
    for arch in sample_architectures(space, space.num_architectures(), args.random_sample_seed):
        enc = [list(b) for b in arch]
        n = backbone_params(build_network(space, arch, 10))
        if enc != exclude and abs(n - target) <= args.params_tolerance * target:
            out.append(enc)
            if len(out) == args.num_random:
                return out
    raise ValueError(f"only {len(out)} architectures within {args.params_tolerance:.0%} of {target} parameters")


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    from nas.export import build_network
    from nas.search.ranking import correlations
    from nas.transfer import DNA_DIGITS_ARCH, SegConfig, backbone_params, load_space

    args, _ = parse_bench(TransferSegBench, argv, prog="python -m benchmarks transfer_seg",
                        description=__doc__.split("\n")[0])
    base = load_config(SegConfig, args.transfer_config, packages=("nas",), freeze=args.freeze, checkpoint=False,
                       progress=False)
    base_dict = config_to_dict(base)
    space = load_space(base.space)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    extra: dict[str, Any] = {"protocol": base_dict}

    def cfg(arch: Any, seed: int) -> dict[str, Any]:
        return {**base_dict, "arch": json.dumps(arch), "seed": seed}

    if "searched" in args.parts:
        searched = json.loads(DNA_DIGITS_ARCH)
        target = backbone_params(build_network(space, searched, 10))
        archs = [searched, *_random_archs(space, target, args, searched)]
        # seed-major order: an interrupted run has every architecture with its first seeds
        results = _run_all(args, [cfg(a, s) for s in args.seeds for a in archs])
        per_arch = [results[i::len(archs)] for i in range(len(archs))]
        per_arch = [[r for r in res if r is not None] for res in per_arch]  # cached_only: the finished seeds
        if not all(per_arch):
            raise ValueError("cached_only: some architectures of the searched part have no finished run yet")
        for i, (arch, res) in enumerate(zip(archs, per_arch)):
            miou = [r["test_miou"] for r in res]
            rows.append({
                "part": "searched", "arch": "DNA-searched" if i == 0 else f"random {i}", "encoding": json.dumps(arch),
                "backbone_params": res[0]["backbone_params"], "miou_mean": float(np.mean(miou)),
                "miou_std": float(np.std(miou)), "miou_fg_mean": float(np.mean([_miou_fg(r) for r in res])),
                "pretrain_acc_mean": float(np.mean([r["pretrain_test_acc"] or np.nan for r in res])),
                "seeds": len(miou), "mious": json.dumps([round(m, 4) for m in miou]),
                "cpu_s_mean": float(np.mean([r.get("cpu_seconds", np.nan) for r in res])),
            })
        searched_mean = rows[0]["miou_mean"]
        random_mean = float(np.mean([r["miou_mean"] for r in rows[1:]]))
        gap = 100 * (searched_mean - random_mean)
        gap_fg = 100 * (rows[0]["miou_fg_mean"] - float(np.mean([r["miou_fg_mean"] for r in rows[1:]])))
        extra["searched_vs_random"] = {"gap_points": gap, "gap_points_fg": gap_fg, "searched": searched_mean,
                                       "random": random_mean, "seeds": args.seeds, "target_params": target}
        used = [len(res) for res in per_arch]  # seeds finished per architecture (fewer only with cached_only)
        notes.append(f"searched vs random (equal params +-{args.params_tolerance:.0%}, seeds {args.seeds}, "
                     f"finished per architecture {used}): "
                     f"mIoU {searched_mean:.4f} vs {random_mean:.4f}, gap {gap:+.2f} points "
                     f"({gap_fg:+.2f} without background)")
    if "correlation" in args.parts:
        gt = json.loads(input_path(GT_NAME).read_text())
        archs = [a["encoding"] for a in gt["architectures"]]
        cfgs = [cfg(a, s) for a in archs for s in args.gt_seeds]
        results = _run_all(args, cfgs[::-1])[::-1] if args.reverse else _run_all(args, cfgs)
        k = len(args.gt_seeds)
        groups = [results[i * k:(i + 1) * k] for i in range(len(archs))]
        done = _complete(groups)  # every architecture unless cached_only
        archs = [archs[i] for i in done]
        miou = [float(np.mean([r["test_miou"] for r in groups[i]])) for i in done]
        miou_fg = [float(np.mean([_miou_fg(r) for r in groups[i]])) for i in done]
        acc = [gt["architectures"][i]["accuracy"] for i in done]
        params = [gt["architectures"][i]["params"] for i in done]
        for name, x, y in [("classification truth vs mIoU", acc, miou), ("classification truth vs mIoU (digits)",
                           acc, miou_fg), ("more params vs mIoU", params, miou)]:
            rows.append({"part": "correlation", "arch": name, **correlations(x, y)})
        extra["correlation"] = {"gt_seeds": args.gt_seeds, "encodings": archs, "miou": miou, "miou_fg": miou_fg,
                                "accuracy": acc, "params": params}
        notes.append(f"ground truth: {len(archs)} of {len(groups)} architectures, mIoU seeds {args.gt_seeds}, "
                     f"mIoU range {min(miou):.3f}-{max(miou):.3f}")
        _plot(extra, output_path("transfer_seg.png"))
    notes.append(f"protocol: packaged config {args.transfer_config} (freeze={args.freeze}); "
                 f"{time.perf_counter() - t0:.0f} s wall, {args.workers} workers")
    extra["options"] = dataclasses.asdict(args)
    report("transfer_seg", rows, notes=notes, extra=extra)
    return 0


def _plot(extra: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = extra["correlation"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    axes[0].scatter(c["accuracy"], c["miou"], s=18)
    axes[0].set_xlabel("classification truth (5-fold CV accuracy)")
    axes[0].set_ylabel("digit-scene mIoU (11 classes)")
    axes[1].scatter(c["params"], c["miou"], s=18, color="tab:orange")
    axes[1].set_xlabel("parameters")
    if "searched_vs_random" in extra:
        s = extra["searched_vs_random"]
        for ax in axes:
            ax.axhline(s["searched"], color="tab:red", lw=1, label="DNA-searched (mean)")
            ax.axhline(s["random"], color="gray", lw=1, ls="--", label="random, equal params (mean)")
        axes[0].legend(fontsize=7)
    fig.suptitle("Transfer to digit scenes: mIoU of the ground-truth architectures")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")
