"""The NAS benchmarks' CLIs are typed configs (stflow.config): fields = flags, list flags, one-line errors."""

from __future__ import annotations

import pytest

from benchmarks import bench_bossnas_digits, bench_constrained_search, bench_dna_digits
from stflow.config import ConfigError, parse_cli


def test_dna_digits_flags_and_their_old_spelling():
    cfg, _ = parse_cli(bench_dna_digits.DNADigitsBench,
                       ["--norm", "bkn", "--bkn-p", "0.5", "0.9", "--seeds", "0", "1", "--gt-seeds", "0", "1", "2",
                        "--out", "runs/x", "--fresh"])
    assert (cfg.norm, cfg.bkn_p, cfg.seeds, cfg.gt_seeds, cfg.out_dir, cfg.fresh) == (
        "bkn", [0.5, 0.9], [0, 1], [0, 1, 2], "runs/x", True)
    with pytest.raises(ConfigError, match="norm must be"):
        parse_cli(bench_dna_digits.DNADigitsBench, ["--norm", "gn"])
    with pytest.raises(ConfigError, match=">= 2 ground-truth seeds"):
        parse_cli(bench_dna_digits.DNADigitsBench, ["--gt-seeds", "0"])


def test_bossnas_digits_flags_and_errors(capsys):
    cfg, _ = parse_cli(bench_bossnas_digits.BossNASDigitsBench,
                       ["--variant", "tuned", "plain", "--epochs", "3", "--search-config", "bossnas_digits"])
    assert (cfg.variant, cfg.epochs, cfg.search_config, cfg.norm) == (["tuned", "plain"], 3, "bossnas_digits", "bn")
    assert bench_bossnas_digits.main(["--variant", "fancy"]) == 2
    assert bench_bossnas_digits.main(["--seedz", "1"]) == 2
    err = capsys.readouterr().err
    assert "seedz" in err and err.count("error: ") == 2


def test_constrained_search_flags():
    cfg, _ = parse_cli(bench_constrained_search.ConstrainedSearchBench, ["--sizes", "3", "6", "--instances", "4"])
    assert (cfg.sizes, cfg.instances, cfg.seed) == ([3, 6], 4, 0)
