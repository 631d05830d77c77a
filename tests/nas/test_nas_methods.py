"""The method interface and the one CLI: DNA and BossNAS registered behind it, shared flags, config errors."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from nas import cli
from nas.methods import SearchMethod, get_method, list_methods
from nas.methods.base import SHARED_FIELDS
from nas.methods.bossnas import BossNAS, BossNASConfig
from nas.methods.dna import DNA, DNAConfig
from stflow.config import ConfigError

METHODS = ("dna", "bossnas", "pinas", "mlp")  # every registered method


def test_dna_and_bossnas_are_registered_and_implement_the_interface():
    assert set(METHODS) <= set(list_methods())
    assert get_method("dna") is DNA and get_method("bossnas") is BossNAS
    for name in METHODS:
        cls = get_method(name)
        assert issubclass(cls, SearchMethod) and cls.name == name and not inspect.isabstract(cls)
        for hook in ("train_block", "rate_block", "report", "search", "run"):
            assert callable(getattr(cls, hook))
        assert set(SHARED_FIELDS) <= set(cls.config_class.__dataclass_fields__)
    assert get_method("dna").config_class is DNAConfig and get_method("bossnas").config_class is BossNASConfig


@pytest.mark.parametrize("method", METHODS)
def test_help_of_every_method_lists_the_shared_flags(method):
    res = subprocess.run([sys.executable, "-m", "nas.search", method, "--help"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for flag in ("--config", "--out_dir", "--seed", "--progress", "--resume"):
        assert flag in res.stdout


def test_unknown_method_is_a_one_line_error_listing_the_methods(capsys):
    assert cli.main(["darts"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unknown search method 'darts'")
    assert all(m in err for m in METHODS)
    res = subprocess.run([sys.executable, "-m", "nas.search", "darts"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "dna" in res.stderr and "bossnas" in res.stderr


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dashes", [True, False])
def test_shared_flags_mean_the_same_for_every_method(method, dashes, tmp_path):
    out = "--out-dir" if dashes else "--out_dir"
    _, cfg = cli.method_config(method, [out, str(tmp_path / "r"), "--seed", "7", "--no-progress", "--no-resume"])
    assert (cfg.out_dir, cfg.seed, cfg.progress, cfg.resume) == (str(tmp_path / "r"), 7, False, False)
    _, cfg = cli.method_config(method, ["--progress", "--resume"])
    assert cfg.progress is True and cfg.resume is True


@pytest.mark.parametrize("method", METHODS)
def test_unknown_yaml_key_is_rejected_naming_the_key(method, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 1\nepochs_per_blok: 3\n")
    with pytest.raises(ConfigError, match="epochs_per_blok"):
        cli.method_config(method, ["--config", str(bad)])
    assert cli.main([method, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "epochs_per_blok" in err


def test_packaged_config_by_name_and_by_path(tmp_path):
    _, dna = cli.method_config("dna", ["--config", "dna_digits"])
    assert dna == DNAConfig()  # the packaged config holds the defaults
    _, boss = cli.method_config("bossnas", ["--config", "bossnas_hytra_digits", "--epochs-per-block", "2"])
    assert (boss.space, boss.sampling, boss.epochs_per_block) == ("hytra", "random", 2)
    _, default = cli.method_config("bossnas", ["--space", "hytra"])  # no --config: the space's packaged config
    assert default.space == "hytra" and default.out_dir == "runs/bossnas-digits-hytra"
    own = tmp_path / "mine.yaml"
    own.write_text("space: hytra\nsampling: random\nnorm: bkn\n")
    _, mine = cli.method_config("bossnas", ["--config", str(own)])
    assert (mine.space, mine.norm) == ("hytra", "bkn")
    with pytest.raises(ConfigError, match="config not found: nope .*dna_digits"):
        cli.method_config("dna", ["--config", "nope"])


def test_no_resume_refuses_a_used_out_dir(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "ratings.json").write_text("{}")
    _, cfg = cli.method_config("dna", ["--out-dir", str(tmp_path / "run"), "--no-resume"])
    with pytest.raises(ValueError, match="already holds a run"):
        DNA(cfg).run()


def test_configs_are_package_data():
    import importlib.resources

    root = importlib.resources.files("nas") / "configs"
    assert {p.name for p in root.iterdir()} >= {"dna_digits.yaml", "bossnas_digits.yaml", "bossnas_hytra_digits.yaml"}
    assert not list(Path(__file__).resolve().parents[2].glob("configs/nas/*.yaml"))  # nothing left outside


@pytest.mark.parametrize("module", ["nas.search.constrained", "nas.search.ranking"])
def test_rating_table_tools_run_as_modules(module, tmp_path):
    res = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", module, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0 and "--ratings" in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", module, "--ratings", str(tmp_path / "none.json"), "--budget", "1",
                          "--ground-truth", "x"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
