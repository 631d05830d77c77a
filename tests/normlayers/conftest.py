"""Fixtures shared by the normlayers tests."""

from __future__ import annotations

import os
import shutil

import pytest

from normlayers import cpu_finalize, set_cpu_finalize
from normlayers.ops import cfinalize


@pytest.fixture(params=["c", "c-finalize", "torch"])
def finalize(request):
    """Run the test with the C library (skipped without a C compiler) and with the torch ops: ``"c"`` is mode
    ``"step"`` (the whole step in C, called from the Python Functions whose node names the tests check),
    ``"c-finalize"`` the per-channel C calls between torch's kernels (mode ``"finalize"``), ``"torch"`` the torch
    ops alone. Mode ``"auto"`` (the same C step inside the C++ operator) has its own tests:
    ``tests/normlayers/test_normlayers_cstep.py``.

    Modules that test the CPU fast path use it for every test: ``pytestmark = pytest.mark.usefixtures("finalize")``.
    """
    saved = cfinalize._mode
    if request.param in ("c", "c-finalize"):
        if shutil.which(os.environ.get("CC", "cc")) is None:
            pytest.skip("no C compiler: the C finalize cannot be built here")
        set_cpu_finalize("step" if request.param == "c" else "finalize")
        assert cpu_finalize() == "c"
    else:
        set_cpu_finalize("torch")
        assert cpu_finalize() == "torch"
    yield request.param
    cfinalize._mode = saved
