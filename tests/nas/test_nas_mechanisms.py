"""Tests that fail when a defining mechanism of the block-wise NAS core is wrong (not only when it crashes).

* Path sampling (every supernet sampler): each op of each layer is drawn with its configured
  frequency (chi-square over many draws), and the cell is chosen uniformly across cells, not in
  proportion to the cells' path counts.
* DNA rating: a candidate that IS the teacher's block (weights copied) rates best, and the rating
  depends on per-candidate norm recalibration (recomputed independently; without it the table differs).

Chi-square tests: significance 1e-4 per test (a correct sampler fails once in 10,000 runs; the
draws are seeded, so the outcome is reproducible anyway); the wrong variants the tests target
(cells weighted by path count: 1:3 instead of 1:1; a layer stuck on a subset of ops) give
p-values below 1e-30 at these draw counts.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from nas.methods import dna
from nas.methods.bossnas import BossNASBlockSystem, BossNASConfig, SiameseSupernet
from nas.methods.bossnas_adapters import HyTraAdapter, MBConvAdapter
from nas.spaces import BlockSpec, CellSpec, LayerSpec, SearchSpace, mbconv
from nas.spaces.base import SKIP
from nas.spaces.hytra import hytra_digits
from nas.supernet import BlockSupernet

ALPHA = 1e-4  # per chi-square test
OPS = (SKIP, mbconv(3, 1), mbconv(3, 2))


def two_cell_block() -> BlockSpec:
    """Cell 0: 1 layer x 3 ops (3 paths); cell 1: 2 layers x 3 ops (9 paths). Path-count weighting = 1:3."""
    cells = (CellSpec((LayerSpec(OPS),)), CellSpec((LayerSpec(OPS), LayerSpec(OPS))))
    return BlockSpec(4, 4, 1, cells)


def two_cell_space() -> SearchSpace:
    return SearchSpace((two_cell_block(),), input_channels=1, input_size=4, stem_channels=4, name="two-cell")


def assert_uniform(counts: Counter, categories, what: str) -> None:
    observed = np.array([counts.get(c, 0) for c in categories], dtype=float)
    p = stats.chisquare(observed).pvalue  # expected: uniform over the categories
    assert p > ALPHA, f"{what}: counts {dict(zip(categories, observed))} are not uniform (chi-square p = {p:.2e})"


def check_cell_and_op_frequencies(paths: list[tuple[int, ...]], block: BlockSpec, what: str) -> None:
    """Cells uniform; within each cell, each layer's ops uniform."""
    assert_uniform(Counter(p[0] for p in paths), range(len(block.cells)), f"{what}: cell choice")
    for c, cell in enumerate(block.cells):
        in_cell = [p[1:] for p in paths if p[0] == c]
        for i, layer in enumerate(cell.layers):
            assert_uniform(Counter(p[i] for p in in_cell), range(len(layer.ops)), f"{what}: cell {c} layer {i} op")


# ---------------------------------------------------------------------------------------------
# path sampling
# ---------------------------------------------------------------------------------------------
def test_dna_supernet_sampler_cells_uniform_and_ops_at_configured_frequency():
    block = two_cell_block()
    supernet = BlockSupernet(block)
    rng = random.Random(0)
    paths = [supernet.sample(rng) for _ in range(6000)]
    check_cell_and_op_frequencies(paths, block, "BlockSupernet.sample")


def test_bossnas_mbconv_fair_and_random_sampling_cells_uniform_ops_uniform():
    block = two_cell_block()
    adapter = MBConvAdapter(two_cell_space())
    rng = random.Random(1)
    fair_sets = [adapter.fair_paths(0, [], rng) for _ in range(3000)]
    assert all(len({p[0] for p in s}) == 1 for s in fair_sets)  # one cell per step
    check_cell_and_op_frequencies([s[0] for s in fair_sets], block, "fair_paths (first path of each set)")
    check_cell_and_op_frequencies([p for s in fair_sets for p in s], block, "fair_paths (all paths)")
    random_sets = [adapter.random_paths(0, [], 2, rng) for _ in range(3000)]
    assert all(len(set(s)) == 2 and len({p[0] for p in s}) == 1 for s in random_sets)  # distinct, one cell
    check_cell_and_op_frequencies([p for s in random_sets for p in s], block, "random_paths")


def test_bossnas_random_sampling_draws_legal_hytra_paths_uniformly():
    """HyTra's configured frequency of an op at a layer = its share among the legal paths (uniform paths)."""
    space = hytra_digits((2, 1), base_width=8, head_dim=2)
    adapter = HyTraAdapter(space)
    model = SiameseSupernet(adapter, nn.BatchNorm2d, 8, 4)
    cfg = BossNASConfig(space="hytra", sampling="random", num_paths=1, hytra_layers=(2, 1), hytra_width=8)
    system = BossNASBlockSystem(model, adapter, 0, [], cfg)
    legal = space.legal_paths(0, 0)
    rng = random.Random(2)
    draws = [system.sample_paths(rng)[0] for _ in range(40 * len(legal))]
    assert set(draws) <= set(legal)
    assert_uniform(Counter(draws), legal, "HyTra random paths")
    for i in range(2):  # per-layer op frequency equals its share among legal paths
        ops = sorted({p[i] for p in legal})
        expected = np.array([sum(p[i] == o for p in legal) for o in ops], float) / len(legal) * len(draws)
        observed = np.array([sum(d[i] == o for d in draws) for o in ops], float)
        assert stats.chisquare(observed, expected).pvalue > ALPHA


def test_sampling_tests_detect_path_count_weighting():
    """The wrong variant (cells weighted by their path counts, i.e. uniform over all candidates) is caught."""
    block = two_cell_block()
    rng = random.Random(3)
    cands = list(block.enumerate())
    paths = [rng.choice(cands) for _ in range(6000)]
    with pytest.raises(AssertionError, match="cell choice"):
        check_cell_and_op_frequencies(paths, block, "path-count weighted")


# ---------------------------------------------------------------------------------------------
# DNA rating
# ---------------------------------------------------------------------------------------------
TEACHER_OP = mbconv(3, 2)


def dna_fixture():
    """One block whose candidates include the teacher's op (index 2 in every layer); the supernet's
    path (2, 2) gets the teacher block's weights, every other op is random."""
    block = BlockSpec.uniform(4, 8, 1, 2, OPS, first_ops=OPS[1:])  # first layer changes width: no skip
    space = SearchSpace((block,), input_channels=1, input_size=8, stem_channels=4, name="dna-mech")
    torch.manual_seed(0)
    teacher = dna.build_network(space.with_single_op(TEACHER_OP, 2), [(0, 0)], 10)
    with torch.no_grad():  # give the teacher's norms non-trivial running statistics and affine
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    teacher.train()
    with torch.no_grad():  # converged running statistics: stem first, then the block on eval-mode stem outputs
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average
        for _ in range(10):
            teacher(torch.randn(64, 1, 8, 8))
        teacher.stem.eval()
        for m in teacher.blocks.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
        for _ in range(10):
            teacher(torch.randn(64, 1, 8, 8))
    teacher.eval()
    student = BlockSupernet(block)
    copied = (1, 2)  # first layer: ops (e1, e2) -> index 1 is e2; second layer: (skip, e1, e2) -> 2
    for i, j in enumerate(copied):
        student.cells[0][i][j].load_state_dict(teacher.blocks[0][i].state_dict())
    return space, teacher, student, copied


@pytest.mark.parametrize("metric", ["relative_l1", "mse", "cosine"])
def test_dna_candidate_equal_to_teacher_block_rates_best_and_near_zero(metric):
    space, teacher, student, copied = dna_fixture()
    gen = torch.Generator().manual_seed(1)
    recal = [torch.randn(64, 1, 8, 8, generator=gen) for _ in range(2)]
    val = [torch.randn(64, 1, 8, 8, generator=gen) for _ in range(2)]
    ratings = dna.rate_block(teacher, student, 0, recal, val, metric, progress=False)
    key = space.blocks[0].key(copied)
    assert min(ratings, key=ratings.get) == key
    others = sorted(v for k, v in ratings.items() if k != key)
    # only the recalibrated statistics differ from the teacher's (batch vs running): a small error
    assert ratings[key] < 0.1 < others[0]


def _independent_score(teacher, student, cand, recal, val) -> float:
    """Relative L1 of one candidate recomputed by hand: fresh statistics = the cumulative average of
    every norm's batch moments over the recalibration batches, then numpy on the validation outputs."""
    path = student.path(cand)
    norms = [m for mod in path for m in mod.modules() if isinstance(m, nn.BatchNorm2d)]
    sums = {id(m): [0.0, 0.0] for m in norms}
    hooks = []
    for m in norms:
        def record(mod, args, out, m=m):
            x = args[0]
            sums[id(m)][0] = sums[id(m)][0] + x.mean((0, 2, 3))
            sums[id(m)][1] = sums[id(m)][1] + x.var((0, 2, 3), correction=1)
        hooks.append(m.register_forward_hook(record))
    student.train()
    with torch.no_grad():
        for x in recal:
            student(teacher.block_outputs(x)[0], cand)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m in norms:
            m.running_mean.copy_(sums[id(m)][0] / len(recal))
            m.running_var.copy_(sums[id(m)][1] / len(recal))
        student.eval()
        preds, targets = [], []
        for x in val:
            outs = teacher.block_outputs(x)
            preds.append(student(outs[0], cand).numpy())
            targets.append(outs[1].numpy())
    pred, target = np.concatenate(preds), np.concatenate(targets)
    return float(np.abs(pred - target).mean() / target.std(ddof=1))


def test_dna_rating_depends_on_per_candidate_recalibration(monkeypatch):
    space, teacher, student, _ = dna_fixture()
    gen = torch.Generator().manual_seed(2)
    recal = [torch.randn(32, 1, 8, 8, generator=gen) * 2 + 0.5 for _ in range(2)]  # shifted: stats matter
    val = [torch.randn(32, 1, 8, 8, generator=gen) * 2 + 0.5 for _ in range(2)]
    # stale statistics, as after training with other paths: random running stats in every norm
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 1)
                m.running_var.uniform_(0.2, 3)
    block = space.blocks[0]
    cands = list(block.enumerate())
    rated = dna.rate_block(teacher, student, 0, recal, val, progress=False)
    for cand in cands:
        expected = _independent_score(teacher, student, cand, recal, val)
        assert rated[block.key(cand)] == pytest.approx(expected, rel=1e-4), cand
    # the same rater without recalibration sees another table (the test above would fail on it)
    monkeypatch.setattr(dna, "recalibrate_norm_stats", lambda module, *a, **k: module.eval())
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 1)
                m.running_var.uniform_(0.2, 3)
    stale = dna.rate_block(teacher, student, 0, recal, val, progress=False)
    diffs = [abs(stale[k] - rated[k]) / rated[k] for k in rated if rated[k] > 0]
    assert max(diffs) > 0.05
