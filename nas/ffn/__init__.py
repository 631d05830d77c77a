"""EfficientBERT-style search of the transformer's feed-forward network (the ``mlp`` search method).

:mod:`nas.ffn.expressions` (the expression space: validity rules, sampling, hashing, parameter counts),
:mod:`nas.ffn.transformer` (shared-weight slicing, the searchable FFN, the tiny encoder),
:mod:`nas.ffn.distill` (tasks, the distillation loss, plain training loops),
:mod:`nas.ffn.partition` (the learned space partition and random search),
:mod:`nas.ffn.groundtruth` (cross-validated stand-alone ground truth). The method: :mod:`nas.methods.mlp`.
"""

from nas.ffn.expressions import STANDARD_FFN, Expr, expression_hash, ffn_params, is_valid, parse, sample_expression
from nas.ffn.partition import PartitionTree, run_search
from nas.ffn.transformer import FFNArch, SearchableFFN, SharedLinear, TinyTransformer

__all__ = [
    "STANDARD_FFN",
    "Expr",
    "parse",
    "is_valid",
    "sample_expression",
    "expression_hash",
    "ffn_params",
    "FFNArch",
    "SharedLinear",
    "SearchableFFN",
    "TinyTransformer",
    "PartitionTree",
    "run_search",
]
