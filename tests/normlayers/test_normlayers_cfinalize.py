"""The C finalize's loader: builds once into its cache, reuses it, and falls back to torch ops."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from normlayers import BatchKalmanNorm2d, cpu_finalize, set_cpu_finalize
from normlayers.ops import cfinalize


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """A loader that has not tried yet, caching into tmp_path; restored afterwards."""
    saved = (cfinalize._lib, cfinalize._tried, cfinalize._mode)
    monkeypatch.setenv("NORMLAYERS_CACHE", str(tmp_path))
    cfinalize._reset_for_tests()
    cfinalize._mode = "auto"
    yield tmp_path
    cfinalize._lib, cfinalize._tried, cfinalize._mode = saved


needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@needs_cc
def test_builds_once_then_reuses_the_cached_library(fresh_loader, monkeypatch):
    assert cpu_finalize() == "c"
    built = list(fresh_loader.glob("bkn_finalize-*.so"))
    assert len(built) == 1 and not list(fresh_loader.glob(".bkn_finalize-*"))  # no partial file left
    stamp = built[0].stat().st_mtime_ns
    cfinalize._reset_for_tests()
    monkeypatch.setattr(cfinalize.subprocess, "run", lambda *a, **k: pytest.fail("recompiled a cached library"))
    assert cpu_finalize() == "c"
    assert built[0].stat().st_mtime_ns == stamp


def test_falls_back_to_torch_ops_without_a_compiler(fresh_loader, monkeypatch):
    monkeypatch.setenv("CC", str(fresh_loader / "no-such-compiler"))
    assert cfinalize.load() is None and cpu_finalize() == "torch"
    bkn = BatchKalmanNorm2d(8, backend="torch")
    x = torch.randn(2, 8, 48, 48, requires_grad=True)
    y = bkn(x, prior=(torch.zeros(8), torch.ones(8)))  # the hot path still runs, with the torch finalize
    assert type(y.grad_fn).__name__ == "_NchwPriorFnBackward"
    y.sum().backward()
    assert torch.isfinite(x.grad).all()


@needs_cc
def test_a_broken_source_is_reported_and_not_loaded(fresh_loader, monkeypatch):
    broken = fresh_loader / "broken.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(cfinalize, "_SOURCE", broken)
    with pytest.raises(OSError, match="failed"):
        cfinalize._compile(fresh_loader, os.environ.get("CC", "cc"), "test")
    assert cfinalize.load() is None
    assert not list(fresh_loader.glob("bkn_finalize-*.so")) and not list(fresh_loader.glob(".bkn_finalize-*"))


def test_mode_switch_is_validated():
    with pytest.raises(ValueError, match="cpu finalize mode"):
        set_cpu_finalize("fast")


@needs_cc
def test_unwritable_cache_falls_back_to_a_private_temporary_directory(fresh_loader, monkeypatch):
    blocker = fresh_loader / "not-a-directory"
    blocker.write_text("")
    monkeypatch.delenv("NORMLAYERS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # <file>/normlayers cannot be created
    lib = cfinalize.load()
    assert lib is not None and cpu_finalize() == "c"
    built = os.path.dirname(lib._name)
    assert os.path.basename(built).startswith("normlayers-") and (os.stat(built).st_mode & 0o077) == 0
    shutil.rmtree(built)
