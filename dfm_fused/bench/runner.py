"""Measure a list of cases into JSON-ready records (used by the CLI and the pytest suite)."""
from __future__ import annotations

import datetime
import os
import platform
import sys

import torch

import dfm_fused
from dfm_fused._dispatch import resolve
from dfm_fused.bench import measure, report
from dfm_fused.bench.memory import e2e_graph_bytes

__all__ = ["case_info", "cpu_model", "device_name", "environment", "measure_case", "run_cases"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere the platform's processor or machine)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device_type: str) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def environment(device_type: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device_type,
        "device": device_name(device_type),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "dfm_fused": dfm_fused.__version__,
        "backends": dfm_fused.backend_status(device_type),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "argv": sys.argv,
    }


def _backend(case) -> str:
    if case.impl in ("reference", "reference-compiled"):
        return "reference" if case.impl == "reference" else "reference+torch.compile"
    if case.kind == "e2e":
        backend = resolve("state_update", case.device)[0]
        return f"{backend}+cuda-graph" if case.impl == "graphed" else backend
    return case.impl


def case_info(case) -> dict:
    """What identifies a case in the JSON and in pytest-benchmark's ``extra_info``."""
    shape = case.spec()["shape"] if case.kind == "op" else case.shape
    return {
        "id": case.id,
        "group": case.group,
        "kind": case.kind,
        "impl": case.impl,
        "backend": _backend(case),
        "device": device_name(case.device),
        "dtype": case.dtype,
        "shape": shape,
        "spec": case.spec(),
    }


def measure_case(case, peaks: dict | None = None, **timing) -> dict:
    """Time and memory of one case; ``peaks`` (CUDA, ``{dtype: device_peaks}``) adds the floor (docs/design.md, 'The floor')."""
    record = case_info(case)
    bench = case.build()
    record["time_s"] = measure.time_bench(bench, **timing)
    memory = e2e_graph_bytes(case, bench) or measure.graph_saved_bytes(bench)
    if bench.device.type == "cuda":
        memory["peak_bytes"] = measure.peak_cuda_bytes(bench)
        memory["peak_kind"] = "torch.cuda.max_memory_allocated above the allocation before the pass"
    record["memory"] = memory
    if peaks is not None and case.kind == "op":
        record["floor_s"] = measure.floor_seconds(case, peaks[case.dtype])
    if case.kind == "op" and bench.device.type == "cuda":
        record.update(measure.launch_profile(bench))
    return record


def run_cases(cases, *, peaks=None, rss=True, progress=print, **timing) -> list[dict]:
    """Measure every case (a failing case is recorded with its error); CPU peak RSS in a subprocess.

    Ctrl-C (or ``timeout --signal=INT``) stops at the case in progress and returns the cases
    measured so far, so an interrupted run still reports them.
    """
    records = []
    width = len(str(len(cases)))
    for i, case in enumerate(cases, 1):
        progress(f"[{i:{width}}/{len(cases)}] {case.id} ...", end=" ", flush=True)
        try:
            record = measure_case(case, peaks, **timing)
            progress(report.format_time(record["time_s"]), flush=True)
        except KeyboardInterrupt:
            progress(f"interrupted: reporting the {len(records)} cases measured", flush=True)
            break
        except Exception as exc:  # recorded and shown; the run goes on with the other cases
            record = {**case_info(case), "error": f"{type(exc).__name__}: {exc}"}
            progress(f"ERROR {record['error']}", flush=True)
        records.append(record)
    cases = cases[:len(records)]
    cpu = [(c, r) for c, r in zip(cases, records) if c.device == "cpu" and "error" not in r]
    if rss and cpu:
        progress(f"peak RSS of {len(cpu)} cases in a subprocess ...", flush=True)
        found = measure.peak_rss([c.spec() for c, _ in cpu])
        for case, record in cpu:
            result = found[case.id]
            if "rss_peak_bytes" in result:
                record["memory"]["peak_bytes"] = result["rss_peak_bytes"]
                record["memory"]["peak_kind"] = "peak RSS above the process size before the pass (subprocess)"
            else:
                record["memory"]["peak_error"] = result["rss_error"]
    return records
