"""Shared fixtures: the real data in ../shared (skipped with a reason when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The Triton kernels are tested on CPU through Triton's interpreter, which must be chosen before triton
# is first imported (any test module may import it indirectly).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from stflow.paths import shared_dir

# Tests use tiny tensors: one intra-op thread avoids OpenMP hand-offs (20-30x slower when cores are shared)
# and keeps results independent of the machine's core count.
torch.set_num_threads(1)


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
