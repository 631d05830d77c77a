"""Shared fixtures: the real data in ../shared (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from stflow.paths import shared_dir

# Keep the suite predictable on 2-core CI machines.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if path is None:
        pytest.skip("../shared (real BikeNYC data, checkpoints) is absent; set STFLOW_SHARED to point at it")
    return path


@pytest.fixture(scope="session")
def bikenyc_dir(shared: Path) -> Path:
    path = shared / "data" / "bikenyc"
    if not (path / "NYC14_M16x8_T60_NewEnd_last1369h.h5").is_file():
        pytest.skip(f"real BikeNYC file missing under {path}")
    return path
