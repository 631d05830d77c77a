"""The one config layer (stflow.config): dataclass fields -> YAML keys -> flags, errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import pytest

REPO = Path(__file__).resolve().parents[2]

from stflow.config import (  # noqa: E402
    ConfigError,
    config_from_dict,
    config_to_dict,
    load_config,
    packaged_configs,
    parse_cli,
    resolve_config,
    run_cli,
)


@dataclass(frozen=True)
class Inner:
    size: int = 3
    mode: Literal["a", "b"] = "a"


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    rate: float = 0.5
    seeds: tuple[int, ...] = (0,)
    devices: int | list[int] | str = "auto"
    resume: bool | str = False
    limit: int | float | None = None
    inner: Inner = field(default_factory=Inner)

    cli_aliases: ClassVar[dict[str, str]] = {"--size": "--inner.size", "--quiet": "--inner.mode=b"}

    def validate(self) -> None:
        if self.inner.size < 1:
            raise ValueError(f"inner.size must be >= 1, got {self.inner.size}")


def test_flags_yaml_and_dict_give_the_same_object(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: y\nseeds: [1, 2]\ninner: {size: 5, mode: b}\n")
    from_file, _ = parse_cli(Outer, ["--config", str(path)])
    from_flags, _ = parse_cli(Outer, ["--name", "y", "--seeds", "1", "2", "--inner.size", "5", "--inner.mode", "b"])
    from_alias, _ = parse_cli(Outer, ["--name", "y", "--seeds", "[1, 2]", "--size", "5", "--quiet"])
    from_dict = config_from_dict(Outer, {"name": "y", "seeds": [1, 2], "inner": {"size": 5, "mode": "b"}})
    assert from_file == from_flags == from_alias == from_dict == Outer("y", seeds=(1, 2), inner=Inner(5, "b"))
    assert config_from_dict(Outer, config_to_dict(from_file)) == from_file  # round trip through plain data


def test_flags_override_the_file_and_dashes_equal_underscores(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rate: 0.1\ninner: {size: 2}\n")
    cfg, _ = parse_cli(Outer, ["--config", str(path), "--inner.size", "7"])
    assert (cfg.rate, cfg.inner.size) == (0.1, 7)
    dashed, _ = parse_cli(Outer, ["--config", str(path), "--inner.size=7"])
    assert dashed == cfg


def test_scalars_lists_bools_and_counts() -> None:
    cfg, _ = parse_cli(Outer, ["--devices", "2", "--seeds", "3", "--resume", "--limit", "1"])
    assert cfg.devices == 2 and cfg.seeds == (3,) and cfg.resume is True
    assert cfg.limit == 1 and isinstance(cfg.limit, int)  # an integer counts batches (Lightning), not a fraction
    cfg, _ = parse_cli(Outer, ["--devices", "0", "1", "--resume", "last.ckpt", "--limit", "0.25"])
    assert cfg.devices == [0, 1] and cfg.resume == "last.ckpt" and cfg.limit == 0.25


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--bogus", "1"], "unrecognized arguments: --bogus 1"),
        (["--rate", "fast"], 'key "rate": expected float, got \'fast\''),
        (["--inner.size", "1.5"], 'key "inner.size": expected int, got \'1.5\''),
        (["--inner.size", "true"], 'key "inner.size": expected int, got \'True\''),
        (["--inner.mode", "c"], "key \"inner.mode\": expected one of 'a'|'b', got 'c'"),
        (["--inner.size", "0"], "inner.size must be >= 1, got 0"),
        (["--config", "nowhere.yaml"], "config not found: nowhere.yaml"),
    ],
)
def test_bad_values_name_the_key(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_cli(Outer, argv)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_unknown_yaml_keys_are_named(tmp_path: Path) -> None:
    for text, key in (("nmae: y\n", "nmae"), ("inner: {sise: 2}\n", "inner.sise")):
        path = tmp_path / "bad.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=f'unknown key "{key}"'):
            load_config(Outer, path)


def test_packaged_configs_resolve_by_name_and_by_source_path() -> None:
    names = packaged_configs("stflow")
    assert {"acfm_bikenyc", "acfm_synthetic", "acfm_taxibj", "stresnet_bikenyc"} <= set(names)
    by_name = resolve_config("acfm_bikenyc")
    assert by_name.is_file() and by_name.parent.name == "configs" and by_name.parent.parent.name == "stflow"
    assert resolve_config("configs/acfm_bikenyc.yaml") == by_name  # the old source-tree path
    assert resolve_config("dna_digits", packages=("nas",)).parent.parent.name == "nas"


def test_run_cli_turns_user_errors_into_one_line(capsys: pytest.CaptureFixture) -> None:
    def main(argv: list[str]) -> int:
        parse_cli(Outer, argv)
        return 0

    assert run_cli(main, ["--inner.size", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: inner.size must be >= 1, got 0\n"
    with pytest.raises(ConfigError):  # --debug: the traceback
        run_cli(main, ["--inner.size", "0", "--debug"])
    assert run_cli(main, []) == 0


@pytest.mark.slow
def test_every_cli_gives_one_line_for_a_wrong_type(tmp_path: Path) -> None:
    """Each entry point, run as a user would: exit code 2, one line on stderr naming the key."""
    commands = [
        (["-m", "stflow.train", "--batch-size", "big"], 'key "batch_size"'),
        (["-m", "stflow.evaluate", "--checkpoint", "x.ckpt", "--batch-size", "0"], "batch_size must be >= 1"),
        (["-m", "stflow.data", "info", "--len-closeness", "x"], 'key "data.len_closeness"'),
        (["-m", "nas.search", "dna", "--seed", "one"], 'key "seed"'),
        (["-m", "benchmarks", "convlstm", "--repeats", "1.5"], 'key "repeats"'),
    ]
    for argv, key in commands:
        cwd = REPO if argv[1] == "benchmarks" else tmp_path  # benchmarks/ is not installed: run from the checkout
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=cwd, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], (
            argv, proc.stderr[-500:])
