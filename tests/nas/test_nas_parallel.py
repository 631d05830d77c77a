"""Block-parallel search (nas/parallel.py): a 2-worker DNA run's rating table equals the serial run's exactly."""

from __future__ import annotations

import json

import pytest
import torch

from nas.methods.base import get_method
from nas.methods.dna import DNA
from nas.parallel import blocks_of_rank, default_worker_threads, run_blocks_parallel
from nas.search.ratings import load_ratings
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
