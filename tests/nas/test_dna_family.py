"""The DNA family on tiny spaces: depth/width cells (one supernet per cell, uniform op sampling, pooled
ratings, exact search = brute force over cells), DNA+ (the next teacher IS the previous generation's
retrained net; generations resumable), DNA++ (EMA target on another view, anti-collapse vs numpy), CLI."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

import nas.methods.dna as dna
from nas import cli
from nas.methods.dna import DNA, BlockDistillSystem, DNAConfig
from nas.methods.dna_selfsup import SelfSupBlockSystem, anti_collapse, ema_update, selfsup_loss
from nas.search.constrained import brute_force, exact_search, search_table
from nas.search.ratings import RatingTable, load_ratings
from nas.spaces import SearchSpace, candidate_key, space_preset
from nas.supernet import BlockSupernet, make_stem

OPS = [{"kernel": 3, "expansion": 1}, {"kernel": 3, "expansion": 2}]
CELL_SPACE = {  # two cells per block: 1 layer (2 paths) and 2 layers of inner width 6 (4 paths)
    "name": "tiny-cells",
    "stem_channels": 4,
    "ops": OPS,
    "blocks": [
        {"out_channels": 4, "stride": 1, "layers": [1, 2], "widths": [None, 6]},
        {"out_channels": 6, "stride": 2, "layers": [1, 2], "widths": [None, 3]},
    ],
}
PLAIN_SPACE = {
    "name": "tiny-digits",
    "stem_channels": 4,
    "ops": [{"kind": "skip"}, {"kernel": 3, "expansion": 1}, {"kernel": 3, "expansion": 2}],
    "blocks": [{"out_channels": 4, "stride": 1, "layers": 2}, {"out_channels": 6, "stride": 2, "layers": 2}],
}


def tiny_cfg(space: dict, **changes) -> DNAConfig:
    cfg = DNAConfig(
        space=SearchSpace.from_dict(space),
        teacher_layers=1,
        teacher_epochs=1,
        block_epochs=1,
        retrain_epochs=1,
        batch_size=256,
        recal_batches=2,
        progress=False,
    )
    return replace(cfg, **changes)


def assert_uniform(counts: Counter, values, what: str) -> None:
    observed = [counts.get(v, 0) for v in values]
    p = stats.chisquare(observed).pvalue
    assert p > 1e-3, f"{what} not uniform: {observed} (chi-square p = {p:.2g})"


# ---------------------------------------------------------------- cells


def test_digits_cells_preset_has_depth_and_width_cells():
    space = space_preset("digits-cells")
    assert [b.num_candidates() for b in space.blocks] == [21, 21, 21] and space.num_architectures() == 9261
    b = space.blocks[1]  # 16 -> 24, stride 2; cells: 1 layer, 2 layers narrow (12), 2 layers wide (48)
    assert [len(c.layers) for c in b.cells] == [1, 2, 2]
    assert (b.layer_shape(1, 0).out_channels, b.layer_shape(2, 0).out_channels) == (12, 48)
    assert DNAConfig(space="digits-cells", variant="cells").space == space
    with pytest.raises(ValueError, match="several cells"):
        DNAConfig(variant="cells")  # the default digits space has one cell per block


def test_cells_one_supernet_per_cell_each_fully_trained_with_uniform_ops(tmp_path, monkeypatch):
    cfg = tiny_cfg(CELL_SPACE, variant="cells", block_epochs=2, out_dir=str(tmp_path))
    trained: list[BlockDistillSystem] = []
    real_fit = dna.fit

    def recording_fit(system, dm, run_cfg):
        result = real_fit(system, dm, run_cfg)
        if isinstance(system, BlockDistillSystem):
            trained.append(system)
        return result

    monkeypatch.setattr(dna, "fit", recording_fit)
    method = DNA(cfg)
    method.train_block(1)
    block = cfg.space.blocks[1]
    assert [s.student.cell_ids for s in trained] == [(0,), (1,)]  # one supernet per cell, in cell order
    assert [s.student for s in trained] == method.supernets[1]
    params = [{id(p) for p in s.student.parameters()} for s in trained]
    assert params[0] and params[1] and not params[0] & params[1]  # no shared weights between cell supernets
    steps = [s.global_step for s in trained]
    assert steps[0] == steps[1] > 0  # the shallow cell is trained as long as the deep one
    assert (tmp_path / "block_1" / "cell_0" / "checkpoints").is_dir()
    for c, system in enumerate(trained):  # every step of a cell supernet is on that cell, ops uniform per layer
        paths = [system.step_candidate(t) for t in range(4000)]
        assert {p[0] for p in paths} == {c}
        for i, layer in enumerate(block.cells[c].layers):
            assert_uniform(Counter(p[1 + i] for p in paths), range(len(layer.ops)), f"cell {c} layer {i}")
    ratings = method.rate_block(1)  # pooled over both cells' supernets
    assert set(ratings) == {block.key(c) for c in block.enumerate()}
    assert all(np.isfinite(v) and v > 0 for v in ratings.values())


def test_exact_search_over_pooled_cell_ratings_equals_brute_force():
    """A fixture over 3 blocks of 3 cells (1-3 layers): the exact search over the pooled per-block tables
    equals brute force over every cell and op choice, for many budgets."""
    rng = np.random.default_rng(0)
    blocks = []
    for _ in range(3):
        cands = [(c, *ops) for c in range(3) for ops in itertools.product(range(2), repeat=c + 1)]
        blocks.append({candidate_key(cand, True): (float(rng.random()), int(rng.integers(1, 30)) * (1 + cand[0]))
                       for cand in cands})
    table = RatingTable(
        block_ratings=[{k: v[0] for k, v in b.items()} for b in blocks],
        block_costs=[{k: {"params": v[1], "flops": v[1]} for k, v in b.items()} for b in blocks],
    )
    keys = [list(b) for b in blocks]
    scores = [[blocks[k][key][0] for key in ks] for k, ks in enumerate(keys)]
    costs = [[blocks[k][key][1] for key in ks] for k, ks in enumerate(keys)]
    cheapest, dearest = sum(min(c) for c in costs), sum(max(c) for c in costs)
    for budget in np.linspace(cheapest + 1, dearest + 1, 15):
        want = brute_force(scores, costs, budget)
        got = exact_search(scores, costs, budget)
        assert want is not None and got is not None
        assert got[1] == pytest.approx(want[1]) and got[2] <= budget - 1e-9
        found = search_table(table, float(budget))
        assert found.score == pytest.approx(want[1])
        assert [key.split("_")[0] for key in found.keys] == [f"c{e[0]}" for e in found.encoding]


# ---------------------------------------------------------------- DNA+


def test_plus_next_teacher_is_previous_generations_retrained_net_and_resumes(tmp_path, monkeypatch):
    cfg = tiny_cfg(PLAIN_SPACE, variant="plus", generations=2, out_dir=str(tmp_path))
    teachers: dict[str, dict[str, torch.Tensor]] = {}
    real_train_block = dna.train_block

    def recording_train_block(cfg_g, teacher, k, out_dir, datamodule=None, cell=None):
        teachers[f"{out_dir}/{k}"] = {n: t.detach().clone() for n, t in teacher.state_dict().items()}
        return real_train_block(cfg_g, teacher, k, out_dir, datamodule, cell)

    monkeypatch.setattr(dna, "train_block", recording_train_block)
    result = DNA(cfg).run()
    gens = json.loads((tmp_path / "generations.json").read_text())
    assert [g["generation"] for g in gens] == [1, 2] and result["generations"] == gens
    retrained_1 = torch.load(tmp_path / "gen_1" / "retrain" / "model.pt", weights_only=True)
    arch_1 = json.loads((tmp_path / "gen_1" / "architecture.json").read_text())
    for k in range(2):
        used_2 = teachers[f"{tmp_path / 'gen_2'}/{k}"]
        used_1 = teachers[f"{tmp_path / 'gen_1'}/{k}"]
        assert used_2.keys() == retrained_1.keys()
        for name, value in retrained_1.items():  # generation 2's teacher IS generation 1's retrained net
            torch.testing.assert_close(used_2[name], value, rtol=0, atol=0)
        assert used_1.keys() != used_2.keys() or any(not torch.equal(used_1[n], used_2[n]) for n in used_1)
    assert gens[1]["teacher"] == arch_1["encoding"] == gens[0]["encoding"]
    assert gens[0]["test_acc"] == arch_1["retrain"]["test_acc"]
    assert load_ratings(tmp_path / "ratings.json").block_ratings == load_ratings(
        tmp_path / "gen_2" / "ratings.json").block_ratings

    def no_training(*args, **kwargs):
        raise AssertionError("a finished generation was retrained")

    monkeypatch.setattr(dna, "fit", no_training)
    assert DNA(cfg).run()["generations"] == gens  # resumed: both generations reused


# ---------------------------------------------------------------- DNA++


def _selfsup_system(train_prefix: bool) -> SelfSupBlockSystem:
    space = SearchSpace.from_dict(PLAIN_SPACE)
    torch.manual_seed(0)
    student = BlockSupernet(space.blocks[0])
    prefix = make_stem(space, torch.nn.BatchNorm2d)
    return SelfSupBlockSystem(student, prefix, train_prefix=train_prefix, momentum=0.9, seed=3)


def test_selfsup_target_is_the_ema_copy_on_the_other_view():
    system = _selfsup_system(train_prefix=True)
    with torch.no_grad():  # online and EMA differ, as after some training
        for p in list(system.student.parameters()) + list(system.prefix.parameters()):
            p.add_(0.3 * torch.randn_like(p))
    diff = sum(float((a - b).abs().sum()) for a, b in zip(system.student.parameters(),
                                                         system.ema_student.parameters()))
    assert diff > 1.0
    system.train()
    x = torch.randn(32, 1, 8, 8)
    loss = system.training_step((x, torch.zeros(32, dtype=torch.long)), 0)
    v1, v2 = system.step_views(x, 0)
    assert not torch.equal(v1, v2)
    cand = system.step_candidate(0)
    z1, z2 = system.student(system.prefix(v1), cand), system.student(system.prefix(v2), cand)
    with torch.no_grad():
        t1 = system.ema_student(system.ema_prefix(v1), cand)
        t2 = system.ema_student(system.ema_prefix(v2), cand)
    want = selfsup_loss(z1, z2, t1, t2, 1.0, 0.04)
    torch.testing.assert_close(loss, want)
    online_target = selfsup_loss(z1, z2, z1.detach(), z2.detach(), 1.0, 0.04)
    assert abs(float(loss) - float(online_target)) > 1e-3  # an online (non-EMA) target gives another loss
    same_view = selfsup_loss(z1, z2, t2, t1, 1.0, 0.04)  # the target of the SAME view
    assert abs(float(loss) - float(same_view)) > 1e-4
    assert loss.requires_grad and all(not p.requires_grad for p in system.ema_student.parameters())


def test_ema_update_is_a_momentum_average_after_each_step():
    system = _selfsup_system(train_prefix=True)
    with torch.no_grad():
        for p in system.student.parameters():
            p.add_(1.0)
    before = [p.detach().clone() for p in system.ema_student.parameters()]
    online = [p.detach().clone() for p in system.student.parameters()]
    system.on_train_batch_end(None, None, 0)
    for b, o, e in zip(before, online, system.ema_student.parameters()):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * o)
    ema_update(system.ema_student, system.student, 0.0)
    for o, e in zip(online, system.ema_student.parameters()):
        torch.testing.assert_close(e, o)


def test_anti_collapse_term_equals_numpy():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, 3, 3, generator=g, dtype=torch.float64)
    z[:, 1] *= 0.2  # a low-variance channel: the hinge is active
    z[:, 2] += 0.7 * z[:, 0]  # correlated channels
    var_term, cov_term = anti_collapse(z)
    flat = z.numpy().transpose(0, 2, 3, 1).reshape(-1, 4)  # (B*H*W, C)
    cov = np.cov(flat, rowvar=False)  # unbiased
    want_var = np.mean(np.maximum(0.0, 1.0 - np.sqrt(np.diag(cov) + 1e-4)))
    want_cov = (np.sum(cov**2) - np.sum(np.diag(cov) ** 2)) / 4
    assert float(var_term) == pytest.approx(want_var, rel=1e-10) and want_var > 0
    assert float(cov_term) == pytest.approx(want_cov, rel=1e-10) and want_cov > 0


def test_selfsup_end_to_end_rates_every_candidate_and_cli_variants(tmp_path, monkeypatch, capsys):
    cfg = tiny_cfg(PLAIN_SPACE, variant="selfsup", out_dir=str(tmp_path), retrain=False)
    arch = DNA(cfg).run()
    table = load_ratings(tmp_path / "ratings.json")
    for k, block in enumerate(cfg.space.blocks):
        assert set(table.block_ratings[k]) == {block.key(c) for c in block.enumerate()}
        assert all(np.isfinite(v) and v > 0 for v in table.block_ratings[k].values())
    assert not (tmp_path / "teacher").exists()  # no labelled teacher
    assert (tmp_path / "block_1" / "selfsup.pt").is_file() and len(arch["encoding"]) == 2
    # the CLI: --variant picks the variant's packaged config unless --config is given
    _, c = cli.method_config("dna", ["--variant", "cells"])
    assert c.variant == "cells" and c.space.name == "digits-cells"
    _, c = cli.method_config("dna", ["--variant", "selfsup", "--ema-momentum", "0.95"])
    assert (c.variant, c.ema_momentum, c.space.name) == ("selfsup", 0.95, "digits-mbconv")
    _, c = cli.method_config("dna", ["--variant", "plus", "--generations", "3"])
    assert (c.variant, c.generations) == ("plus", 3)
    assert cli.main(["dna", "--variant", "bogus"]) == 2
    assert "variant" in capsys.readouterr().err


def test_selfsup_blocks_need_the_earlier_blocks(tmp_path):
    cfg = tiny_cfg(PLAIN_SPACE, variant="selfsup", out_dir=str(tmp_path), blocks=[1])
    with pytest.raises(ValueError, match="in order"):
        DNA(cfg).run()
