"""Fixtures shared by the normlayers tests."""

from __future__ import annotations

import os
import shutil

import pytest

from normlayers import cpu_finalize, set_cpu_finalize
from normlayers.ops import cfinalize


@pytest.fixture(params=["c", "torch"])
def finalize(request):
    """Run the test with the C finalize (skipped without a C compiler) and with the torch ops.

    Modules that test the CPU fast path use it for every test: ``pytestmark = pytest.mark.usefixtures("finalize")``.
    """
    saved = cfinalize._mode
    if request.param == "c":
        if shutil.which(os.environ.get("CC", "cc")) is None:
            pytest.skip("no C compiler: the C finalize cannot be built here")
        set_cpu_finalize("auto")
        assert cpu_finalize() == "c"
    else:
        set_cpu_finalize("torch")
        assert cpu_finalize() == "torch"
    yield request.param
    cfinalize._mode = saved
