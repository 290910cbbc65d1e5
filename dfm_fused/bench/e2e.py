"""The end-to-end target settings (docs/design.md, 'Targets') as cases, and the GPU's busy fraction.

``python -m dfm_fused.bench.e2e --out busy.json`` measures, on CUDA, the fraction of
each target case's wall time that the GPU is busy (profiler kernel and copy
intervals, merged, over ``perf_counter`` time of the same iterations).
"""
from __future__ import annotations

import torch

from dfm_fused.bench import runner
from dfm_fused.bench.e2e_cases import E2E_ALL_IMPLS, E2ECase

__all__ = ["CPU_TARGETS", "TARGETS", "busy_fraction", "merged_length", "target_e2e_cases"]

# The end-to-end target settings (docs/design.md, 'Targets'): (mode, B, image, T).
# ResNet18-DFM fb_filters=16, 200 classes, float32.
TARGETS = (("train", 128, (64, 64), 5), ("eval", 8, (64, 64), 8), ("train", 64, (224, 224), 5))
# The CPU cannot capture graphs and compiles slowly: a scaled-down smoke of the eager ones.
CPU_TARGETS = (("train", 2, (64, 64), 2), ("eval", 2, (64, 64), 2))


def target_e2e_cases(device_type: str, dtype: str = "float32", impls=None) -> list:
    """The end-to-end target cases (every implementation at each setting); scaled down on the CPU."""
    if impls is None:
        impls = E2E_ALL_IMPLS if device_type == "cuda" else ("reference", "fused", "fused-selective", "fused-nockpt")
    targets = TARGETS if device_type == "cuda" else CPU_TARGETS
    return [E2ECase("resnet18", impl, T, B, image, dtype, device_type, mode)
            for mode, B, image, T in targets for impl in impls]


def merged_length(intervals) -> float:
    """Total length covered by ``(start, end)`` intervals, overlaps counted once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def busy_fraction(bench, iterations: int = 10) -> dict:
    """GPU busy time over wall time of ``iterations`` runs of a built CUDA case, under ``torch.profiler``."""
    import time

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    bench.run()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize(bench.device)
        start = time.perf_counter()
        for _ in range(iterations):
            bench.run()
        wall_us = (time.perf_counter() - start) * 1e6
    device = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy_us = merged_length(device)
    return {"busy_fraction": busy_us / wall_us, "busy_us": busy_us, "wall_us": wall_us, "iterations": iterations,
            "device_events": len(device)}


def main(argv=None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m dfm_fused.bench.e2e", description=__doc__.split("\n\n")[-1])
    parser.add_argument("--out", required=True, help="JSON path")
    parser.add_argument("--impls", default="reference,fused,graphed", help="comma-separated implementations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("busy fractions need a CUDA device")
    records = []
    for case in target_e2e_cases("cuda", impls=args.impls.split(",")):
        record = runner.case_info(case)
        try:
            record.update(busy_fraction(case.build()))
            print(f"{case.id}: GPU busy {record['busy_fraction']:.1%} of wall time", flush=True)
        except Exception as exc:  # recorded; the other cases still run
            record["error"] = f"{type(exc).__name__}: {exc}"
            print(f"{case.id}: ERROR {record['error']}", flush=True)
        records.append(record)
    with open(args.out, "w") as f:
        json.dump({"meta": runner.environment("cuda"), "cases": records}, f, indent=1)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
