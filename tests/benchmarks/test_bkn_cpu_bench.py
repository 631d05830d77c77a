"""The bkn_cpu benchmark's round-robin timer: burst means, and the first/warm split of each burst."""

from __future__ import annotations

import time

from benchmarks.bench_bkn_cpu import _interleaved


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_first_and_warm_calls_are_timed_apart_and_the_burst_mean_includes_both():
    """A method whose first call after another method is slow (3 ms, then 1 ms): first_ms sees the slow call,
    warm_ms does not, p50 is the burst mean; a steady method reads the same in all three."""
    state = {"last": None}

    def cold_start() -> None:
        _spin(0.003 if state["last"] != "cold" else 0.001)
        state["last"] = "cold"

    def steady() -> None:
        _spin(0.001)
        state["last"] = "steady"

    out = _interleaved({"steady": steady, "cold": cold_start}, warmup=0, repeats=5, burst=4)
    cold, flat = out["cold"], out["steady"]
    # medians over 5 bursts: one preempted call does not move them
    assert cold["first_ms"] > 2.9 and cold["warm_ms"] < 2.0 and flat["first_ms"] < 2.0
    assert 1.45 < cold["p50_ms"] < 2.4  # (3 + 1 + 1 + 1) / 4
    for key in ("first_ms", "warm_ms", "p50_ms"):
        assert 0.95 < flat[key] < 2.0
