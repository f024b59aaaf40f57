"""Benchmarks of Mailers (not tests): ``python -m bench.render`` and ``python -m bench.e2e``."""
