"""Cached artefacts of NAS runs, reused only when the config that made them matches.

A rerun of a search, a transfer or a ground truth reuses what its folder already holds (a trained teacher, a
block's supernet and ratings, a retrained network, stand-alone accuracies) instead of recomputing it. Reuse is
safe only when the artefact was made with the config asked for now, so every artefact carries a record of the
config values that determine it: an :class:`Artefact` names its path and those values (never progress bars,
``out_dir`` or worker counts, which do not change it). The record is a sidecar ``<artefact>.config.json``
(``{"fingerprint": <hash>, "config": {...}}``) or, for a JSON artefact that has one, its own header.

:func:`check_artefacts` checks a run's artefacts, all of them before any work, and decides per artefact:

- absent: computed; the record is written first, so an interrupted computation resumes only under the
  same config;
- same config: reused, and ``reusing <path> (<what>)`` goes to stderr;
- another config: a one-line ``ValueError`` naming the artefact and the differing keys and saying how to
  proceed, unless ``overwrite`` (then the artefact is deleted and recomputed);
- no record (made before records existed): reused with a warning on stderr, and the record is written.

:func:`check_cached` is the same decision for a JSON artefact whose header is its record (ground truths).
``force`` deletes every existing artefact (a run started afresh with ``--no-resume --overwrite``).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Artefact", "OUT_DIR_HINT", "UNHASHED_FIELDS", "check_artefacts", "check_cached", "check_out_dir",
           "config_fields", "differences", "fingerprint", "is_current", "plain", "record", "write_json"]

OUT_DIR_HINT = "use a new --out-dir, or pass --overwrite to recompute it"
# config fields that never change what a run computes: left out of every artefact's record
UNHASHED_FIELDS = frozenset({"out_dir", "progress", "resume", "overwrite", "workers", "worker_threads", "threads",
                             "checkpoint"})


def plain(value: Any) -> Any:
    """``value`` as JSON data: dataclasses and mappings as dicts, tuples as lists, paths as strings."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # JSON has no inf/nan
    return value


def config_fields(cfg: Any, drop: Iterable[str] = ()) -> dict[str, Any]:
    """A dataclass config's fields as JSON data, without :data:`UNHASHED_FIELDS` and ``drop``."""
    skip = UNHASHED_FIELDS | set(drop)
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in skip}


def fingerprint(fields: Mapping[str, Any]) -> str:
    """A stable hash (16 hex digits) of ``fields``: the same values give the same hash in every process."""
    text = json.dumps(plain(fields), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Artefact:
    """A cached file or folder, the config values that determine it, and what it is (for messages)."""

    path: Path
    fields: Mapping[str, Any]
    what: str

    @property
    def sidecar(self) -> Path:
        """Where the record lives: ``<path>.config.json`` beside the artefact."""
        return self.path.with_name(self.path.name + ".config.json")


def _exists(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def _short(value: Any) -> str:
    text = json.dumps(plain(value), sort_keys=True)
    return text if len(text) <= 40 else "(changed)"


def differences(stored: Mapping[str, Any], current: Mapping[str, Any], limit: int = 4) -> str:
    """The keys whose values differ, as ``key: old -> new`` (long values: ``key (changed)``), at most ``limit``."""
    old, new = plain(stored), plain(current)
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    parts = []
    for k in keys[:limit]:
        a, b = _short(old.get(k)), _short(new.get(k))
        parts.append(f"{k} (changed)" if "(changed)" in (a, b) else f"{k}: {a} -> {b}")
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return ", ".join(parts)


def write_json(path: Path, data: Any, indent: int | None = 1, sort_keys: bool = False,
               default: Callable[[Any], Any] | None = None) -> None:
    """Write ``data`` as JSON atomically (through ``<path>.tmp``: a reader never sees half a file, and an
    interrupted write leaves the previous file as it was). ``default``: as in :func:`json.dumps`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=indent, sort_keys=sort_keys, default=default))
    tmp.replace(path)


def record(artefact: Artefact) -> None:
    """Write the artefact's sidecar record (atomically)."""
    write_json(artefact.sidecar, {"fingerprint": fingerprint(artefact.fields), "config": plain(artefact.fields)},
               sort_keys=True)


def _read_record(artefact: Artefact) -> Mapping[str, Any] | None:
    """The recorded config; None without a record, ``{}`` for an unreadable one."""
    if not artefact.sidecar.is_file():
        return None
    try:
        data = json.loads(artefact.sidecar.read_text())
        return data["config"] if isinstance(data, dict) and isinstance(data.get("config"), dict) else {}
    except json.JSONDecodeError:
        return {}


def _delete(artefact: Artefact) -> None:
    if artefact.path.is_dir():
        shutil.rmtree(artefact.path)
    else:
        artefact.path.unlink(missing_ok=True)
    artefact.sidecar.unlink(missing_ok=True)


def _status(artefact: Artefact, stored: Mapping[str, Any] | None) -> str:
    """``absent`` | ``same`` | ``unrecorded`` | ``differs``."""
    if not _exists(artefact.path):
        return "absent"
    if stored is None:
        return "unrecorded"
    return "same" if fingerprint(stored) == fingerprint(artefact.fields) else "differs"


def is_current(artefact: Artefact) -> bool:
    """Whether the artefact exists and its record holds exactly ``artefact.fields``."""
    return _status(artefact, _read_record(artefact)) == "same"


def _mismatch(artefact: Artefact, stored: Mapping[str, Any], hint: str) -> ValueError:
    detail = differences(stored, artefact.fields) if stored else "its config record is unreadable"
    return ValueError(f"{artefact.path} ({artefact.what}) was made with another config ({detail}); {hint}")


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def check_out_dir(out_dir: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """``resume=False`` refuses an ``out_dir`` that holds a run, unless ``overwrite`` (then everything is recomputed:
    :func:`check_artefacts` with ``force``)."""
    out = Path(out_dir)
    if not resume and not overwrite and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out} already holds a run: resume it (--resume), recompute it (--no-resume --overwrite) "
                         "or choose another --out-dir")


def check_artefacts(
    artefacts: Iterable[Artefact], *, overwrite: bool = False, force: bool = False, hint: str = OUT_DIR_HINT
) -> list[Artefact]:
    """Check every artefact of a run against its sidecar record before any work (module docstring); returns the
    reused ones. All are checked before anything is deleted or written, so a refusal leaves the folder as it was."""
    checked = [(a, _read_record(a)) for a in artefacts]
    status = [_status(a, stored) for a, stored in checked]
    for (a, stored), s in zip(checked, status):
        if s == "differs" and not overwrite:
            raise _mismatch(a, stored or {}, hint)
    reused = []
    for (a, stored), s in zip(checked, status):
        if s == "differs" or (force and s != "absent"):
            why = "--no-resume --overwrite" if force else f"config changed: {differences(stored or {}, a.fields)}"
            _note(f"recomputing {a.path} ({a.what}): {why}")
            _delete(a)
        elif s == "same":
            _note(f"reusing {a.path} ({a.what}, same config)")
            reused.append(a)
            continue  # its record is current
        elif s == "unrecorded":
            _note(f"reusing {a.path} ({a.what}): it has no config record (made before records existed); "
                  "assumed to match this config, recorded now")
            reused.append(a)
        record(a)
    return reused


def check_cached(
    path: str | os.PathLike,
    fields: Mapping[str, Any],
    stored: Mapping[str, Any],
    what: str,
    *,
    overwrite: bool = False,
    hint: str = OUT_DIR_HINT,
) -> bool:
    """Whether to reuse the JSON artefact at ``path`` whose own header records ``stored`` (a ground truth):
    True when it exists and ``stored`` equals ``fields``; False when it is absent, or made with another config
    and ``overwrite`` (its writer then replaces it); another config without ``overwrite`` is a ``ValueError``."""
    artefact = Artefact(Path(path), fields, what)
    status = _status(artefact, stored)
    if status == "absent":
        return False
    if status == "differs":
        if not overwrite:
            raise _mismatch(artefact, stored, hint)
        _note(f"recomputing {artefact.path} ({what}): config changed: {differences(stored, fields)}")
        return False
    _note(f"reusing {artefact.path} ({what}, same config)")
    return True
