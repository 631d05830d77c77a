"""Loading user-supplied torch files without running code: ``torch.load(..., weights_only=True)`` only.

A pickle can run any code when it is unpickled, so every checkpoint a user names (``stflow.evaluate
--checkpoint``, ``stflow.train --resume``) is read with torch's restricted unpickler: tensors, plain
containers and numbers only. stflow's own checkpoints are plain data (the lr schedule is saved as its
fields, hyper-parameters are plain dicts), so nothing needs allow-listing; a file that holds any other
Python object is refused with a one-line ``ValueError`` naming the file.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "safe_load"]


class UnsafeCheckpointError(ValueError):
    """A checkpoint holds Python objects the restricted unpickler refuses (it could run code)."""


def _first_line(err: BaseException) -> str:
    """The informative part of torch's multi-line message: what the restricted unpickler stopped at."""
    text = str(err).strip()
    global_ = re.search(r"GLOBAL ([\w.]+)", text)
    if global_:
        return f"the restricted unpickler stopped at the Python global {global_.group(1)}"
    if "WeightsUnpickler error:" in text:
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split())
        return detail.split(" Check the documentation")[0].rstrip(".")
    return " ".join(text.split())[:300] if text else type(err).__name__


def safe_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; :class:`UnsafeCheckpointError` / ``ValueError`` (one line) if the
    file holds other objects or is not a torch file, ``FileNotFoundError`` if it is absent."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if re.search(r"GLOBAL [\w.]+", str(err)):
            raise UnsafeCheckpointError(
                f"{path}: refused, it holds Python objects other than tensors and plain data, which could run code "
                f"when loaded ({_first_line(err)})"
            ) from err
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from err
    except Exception as err:  # zip/pickle errors vary by torch version
        raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(err)})") from err
