"""The CPU hot path's per-channel finalize as one C call: ``csrc/bkn_finalize.c``, compiled on first use.

Why: at CIFAR sizes the ~20 small torch ops of the finalize (guard, mixture, rstd, running buffers,
the prior's gradients) cost as much as BatchNorm2d's whole step, because each runs right after an
x-sized kernel with cold caches (~5 us each). One C loop over the channels does the same arithmetic
in a few microseconds: the forward finalize, the prior's gradients when only ``y`` has a gradient,
and the per-channel part of the backward when the posterior has gradients too (a Kalman chain). The
torch ops in :mod:`normlayers.ops.torch_backend` stay the reference and the fallback; tests hold the two to the
same numbers.

The same library holds the whole training step (``csrc/bkn_step.c``: moments, finalize and normalize
in one call, the backward's reductions, per-channel work and ``dx`` in another; multi-threaded with
OpenMP). Mode ``"auto"`` (the default) runs that step inside a torch operator with a C++ autograd node
(``csrc/bkn_op.cpp``, :func:`load_op`: ``torch.ops.normlayers.bkn_step``), so no Python runs between the
forward and the backward; mode ``"step"`` calls the step through ctypes from Python autograd Functions
(also the fallback when the operator does not build); mode ``"finalize"`` keeps only the per-channel C calls
between torch's x-sized kernels (the design before the step, kept for comparison and tests).

How: the sources are compiled once per machine with the system C compiler (``$CC``, else ``cc``;
``-O3 -shared -fPIC``, a few seconds) into ``$NORMLAYERS_CACHE`` (default ``$XDG_CACHE_HOME/normlayers``
or ``~/.cache/normlayers``; a private temporary directory if that is not writable), named by a hash
of the sources, compiler, flags and platform, written atomically, and loaded with :mod:`ctypes` (no Python
headers, no torch headers, no build step at install; the operator alone is compiled with ``$CXX``, else
``c++``, against the installed torch's headers and libraries, ~20 s once per torch version). Threads: when the
process has already loaded a GNU OpenMP runtime (torch's ``libgomp``, on Linux builds of torch), the step is
compiled with ``-fopenmp`` and linked against that very file, so it shares torch's thread pool (no second pool
spinning on the same cores); otherwise, or if that build fails to compile or load, it is built without
OpenMP and runs on the calling thread. Without a compiler, on any failure, or with
``NORMLAYERS_CPU_FINALIZE=torch`` (or :func:`set_cpu_finalize`), the torch ops run instead.

Trust: a library is loaded only if its directory and the file are owned by the current user and
not group/world-writable, and the file's SHA-256 equals the one recorded next to it when it was
built (``<library>.sha256``, written atomically, same ownership rules). A cache directory that
fails the check is skipped (the build goes to a fresh private temporary directory); a library
whose hash does not match (or has no record) is rebuilt. Each refusal is a ``RuntimeWarning``
and is listed in :data:`rejected`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["cpu_finalize", "set_cpu_finalize", "load"]

_LOG = logging.getLogger("normlayers")
_SOURCE = Path(__file__).with_name("csrc") / "bkn_finalize.c"
_STEP_SOURCES = ("bkn_step.c", "bkn_step_impl.h")  # next to _SOURCE; the .c is compiled, the header included
_OP_SOURCE = "bkn_op.cpp"  # the torch operator around the step (load_op)
MODES = ("auto", "step", "finalize", "torch")

_mode = os.environ.get("NORMLAYERS_CPU_FINALIZE", "auto")
_lib: ctypes.CDLL | None = None
_tried = False
rejected: list[str] = []  # why a cache directory or library was not trusted (this process)
_built: dict[str, str] = {}  # library path -> SHA-256 of what this process compiled there
_private_dirs: set[Path] = set()  # temporary directories this process created
_has_step = False  # the loaded library has the whole-step entry points
_op: object | None = None  # torch.ops.normlayers.bkn_step.default once built and loaded
_op_openmp = False
_op_tried = False
_op_path: Path | None = None  # the operator's library file (or None: not built by this process)

_PTR, _I64, _F64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_FORWARD_ARGTYPES = [_INT, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _F64, _F64, _F64, _PTR, _PTR, _F64, _I64,
                     _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]
_BACKWARD_ARGTYPES = [_INT, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _F64, _PTR, _PTR]
# bkn_step_forward / bkn_step_backward (csrc/bkn_step.c)
STEP_FORWARD_ARGTYPES = [_INT, _INT, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _F64, _F64, _F64, _INT,
                         _PTR, _PTR, _F64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _INT]
STEP_BACKWARD_ARGTYPES = [_INT, _INT, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR,
                          _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _INT]
_CHAIN_ARGTYPES = [_INT, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _F64, _PTR, _PTR, _PTR, _PTR]


def set_cpu_finalize(mode: str) -> None:
    """``"auto"``: the C++ operator around the C step when it builds, else the C step through a Python
    ``autograd.Function`` (or at least the C finalize) (the default); ``"step"``: the C step through the Python
    Function; ``"finalize"``: only the per-channel C calls, torch's x-sized kernels; ``"torch"``: always the torch
    ops."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"cpu finalize mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def cpu_finalize() -> str:
    """Which finalize the CPU hot path uses now: ``"c"`` or ``"torch"`` (compiles on the first call)."""
    return "c" if load() is not None else "torch"


def load_step() -> ctypes.CDLL | None:
    """The library when the hot path should run the whole step in C (modes ``"auto"``, ``"step"``), else ``None``."""
    if _mode != "auto" and _mode != "step":
        return None
    lib = load()
    return lib if lib is not None and _has_step else None


def cpu_step() -> str:
    """How the CPU hot path runs now: ``"cpp-op-openmp"`` / ``"cpp-op"`` (the C++ operator, :func:`load_op`),
    ``"c-step-openmp"`` / ``"c-step"`` (the whole step in C through a Python Function, with or without threads),
    ``"c-finalize"`` (per-channel C calls between torch kernels) or ``"torch"``."""
    if load_op() is not None:
        return "cpp-op-openmp" if _op_openmp else "cpp-op"
    lib = load_step()
    if lib is not None:
        return "c-step-openmp" if lib.bkn_step_openmp() else "c-step"
    return "c-finalize" if load() is not None else "torch"


def load_op() -> Any:
    """``torch.ops.normlayers.bkn_step.default`` (``csrc/bkn_op.cpp``: the C step with a C++ autograd node) in mode
    ``"auto"`` when it builds and loads, else ``None`` (logged once). Built like the ctypes library (same cache,
    trust rules and OpenMP runtime) with ``$CXX`` (else ``c++``) against the installed torch; the first build takes
    ~20 s."""
    global _op, _op_tried, _op_openmp, _op_path
    if _mode != "auto":
        return None
    if _op_tried:  # (every training step asks: answered before anything else is looked at)
        return _op
    if load_step() is None:  # the operator wraps the C step: no step, no operator
        return None
    _op_tried = True
    import torch

    if hasattr(torch.ops.normlayers, "bkn_step"):  # loaded earlier in this process (a reset loader)
        _op = torch.ops.normlayers.bkn_step.default
        return _op
    if not _SOURCE.with_name(_OP_SOURCE).exists():
        return None
    compiler = os.environ.get("CXX", "c++")
    source = b"\0".join(_SOURCE.with_name(name).read_bytes() for name in (_OP_SOURCE, *_STEP_SOURCES)
                        if _SOURCE.with_name(name).exists())

    def open_op(library: Path) -> tuple[Any, Path]:
        try:
            torch.ops.load_library(str(library))
        except RuntimeError as err:  # (torch's loader): this build failed, as an OSError would say
            raise OSError(str(err)) from err
        return torch.ops.normlayers.bkn_step.default, library  # (AttributeError if it registered nothing)

    errors: list[str] = []
    _LOG.info("normlayers: building the C++ operator of the CPU hot path (once per torch version, ~20 s)")
    built = _first_build([source, compiler.encode(), os.environ.get("CC", "cc").encode(), torch.__version__.encode()],
                         compiler, "bkn_op", open_op, errors)
    if built is not None:
        (_op, _op_path), variant = built
        _op_openmp = bool(variant)
        return _op
    _LOG.info("normlayers: C++ operator unavailable, the CPU hot path calls the C step from Python (%s)",
              "; ".join(errors))
    return None


def _cache_dirs() -> Iterator[Path]:
    """Where to build, in order: the cache, then (created only if needed) a fresh private temporary
    directory, never a shared, guessable path another user could have planted a library in."""
    explicit = os.environ.get("NORMLAYERS_CACHE")
    if explicit:
        yield Path(explicit)
    else:
        yield Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normlayers"
    private = Path(tempfile.mkdtemp(prefix="normlayers-"))  # mode 0700, a fresh unguessable name
    _private_dirs.add(private)
    yield private


class UntrustedCache(OSError):
    """A cache directory or library that must not be loaded (wrong owner, writable by others, bad hash)."""


def _check_owner(path: Path, what: str) -> None:
    """``UntrustedCache`` unless ``path`` (not a symlink) is owned by this user and not group/world-writable."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise UntrustedCache(f"{what} {path} is a symbolic link")
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        raise UntrustedCache(f"{what} {path} is owned by uid {info.st_uid}, not by this user ({os.getuid()})")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UntrustedCache(f"{what} {path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sidecar(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _verify(library: Path) -> None:
    """``UntrustedCache`` unless ``library`` and its recorded hash pass the trust rules (module docstring)."""
    _check_owner(library, "library")
    sidecar = _sidecar(library)
    if not sidecar.exists():
        raise UntrustedCache(f"library {library} has no recorded hash ({sidecar.name})")
    _check_owner(sidecar, "hash record")
    recorded = sidecar.read_text().strip()
    actual = _sha256(library)
    if actual != recorded or (str(library) in _built and _built[str(library)] != actual):
        raise UntrustedCache(f"library {library} does not match the hash recorded when it was built")


def _reject(reason: str) -> None:
    rejected.append(reason)
    warnings.warn(f"normlayers: not loading the C finalize from the cache: {reason}", RuntimeWarning, stacklevel=3)


def _sources() -> list[Path]:
    """What is compiled: the finalize, plus the whole step when its files are there."""
    step = [_SOURCE.with_name(name) for name in _STEP_SOURCES]
    return [_SOURCE] + ([step[0]] if all(p.exists() for p in step) else [])


def _openmp_runtime() -> str | None:
    """Torch's GNU OpenMP runtime as this process has loaded it, or ``None`` (not Linux, none loaded).

    Other packages may have loaded their own copies (wheels ship renamed ``libgomp-<hash>.so``): the one inside
    torch's package wins, else a plain ``libgomp.so.1`` (a system or conda torch links that one)."""
    torch = sys.modules.get("torch")
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__)) if getattr(torch, "__file__", None) else None
    found = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if os.path.basename(path).startswith("libgomp") and ".so" in path and path not in found:
                    found.append(path)
    except OSError:
        return None
    for path in found:
        if torch_dir is not None and os.path.realpath(path).startswith(torch_dir + os.sep) and os.path.isfile(path):
            return path
    for path in found:
        if os.path.basename(path) == "libgomp.so.1" and os.path.isfile(path):
            return path
    return None


def _variants() -> list[tuple[str, ...]]:
    """Link-time extras to try in order: with OpenMP (linked against the loaded runtime), then without."""
    runtime = _openmp_runtime()
    return ([("-fopenmp", runtime)] if runtime is not None and len(_sources()) > 1 else []) + [()]


def _c_commands(compiler: str, partial: Path, objects_stem: Path, variant: tuple[str, ...]) -> tuple[list, list]:
    """Commands that build the ctypes library (finalize + step) into ``partial``, and their temporary objects."""
    sources = [str(p) for p in _sources()]
    if variant:  # compile with -fopenmp, link against the runtime file itself (not the compiler's -lgomp)
        flag, runtime = variant
        objects = [f"{objects_stem}.{i}.o" for i in range(len(sources))]
        cmds = [[compiler, "-O3", flag, "-fPIC", "-c", "-o", obj, src] for obj, src in zip(objects, sources)]
        cmds.append([compiler, "-shared", "-o", str(partial), *objects, runtime, "-lm"])
        return cmds, objects
    return [[compiler, "-O3", "-shared", "-fPIC", "-o", str(partial), *sources, "-lm"]], []


def _torch_build_flags() -> tuple[list[str], list[str]]:
    """(compile flags, link flags) for a torch operator: the installed torch's headers, C++ ABI and libraries."""
    import torch

    root = Path(torch.__file__).resolve().parent
    lib = root / "lib"
    compile_flags = [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
                     f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    return compile_flags, [f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]


def _op_commands(compiler: str, partial: Path, objects_stem: Path, variant: tuple[str, ...]) -> tuple[list, list]:
    """Commands that build the torch operator (``csrc/bkn_op.cpp`` with ``$CXX``, ``csrc/bkn_step.c`` with ``$CC``,
    OpenMP as ``variant``) into ``partial``, and their temporary objects."""
    step, op = _SOURCE.with_name(_STEP_SOURCES[0]), _SOURCE.with_name(_OP_SOURCE)
    compile_flags, link_flags = _torch_build_flags()
    objects = [f"{objects_stem}.step.o", f"{objects_stem}.op.o"]
    c_compiler = os.environ.get("CC", "cc")
    cmds = [[c_compiler, "-O3", *variant[:1], "-fPIC", "-c", "-o", objects[0], str(step)],
            [compiler, "-O2", "-std=c++20", "-fPIC", "-w", *compile_flags, "-c", "-o", objects[1], str(op)],
            [compiler, "-shared", "-o", str(partial), *objects, *link_flags, *variant[1:], "-lm"]]
    return cmds, objects


def _compile(directory: Path, compiler: str, key: str, force: bool = False, variant: tuple[str, ...] = (),
             stem: str = "bkn_finalize") -> Path:
    """Build a library into ``directory`` (unless it is there): the ctypes library (``stem`` "bkn_finalize") or the
    torch operator (``stem`` "bkn_op", :func:`load_op`); ``variant``: ``()`` or ``("-fopenmp", runtime)``."""
    library = directory / f"{stem}-{key}.so"
    if force or not library.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_owner(directory, "cache directory")
        # renamed into place: no half-written file is loaded
        partial = directory / f".{stem}-{key}.{os.getpid()}.so"
        partial_hash = directory / f".{stem}-{key}.{os.getpid()}.sha256"
        objects_stem = directory / f".{stem}-{key}.{os.getpid()}"
        commands = _c_commands if stem == "bkn_finalize" else _op_commands
        cmds, objects = commands(compiler, partial, objects_stem, variant)
        try:
            for cmd in cmds:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
                if done.returncode != 0:
                    raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
            os.chmod(partial, 0o700)
            digest = _sha256(partial)
            partial_hash.write_text(digest + "\n")
            os.chmod(partial_hash, 0o600)
            os.replace(partial, library)
            os.replace(partial_hash, _sidecar(library))
            _built[str(library)] = digest
        finally:
            partial.unlink(missing_ok=True)
            partial_hash.unlink(missing_ok=True)
            for obj in objects:
                Path(obj).unlink(missing_ok=True)
    return library


def _trusted_build(directory: Path, compiler: str, key: str, variant: tuple[str, ...] = (),
                   stem: str = "bkn_finalize") -> Path:
    """Build (if needed) the library in ``directory`` and verify it (rebuilt once if it fails): its path."""
    if directory.exists():
        try:
            _check_owner(directory, "cache directory")
        except UntrustedCache as err:
            _reject(str(err))
            raise
    library = _compile(directory, compiler, key, variant=variant, stem=stem)
    try:
        _verify(library)
    except UntrustedCache as err:
        _reject(f"{err}; rebuilding it")
        library = _compile(directory, compiler, key, force=True, variant=variant, stem=stem)
        _verify(library)
    return library


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the three entry points' signatures (AttributeError if the library lacks one)."""
    lib.bkn_forward_finalize.argtypes = _FORWARD_ARGTYPES
    lib.bkn_forward_finalize.restype = _F64
    lib.bkn_backward_finalize.argtypes = _BACKWARD_ARGTYPES
    lib.bkn_backward_finalize.restype = None
    lib.bkn_backward_chain_finalize.argtypes = _CHAIN_ARGTYPES
    lib.bkn_backward_chain_finalize.restype = None
    global _has_step
    _has_step = hasattr(lib, "bkn_step_forward")
    if _has_step:
        lib.bkn_step_forward.argtypes = STEP_FORWARD_ARGTYPES
        lib.bkn_step_forward.restype = _F64
        lib.bkn_step_backward.argtypes = STEP_BACKWARD_ARGTYPES
        lib.bkn_step_backward.restype = _INT
        lib.bkn_step_openmp.argtypes = []
        lib.bkn_step_openmp.restype = _INT
    return lib


def load() -> ctypes.CDLL | None:
    """The loaded library, or ``None`` (mode ``"torch"``, or it could not be built/loaded: logged once)."""
    global _lib, _tried
    if _mode == "torch":
        return None
    if _tried:
        return _lib
    _tried = True
    compiler = os.environ.get("CC", "cc")
    source = b"\0".join(p.read_bytes() for p in _sources() + [_SOURCE.with_name(_STEP_SOURCES[1])] if p.exists())
    errors: list[str] = []
    built = _first_build([source, compiler.encode()], compiler, "bkn_finalize",
                         lambda library: _bind(ctypes.CDLL(str(library))), errors)
    if built is not None:
        _lib = built[0]
        return _lib
    _LOG.info("normlayers: C finalize unavailable, the CPU hot path uses torch ops (%s)", "; ".join(errors))
    return None


def _first_build(key_parts: list[bytes], compiler: str, stem: str, open_library: Callable[[Path], Any],
                 errors: list[str]) -> tuple[Any, tuple[str, ...]] | None:
    """Build, verify and open the first library that works, trying each cache directory (:func:`_cache_dirs`) with
    each OpenMP variant (:func:`_variants`): ``(open_library(path), variant)``, or ``None`` with the reasons appended
    to ``errors``. The library's name hashes ``key_parts``, the platform and the variant."""
    for directory in _cache_dirs():
        for variant in _variants():
            key = hashlib.sha256(b"\0".join([*key_parts, platform.machine().encode(), platform.system().encode(),
                                              *(v.encode() for v in variant)])).hexdigest()[:16]
            try:
                return open_library(_trusted_build(directory, compiler, key, variant, stem=stem)), variant
            except UntrustedCache as err:  # the directory itself: the next one
                errors.append(f"{directory}: {err}")
                break
            except (OSError, AttributeError, subprocess.SubprocessError) as err:  # this build: the next variant
                errors.append(f"{directory} ({' '.join(variant) or 'no OpenMP'}): {err}")
        if directory in _private_dirs:
            shutil.rmtree(directory, ignore_errors=True)  # our own private temporary directory
    return None


def op_library() -> Path | None:
    """The file :func:`load_op` loaded the operator from (``None`` if it did not)."""
    return _op_path if load_op() is not None else None


def _reset_for_tests() -> None:
    """Forget the loaded library so the next :func:`load` builds again (tests of the loader)."""
    global _lib, _tried, _has_step, _op, _op_tried
    _lib, _tried, _has_step, _op, _op_tried = None, False, False, None, False
    rejected.clear()
    _built.clear()
