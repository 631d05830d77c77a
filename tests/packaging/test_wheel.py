"""The distribution: the wheel ships every config as package data, and the documented commands run from a
non-editable install (configs found with importlib.resources, not through a source tree)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout's files (git's view: tracked plus new, not ignored), so stale
    build folders or untracked clutter of the working tree cannot leak into it."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot list the distribution's files")
    source = tmp_path_factory.mktemp("source")
    for name in listed.stdout.splitlines():
        if (REPO / name).is_file() and not name.startswith(("benchmarks/results/", "tests/")):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                           "-w", str(out), "-q"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"building the wheel failed: {proc.stderr[-2000:]}")
    (path,) = out.glob("stflow-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a subprocess that imports the packages from the installed wheel, not the checkout."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel),
                           "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1", "STFLOW_CACHE": str(target / "cache")}
    return env


def test_wheel_ships_every_module_and_config(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = sorted(p.relative_to(REPO).as_posix() for pkg in ("stflow", "nas", "normlayers")
                     for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts)
    assert not [m for m in modules if m not in names], "modules missing from the wheel (a folder without __init__?)"
    shipped = sorted(p.relative_to(REPO).as_posix() for pkg in ("stflow", "nas")
                     for p in (REPO / pkg / "configs").rglob("*.yaml"))
    assert len(shipped) >= 8  # 4 training configs, 1 dataset spec, 3 NAS search configs at least
    missing = [name for name in shipped if name not in names]
    assert not missing, f"configs missing from the wheel: {missing}"
    assert "normlayers/ops/csrc/bkn_finalize.c" in names


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_installed_packages_are_imported_from_the_wheel(installed: dict[str, str], tmp_path: Path) -> None:
    proc = _run(["-c", "import stflow, nas, normlayers; print(stflow.__file__, nas.__file__, normlayers.__file__)"],
                installed, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert all(path.startswith(installed["PYTHONPATH"]) for path in proc.stdout.split()), proc.stdout


def test_train_with_a_packaged_config_from_the_wheel(installed: dict[str, str], tmp_path: Path) -> None:
    city = tmp_path / "city"
    made = _run(["-m", "stflow.data", "synthetic", "--out", str(city), "--days", "16", "--grid", "[4, 4]"],
                installed, tmp_path)
    assert made.returncode == 0, made.stderr
    proc = _run(["-m", "stflow.train", "--config", "acfm_synthetic", "--data-dir", str(city), "--test-days", "2",
                 "--epochs", "1", "--limit-train-batches", "2", "--out-dir", str(tmp_path / "run"), "--json",
                 "--no-progress-bar"], installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["model"] == "acfm_bikenyc" and result["test_samples"] == 48


def test_nas_search_with_a_packaged_config_from_the_wheel(installed: dict[str, str], tmp_path: Path) -> None:
    """``python -m nas.search dna --config dna_digits`` from the installed wheel: the packaged config is found, the
    teacher, every block and the rating run (1 epoch each), and the search writes its architecture."""
    out = tmp_path / "dna"
    proc = _run(["-m", "nas.search", "dna", "--config", "dna_digits", "--out-dir", str(out), "--teacher-epochs", "1",
                 "--block-epochs", "1", "--recal-batches", "1", "--retrain", "false", "--no-progress"],
                installed, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    architecture = json.loads((out / "architecture.json").read_text())
    assert len(architecture["encoding"]) == 3  # one searched candidate per block of the digits space
