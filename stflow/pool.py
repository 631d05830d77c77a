"""A process pool for studies of many short, independent runs (spawned workers, one torch thread count each).

Every worker (and the calling process when ``workers <= 1``) keeps its heap (:func:`keep_heap`): with glibc's
defaults a fresh process returns freed x-sized buffers to the OS (``munmap``, heap trimming) and faults them
back in at the next step, which made the convolutions of a DNA block unit run 1.7x slower in a fresh worker than
in a process whose heap had grown (2026-12-07: conv2d 5.1 s vs 3.0 s per unit, the same calls).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["quiet_lightning", "keep_heap", "init_worker", "run_tasks"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 64 << 20  # allocations below this come from the heap, not fresh mappings
TRIM_THRESHOLD = 256 << 20  # free space kept at the heap top before it is handed back


def quiet_lightning() -> None:
    """Silence Lightning's per-run info messages and warnings (a study launches dozens of short runs)."""
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def keep_heap() -> bool:
    """glibc only: serve allocations below 64 MiB from the heap and keep up to 256 MiB of free heap (``mallopt``;
    the effect of ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, or of jemalloc/tcmalloc, which PyTorch's
    CPU tuning guide recommends). Returns whether it was applied (False on other platforms and C libraries)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mmap_set = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # both set, whichever one a C library refuses
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mmap_set and trim_set)


def init_worker(threads: int | None) -> None:
    """Worker set-up: ``threads`` torch threads (None: leave torch's count), the heap kept
    (:func:`keep_heap`), Lightning quiet."""
    if threads is not None:
        torch.set_num_threads(threads)
    keep_heap()
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
