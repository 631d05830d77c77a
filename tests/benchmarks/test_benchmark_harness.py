"""The benchmark harness: tables, saved CSV/JSON with environment, timing, CLI dispatch."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

from benchmarks.__main__ import available, main
from benchmarks.harness import format_table, report, time_fn


def test_report_writes_csv_and_json_with_environment(tmp_path: Path, capsys) -> None:
    rows = [{"op": "bn", "p50_ms": 1.5}, {"op": "bkn", "p50_ms": 2.25, "ratio": 1.5}]
    json_path = report("unit", rows, notes=["a note"], out_dir=tmp_path)
    printed = capsys.readouterr().out
    assert "bkn" in printed and "a note" in printed
    payload = json.loads(json_path.read_text())
    assert payload["rows"] == rows
    assert payload["environment"]["torch"] and payload["environment"]["git"]
    with open(tmp_path / "unit.csv") as fh:
        table = list(csv.DictReader(fh))
    assert [r["op"] for r in table] == ["bn", "bkn"] and table[1]["ratio"] == "1.5" and table[0]["ratio"] == ""


def test_format_table_aligns_columns() -> None:
    text = format_table([{"a": 1, "b": "xyz"}, {"a": 123456.0, "b": None}])
    lines = text.splitlines()
    assert len(lines[0]) == len(lines[1]) == len(lines[2])  # header, rule and rows share column widths
    assert "1.235e+05" in text


def test_time_fn_measures_sleep() -> None:
    stats = time_fn(lambda: time.sleep(0.002), warmup=1, repeats=5)
    assert stats["n"] == 5 and 1.5 <= stats["p50_ms"] < 50
    assert stats["p20_ms"] <= stats["p50_ms"] <= stats["p80_ms"]


def test_cli_lists_and_rejects_unknown(capsys) -> None:
    assert main(["list"]) == 0
    assert main(["no_such_benchmark"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
    assert isinstance(available(), list)
