"""EfficientBERT-style search of the transformer's feed-forward network (FFN), with warm-up distillation.

Stages (each resumable from ``out_dir``; :mod:`nas.ffn` holds the space, the model, the loss and the searcher):

0. teacher (wider, standard FFN) trained with cross-entropy (``teacher/``); the student supernet (the standard FFN
   at the largest width) is distilled from it for ``warmup_epochs`` (``warmup/``): hidden-state and attention MSE
   plus soft cross-entropy (:func:`nas.ffn.distill.distill_losses`);
1. ONE expression shared by all layers (seeded with ``linear(gelu(linear(x,wb1)),wb2)``): every candidate starts
   from the warm-up weights, is distilled for ``candidate_epochs`` and scored by validation accuracy; candidates
   come from the learned space partition (``searcher: partition``) or uniformly (``random``), ``stage1_evals``
   evaluations (``stage_0/``);
2. one expression per layer, proposals seeded with stage 1's best (``stage_1/``);
3. widths and stack counts per layer in a weight-sharing supernet (the stage-2 expressions, widths ``widths``,
   1..``max_stack`` stacked FFNs) distilled from the warm-up weights with a random configuration per step; every
   configuration with FFN parameters <= ``budget_fraction`` x the standard FFN's is rated by validation accuracy
   (``stage_2/``);
4. the searched network and the standard one retrained stand-alone (``retrain_seeds``), ``architecture.json``,
   ``report.md``.

Cached artefacts (:mod:`nas.cache`): ``teacher/``, ``warmup/``, ``stage_<k>/`` and ``retrain.json`` carry a record
of the config values that determine them (each stage's includes the stages before it); a rerun reuses them only
under the same values and otherwise refuses, naming the differing keys, unless ``overwrite`` (then they are
recomputed), so a retrained result is never replaced silently. ``budget_fraction`` is checked against the smallest
FFN any expression can have before any training.

``python -m nas.search mlp [--task seqdigits|listops] [--searcher partition|random] [--out-dir DIR]``.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nas.cache import Artefact, write_json
from nas.ffn.distill import TASKS, accuracy, build_model, load_task, train
from nas.ffn.expressions import STANDARD_FFN, encode, expression_hash, is_valid, sample_expression
from nas.ffn.groundtruth import fit_and_test
from nas.ffn.partition import SEARCHERS, SearchRecord, run_search
from nas.ffn.transformer import FFNArch, TinyTransformer
from nas.methods.base import SearchMethod, register

__all__ = ["MLPSearchConfig", "MLPSearch", "Supernet"]


@dataclass
class MLPSearchConfig:
    """An FFN search (defaults: sequential digits, the packaged ``mlp_seqdigits`` config)."""

    task: str = "seqdigits"  # seqdigits | listops
    d: int = 32
    heads: int = 2
    layers: int = 2
    teacher_d: int = 64
    teacher_layers: int = 2
    teacher_epochs: float = 20
    widths: list[int] = field(default_factory=lambda: [32, 64, 96, 128])  # wb1 widths (expansion 1..4)
    max_stack: int = 2
    warmup_epochs: float = 10
    candidate_epochs: float = 1.0
    stage1_evals: int = 24
    stage2_evals: int = 16
    init_samples: int = 8
    retrain_interval: int = 4
    height_levels: list[int] = field(default_factory=lambda: [16, 32, 64])
    searcher: str = "partition"  # partition | random
    exploration: float = 0.0
    min_height: int = 3
    max_height: int = 6
    stage3_epochs: float = 10
    stage3_candidates: int = 4  # each layer's expression in stage 3: from the K best stage-2 expression sets
    budget_fraction: float = 0.6  # FFN params <= this x the standard FFN's (largest width, one stack)
    final_candidates: int = 8  # re-rank the N best stage-3 configurations by stand-alone training (0: off)
    final_epochs: float = 12
    final_seeds: list[int] = field(default_factory=lambda: [100, 101])
    lr: float = 3e-3
    batch_size: int = 64
    hidden_ratio: float = 1.0
    pred_ratio: float = 1.0
    retrain: bool = True
    retrain_epochs: float = 15
    retrain_seeds: list[int] = field(default_factory=lambda: [0, 1])
    data_seed: int = 0
    threads: int | None = 1  # torch threads (None: leave torch's default)
    out_dir: str = "runs/mlp-seqdigits"
    seed: int = 0
    progress: bool = True
    resume: bool = True
    overwrite: bool = False  # recompute cached artefacts made with another config (else refused)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {tuple(TASKS)}, got {self.task!r}")
        if self.searcher not in SEARCHERS:
            raise ValueError(f"searcher must be one of {SEARCHERS}, got {self.searcher!r}")
        if not self.widths or min(self.widths) < self.d:
            raise ValueError(f"widths must be >= d={self.d} (wb1 never narrows the model), got {self.widths}")
        if self.teacher_layers % self.layers:
            raise ValueError("teacher_layers must be a multiple of layers (uniform layer map)")
        if self.max_stack < 1 or not 0 < self.budget_fraction:
            raise ValueError("max_stack must be >= 1 and budget_fraction > 0")
        for name in ("stage1_evals", "stage2_evals", "init_samples", "retrain_interval", "d", "heads", "layers",
                     "teacher_d", "teacher_layers", "batch_size", "stage3_candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.final_candidates < 0 or self.final_candidates and not self.final_seeds:
            raise ValueError("final_candidates must be >= 0, with final_seeds when > 0")
        for name in ("teacher_epochs", "warmup_epochs", "candidate_epochs", "stage3_epochs", "retrain_epochs", "lr",
                     "final_epochs"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        if not 1 <= self.min_height <= self.max_height:
            raise ValueError(f"need 1 <= min_height <= max_height, got {self.min_height}, {self.max_height}")
        if self.retrain and not self.retrain_seeds:
            raise ValueError("retrain_seeds must not be empty when retrain is true")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")

    @property
    def max_width(self) -> int:
        return max(self.widths)


class Supernet(nn.Module):
    """The student (weight-sharing over expressions, widths and stacks) and its ``fit_dense`` (d -> teacher d)."""

    def __init__(self, student: TinyTransformer, teacher_d: int) -> None:
        super().__init__()
        self.student = student
        self.fit_dense = nn.Linear(student.d, teacher_d)


@register
class MLPSearch(SearchMethod):
    """EfficientBERT: FFN expressions, then per-layer expressions, then widths/stacks, with warm-up distillation."""

    name = "mlp"
    config_class = MLPSearchConfig
    description = "EfficientBERT-style FFN search (expression trees, warm-up distillation, learned space partition)"

    def __init__(self, cfg: MLPSearchConfig) -> None:
        super().__init__(cfg)
        self.task, self.splits = load_task(cfg.task, seed=cfg.data_seed)
        self.teacher: TinyTransformer | None = None
        self.teacher_arch = FFNArch.standard(cfg.teacher_layers, 4 * cfg.teacher_d)
        self.warm: Supernet | None = None
        self.stages: dict[int, dict[str, Any]] = {}

    @classmethod
    def default_config(cls, argv: Sequence[str]) -> str | None:
        return "mlp_seqdigits"

    @property
    def num_blocks(self) -> int:
        return 3  # the three search stages

    def artefacts(self) -> list[Artefact]:
        """Teacher, warm-up, the three stages and (with ``retrain``) ``retrain.json``; each stage's record holds
        the values of every stage before it, as it starts from their results."""
        cfg, out = self.cfg, self.out_dir

        def values(*names: str) -> dict[str, Any]:
            return {name: getattr(cfg, name) for name in names}

        teacher = values("task", "teacher_d", "heads", "teacher_layers", "teacher_epochs", "lr", "batch_size", "seed",
                         "data_seed")
        if TASKS[cfg.task].data:  # a procedural task's generator settings
            teacher["data"] = TASKS[cfg.task].data
        warmup = {**teacher, **values("d", "layers", "warmup_epochs", "hidden_ratio", "pred_ratio"),
                  "max_width": cfg.max_width}
        stage0 = {**warmup, **values("candidate_epochs", "stage1_evals", "init_samples", "retrain_interval",
                                     "height_levels", "searcher", "exploration", "min_height", "max_height")}
        stage1 = {**stage0, "stage2_evals": cfg.stage2_evals}
        stage2 = {**stage1, **values("widths", "max_stack", "stage3_epochs", "stage3_candidates", "budget_fraction",
                                     "final_candidates", "final_epochs", "final_seeds")}
        found = [Artefact(out / "teacher", teacher, "teacher"), Artefact(out / "warmup", warmup, "warm-up supernet"),
                 Artefact(out / "stage_0", stage0, "stage 1 search"),
                 Artefact(out / "stage_1", stage1, "stage 2 search"),
                 Artefact(out / "stage_2", stage2, "stage 3 search")]
        if cfg.retrain:
            retrain = {**stage2, **values("retrain_epochs", "retrain_seeds")}
            found.append(Artefact(out / "retrain.json", retrain, "retraining result"))
        return found

    def check_budget(self) -> None:
        """Stage 3 rates the configurations with FFN params <= ``budget_fraction`` x the standard FFN's; every FFN
        of a valid expression has at least ``2 (d^2 + d)`` parameters per layer (wb1 reads the d-wide input and
        gives >= d channels, wb2 gives d), so a smaller budget leaves nothing to rate."""
        cfg = self.cfg
        budget = cfg.budget_fraction * FFNArch.standard(cfg.layers, cfg.max_width).ffn_params(cfg.d)
        smallest = cfg.layers * 2 * (cfg.d * cfg.d + cfg.d)
        if budget < smallest:
            raise ValueError(f"budget_fraction {cfg.budget_fraction:g} allows {budget:.0f} FFN params; the cheapest "
                             f"FFN configuration costs at least {smallest} ({cfg.layers} layers x 2 (d^2 + d), "
                             f"d={cfg.d})")

    # ------------------------------------------------------------------------------------------ set-up
    def _new_student(self, max_stack: int = 1) -> Supernet:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + 1)
        return Supernet(build_model(self.task, cfg.d, cfg.heads, cfg.layers, cfg.max_width, max_stack), cfg.teacher_d)

    def prepare(self) -> None:
        """Teacher and warm-up supernet (trained, or loaded from ``out_dir``)."""
        cfg, out = self.cfg, self.out_dir
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        tdir, wdir = out / "teacher", out / "warmup"
        tdir.mkdir(parents=True, exist_ok=True)
        wdir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        teacher = build_model(self.task, cfg.teacher_d, cfg.heads, cfg.teacher_layers, 4 * cfg.teacher_d)
        if (tdir / "teacher.pt").is_file():
            teacher.load_state_dict(torch.load(tdir / "teacher.pt", weights_only=True))
        else:
            t0 = time.perf_counter()
            train(teacher, self.teacher_arch, self.splits["train"], cfg.teacher_epochs, cfg.lr, cfg.batch_size,
                  cfg.seed)
            torch.save(teacher.state_dict(), tdir / "teacher.pt")
            write_json(tdir / "teacher.json", {"val_acc": accuracy(teacher, self.teacher_arch, self.splits["val"]),
                                               "test_acc": accuracy(teacher, self.teacher_arch, self.splits["test"]),
                                               "seconds": time.perf_counter() - t0})
        self.teacher = teacher.eval()
        warm = self._new_student()
        if (wdir / "supernet.pt").is_file():
            warm.load_state_dict(torch.load(wdir / "supernet.pt", weights_only=True))
        else:
            t0 = time.perf_counter()
            arch = FFNArch.standard(cfg.layers, cfg.max_width)
            self._distill(warm, arch, cfg.warmup_epochs, cfg.seed)
            torch.save(warm.state_dict(), wdir / "supernet.pt")
            write_json(wdir / "warmup.json", {"val_acc": accuracy(warm.student, arch, self.splits["val"]),
                                              "seconds": time.perf_counter() - t0})
        self.warm = warm

    def _distill(self, net: Supernet, arch: Any, epochs: float, seed: int) -> float:
        cfg = self.cfg
        assert self.teacher is not None
        return train(net.student, arch, self.splits["train"], epochs, cfg.lr, cfg.batch_size, seed,
                     teacher=(self.teacher, self.teacher_arch), fit_dense=net.fit_dense,
                     hidden_ratio=cfg.hidden_ratio, pred_ratio=cfg.pred_ratio)

    # ------------------------------------------------------------------------------------------ fitness
    def fitness(self, exprs: Sequence[str], seed: int | None = None) -> float:
        """Validation accuracy of ``exprs`` (one per layer, largest width) after inheriting the warm-up weights and
        ``candidate_epochs`` of distillation."""
        assert self.warm is not None
        cfg = self.cfg
        net = copy.deepcopy(self.warm)
        arch = FFNArch(tuple(exprs), (cfg.max_width,) * cfg.layers, (1,) * cfg.layers)
        self._distill(net, arch, cfg.candidate_epochs, cfg.seed if seed is None else seed)
        return accuracy(net.student, arch, self.splits["val"])

    def _key(self, exprs: Sequence[str]) -> str:
        return expression_hash(list(exprs))

    def _propose(self, stage: int, seeds: Sequence[str]):
        cfg = self.cfg

        def propose(rng: random.Random) -> tuple[list[int], tuple[str, ...]]:
            if stage == 0:
                e = str(sample_expression(seeds, rng, cfg.min_height, cfg.max_height))
                exprs = (e,) * cfg.layers
            else:  # per layer, around the stage-1 winner (each layer drawn independently)
                exprs = tuple(str(sample_expression(seeds, rng, cfg.min_height, cfg.max_height))
                              if rng.random() < 0.7 else seeds[0] for _ in range(cfg.layers))
            return encode(exprs[:1] if stage == 0 else exprs), exprs

        return propose

    # ------------------------------------------------------------------------------------------ stages
    def train_block(self, k: int) -> None:
        """Run search stage ``k`` (0: shared expression, 1: per-layer expressions, 2: widths and stacks)."""
        cfg = self.cfg
        sdir = self.out_dir / f"stage_{k}"
        sdir.mkdir(parents=True, exist_ok=True)
        if (sdir / "ratings.json").is_file():
            self.stages[k] = json.loads((sdir / "ratings.json").read_text())
            return
        t0 = time.perf_counter()
        if k == 2:
            self.stages[k] = {**self._stage3(sdir), "seconds": time.perf_counter() - t0}
            write_json(sdir / "ratings.json", self.stages[k])
            return
        if k == 0:
            seeds, n_evals = [STANDARD_FFN], cfg.stage1_evals
            init_exprs = [(STANDARD_FFN,) * cfg.layers]
        else:
            best = self.stages[0]["best"][0]
            seeds, n_evals = [best], cfg.stage2_evals
            init_exprs = [(best,) * cfg.layers]
        init = [(encode(e[:1] if k == 0 else e), e) for e in init_exprs]
        progress_path = sdir / "progress.json"
        rec = None
        if progress_path.is_file():  # resume an interrupted stage: evaluated candidates are kept
            p = json.loads(progress_path.read_text())
            rec = SearchRecord([tuple(c) for c in p["candidates"]], p["fitness"], p["features"], p["in_region"])

        def save(r: SearchRecord) -> None:
            write_json(progress_path, {"candidates": [list(c) for c in r.candidates], "fitness": r.fitness,
                                       "features": r.features, "in_region": r.in_region})
            if cfg.progress:
                print(f"[mlp stage {k}] {len(r.fitness)}/{n_evals} fitness {r.fitness[-1]:.4f} "
                      f"best {max(r.fitness):.4f}", flush=True)

        rec = run_search(self._propose(k, seeds), self.fitness, self._key, n_evals, cfg.searcher, init,
                         cfg.init_samples, cfg.retrain_interval, cfg.height_levels, cfg.exploration,
                         cfg.seed * 100 + k, rec, save)
        best, fit = rec.best()
        self.stages[k] = {
            "stage": k,
            "searcher": cfg.searcher,
            "best": list(best),
            "best_fitness": fit,
            "ratings": {" | ".join(c if k else c[:1]): f for c, f in zip(rec.candidates, rec.fitness)},
            "in_region": rec.in_region,
            "seconds": time.perf_counter() - t0,
        }
        write_json(sdir / "ratings.json", self.stages[k])

    def stage3_expressions(self) -> list[tuple[str, ...]]:
        """Per layer, the expressions stage 3 chooses from: those of the ``stage3_candidates`` best distinct stage-2
        expression sets (by stage-2 fitness, the winner first), as the authors' stage 3 samples each layer's
        expression from the stage-2 candidates; with 1, the stage-2 winner alone."""
        cfg = self.cfg
        best = " | ".join(self.stages[1]["best"])
        ranked = sorted(self.stages[1]["ratings"].items(), key=lambda kv: -kv[1])  # stable: ties keep search order
        sets = [best.split(" | ")] + [key.split(" | ") for key, _ in ranked if key != best]
        sets = sets[:cfg.stage3_candidates]
        return [tuple(dict.fromkeys(s[i] for s in sets)) for i in range(cfg.layers)]  # distinct, in rank order

    def stage3_choices(self) -> list[tuple[int, int]]:
        """Each layer's (width, stack count) choices in stage 3."""
        return [(w, s) for w in self.cfg.widths for s in range(1, self.cfg.max_stack + 1)]

    def stage3_sampler(self, options: list[tuple[str, ...]]) -> Any:
        """The stage-3 supernet's path for each training step: per layer an expression from ``options`` and a
        (width, stack count); every 4th step the largest widths and stacks (the sandwich rule keeps the shared
        weights trained). With one expression per layer the draws are those of the single-expression stage 3."""
        cfg = self.cfg
        choices = self.stage3_choices()
        winner = tuple(layer[0] for layer in options)
        largest = FFNArch(winner, (cfg.max_width,) * cfg.layers, (cfg.max_stack,) * cfg.layers)
        several = any(len(layer) > 1 for layer in options)

        def sample(step: int) -> FFNArch:
            rng = random.Random(cfg.seed * 1_000_003 + step)
            if step % 4 == 0:
                if not several:
                    return largest
                return FFNArch(tuple(rng.choice(layer) for layer in options), largest.widths, largest.stacks)
            picks = [rng.choice(choices) for _ in range(cfg.layers)]
            layer_exprs = tuple(rng.choice(layer) for layer in options) if several else winner
            return FFNArch(layer_exprs, tuple(w for w, _ in picks), tuple(s for _, s in picks))

        return sample

    def final_ranking(self, archs: dict[str, FFNArch], ratings: dict[str, float],
                      progress: Path | None = None) -> dict[str, float]:
        """Stand-alone accuracy of the ``final_candidates`` best-rated configurations: each trained from scratch
        (cross-entropy, ``final_epochs``) with every ``final_seeds`` seed on each half of a stratified 2-fold split of
        the search's train + val data (never its test split), tested on the other half; the mean. Weight sharing
        ranks expressions close to the warm-up's own (the standard FFN) too high; this re-ranking does without it.
        Not in the paper (its stage 3 keeps the best fitness). ``progress``: a JSON file of the accuracies so far
        (an interrupted ranking resumes from it)."""
        from sklearn.model_selection import StratifiedKFold

        cfg = self.cfg
        top = sorted(ratings, key=lambda k: (-ratings[k], k))[:cfg.final_candidates]
        x = torch.cat([self.splits["train"][0], self.splits["val"][0]])
        y = torch.cat([self.splits["train"][1], self.splits["val"][1]])
        halves = [(torch.as_tensor(fit), torch.as_tensor(test))
                  for fit, test in StratifiedKFold(2, shuffle=True, random_state=cfg.data_seed).split(x, y)]
        done = json.loads(progress.read_text()) if progress is not None and progress.is_file() else {}
        out = {}
        for key in top:
            if key in done:
                out[key] = done[key]
                continue
            runs = [fit_and_test(self.task, archs[key], (x[fit], y[fit]), (x[test], y[test]), seed, cfg.final_epochs,
                                 cfg.d, cfg.heads, cfg.lr, cfg.batch_size)
                    for seed in cfg.final_seeds for fit, test in halves]
            out[key] = sum(c for c, _ in runs) / sum(n for _, n in runs)
            if progress is not None:
                write_json(progress, out)
            if cfg.progress:
                print(f"[mlp final] {key}: stage-3 fitness {ratings[key]:.4f}, stand-alone {out[key]:.4f}",
                      flush=True)
        return out

    def _stage3(self, sdir: Path) -> dict[str, Any]:
        cfg = self.cfg
        options = self.stage3_expressions()  # the stage-2 winner's expressions first
        several = any(len(layer) > 1 for layer in options)
        assert self.warm is not None
        net = self._new_student(cfg.max_stack)
        missing = net.load_state_dict(self.warm.state_dict(), strict=False)
        assert not missing.unexpected_keys, missing.unexpected_keys
        for layer in net.student.layers:  # extra stacks start as copies of the first
            for j in range(1, cfg.max_stack):
                layer.ffn.wb1[j].load_state_dict(layer.ffn.wb1[0].state_dict())
                layer.ffn.wb2[j].load_state_dict(layer.ffn.wb2[0].state_dict())
                layer.ffn.norms[j].load_state_dict(layer.ffn.norms[0].state_dict())
        choices = self.stage3_choices()
        sample = self.stage3_sampler(options)
        if (sdir / "supernet.pt").is_file():
            net.load_state_dict(torch.load(sdir / "supernet.pt", weights_only=True))
        else:
            self._distill(net, sample, cfg.stage3_epochs, cfg.seed + 3)
            torch.save(net.state_dict(), sdir / "supernet.pt")
        standard = FFNArch.standard(cfg.layers, cfg.max_width).ffn_params(cfg.d)
        budget = cfg.budget_fraction * standard
        ratings, params, archs = {}, {}, {}
        for layer_exprs in itertools.product(*options):
            for picks in itertools.product(choices, repeat=cfg.layers):
                arch = FFNArch(layer_exprs, tuple(w for w, _ in picks), tuple(s for _, s in picks))
                p = arch.ffn_params(cfg.d)
                if p <= budget:  # key "w64s1 w32s2"; with several expressions each one's index too: "e0w64s1 e2w32s2"
                    key = " ".join((f"e{layer.index(e)}" if several else "") + f"w{w}s{s}"
                                   for layer, e, (w, s) in zip(options, layer_exprs, picks))
                    ratings[key] = accuracy(net.student, arch, self.splits["val"])
                    params[key], archs[key] = p, arch
        if not ratings:
            raise ValueError(f"no width/stack configuration fits the budget {budget:.0f} FFN params")
        best, final = self.select(archs, ratings, params, sdir / "final_progress.json")
        return {"stage": 2, "exprs": list(archs[best].exprs), "options": [list(layer) for layer in options],
                "ratings": ratings, "params": params, "budget": budget, "standard_ffn_params": standard,
                "best": best, "arch": archs[best].to_dict(), **({"final_ranking": final} if final else {})}

    def select(self, archs: dict[str, FFNArch], ratings: dict[str, float], params: dict[str, int],
               progress: Path | None = None) -> tuple[str, dict[str, float] | None]:
        """The searched configuration (key) and the final ranking (None when off): the best stand-alone accuracy of
        :meth:`final_ranking`, else the best stage-3 rating; ties to the better rating, then to fewer parameters."""
        if not self.cfg.final_candidates:
            return max(ratings, key=lambda k: (ratings[k], -params[k])), None
        final = self.final_ranking(archs, ratings, progress)
        return max(final, key=lambda k: (final[k], ratings[k], -params[k])), final

    def rate_block(self, k: int) -> dict[str, float]:
        if k not in self.stages:
            self.train_block(k)
        return dict(self.stages[k]["ratings"])

    # ------------------------------------------------------------------------------------------ result
    def search(self) -> dict[str, Any]:
        self.preflight()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self.prepare()
        ratings = []
        for k in range(self.num_blocks):
            self.train_block(k)
            ratings.append(self.rate_block(k))
        return self.report(ratings)

    def retrain_accuracy(self, arch: FFNArch, seeds: Sequence[int]) -> list[float]:
        """Test accuracies of ``arch`` trained stand-alone from scratch (cross-entropy), one per seed."""
        cfg = self.cfg
        out = []
        for s in seeds:
            torch.manual_seed(s)
            model = build_model(self.task, cfg.d, cfg.heads, cfg.layers, max(arch.widths), max(arch.stacks))
            train(model, arch, self.splits["train"], cfg.retrain_epochs, cfg.lr, cfg.batch_size, s)
            out.append(accuracy(model, arch, self.splits["test"]))
        return out

    def report(self, ratings: Sequence[dict[str, float]]) -> dict[str, Any]:
        cfg, out = self.cfg, self.out_dir
        s3 = self.stages[2]
        arch = FFNArch(tuple(s3["arch"]["exprs"]), tuple(s3["arch"]["widths"]), tuple(s3["arch"]["stacks"]))
        standard = FFNArch.standard(cfg.layers, cfg.max_width)
        result: dict[str, Any] = {
            "task": cfg.task,
            "searcher": cfg.searcher,
            "arch": arch.to_dict(),
            "ffn_params": arch.ffn_params(cfg.d),
            "standard_ffn_params": standard.ffn_params(cfg.d),
            "param_ratio": arch.ffn_params(cfg.d) / standard.ffn_params(cfg.d),
            "stage_best": [self.stages[0]["best"][0], self.stages[1]["best"], s3["best"]],
            "stage_fitness": [self.stages[0]["best_fitness"], self.stages[1]["best_fitness"],
                              s3["ratings"][s3["best"]]],
            "valid": all(is_valid(e, cfg.min_height, cfg.max_height) for e in arch.exprs),
        }
        if cfg.retrain:
            path = out / "retrain.json"
            if path.is_file():
                result["retrain"] = json.loads(path.read_text())
            else:
                searched = self.retrain_accuracy(arch, cfg.retrain_seeds)
                base = self.retrain_accuracy(standard, cfg.retrain_seeds)
                result["retrain"] = {"seeds": cfg.retrain_seeds, "searched_test_acc": searched,
                                     "standard_test_acc": base,
                                     "delta_points": 100 * (float(np.mean(searched)) - float(np.mean(base)))}
                write_json(path, result["retrain"])
        result["seconds"] = time.perf_counter() - self._t0
        write_json(out / "architecture.json", result)
        (out / "report.md").write_text(_report(cfg, result, self.stages))
        return result


def _report(cfg: MLPSearchConfig, r: dict[str, Any], stages: dict[int, dict[str, Any]]) -> str:
    lines = [
        f"# EfficientBERT-style FFN search on {cfg.task} ({cfg.searcher} search)",
        "",
        f"- student d={cfg.d}, {cfg.layers} layers; teacher d={cfg.teacher_d}, {cfg.teacher_layers} layers",
        f"- warm-up distillation {cfg.warmup_epochs} epochs; {cfg.candidate_epochs} epoch(s) per candidate",
        f"- stage 1 (shared expression): {len(stages[0]['ratings'])} evaluations, best {stages[0]['best'][0]} "
        f"(val acc {stages[0]['best_fitness']:.4f})",
        f"- stage 2 (per layer): {len(stages[1]['ratings'])} evaluations, best {' | '.join(stages[1]['best'])} "
        f"(val acc {stages[1]['best_fitness']:.4f})",
        f"- stage 3 (widths/stacks, budget {stages[2]['budget']:.0f} FFN params): {len(stages[2]['ratings'])} "
        f"configurations rated, best {stages[2]['best']}",
        "",
        f"Searched FFN params {r['ffn_params']} = {r['param_ratio']:.2f} x the standard FFN's "
        f"{r['standard_ffn_params']}",
    ]
    if "retrain" in r:
        rt = r["retrain"]
        lines += ["", f"Stand-alone test accuracy (seeds {rt['seeds']}): searched "
                  f"{np.mean(rt['searched_test_acc']):.4f}, standard {np.mean(rt['standard_test_acc']):.4f} "
                  f"({rt['delta_points']:+.2f} points)"]
    lines += ["", f"Total time {r['seconds']:.1f} s"]
    return "\n".join(lines) + "\n"
