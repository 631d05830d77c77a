"""DNA end to end on tiny shapes: teacher-guided inputs, every candidate rated, metric accumulation,
recalibration independence (BN and BKN), resume, CLI."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from _tiny_space import TINY_SPACE

import nas.methods.dna as dna
from nas import cli
from nas.methods import base
from nas.methods.dna import BlockDistillSystem, DNAConfig, build_teacher, rate_block, run_dna
from nas.ops import make_norm
from nas.recalibration import recalibrate_norm_stats
from nas.search.ratings import load_ratings
from nas.spaces import SearchSpace
from nas.supernet import BlockSupernet
from stflow.config import ConfigError, load_config


def tiny_cfg(**changes) -> DNAConfig:
    cfg = DNAConfig(
        space=SearchSpace.from_dict(TINY_SPACE),
        teacher_layers=1,
        teacher_epochs=1,
        block_epochs=1,
        retrain_epochs=1,
        batch_size=256,
        recal_batches=2,
        progress=False,
    )
    return replace(cfg, **changes)


def test_student_block_receives_the_teacher_previous_block_output():
    cfg = tiny_cfg()
    torch.manual_seed(0)
    teacher = build_teacher(cfg)
    student = BlockSupernet(cfg.space.blocks[2])
    system = BlockDistillSystem(teacher, student, 2, seed=5)
    seen = []
    for op in student.cells[0][0]:
        op.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    x = torch.randn(16, 1, 8, 8)
    loss = system.training_step((x, torch.zeros(16, dtype=torch.long)), 0)
    with torch.no_grad():
        teacher.eval()
        outs = teacher.block_outputs(x)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], outs[2], rtol=0, atol=0)  # exactly block 1's output
    cand = system.step_candidate(0)
    student.train()
    expected = torch.nn.functional.mse_loss(student(outs[2], cand), outs[3])
    torch.testing.assert_close(loss, expected)
    assert not system.teacher.training and not any(p.requires_grad for p in system.teacher.parameters())
    system.train()
    assert not system.teacher.training  # stays frozen in eval mode


def _inputs(n_recal: int, n_val: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 1, 8, 8, generator=g) for _ in range(n_recal)], [
        torch.randn(24, 1, 8, 8, generator=g) for _ in range(n_val)
    ]


@pytest.mark.parametrize("norm", ["bn", "bkn"])
def test_rating_is_independent_of_previously_rated_candidates(norm):
    cfg = tiny_cfg()
    torch.manual_seed(0)
    teacher = build_teacher(cfg).eval()
    student = BlockSupernet(cfg.space.blocks[1], make_norm(norm))
    recal, val = _inputs(2, 3)
    a, b, c = (1, 2), (0, 0), (0, 1)
    after_b = rate_block(teacher, student, 1, recal, val, candidates=[b, a], progress=False)
    after_c = rate_block(teacher, student, 1, recal, val, candidates=[c, a], progress=False)
    assert after_b["12"] == pytest.approx(after_c["12"], rel=1e-6, abs=0)
    assert after_b["00"] != pytest.approx(after_b["12"])  # candidates really differ


def test_rating_accumulates_over_every_validation_batch():
    cfg = tiny_cfg()
    torch.manual_seed(1)
    teacher = build_teacher(cfg).eval()
    student = BlockSupernet(cfg.space.blocks[0])
    recal, val = _inputs(2, 3, seed=1)
    cand = (2, 1)
    for metric in ("relative_l1", "mse"):
        got = rate_block(teacher, student, 0, recal, val, metric=metric, candidates=[cand], progress=False)["21"]
        with torch.no_grad():
            feats = [teacher.block_outputs(x) for x in recal]
            recalibrate_norm_stats(student, [f[0] for f in feats], 2, forward=lambda x: student(x, cand))
            pred = np.concatenate([student(teacher.block_outputs(x)[0], cand).numpy().ravel() for x in val])
            target = np.concatenate([teacher.block_outputs(x)[1].numpy().ravel() for x in val])
        if metric == "relative_l1":
            want = np.abs(pred - target).mean() / target.std(ddof=1)
        else:
            want = ((pred - target) ** 2).mean() / target.var(ddof=1)
        assert got == pytest.approx(float(want), rel=1e-5)
        assert got > 0


def test_dna_end_to_end_resume_and_cli(tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg()
    out = tmp_path / "run"
    # a "killed" search: only block 0 finished
    run_dna(cfg, out, blocks=[0])
    first = json.loads((out / "block_0" / "ratings.json").read_text())
    assert set(first["ratings"]) == {cfg.space.blocks[0].key(c) for c in cfg.space.blocks[0].enumerate()}
    teacher_mtime = (out / "teacher" / "teacher.pt").stat().st_mtime_ns

    trained = []
    real_train_block = dna.train_block

    def counting(cfg_, teacher, k, out_dir, datamodule=None):
        trained.append(k)
        return real_train_block(cfg_, teacher, k, out_dir, datamodule)

    monkeypatch.setattr(dna, "train_block", counting)
    arch = run_dna(cfg, out)
    assert trained == [1, 2]  # block 0 skipped
    assert (out / "teacher" / "teacher.pt").stat().st_mtime_ns == teacher_mtime  # teacher loaded, not retrained
    table = load_ratings(out / "ratings.json")
    for k, block in enumerate(cfg.space.blocks):  # every candidate of every block rated, with its cost
        assert len(table.block_ratings[k]) == block.num_candidates() == len(list(block.enumerate()))
    assert table.block_ratings[0] == first["ratings"]
    saved = json.loads((out / "architecture.json").read_text())
    assert saved["encoding"] == arch["encoding"] and saved["params"] < saved["budget"] + 1000
    assert 0.0 <= saved["retrain"]["test_acc"] <= 1.0
    assert "Searched architecture" in (out / "report.md").read_text()
    # a finished block is never retrained, even through the CLI
    trained.clear()
    cfg_path = tmp_path / "cfg.yaml"
    import yaml

    cfg_path.write_text(
        yaml.safe_dump(
            {
                "space": TINY_SPACE,
                "teacher_layers": 1,
                "teacher_epochs": 1,
                "block_epochs": 1,
                "batch_size": 256,
                "recal_batches": 2,
            }
        )
    )
    assert (
        cli.main(["dna", "--config", str(cfg_path), "--out-dir", str(out), "--retrain", "false", "--no-progress"]) == 0
    )
    assert trained == []
    assert json.loads(capsys.readouterr().out)["encoding"] == arch["encoding"]


def test_config_errors_and_default_yaml(tmp_path):
    assert load_config(DNAConfig, "dna_digits", packages=("nas",)) == DNAConfig()  # the packaged config = defaults
    with pytest.raises(ValueError, match="rating_metric must be one of"):
        DNAConfig(rating_metric="l2")
    bad = tmp_path / "bad.yaml"
    bad.write_text("block_epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key .*block_epoch"):
        load_config(DNAConfig, bad, packages=("nas",))
    with pytest.raises(ConfigError, match="config not found"):
        load_config(DNAConfig, tmp_path / "none.yaml", packages=("nas",))
    with pytest.raises(ValueError, match="block 7 out of range"):
        run_dna(tiny_cfg(), tmp_path / "x", blocks=[7])


def test_bossnas_dispatch_reports_a_missing_module(monkeypatch, capsys):
    monkeypatch.setattr(base, "_REGISTRY", {k: v for k, v in base._REGISTRY.items() if k != "bossnas"})
    monkeypatch.setitem(sys.modules, "nas.methods.bossnas", None)  # import now fails
    assert cli.main(["bossnas"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: search method 'bossnas' is unavailable") and err.count("\n") == 1
