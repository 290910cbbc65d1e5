"""Benchmark of the C++/CUDA extension (``cpp`` on CPU, ``cuda`` on GPU) against ``reference`` and ``torch``.

Forward + backward, every implementation timed in the same process, interleaved (one run of
each in turn, ``--repeat`` rounds after warm-up), median per implementation:

- ``StateUpdate``: the module in training after its QR at t=0 (the scalar-decay path,
  docs/design.md 'Scalar decay'; gradients for h, y and Q) against the reference's ``h + StateExpDecay(GroupNorm(y), t)``;
- ``state_update`` (the general path) and ``feedback_input``;

at the operating point (B=128, 528x2x2 state, ``feedback_input`` 16x16 from 2x2), at B=8,
520x16x16 (8 groups), and ``feedback_input`` at the CPU ResNet18 preset (56x56 from 520x7x7).
The cases are :class:`dfm_fused.bench.cases.OpCase` builds, as in ``python -m dfm_fused.bench``.
Prints a table and writes JSON to ``benchmarks/results/extension_<device>_<cpu or gpu>_<date>.json``.

Usage: PYTHONPATH=. python benchmarks/bench_extension.py [--device cpu|cuda] [--repeat 15] [--threads N]
       [--compile] [--out PATH]

On the CPU, glibc's malloc gives blocks above its mmap threshold back to the system when they are
freed, so a large output (``feedback_input``'s is 10 MiB at the operating point) can be
page-faulted in afresh on every call: about 2 ms on this machine, added to every implementation
alike in some runs and not others. ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296``
in the environment keeps such blocks in the heap; the JSON records the ``MALLOC_*`` variables a
run had (``malloc_env``; empty: glibc's defaults).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import statistics
import time
from pathlib import Path

import torch

from dfm_fused import _extension
from dfm_fused.bench import cases as C
from dfm_fused.bench.runner import cpu_model

BACKENDS = {"cpu": ("reference", "torch", "cpp"), "cuda": ("reference", "torch", "cuda")}
B8_16x16 = dataclasses.replace(C.CPU_SHAPES["resnet18"], name="B8-520x16x16", H=16, W=16)
CASES = [
    ("StateUpdate", C.OPERATING_POINT),
    ("state_update", C.OPERATING_POINT),
    ("feedback_input", C.OPERATING_POINT),
    ("StateUpdate", B8_16x16),
    ("state_update", B8_16x16),
    ("feedback_input", C.CPU_SHAPES["resnet18"]),
]




def _time(bench) -> float:
    start = time.perf_counter()
    bench.run()  # synchronises CUDA
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--compile", action="store_true", help="also time reference-compiled (torch.compile)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    impls = (*BACKENDS[device], *(("reference-compiled",) if args.compile else ()))
    _extension.require(device)
    load_before = os.getloadavg()
    results = {}
    for op, shape in CASES:
        benches = {impl: C.OpCase(op, "fwd+bwd", impl, shape, "float32", device).build() for impl in impls}
        for bench in benches.values():
            for _ in range(args.warmup):
                bench.run()
        samples = {impl: [] for impl in impls}
        for _ in range(args.repeat):  # interleaved so that machine noise hits every implementation alike
            for impl, bench in benches.items():
                samples[impl].append(_time(bench))
        ms = {impl: statistics.median(s) * 1e3 for impl, s in samples.items()}
        name = f"{op} {shape.name}"
        results[name] = {
            "op": op,
            "shape": dataclasses.asdict(shape),
            "median_ms": ms,
            "min_ms": {impl: min(s) * 1e3 for impl, s in samples.items()},
            "speedup_vs_reference": {impl: ms["reference"] / ms[impl] for impl in impls},
            "speedup_vs_torch": {impl: ms["torch"] / ms[impl] for impl in impls},
        }
        print(f"{name} forward+backward {shape.label()}")
        for impl in impls:
            print(f"  {impl:18s} {ms[impl]:9.2f} ms   x{ms['reference'] / ms[impl]:5.2f} vs reference   "
                  f"x{ms['torch'] / ms[impl]:5.2f} vs torch", flush=True)
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    record = {
        "benchmark": f"extension_{device}",
        "device": device,
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "load_average_before": load_before,  # 1, 5, 15 minutes; the machine is shared
        "load_average_after": os.getloadavg(),
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        "torch": torch.__version__,
        "build": _extension.build_info(),
        "repeat": args.repeat,
        "results": results,
    }
    out = args.out
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu or cpu).strip("-").lower()
        out = Path(__file__).parent / "results" / f"extension_{device}_{slug}_{datetime.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
