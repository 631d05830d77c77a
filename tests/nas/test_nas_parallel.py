"""Block-parallel search (nas/parallel.py): a 2-worker DNA run's rating table equals the serial run's exactly."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from nas.methods.base import get_method
from nas.methods.dna import DNA
from nas.parallel import blocks_of_rank, default_worker_threads, run_blocks_parallel
from nas.search.ratings import load_ratings
from nas.supernet import BlockSupernet
from tests.nas.test_nas_dna import tiny_cfg


@pytest.fixture
def one_thread():
    """Serial blocks run with the workers' thread count (1): identical arithmetic in every block."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def test_two_worker_rating_table_equals_the_serial_one(tmp_path, one_thread):
    serial = DNA(tiny_cfg(out_dir=str(tmp_path / "serial"), retrain=False)).run()
    parallel = DNA(tiny_cfg(out_dir=str(tmp_path / "parallel"), retrain=False, workers=2, worker_threads=1)).run()
    a, b = load_ratings(tmp_path / "serial" / "ratings.json"), load_ratings(tmp_path / "parallel" / "ratings.json")
    assert a.block_ratings == b.block_ratings  # exactly: every float of every candidate of every block
    assert a.block_costs == b.block_costs
    assert serial["encoding"] == parallel["encoding"] and serial["score"] == parallel["score"]
    timing = json.loads((tmp_path / "parallel" / "parallel.json").read_text())
    assert timing["workers"] == 2 and sorted(timing["block_seconds"]) == ["0", "1", "2"]
    assert not (tmp_path / "serial" / "parallel.json").exists()


def test_parallel_run_skips_finished_blocks_and_refuses_dependent_blocks(tmp_path, one_thread):
    out = tmp_path / "run"
    DNA(tiny_cfg(out_dir=str(out), retrain=False, blocks=[1])).run()  # block 1 finished earlier
    run_blocks_parallel(DNA(tiny_cfg(out_dir=str(out), retrain=False)), 1, 1)  # (in-process: the skip logic)
    timing = json.loads((out / "parallel.json").read_text())
    assert sorted(timing["block_seconds"]) == ["0", "2"]  # block 1 not dispatched again
    assert load_ratings(out / "ratings.json").block_ratings[1] == json.loads(
        (out / "block_1" / "ratings.json").read_text())["ratings"]
    selfsup = DNA(tiny_cfg(out_dir=str(tmp_path / "ss"), variant="selfsup"))
    assert not selfsup.independent_blocks
    with pytest.raises(ValueError, match="cannot run in parallel"):
        run_blocks_parallel(selfsup, 2, 1)


def test_helpers_and_interface_defaults():
    assert blocks_of_rank(range(5), 1, 2) == [1, 3] and blocks_of_rank(range(5), 0, 2) == [0, 2, 4]
    with pytest.raises(ValueError):
        blocks_of_rank(range(3), 2, 2)
    assert default_worker_threads(10_000) == 1
    assert get_method("dna").independent_blocks.fget is not None


def test_bossnas_parallel_rating_equals_the_serial_one(tmp_path, one_thread):
    """BossNAS blocks stay sequential (block k trains on the searched prefix); a block's candidates are rated by
    2 workers and scored together: the rating table equals the serial one exactly."""
    from nas.methods.bossnas import BossNAS
    from tests.nas.test_bossnas import _tiny_cfg

    quiet = []
    serial = BossNAS(_tiny_cfg(tmp_path / "serial"), log=quiet.append).run()
    method = BossNAS(_tiny_cfg(tmp_path / "parallel", workers=2, worker_threads=1), log=quiet.append)
    assert not method.independent_blocks  # the blocks are not dispatched, only the rating is
    parallel = method.run()
    a, b = load_ratings(tmp_path / "serial" / "ratings.json"), load_ratings(tmp_path / "parallel" / "ratings.json")
    assert a.block_ratings == b.block_ratings
    assert serial["architecture"]["keys"] == parallel["architecture"]["keys"]
    assert not list((tmp_path / "parallel").glob("block*/rating_state.pt"))  # the shared state file is removed


def test_cells_run_as_one_unit_per_cell_and_two_workers_give_the_serial_table(tmp_path, one_thread):
    """A multi-cell DNA block is dispatched cell by cell (each cell supernet trains and rates on its own); the
    block's table pools the cells' ratings, equal to the serial run's bit for bit, and a finished cell is reused."""
    from tests.nas.test_dna_family import CELL_SPACE
    from tests.nas.test_dna_family import tiny_cfg as cells_cfg

    serial_dir, parallel_dir = tmp_path / "serial", tmp_path / "parallel"
    method = DNA(cells_cfg(CELL_SPACE, variant="cells", out_dir=str(parallel_dir), retrain=False, workers=2,
                           worker_threads=1))
    units = method.parallel_units()
    assert sorted(units) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    sizes = [sum(p.numel() for p in BlockSupernet(method.cfg.space.blocks[k], cells=[c]).parameters())
             for k, c in units]
    assert sizes == sorted(sizes, reverse=True)  # largest first
    # a unit trains and rates its own cell only (not the whole block, which two workers would then do twice)
    alone = DNA(cells_cfg(CELL_SPACE, variant="cells", out_dir=str(tmp_path / "alone"), retrain=False))
    alone.prepare_blocks()
    alone.run_unit((1, 0))
    assert (tmp_path / "alone" / "block_1" / "cell_0" / "ratings.json").is_file()
    assert not (tmp_path / "alone" / "block_1" / "cell_1").exists()
    assert not alone.block_done(1) and alone.unit_done((1, 0)) and not alone.unit_done((1, 1))
    parallel = method.run()
    serial = DNA(cells_cfg(CELL_SPACE, variant="cells", out_dir=str(serial_dir), retrain=False)).run()
    a, b = load_ratings(serial_dir / "ratings.json"), load_ratings(parallel_dir / "ratings.json")
    assert a.block_ratings == b.block_ratings and serial["encoding"] == parallel["encoding"]
    timing = json.loads((parallel_dir / "parallel.json").read_text())
    assert sorted(timing["unit_seconds"]) == ["0/cell_0", "0/cell_1", "1/cell_0", "1/cell_1"]
    assert timing["unit_cpu_seconds"].keys() == timing["unit_seconds"].keys()  # the worker's own CPU time per unit
    assert all(0.0 < c <= 2.0 * timing["unit_seconds"][u] + 0.5 for u, c in timing["unit_cpu_seconds"].items())
    for k, block in enumerate(method.cfg.space.blocks):
        pooled = {}
        for c in range(len(block.cells)):
            cell = json.loads((parallel_dir / f"block_{k}" / f"cell_{c}" / "ratings.json").read_text())
            assert {block.parse_key(key)[0] for key in cell["ratings"]} == {c}  # a cell rates its own paths
            pooled.update(cell["ratings"])
        assert pooled == b.block_ratings[k]
    # resume at cell granularity: with block 1's table and cell 1 removed, only cell 1 of block 1 is dispatched
    (parallel_dir / "block_1" / "ratings.json").unlink()
    shutil.rmtree(parallel_dir / "block_1" / "cell_1")
    (parallel_dir / "ratings.json").unlink()
    again = DNA(cells_cfg(CELL_SPACE, variant="cells", out_dir=str(parallel_dir), retrain=False, workers=2,
                          worker_threads=1))
    assert [u for u in again.parallel_units() if not again.unit_done(u)] == [(1, 1)]
    run_blocks_parallel(again, 1, 1)
    assert load_ratings(parallel_dir / "ratings.json").block_ratings == a.block_ratings
