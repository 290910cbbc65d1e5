"""End to end: a DFM training step at several T, reference vs dfm_fused with and without checkpointing."""
from conftest import run_benchmark


def test_e2e(benchmark, case, peaks, rss_results):
    run_benchmark(benchmark, case, peaks, rss_results)
