"""``python -m nas.search METHOD [--config NAME|FILE] [flags]``: run a registered search method.

Every method's config fields are its flags (``--norm bkn``, ``--epochs-per-block 3``; dashes or underscores);
the shared flags are the same for every method:

``--config NAME|FILE``  a packaged config (``nas/configs/NAME.yaml``) or a YAML file; unknown keys are errors
``--out-dir DIR``       where the run lives (checkpoints, ratings, ``architecture.json``, ``report.md``)
``--seed N``            the training seed
``--progress`` / ``--no-progress``   progress bars (on by default)
``--resume`` / ``--no-resume``       continue what ``--out-dir`` holds (default) / refuse a non-empty ``--out-dir``
``--overwrite``         recompute cached artefacts made with another config (with ``--no-resume``: everything)
``--debug``             show the traceback of a user error instead of one ``error: ...`` line

A rerun reuses what ``--out-dir`` holds (teacher, block supernets and ratings, retrained nets) only when it was
made with the same config (:mod:`nas.cache`; ``reusing ...`` lines on stderr say what was reused); otherwise it
stops before any work with one ``error: ...`` line naming the artefact and the differing keys. Budgets are
checked against the block costs before any training.

Examples::

    python -m nas.search dna                                            # small digits search, runs/dna-digits
    python -m nas.search dna --config path/to/dna.yaml --out-dir runs/dna-bkn --norm bkn
    python -m nas.search dna --blocks '[1]' --retrain false             # one block only (parallel workers)
    python -m nas.search bossnas --space hytra --no-progress            # the packaged bossnas_hytra_digits config
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from nas.methods.base import SHARED_FIELDS, SearchMethod, get_method, list_methods
from stflow.config import parse_cli, run_cli
from stflow.pool import keep_heap

__all__ = ["main", "method_config", "search_main"]

_NEGATABLE = ("progress", "resume", "overwrite")


def _usage() -> str:
    return (f"usage: python -m nas.search METHOD [--config NAME|FILE] [--out-dir DIR] [--seed N] "
            f"[--progress|--no-progress] [--resume|--no-resume] [--overwrite] [...]   METHOD: "
            f"{', '.join(list_methods())}; "
            f"--help after METHOD lists its flags")


def _expand_negations(argv: Sequence[str]) -> list[str]:
    """``--no-progress`` -> ``--progress false`` (and ``--no-resume``, ``--no-overwrite``)."""
    out: list[str] = []
    for token in argv:
        name = token[5:].replace("-", "_") if token.startswith("--no-") or token.startswith("--no_") else None
        out += [f"--{name}", "false"] if name in _NEGATABLE else [token]
    return out


def method_config(method: str, argv: Sequence[str]) -> tuple[type[SearchMethod], Any]:
    """(method class, its validated config) from ``argv``.

    Precedence: dataclass defaults < the method's default config or ``--config`` file < flags.
    """
    cls = get_method(method)
    argv = _expand_negations(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in argv):
        default = cls.default_config(argv)
        if default is not None:
            argv = ["--config", default, *argv]
    shared = ", ".join("--" + f.replace("_", "-") for f in SHARED_FIELDS)
    cfg, _ = parse_cli(
        cls.config_class,
        argv,
        prog=f"python -m nas.search {method}",
        description=f"{cls.description}. Shared flags: {shared}.",
        packages=("nas",),
    )
    return cls, cfg


def search_main(method: str, argv: Sequence[str]) -> int:
    """Run ``method`` with the config parsed from ``argv``; prints the result summary as JSON."""
    cls, cfg = method_config(method, argv)
    result = cls(cfg).run()
    print(json.dumps(result, indent=1, default=str))
    return 0


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0].startswith("-"):
        raise KeyError(f"the first argument must be a METHOD ({', '.join(list_methods())}), got {argv[0]!r}")
    keep_heap()  # glibc: a search's training loops keep their heap (see stflow.pool.keep_heap)
    return search_main(argv[0], argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point; user errors print one ``error: ...`` line and return 2."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
