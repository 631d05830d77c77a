"""Where the shared real data lives (never copied into the repository)."""

from __future__ import annotations

import os
from pathlib import Path

# The source checkout when stflow runs from one (an editable install); inside site-packages otherwise.
REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path | None:
    """``$STFLOW_SHARED`` if set, else ``../shared`` beside the source checkout, else ``../shared`` beside the
    working directory (an installed wheel run from a clone); None when absent."""
    env = os.environ.get("STFLOW_SHARED")
    if env:
        return Path(env) if Path(env).is_dir() else None
    for candidate in (REPO_ROOT.parent / "shared", Path.cwd().parent / "shared"):
        if candidate.is_dir():
            return candidate
    return None
