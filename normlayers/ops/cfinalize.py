"""The CPU hot path's per-channel finalize as one C call: ``csrc/bkn_finalize.c``, compiled on first use.

Why: at CIFAR sizes the ~20 small torch ops of the finalize (guard, mixture, rstd, running buffers,
the prior's gradients) cost as much as BatchNorm2d's whole step, because each runs right after an
x-sized kernel with cold caches (~5 us each). One C loop over the channels does the same arithmetic
in a few microseconds: the forward finalize, the prior's gradients when only ``y`` has a gradient,
and the per-channel part of the backward when the posterior has gradients too (a Kalman chain). The
torch ops in :mod:`normlayers.ops.torch_backend` stay the reference and the fallback; tests hold the two to the
same numbers.

How: the source is compiled once per machine with the system C compiler (``$CC``, else ``cc``;
``-O2 -shared -fPIC``, ~0.2 s) into ``$NORMLAYERS_CACHE`` (default ``$XDG_CACHE_HOME/normlayers``
or ``~/.cache/normlayers``; a private temporary directory if that is not writable), named by a hash
of the source, compiler and platform, written atomically, and loaded with :mod:`ctypes` (no Python
headers, no torch headers, no build step at install). Without a compiler, on any failure, or with
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
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["cpu_finalize", "set_cpu_finalize", "load"]

_LOG = logging.getLogger("normlayers")
_SOURCE = Path(__file__).with_name("csrc") / "bkn_finalize.c"
MODES = ("auto", "torch")

_mode = os.environ.get("NORMLAYERS_CPU_FINALIZE", "auto")
_lib: ctypes.CDLL | None = None
_tried = False
rejected: list[str] = []  # why a cache directory or library was not trusted (this process)
_built: dict[str, str] = {}  # library path -> SHA-256 of what this process compiled there
_private_dirs: set[Path] = set()  # temporary directories this process created

_PTR, _I64, _F64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_FORWARD_ARGTYPES = [_INT, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _F64, _F64, _F64, _PTR, _PTR, _F64, _I64,
                     _PTR, _PTR, _PTR, _PTR, _PTR, _PTR]
_BACKWARD_ARGTYPES = [_INT, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _F64, _PTR, _PTR]
_CHAIN_ARGTYPES = [_INT, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _F64, _PTR, _PTR, _PTR, _PTR]


def set_cpu_finalize(mode: str) -> None:
    """``"auto"``: the C finalize when it compiles and loads (the default); ``"torch"``: always the torch ops."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"cpu finalize mode must be one of {MODES}, got {mode!r}")
    _mode = mode


def cpu_finalize() -> str:
    """Which finalize the CPU hot path uses now: ``"c"`` or ``"torch"`` (compiles on the first call)."""
    return "c" if load() is not None else "torch"


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


def _compile(directory: Path, compiler: str, key: str, force: bool = False) -> Path:
    library = directory / f"bkn_finalize-{key}.so"
    if force or not library.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        _check_owner(directory, "cache directory")
        # renamed into place: no half-written file is loaded
        partial = directory / f".bkn_finalize-{key}.{os.getpid()}.so"
        partial_hash = directory / f".bkn_finalize-{key}.{os.getpid()}.sha256"
        cmd = [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(_SOURCE), "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
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
    return library


def _load_from(directory: Path, compiler: str, key: str) -> ctypes.CDLL:
    """Build (if needed) and load the library in ``directory``, after verifying it (rebuilt once if it fails)."""
    if directory.exists():
        try:
            _check_owner(directory, "cache directory")
        except UntrustedCache as err:
            _reject(str(err))
            raise
    library = _compile(directory, compiler, key)
    try:
        _verify(library)
    except UntrustedCache as err:
        _reject(f"{err}; rebuilding it")
        library = _compile(directory, compiler, key, force=True)
        _verify(library)
    return _bind(ctypes.CDLL(str(library)))


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the three entry points' signatures (AttributeError if the library lacks one)."""
    lib.bkn_forward_finalize.argtypes = _FORWARD_ARGTYPES
    lib.bkn_forward_finalize.restype = _F64
    lib.bkn_backward_finalize.argtypes = _BACKWARD_ARGTYPES
    lib.bkn_backward_finalize.restype = None
    lib.bkn_backward_chain_finalize.argtypes = _CHAIN_ARGTYPES
    lib.bkn_backward_chain_finalize.restype = None
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
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, compiler.encode(), platform.machine().encode(),
                                      platform.system().encode()])).hexdigest()[:16]
    errors = []
    for directory in _cache_dirs():
        try:
            _lib = _load_from(directory, compiler, key)
            return _lib
        except (OSError, AttributeError, subprocess.SubprocessError) as err:
            errors.append(f"{directory}: {err}")
            if directory in _private_dirs:
                shutil.rmtree(directory, ignore_errors=True)  # our own private temporary directory
    _LOG.info("normlayers: C finalize unavailable, the CPU hot path uses torch ops (%s)", "; ".join(errors))
    return None


def _reset_for_tests() -> None:
    """Forget the loaded library so the next :func:`load` builds again (tests of the loader)."""
    global _lib, _tried
    _lib, _tried = None, False
    rejected.clear()
    _built.clear()
