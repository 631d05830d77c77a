"""The one interface of a block-wise search method, and the registry ``python -m nas.search METHOD`` reads.

A method is a :class:`SearchMethod` subclass registered with :func:`register`: a config dataclass
(``config_class``: its fields are the YAML keys and the CLI flags, see :mod:`stflow.config`; every method
config has the shared fields ``out_dir``, ``seed``, ``progress``, ``resume`` and ``overwrite``),
``train_block(k)``, ``rate_block(k)`` (``{candidate key: rating}``) and ``report(ratings)`` (the rating table,
the constrained search, ``architecture.json`` and ``report.md``). :meth:`SearchMethod.run` runs the whole
search: it resumes what ``out_dir`` holds (a finished block is never retrained); with ``resume=False`` it
refuses an ``out_dir`` that already holds a run, or, with ``overwrite`` as well, recomputes everything.

Before any training, :meth:`SearchMethod.preflight` checks the budget against the block costs
(:meth:`SearchMethod.check_budget`) and every cached artefact the run would reuse
(:meth:`SearchMethod.artefacts`) against the config that made it (:mod:`nas.cache`): an artefact made with
another config is refused, naming the differing keys, unless ``overwrite`` (then it is recomputed). The same
holds for a retrained result: a rerun never replaces it silently. ``architecture.json``, ``ratings.json``
and ``report.md`` are summaries rewritten by every run from the (reused or computed) artefacts.

A new method is one module in ``nas/methods/`` plus its packaged config in ``nas/configs/``, and one line in
:data:`METHOD_MODULES`.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from nas.cache import Artefact, check_artefacts, check_out_dir

__all__ = ["SHARED_FIELDS", "METHOD_MODULES", "SearchMethod", "register", "get_method", "list_methods"]

SHARED_FIELDS = ("out_dir", "seed", "progress", "resume", "overwrite")  # every method config has these
METHOD_MODULES = {
    "dna": "nas.methods.dna",
    "bossnas": "nas.methods.bossnas",
    "pinas": "nas.methods.pinas",
    "mlp": "nas.methods.mlp",
}  # imported on first use
_REGISTRY: dict[str, type[SearchMethod]] = {}


class SearchMethod(ABC):
    """A block-wise search: config in, rated blocks, a searched architecture out."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    description: ClassVar[str] = ""

    def __init__(self, cfg: Any) -> None:
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}")
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        self._preflight_done = False

    @classmethod
    def default_config(cls, argv: Sequence[str]) -> str | None:
        """Packaged config read before the flags when ``--config`` is not given (None: the dataclass defaults)."""
        return None

    @property
    @abstractmethod
    def num_blocks(self) -> int:
        """Blocks of the searched space."""

    @abstractmethod
    def train_block(self, k: int) -> None:
        """Train the supernet of block ``k`` (resuming an interrupted training from its checkpoint)."""

    @abstractmethod
    def rate_block(self, k: int) -> dict[str, float]:
        """``{candidate key: rating}`` of every candidate of block ``k`` (trained), saved as the block's result."""

    @abstractmethod
    def report(self, ratings: Sequence[dict[str, float]]) -> dict[str, Any]:
        """Rating table, constrained search, ``architecture.json`` and ``report.md`` from all blocks' ratings."""

    @abstractmethod
    def search(self) -> dict[str, Any]:
        """Every stage in the method's order, skipping what ``out_dir`` already holds; the result summary."""

    def artefacts(self) -> list[Artefact]:
        """The cached artefacts this run would reuse from ``out_dir``, each with the config values that determine
        it (:mod:`nas.cache`); default: none."""
        return []

    def check_budget(self) -> None:
        """Raise ``ValueError`` (naming the budget and the cheapest cost) when no architecture fits the budget;
        costs come from the space alone, so this runs before any training. Default: no budget."""
        return None

    def preflight(self) -> None:
        """The checks that need no training, once per instance and before any work: the budget, then every
        cached artefact against its config record (refused on a mismatch unless ``overwrite``)."""
        if self._preflight_done:
            return
        self.check_budget()
        cfg = self.cfg
        check_artefacts(self.artefacts(), overwrite=cfg.overwrite, force=cfg.overwrite and not cfg.resume)
        self._preflight_done = True

    # block-parallel search (nas/parallel.py): methods whose blocks are independent after a shared stage
    @property
    def independent_blocks(self) -> bool:
        """True when every block can be trained and rated on its own once :meth:`prepare_blocks` has run."""
        return False

    def prepare_blocks(self) -> None:
        """The stage every block needs (DNA: the teacher); in a worker it only loads what the parent wrote."""
        return None

    def parallel_blocks(self) -> list[int]:
        """The blocks a parallel run dispatches (default: all)."""
        return list(range(self.num_blocks))

    def block_done(self, k: int) -> bool:
        """Whether ``out_dir`` already holds block ``k``'s result (a parallel run skips it)."""
        return False

    def run_block(self, k: int) -> dict[str, float]:
        """Train and rate block ``k`` and save its result into ``out_dir`` (what a worker runs)."""
        raise NotImplementedError(f"{type(self).__name__} does not run single blocks")

    def parallel_units(self) -> list[tuple[int, int | None]]:
        """The independent units a parallel run dispatches, largest first: ``(block, None)`` for a whole block
        (default), or ``(block, part)`` for a part of one that trains and rates on its own (DNA: a cell)."""
        return [(k, None) for k in self.parallel_blocks()]

    def unit_done(self, unit: tuple[int, int | None]) -> bool:
        """Whether ``out_dir`` already holds the unit's result (a parallel run skips it)."""
        return self.block_done(unit[0])

    def run_unit(self, unit: tuple[int, int | None]) -> dict[str, float]:
        """Train and rate one unit and save its result into ``out_dir`` (what a worker runs; default: the block)."""
        return self.run_block(unit[0])

    def run(self) -> dict[str, Any]:
        """:meth:`search`, after checking ``resume`` against ``out_dir`` and :meth:`preflight`; with a config field
        ``workers > 1`` and independent blocks, the blocks run in worker processes
        (:func:`nas.parallel.run_blocks_parallel`)."""
        check_out_dir(self.out_dir, self.cfg.resume, self.cfg.overwrite)
        self.preflight()
        workers = int(getattr(self.cfg, "workers", 1) or 1)
        if workers > 1 and self.independent_blocks:
            from nas.parallel import run_blocks_parallel

            return run_blocks_parallel(self, workers, getattr(self.cfg, "worker_threads", None))
        return self.search()


def register(cls: type[SearchMethod]) -> type[SearchMethod]:
    """Class decorator: make ``cls`` available as ``python -m nas.search <cls.name>``."""
    missing = [f for f in SHARED_FIELDS if f not in getattr(cls.config_class, "__dataclass_fields__", {})]
    if missing:
        raise TypeError(f"{cls.config_class.__name__} lacks the shared config field(s) {missing}")
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(set(METHOD_MODULES) | set(_REGISTRY))


def get_method(name: str) -> type[SearchMethod]:
    """The registered method ``name``; ``KeyError`` (one line naming the methods) when there is none."""
    if name not in _REGISTRY and name in METHOD_MODULES:
        try:
            importlib.import_module(METHOD_MODULES[name])
        except ImportError as exc:
            raise KeyError(
                f"search method {name!r} is unavailable (importing {METHOD_MODULES[name]} failed: {exc})"
            ) from exc
    if name not in _REGISTRY:
        raise KeyError(f"unknown search method {name!r}; methods: {', '.join(list_methods())}")
    return _REGISTRY[name]
