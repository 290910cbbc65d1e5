"""Forward + backward of the Triton ``state_update`` and ``feedback_input`` against the reference.

Run (CUDA only; skipped otherwise)::

    PYTHONPATH=. python -m pytest benchmarks/bench_triton_ops.py --benchmark-json=out.json

Each case times one implementation (``triton``, ``reference``, ``compiled``:
``torch.compile`` of the reference) with pytest-benchmark. Every case also
records in ``extra_info``: the device, dtype, shape, the ideal bytes and flops
of forward + backward, the floor ``max(bytes / bandwidth, flops / matmul peak)``
with bandwidth and matmul peak measured in this run, ``floor_fraction`` (floor /
measured time, 1.0 is the floor), and for ``triton`` the speedups over the
reference and the compiled reference, timed in this process with CUDA events.
``DFM_BENCH_DTYPES`` (default ``float32,bfloat16``) picks the dtypes.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from dfm_fused import functional, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="benchmarks need a CUDA GPU")

DTYPES = [getattr(torch, name) for name in os.environ.get("DFM_BENCH_DTYPES", "float32,bfloat16").split(",")]
IMPLS = ["triton", "reference", "compiled"]

# name: (B, C, H, W, groups) of the state.
STATE_SHAPES = {"resnet18": (64, 520, 7, 7, 8), "deeplab": (8, 258, 128, 128, 258)}
# name: (B, Cx, H, W, Ch, Hi, Wi, offset, fb, groups).
FEEDBACK_SHAPES = {
    "resnet18": (64, 64, 56, 56, 520, 7, 7, 512, 8, 8),
    "deeplab": (8, 64, 256, 256, 258, 128, 128, 256, 2, 2),
}


def cuda_time(fn, reps: int = 10, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


@functools.lru_cache(maxsize=None)
def bandwidth() -> float:
    """Device memory bandwidth in bytes/s: a 1 GiB device-to-device copy (read + write)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / cuda_time(lambda: dst.copy_(src))


@functools.lru_cache(maxsize=None)
def matmul_peak(dtype: torch.dtype, tf32: bool) -> float:
    """Dense matmul flop/s for ``dtype`` under the current TF32 setting (8192^3 GEMM)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    return 2 * n**3 / cuda_time(lambda: a @ b, reps=10)


def _tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


def _impl(impl: str, op: str, dtype: torch.dtype):
    if impl == "triton":
        return functools.partial(getattr(functional, op), backend="triton")
    ref = getattr(reference, op)
    ref = torch.compile(ref, dynamic=False) if impl == "compiled" else ref
    if dtype == torch.float32:
        return ref

    # In half precision the reference mixes the state's dtype with float32 Q: it runs under
    # autocast, as a model of it would.
    def autocast_ref(*args):
        with torch.autocast("cuda", dtype=dtype):
            return ref(*args)
    return autocast_ref


def _state_case(name, dtype):
    B, C, H, W, groups = STATE_SHAPES[name]
    Q = torch.linalg.qr(torch.randn(C, C, device="cuda"))[0].requires_grad_()
    S = torch.rand(C, device="cuda") + 0.5
    h = torch.randn(B, C, H, W, device="cuda", dtype=dtype).requires_grad_()
    y = torch.randn(B, C, H, W, device="cuda", dtype=dtype).requires_grad_()
    size = torch.finfo(dtype).bits // 8
    P = B * H * W
    # Ideal traffic: forward reads y, h and writes the state; backward reads g, y and writes grad_y
    # (grad_h is g itself). Flops: M y, M g and sum y g^T, 2 C^2 P each.
    cost = {"bytes": 6 * C * P * size, "flops": 6 * C * C * P}
    args = lambda fn: fn(h, y, Q, S, 2.0, 0.1, 1.0, groups, 1e-5)  # noqa: E731
    return (h, y, Q), args, cost, {"B": B, "C": C, "H": H, "W": W, "groups": groups}


def _feedback_case(name, dtype):
    B, Cx, H, W, Ch, Hi, Wi, offset, fb, groups = FEEDBACK_SHAPES[name]
    x = torch.randn(B, Cx, H, W, device="cuda", dtype=dtype).requires_grad_()
    h = torch.randn(B, Ch, Hi, Wi, device="cuda", dtype=dtype).requires_grad_()
    size = torch.finfo(dtype).bits // 8
    # Forward reads x and the fed-back slice, writes the output; backward reads the fb part of the
    # gradient and writes grad_h (grad_x is a view). The resize/norm/softmax flops are negligible.
    cost = {
        "bytes": size * (B * Cx * H * W + B * fb * Hi * Wi + B * (Cx + fb) * H * W + B * fb * H * W + B * Ch * Hi * Wi),
        "flops": 0,
    }
    args = lambda fn: fn(x, h, offset, fb, groups, 1e-5)  # noqa: E731
    shape = {"B": B, "Cx": Cx, "H": H, "W": W, "Ch": Ch, "Hi": Hi, "Wi": Wi, "offset": offset, "fb": fb,
             "groups": groups}
    return (x, h), args, cost, shape


CASES = {"state_update": _state_case, "feedback_input": _feedback_case}


def _step(fn, inputs, args):
    def step():
        for t in inputs:
            t.grad = None
        out = args(fn)
        out.backward(torch.ones_like(out))
    return step


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["resnet18", "deeplab"])
@pytest.mark.parametrize("op", list(CASES))
def test_fwd_bwd(benchmark, op, name, dtype, impl):
    torch.manual_seed(0)
    inputs, args, cost, shape = CASES[op](name, dtype)
    step = _step(_impl(impl, op, dtype), inputs, args)
    seconds = cuda_time(step)

    def timed():
        step()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=10, iterations=1, warmup_rounds=1)
    bw = bandwidth()
    peak = matmul_peak(torch.float32 if dtype == torch.float32 else dtype, _tf32())
    floor = max(cost["bytes"] / bw, cost["flops"] / peak)
    info = {
        "device": torch.cuda.get_device_name(),
        "op": op,
        "impl": impl,
        "dtype": str(dtype),
        "shape": shape,
        "tf32": _tf32(),
        "bytes": cost["bytes"],
        "flops": cost["flops"],
        "bandwidth_GBps": bw / 1e9,
        "matmul_peak_TFLOPs": peak / 1e12,
        "median_ms": seconds * 1e3,
        "floor_ms": floor * 1e3,
        "floor_fraction": floor / seconds,
    }
    if impl == "triton":
        for other in ("reference", "compiled"):
            other_step = _step(_impl(other, op, dtype), inputs, args)
            info[f"speedup_vs_{other}"] = cuda_time(other_step) / seconds
    benchmark.extra_info.update(info)
