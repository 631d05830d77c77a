"""A process pool for studies of many short, independent runs (spawned workers, one torch thread count each)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["quiet_lightning", "init_worker", "run_tasks"]


def quiet_lightning() -> None:
    """Silence Lightning's per-run info messages and warnings (a study launches dozens of short runs)."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def init_worker(threads: int | None) -> None:
    """Worker set-up: ``threads`` torch threads (None: leave torch's count), Lightning quiet."""
    if threads is not None:
        torch.set_num_threads(threads)
    quiet_lightning()


def run_tasks(
    fn: Callable[..., Any], tasks: Sequence[tuple], workers: int, threads: int | None, desc: str, progress: bool = True
) -> list[Any]:
    """``fn(*task)`` for every task, results in task order: in this process (``workers <= 1``) or in a pool of
    ``workers`` spawned processes with ``threads`` torch threads each; with a progress bar unless ``progress=False``."""
    from tqdm import tqdm

    if workers <= 1:
        init_worker(threads)
        return [fn(*t) for t in tqdm(tasks, desc=desc, unit="run", disable=not progress)]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=(threads,)) as ex:
        futures = [ex.submit(fn, *t) for t in tasks]
        return [f.result() for f in tqdm(futures, desc=desc, unit="run", disable=not progress)]
