"""ResNet18-DFM training step: fused (memory saving on / off) against the reference transcription.

One training step = forward over T steps, loss, backward. For each variant and T it records
the median step time (wall clock, and process CPU time, which a shared machine disturbs
less) over interleaved repeats and activation memory measured with
``saved_tensors_hooks``: the bytes the forward keeps for backward and the peak of live saved
bytes over forward and backward (which counts the memory-saving replays), plus on CUDA the
peak allocated bytes.
Ratios are against the reference measured in the same process.

    python benchmarks/bench_resnet_dfm.py                       # CPU, writes benchmarks/results/resnet18_dfm_<device>.json
    python benchmarks/bench_resnet_dfm.py --device cuda --batch 32
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import torch

from dfm_fused import models
from dfm_fused.models.reference import ReferenceResNet18

VARIANTS = ("reference", "fused-memory-saving", "fused-full-graph")


def build(variant: str, args):
    torch.manual_seed(0)
    cls = ReferenceResNet18 if variant == "reference" else models.ResNet18
    kwargs = {} if variant == "reference" else {"checkpoint": variant == "fused-memory-saving"}
    model = cls(fb_filters=args.fb, n_classes=10, shape=(args.size, args.size), **kwargs).to(args.device).train()
    return model


def step(model, x, y, T):
    model.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x, T, atol=-1.0) if isinstance(model, ReferenceResNet18)
                                             else model(x, T), y)
    loss.backward()
    return loss


class _Saved:
    """A tensor saved for backward; counts its bytes as live until autograd frees it."""

    live = peak = 0

    def __init__(self, t):
        self.t, self.nbytes = t, t.numel() * t.element_size()
        _Saved.live += self.nbytes
        _Saved.peak = max(_Saved.peak, _Saved.live)

    def __del__(self):
        _Saved.live -= self.nbytes


def graph_bytes(model, x, y, T) -> tuple[int, int]:
    """(bytes the forward keeps for backward, peak live saved bytes over forward + backward).

    The peak includes the steps the memory-saving backward replays, one at a time.
    """
    model.zero_grad(set_to_none=True)
    _Saved.live = _Saved.peak = 0
    with torch.autograd.graph.saved_tensors_hooks(_Saved, lambda s: s.t):
        loss = torch.nn.functional.cross_entropy(model(x, T, atol=-1.0) if isinstance(model, ReferenceResNet18)
                                                 else model(x, T), y)
        after_forward = _Saved.live
        loss.backward()
    del loss
    return after_forward, _Saved.peak


def peak_cuda_bytes(model, x, y, T) -> int | None:
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(model, x, y, T)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fb", type=int, default=16)
    parser.add_argument("--T", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)
    built = {v: build(v, args) for v in VARIANTS}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    results = {"config": vars(args) | {"torch": torch.__version__, "machine": platform.processor() or platform.machine()},
               "runs": {}}
    for T in args.T:
        times = {v: [] for v in VARIANTS}
        cpu_times = {v: [] for v in VARIANTS}
        for v in VARIANTS:  # warm-up
            step(built[v], x, y, T)
        for _ in range(args.repeats):  # interleaved so that load changes hit every variant alike
            for v in VARIANTS:
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                step(built[v], x, y, T)
                sync()
                times[v].append(time.perf_counter() - t0)
                cpu_times[v].append(time.process_time() - c0)
        for v in VARIANTS:
            kept, peak = graph_bytes(built[v], x, y, T)
            results["runs"][f"{v}/T={T}"] = {
                "graph_bytes": kept, "peak_saved_bytes": peak,
                "variant": v, "T": T, "median_s": statistics.median(times[v]), "times_s": times[v],
                "median_cpu_s": statistics.median(cpu_times[v]), "cpu_times_s": cpu_times[v],
                "cuda_peak_bytes": peak_cuda_bytes(built[v], x, y, T),
            }
    runs = results["runs"]
    summary = {}
    for T in args.T:
        ref = runs[f"reference/T={T}"]
        for v in VARIANTS[1:]:
            r = runs[f"{v}/T={T}"]
            summary[f"{v}/T={T}"] = {"time_vs_reference": r["median_s"] / ref["median_s"],
                                     "cpu_time_vs_reference": r["median_cpu_s"] / ref["median_cpu_s"],
                                     "peak_saved_bytes_vs_reference": r["peak_saved_bytes"] / ref["peak_saved_bytes"]}
    lo, hi = min(args.T), max(args.T)
    for v in VARIANTS:
        summary[f"{v}/peak_saved_bytes_T{hi}_vs_T{lo}"] = (
            runs[f"{v}/T={hi}"]["peak_saved_bytes"] / runs[f"{v}/T={lo}"]["peak_saved_bytes"]
        )
    results["summary"] = summary
    out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results" / f"resnet18_dfm_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"{'variant':<22}{'T':>3}{'median s':>10}{'cpu s':>8}{'kept MiB':>10}{'peak MiB':>10}")
    for r in runs.values():
        print(f"{r['variant']:<22}{r['T']:>3}{r['median_s']:>10.3f}{r['median_cpu_s']:>8.3f}"
              f"{r['graph_bytes'] / 2**20:>10.1f}{r['peak_saved_bytes'] / 2**20:>10.1f}")
    for k, v in summary.items():
        print(f"{k}: {json.dumps(v) if isinstance(v, dict) else round(v, 3)}")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
