"""The FFN-search benchmark's caches record the data they were made on and refuse another task's data."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_mlp_search import _cached
from nas.ffn.distill import TASKS


def test_a_cache_made_on_other_listops_data_is_refused_and_one_made_on_the_same_is_reused(tmp_path, monkeypatch):
    path = tmp_path / "fitness.json"
    calls = []

    def compute():
        calls.append(1)
        return {"warm": [0.5]}

    first = _cached(path, compute, "listops")
    assert json.loads(path.read_text())["made_on"] == {"task": "listops", "data": TASKS["listops"].data}
    assert _cached(path, compute, "listops") == first and len(calls) == 1  # same data: reused
    monkeypatch.setitem(TASKS["listops"].data, "n", 2000)  # as if the generator's size had changed
    with pytest.raises(ValueError, match="made on other data"):
        _cached(path, compute, "listops")
    assert len(calls) == 1


def test_a_seqdigits_cache_from_before_the_record_is_still_read(tmp_path):
    path = tmp_path / "fitness.json"
    path.write_text(json.dumps({"warm": [0.9]}))  # no "made_on": seqdigits has no generator settings
    assert _cached(path, lambda: {"warm": [0.0]}, "seqdigits") == {"warm": [0.9]}


def test_a_full_search_made_by_another_search_config_is_refused(tmp_path):
    path = tmp_path / "full_search.json"
    first = _cached(path, lambda: {"searched_acc": [0.9]}, "seqdigits", search={"final_candidates": 8})
    assert _cached(path, lambda: {"searched_acc": [0.1]}, "seqdigits", search={"final_candidates": 8}) == first
    with pytest.raises(ValueError, match="another search config"):
        _cached(path, lambda: {"searched_acc": [0.1]}, "seqdigits", search={"final_candidates": 0})
