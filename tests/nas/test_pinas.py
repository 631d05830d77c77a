"""Pi-NAS mechanics: path pairs that differ in every layer (uniform, chi-square), the path-restricted mean
teacher, InfoNCE with cross pairing against numpy, no gradient into the key encoder or the queue, the FIFO
queue, shuffle-BN ghost groups, order-free rating (BN and BKN), whole-architecture rows in the ranking and
search tools, and the search end to end through the CLI with resume."""

from __future__ import annotations

import copy
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats

from nas import cli
from nas.data.views import ViewConfig, make_view
from nas.methods.pinas import (
    PiNASConfig,
    PiNASModel,
    PiNASSystem,
    architecture_key,
    feature_shift,
    parse_architecture_key,
    rate_all_architectures,
    rate_architectures,
    sample_path_pair,
)
from nas.ops import make_norm
from nas.search.constrained import main as constrained_main
from nas.search.constrained import search_rows
from nas.search.ranking import evaluate
from nas.search.ranking import main as ranking_main
from nas.search.ratings import ArchitectureRatings, RatingTableError, load_any_ratings, load_ratings, save_ratings
from nas.spaces import SearchSpace

TINY = {
    "name": "tiny",
    "input_channels": 1,
    "input_size": 8,
    "stem_channels": 4,
    "ops": [{"kind": "skip"}, {"kernel": 3, "expansion": 1}, {"kernel": 3, "expansion": 2}],
    "blocks": [{"out_channels": 6, "stride": 1, "layers": 2}, {"out_channels": 8, "stride": 2, "layers": 2}],
}  # layers with 2 and 3 ops; 6 x 6 = 36 architectures


def tiny_cfg(**changes) -> PiNASConfig:
    base = dict(space=dict(TINY), batch_size=16, queue_size=40, feat_dim=8, neck_hidden=16, shuffle_bn_groups=1,
                views=ViewConfig(pad=1, rotate_deg=10.0, scale=0.1, noise_std=0.1, cutout=0, cutout_prob=0.0))
    base.update(changes)
    return PiNASConfig(**base)


def tiny_model(cfg: PiNASConfig, norm: str = "bn") -> PiNASModel:
    torch.manual_seed(0)
    model = PiNASModel(cfg.space, make_norm(norm), cfg.neck_hidden, cfg.feat_dim, cfg.queue_size)
    with torch.no_grad():  # query and key encoders differ from here on
        for p in [*model.backbone.parameters(), *model.neck.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    return model


def images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def op_params(net, k: int, i: int, j: int) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.blocks[k].cells[0][i][j].parameters()]


# ---------------------------------------------------------------------------------------------
# path pairs
# ---------------------------------------------------------------------------------------------
def test_path_pairs_differ_in_every_layer_and_are_uniform():
    space = PiNASConfig().space  # the digits space: layers with 3 and 4 ops
    rng = random.Random(1)
    n = 3000
    pairs = [sample_path_pair(space, rng) for _ in range(n)]
    for k, block in enumerate(space.blocks):
        for i, layer in enumerate(block.cells[0].layers):
            m = len(layer.ops)
            a = [p[0][k][i] for p in pairs]
            b = [p[1][k][i] for p in pairs]
            assert all(x != y for x, y in zip(a, b)), f"block {k} layer {i}: A and B share an op"
            # every op is on one of the two paths with frequency 2/m
            seen = Counter(a) + Counter(b)
            counts = [seen[j] for j in range(m)]
            assert stats.chisquare(counts, [2 * n / m] * m).pvalue > 1e-3, counts
            # and every ordered pair of distinct ops is equally likely (no fixed partner, e.g. j = i + 1)
            ordered = Counter(zip(a, b))
            cells = [ordered[(x, y)] for x, y in itertools.permutations(range(m), 2)]
            assert stats.chisquare(cells, [n / (m * (m - 1))] * len(cells)).pvalue > 1e-3, cells


def test_architecture_keys_round_trip():
    enc = ((1, 2), (0, 3), (2, 0))
    assert architecture_key(enc) == "12|03|20"
    assert parse_architecture_key("12|03|20") == enc


# ---------------------------------------------------------------------------------------------
# the path-restricted mean teacher
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("restricted", [True, False])
def test_mean_teacher_moves_only_the_sampled_paths(restricted):
    cfg = tiny_cfg(momentum=0.9, restricted_teacher=restricted)
    model = tiny_model(cfg)
    system = PiNASSystem(model, cfg)
    step = 3
    (path_a, path_b), _ = system.step_draws(step)
    qb = model.backbone
    key0 = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("key_")}
    query0 = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("key_")}
    opt = torch.optim.SGD([*qb.parameters(), *model.neck.parameters()], lr=0.5)
    loss = system.forward_step(images(), step)
    opt.zero_grad()
    loss.backward()
    opt.step()  # a real step: the query encoder moves too, after the key passes
    m = cfg.momentum
    for name, p in model.named_parameters():
        if not name.startswith("key_"):
            continue
        qname = name.replace("key_backbone", "backbone").replace("key_neck", "neck")
        before, q = key0[name], query0[qname]
        if name.startswith("key_neck") or ".stem." in name or not restricted:
            expect = m * m * before + (1 - m * m) * q  # moved before both key passes
            torch.testing.assert_close(p.detach(), expect, rtol=1e-5, atol=1e-6, msg=name)
            continue
        parts = name.split(".")  # key_backbone.blocks.<k>.cells.0.<i>.<j>....
        k, i, j = int(parts[2]), int(parts[5]), int(parts[6])
        on_path = path_a[k][i] == j or path_b[k][i] == j
        if on_path:  # exactly one key pass: its path
            torch.testing.assert_close(p.detach(), m * before + (1 - m) * q, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(p.detach(), before), f"{name} is not on a sampled path but moved"
    assert system.param_shift and system.param_shift[0] > 0


# ---------------------------------------------------------------------------------------------
# the loss, gradients, the queue
# ---------------------------------------------------------------------------------------------
def _numpy_info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t: float) -> float:
    logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue], 1) / t  # (B, 1 + K)
    logits = logits - logits.max(1, keepdims=True)
    return float(np.mean(-(logits[:, 0] - np.log(np.exp(logits).sum(1)))))


@pytest.mark.parametrize("cross", [True, False])
def test_loss_equals_numpy_info_nce_with_cross_pairing(cross):
    cfg = tiny_cfg(momentum=1.0, cross_path=cross, temperature=0.2)  # m = 1: the key encoder stays fixed
    model = tiny_model(cfg)
    ref = copy.deepcopy(model)
    system = PiNASSystem(model, cfg)
    x, step = images(), 5
    (path_a, path_b), gen = system.step_draws(step)
    views = [make_view(x, cfg.views, gen) for _ in range(4)]
    queue0 = model.queue.clone()
    loss = system.forward_step(x, step)

    def emb(backbone, neck, v, path):
        with torch.no_grad():
            z = neck(backbone(v, path)).numpy()
        return z / np.linalg.norm(z, axis=1, keepdims=True)

    q_a = emb(ref.backbone, ref.neck, views[0], path_a)
    k_a = emb(ref.key_backbone, ref.key_neck, views[1], path_a)
    q_b = emb(ref.backbone, ref.neck, views[2], path_b)
    k_b = emb(ref.key_backbone, ref.key_neck, views[3], path_b)
    assert not np.allclose(k_a, k_b, atol=1e-3) and not np.allclose(q_a, k_a, atol=1e-3)  # pairing matters
    qn = queue0.numpy()
    if cross:
        expect = _numpy_info_nce(q_a, k_b, qn, 0.2) + _numpy_info_nce(q_b, k_a, qn, 0.2)
    else:
        expect = _numpy_info_nce(q_a, k_a, qn, 0.2) + _numpy_info_nce(q_b, k_b, qn, 0.2)
    assert float(loss) == pytest.approx(expect, rel=1e-5, abs=1e-5)
    # the queue received the mean of the two keys, from position 0 on
    np.testing.assert_allclose(model.queue[:, :16].T.numpy(), (k_a + k_b) / 2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.queue[:, 16:], queue0[:, 16:])
    assert int(model.queue_ptr) == 16


def test_no_gradient_reaches_key_encoder_or_queue():
    cfg = tiny_cfg(momentum=0.9)
    model = tiny_model(cfg)
    loss = PiNASSystem(model, cfg).forward_step(images(), 0)
    loss.backward()
    key_params = [*model.key_backbone.parameters(), *model.key_neck.parameters()]
    assert key_params and all(not p.requires_grad and p.grad is None for p in key_params)
    assert not model.queue.requires_grad and model.queue.grad is None
    assert all(b.grad is None for b in model.buffers())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.parameters())


def test_queue_is_a_fifo_that_wraps():
    cfg = tiny_cfg(queue_size=5, feat_dim=2)
    model = tiny_model(cfg)
    a = torch.arange(6.0).reshape(3, 2)
    b = 10 + torch.arange(6.0).reshape(3, 2)
    model.enqueue(a)
    assert int(model.queue_ptr) == 3
    model.enqueue(b)
    assert int(model.queue_ptr) == 1
    expect = torch.stack([b[2], a[1], a[2], b[0], b[1]], 1)  # (D, K): b wrapped around onto position 0
    torch.testing.assert_close(model.queue, expect)
    big = 100 + torch.arange(14.0).reshape(7, 2)  # more keys than the queue holds: the newest 5 stay
    model.enqueue(big)
    assert sorted(model.queue[0].tolist()) == sorted(big[2:, 0].tolist())


def test_shuffle_bn_runs_ghost_groups_on_a_permuted_batch():
    cfg = tiny_cfg()
    model = tiny_model(cfg).train()
    x, path = images(16), ((1, 2), (0, 1))
    got = model.key(x, path, groups=4, generator=torch.Generator().manual_seed(7))
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        parts = [model.key_neck(model.key_backbone(c, path)) for c in x[perm].chunk(4)]
    manual = torch.nn.functional.normalize(torch.cat(parts)[torch.argsort(perm)], dim=1)
    torch.testing.assert_close(got, manual)
    whole = model.key(x, path, groups=1)
    assert not torch.allclose(got, whole, atol=1e-4)  # group statistics, not the batch's


# ---------------------------------------------------------------------------------------------
# rating
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("norm", ["bn", "bkn"])
def test_ratings_do_not_depend_on_the_order_of_rating(norm):
    cfg = tiny_cfg()
    model = tiny_model(cfg, norm)
    backbone = model.backbone
    with torch.no_grad():  # train-mode passes leave running statistics that must not matter
        for s in range(3):
            backbone.train()(images(16, s), backbone.sample(random.Random(s)))
    probe = torch.nn.Linear(8, 10)
    recal = [images(16, 10), images(16, 11)]
    x_val, y_val = images(40, 12), torch.arange(40) % 10
    encs = list(itertools.product(*(list(b.enumerate()) for b in cfg.space.blocks)))[::5]
    forward = rate_architectures(backbone, probe, encs, recal, x_val, y_val)
    backward = rate_architectures(backbone, probe, encs[::-1], recal, x_val, y_val)[::-1]
    assert [r["ce"] for r in forward] == [r["ce"] for r in backward]
    assert len({round(r["ce"], 6) for r in forward}) > 1  # the architectures are told apart
    # the prefix-sharing walk is the same computation
    walked = rate_all_architectures(backbone, probe, recal, x_val, y_val, encs)
    np.testing.assert_allclose([r["ce"] for r in walked], [r["ce"] for r in forward], rtol=1e-6, atol=1e-7)
    every = rate_all_architectures(backbone, probe, recal, x_val, y_val)
    assert len(every) == cfg.space.num_architectures() == 36
    for r in forward:  # accuracy first, cross-entropy only breaks ties
        assert r["accuracy"] <= r["score"] < r["accuracy"] + 1 / len(y_val)


def test_feature_shift_covers_every_layer_with_a_prefix():
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    shifts = feature_shift(model.backbone, images(32), pairs=3)
    assert [(s["block"], s["layer"]) for s in shifts] == [(0, 1), (1, 0), (1, 1)]
    assert all(s["shift"] > 0 for s in shifts)


def test_rating_selection_samples_and_includes(tmp_path: Path):
    from nas.methods.pinas import _rating_encodings

    gt = tmp_path / "gt.json"
    include = [[[1, 2], [0, 0]], [[0, 1], [1, 2]]]
    gt.write_text(json.dumps({"architectures": [{"encoding": e, "accuracy": 0.5, "params": 1} for e in include]}))
    assert _rating_encodings(tiny_cfg()) is None  # every architecture
    only = _rating_encodings(tiny_cfg(rate_sample=0, rate_include=str(gt)))
    assert [[list(c) for c in e] for e in only] == include
    mixed = _rating_encodings(tiny_cfg(rate_sample=5, rate_include=str(gt)))
    assert len(set(mixed)) == len(mixed) and 5 <= len(mixed) <= 7
    assert {tuple(tuple(c) for c in e) for e in include} <= set(mixed)
    with pytest.raises(ValueError, match="rate_sample 0"):
        tiny_cfg(rate_sample=0)


# ---------------------------------------------------------------------------------------------
# whole-architecture rows in the ranking and search tools
# ---------------------------------------------------------------------------------------------
def _rows() -> ArchitectureRatings:
    rng = random.Random(0)
    rows = []
    for enc in itertools.product([[0], [1], [2]], [[0], [1]]):
        rows.append({"encoding": [list(b) for b in enc], "score": rng.random(), "params": rng.randint(1, 50)})
    return ArchitectureRatings(rows, metric="probe_accuracy", lower_is_better=False)


def test_rows_rank_and_search_like_block_tables(tmp_path: Path, capsys):
    table = _rows()
    encs = [r["encoding"] for r in table.rows][::-1]
    truth = [2 * r["score"] + 1 for r in table.rows][::-1]
    assert evaluate(table, encs, truth)["kendall"] == pytest.approx(1.0)
    for budget in (10, 25, 40, None):
        found = search_rows(table, budget, "params")
        ok = [r for r in table.rows if budget is None or r["params"] < budget]
        assert found.score == max(r["score"] for r in ok)
    with pytest.raises(ValueError, match="no rated architecture"):
        search_rows(table, 0.5, "params")
    with pytest.raises(RatingTableError, match="not rated"):
        table.score([[5], [5]])
    path = save_ratings(table, tmp_path / "rows.json")
    assert isinstance(load_any_ratings(path), ArchitectureRatings)
    with pytest.raises(RatingTableError, match="whole-architecture rows"):
        load_ratings(path)
    assert constrained_main(["--ratings", str(path), "--budget", "25"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == search_rows(table, 25, "params").score
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"architectures": [{"encoding": e, "accuracy": t} for e, t in zip(encs, truth)]}))
    assert ranking_main(["--ratings", str(path), "--ground-truth", str(gt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kendall"] == pytest.approx(1.0)
    with pytest.raises(RatingTableError, match="rated twice"):
        ArchitectureRatings([{"encoding": [[0]], "score": 1.0}, {"encoding": [[0]], "score": 2.0}])


# ---------------------------------------------------------------------------------------------
# the search end to end
# ---------------------------------------------------------------------------------------------
def test_search_end_to_end_through_the_cli_and_resume(tmp_path: Path, capsys):
    conf = tmp_path / "pinas.yaml"
    import yaml

    conf.write_text(yaml.safe_dump({"space": TINY, "epochs": 1, "batch_size": 32, "queue_size": 64, "feat_dim": 8,
                                    "neck_hidden": 16, "shuffle_bn_groups": 2, "probe_epochs": 1,
                                    "limit_train_batches": 2, "recal_batches": 1, "budget": 2000}))
    out = tmp_path / "run"
    argv = ["pinas", "--config", str(conf), "--out-dir", str(out), "--no-progress", "--seed", "3"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    first = json.loads(text[text.index("{\n") :])  # after the log lines
    rows = load_any_ratings(out / "ratings.json")
    assert isinstance(rows, ArchitectureRatings) and len(rows.rows) == 36
    arch = json.loads((out / "architecture.json").read_text())
    assert arch["params"] < 2000 and arch["encoding"] in [r["encoding"] for r in rows.rows]
    assert first["param_shift_mean"] > 0 and first["feature_shift_mean"] > 0
    assert (out / "report.md").is_file() and (out / "supernet" / "trained.json").is_file()
    assert cli.main(argv) == 0  # resumes: the trained supernet and the rows are reused
    text = capsys.readouterr().out
    assert "trained earlier" in text
    again = json.loads(text[text.index("{\n") :])
    assert again["architecture"] == first["architecture"]
    with pytest.raises(ValueError, match="multi-cell"):
        PiNASConfig(space={**TINY, "blocks": [{"out_channels": 6, "layers": [1, 2]}]})
    assert isinstance(PiNASConfig().space, SearchSpace) and PiNASConfig().space.num_architectures() == 1728
