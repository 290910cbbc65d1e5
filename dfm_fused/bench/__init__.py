"""Benchmarks of dfm_fused against the reference: case definitions, measurement, CLI.

``python -m dfm_fused.bench`` (console script ``dfm-fused-bench``) runs the cases
of :mod:`dfm_fused.bench.cases` and writes a JSON report; the pytest-benchmark
suite in ``benchmarks/`` runs the same cases.
"""
