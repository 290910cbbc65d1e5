"""Op level: exp_decay, feedback_input, state_update; forward and forward + backward."""
from conftest import run_benchmark


def test_op(benchmark, case, peaks, rss_results):
    run_benchmark(benchmark, case, peaks, rss_results)
