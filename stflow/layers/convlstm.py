"""Peephole ConvLSTM as used by ACFM: a fast fused cell, the literal gate-by-gate cell, and a sequence wrapper.

Cell semantics (acfm.md), for input ``x`` (B, C_in, H, W) and state ``(h, c)`` (B, C_h, H, W) each::

    f  = sigmoid(conv_x^f(x) + conv_h^f(h) + w_f * c  + b_f)
    i  = sigmoid(conv_x^i(x) + conv_h^i(h) + w_i * c  + b_i)
    g  = tanh(conv_x^g(x) + conv_h^g(h))
    c' = f * c + i * g
    o  = sigmoid(conv_x^o(x) + conv_h^o(h) + w_o * c' + b_o)       # peephole on the NEW cell state
    h' = o * tanh(c')

with per-pixel peephole weights ``w`` (C_h, H, W) and biases ``b`` (C_h, 1, 1); ``Dropout2d`` is applied to
``x`` before the gates. Peephole weights start Kaiming-normal and biases at zero (the authors leave ``b``
uninitialised); convolution kernels start Xavier-normal, as the authors' training script sets them.
:class:`LiteralConvLSTMCell` computes this with eight convolutions, exactly like the
authors' code (and with their parameter names, so their checkpoint loads into it unchanged); it is the parity
oracle. :class:`ConvLSTMCell` computes the same function with ONE convolution over ``concat([x, h])``;
:func:`fuse_literal_state` converts literal weights into fused ones exactly (the two conv biases of a gate are
summed, which is why the fused cell has ``4 * C_h`` fewer, redundant, parameters).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ConvLSTMCell",
    "LiteralConvLSTMCell",
    "ConvLSTM",
    "fuse_literal_state",
    "fuse_literal_cells",
    "make_cell",
    "CellKind",
]

CellKind = Literal["fused", "literal"]
_PEEPHOLE_GATES = ("f", "i", "o")
_FUSED_GATE_ORDER = ("f", "i", "o", "c")  # output-channel blocks of the fused conv; "c" is the candidate g


def _state_or_zeros(x: Tensor, state: tuple[Tensor, Tensor] | None, hidden: int) -> tuple[Tensor, Tensor]:
    """Zero state on the input's device/dtype when ``state`` is None."""
    if state is None:
        # Derived from x's values, not its shape (new_zeros(x.shape[0], ...)): traced for TorchScript / ONNX export,
        # the batch size then stays dynamic instead of being frozen to the example's (the ONNX exporter folds
        # shape-only expressions into constants).
        zeros = (x[:, :1] * 0).repeat(1, hidden, 1, 1)  # (B, 1, H, W) -> (B, hidden, H, W)
        return zeros, zeros
    return state


def _init_peephole(w: Tensor) -> None:
    """Kaiming-normal (fan_in = H*W) per (H, W) map, the reference's initialisation of ``w``."""
    fan_in = w.shape[-1] * w.shape[-2]
    with torch.no_grad():
        w.normal_(0.0, math.sqrt(2.0 / fan_in))


def _check_cell_options(kernel_size: int, dropout: float) -> None:
    """The options both cells share: an odd kernel (the grid keeps its size) and a dropout rate in [0, 1)."""
    if kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be odd to keep the grid size, got {kernel_size}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class ConvLSTMCell(nn.Module):
    """Peephole ConvLSTM cell whose four gates come from ONE convolution over ``concat([x, h])``.

    Parameters: ``conv`` (4*C_h output channels in gate order f, i, o, g), ``peephole_weight`` (3, C_h, H, W)
    and ``peephole_bias`` (3, C_h, 1, 1) for the gates f, i, o.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        grid_shape: tuple[int, int],
        kernel_size: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_cell_options(kernel_size, dropout)
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.grid_shape = tuple(grid_shape)
        self.conv = nn.Conv2d(in_channels + hidden_channels, 4 * hidden_channels, kernel_size, padding=kernel_size // 2)
        self.peephole_weight = nn.Parameter(torch.empty(3, hidden_channels, *self.grid_shape))
        self.peephole_bias = nn.Parameter(torch.zeros(3, hidden_channels, 1, 1))
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        _init_peephole(self.peephole_weight)
        with torch.no_grad():  # Xavier per (gate, x|h) block: the same law as the literal cell's separate convs
            for block in self.conv.weight.split(hidden_channels, dim=0):  # (C_h, C_in + C_h, k, k) each
                nn.init.xavier_normal_(block[:, :in_channels])
                nn.init.xavier_normal_(block[:, in_channels:])

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, C_in, H, W), state (h, c) each (B, C_h, H, W) or None -> new (h, c)."""
        h, c = _state_or_zeros(x, state, self.hidden_channels)
        hid = self.hidden_channels
        # split/unbind (not indexing) so that backward concatenates gradients instead of zero-filling per slice.
        z_fi, z_o, z_g = self.conv(torch.cat([self.dropout(x), h], dim=1)).split([2 * hid, hid, hid], dim=1)
        w_fi, w_o = self.peephole_weight.split([2, 1])  # (2, C_h, H, W), (1, C_h, H, W)
        b_fi, b_o = self.peephole_bias.split([2, 1])  # (2, C_h, 1, 1), (1, C_h, 1, 1)
        # f and i read the old cell state: one elementwise pass over both, shaped (B, 2, C_h, H, W).
        f, i = torch.sigmoid(z_fi.unflatten(1, (2, hid)) + torch.addcmul(b_fi, w_fi, c.unsqueeze(1))).unbind(1)
        c_new = torch.addcmul(f * c, i, torch.tanh(z_g))
        o = torch.sigmoid(z_o + torch.addcmul(b_o.squeeze(0), w_o.squeeze(0), c_new))  # peephole on the NEW c
        return o * torch.tanh(c_new), c_new


class _LiteralGate(nn.Module):
    """One gate of the literal cell: ``conv_x(x) + conv_h(h)`` (+ peephole ``w * c + b`` for f, i, o)."""

    def __init__(self, in_channels: int, hidden: int, grid_shape: tuple[int, int], kernel_size: int, peephole: bool):
        super().__init__()
        pad = kernel_size // 2
        self.conv_x = nn.Conv2d(in_channels, hidden, kernel_size, padding=pad)
        self.conv_h = nn.Conv2d(hidden, hidden, kernel_size, padding=pad)
        nn.init.xavier_normal_(self.conv_x.weight)  # the authors' training-script initialisation
        nn.init.xavier_normal_(self.conv_h.weight)
        self.peephole = peephole
        if peephole:
            self.w = nn.Parameter(torch.empty(hidden, *grid_shape))
            self.b = nn.Parameter(torch.zeros(hidden, 1, 1))
            _init_peephole(self.w)

    def forward(self, x: Tensor, h: Tensor, c: Tensor) -> Tensor:
        pre = self.conv_x(x) + self.conv_h(h)
        if self.peephole:
            return torch.sigmoid(pre + self.w * c + self.b)
        return torch.tanh(pre)


class LiteralConvLSTMCell(nn.Module):
    """Gate-by-gate peephole ConvLSTM cell (eight convolutions): the parity oracle and benchmark baseline.

    Submodule names ``f_gate``/``i_gate``/``c_gate``/``o_gate`` with ``conv_x``, ``conv_h``, ``w``, ``b`` follow the
    authors' code so their per-cell state dict loads here unchanged.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        grid_shape: tuple[int, int],
        kernel_size: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_cell_options(kernel_size, dropout)
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.grid_shape = tuple(grid_shape)
        args = (in_channels, hidden_channels, self.grid_shape, kernel_size)
        self.f_gate = _LiteralGate(*args, peephole=True)
        self.i_gate = _LiteralGate(*args, peephole=True)
        self.c_gate = _LiteralGate(*args, peephole=False)
        self.o_gate = _LiteralGate(*args, peephole=True)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """x (B, C_in, H, W), state (h, c) each (B, C_h, H, W) or None -> new (h, c)."""
        h, c = _state_or_zeros(x, state, self.hidden_channels)
        x = self.dropout(x)
        f = self.f_gate(x, h, c)
        i = self.i_gate(x, h, c)
        c_new = f * c + i * self.c_gate(x, h, c)
        o = self.o_gate(x, h, c_new)
        return o * torch.tanh(c_new), c_new


def fuse_literal_state(state: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Exact fused-cell weights (``conv.*``, ``peephole_*``) from a literal cell's state dict.

    ``state`` holds ``{prefix}{f,i,c,o}_gate.conv_{x,h}.{weight,bias}`` and ``{prefix}{f,i,o}_gate.{w,b}`` (a
    :class:`LiteralConvLSTMCell` state dict, or the authors' ``..._lstm_cell.`` entries with ``prefix``). The fused
    kernel stacks ``[conv_x | conv_h]`` along input channels and gates along output channels (order f, i, o, g);
    its bias is ``conv_x.bias + conv_h.bias``. Raises KeyError naming the first missing entry.
    """

    def get(name: str) -> Tensor:
        key = prefix + name
        if key not in state:
            raise KeyError(f"literal ConvLSTM state lacks {key!r}")
        return state[key]

    weights, biases = [], []
    for gate in _FUSED_GATE_ORDER:
        wx, wh = get(f"{gate}_gate.conv_x.weight"), get(f"{gate}_gate.conv_h.weight")
        if wx.shape[0] != wh.shape[0] or wx.shape[2:] != wh.shape[2:]:
            raise ValueError(f"{prefix}{gate}_gate: conv_x {tuple(wx.shape)} and conv_h {tuple(wh.shape)} disagree")
        weights.append(torch.cat([wx, wh], dim=1))  # (C_h, C_in + C_h, k, k)
        biases.append(get(f"{gate}_gate.conv_x.bias") + get(f"{gate}_gate.conv_h.bias"))
    return {
        "conv.weight": torch.cat(weights, dim=0),  # (4*C_h, C_in + C_h, k, k)
        "conv.bias": torch.cat(biases, dim=0),  # (4*C_h,)
        "peephole_weight": torch.stack([get(f"{g}_gate.w") for g in _PEEPHOLE_GATES]),  # (3, C_h, H, W)
        "peephole_bias": torch.stack([get(f"{g}_gate.b") for g in _PEEPHOLE_GATES]),  # (3, C_h, 1, 1)
    }


def fuse_literal_cells(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A whole module's state dict with every literal cell (found by its ``f_gate.conv_x.weight`` entry) replaced
    by the equivalent fused-cell entries; all other entries are kept. Turns a model built with literal cells
    into the state of the same model built with fused cells."""
    suffix = "f_gate.conv_x.weight"
    prefixes = [key[: -len(suffix)] for key in state if key.endswith(suffix)]
    literal = re.compile(r"[fico]_gate\.(conv_[xh]\.(weight|bias)|w|b)")
    out = {
        key: value
        for key, value in state.items()
        if not any(key.startswith(p) and literal.fullmatch(key[len(p):]) for p in prefixes)
    }
    for prefix in prefixes:
        out.update({prefix + key: value for key, value in fuse_literal_state(state, prefix).items()})
    return out


def make_cell(
    kind: CellKind,
    in_channels: int,
    hidden_channels: int,
    grid_shape: tuple[int, int],
    kernel_size: int = 3,
    dropout: float = 0.0,
) -> ConvLSTMCell | LiteralConvLSTMCell:
    """Build a fused (default, fast) or literal (oracle) cell."""
    classes = {"fused": ConvLSTMCell, "literal": LiteralConvLSTMCell}
    if kind not in classes:
        raise ValueError(f"unknown ConvLSTM cell kind {kind!r}; choose from {sorted(classes)}")
    return classes[kind](in_channels, hidden_channels, grid_shape, kernel_size, dropout)


class ConvLSTM(nn.Module):
    """Runs a cell over a sequence in the given time order (from a zero state unless one is passed) and returns
    every hidden state."""

    def __init__(
        self,
        in_channels: int,
        hidden_channels: int,
        grid_shape: tuple[int, int],
        kernel_size: int = 3,
        dropout: float = 0.0,
        cell: CellKind = "fused",
    ) -> None:
        super().__init__()
        self.cell = make_cell(cell, in_channels, hidden_channels, grid_shape, kernel_size, dropout)

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, T, C_in, H, W), processed t = 0..T-1 -> (hiddens (B, T, C_h, H, W), last (h, c))."""
        if x.ndim != 5:
            raise ValueError(f"ConvLSTM expects (B, T, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("ConvLSTM got an empty sequence (T = 0)")
        hiddens = []
        for frame in x.unbind(1):  # (B, C_in, H, W) each
            state = self.cell(frame, state)
            hiddens.append(state[0])
        return torch.stack(hiddens, dim=1), state
