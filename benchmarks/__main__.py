"""``python -m benchmarks NAME [args]`` runs ``benchmarks/bench_NAME.py``'s ``main(argv)``.

Tables, figures and new caches go to ``runs/benchmarks/`` (``--results-dir DIR`` for another folder); only
``--update-results`` writes into the committed ``benchmarks/results/`` (:mod:`benchmarks.harness`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from stflow.config import run_cli


def available() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in Path(__file__).parent.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "list"):
        print("usage: python -m benchmarks NAME [options]\navailable: " + ", ".join(available())
              + "\noutput: runs/benchmarks/ (--results-dir DIR: another folder; --update-results: the committed "
              "benchmarks/results/); python -m benchmarks NAME --help lists a benchmark's options")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in available():
        print(f"unknown benchmark {name!r}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"benchmarks.bench_{name}")
    return run_cli(module.main, rest)  # a user error: one "error: ..." line, exit 2 (--debug: traceback)


if __name__ == "__main__":
    sys.exit(main())
