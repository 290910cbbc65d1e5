"""Timing, memory and roofline measurements for benchmark cases.

- time: :class:`torch.utils.benchmark.Timer` (its warm-up and block-size estimate, then
  blocks of runs until the time budget is spent, at least ``min_repeats`` blocks, in the
  process's torch thread count); the median is the figure and the interquartile range its
  spread. A case whose IQR exceeds :data:`NOISY_IQR_FRACTION` of its median is timed once
  more; if it is still that wide it is marked noisy. ``Bench.run`` synchronises CUDA.
- memory: bytes of the tensors the autograd graph saves (deduplicated by
  storage; also without the case's inputs and parameters), on every device; on CUDA
  also the peak of ``torch.cuda.max_memory_allocated`` above the memory in use
  before the pass; on the CPU the peak resident set size above the process's size
  before the pass, measured in a worker subprocess (:mod:`dfm_fused.bench.rss_worker`).
- floor (CUDA): ``max(bytes / bandwidth, flops / matmul peak)`` (docs/design.md,
  'The floor') with both peaks measured in the same run.
- launches and device time (CUDA only): one ``run()`` under ``torch.profiler``: the number of
  device operations (kernels, copies, memsets) and their summed duration on the device,
  beside the wall time, and the number of ATen calls the host dispatched. The CPU has no
  launches to count, so the profiler does not run there.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys

import torch

__all__ = [
    "NOISY_IQR_FRACTION",
    "device_peaks",
    "floor_seconds",
    "graph_saved_bytes",
    "launch_profile",
    "peak_cuda_bytes",
    "peak_rss",
    "time_bench",
]


# Relative spread (IQR / median) above which a case is timed again, and marked noisy if it stays.
NOISY_IQR_FRACTION = 0.25


def time_bench(bench, min_repeats: int = 3, budget_s: float = 1.0) -> dict:
    """Wall-clock seconds per ``bench.run()``: ``median``, ``q25``, ``q75``, ``iqr``, ``min``, ``mean``,
    ``stdev`` over ``repeats`` blocks of ``runs_per_block`` runs each (per-run times), ``retimed`` and
    ``noisy`` (see the module docstring)."""
    timing = _timed(bench, min_repeats, budget_s)
    if timing["iqr"] > NOISY_IQR_FRACTION * timing["median"]:
        timing = {**_timed(bench, min_repeats, budget_s), "retimed": True,
                  "first_iqr_fraction": timing["iqr"] / timing["median"]}
    timing["noisy"] = timing["iqr"] > NOISY_IQR_FRACTION * timing["median"]
    return timing


def _timed(bench, min_repeats: int, budget_s: float) -> dict:
    from torch.utils.benchmark import Measurement, Timer

    timer = Timer("run()", globals={"run": bench.run}, num_threads=torch.get_num_threads())
    measurements = [timer.blocked_autorange(min_run_time=budget_s)]
    runs_per_block = measurements[0].number_per_run
    while sum(len(m.times) for m in measurements) < min_repeats:
        measurements.append(timer.timeit(runs_per_block))
    times = Measurement.merge(measurements)[0].times
    q25, q75 = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor([0.25, 0.75], dtype=torch.float64))
    return {
        "median": statistics.median(times),
        "q25": q25.item(),
        "q75": q75.item(),
        "iqr": (q75 - q25).item(),
        "min": min(times),
        "mean": statistics.fmean(times),
        "stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "repeats": len(times),
        "runs_per_block": runs_per_block,
        "retimed": False,
    }


def launch_profile(bench) -> dict:
    """One CUDA ``run()`` (after a warm one) under ``torch.profiler``.

    ``launches``: ``device_ops`` (CUDA kernels, copies and memsets) and ``aten_calls`` (ATen
    operators the host dispatched, nested ones included). ``device_time_s``: the summed device
    duration of those operations, the busy time of the GPU, which the wall time exceeds by the
    host's launch overhead.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if bench.device.type != "cuda":
        raise ValueError(f"launch_profile: expected a CUDA bench; got device {bench.device}")
    bench.run()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        bench.run()
    events = prof.events()
    device_ops = [e for e in events if e.device_type == DeviceType.CUDA]
    aten_calls = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::"))
    return {
        "launches": {"device_ops": len(device_ops), "aten_calls": aten_calls},
        "device_time_s": sum(e.device_time for e in device_ops) / 1e6,
    }


def graph_saved_bytes(bench) -> dict:
    """Bytes of the distinct storages the forward's graph saves for backward.

    ``saved_bytes`` counts all of them; ``saved_activation_bytes`` leaves out the
    case's inputs and parameters (which exist whether or not a graph is kept).
    """
    persistent = {t.untyped_storage().data_ptr() for t in bench.persistent}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = bench.forward()
    del out
    return {
        "saved_bytes": sum(seen.values()),
        "saved_activation_bytes": sum(n for ptr, n in seen.items() if ptr not in persistent),
    }


def peak_cuda_bytes(bench) -> int:
    """Peak CUDA memory allocated by one ``run()`` above what was allocated before it."""
    gc.collect()
    torch.cuda.synchronize(bench.device)
    torch.cuda.reset_peak_memory_stats(bench.device)
    base = torch.cuda.memory_allocated(bench.device)
    bench.run()
    return torch.cuda.max_memory_allocated(bench.device) - base


def peak_rss(specs: list[dict], timeout_s: float = 1800) -> dict[str, dict]:
    """``{case id: {"rss_peak_bytes": int} or {"rss_error": str}}`` from one worker subprocess.

    The worker uses a fixed glibc mmap threshold so that freed tensors go back to
    the system and the peak of each case is measured from the process's current size.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run(
        [sys.executable, "-m", "dfm_fused.bench.rss_worker"],
        input=json.dumps(specs), capture_output=True, text=True, env=env, timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"peak RSS worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def device_peaks(device: torch.device, dtype: torch.dtype) -> dict:
    """Copy bandwidth (bytes/s, read + write) and matmul throughput (flop/s) in ``dtype``, measured now."""
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * src.nbytes / _best_cuda_time(lambda: dst.copy_(src), device)
    del src, dst
    k = 8192
    a = torch.randn(k, k, device=device).to(dtype)
    b = torch.randn(k, k, device=device).to(dtype)
    matmul = 2 * k**3 / _best_cuda_time(lambda: a @ b, device)
    return {"bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": matmul, "matmul_dtype": str(dtype).split(".")[-1],
            "allow_tf32": torch.backends.cuda.matmul.allow_tf32}


def _best_cuda_time(fn, device, repeats: int = 10) -> float:
    fn()
    torch.cuda.synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


def op_traffic(case) -> tuple[int, int]:
    """Minimal (bytes moved, flops) of an op case (docs/design.md, 'The floor'), forward or forward + backward.

    ``state_update`` forward reads y and h and writes h (3 C P elements) with one
    C x C matrix per pixel (2 C^2 P flops); its backward reads the upstream
    gradient and y, writes grad y (3 C P) and runs two more C x C products (grad
    n = M g and A = n g^T). ``exp_decay`` is the same without h. ``feedback_input``
    is a copy: it reads x and the fed-back slice, writes the concatenation; its
    backward reads the softmax part of the gradient and the slice and writes the
    slice's gradient (``grad x`` is a view). ``StateUpdate`` (the module's scalar-decay
    path) moves the bytes of ``state_update`` with no per-pixel product.
    """
    s, e = case.shape, torch.empty((), dtype=getattr(torch, case.dtype)).element_size()
    P, C = s.B * s.H * s.W, s.C
    bwd = case.mode == "fwd+bwd"
    if case.op == "StateUpdate":
        # The scalar-decay path: no C x C product per pixel; backward forms A = n g^T and Q (A + A^T).
        return (6 if bwd else 3) * C * P * e, (2 * C * C * P + 2 * C**3) if bwd else 0
    if case.op == "state_update":
        return (6 if bwd else 3) * C * P * e, (6 if bwd else 2) * C * C * P
    if case.op == "exp_decay":
        return (5 if bwd else 2) * C * P * e, (6 if bwd else 2) * C * C * P
    Pf = s.B * s.fH * s.fW
    elements = s.Cx * Pf + s.fb * P + (s.Cx + s.fb) * Pf
    if bwd:
        elements += s.fb * Pf + 2 * s.fb * P
    return elements * e, 0


def floor_seconds(case, peaks: dict) -> float:
    """The floor (docs/design.md, 'The floor'): ``max(bytes / bandwidth, flops / matmul peak)``."""
    nbytes, flops = op_traffic(case)
    return max(nbytes / peaks["bandwidth_bytes_per_s"], flops / peaks["matmul_flops_per_s"])
