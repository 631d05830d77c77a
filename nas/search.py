"""``python -m nas.search {dna,bossnas} [--config FILE] [--out DIR] ...``: the search entry point.

Examples::

    python -m nas.search dna                                  # small digits search, runs/dna-digits
    python -m nas.search dna --config configs/nas/dna_digits.yaml --out runs/dna-bkn --norm bkn
    python -m nas.search dna --block 1 --no-retrain           # one block only (parallel workers)
    python -m nas.search bossnas --help                       # dispatched to nas.bossnas.main
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import replace

__all__ = ["main", "dna_main"]


def dna_main(argv: list[str] | None = None) -> int:
    from .dna import DNAConfig, run_dna

    p = argparse.ArgumentParser(prog="python -m nas.search dna", description="DNA block-wise distillation search")
    p.add_argument("--config", default=None, help="YAML config (default: the built-in digits search)")
    p.add_argument("--out", default="runs/dna-digits", help="output directory (resumes what it finds there)")
    p.add_argument("--block", type=int, action="append", default=None, help="train/rate only this block (repeatable)")
    p.add_argument("--norm", choices=("bn", "bkn"), default=None, help="override the supernet norm")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--budget", type=float, default=None, help="absolute strict cost budget")
    p.add_argument("--no-retrain", action="store_true", help="skip retraining the winner")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    cfg = DNAConfig.from_yaml(args.config) if args.config else DNAConfig()
    changes = {k: v for k, v in (("norm", args.norm), ("seed", args.seed), ("budget", args.budget)) if v is not None}
    if args.no_progress:
        changes["progress_bar"] = False
    cfg = replace(cfg, **changes)
    result = run_dna(cfg, args.out, blocks=args.block, do_retrain=not args.no_retrain)
    print(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("dna", "bossnas"):
        print("usage: python -m nas.search {dna,bossnas} [options]   (--help after the method for its options)")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    method, rest = argv[0], argv[1:]
    if method == "dna":
        return dna_main(rest)
    try:
        bossnas = importlib.import_module("nas.bossnas")  # honours sys.modules, unlike `from . import`
    except ImportError as exc:
        print(f"error: BossNAS is unavailable (importing nas.bossnas failed: {exc})", file=sys.stderr)
        return 2
    return int(bossnas.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
