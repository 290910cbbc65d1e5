"""Subprocess that measures the peak resident set size of benchmark cases on the CPU.

Reads a JSON list of case specs on stdin, prints ``{case id: result}`` as one JSON
line. Per case: build, run once (allocator and kernel warm-up), reset the
kernel's high-water mark (``/proc/self/clear_refs``), run again and report
``VmHWM`` minus ``VmRSS`` before that run (at least 0). Started by
:func:`dfm_fused.bench.measure.peak_rss` with a fixed glibc mmap threshold so
that freed tensors leave the process.
"""
from __future__ import annotations

import gc
import json
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _measure(case) -> dict:
    bench = case.build()
    bench.run()
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        return {"rss_error": f"cannot reset the peak RSS (/proc/self/clear_refs: {exc})"}
    base = _status_kib("VmRSS")
    bench.run()
    # The kernel counts RSS per thread and folds the counts in lazily, so a run that adds
    # nothing can read a few pages below its base: that is "no growth", not a negative peak.
    return {"rss_peak_bytes": max(_status_kib("VmHWM") - base, 0) * 1024}


def main() -> None:
    from dfm_fused.bench.cases import case_from_spec

    results = {}
    for spec in json.load(sys.stdin):
        case = case_from_spec(spec)
        try:
            results[case.id] = _measure(case)
        except Exception as exc:  # reported per case, the other cases still run
            results[case.id] = {"rss_error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
