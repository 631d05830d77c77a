"""The one typed config layer of every entry point: dataclass fields -> YAML keys -> CLI flags.

A config is a dataclass (nested dataclasses allowed). :func:`parse_cli` builds a jsonargparse parser
from its type hints, so every field is a YAML key and a flag (``--field``, ``--nested.field``; dashes
and underscores are both accepted), values are type-checked (``epochs: "three"`` names the key and
the expected type), unknown keys are rejected with the key named, and ``--config`` reads a YAML file
or a *packaged* config by name (``--config acfm_bikenyc`` finds ``stflow/configs/acfm_bikenyc.yaml``
through :mod:`importlib.resources`, so it works from a wheel as well as from a source tree).
Precedence: dataclass defaults < ``--config`` file < flags (in command-line order).

A config class may define ``validate(self)`` (range checks, raising ``ValueError``) and a class
attribute ``cli_aliases: dict[str, str]`` mapping short flags to dotted keys
(``{"--epochs": "--run.max_epochs"}``) so common flags stay short while the config nests.

User errors (bad key, bad type, bad value, missing file) surface as :class:`ConfigError`, a
``ValueError`` whose message is one line; :func:`run_cli` prints it as ``error: ...`` and exits 2.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import importlib.resources
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "config_to_dict",
    "config_from_dict",
    "load_config",
    "normalise_flags",
    "packaged_configs",
    "parse_cli",
    "resolve_config",
    "run_cli",
]

T = TypeVar("T")
os.environ.setdefault("JSONARGPARSE_DEPRECATION_WARNINGS", "off")


class ConfigError(ValueError):
    """A user's config or flag is wrong; the message is one line that names the key."""


def packaged_configs(package: str) -> list[str]:
    """Names of the YAML configs shipped as package data under ``<package>/configs/``."""
    try:
        root = importlib.resources.files(package) / "configs"
    except ModuleNotFoundError:
        return []
    if not root.is_dir():
        return []
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def resolve_config(name_or_path: str | os.PathLike, packages: Iterable[str] = ("stflow",)) -> Path:
    """A config file on disk, else a packaged config by name (``acfm_bikenyc``, ``configs/acfm_bikenyc.yaml``).

    Raises :class:`ConfigError` naming the file and the packaged names when neither exists.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    for package in packages:
        resource = importlib.resources.files(package) / "configs" / f"{name}.yaml"
        if resource.is_file():
            with importlib.resources.as_file(resource) as real:  # installed packages are plain files on disk
                return Path(real)
    available = [n for package in packages for n in packaged_configs(package)]
    raise ConfigError(f"config not found: {name_or_path} (not a file, nor a packaged config: {', '.join(available)})")


def normalise_flags(argv: Sequence[str], aliases: Mapping[str, str]) -> list[str]:
    """``--out-dir x`` -> ``--out_dir x``; aliases expanded (``--epochs`` -> ``--run.max_epochs``)."""
    out: list[str] = []
    for token in argv:
        if token.startswith("--") and len(token) > 2:
            flag, sep, value = token.partition("=")
            flag = "--" + flag[2:].replace("-", "_")
            for short, long in aliases.items():
                if flag == "--" + short[2:].replace("-", "_"):
                    flag = long
                    break
            token = flag + sep + value
        out.append(token)
    return out


def _one_line(err: BaseException | str) -> str:
    """jsonargparse's multi-line messages as one line that names the key and the expected type."""
    text = " ".join(str(err).split())
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text)  # "<class 'int'>" -> "int"
    text = text.replace("NoneType", "None")
    text = re.sub(r"typing\.Literal\[(.*?)\]", lambda m: "one of " + m.group(1).replace(", ", "|"), text)
    union = re.search(r'Parser key "([^"]+)": Does not validate against any of the Union subtypes '
                      r"Subtypes: \[(.*?)\] Errors: .*Given value: (.*)$", text)
    if union:
        key, types, value = union.groups()
        return f'key "{key}": expected {types.replace(", ", " or ")}, got {value!r}'
    single = re.search(r'Parser key "([^"]+)": Expected an? (.*?)\. Got value: (.*)$', text)
    if single:
        key, expected, value = single.groups()
        return f'key "{key}": expected {expected}, got {value!r}'
    option = re.search(r"Option '([^']+)' is not accepted", text)
    if option:
        return f'unknown key "{option.group(1)}"'
    group = re.search(r"Group '([^']+)' does not accept option '([^']+)'", text)
    if group:
        return f'unknown key "{group.group(1)}.{group.group(2)}"'
    return text


def _keys_of_kind(cls: type, prefix: str = "") -> tuple[set[str], set[str], set[str]]:
    """Dotted keys of fields that accept a bool (a bare ``--resume`` means ``--resume true``), of fields that
    accept a list/tuple (``--seeds 0 1 2`` means ``--seeds [0, 1, 2]``) and of fields that accept nothing else
    (``--seeds 3`` means ``--seeds [3]``; ``--devices 2`` of an ``int | list[int]`` field stays an int)."""
    bools: set[str] = set()
    lists: set[str] = set()
    only_lists: set[str] = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints.get(f.name)
        if dataclasses.is_dataclass(hint):
            inner_bools, inner_lists, inner_only = _keys_of_kind(hint, f"{prefix}{f.name}.")
            bools |= inner_bools
            lists |= inner_lists
            only_lists |= inner_only
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if any(option is bool for option in options):
            bools.add(prefix + f.name)
        if any(typing.get_origin(option) in (list, tuple, collections.abc.Sequence) for option in options):
            lists.add(prefix + f.name)
            if all(typing.get_origin(o) in (list, tuple, collections.abc.Sequence) or o is type(None) for o in options):
                only_lists.add(prefix + f.name)
    return bools, lists, only_lists


def _expand_flags(argv: list[str], cls: type) -> list[str]:
    """Bare bool flags get ``true``; a list flag followed by several values gets them as one YAML list."""
    bool_keys, list_keys, only_list_keys = _keys_of_kind(cls)
    out: list[str] = []
    i = 0
    while i < len(argv):
        flag = argv[i]
        values = []
        j = i + 1
        while j < len(argv) and not argv[j].startswith("--"):
            values.append(argv[j])
            j += 1
        key = flag[2:] if flag.startswith("--") and "=" not in flag else None
        if key in bool_keys and not values:
            out += [flag, "true"]
        elif key in list_keys and (len(values) > 1 or (
                key in only_list_keys and len(values) == 1 and not values[0].lstrip().startswith(("[", "(")))):
            out += [flag, "[" + ", ".join(values) + "]"]
        else:
            out += [flag, *values]
        i = j
    return out


def _parser(cls: type, prog: str | None, description: str | None, packages: Sequence[str]):
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog=prog, description=description, exit_on_error=False, env_prefix=None,
                            default_env=False)
    names = ", ".join(packaged_configs(packages[0]))
    parser.add_argument("--config", action=ActionConfigFile, help=f"YAML config file, or a packaged config ({names})")
    parser.add_class_arguments(cls, nested_key=None, as_group=False, fail_untyped=True)
    return parser


def _validated(cfg: T) -> T:
    validate = getattr(cfg, "validate", None)
    if callable(validate):
        try:
            result = validate()
        except ConfigError:
            raise
        except (ValueError, TypeError) as err:
            raise ConfigError(_one_line(err)) from err
        if result is not None:
            cfg = result
    return cfg


def parse_cli(
    cls: type[T],
    argv: Sequence[str] | None = None,
    *,
    prog: str | None = None,
    description: str | None = None,
    packages: Sequence[str] = ("stflow",),
    extra: Callable[[Any], None] | None = None,
) -> tuple[T, dict[str, Any]]:
    """(validated ``cls`` instance, extra flags) from command-line ``argv``.

    ``extra(parser)`` may add flags that are not config fields (``--json``, ``--debug``); their values come
    back in the second item, keyed by ``dest``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    aliases = dict(getattr(cls, "cli_aliases", {}))
    argv = normalise_flags(argv, aliases)
    argv = _expand_flags(argv, cls)
    for i, token in enumerate(argv):  # --config NAME -> a real path (packaged configs by name)
        if token == "--config" and i + 1 < len(argv):
            argv[i + 1] = str(resolve_config(argv[i + 1], packages))
        elif token.startswith("--config="):
            argv[i] = "--config=" + str(resolve_config(token.split("=", 1)[1], packages))
    parser = _parser(cls, prog, description, packages)
    extra_dests: list[str] = []
    if extra is not None:
        before = {a.dest for a in parser._actions}
        extra(parser)
        extra_dests = [a.dest for a in parser._actions if a.dest not in before]
    try:
        ns = parser.parse_args(argv)
    except SystemExit:
        raise
    except Exception as err:  # jsonargparse raises argparse.ArgumentError / its own errors
        raise ConfigError(_one_line(err)) from err
    extras = {dest: ns.pop(dest) for dest in extra_dests if dest in ns}
    ns.pop("config", None)
    try:
        cfg = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
        cfg = cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(_one_line(err)) from err
    return _validated(cfg), extras


def config_from_dict(cls: type[T], values: Mapping[str, Any]) -> T:
    """A validated ``cls`` from a plain mapping (a YAML document, a checkpoint's hyper-parameters)."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"a {cls.__name__} config must be a mapping of keys, got {type(values).__name__}")
    parser = _parser(cls, None, None, ("stflow",))
    try:
        ns = parser.parse_object(dict(values))
        ns.pop("config", None)
        cfg = parser.instantiate(ns) if hasattr(parser, "instantiate") else parser.instantiate_classes(ns)
        cfg = cls(**{f.name: cfg[f.name] for f in dataclasses.fields(cls) if f.name in cfg})
    except ConfigError:
        raise
    except Exception as err:
        raise ConfigError(_one_line(err)) from err
    return _validated(cfg)


def load_config(cls: type[T], name_or_path: str | os.PathLike, packages: Sequence[str] = ("stflow",),
                **overrides: Any) -> T:
    """A validated ``cls`` from a YAML file or packaged config name, top-level keys replaced by ``overrides``."""
    import yaml

    path = resolve_config(name_or_path, packages)
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(err)})") from err
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: a config must be a mapping of keys, got {type(values).__name__}")
    values.update(overrides)
    try:
        return config_from_dict(cls, values)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (tuples as lists), for YAML, JSON and checkpoints."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def run_cli(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a user error prints one ``error: ...`` line on stderr and returns 2.

    User errors are :class:`ValueError` (so :class:`ConfigError`), :class:`FileNotFoundError` and
    :class:`KeyError` raised before or during the run. ``--debug`` anywhere in ``argv`` re-raises them
    with the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        result = main(argv)
        return result if isinstance(result, int) else 0
    except (ValueError, FileNotFoundError, KeyError) as err:
        if debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {_one_line(message) if isinstance(message, BaseException) else message}", file=sys.stderr)
        return 2
