"""Benchmarks: ``python -m benchmarks NAME [options]`` runs ``benchmarks/bench_NAME.py``."""
