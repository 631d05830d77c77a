"""Where the shared real data lives (never copied into the repository)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_dir() -> Path | None:
    """``$STFLOW_SHARED`` if set, else ``../shared`` beside the repository; None when absent."""
    env = os.environ.get("STFLOW_SHARED")
    candidate = Path(env) if env else REPO_ROOT.parent / "shared"
    return candidate if candidate.is_dir() else None
