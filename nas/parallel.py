"""Block-parallel search: the independent blocks of a block-wise search trained and rated by worker processes.

A method whose blocks are independent once a shared stage is done (DNA: given the trained teacher, every
block distils its own teacher block) sets ``SearchMethod.independent_blocks``. :meth:`SearchMethod.run` with
the config's ``workers > 1`` then calls :func:`run_blocks_parallel`:

1. the parent runs the shared stage (:meth:`SearchMethod.prepare_blocks`: DNA trains or loads its teacher);
2. every unfinished unit (:meth:`SearchMethod.parallel_units`: a block, or a part of one that trains and rates on
   its own, e.g. one cell supernet of a DNA block with depth/width cells) becomes a task of a
   :func:`stflow.pool.run_tasks` process pool (spawned processes, ``worker_threads`` torch threads each), largest
   first: the worker re-creates the method from its config (``workers=1``, no progress bars), runs the same
   shared stage (which now only loads what the parent wrote), and :meth:`SearchMethod.run_unit` (train, rate,
   save the unit's result into the shared ``out_dir``, exactly the files a serial run writes);
3. the parent runs :meth:`SearchMethod.search`, which resumes: every block is finished, so it only gathers
   the blocks' ratings into the one rating table and reports.

A block's result does not depend on the process it ran in: every block seeds its own initialization, path
sampling and data order. The rating table of a parallel run is therefore the serial run's, bit for bit, when
each block runs with the same torch thread count (``worker_threads``; a serial run uses the process's count).

On several GPUs or nodes the same tasks map to one rank per worker (each rank runs ``run_block(k)`` for
``k = rank, rank + world, ...`` under its own single-device Lightning/Fabric trainer; no DDP wrapping of
different blocks), followed by one process running ``search()``: :func:`blocks_of_rank` gives the split.
Methods whose blocks depend on earlier blocks (BossNAS: block k trains on the searched path of blocks
``0..k-1``) stay sequential across blocks; see ``docs/nas.md``, "Parallel blocks".
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from nas.cache import write_json
from nas.methods.base import SearchMethod, get_method
from stflow.pool import run_tasks

__all__ = ["run_blocks_parallel", "run_unit_task", "unit_label", "default_worker_threads", "blocks_of_rank"]


def default_worker_threads(workers: int) -> int:
    """Torch threads per worker: the machine's cores shared evenly (at least one)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def blocks_of_rank(blocks: Sequence[int], rank: int, world: int) -> list[int]:
    """The blocks rank ``rank`` of ``world`` trains and rates (round robin): one rank per worker on GPUs/nodes."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return list(blocks)[rank::world]


def _worker_config(method: SearchMethod) -> Any:
    """The config a worker re-creates the method from: one process, no progress bars."""
    return replace(method.cfg, workers=1, progress=False)


def run_unit_task(name: str, cfg: Any, unit: tuple[int, int | None]) -> tuple[tuple[int, int | None], float, float]:
    """One worker task: method ``name`` from ``cfg``, its shared stage (loaded, not recomputed), then
    :meth:`SearchMethod.run_unit` (a block, or a part of one such as a DNA cell). Returns ``(unit, wall seconds,
    CPU seconds of the process)``: CPU below wall means the unit waited (for a core, for I/O)."""
    t0, c0 = time.perf_counter(), time.process_time()
    method = get_method(name)(cfg)
    method.prepare_blocks()
    method.run_unit(unit)
    return unit, time.perf_counter() - t0, time.process_time() - c0


def unit_label(unit: tuple[int, int | None]) -> str:
    """``"k"`` for a whole block, ``"k/cell_c"`` for a part of one (the keys of ``parallel.json``)."""
    k, part = unit
    return str(k) if part is None else f"{k}/cell_{part}"


def run_blocks_parallel(method: SearchMethod, workers: int, threads: int | None = None) -> dict[str, Any]:
    """Shared stage here, unfinished blocks on ``workers`` processes, then :meth:`SearchMethod.search` (which
    gathers the finished blocks' ratings into the rating table and reports). ``threads``: torch threads per
    worker (None: :func:`default_worker_threads`). Timings land in ``out_dir/parallel.json``."""
    if not method.independent_blocks:
        raise ValueError(f"{method.name}: blocks depend on earlier blocks; they cannot run in parallel workers")
    threads = default_worker_threads(workers) if threads is None else threads
    t0 = time.perf_counter()
    method.prepare_blocks()
    t_shared = time.perf_counter() - t0
    todo = [u for u in method.parallel_units() if not method.unit_done(u)]
    cfg = _worker_config(method)
    t1 = time.perf_counter()
    done = run_tasks(run_unit_task, [(method.name, cfg, u) for u in todo], workers, threads,
                     desc=f"{method.name} blocks", progress=bool(getattr(method.cfg, "progress", False)))
    t_blocks = time.perf_counter() - t1
    result = method.search()
    per_block: dict[str, float] = {}
    for (k, _), seconds, _ in done:  # a block's units summed: its work, wherever it ran
        per_block[str(k)] = per_block.get(str(k), 0.0) + seconds
    timing = {"workers": workers, "threads_per_worker": threads, "shared_seconds": t_shared,
              "blocks_seconds": t_blocks, "block_seconds": per_block,
              "unit_seconds": {unit_label(u): s for u, s, _ in done},
              "unit_cpu_seconds": {unit_label(u): c for u, _, c in done}, "total_seconds": time.perf_counter() - t0}
    write_json(method.out_dir / "parallel.json", timing)
    return result


# ---- BossNAS: sequential blocks, candidates of a block rated in parallel -----------------------------------------

def _bossnas_rating_task(cfg: Any, adapter: Any, k: int, prefix: list, state_path: str,
                         candidates: list) -> tuple[Any, Any]:
    """One worker's share of a BossNAS block's rating: the trained model (``state_path``, saved after the parent
    recalibrated the searched prefix), the same rating data, ``candidate_outputs`` of ``candidates`` (each
    re-estimates its own path's norm statistics first, so the order and the process do not matter)."""
    import torch

    from nas.data import DigitsDataModule
    from nas.methods.bossnas import SiameseSupernet, candidate_outputs, rating_data
    from nas.ops import make_norm

    model = SiameseSupernet(adapter, make_norm(cfg.norm, cfg.bkn_prior_weight), cfg.proj_hidden, cfg.proj_dim)
    model.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
    recal_images, eval_pairs = rating_data(DigitsDataModule(batch_size=cfg.batch_size, seed=cfg.data_seed), cfg)
    with torch.no_grad():
        model.eval()
        recal = [(model.prefix("online", x, prefix), model.prefix("target", x, prefix)) for x in recal_images]
        views = [tuple((model.prefix("online", v, prefix), model.prefix("target", v, prefix)) for v in pair)
                 for pair in eval_pairs]
        outs = [candidate_outputs(model, k, cand, recal, views) for cand in candidates]
    return torch.stack([p for p, _ in outs]), torch.stack([t for _, t in outs])  # (P_chunk, 2, N, D) each


def rate_candidates_parallel(method: Any, k: int, workers: int, threads: int | None = None) -> dict[str, float]:
    """BossNAS block ``k``'s ``{candidate key: score}`` with the candidates' outputs computed by ``workers``
    processes and scored together here (the population center needs every candidate): the same scores as
    :func:`nas.methods.bossnas.rate_block` (CPU; each worker with ``threads`` torch threads). ``method`` is a
    prepared :class:`nas.methods.bossnas.BossNAS` whose prefix norm statistics were just re-estimated."""
    import torch

    from nas.methods.bossnas import score_candidates

    threads = default_worker_threads(workers) if threads is None else threads
    cands = method.adapter.candidates(k, method.prefix)
    state = method.out_dir / f"block{k}" / "rating_state.pt"
    state.parent.mkdir(parents=True, exist_ok=True)
    torch.save(method.model.state_dict(), state)
    per = -(-len(cands) // workers)  # contiguous chunks, in the serial order
    chunks = [cands[i:i + per] for i in range(0, len(cands), per)]
    cfg = replace(method.cfg, workers=1, progress=False)
    try:
        outs = run_tasks(_bossnas_rating_task, [(cfg, method.adapter, k, list(method.prefix), str(state), chunk)
                                                for chunk in chunks], workers, threads,
                         desc=f"rate block {k}", progress=bool(method.cfg.progress))
    finally:
        state.unlink(missing_ok=True)
    scores = score_candidates(torch.cat([p for p, _ in outs]), torch.cat([t for _, t in outs]),
                              method.cfg.center_normalized)
    return {method.adapter.key(k, c): float(s) for c, s in zip(cands, scores.tolist())}
