"""The block-parallel benchmark: interleaved repeats, identical tables, and the median speed-up recomputed."""

from __future__ import annotations

import json
import statistics

from benchmarks import bench_nas_parallel


def test_repeats_are_paired_and_the_median_is_recomputed_from_the_rows(tmp_path):
    argv = ["--dna-config", "dna_cells_digits", "--block-epochs", "1", "--teacher-epochs", "1", "--repeats", "3",
            "--max-workers", "4", "--results-dir", str(tmp_path)]
    assert bench_nas_parallel.main(argv) == 0
    payload = json.loads((tmp_path / "nas_parallel.json").read_text())
    rows = payload["rows"]
    serial = [r for r in rows if r["run"] == "serial"]
    parallel = [r for r in rows if r["run"] == "parallel"]
    assert [r["repeat"] for r in serial] == [r["repeat"] for r in parallel] == [0, 1, 2]
    assert all(r["identical_table"] for r in parallel)  # every 2-worker table equals its serial one exactly
    speedups = [s["blocks_stage_s"] / p["blocks_stage_s"] for s, p in zip(serial, parallel)]
    assert [r["speedup"] for r in parallel] == speedups
    assert rows[-1]["run"] == "median" and rows[-1]["speedup"] == statistics.median(speedups)
    assert all(len(r["unit_s"].split()) == 9 for r in serial)  # digits-cells: 3 blocks x 3 cells, one unit each
    assert {p["space"] for p in payload["projection"]} == {"digits-cells (9 units, measured)",
                                                           "larger (12 units of the mean unit)"}
    assert (tmp_path / "nas_parallel.png").is_file()
