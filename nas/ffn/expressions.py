"""The FFN as an expression tree (EfficientBERT's search space), its validity rules, sampling and hashing.

An expression is a tree over the input ``x`` and two linear slots: ``linear(a, wb1)`` and ``linear(b, wb2)``,
binary ``add`` / ``mul`` / ``max`` and unary activations. The standard BERT FFN is
``linear(gelu(linear(x,wb1)),wb2)``. Binary ops on tensors of different widths keep the first ``min`` channels
(the authors' ``sel_min``); a linear slices its shared weight to the width of its input (:mod:`nas.ffn.transformer`).

Validity (the authors' rules, checked on the tree rather than with regular expressions):

* tree height (a leaf has height 0) within ``[min_height, max_height]``;
* ``x`` present;
* each slot used exactly once, only as the second argument of a linear, ``wb1`` before ``wb2`` in prefix order
  (so there are exactly two linears);
* no activation applied directly to an activation, no linear applied directly to a linear;
* no binary op with two identical arguments ``op(a, a)``.

Duplicates (``add(a,b)`` vs ``add(b,a)``, ``max(x,relu(x))`` vs ``relu(x)``...) are found by hashing the output of
the expression (or the chain of per-layer expressions) on a fixed random input with fixed weights, in float64.
"""

from __future__ import annotations

import functools
import hashlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "UNARY",
    "BINARY",
    "STANDARD_FFN",
    "Expr",
    "parse",
    "is_valid",
    "invalid_reason",
    "evaluate",
    "output_widths",
    "ffn_params",
    "mutate",
    "sample_expression",
    "expression_hash",
    "encode",
    "TOKENS",
]

UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "elu": F.elu,
    "swish": lambda t: t * torch.sigmoid(t),
}
BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"add": torch.add, "mul": torch.mul, "max": torch.maximum}
SLOTS = ("wb1", "wb2")
TOKENS = ("x", "wb1", "wb2", "linear", *BINARY, *UNARY)  # token ids of the classifier encoding (index + 1; 0 = pad)
STANDARD_FFN = "linear(gelu(linear(x,wb1)),wb2)"


@dataclass(frozen=True)
class Expr:
    """A node: ``op`` in ``x | wb1 | wb2 | linear | add | mul | max | <activation>``, with its arguments."""

    op: str
    args: tuple[Expr, ...] = ()

    def __post_init__(self) -> None:
        arity = {"x": 0, "wb1": 0, "wb2": 0, "linear": 2, **{b: 2 for b in BINARY}, **{u: 1 for u in UNARY}}
        if self.op not in arity:
            raise ValueError(f"unknown op {self.op!r}")
        if len(self.args) != arity[self.op]:
            raise ValueError(f"{self.op} takes {arity[self.op]} arguments, got {len(self.args)}")

    def __str__(self) -> str:
        return self.op if not self.args else f"{self.op}({','.join(str(a) for a in self.args)})"

    @property
    def height(self) -> int:
        return 0 if not self.args else 1 + max(a.height for a in self.args)

    def prefix(self) -> list[str]:
        """Ops in prefix (DEAP) order."""
        out = [self.op]
        for a in self.args:
            out += a.prefix()
        return out

    def nodes(self) -> list[tuple[tuple[int, ...], Expr]]:
        """``(path, node)`` for every node, prefix order; a path is the argument indices from the root."""
        out: list[tuple[tuple[int, ...], Expr]] = [((), self)]
        for i, a in enumerate(self.args):
            out += [((i, *p), n) for p, n in a.nodes()]
        return out

    def replace(self, path: Sequence[int], new: Expr) -> Expr:
        if not path:
            return new
        args = list(self.args)
        args[path[0]] = args[path[0]].replace(path[1:], new)
        return Expr(self.op, tuple(args))


def parse(text: str | Expr) -> Expr:
    """``"linear(gelu(linear(x,wb1)),wb2)"`` -> :class:`Expr` (spaces ignored)."""
    return text if isinstance(text, Expr) else _parse(text)


@functools.lru_cache(maxsize=4096)
def _parse(text: str) -> Expr:
    s = text.replace(" ", "")
    pos = 0

    def node() -> Expr:
        nonlocal pos
        start = pos
        while pos < len(s) and (s[pos].isalnum() or s[pos] == "_"):
            pos += 1
        name = s[start:pos]
        if not name:
            raise ValueError(f"expected a name at {start} in {text!r}")
        args: list[Expr] = []
        if pos < len(s) and s[pos] == "(":
            pos += 1
            args.append(node())
            while s[pos] == ",":
                pos += 1
                args.append(node())
            if s[pos] != ")":
                raise ValueError(f"expected ')' at {pos} in {text!r}")
            pos += 1
        return Expr(name, tuple(args))

    try:
        out = node()
    except IndexError as exc:
        raise ValueError(f"truncated expression {text!r}") from exc
    if pos != len(s):
        raise ValueError(f"trailing text at {pos} in {text!r}")
    return out


def invalid_reason(expr: Expr | str, min_height: int = 3, max_height: int = 6) -> str | None:
    """Why ``expr`` breaks the validity rules (module docstring), or None when it is valid."""
    e = parse(expr)
    if not min_height <= e.height <= max_height:
        return f"height {e.height} outside [{min_height}, {max_height}]"
    ops = e.prefix()
    if "x" not in ops:
        return "x absent"
    if ops.count("wb1") != 1 or ops.count("wb2") != 1:
        return "each linear slot must be used exactly once"
    if ops.index("wb1") > ops.index("wb2"):
        return "wb1 must come before wb2"
    for _, n in e.nodes():
        if n.op == "linear":
            if n.args[1].op not in SLOTS or n.args[0].op in SLOTS:
                return "a linear takes a tensor and a slot"
            if n.args[0].op == "linear":
                return "nested linears"
        elif n.op in UNARY:
            if n.args[0].op in UNARY:
                return "nested activations"
        elif n.args and any(a.op in SLOTS for a in n.args):
            return f"a slot is an argument of {n.op}"
        if n.op in BINARY and n.args[0] == n.args[1]:
            return f"{n.op}(a, a)"
    return None


def is_valid(expr: Expr | str, min_height: int = 3, max_height: int = 6) -> bool:
    return invalid_reason(expr, min_height, max_height) is None


LinearFn = Callable[[Tensor, str], Tensor]  # (input (..., k), slot) -> output


def _combine(op: str, a: Tensor, b: Tensor) -> Tensor:
    k = min(a.shape[-1], b.shape[-1])  # sel_min: keep the first k channels of both
    return BINARY[op](a[..., :k], b[..., :k])


def evaluate(expr: Expr | str, x: Tensor, linear: LinearFn) -> Tensor:
    """The expression's output on ``x`` (..., d); ``linear(t, slot)`` applies the slot's (sliced) linear."""
    e = parse(expr)
    if e.op == "x":
        return x
    if e.op == "linear":
        return linear(evaluate(e.args[0], x, linear), e.args[1].op)
    if e.op in UNARY:
        return UNARY[e.op](evaluate(e.args[0], x, linear))
    if e.op in BINARY:
        return _combine(e.op, evaluate(e.args[0], x, linear), evaluate(e.args[1], x, linear))
    raise ValueError(f"slot {e.op} outside a linear")


def output_widths(expr: Expr | str, d: int, width: int) -> tuple[int, dict[str, tuple[int, int]]]:
    """(output width, ``{slot: (input width, output channels used)}``) of a valid expression; ``wb1`` maps to
    ``width``, ``wb2`` to ``d``. A slot's output channels that a ``min``-width binary op drops downstream are not
    "used" (``mul(x,linear(x,wb1))`` uses only d rows of a wider ``wb1``)."""
    out_of = {"wb1": width, "wb2": d}

    def width_of(n: Expr) -> int:
        if n.op == "x":
            return d
        if n.op == "linear":
            return out_of[n.args[1].op]
        return min(width_of(a) for a in n.args)

    slots: dict[str, tuple[int, int]] = {}

    def need(n: Expr, want: int) -> None:  # ``want``: the leading channels of ``n`` that reach the output
        if n.op == "linear":
            k = width_of(n.args[0])
            slots[n.args[1].op] = (k, min(want, out_of[n.args[1].op]))
            need(n.args[0], k)
        else:
            for a in n.args:
                need(a, want)

    e = parse(expr)
    out = width_of(e)
    need(e, out)
    return out, slots


def ffn_params(expr: Expr | str, d: int, width: int, stack: int = 1) -> int:
    """Weights + biases of the two linears that reach the output (:func:`output_widths`) in ``stack`` stacked
    FFNs, plus the LayerNorm of each extra stack."""
    _, slots = output_widths(expr, d, width)
    one = sum(k * o + o for k, o in slots.values())
    return stack * one + (stack - 1) * 2 * d


# ---------------------------------------------------------------------------------------------- sampling

def _random_tree(rng: random.Random, depth: int) -> Expr:
    """A random tensor-typed tree (no slots) of height <= ``depth``."""
    if depth <= 0 or rng.random() < 0.3:
        return Expr("x")
    if rng.random() < 0.6:
        return Expr(rng.choice(list(UNARY)), (_random_tree(rng, depth - 1),))
    return Expr(rng.choice(list(BINARY)), (_random_tree(rng, depth - 1), _random_tree(rng, depth - 1)))


def _tensor_nodes(e: Expr) -> list[tuple[tuple[int, ...], Expr]]:
    return [(p, n) for p, n in e.nodes() if n.op not in SLOTS]


def mutate(expr: Expr | str, rng: random.Random) -> Expr:
    """One random edit in the authors' spirit (DEAP's uniform, node-replacement and insert mutations, plus a
    shrink): the result may be invalid; :func:`sample_expression` rejects those."""
    e = parse(expr)
    kind = rng.choice(("uniform", "replace", "insert", "insert", "shrink"))
    nodes = _tensor_nodes(e)
    path, node = rng.choice(nodes)
    if kind == "uniform" and node.op not in ("linear",):
        return e.replace(path, _random_tree(rng, rng.randint(0, 2)))
    if kind == "replace" and node.args:
        if node.op in UNARY:
            return e.replace(path, Expr(rng.choice([u for u in UNARY if u != node.op]), node.args))
        if node.op in BINARY:
            return e.replace(path, Expr(rng.choice([b for b in BINARY if b != node.op]), node.args))
    if kind == "shrink" and node.op in UNARY:
        return e.replace(path, node.args[0])
    if kind == "shrink" and node.op in BINARY:
        return e.replace(path, node.args[rng.randrange(2)])
    # insert: wrap the node in a new unary or binary op
    if rng.random() < 0.5:
        return e.replace(path, Expr(rng.choice(list(UNARY)), (node,)))
    other = _random_tree(rng, rng.randint(0, 1))
    args = (node, other) if rng.random() < 0.5 else (other, node)
    return e.replace(path, Expr(rng.choice(list(BINARY)), args))


def sample_expression(
    seeds: Sequence[Expr | str],
    rng: random.Random,
    min_height: int = 3,
    max_height: int = 6,
    max_edits: int = 3,
    max_tries: int = 1000,
) -> Expr:
    """A valid expression: one of ``seeds`` edited 1..``max_edits`` times by :func:`mutate`, rejected until valid
    (after ``max_tries`` failures the seed itself, as the authors)."""
    base = parse(rng.choice(list(seeds)))
    for _ in range(max_tries):
        e = base
        for _ in range(rng.randint(1, max_edits)):
            e = mutate(e, rng)
        if e != base and is_valid(e, min_height, max_height):
            return e
    return base


# ---------------------------------------------------------------------------------------------- hashing

_HASH_CACHE: dict[tuple[int, int, int], tuple[Tensor, list[dict[str, tuple[Tensor, Tensor]]]]] = {}


def _fixed_inputs(d: int, width: int, layers: int) -> tuple[Tensor, list[dict[str, tuple[Tensor, Tensor]]]]:
    key = (d, width, layers)
    if key not in _HASH_CACHE:
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(4, 5, d, generator=g, dtype=torch.float64)
        wbs = []
        for _ in range(layers):
            wbs.append({
                "wb1": (torch.randn(width, width, generator=g, dtype=torch.float64) / width**0.5,
                        torch.randn(width, generator=g, dtype=torch.float64)),
                "wb2": (torch.randn(d, width, generator=g, dtype=torch.float64) / width**0.5,
                        torch.randn(d, generator=g, dtype=torch.float64)),
            })
        _HASH_CACHE[key] = (x, wbs)
    return _HASH_CACHE[key]


def expression_hash(exprs: Expr | str | Sequence[Expr | str], d: int = 8, width: int = 16, decimals: int = 6) -> str:
    """Hash of the output of one expression, or of a chain of per-layer expressions (layer i's output is layer
    i+1's input, each with its own fixed weights), on a fixed random input with fixed weights (float64, rounded to
    ``decimals``): two expressions computing the same function hash equal."""
    chain = [parse(exprs)] if isinstance(exprs, (str, Expr)) else [parse(e) for e in exprs]
    x, wbs = _fixed_inputs(d, width, len(chain))
    out = x
    for e, wb in zip(chain, wbs):
        def lin(t: Tensor, slot: str, wb: dict = wb) -> Tensor:
            w, b = wb[slot]
            return F.linear(t, w[:, : t.shape[-1]], b)
        out = evaluate(e, out, lin)
    arr = np.round(out.numpy(), decimals) + 0.0  # + 0.0: -0.0 -> 0.0
    return hashlib.sha1(arr.tobytes() + str(arr.shape).encode()).hexdigest()[:16]


def encode(exprs: Sequence[Expr | str], pad: int = 20) -> list[int]:
    """The classifier features: every layer's prefix token ids (``TOKENS`` index + 1), padded with 0 to ``pad``."""
    out: list[int] = []
    for e in exprs:
        ids = [TOKENS.index(op) + 1 for op in parse(e).prefix()]
        if len(ids) > pad:
            raise ValueError(f"expression {e} has {len(ids)} nodes > pad {pad}")
        out += ids + [0] * (pad - len(ids))
    return out
