"""pytest-benchmark suite of dfm_fused against the reference.

Run: ``pytest benchmarks --benchmark-only [--benchmark-json=out.json]``. The cases
are those of ``python -m dfm_fused.bench`` (:mod:`dfm_fused.bench.cases`), for the
best device here (CUDA, else a scaled-down CPU setting). Options:
``--dfm-quick`` (tiny shapes), ``--dfm-no-compile`` (skip ``torch.compile``),
``--dfm-no-rss`` (skip the CPU peak-RSS subprocess), ``--dfm-dtypes``, ``--dfm-threads``.
Each benchmark's ``extra_info`` holds the backend, device, dtype, shape and
memory; the JSON written by ``--benchmark-json`` also gets each case's speed-up
and memory ratios against the reference of its group.
"""
from __future__ import annotations

import functools
import math
import time

import pytest
import torch

from dfm_fused.bench import cases as C
from dfm_fused.bench import measure, report, runner

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_addoption(parser):
    group = parser.getgroup("dfm_fused benchmarks")
    group.addoption("--dfm-quick", action="store_true", help="tiny shapes and T (smoke run)")
    group.addoption("--dfm-no-compile", action="store_true", help="do not time torch.compile of the reference")
    group.addoption("--dfm-no-rss", action="store_true", help="skip the CPU peak-RSS subprocess")
    group.addoption("--dfm-dtypes", default=None, help="comma-separated dtypes (default: float32; CUDA adds bfloat16)")
    group.addoption("--dfm-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def pytest_configure(config):
    threads = config.getoption("--dfm-threads")
    if threads is not None:
        torch.set_num_threads(threads)


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    quick = config.getoption("--dfm-quick")
    if metafunc.function.__name__ == "test_op":
        dtypes = (config.getoption("--dfm-dtypes") or ("float32,bfloat16" if DEVICE == "cuda" else "float32")).split(",")
        impls = ["reference", *([] if config.getoption("--dfm-no-compile") else ["reference-compiled"]), *C.fused_impls(DEVICE)]
        shapes = C.default_shapes(DEVICE, quick).values()
        cases = C.op_cases(DEVICE, shapes, dtypes, impls)
    else:
        model = "resnet18" if C.models_available() is None else "small"
        if quick:
            B, image, Ts = 2, (32, 32), (1, 2)
        else:
            B, image, Ts = (64, (224, 224), (1, 4, 8)) if DEVICE == "cuda" else (2, (64, 64), (1, 4, 8))
        cases = C.e2e_cases(DEVICE, model, Ts, B, image)
    metafunc.parametrize("case", cases, ids=[c.id.replace(" ", "-") for c in cases])


@pytest.fixture(scope="session")
def rss_results(request):
    """Peak RSS of every CPU case of the session, measured once in a subprocess."""
    if DEVICE != "cpu" or request.config.getoption("--dfm-no-rss"):
        return {}
    specs = [item.callspec.params["case"].spec() for item in request.session.items if hasattr(item, "callspec")
             and "case" in item.callspec.params]
    return measure.peak_rss(specs)


@pytest.fixture(scope="session")
def peaks():
    """``dtype -> `` CUDA copy bandwidth and matmul peak, measured once in this run; None on the CPU."""
    if DEVICE != "cuda":
        return None
    return functools.cache(lambda dtype: measure.device_peaks(torch.device("cuda"), C.DTYPES[dtype]))


def run_benchmark(benchmark, case, peaks, rss_results, budget_s=1.0):
    bench = case.build()
    info = runner.case_info(case)
    del info["spec"]
    memory = measure.graph_saved_bytes(bench)
    if DEVICE == "cuda":
        memory["peak_bytes"] = measure.peak_cuda_bytes(bench)
    elif case.id in rss_results:
        memory.update(rss_results[case.id])
        if "rss_peak_bytes" in memory:
            memory["peak_bytes"] = memory.pop("rss_peak_bytes")
    bench.run()  # warm-up
    start = time.perf_counter()
    bench.run()  # the time of one run sizes the number of rounds
    one = time.perf_counter() - start
    rounds = max(3, min(50, math.ceil(budget_s / max(one, 1e-6))))
    benchmark.group = case.group
    benchmark.extra_info.update(info, memory=memory)
    benchmark.pedantic(bench.run, rounds=rounds, iterations=1, warmup_rounds=1)
    if peaks is not None and case.kind == "op":
        floor = measure.floor_seconds(case, peaks(case.dtype))
        benchmark.extra_info.update(floor_s=floor, floor_fraction=floor / benchmark.stats.stats.median,
                                    peaks=peaks(case.dtype))


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """Add speed-up and memory ratios against each group's reference to the JSON."""
    ours = [b for b in output_json["benchmarks"] if "impl" in b["extra_info"] and "memory" in b["extra_info"]]
    records = [
        {"group": b["group"], "impl": b["extra_info"]["impl"], "memory": b["extra_info"]["memory"],
         "time_s": {"median": b["stats"]["median"]}}
        for b in ours
    ]
    report.add_ratios(records)
    for b, r in zip(ours, records):
        for key in ("speedup", "memory_ratio", "graph_memory_ratio"):
            if key in r:
                b["extra_info"][key] = r[key]
