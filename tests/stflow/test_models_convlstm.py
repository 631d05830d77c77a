"""The fused ConvLSTM cell against the literal gate-by-gate oracle (float64), and the sequence wrapper."""

from __future__ import annotations

import pytest
import torch

from stflow.layers.convlstm import (
    ConvLSTM,
    ConvLSTMCell,
    LiteralConvLSTMCell,
    fuse_literal_cells,
    fuse_literal_state,
)

GRID = (5, 3)  # deliberately odd, non-square


def _literal_and_fused(in_ch: int = 3, hid: int = 4) -> tuple[LiteralConvLSTMCell, ConvLSTMCell]:
    torch.manual_seed(0)
    literal = LiteralConvLSTMCell(in_ch, hid, GRID).double()
    with torch.no_grad():  # non-trivial biases everywhere (the authors' b is not zero-initialised)
        for p in literal.parameters():
            p.add_(0.3 * torch.randn_like(p))
    fused = ConvLSTMCell(in_ch, hid, GRID).double()
    fused.load_state_dict(fuse_literal_state(literal.state_dict()), strict=True)
    return literal, fused


def _run(cell, xs, state):
    outs = []
    for x in xs:
        state = cell(x, state)
        outs.append(state)
    return outs


def test_fused_cell_equals_literal_forward_and_gradients():
    literal, fused = _literal_and_fused()
    torch.manual_seed(1)
    xs = [torch.randn(2, 3, *GRID, dtype=torch.float64) for _ in range(3)]
    h0 = torch.randn(2, 4, *GRID, dtype=torch.float64)
    c0 = torch.randn(2, 4, *GRID, dtype=torch.float64)
    weights = torch.randn(2, 4, *GRID, dtype=torch.float64)

    results = {}
    for name, cell in (("literal", literal), ("fused", fused)):
        inputs = [x.clone().requires_grad_() for x in xs]
        state = (h0.clone().requires_grad_(), c0.clone().requires_grad_())
        outs = _run(cell, inputs, state)
        loss = sum(((h * weights).sum() + (c * weights).pow(2).sum()) for h, c in outs)
        loss.backward()
        results[name] = (outs, [x.grad for x in inputs], [s.grad for s in state])

    (lo, lgx, lgs), (fo, fgx, fgs) = results["literal"], results["fused"]
    for (lh, lc), (fh, fc) in zip(lo, fo):
        torch.testing.assert_close(fh, lh, rtol=0, atol=1e-12)
        torch.testing.assert_close(fc, lc, rtol=0, atol=1e-12)
    for a, b in zip(lgx + lgs, fgx + fgs):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)

    # Parameter gradients: fusing the literal gradients gives the fused ones (each conv bias sees the same grad).
    lgrad = {k: p.grad for k, p in literal.named_parameters()}
    fused_from_literal = fuse_literal_state(lgrad)
    torch.testing.assert_close(fused.conv.weight.grad, fused_from_literal["conv.weight"], rtol=0, atol=1e-11)
    torch.testing.assert_close(fused.peephole_weight.grad, fused_from_literal["peephole_weight"], rtol=0, atol=1e-11)
    torch.testing.assert_close(fused.peephole_bias.grad, fused_from_literal["peephole_bias"], rtol=0, atol=1e-11)
    bias_x = torch.cat([lgrad[f"{g}_gate.conv_x.bias"] for g in "fioc"])
    torch.testing.assert_close(fused.conv.bias.grad, bias_x, rtol=0, atol=1e-11)


def test_output_gate_uses_new_cell_state():
    """Changing only o's peephole weight changes h but not c (o reads c' and feeds h only)."""
    _, fused = _literal_and_fused()
    x = torch.randn(1, 3, *GRID, dtype=torch.float64)
    h1, c1 = fused(x)
    with torch.no_grad():
        fused.peephole_weight[2].add_(1.0)
    h2, c2 = fused(x)
    torch.testing.assert_close(c1, c2)
    assert (h1 - h2).abs().max() > 1e-3
    # With a zero state, f's and i's peepholes see c = 0, so only o's peephole on c' can move h.
    with torch.no_grad():
        fused.peephole_weight[:2].add_(5.0)
    h3, _ = fused(x)
    torch.testing.assert_close(h3, h2)


def test_sequence_wrapper_matches_manual_loop_and_fuse_whole_state():
    torch.manual_seed(2)
    literal_seq = ConvLSTM(3, 4, GRID, cell="literal").double()
    fused_seq = ConvLSTM(3, 4, GRID, cell="fused").double()
    fused_seq.load_state_dict(fuse_literal_cells(literal_seq.state_dict()), strict=True)
    x = torch.randn(2, 5, 3, *GRID, dtype=torch.float64)  # (B, T, C, H, W)
    hidden, (h, c) = fused_seq(x)
    assert hidden.shape == (2, 5, 4, *GRID)
    state = None
    for t in range(5):
        state = literal_seq.cell(x[:, t], state)
        torch.testing.assert_close(hidden[:, t], state[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(c, state[1], rtol=0, atol=1e-12)


def test_dropout_only_in_training():
    cell = ConvLSTMCell(3, 4, GRID, dropout=0.5)
    x = torch.randn(8, 3, *GRID)
    cell.eval()
    a, b = cell(x), cell(x)
    torch.testing.assert_close(a[0], b[0])
    cell.train()
    torch.manual_seed(0)
    c = cell(x)
    assert (c[0] - a[0]).abs().max() > 0


def test_bad_inputs_rejected():
    with pytest.raises(KeyError, match="f_gate.w"):
        state = LiteralConvLSTMCell(3, 4, GRID).state_dict()
        del state["f_gate.w"]
        fuse_literal_state(state)
    with pytest.raises(ValueError, match="odd"):
        ConvLSTMCell(3, 4, GRID, kernel_size=2)
    with pytest.raises(ValueError, match=r"\(B, T, C, H, W\)"):
        ConvLSTM(3, 4, GRID)(torch.zeros(2, 3, *GRID))
    with pytest.raises(ValueError, match="unknown ConvLSTM cell kind"):
        ConvLSTM(3, 4, GRID, cell="gru")  # type: ignore[arg-type]
