"""Reruns and bad inputs of the NAS CLIs (issue #22): cached artefacts are reused only under the config that made
them, retrained results are never replaced silently, ranking files must describe the same space, budgets are
checked before any training, and wrong config types and values are one-line errors before any work."""

from __future__ import annotations

import ast
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from _tiny_space import TINY_SPACE

import nas.methods.bossnas as bossnas
import nas.methods.dna as dna
import nas.methods.mlp as mlp
import nas.methods.pinas as pinas
import nas.transfer.seg as seg
from nas import cli
from nas.data.views import ViewConfig
from nas.ffn import groundtruth as ffn_groundtruth
from nas.methods.bossnas import BossNAS, BossNASConfig
from nas.methods.dna import DNA, DNAConfig
from nas.methods.pinas import PiNAS, PiNASConfig
from nas.search import constrained, ranking
from nas.search.ratings import RatingTable, save_ratings
from nas.spaces import SearchSpace
from nas.transfer.__main__ import main as transfer_main

MLP_ARGS = ["--no-progress", "--teacher-epochs", "0.5", "--warmup-epochs", "0.5", "--candidate-epochs", "0.1",
            "--stage1-evals", "3", "--stage2-evals", "2", "--init-samples", "2", "--retrain-interval", "2",
            "--height-levels", "[3]", "--stage3-epochs", "0.2", "--retrain-epochs", "0.2", "--retrain-seeds", "[0]",
            "--widths", "[32, 64]", "--max-stack", "1"]
SEG_ARGS = ["--epochs", "1", "--pretrain-epochs", "1", "--num-train", "16", "--num-val", "8", "--num-test", "8",
            "--canvas", "16", "--scales", "1", "--max-digits", "2", "--num-pictures", "1", "--no-progress"]


def _no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every trainer of the nas methods and the transfer raises: a test passing with it ran no training."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("training started")

    for module in (dna, bossnas, pinas, seg):
        monkeypatch.setattr(module, "fit", refuse)
    monkeypatch.setattr(mlp, "train", refuse)


def _snapshot(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time (ns)."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def _copy(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# finished tiny runs (made once, copied by the tests that rerun them)
# ---------------------------------------------------------------------------------------------
def dna_cfg(out: Path, **changes: Any) -> DNAConfig:
    cfg = DNAConfig(space=SearchSpace.from_dict(TINY_SPACE), teacher_layers=1, teacher_epochs=1, block_epochs=1,
                    retrain_epochs=1, batch_size=256, recal_batches=2, progress=False, out_dir=str(out))
    return replace(cfg, **changes)


def bossnas_cfg(out: Path, **changes: Any) -> BossNASConfig:
    base: dict[str, Any] = dict(space="hytra", sampling="random", num_paths=2, hytra_layers=(1, 1), hytra_width=8,
                                out_dir=str(out), epochs_per_block=1, batch_size=64, limit_train_batches=2,
                                limit_val_batches=1, recal_batches=1, rate_views=1, proj_hidden=16, proj_dim=8,
                                progress=False)
    return BossNASConfig(**{**base, **changes})


def pinas_cfg(out: Path, **changes: Any) -> PiNASConfig:
    space = {**TINY_SPACE, "blocks": TINY_SPACE["blocks"][:2]}
    base: dict[str, Any] = dict(space=space, epochs=1, batch_size=32, queue_size=64, feat_dim=8, neck_hidden=16,
                                shuffle_bn_groups=2, probe_epochs=1, limit_train_batches=2, recal_batches=1,
                                rate_sample=4, views=ViewConfig(), out_dir=str(out), progress=False)
    return PiNASConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def dna_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dna") / "run"
    DNA(dna_cfg(out)).run()
    return out


@pytest.fixture(scope="module")
def bossnas_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bossnas") / "run"
    BossNAS(bossnas_cfg(out), log=lambda line: None).run()
    return out


@pytest.fixture(scope="module")
def pinas_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pinas") / "run"
    PiNAS(pinas_cfg(out), log=lambda line: None).run()
    return out


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mlp") / "run"
    assert cli.main(["mlp", "--out-dir", str(out), *MLP_ARGS]) == 0
    return out


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("seg") / "run"
    assert transfer_main(["seg", "--out-dir", str(out), *SEG_ARGS]) == 0
    return out


# ---------------------------------------------------------------------------------------------
# 1. cached artefacts are reused only under the same config
# ---------------------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_records_are_written_before_the_work(tmp_path: Path):
    from nas.cache import Artefact, check_artefacts, fingerprint

    fields = {"b": (1, 2), "a": {"y": 1.5, "x": Path("p")}}
    assert fingerprint(fields) == fingerprint({"a": {"x": "p", "y": 1.5}, "b": [1, 2]})  # order, tuples, paths
    assert fingerprint(fields) != fingerprint({**fields, "b": (2, 1)})
    art = Artefact(tmp_path / "block_0", fields, "block 0")
    assert check_artefacts([art]) == [] and json.loads(art.sidecar.read_text())["fingerprint"] == fingerprint(fields)
    (art.path / "checkpoints").mkdir(parents=True)  # an interrupted computation: resumed under the same config...
    assert check_artefacts([art]) == [art]
    with pytest.raises(ValueError, match=r"block_0 \(block 0\) was made with another config \(b: \[1, 2\] -> \[3\]\)"):
        check_artefacts([Artefact(art.path, {**fields, "b": [3]}, "block 0")])  # ...and refused under another


def test_dna_rerun_reuses_the_artefacts_of_the_same_config(dna_run, tmp_path, monkeypatch, capsys):
    out = _copy(dna_run, tmp_path)
    _no_training(monkeypatch)
    capsys.readouterr()
    # progress bars and worker counts do not change an artefact: they are not part of its record
    DNA(dna_cfg(out, retrain=False, progress=True, worker_threads=3)).run()
    err = capsys.readouterr().err
    for name in ("teacher", "block_0", "block_1", "block_2"):
        assert f"reusing {out / name} (" in err


@pytest.mark.parametrize(("change", "message"), [
    ({"block_epochs": 2}, r"block_0 \(block 0\) was made with another config \(block_epochs: 1 -> 2\)"),
    ({"teacher_lr": 0.01}, r"teacher \(teacher\) was made with another config \(teacher_lr: 0.003 -> 0.01\)"),
    ({"norm": "bkn"}, r"block_0 \(block 0\) was made with another config \(norm: \"bn\" -> \"bkn\"\)"),
    ({"recal_batches": 1}, r"block_0 \(block 0\) was made with another config \(recal_batches: 2 -> 1\)"),
])
def test_dna_rerun_with_another_config_is_refused_before_any_work(dna_run, tmp_path, monkeypatch, change, message):
    out = _copy(dna_run, tmp_path)
    before = _snapshot(out)
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=message + "; use a new --out-dir, or pass --overwrite to recompute it"):
        DNA(dna_cfg(out, **change)).run()
    assert _snapshot(out) == before  # nothing deleted, nothing written


def test_dna_overwrite_recomputes_only_the_artefacts_whose_config_changed(dna_run, tmp_path, monkeypatch, capsys):
    out = _copy(dna_run, tmp_path)
    trained: list[str] = []
    real_fit = dna.fit

    def counting_fit(system, datamodule, run_cfg):
        trained.append(Path(run_cfg.out_dir).name)
        return real_fit(system, datamodule, run_cfg)

    monkeypatch.setattr(dna, "fit", counting_fit)
    DNA(dna_cfg(out, block_epochs=2, overwrite=True, retrain=False)).run()
    assert trained == ["block_0", "block_1", "block_2"]  # the teacher (same config) was reused
    assert json.loads((out / "block_0.config.json").read_text())["config"]["block_epochs"] == 2
    assert "recomputing" in capsys.readouterr().err


def test_dna_cli_mismatch_is_one_line_and_exit_2(dna_run, tmp_path, capsys):
    out = _copy(dna_run, tmp_path)
    conf = tmp_path / "tiny.yaml"
    conf.write_text(yaml.safe_dump({"space": TINY_SPACE, "teacher_layers": 1, "teacher_epochs": 2, "block_epochs": 1,
                                    "retrain_epochs": 1, "batch_size": 256, "recal_batches": 2}))
    assert cli.main(["dna", "--config", str(conf), "--out-dir", str(out), "--no-progress"]) == 2
    line = _one_error_line(capsys)
    assert line == (f"error: {out / 'teacher'} (teacher) was made with another config (teacher_epochs: 1 -> 2); "
                    "use a new --out-dir, or pass --overwrite to recompute it")


def test_bossnas_blocks_are_reused_only_under_the_same_config(bossnas_run, tmp_path, monkeypatch, capsys):
    out = _copy(bossnas_run, tmp_path)
    _no_training(monkeypatch)
    capsys.readouterr()
    BossNAS(bossnas_cfg(out, budget=1e9), log=lambda line: None).run()  # the budget only changes the search
    assert f"reusing {out / 'block0'} (block 0, same config)" in capsys.readouterr().err
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"block0 \(block 0\) was made with another config \(lr: 0.002 -> 0.01\)"):
        BossNAS(bossnas_cfg(out, lr=0.01), log=lambda line: None).run()
    assert _snapshot(out) == before


def test_pinas_supernet_and_rows_are_checked_separately(pinas_run, tmp_path, monkeypatch):
    out = _copy(pinas_run, tmp_path)
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=r"supernet \(trained supernet\) .* \(temperature: 0.2 -> 0.5\)"):
        PiNAS(pinas_cfg(out, temperature=0.5), log=lambda line: None).run()
    # another rating only: the trained supernet is fine, the rows are not
    with pytest.raises(ValueError, match=r"rows.json \(architecture ratings\) .* \(rated \(changed\)\)"):
        PiNAS(pinas_cfg(out, rate_sample=5), log=lambda line: None).run()


def test_mlp_stages_are_reused_only_under_the_same_config(mlp_run, tmp_path, monkeypatch, capsys):
    out = _copy(mlp_run, tmp_path)
    _no_training(monkeypatch)
    argv = ["mlp", "--out-dir", str(out), *MLP_ARGS]
    assert cli.main([*argv, "--progress"]) == 0  # progress output does not change an artefact
    assert f"reusing {out / 'stage_2'} (stage 3 search, same config)" in capsys.readouterr().err
    assert cli.main([*argv, "--warmup-epochs", "0.4"]) == 2
    assert _one_error_line(capsys).startswith(
        f"error: {out / 'warmup'} (warm-up supernet) was made with another config (warmup_epochs: 0.5 -> 0.4)")


def test_transfer_reuses_its_result_only_under_the_same_config(seg_run, tmp_path, monkeypatch, capsys):
    out = _copy(seg_run, tmp_path)
    before = _snapshot(out)
    _no_training(monkeypatch)
    assert transfer_main(["seg", "--out-dir", str(out), *SEG_ARGS]) == 0
    assert f"reusing {out / 'result.json'}" in capsys.readouterr().err
    assert transfer_main(["seg", "--out-dir", str(out), *SEG_ARGS, "--lr", "0.01"]) == 2
    assert _one_error_line(capsys) == (f"error: {out / 'seg'} (dense training) was made with another config (lr: "
                                       "0.003 -> 0.01); use a new --out-dir, or pass --overwrite to recompute it")
    arch = out / "arch.json"  # the architecture counts by its content, not by how it is named
    arch.write_text(json.dumps({"encoding": ast.literal_eval(seg.DNA_DIGITS_ARCH)}))
    assert transfer_main(["seg", "--out-dir", str(out), *SEG_ARGS, "--arch", str(arch)]) == 0
    arch.unlink()
    assert _snapshot(out) == before


def test_ffn_ground_truth_with_other_settings_is_refused(tmp_path, monkeypatch, capsys):
    calls: list[tuple[str, int]] = []

    def fake_job(task, expr, layers, width, seed, fold, folds, epochs, d, val_fraction):
        calls.append((expr, seed))
        return 7 + seed, 10

    monkeypatch.setattr(ffn_groundtruth, "_job", fake_job)
    path, exprs = tmp_path / "gt.json", ffn_groundtruth.sample_distinct(2)
    kwargs: dict[str, Any] = dict(seeds=[0], folds=1, epochs=2, workers=1, progress=False)
    first = ffn_groundtruth.build_expr_ground_truth("seqdigits", path, exprs, **kwargs)
    assert len(calls) == 2 and ffn_groundtruth.build_expr_ground_truth("seqdigits", path, exprs, **kwargs) == first
    assert f"reusing {path} (ground truth, same config)" in capsys.readouterr().err
    refused = r"gt.json \(ground truth\) was made with another config \(epochs: 2.0 -> 3.0\)"
    with pytest.raises(ValueError, match=refused):
        ffn_groundtruth.build_expr_ground_truth("seqdigits", path, exprs, **{**kwargs, "epochs": 3})
    assert len(calls) == 2 and json.loads(path.read_text()) == first  # nothing trained, the file kept
    ffn_groundtruth.build_expr_ground_truth("seqdigits", path, exprs, **{**kwargs, "epochs": 3}, overwrite=True)
    assert len(calls) == 4 and json.loads(path.read_text())["epochs"] == 3


# ---------------------------------------------------------------------------------------------
# 2. a retrained result is never replaced silently
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("change", "message"), [
    ({"retrain_epochs": 2}, r"retrain \(retrained network\) .* \(retrain_epochs: 1 -> 2\)"),
    ({"budget": 5000.0}, r"retrain \(retrained network\) .* \(budget: null -> 5000.0, budget_fraction: 0.5 -> null\)"),
])
def test_dna_retrained_network_is_never_replaced_silently(dna_run, tmp_path, monkeypatch, change, message):
    out = _copy(dna_run, tmp_path)
    before = _snapshot(out)
    _no_training(monkeypatch)
    with pytest.raises(ValueError, match=message):
        DNA(dna_cfg(out, **change)).run()
    assert _snapshot(out) == before


def test_dna_rerun_without_retraining_keeps_the_retrained_result(dna_run, tmp_path, monkeypatch):
    out = _copy(dna_run, tmp_path)
    earlier = json.loads((out / "architecture.json").read_text())["retrain"]
    _no_training(monkeypatch)
    assert DNA(dna_cfg(out, retrain=False)).run()["retrain"] == earlier
    assert json.loads((out / "architecture.json").read_text())["retrain"] == earlier
    assert "retrain" not in DNA(dna_cfg(out, retrain=False, budget=5000.0)).run()  # another search: not its result
    assert (out / "retrain" / "model.pt").is_file()  # ...which stays on disk


def test_dna_overwrite_retrains_under_the_new_config(dna_run, tmp_path):
    out = _copy(dna_run, tmp_path)
    weights = (out / "retrain" / "model.pt").stat().st_mtime_ns
    arch = DNA(dna_cfg(out, retrain_epochs=2, overwrite=True)).run()
    assert (out / "retrain" / "model.pt").stat().st_mtime_ns != weights
    assert 0 <= arch["retrain"]["test_acc"] <= 1
    assert json.loads((out / "retrain.config.json").read_text())["config"]["retrain_epochs"] == 2


def test_mlp_retraining_result_is_never_replaced_silently(mlp_run, tmp_path, monkeypatch, capsys):
    out = _copy(mlp_run, tmp_path)
    _no_training(monkeypatch)
    assert cli.main(["mlp", "--out-dir", str(out), *MLP_ARGS, "--retrain-seeds", "[0, 1]"]) == 2
    assert _one_error_line(capsys).startswith(f"error: {out / 'retrain.json'} (retraining result) was made with "
                                              "another config (retrain_seeds: [0] -> [0, 1])")


def test_transfer_no_resume_refuses_a_finished_run_unless_overwrite(seg_run, tmp_path, monkeypatch, capsys):
    out = _copy(seg_run, tmp_path)
    before = _snapshot(out)
    with monkeypatch.context() as patch:
        _no_training(patch)
        assert transfer_main(["seg", "--out-dir", str(out), *SEG_ARGS, "--no-resume"]) == 2
        assert _one_error_line(capsys) == (f"error: {out} already holds a run: resume it (--resume), recompute it "
                                           "(--no-resume --overwrite) or choose another --out-dir")
        assert _snapshot(out) == before
    assert transfer_main(["seg", "--out-dir", str(out), *SEG_ARGS, "--no-resume", "--overwrite"]) == 0
    assert (out / "result.json").stat().st_mtime_ns != before["result.json"]


# ---------------------------------------------------------------------------------------------
# 3. ranking: both files describe the same space
# ---------------------------------------------------------------------------------------------
def _ranking_files(tmp_path: Path) -> tuple[Path, Path]:
    costs = {"0": {"params": 10}, "1": {"params": 20}, "2": {"params": 5}}
    table = RatingTable([{"0": 0.1, "1": 0.2, "2": 0.3} for _ in range(3)], [dict(costs) for _ in range(3)])
    ratings = save_ratings(table, tmp_path / "r3.json")
    encodings = [(0, 0, 0), (1, 0, 0), (2, 1, 0), (0, 2, 1), (1, 1, 2)]
    truth = tmp_path / "gt3.json"
    truth.write_text(json.dumps({"architectures": [{"encoding": [[a], [b], [c]], "accuracy": 0.5 + 0.01 * (a + b + c)}
                                                   for a, b, c in encodings]}))
    return ratings, truth


def _edit_truth(truth: Path, name: str, edit) -> Path:
    data = json.loads(truth.read_text())
    for a in data["architectures"]:
        edit(a)
    out = truth.with_name(name)
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("truth_blocks", [2, 4])
def test_ranking_refuses_other_block_counts(tmp_path, capsys, truth_blocks):
    ratings, truth = _ranking_files(tmp_path)
    other = _edit_truth(truth, "other.json", lambda a: a.update(encoding=(a["encoding"] + [[0]])[:truth_blocks]))
    assert ranking.main(["--ratings", str(ratings), "--ground-truth", str(other)]) == 2
    assert _one_error_line(capsys) == (f"error: block counts differ: {ratings} rates 3-block architectures, {other} "
                                       f"holds {truth_blocks}-block ones")


def test_ranking_names_every_key_the_ratings_do_not_know(tmp_path, capsys):
    ratings, truth = _ranking_files(tmp_path)

    def unknown_ops(arch: dict[str, Any]) -> None:  # block 0: ops 5, 6, 7 (for 0, 1, 2); block 2: op 9 twice
        enc = arch["encoding"]
        enc[0][0] += 5
        if enc[1] == [1]:
            enc[2][0] = 9

    bad = _edit_truth(truth, "bad.json", unknown_ops)
    assert ranking.main(["--ratings", str(ratings), "--ground-truth", str(bad)]) == 2
    assert _one_error_line(capsys) == (f"error: {bad} uses candidate keys that {ratings} does not rate: "
                                       "block 0: '5', '6', '7'; block 2: '9'")


def test_ranking_rows_refuse_other_block_counts_and_unrated_architectures(tmp_path, capsys):
    _, truth = _ranking_files(tmp_path)
    rows = tmp_path / "rows.json"
    archs = json.loads(truth.read_text())["architectures"]
    rows.write_text(json.dumps({"architectures": [{"encoding": a["encoding"], "score": float(i), "params": i + 1}
                                                  for i, a in enumerate(archs[:4])], "lower_is_better": False}))
    assert ranking.main(["--ratings", str(rows), "--ground-truth", str(truth)]) == 2
    assert _one_error_line(capsys) == (f"error: {truth}: 1 of its 5 architectures are not rated in {rows} (4 rows), "
                                       "e.g. [[1], [1], [2]]")
    short = _edit_truth(truth, "short.json", lambda a: a.update(encoding=a["encoding"][:2]))
    assert ranking.main(["--ratings", str(rows), "--ground-truth", str(short)]) == 2
    assert "block counts differ" in _one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# 4. budgets are checked against the block costs before any training
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dna", "bossnas", "pinas", "mlp"])
@pytest.mark.parametrize("budget", ["tiny", "negative"])
def test_infeasible_budget_fails_before_any_training(method, budget, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    out = tmp_path / "run"
    t0 = time.perf_counter()
    if method == "mlp":
        value = 0.01 if budget == "tiny" else 1e-9
        _, cfg = cli.method_config("mlp", ["--out-dir", str(out), *MLP_ARGS, "--budget-fraction", str(value)])
        match = r"budget_fraction .* allows \d+ FFN params; the cheapest FFN configuration costs at least 4224"
        with pytest.raises(ValueError, match=match):
            mlp.MLPSearch(cfg).run()
    else:
        value = 30.0 if budget == "tiny" else -5.0
        make = {"dna": lambda: DNA(dna_cfg(out, budget=value)),
                "bossnas": lambda: BossNAS(bossnas_cfg(out, budget=value)),
                "pinas": lambda: PiNAS(pinas_cfg(out, budget=value))}[method]
        tiny = r"no (legal |rated )?architecture has params < budget 30; the cheapest costs \d+"
        negative = r"budget must be a finite positive number, got -5 \(the cheapest .*architecture costs \d+ params\)"
        match = tiny if budget == "tiny" else negative
        with pytest.raises(ValueError, match=match):
            make().run()
    assert time.perf_counter() - t0 < 60 and not (out / "teacher").exists()


def test_constrained_cli_names_the_cheapest_cost_of_a_negative_budget(tmp_path, capsys):
    ratings, _ = _ranking_files(tmp_path)
    assert constrained.main(["--ratings", str(ratings), "--budget", "-5"]) == 2
    assert _one_error_line(capsys) == ("error: budget must be a finite positive number, got -5 (the cheapest "
                                       "architecture costs 15 params)")
    assert constrained.main(["--ratings", str(ratings), "--budget", "15"]) == 2
    assert _one_error_line(capsys) == "error: no architecture has params < budget 15; the cheapest costs 15"


# ---------------------------------------------------------------------------------------------
# 5. wrong config types and impossible values: one line naming the key, before any work
# ---------------------------------------------------------------------------------------------
CONFIG_ERRORS = [
    (["dna", "--block-epochs", "three"], "key \"block_epochs\": expected int, got 'three'"),
    (["dna", "--block-epochs", "1.7"], "key \"block_epochs\": expected int, got '1.7'"),
    (["dna", "--block-epochs", "true"], "key \"block_epochs\": expected int, got 'True'"),
    (["dna", "--block-epochs", "0"], "block_epochs must be >= 1, got 0"),
    (["dna", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["dna", "--block-lr", "0"], "block_lr must be > 0, got 0.0"),
    (["dna", "--blocks", "[5]"], "block 5 out of range: the space has 3 blocks"),
    (["dna", "--config", "{empty_ops}"], "a search space needs at least one op (ops is empty)"),
    (["bossnas", "--epochs-per-block", "true"], "key \"epochs_per_block\": expected int, got 'True'"),
    (["bossnas", "--batch-size", "0"], "batch_size must be >= 2 (batch statistics), got 0"),
    (["pinas", "--config", "{epochs_true}"], "key \"epochs\": expected int, got 'True'"),
    (["pinas", "--epochs", "1.7"], "key \"epochs\": expected int, got '1.7'"),
    (["mlp", "--teacher-epochs", "0"], "teacher_epochs must be a finite number > 0, got 0.0"),
    (["mlp", "--teacher-epochs", "true"], "key \"teacher_epochs\": expected float, got 'True'"),
    (["mlp", "--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["mlp", "--retrain-seeds", "[]"], "retrain_seeds must not be empty when retrain is true"),
]


@pytest.mark.parametrize(("argv", "message"), CONFIG_ERRORS)
def test_search_config_errors_are_one_line_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    files = {"empty_ops": tmp_path / "empty_ops.yaml", "epochs_true": tmp_path / "epochs_true.yaml"}
    files["empty_ops"].write_text(yaml.safe_dump({"space": {**TINY_SPACE, "ops": []}}))
    files["epochs_true"].write_text("epochs: true\n")
    argv = [a.format(**files) for a in argv]
    out = tmp_path / "never"
    assert cli.main([*argv, "--out-dir", str(out), "--no-progress"]) == 2
    assert _one_error_line(capsys).endswith(message)
    assert not out.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--epochs", "three"], "key \"epochs\": expected int, got 'three'"),
    (["--epochs", "true"], "key \"epochs\": expected int, got 'True'"),
    (["--epochs", "0"], "epochs must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
    (["--lr", "0"], "lr must be > 0, got 0.0"),
    (["--num-pictures", "-1"], "weight_decay and num_pictures must be >= 0, got 0.0001, -1"),
    (["--arch", "[[]]"], "architecture [[]] is not an encoding of space 'digits-mbconv': encoding has 1 blocks; the "
                         "space has 3"),
])
def test_transfer_config_errors_are_one_line_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    _no_training(monkeypatch)
    out = tmp_path / "never"
    assert transfer_main(["seg", *argv, "--out-dir", str(out), "--no-progress"]) == 2
    assert _one_error_line(capsys).endswith(message)
    assert not out.exists()


def test_ranking_and_constrained_config_errors(tmp_path, capsys):
    ratings, truth = _ranking_files(tmp_path)
    assert constrained.main(["--ratings", str(ratings), "--budget", "three"]) == 2
    assert _one_error_line(capsys) == "error: key \"budget\": expected float, got 'three'"
    assert ranking.main(["--ratings", str(ratings), "--ground-truth", str(truth), "--json", "3"]) == 2
    assert _one_error_line(capsys).startswith("error: key \"json\": expected bool")
