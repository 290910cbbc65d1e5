"""Benchmark of the C++/CUDA extension (``cpp`` on CPU, ``cuda`` on GPU) against ``reference`` and ``torch``.

Forward + backward of ``state_update`` (B=8, C=520, 16x16, 8 groups) and ``feedback_input``
(B=8, Cx=64, fb=16, 56x56 output from a 7x7 state with 528 channels), every backend timed
in the same process, interleaved, median of ``--repeat`` runs after warm-up. Prints a table
and writes JSON to ``benchmarks/results/extension_<device>_<cpu or gpu>_<date>.json``.

Usage: PYTHONPATH=. python benchmarks/bench_extension.py [--device cpu|cuda] [--repeat 15] [--threads N] [--out PATH]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import dfm_fused
from dfm_fused import _extension

BACKENDS = {"cpu": ("reference", "torch", "cpp"), "cuda": ("reference", "torch", "cuda")}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown-cpu"


def _state_update_case(device):
    B, C, H, W, groups = 8, 520, 16, 16, 8
    h = torch.randn(B, C, H, W, device=device, requires_grad=True)
    y = torch.randn(B, C, H, W, device=device, requires_grad=True)
    Q = torch.linalg.qr(torch.randn(C, C))[0].to(device).requires_grad_()
    S = (torch.rand(C) + 0.5).to(device)
    g = torch.randn(B, C, H, W, device=device)

    def step(backend):
        out = dfm_fused.state_update(h, y, Q, S, 2.0, 0.1, 1.0, groups, 1e-5, backend=backend)
        return torch.autograd.grad(out, (h, y, Q), g)

    return {"B": B, "C": C, "H": H, "W": W, "groups": groups}, step


def _feedback_input_case(device):
    B, Cx, fb, H, W, Ch, h_size, groups = 8, 64, 16, 56, 56, 528, 7, 8
    x = torch.randn(B, Cx, H, W, device=device, requires_grad=True)
    h = torch.randn(B, Ch, h_size, h_size, device=device, requires_grad=True)
    g = torch.randn(B, Cx + fb, H, W, device=device)

    def step(backend):
        out = dfm_fused.feedback_input(x, h, 512, fb, groups, 1e-5, backend=backend)
        return torch.autograd.grad(out, (x, h), g)

    return {"B": B, "Cx": Cx, "fb": fb, "H": H, "W": W, "state": [Ch, h_size, h_size], "groups": groups}, step


def _time(step, backend, repeat, device):
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(backend)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    backends = BACKENDS[device]
    _extension.require(device)
    torch.manual_seed(0)
    results = {}
    for name, make in (("state_update", _state_update_case), ("feedback_input", _feedback_input_case)):
        shape, step = make(device)
        for backend in backends:
            _time(step, backend, args.warmup, device)
        samples = {b: [] for b in backends}
        for _ in range(args.repeat):  # interleaved so that machine noise hits every backend alike
            for backend in backends:
                samples[backend] += _time(step, backend, 1, device)
        ms = {b: statistics.median(s) * 1e3 for b, s in samples.items()}
        results[name] = {
            "shape": shape,
            "median_ms": ms,
            "min_ms": {b: min(s) * 1e3 for b, s in samples.items()},
            "speedup_vs_reference": {b: ms["reference"] / ms[b] for b in backends},
            "speedup_vs_torch": {b: ms["torch"] / ms[b] for b in backends},
        }
        print(f"{name} forward+backward {shape}")
        for b in backends:
            print(f"  {b:10s} {ms[b]:9.2f} ms   x{ms['reference'] / ms[b]:5.2f} vs reference   "
                  f"x{ms['torch'] / ms[b]:5.2f} vs torch")
    cpu = _cpu_model()
    gpu = torch.cuda.get_device_name() if device == "cuda" else None
    record = {
        "benchmark": f"extension_{device}",
        "device": device,
        "gpu": gpu,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu,
        "threads": torch.get_num_threads(),
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
