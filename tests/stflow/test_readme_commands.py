"""The README's stflow commands are valid for today's CLIs (parsed, not run) and its Python example runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from stflow import evaluate, train

README = Path(__file__).resolve().parents[2] / "README.md"


def _commands(module: str) -> list[list[str]]:
    lines = [line.split("#")[0].strip() for line in README.read_text().splitlines()]
    return [shlex.split(line)[3:] for line in lines if line.startswith(f"python -m {module} ")]


@pytest.mark.parametrize("argv", _commands("stflow.train"), ids=" ".join)
def test_readme_train_commands_parse(argv: list[str]) -> None:
    config, _ = train.parse_config(argv)
    assert config.max_epochs >= 1


def test_readme_resume_and_ddp_commands_continue_the_run_they_follow() -> None:
    """The resume command names the same config, epochs and out-dir as the run it continues."""
    runs = [train.parse_config(argv)[0] for argv in _commands("stflow.train")]
    resumed = [c for c in runs if c.run.resume]
    assert resumed, "the README shows how to resume"
    for config in resumed:
        first = next(c for c in runs if c.run.out_dir == config.run.out_dir and not c.run.resume)
        assert (first.model, first.dataset, first.max_epochs) == (config.model, config.dataset, config.max_epochs)


def test_readme_evaluate_commands_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    class Parsed(Exception):
        """Raised by the stand-in for ``evaluate``: the command line parsed and reached the evaluation."""

    def stand_in(*args, **kwargs):
        raise Parsed

    monkeypatch.setattr(evaluate, "evaluate", stand_in)
    commands = _commands("stflow.evaluate")
    assert len(commands) >= 4
    for argv in commands:
        with pytest.raises(Parsed):
            evaluate.main(argv)


def test_readme_python_example_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("STFLOW_CACHE", str(tmp_path))
    block = re.search(r"```python\n(from stflow.data import CrowdFlowDataModule.*?)```", README.read_text(), re.S)
    assert block is not None
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102 (the repository's own README)
    assert tuple(namespace["prediction"].shape) == tuple(namespace["batch"]["target"].shape)
