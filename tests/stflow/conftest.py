"""Fixtures shared by the stflow tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from stflow.data import generate_synthetic_city


@pytest.fixture(scope="session")
def tiny_city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4x4, 16-day synthetic city (seed 1) in the DeepST layout: the small real-format data most CLI tests use."""
    out = tmp_path_factory.mktemp("tiny_city")
    generate_synthetic_city(out, seed=1, days=16, grid=(4, 4))
    return out
