"""End to end: a DFM training step at several T, reference vs dfm_fused in the three unroll modes
(``fused``: checkpoint=True, ``fused-selective``, ``fused-nockpt``);
and the end-to-end settings of docs/design.md, 'Targets' (training B=128 64x64 T=5, inference B=8 T=8, training 224x224 B=64 T=5) with
``reference-compiled`` and the whole iteration as one CUDA graph (``graphed``)."""
from conftest import DEVICE, run_benchmark

from dfm_fused.bench.e2e import target_e2e_cases
from dfm_fused.bench.e2e_cases import E2E_ALL_IMPLS as IMPLS


def pytest_generate_tests(metafunc):
    if "target_case" not in metafunc.fixturenames:
        return
    impls = None
    if metafunc.config.getoption("--dfm-no-compile") and DEVICE == "cuda":
        impls = [impl for impl in IMPLS if impl != "reference-compiled"]
    cases = target_e2e_cases(DEVICE, impls=impls)
    metafunc.parametrize("target_case", cases, ids=[c.id.replace(" ", "-") for c in cases])


def test_e2e(benchmark, case, peaks, rss_results):
    run_benchmark(benchmark, case, peaks, rss_results)


def test_e2e_targets(benchmark, target_case, peaks, rss_results):
    run_benchmark(benchmark, target_case, peaks, rss_results)
