"""Semantic parsing of digit scenes with a searched backbone: ``python -m nas.transfer seg --arch ARCH [flags]``.

Protocol (one run, :func:`transfer_seg`):

1. the backbone (``--arch``: an encoding of ``--space``, or an exported net, see :func:`load_backbone`) is
   pretrained as a digits classifier for ``pretrain_epochs`` (the NAS recipe: AdamW + cosine, 8x8 digits of the
   train part of split ``split_seed``; 0 = no pretraining, the backbone starts from its random initialization);
2. the :class:`~nas.transfer.dense.DenseModel` (backbone taps + FPN/FCN head) is trained on the training digit
   scenes for ``epochs`` with the backbone fine-tuned (default) or frozen (``--freeze``);
3. the test scenes (built from digits no training scene uses) are scored: mIoU over the 11 classes (10 digits +
   background), mIoU without background, per-class IoU, pixel accuracy; ``result.json`` and a picture grid
   ``predictions.png`` (input / truth / prediction of ``num_pictures`` test scenes) go to ``out_dir``.

Both trainings go through :func:`stflow.runner.fit` (``pretrain/`` and ``seg/`` under ``out_dir``, checkpoints
after every epoch); a run whose ``result.json`` exists is returned as is, an interrupted one resumes. Both only
under the same config: ``pretrain/``, ``seg/`` and ``result.json`` carry a record of the values that determine them
(:mod:`nas.cache`; the architecture by its content, not its file name). A rerun with another config is refused,
naming the differing keys, unless ``overwrite`` (then they are recomputed), so a result is never replaced
silently; ``resume: false`` refuses an ``out_dir`` that holds a run unless ``overwrite`` (then all is recomputed).
"""

from __future__ import annotations

import ast
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.cache import Artefact, check_artefacts, check_out_dir, config_fields, write_json
from nas.costs import count_params
from nas.data.digits import DigitsDataModule
from nas.data.scenes import BACKGROUND, NUM_CLASSES, DigitScenesDataModule
from nas.export import build_network, build_network_from_strings
from nas.ops import seeded_init
from nas.spaces import SearchSpace
from nas.systems import ClassifierSystem
from nas.transfer.dense import HEADS, DenseModel, SegmentationSystem, backbone_params
from stflow.config import config_to_dict
from stflow.runner import RunConfig, fit, last_checkpoint
from stflow.safeload import safe_load

__all__ = [
    "DNA_DIGITS_ARCH",
    "SPACES",
    "SegConfig",
    "load_backbone",
    "load_space",
    "pretrain_backbone",
    "save_prediction_grid",
    "transfer_seg",
]

# The DNA-searched digits architecture of docs/nas.md (python -m nas.search dna, defaults): 19,186 parameters.
DNA_DIGITS_ARCH = "[[2, 3], [1, 0], [2, 1]]"
SPACES = ("digits-mbconv", "hytra-digits")


@dataclass
class SegConfig:
    """One transfer run (fields = YAML keys = flags; packaged configs ``nas/configs/transfer_*.yaml``)."""

    arch: str = DNA_DIGITS_ARCH  # encoding (JSON/Python list) of `space`, or a JSON file (see load_backbone)
    space: str = "digits-mbconv"  # digits-mbconv (the DNA digits space) | hytra-digits
    out_dir: str = "runs/transfer-seg"
    seed: int = 0  # weight initialization and training order (pretraining and dense training)
    # backbone pretraining (digits classification)
    pretrain_epochs: int = 5
    pretrain_lr: float = 3e-3
    # dense training
    head: str = "fpn"  # fpn: taps of every block summed | fcn: last block only
    head_channels: int = 32
    freeze: bool = False  # True: only the head trains (backbone frozen, eval-mode statistics)
    epochs: int = 8
    lr: float = 3e-3
    weight_decay: float = 1e-4
    batch_size: int = 8
    # digit scenes
    num_train: int = 480
    num_val: int = 100
    num_test: int = 200
    canvas: int = 32
    min_digits: int = 2
    max_digits: int = 3
    scales: list[int] = field(default_factory=lambda: [2])
    stroke_threshold: float = 4.0
    data_seed: int = 0  # scene generator
    split_seed: int = 0  # which digits are train / val / test sources (the digits classifier's split)
    # output
    num_pictures: int = 6
    checkpoint: bool = True  # False (studies): checkpoints in a temporary folder; no logs, pictures, result.json
    progress: bool = True
    resume: bool = True  # return a finished run's result.json / continue an interrupted run
    overwrite: bool = False  # recompute what out_dir holds when made with another config (else refused)

    def validate(self) -> None:
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if self.space not in SPACES:
            raise ValueError(f"space must be one of {', '.join(SPACES)}, got {self.space!r}")
        for name in ("epochs", "batch_size", "num_train", "num_val", "num_test", "head_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be >= 0, got {self.pretrain_epochs}")
        for name in ("lr", "pretrain_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.weight_decay < 0 or self.num_pictures < 0:
            raise ValueError(f"weight_decay and num_pictures must be >= 0, got {self.weight_decay}, "
                             f"{self.num_pictures}")
        load_backbone(self.arch, self.space)  # the architecture builds: one entry per block of the space

    def datamodule(self) -> DigitScenesDataModule:
        return DigitScenesDataModule(
            (self.num_train, self.num_val, self.num_test), self.canvas, self.min_digits, self.max_digits,
            tuple(self.scales), self.stroke_threshold, self.data_seed, self.split_seed, self.batch_size,
        )


def load_space(name: str) -> Any:
    """``digits-mbconv``: the DNA digits space (``space`` of the packaged ``dna_digits`` config); ``hytra-digits``:
    :func:`nas.spaces.hytra.hytra_digits`."""
    if name == "hytra-digits":
        from nas.spaces.hytra import hytra_digits

        return hytra_digits()
    if name == "digits-mbconv":
        import importlib.resources

        import yaml

        text = (importlib.resources.files("nas") / "configs" / "dna_digits.yaml").read_text()
        return SearchSpace.from_dict(yaml.safe_load(text)["space"])
    raise ValueError(f"unknown space {name!r}; spaces: {', '.join(SPACES)}")


def _parse_arch(arch: str) -> Any:
    """The architecture's value: a literal list, or the content of a JSON file (``encoding`` /
    ``block_strings`` of a DNA ``architecture.json``, or a bare list)."""
    path = Path(arch)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"architecture file not found: {arch}")
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            if "encoding" in data:
                return data["encoding"]
            if "block_strings" in data:
                return data["block_strings"]
            raise ValueError(f"{arch}: expected an 'encoding' or 'block_strings' key, got {sorted(data)}")
        return data
    try:
        return ast.literal_eval(arch)
    except (ValueError, SyntaxError):
        raise ValueError(f"--arch must be an encoding like {DNA_DIGITS_ARCH!r} or a JSON file, got {arch!r}") from None


def load_backbone(arch: str, space: str = "digits-mbconv", num_classes: int = 10) -> nn.Module:
    """A classifier network with feature taps for ``arch``: an encoding of ``space`` (``[[2, 3], [1, 0], [2, 1]]``),
    per-block timm-style strings of an exported net (``[["ir_r1_k5_s1_e4_c16"], ...]``, stem of the digits
    space), or a JSON file holding either (a DNA ``architecture.json`` works)."""
    value = _parse_arch(arch)
    sp = load_space(space)
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(b, (list, tuple)) for b in value):
        raise ValueError(f"an architecture is a list with one list per block, got {value!r}")
    names = [s for b in value for s in b]
    if names and all(isinstance(s, str) for s in names):  # block strings; anything else is an encoding
        if not isinstance(sp, SearchSpace):
            raise ValueError(f"block strings build MBConv nets; space {space!r} is not an MBConv space")
        return build_network_from_strings(
            value, num_classes, sp.input_channels, sp.stem_channels, sp.stem_stride
        )
    from nas.spaces.hytra import build_hytra_network

    build = build_network if isinstance(sp, SearchSpace) else build_hytra_network
    try:
        return build(sp, value, num_classes)
    except ValueError as exc:
        raise ValueError(f"architecture {value!r} is not an encoding of space {space!r}: {exc}") from None


def pretrain_backbone(net: nn.Module, cfg: SegConfig, out_dir: Path, study: bool = False) -> float | None:
    """Train ``net`` as a digits classifier for ``cfg.pretrain_epochs`` (in place, the best validation epoch's
    weights kept); returns its test accuracy. Checkpoints go to ``out_dir``; unless ``study`` (a temporary
    ``out_dir``, no logs) the weights are saved as ``out_dir/backbone.pt`` and loaded instead of retraining when
    present (resume).
    """
    if cfg.pretrain_epochs == 0:
        return None
    weights = None if study else out_dir / "backbone.pt"
    if weights is not None and weights.is_file() and cfg.resume:
        saved = safe_load(weights)
        net.load_state_dict(saved["state_dict"])
        return saved["test_acc"]
    dm = DigitsDataModule(batch_size=64, seed=cfg.split_seed)
    system = ClassifierSystem(net, lr=cfg.pretrain_lr, max_epochs=cfg.pretrain_epochs)
    result = fit(system, dm, _run_config(cfg, out_dir, cfg.pretrain_epochs, "val_loss", "min", study))
    acc = float(result.test_metrics["test_acc"])
    if result.best_checkpoint:  # test used the best epoch: keep those weights
        state = safe_load(result.best_checkpoint)["state_dict"]
        system.load_state_dict(state)
    if weights is not None:
        torch.save({"state_dict": net.state_dict(), "test_acc": acc}, weights)
    return acc


def _run_config(cfg: SegConfig, out_dir: Path, epochs: int, monitor: str, mode: str, study: bool) -> RunConfig:
    if study:  # checkpoints in a temporary folder (the best epoch is tested), no logs
        return RunConfig(out_dir=str(out_dir), max_epochs=epochs, seed=cfg.seed, loggers=(), progress_bar=False,
                         monitor=monitor, monitor_mode=mode)
    resume = cfg.resume and last_checkpoint(out_dir).is_file()
    return RunConfig(out_dir=str(out_dir), max_epochs=epochs, seed=cfg.seed, resume=resume, loggers=("csv",),
                     progress_bar=cfg.progress, monitor=monitor, monitor_mode=mode, overwrite=not resume)


def transfer_seg(cfg: SegConfig) -> dict[str, Any]:
    """One transfer run (module docstring); returns (and with ``cfg.checkpoint`` writes) the result dict.

    ``cfg.checkpoint=False`` (studies): the same protocol with its checkpoints in a temporary folder, deleted
    afterwards; nothing is written to ``out_dir``.
    """
    cfg.validate()
    if not cfg.checkpoint:
        with tempfile.TemporaryDirectory(prefix="nas-transfer-") as tmp:
            return _transfer(cfg, Path(tmp), study=True)
    out = Path(cfg.out_dir)
    check_out_dir(out, cfg.resume, cfg.overwrite)
    check_artefacts(_artefacts(cfg, out), overwrite=cfg.overwrite, force=cfg.overwrite and not cfg.resume)
    if (out / "result.json").is_file():  # checked: made with this config
        return json.loads((out / "result.json").read_text())
    return _transfer(cfg, out, study=False)


def _artefacts(cfg: SegConfig, out: Path) -> list[Artefact]:
    """``pretrain/`` (when pretraining), ``seg/`` and ``result.json`` with the config values that determine them."""
    arch = {"arch": _parse_arch(cfg.arch)}  # the architecture itself, whatever file or literal named it
    names = ("space", "seed", "pretrain_epochs", "pretrain_lr", "split_seed")
    dense = {**config_fields(cfg, drop=("arch", "num_pictures")), **arch}
    found = [Artefact(out / "seg", dense, "dense training"),
             Artefact(out / "result.json", {**dense, "num_pictures": cfg.num_pictures}, "transfer result")]
    if cfg.pretrain_epochs:
        found.insert(0, Artefact(out / "pretrain", {**{n: getattr(cfg, n) for n in names}, **arch}, "pretraining"))
    return found


def _transfer(cfg: SegConfig, out: Path, study: bool) -> dict[str, Any]:
    t0, cpu0 = time.perf_counter(), time.process_time()
    with seeded_init(cfg.seed):
        net = load_backbone(cfg.arch, cfg.space)
    n_backbone = backbone_params(net)
    pretrain_acc = pretrain_backbone(net, cfg, out / "pretrain", study)
    t_pretrain = time.perf_counter() - t0
    dm = cfg.datamodule()
    with seeded_init(cfg.seed + 1):
        model = DenseModel(net, NUM_CLASSES, cfg.head, cfg.head_channels, cfg.freeze)
    system = SegmentationSystem(model, NUM_CLASSES, BACKGROUND, cfg.lr, cfg.weight_decay, cfg.epochs)
    run = fit(system, dm, _run_config(cfg, out / "seg", cfg.epochs, "val_miou", "max", study))
    summary = system.test_summary
    result = {
        "arch": _parse_arch(cfg.arch),
        "space": cfg.space,
        "backbone_params": n_backbone,
        "model_params": count_params(model),
        "pretrain_test_acc": pretrain_acc,
        "test_miou": summary["miou"],
        "test_miou_fg": summary["miou_fg"],
        "test_pixel_acc": summary["pixel_acc"],
        "test_iou": summary["iou"],
        "best_val_miou": _best_score(run.trainer),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,  # this process's CPU time (the machine is shared)
        "pretrain_seconds": t_pretrain,
        "config": config_to_dict(cfg),
    }
    if not study:
        if run.best_checkpoint:  # the pictures show the tested (best) weights
            system.load_state_dict(safe_load(run.best_checkpoint)["state_dict"])
        save_prediction_grid(out / "predictions.png", system.model, dm, cfg.num_pictures)
        write_json(out / "result.json", result)
    return result


def _best_score(trainer: Any) -> float | None:
    callback = trainer.checkpoint_callback
    score = getattr(callback, "best_model_score", None)
    return None if score is None else float(score)


def _palette() -> Any:
    import matplotlib
    from matplotlib.colors import ListedColormap

    colors = list(matplotlib.colormaps["tab10"].colors) + [(0.0, 0.0, 0.0)]  # digits 0-9, background black
    return ListedColormap(colors)


@torch.no_grad()
def save_prediction_grid(path: str | Path, model: nn.Module, dm: DigitScenesDataModule, n: int = 6) -> Path:
    """A PNG with one row per test scene (the first ``n``): input, truth, prediction (digit colours as the legend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    dm.setup()
    x, y = dm.tensors["test"][0][:n], dm.tensors["test"][1][:n]  # (n, 1, H, W), (n, H, W)
    was_training = model.training
    model.eval()
    pred = model(x).argmax(1)  # (n, H, W)
    model.train(was_training)
    cmap = _palette()
    fig, axes = plt.subplots(len(x), 3, figsize=(6.6, 2.2 * len(x)), squeeze=False)
    for i in range(len(x)):
        panels = [(x[i, 0].numpy(), "gray", None, "input"), (y[i].numpy(), cmap, NUM_CLASSES - 1, "truth"),
                  (pred[i].numpy(), cmap, NUM_CLASSES - 1, "prediction")]
        for ax, (img, cm, vmax, title) in zip(axes[i], panels):
            ax.imshow(img, cmap=cm, vmin=0 if vmax else None, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title)
    handles = [Patch(color=cmap(k), label=str(k) if k < BACKGROUND else "bg") for k in range(NUM_CLASSES)]
    fig.legend(handles=handles, loc="lower center", ncol=NUM_CLASSES, fontsize=7, handlelength=1, frameon=False)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main_seg(argv: Sequence[str]) -> int:
    from stflow.config import parse_cli

    negatable = ("progress", "resume", "overwrite", "freeze", "checkpoint")  # --no-progress -> --progress false
    expanded: list[str] = []
    for a in argv:
        name = a[5:].replace("-", "_") if a[:5] in ("--no-", "--no_") else None
        expanded += [f"--{name}", "false"] if name in negatable else [a]
    argv = expanded
    cfg, _ = parse_cli(SegConfig, argv, prog="python -m nas.transfer seg", packages=("nas",),
                       description="Train a dense head on digit scenes over a searched backbone; prints mIoU.")
    result = transfer_seg(cfg)
    iou = ", ".join(f"{k if k < BACKGROUND else 'bg'}: {v:.3f}" for k, v in enumerate(result["test_iou"]))
    print(f"arch {result['arch']} ({result['backbone_params']:,} backbone params, pretrain test acc "
          f"{result['pretrain_test_acc']}); {result['seconds']:.0f} s")
    print(f"test mIoU {result['test_miou']:.4f} (11 classes incl. background), {result['test_miou_fg']:.4f} "
          f"(10 digits), pixel acc {result['test_pixel_acc']:.4f}")
    print(f"per-class IoU: {iou}")
    if cfg.checkpoint:
        print(f"wrote {Path(cfg.out_dir) / 'result.json'} and {Path(cfg.out_dir) / 'predictions.png'}")
    return 0
