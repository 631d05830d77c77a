"""'Digit scenes': a dense-prediction data set built from scikit-learn's digits (no download).

A scene is a ``canvas x canvas`` image holding 2-4 (``min_digits``..``max_digits``) digit images, each
upscaled by an integer factor from ``scales`` (nearest neighbour: every 8x8 pixel becomes a
``scale x scale`` square) and pasted at a random position; boxes never overlap (they may touch). The
pixel label is the digit's class (0-9) where its upscaled intensity is at least ``stroke_threshold``
(sklearn's 0-16 scale) and :data:`BACKGROUND` (10) everywhere else, so there are 11 classes.

Splits are made by *source image*: the 1,797 digits are split 60/20/20 (stratified, fixed by ``split_seed``,
the split of :func:`nas.data.digits.digits_split_indices`, i.e. the same images the digits classifier trains,
validates and tests on) and the train/val/test scenes only use digits of their own part, so no digit image
appears in two splits. Every scene is fixed by ``(seed, split, scene index)``. Inputs are standardized with
the mean/std of the training digits (as :func:`nas.data.digits.load_digits_split` does), so a classifier
pretrained on digits sees the same intensity scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from nas.data.digits import _digits, digits_split_indices

__all__ = [
    "BACKGROUND",
    "NUM_CLASSES",
    "SPLITS",
    "Placement",
    "SceneSet",
    "DigitScenesDataModule",
    "generate_scenes",
    "render_scene",
    "upscale",
]

BACKGROUND = 10  # label of every pixel that is not a digit stroke
NUM_CLASSES = 11  # digits 0-9 and background
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Placement:
    """One pasted digit: sklearn index of the source image, its class, the box's top-left corner, the scale."""

    source: int
    label: int
    top: int
    left: int
    scale: int

    @property
    def size(self) -> int:
        return 8 * self.scale


@dataclass
class SceneSet:
    """Scenes of one split: ``images`` (N, canvas, canvas) float32 on the 0-16 scale, ``labels`` (N, canvas,
    canvas) int64, and the placements of every scene (what the labels were drawn from)."""

    images: np.ndarray
    labels: np.ndarray
    placements: list[list[Placement]]


def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling: (8, 8) -> (8 * scale, 8 * scale)."""
    return np.kron(image, np.ones((scale, scale), dtype=image.dtype))


def render_scene(
    digit_images: np.ndarray, placements: list[Placement], canvas: int, stroke_threshold: float = 4.0
) -> tuple[np.ndarray, np.ndarray]:
    """(image (canvas, canvas) float32, labels (canvas, canvas) int64) of one scene; ``digit_images`` is the
    (1797, 8, 8) sklearn array the placements index."""
    image = np.zeros((canvas, canvas), np.float32)
    labels = np.full((canvas, canvas), BACKGROUND, np.int64)
    for p in placements:
        patch = upscale(digit_images[p.source], p.scale)  # (8s, 8s)
        box = (slice(p.top, p.top + p.size), slice(p.left, p.left + p.size))
        image[box] = patch
        labels[box] = np.where(patch >= stroke_threshold, p.label, BACKGROUND)
    return image, labels


def _place(
    rng: np.random.Generator, sizes: list[int], canvas: int, attempts: int = 200
) -> list[tuple[int, int]] | None:
    """Top-left corners of non-overlapping square boxes of ``sizes`` (None if they did not fit)."""
    boxes: list[tuple[int, int, int]] = []
    for size in sizes:
        for _ in range(attempts):
            top, left = (int(v) for v in rng.integers(0, canvas - size + 1, size=2))
            if all(top >= t + s or t >= top + size or left >= lf + s or lf >= left + size for t, lf, s in boxes):
                boxes.append((top, left, size))
                break
        else:
            return None
    return [(t, lf) for t, lf, _ in boxes]


def generate_scenes(
    sources: np.ndarray,
    num_scenes: int,
    seed: int,
    canvas: int = 48,
    min_digits: int = 2,
    max_digits: int = 4,
    scales: tuple[int, ...] = (2,),
    stroke_threshold: float = 4.0,
) -> SceneSet:
    """``num_scenes`` scenes whose digits are drawn (uniformly, with replacement) from the sklearn indices
    ``sources``; everything is fixed by ``seed``."""
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if not scales or min(scales) < 1 or 8 * max(scales) > canvas:
        raise ValueError(f"scales {scales} must be >= 1 and fit a {canvas}-pixel canvas (8 * scale <= canvas)")
    if len(sources) == 0:
        raise ValueError("no source images")
    images, targets = _digits()
    rng = np.random.default_rng(seed)
    out_x = np.zeros((num_scenes, canvas, canvas), np.float32)
    out_y = np.zeros((num_scenes, canvas, canvas), np.int64)
    placements: list[list[Placement]] = []
    for n in range(num_scenes):
        while True:
            count = int(rng.integers(min_digits, max_digits + 1))
            chosen_scales = [int(rng.choice(scales)) for _ in range(count)]
            corners = _place(rng, [8 * s for s in chosen_scales], canvas)
            if corners is not None:
                break
        chosen = rng.choice(sources, size=count, replace=True)
        scene = [
            Placement(int(src), int(targets[src]), top, left, scale)
            for src, (top, left), scale in zip(chosen, corners, chosen_scales)
        ]
        out_x[n], out_y[n] = render_scene(images, scene, canvas, stroke_threshold)
        placements.append(scene)
    return SceneSet(out_x, out_y, placements)


class DigitScenesDataModule(pl.LightningDataModule):
    """Digit scenes for per-pixel classification; batches are ``(x (B, 1, canvas, canvas) float32,
    y (B, canvas, canvas) int64)`` with labels 0-9 (digits) and 10 (background).

    ``num_scenes``: (train, val, test) counts. Split ``s`` uses generator seed ``seed * 1000 + s`` (s = 0, 1, 2) and
    only the digits of part ``s`` of :func:`digits_split_indices` with ``split_seed``.
    """

    num_classes = NUM_CLASSES
    background = BACKGROUND

    def __init__(
        self,
        num_scenes: tuple[int, int, int] = (1500, 300, 500),
        canvas: int = 48,
        min_digits: int = 2,
        max_digits: int = 4,
        scales: tuple[int, ...] = (2,),
        stroke_threshold: float = 4.0,
        seed: int = 0,
        split_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int = 100,
    ) -> None:
        super().__init__()
        if len(num_scenes) != 3 or min(num_scenes) < 1:
            raise ValueError(f"num_scenes must be three positive counts (train, val, test), got {num_scenes}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_scenes = tuple(int(n) for n in num_scenes)
        self.canvas, self.min_digits, self.max_digits = canvas, min_digits, max_digits
        self.scales, self.stroke_threshold = tuple(scales), stroke_threshold
        self.seed, self.split_seed = seed, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.sources: dict[str, np.ndarray] | None = None
        self.scenes: dict[str, SceneSet] = {}
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mean = self.std = 0.0

    def setup(self, stage: str | None = None) -> None:
        if self.tensors:
            return
        self.sources = digits_split_indices(self.split_seed)
        images = _digits()[0]
        train_digits = images[self.sources["train"]]
        self.mean, self.std = float(train_digits.mean()), float(train_digits.std())
        for s, name in enumerate(SPLITS):
            scenes = generate_scenes(
                self.sources[name], self.num_scenes[s], self.seed * 1000 + s, self.canvas, self.min_digits,
                self.max_digits, self.scales, self.stroke_threshold,
            )
            self.scenes[name] = scenes
            x = torch.from_numpy((scenes.images - self.mean) / self.std).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
            self.tensors[name] = (x, torch.from_numpy(scenes.labels))

    def _loader(self, name: str, train: bool = False) -> DataLoader:
        self.setup()
        ds = TensorDataset(*self.tensors[name])
        if train:
            return DataLoader(ds, batch_size=self.batch_size, shuffle=True)
        return DataLoader(ds, batch_size=self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
