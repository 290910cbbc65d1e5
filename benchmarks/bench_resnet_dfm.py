"""ResNet18-DFM training step in the three ``unroll`` modes against the reference transcription.

One training step = forward over T steps, cross-entropy, backward, SGD step: the end-to-end
case of ``python -m dfm_fused.bench`` (:class:`dfm_fused.bench.cases.E2ECase`, ``fb_filters=16``,
200 classes). Implementations: ``reference`` (plain graph of the literal transcription),
``fused`` (``checkpoint=True``, full recompute), ``fused-selective`` (``checkpoint="selective"``)
and ``fused-nockpt`` (``checkpoint=False``, the plain graph).

For each T the implementations are timed interleaved in this one process (wall clock and
process CPU time, which a shared machine disturbs less), so that load changes hit all alike.
Graph memory: the bytes the forward allocates and leaves alive for backward
(:func:`dfm_fused.bench.memory.forward_live_bytes`). Peak memory: on the CPU the peak resident
set size of one training step in a subprocess (:func:`dfm_fused.bench.measure.peak_rss`) at
``--rss-T``; on CUDA ``max_memory_allocated``. The summary gives the ratios that the
memory-saving targets of docs/design.md ('Targets') use: time against the plain graph, graph
against the plain graph and against its T=1 graph, peak against the reference.

    python benchmarks/bench_resnet_dfm.py --out benchmarks/results/cpu_<date>/resnet18_dfm_modes.json
    python benchmarks/bench_resnet_dfm.py --device cuda --batch 64 --size 224 --T 1 5 8 --dtype bfloat16
"""
from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import torch

from dfm_fused.bench import measure
from dfm_fused.bench.cases import E2ECase
from dfm_fused.bench.memory import e2e_graph_bytes

IMPLS = ("reference", "fused", "fused-selective", "fused-nockpt")
PLAIN = "fused-nockpt"


def _case(impl, T, args) -> E2ECase:
    return E2ECase("resnet18", impl, T, args.batch, (args.size, args.size), args.dtype, args.device)


def _time_interleaved(benches: dict, repeats: int, sync) -> dict:
    wall = {impl: [] for impl in benches}
    cpu = {impl: [] for impl in benches}
    for bench in benches.values():  # warm-up
        bench.run()
    for _ in range(repeats):
        for impl, bench in benches.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            bench.run()
            sync()
            wall[impl].append(time.perf_counter() - t0)
            cpu[impl].append(time.process_time() - c0)
    return {impl: {"median_s": statistics.median(wall[impl]), "times_s": wall[impl],
                   "median_cpu_s": statistics.median(cpu[impl]), "cpu_times_s": cpu[impl]} for impl in benches}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="float32, or bfloat16/float16 for autocast")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--T", type=int, nargs="+", default=[1, 5], help="T values timed (the first is the T=1 graph)")
    parser.add_argument("--rss-T", type=int, nargs="*", default=[4, 8], help="T values of the CPU peak-RSS runs")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    machine = platform.processor() or platform.machine()
    config = vars(args) | {"torch": torch.__version__, "machine": machine, "impls": list(IMPLS)}
    results = {"config": config, "runs": {}}
    runs = results["runs"]
    for T in args.T:
        cases = {impl: _case(impl, T, args) for impl in IMPLS}
        benches = {impl: case.build() for impl, case in cases.items()}
        timed = _time_interleaved(benches, args.repeats, sync)
        for impl, case in cases.items():
            graph = e2e_graph_bytes(case, benches[impl])
            run = {"impl": impl, "T": T, **timed[impl], "graph_bytes": graph["saved_activation_bytes"]}
            if cuda:
                run["peak_bytes"] = measure.peak_cuda_bytes(benches[impl])
                run["peak_kind"] = "torch.cuda.max_memory_allocated above the allocation before the step"
            runs[f"{impl}/T={T}"] = run
        del benches
    if not cuda and args.rss_T:
        specs = [_case(impl, T, args).spec() for T in args.rss_T for impl in IMPLS]
        found = measure.peak_rss(specs)
        for T in args.rss_T:
            for impl in IMPLS:
                result = found[_case(impl, T, args).id]
                entry = runs.setdefault(f"{impl}/T={T}", {"impl": impl, "T": T})
                entry["peak_bytes"] = result.get("rss_peak_bytes")
                entry["peak_kind"] = "peak RSS of one training step above the process size before it (subprocess)"
                if "rss_error" in result:
                    entry["peak_error"] = result["rss_error"]
    results["summary"] = summarize(runs, args.T)
    device_type = args.device.split(":")[0]
    out = pathlib.Path(args.out or pathlib.Path("bench_results") / f"resnet18_dfm_modes_{device_type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"{'impl':<17}{'T':>3}{'median s':>10}{'cpu s':>8}{'graph MiB':>11}{'peak MiB':>10}")
    for r in runs.values():
        cells = [_cell(r.get(k), w, ".3f") for k, w in (("median_s", 10), ("median_cpu_s", 8))]
        cells += [_cell(r[k] / 2**20 if r.get(k) is not None else None, w, ".2f")
                  for k, w in (("graph_bytes", 11), ("peak_bytes", 10))]
        print(f"{r['impl']:<17}{r['T']:>3}{''.join(cells)}")
    for key, value in results["summary"].items():
        print(f"{key}: {json.dumps(value)}")
    print(f"written: {out}")


def _cell(value, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def summarize(runs: dict, timed_T) -> dict:
    """Ratios per T: time and CPU time (medians, and fastest repeats) against the plain graph,
    graph against the plain graph and the plain graph at the smallest T, peak against the
    reference (where measured)."""
    summary = {}
    T1 = min(timed_T)
    for key, r in runs.items():
        T, impl = r["T"], r["impl"]
        plain, ref = runs.get(f"{PLAIN}/T={T}", {}), runs.get(f"reference/T={T}", {})
        ratios = {}
        if "median_s" in r and "median_s" in plain:
            ratios["time_vs_plain"] = r["median_s"] / plain["median_s"]
            ratios["cpu_time_vs_plain"] = r["median_cpu_s"] / plain["median_cpu_s"]
            # Other jobs only add time: the fastest repeats are the least disturbed.
            ratios["min_cpu_time_vs_plain"] = min(r["cpu_times_s"]) / min(plain["cpu_times_s"])
        if "graph_bytes" in r and "graph_bytes" in plain:
            ratios["graph_vs_plain"] = r["graph_bytes"] / plain["graph_bytes"]
            ratios[f"graph_vs_plain_T{T1}"] = r["graph_bytes"] / runs[f"{PLAIN}/T={T1}"]["graph_bytes"]
        if r.get("peak_bytes") is not None and ref.get("peak_bytes"):
            ratios["peak_vs_reference"] = r["peak_bytes"] / ref["peak_bytes"]
        summary[key] = ratios
    return summary


if __name__ == "__main__":
    main()
