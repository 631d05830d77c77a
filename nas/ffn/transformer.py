"""A tiny BERT-style encoder whose feed-forward networks are searchable expressions sliced from shared weights.

* :class:`SharedLinear`: one weight ``(out_max, in_max)``; a call with ``out`` features on an input of width ``k``
  uses ``weight[:out, :k]`` and ``bias[:out]`` (a narrow linear IS the first rows/columns of the wide one);
* :class:`SearchableFFN`: ``max_stack`` stacked FFNs (MobileBERT style, each with its residual and LayerNorm),
  each with its two slots ``wb1`` (d -> width) and ``wb2`` (-> d), run by :func:`nas.ffn.expressions.evaluate`;
* :class:`TinyTransformer`: token embedding (a linear for real-valued tokens, an embedding for ids, id 0 = pad),
  learned positions, post-LN encoder layers (multi-head attention, then the FFN), masked mean pooling, a linear
  head. ``forward(x, arch, return_all=True)`` also returns every hidden state (embeddings + one per layer) and every
  layer's attention scores (pre-softmax, ``(B, heads, T, T)``) for distillation;
* :class:`FFNArch`: one expression, width and stack count per layer (:meth:`FFNArch.standard`: BERT's FFN).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nas.ffn.expressions import STANDARD_FFN, evaluate, ffn_params, parse

__all__ = ["SharedLinear", "SearchableFFN", "EncoderLayer", "TinyTransformer", "FFNArch", "NEG_INF"]

NEG_INF = -1e4  # attention score of a padded key


@dataclass(frozen=True)
class FFNArch:
    """Per layer: FFN expression (string), intermediate width of ``wb1``, number of stacked FFNs."""

    exprs: tuple[str, ...]
    widths: tuple[int, ...]
    stacks: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "exprs", tuple(str(parse(e)) for e in self.exprs))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "stacks", tuple(int(s) for s in self.stacks))
        if not len(self.exprs) == len(self.widths) == len(self.stacks):
            raise ValueError(f"exprs, widths and stacks need one entry per layer: {self}")

    @classmethod
    def uniform(cls, expr: str, layers: int, width: int, stack: int = 1) -> FFNArch:
        return cls((expr,) * layers, (width,) * layers, (stack,) * layers)

    @classmethod
    def standard(cls, layers: int, width: int) -> FFNArch:
        """BERT's FFN ``linear(gelu(linear(x,wb1)),wb2)`` in every layer."""
        return cls.uniform(STANDARD_FFN, layers, width)

    def ffn_params(self, d: int) -> int:
        """FFN parameters of all layers (:func:`nas.ffn.expressions.ffn_params`)."""
        return sum(ffn_params(e, d, w, s) for e, w, s in zip(self.exprs, self.widths, self.stacks))

    def to_dict(self) -> dict:
        return {"exprs": list(self.exprs), "widths": list(self.widths), "stacks": list(self.stacks)}


class SharedLinear(nn.Module):
    """A linear layer of at most ``in_max -> out_max`` whose narrower versions are slices of the same weight."""

    def __init__(self, in_max: int, out_max: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_max, in_max))
        self.bias = nn.Parameter(torch.empty(out_max))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's init
        bound = 1 / math.sqrt(in_max)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, out_features: int) -> Tensor:  # x: (..., k) with k <= in_max -> (..., out)
        k = x.shape[-1]
        if k > self.weight.shape[1] or out_features > self.weight.shape[0]:
            raise ValueError(f"slice {k} -> {out_features} exceeds the shared {tuple(self.weight.shape[::-1])}")
        return F.linear(x, self.weight[:out_features, :k], self.bias[:out_features])


class SearchableFFN(nn.Module):
    """Up to ``max_stack`` stacked FFNs ``h <- LN_j(h + expr_j(h))``; ``wb1``: d -> width, ``wb2``: -> d."""

    def __init__(self, d: int, max_width: int, max_stack: int = 1) -> None:
        super().__init__()
        self.d, self.max_width = d, max_width
        self.wb1 = nn.ModuleList(SharedLinear(d, max_width) for _ in range(max_stack))
        self.wb2 = nn.ModuleList(SharedLinear(max(max_width, d), d) for _ in range(max_stack))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(max_stack))

    def forward(self, h: Tensor, expr: str, width: int, stack: int = 1) -> Tensor:  # h: (B, T, d)
        if not 1 <= stack <= len(self.wb1) or width > self.max_width:
            raise ValueError(f"stack {stack} / width {width} outside the supernet ({len(self.wb1)}, {self.max_width})")
        for j in range(stack):
            def lin(t: Tensor, slot: str, j: int = j) -> Tensor:
                return self.wb1[j](t, width) if slot == "wb1" else self.wb2[j](t, self.d)
            y = evaluate(expr, h, lin)
            if y.shape[-1] < self.d:  # cannot happen with width >= d; kept for safety
                y = F.pad(y, (0, self.d - y.shape[-1]))
            h = self.norms[j](h + y)
        return h


class EncoderLayer(nn.Module):
    """Post-LN: ``h = LN(x + MHA(x))``, then the searchable FFN (with its own residual + LN)."""

    def __init__(self, d: int, heads: int, max_width: int, max_stack: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} must be divisible by heads={heads}")
        self.d, self.heads = d, heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.ffn = SearchableFFN(d, max_width, max_stack)

    def forward(self, x: Tensor, key_mask: Tensor, expr: str, width: int, stack: int) -> tuple[Tensor, Tensor]:
        b, t, d = x.shape  # x: (B, T, d); key_mask: (B, T) True = real token
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, dh)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, H, T, T)
        scores = scores.masked_fill(~key_mask[:, None, None, :], NEG_INF)
        ctx = self.drop(scores.softmax(-1)) @ v  # (B, H, T, dh)
        ctx = ctx.transpose(1, 2).reshape(b, t, d)  # (B, T, H, dh) -> (B, T, d)
        h = self.norm(x + self.drop(self.proj(ctx)))
        return self.ffn(h, expr, width, stack), scores


class TinyTransformer(nn.Module):
    """Encoder classifier. ``vocab_size`` given: ``x`` is (B, T) int ids (0 = pad); else ``x`` is (B, T, input_dim)."""

    def __init__(
        self,
        d: int = 32,
        heads: int = 2,
        layers: int = 2,
        num_classes: int = 10,
        max_len: int = 8,
        max_width: int = 128,
        max_stack: int = 1,
        input_dim: int | None = 8,
        vocab_size: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if (input_dim is None) == (vocab_size is None):
            raise ValueError("give exactly one of input_dim (real tokens) and vocab_size (token ids)")
        self.d, self.num_layers, self.max_width, self.max_stack = d, layers, max_width, max_stack
        self.embed: nn.Module = (
            nn.Linear(input_dim, d) if input_dim is not None else nn.Embedding(vocab_size, d, padding_idx=0)
        )
        self.pos = nn.Parameter(torch.randn(max_len, d) * 0.02)
        self.embed_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, max_width, max_stack, dropout) for _ in range(layers))
        self.head = nn.Linear(d, num_classes)

    def key_mask(self, x: Tensor) -> Tensor:
        if isinstance(self.embed, nn.Embedding):
            return x != 0  # (B, T)
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def forward(self, x: Tensor, arch: FFNArch, return_all: bool = False):
        if len(arch.exprs) != self.num_layers:
            raise ValueError(f"arch has {len(arch.exprs)} layers, the model {self.num_layers}")
        mask = self.key_mask(x)  # (B, T)
        h = self.embed_norm(self.embed(x) + self.pos[: x.shape[1]])  # (B, T, d)
        hiddens, scores = [h], []
        for layer, e, w, s in zip(self.layers, arch.exprs, arch.widths, arch.stacks):
            h, sc = layer(h, mask, e, w, s)
            hiddens.append(h)
            scores.append(sc)
        m = mask.unsqueeze(-1).to(h.dtype)  # (B, T, 1)
        logits = self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))  # masked mean pooling -> (B, classes)
        return (logits, hiddens, scores) if return_all else logits
