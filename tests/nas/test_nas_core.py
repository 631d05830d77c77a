"""nas core: spaces, ops/costs, export round trip, recalibration, rating tables."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from nas.costs import block_cost_table, candidate_cost, count_flops, count_params
from nas.export import block_strings, build_block, build_network, build_network_from_strings, parse_layer_string
from nas.ops import MBConv, make_norm, seeded_init
from nas.recalibration import norm_layers, recalibrate_norm_stats
from nas.search.ratings import RatingTable, RatingTableError, load_ratings, save_ratings
from nas.spaces import SKIP, BlockSpec, CellSpec, LayerSpec, SearchSpace, mbconv, parse_candidate_key
from nas.supernet import BlockSupernet, Supernet

OPS = [
    {"kind": "skip"},
    {"kernel": 3, "expansion": 1},
    {"kernel": 3, "expansion": 4, "se": 0.25},
    {"kernel": 5, "expansion": 2},
]


def tiny_space() -> SearchSpace:
    return SearchSpace.from_dict(
        {
            "name": "tiny",
            "stem_channels": 4,
            "ops": OPS,
            "blocks": [
                {"out_channels": 4, "stride": 1, "layers": 2},
                {"out_channels": 6, "stride": 2, "layers": 2},
                {"out_channels": 8, "stride": 2, "layers": [1, 2], "widths": [None, 12]},
            ],
        }
    )


def test_space_enumeration_and_keys():
    space = tiny_space()
    b0, b1, b2 = space.blocks
    # block 0 keeps shape in both layers (4 ops each); block 1's first layer drops skip
    assert b0.num_candidates() == 16 and len(list(b0.enumerate())) == 16
    assert b1.num_candidates() == 12 and len(set(b1.enumerate())) == 12
    # multi-cell block: cell 0 = 1 layer (3 ops, no skip), cell 1 = 2 layers, the 2nd maps 12 -> 8 (no skip)
    assert b2.num_candidates() == 3 + 3 * 3
    assert space.num_architectures() == 16 * 12 * 12
    for block in space.blocks:
        for cand in block.enumerate():
            assert block.parse_key(block.key(cand)) == cand
    assert b0.key((0, 3)) == "03" and b2.key((1, 2, 0)) == "c1_20"
    assert parse_candidate_key("10-2", False) == (10, 2)
    assert mbconv(3, 4, 0.25).name == "ir_k3_e4_se0.25" and SKIP.name == "skip"
    with pytest.raises(ValueError, match="cannot offer the 'skip' op"):
        BlockSpec(4, 8, 1, (CellSpec((LayerSpec((SKIP,)),)),))
    with pytest.raises(ValueError, match="op index 7 of layer 1 out of range"):
        b0.split((0, 7))
    with pytest.raises(ValueError, match="malformed candidate key"):
        b0.parse_key("c1_x")
    with pytest.raises(ValueError, match="block 1 expects 5 input channels but receives 4"):
        SearchSpace(blocks=(b0, BlockSpec.uniform(5, 6, 2, 1, [mbconv(3, 1)])), stem_channels=4)


def mbconv_params(cin: int, cout: int, k: int, e: int, se: float) -> int:
    """Hand count: [expand conv + BN] + depthwise + BN + [SE convs with bias] + project + BN."""
    mid = cin * e
    n = (cin * mid + 2 * mid) if e != 1 else 0
    n += mid * k * k + 2 * mid
    if se:
        r = max(1, int(cin * se))
        n += mid * r + r + r * mid + mid
    return n + mid * cout + 2 * cout


def mbconv_macs(cin: int, cout: int, k: int, e: int, se: float, size: int, stride: int) -> int:
    mid, out = cin * e, (size + stride - 1) // stride
    n = (size * size * mid * cin) if e != 1 else 0
    n += out * out * mid * k * k
    if se:
        r = max(1, int(cin * se))
        n += mid * r + r * mid
    return n + out * out * mid * cout


def test_costs_are_computed_from_built_modules():
    space = tiny_space()
    table = block_cost_table(space)
    assert [len(t) for t in table] == [b.num_candidates() for b in space.blocks]
    # block 1, candidate (1, 3): 4->6 stride 2 MBConv(k3,e4,se.25) (layer 0 has no skip, so index 1)
    # then 6->6 MBConv(k5,e2) at 4x4
    cost = table[1][space.blocks[1].key((1, 3))]
    assert cost["params"] == mbconv_params(4, 6, 3, 4, 0.25) + mbconv_params(6, 6, 5, 2, 0)
    assert cost["flops"] == mbconv_macs(4, 6, 3, 4, 0.25, 8, 2) + mbconv_macs(6, 6, 5, 2, 0, 4, 1)
    # skip layers cost nothing; the table entry equals a freshly built module's count
    assert table[0]["00"] == {"params": 0, "flops": 0}
    module = build_block(space.blocks[2], (1, 0, 2))
    assert table[2]["c1_02"]["params"] == count_params(module) == candidate_cost(space, 2, (1, 0, 2))["params"]
    lin = nn.Linear(5, 3)
    assert count_flops(nn.Sequential(nn.Flatten(), lin), (1, 1, 5)) == 15


def test_supernet_single_path_shares_weights():
    space = tiny_space()
    net = Supernet(space)
    x = torch.randn(3, 1, 8, 8)
    rng = random.Random(0)
    for _ in range(5):
        enc = net.sample(rng)
        assert net(x, enc).shape == (3, 8, 2, 2)
    sup = net.blocks[1]
    # a candidate's path modules are the shared ones (same objects), so weights are shared
    assert sup.path((2, 1))[0] is sup.path((2, 3))[0]
    with pytest.raises(ValueError, match="has 1 op indices"):
        sup(torch.randn(1, 4, 8, 8), (1,))
    # seeded_init: weights depend on the seed only, and the global RNG is left untouched
    with seeded_init(7):
        a = BlockSupernet(space.blocks[1])
    torch.rand(5)
    state = torch.random.get_rng_state()
    with seeded_init(7):
        b = BlockSupernet(space.blocks[1])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert torch.equal(torch.random.get_rng_state(), state)


def test_export_round_trip():
    space = tiny_space()
    enc = ((1, 0), (1, 3), (1, 0, 0))
    net = build_network(space, enc, num_classes=10)
    strings = block_strings(space, enc)
    assert strings == [
        ["ir_r1_k3_s1_e1_c4"],
        ["ir_r1_k3_s2_e4_c6_se0.25", "ir_r1_k5_s1_e2_c6"],
        ["ir_r1_k3_s2_e1_c12", "ir_r1_k3_s1_e1_c8"],
    ]
    rebuilt = build_network_from_strings(strings, 10, input_channels=1, stem_channels=4)
    assert count_params(rebuilt) == count_params(net)
    rebuilt.load_state_dict(net.state_dict())  # strict: identical structure
    x = torch.randn(2, 1, 8, 8)
    net.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt(x), net(x))
    assert parse_layer_string("ir_r1_k5_s2_e3_c24_se0.25") == (mbconv(5, 3, 0.25), 2, 24)
    with pytest.raises(ValueError, match="malformed block string"):
        parse_layer_string("ir_r1_k5_e3")


def _stats_after(module, batches, n):
    recalibrate_norm_stats(module, batches, num_batches=n)
    return [(m.running_mean.clone(), m.running_var.clone()) for m in norm_layers(module)]


@pytest.mark.parametrize("norm", ["bn", "bkn"])
def test_recalibration_is_cumulative_and_history_free(norm):
    torch.manual_seed(0)
    layer = MBConv(3, 3, 3, 1, 2, 0.0, make_norm(norm))
    batches = [torch.randn(8, 3, 5, 5) for _ in range(3)]
    # the expand conv feeds the first norm: its recalibrated mean = mean of per-batch means
    conv = layer.expand[0]
    expected = torch.stack([conv(b).mean((0, 2, 3)) for b in batches]).mean(0).detach()
    layer.train()
    for _ in range(3):  # pollute the statistics first
        layer(torch.randn(8, 3, 5, 5) * 5 + 2)
    stats_a = _stats_after(layer, batches, 3)
    torch.testing.assert_close(stats_a[0][0], expected, rtol=1e-5, atol=1e-6)
    assert not layer.training
    assert all(m.momentum == 0.1 for m in norm_layers(layer))  # momentum restored
    layer.train()
    layer(torch.randn(8, 3, 5, 5) - 3)
    stats_b = _stats_after(layer, batches + [torch.randn(8, 3, 5, 5)], 3)  # only the first 3 are used
    for (ma, va), (mb, vb) in zip(stats_a, stats_b):
        torch.testing.assert_close(ma, mb)
        torch.testing.assert_close(va, vb)
    with pytest.raises(ValueError, match="received no batches"):
        recalibrate_norm_stats(layer, [], num_batches=2)


def test_make_norm_names():
    assert make_norm("bn") is nn.BatchNorm2d
    layer = make_norm("bkn", prior_weight=0.3)(4)
    assert layer.prior_weight == 0.3 and layer.transition == "analytic"
    with pytest.raises(ValueError, match="unknown norm 'gn'"):
        make_norm("gn")
    with pytest.raises(ValueError, match="prior_weight must lie in"):
        make_norm("bkn", prior_weight=1.5)


def test_rating_table_round_trip_and_errors(tmp_path, shared):
    table = load_ratings(shared / "data" / "nas" / "bossnas_mbconv" / "block_ratings.json")
    assert table.num_blocks == 5 and [len(b) for b in table.block_ratings] == [16, 256, 256, 256, 256]
    assert table.lower_is_better and table.block_costs is None
    space = tiny_space()
    good = RatingTable(
        [{space.blocks[0].key(c): float(i) for i, c in enumerate(space.blocks[0].enumerate())}],
        block_costs=block_cost_table(space)[:1],
        metric="relative_l1",
        meta={"method": "test"},
    )
    path = save_ratings(good, tmp_path / "r.json")
    again = load_ratings(path)
    assert again.block_ratings == good.block_ratings and again.meta == {"method": "test"}
    assert again.costs("flops")[0]["00"] == 0

    def bad(payload, match):
        p = tmp_path / "bad.json"
        p.write_text(payload if isinstance(payload, str) else json.dumps(payload))
        with pytest.raises(RatingTableError, match=match):
            load_ratings(p)

    bad("{not json", r"bad.json: not valid JSON")
    bad({"ratings": []}, r"bad.json: expected a JSON object with a 'block_ratings' list")
    bad({"block_ratings": [{}]}, "block 0 ratings must be a non-empty dict")
    bad({"block_ratings": [{"01": "x"}]}, "candidate '01' has a non-finite score 'x'")
    bad({"block_ratings": [{"01": 1.0}], "block_costs": [{}]}, "block 0 has no cost for 1 rated candidate")
    bad({"block_ratings": [{"01": 1.0}], "block_costs": [{"01": {"params": -1}}]}, "invalid params cost -1")
    bad({"block_ratings": [{"01": 1.0}], "lower_is_better": "yes"}, "'lower_is_better' must be true or false")
    with pytest.raises(FileNotFoundError, match="rating table not found"):
        load_ratings(tmp_path / "missing.json")
    with pytest.raises(RatingTableError, match="has no 'block_costs'"):
        RatingTable([{"0": 1.0}]).costs("params")
    with pytest.raises(RatingTableError, match="cost 'latency' is missing in block 0"):
        again.costs("latency")
    with pytest.raises(RatingTableError, match=r"candidate '99' is not rated in block 0"):
        again.score(["99"])
    assert again.score(["01"]) == pytest.approx(1.0)
    assert np.isclose(again.score(["33"]), 15.0)
