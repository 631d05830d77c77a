"""Where benchmarks write (issue #22) and what their CLIs refuse before any work.

Output: ``runs/benchmarks/`` (``harness.OUT_DIR``) by default, ``--results-dir DIR``, and the committed
``benchmarks/results/`` (``harness.RESULTS_DIR``) only with ``--update-results``. Every test points both folders
into ``tmp_path``, so the committed files are never written, whatever the code under test does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from benchmarks import harness
from benchmarks.__main__ import main

COMMITTED = Path(harness.__file__).resolve().parent / "results"
TINY_CONVLSTM = ["convlstm", "--shapes", "bikenyc", "--devices", "cpu", "--batch", "1", "--warmup", "0",
                 "--repeats", "1"]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """name -> (mtime_ns, sha1) of every file under ``folder``."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(stand-in for the committed benchmarks/results with one earlier table, stand-in for runs/benchmarks)."""
    committed, out = tmp_path / "committed", tmp_path / "out"
    committed.mkdir()
    (committed / "convlstm.csv").write_text("earlier,table\n")
    monkeypatch.setattr(harness, "RESULTS_DIR", committed)
    monkeypatch.setattr(harness, "OUT_DIR", out)
    harness.set_output()  # this process's choice: the default
    yield committed, out
    harness.set_output()


def test_a_default_run_writes_to_the_out_dir_and_leaves_the_committed_results(folders, capsys) -> None:
    committed, out = folders
    real_before, committed_before = snapshot(COMMITTED), snapshot(committed)
    assert main(TINY_CONVLSTM) == 0
    assert snapshot(committed) == committed_before  # the (stand-in) committed folder: untouched
    assert snapshot(COMMITTED) == real_before  # and the real one too
    assert sorted(p.name for p in out.iterdir()) == ["convlstm.csv", "convlstm.json"]
    assert json.loads((out / "convlstm.json").read_text())["benchmark"] == "convlstm"
    printed = capsys.readouterr().out
    assert f"saved {out / 'convlstm.csv'}" in printed and "--update-results" in printed  # where, and how else


def test_update_results_writes_into_the_committed_folder(folders, capsys) -> None:
    committed, out = folders
    assert main([*TINY_CONVLSTM, "--update-results"]) == 0
    assert (committed / "convlstm.csv").read_text().startswith("shape,")  # replaced
    assert (committed / "convlstm.json").is_file() and not out.exists()
    assert f"saved {committed / 'convlstm.csv'}" in capsys.readouterr().out


def test_results_dir_and_its_former_name_choose_another_folder(folders, tmp_path: Path) -> None:
    committed, out = folders
    before = snapshot(committed)
    assert main([*TINY_CONVLSTM, "--results-dir", str(tmp_path / "mine")]) == 0
    assert main([*TINY_CONVLSTM, "--out-dir", str(tmp_path / "old-flag")]) == 0  # convlstm's former flag
    assert (tmp_path / "mine" / "convlstm.json").is_file() and (tmp_path / "old-flag" / "convlstm.json").is_file()
    assert snapshot(committed) == before and not out.exists()


def test_leaderboard_report_only_follows_the_flag(folders, tmp_path: Path) -> None:
    committed, out = folders
    argv = ["leaderboard", "--report-only", "--models", "stid", "--out-dir", str(tmp_path / "runs"),
            "--data-dir", str(tmp_path)]
    assert main(argv) == 0  # nothing finished: an empty table, written to the out dir
    assert (out / "leaderboard.json").is_file() and not (committed / "leaderboard.json").exists()
    assert main([*argv, "--update-results"]) == 0
    assert (committed / "leaderboard.json").is_file()


def test_figures_and_caches_follow_the_output_folder(folders, capsys) -> None:
    from benchmarks.nas_digits import GT_NAME, gt_path, plot_agreement

    committed, out = folders
    gt = {"architectures": [{"params": p, "accuracy": a} for p, a in ((10, 0.5), (20, 0.7), (30, 0.6))]}
    figure = plot_agreement(gt, {"rater": [0.1, 0.3, 0.2]}, harness.output_path("dna_digits.png"))
    assert figure == out / "dna_digits.png" and figure.read_bytes()[:4] == b"\x89PNG"
    assert f"saved {figure}" in capsys.readouterr().out
    # a committed ground truth is read (copied into the out dir, where new seeds would be written) ...
    (committed / GT_NAME).write_text('{"seeds": [0, 1]}')
    before = snapshot(committed)
    assert gt_path() == out / GT_NAME and json.loads((out / GT_NAME).read_text()) == {"seeds": [0, 1]}
    assert snapshot(committed) == before
    # ... another benchmark's result is read from the out dir when this run wrote one, else the committed one
    (committed / "dna_digits.json").write_text("{}")
    assert harness.input_path("dna_digits.json") == committed / "dna_digits.json"
    (out / "dna_digits.json").write_text("{}")
    assert harness.input_path("dna_digits.json") == out / "dna_digits.json"
    harness.set_output(update_results=True)  # with the flag the committed cache itself is extended
    assert gt_path() == committed / GT_NAME and harness.output_dir() == committed


# (CLI, arguments, the key the one-line message names, what would start the work: stubbed to fail loudly)
BAD = [
    ("acfm_bikenyc", ["--epochs", "three"], "epochs", "_row"),
    ("acfm_bikenyc", ["--epochs", "1.7"], "epochs", "_row"),
    ("acfm_bikenyc", ["--epochs", "true"], "epochs", "_row"),
    ("acfm_bikenyc", ["--epochs", "0"], "epochs", "_row"),
    ("acfm_bikenyc", ["--batch-size", "0"], "batch_size", "_row"),
    ("bkn_digits", ["--epochs", "1.7"], "epochs", "run_all"),
    ("bkn_digits", ["--seeds", "[]"], "seeds", "run_all"),
    ("bkn_options", ["--shortcuts", "sum"], "shortcuts", "run_study"),
    ("bkn_options", ["--guard-ratios", "-1"], "guard_ratios", "run_study"),
    ("nas_parallel", ["--repeats", "0"], "repeats", "run_blocks_parallel"),
    ("convlstm", ["--repeats", "0"], "repeats", "_pair"),
    ("convlstm", ["--update-results", "--results-dir", "x"], "results-dir", "_pair"),
    ("constrained_search", ["--sizes", "0"], "sizes", "exact_search"),
    ("leaderboard", ["--seeds", "[]"], "seeds", "collect"),
    ("leaderboard", ["--threads", "0"], "threads", "collect"),
    ("dna_digits", ["--gt-epochs", "0"], "gt_epochs", "ground_truth"),
    ("mlp_search", ["--evals", "0"], "evals", "ground_truth"),
]


@pytest.mark.parametrize(("name", "args", "key", "work"), BAD, ids=[f"{b[0]} {' '.join(b[1])}" for b in BAD])
def test_bad_options_are_refused_before_any_work(name, args, key, work, folders, tmp_path, monkeypatch, capsys):
    import importlib

    def started(*_a, **_k):
        raise AssertionError(f"{name} started its work with bad options {args}")

    monkeypatch.setattr(importlib.import_module(f"benchmarks.bench_{name}"), work, started)
    if name == "leaderboard":
        args = [*args, "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "runs")]
    assert main([name, *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and key in err[0], err
    committed, out = folders
    assert not out.exists() and sorted(p.name for p in committed.iterdir()) == ["convlstm.csv"]
