"""Reusable building blocks (torch only; layers never import models)."""

from stflow.layers.convlstm import (
    ConvLSTM,
    ConvLSTMCell,
    LiteralConvLSTMCell,
    fuse_literal_cells,
    fuse_literal_state,
    make_cell,
)

__all__ = ["ConvLSTM", "ConvLSTMCell", "LiteralConvLSTMCell", "fuse_literal_cells", "fuse_literal_state", "make_cell"]
