"""``python -m nas.transfer TASK [flags]``; tasks: ``seg`` (semantic parsing of digit scenes, mIoU).

``python -m nas.transfer seg --help`` lists the flags; user errors print one ``error: ...`` line (``--debug``:
the traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from stflow.config import run_cli

TASKS = ("seg",)


def _main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m nas.transfer TASK [flags]   TASK: {', '.join(TASKS)}; --help after TASK lists flags")
        return 0 if argv else 2
    if argv[0] not in TASKS:
        raise KeyError(f"unknown task {argv[0]!r}; tasks: {', '.join(TASKS)}")
    from nas.transfer.seg import main_seg

    return main_seg(argv[1:])


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
