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


@needs_cc
def test_a_tampered_cached_library_is_not_loaded(fresh_loader):
    """A library replaced in the cache after it was built (hash differs from the record) is rebuilt, not loaded."""
    assert cpu_finalize() == "c"
    (library,) = fresh_loader.glob("bkn_finalize-*.so")
    assert (library.parent / (library.name + ".sha256")).read_text().strip() == cfinalize._sha256(library)
    planted = fresh_loader / "planted.so"  # a "malicious" library: any other build of other code
    os.rename(library, planted)
    library.write_bytes(planted.read_bytes() + b"\0tampered")
    cfinalize._reset_for_tests()
    with pytest.warns(RuntimeWarning, match="does not match the hash"):
        lib = cfinalize.load()
    assert lib is not None and lib._name == str(library)
    assert library.read_bytes() == planted.read_bytes()  # rebuilt: the tampered bytes are gone
    assert any("does not match" in reason for reason in cfinalize.rejected)


@needs_cc
def test_a_library_without_a_hash_record_is_rebuilt(fresh_loader):
    assert cpu_finalize() == "c"
    (library,) = fresh_loader.glob("bkn_finalize-*.so")
    (library.parent / (library.name + ".sha256")).unlink()
    cfinalize._reset_for_tests()
    with pytest.warns(RuntimeWarning, match="no recorded hash"):
        assert cfinalize.load() is not None
    assert (library.parent / (library.name + ".sha256")).is_file()


@needs_cc
def test_a_world_writable_cache_dir_is_not_trusted(fresh_loader, monkeypatch):
    cache = fresh_loader / "shared-cache"
    cache.mkdir()
    os.chmod(cache, 0o777)
    monkeypatch.setenv("NORMLAYERS_CACHE", str(cache))
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        lib = cfinalize.load()
    assert lib is not None and cpu_finalize() == "c"
    built = os.path.dirname(lib._name)
    assert built != str(cache) and os.path.basename(built).startswith("normlayers-")
    assert not list(cache.iterdir())  # nothing loaded from (or written to) the shared directory
    shutil.rmtree(built)


@needs_cc
def test_a_world_writable_library_is_not_trusted(fresh_loader):
    assert cpu_finalize() == "c"
    (library,) = fresh_loader.glob("bkn_finalize-*.so")
    os.chmod(library, 0o777)
    cfinalize._reset_for_tests()
    with pytest.warns(RuntimeWarning, match="writable by group or others"):
        assert cfinalize.load() is not None
    assert (os.stat(library).st_mode & 0o022) == 0  # the rebuilt file is private again


@needs_cc
def test_the_step_shares_torchs_openmp_runtime(fresh_loader):
    """Built with OpenMP where torch has loaded libgomp, and linked against that very file: one runtime in the
    process (no second thread pool) -- the ctypes library here (mode "step"), the operator in test_normlayers_cstep."""
    set_cpu_finalize("step")
    runtime = cfinalize._openmp_runtime()
    lib = cfinalize.load()
    assert lib is not None and cfinalize.load_step() is lib
    if runtime is None:
        assert cfinalize.cpu_step() == "c-step"
        return
    assert cfinalize.cpu_step() == "c-step-openmp"
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    with open("/proc/self/maps") as fh:
        loaded = {line.split()[-1] for line in fh if os.path.basename(line.split()[-1]).startswith("libgomp")}
    # other wheels (scikit-learn, ...) may bring renamed copies; the one torch ships is the one linked
    assert runtime in loaded
    assert os.path.realpath(runtime).startswith(torch_dir) or os.path.basename(runtime) == "libgomp.so.1"
    assert not [p for p in loaded if os.path.realpath(p).startswith(torch_dir) and p != runtime]
    import ctypes
    import subprocess
    needed = subprocess.run(["ldd", lib._name], capture_output=True, text=True).stdout if shutil.which("ldd") else ""
    if needed:  # the library's libgomp entry resolves to the runtime itself (loaded by soname, not a second copy)
        assert os.path.basename(runtime).split(".so")[0] in needed
    assert ctypes.CDLL(lib._name) is not None


@needs_cc
@pytest.mark.parametrize("how", ["no_runtime", "flag_fails"])
def test_the_step_builds_without_openmp_when_it_must(fresh_loader, monkeypatch, how):
    """No OpenMP runtime loaded, or a compiler that rejects the OpenMP build: the step is built without threads."""
    if how == "no_runtime":
        monkeypatch.setattr(cfinalize, "_openmp_runtime", lambda: None)
    else:
        failing = ("-fno-such-openmp-flag", "/nonexistent/libgomp.so.1")
        monkeypatch.setattr(cfinalize, "_variants", lambda: [failing, ()])
    set_cpu_finalize("step")  # the ctypes library's step (mode "auto" would take the operator, loaded earlier)
    assert cfinalize.cpu_step() == "c-step"
    assert len(list(fresh_loader.glob("bkn_finalize-*.so"))) == 1
    bkn = BatchKalmanNorm2d(8, backend="torch")
    x = torch.randn(2, 8, 48, 48).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = bkn(x, prior=(torch.zeros(8), torch.ones(8)))
    assert y.grad_fn.step is not None
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
