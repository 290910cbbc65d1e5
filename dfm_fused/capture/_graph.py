"""Warm-up and capture on one side stream, and the QR probe.

Both the warm-up and the capture run on the same side stream (the capture
stream), as ``torch.cuda.make_graphed_callables`` and mamba's ``capture_graph``
warm up before capturing: lazy initialisation (cuBLAS/cuDNN handles and
workspaces, which are per stream, Triton autotuning, optimizer state) then
happens outside the graph. The first warm-up iteration runs unchecked, for that
lazy work; the others run with host syncs raising and CPU tensors refused
(:func:`dfm_fused.capture._guards.no_host_sync`).
"""
from __future__ import annotations

from typing import Callable

import torch

from dfm_fused.capture._guards import CaptureError, explain, no_host_sync

__all__ = ["capture", "decay_sizes", "probe_qr", "probe_training_qr", "warm_up"]


def warm_up(api: str, fn: Callable[[int], object], iterations: int, stream, device: torch.device) -> None:
    """``fn(i)`` for ``i < iterations`` on ``stream``; all but the first checked for host syncs and CPU tensors."""
    current = torch.cuda.current_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        fn(0)
        for i in range(1, iterations):
            with no_host_sync(api, device, f"warm-up iteration {i + 1} of {iterations}"):
                fn(i)
    current.wait_stream(stream)


def capture(api: str, fn: Callable[[], object], stream, mode: str, what: str):
    """``(graph, outputs of fn)``: ``fn`` captured on ``stream`` into a new graph with its own memory pool."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, stream=stream, capture_error_mode=mode):
            outputs = fn()
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(explain(api, f"capturing {what}", exc)) from exc
    return graph, outputs


def decay_sizes(model: torch.nn.Module) -> list[int]:
    """Sizes of the ``Q`` matrices that ``model``'s decay modules re-orthogonalise by QR in training."""
    from dfm_fused.modules import _DecayParameters
    from dfm_fused.reference import StateExpDecay as ReferenceStateExpDecay

    kinds = (_DecayParameters, ReferenceStateExpDecay)
    return sorted({int(m.Q.shape[0]) for m in model.modules() if isinstance(m, kinds)})


def probe_qr(api: str, size: int, device: torch.device, stream, mode: str) -> str:
    """Capture ``torch.linalg.qr(A, mode="complete")`` of a ``size x size`` float32 matrix, replay it
    on new values and compare with eager. Returns a note; raises :class:`CaptureError` if the QR
    (cuSOLVER) cannot be captured or its replay differs from eager."""
    generator = torch.Generator(device=device).manual_seed(size)
    a = torch.randn(size, size, device=device, generator=generator)
    try:
        warm_up(api, lambda i: torch.linalg.qr(a, mode="complete"), 2, stream, device)
        graph, q = capture(api, lambda: torch.linalg.qr(a, mode="complete")[0], stream, mode, f"a {size}x{size} QR")
    except CaptureError as exc:
        raise CaptureError(
            f"{exc}\nThe training-mode re-orthogonalisation of Q at t=0 (torch.linalg.qr) could not be captured on "
            "this device. Running it eagerly before each replay needs dfm_fused's decay modules to skip it inside "
            "the graph, which they do not offer yet; capture the model in eval mode or train it eagerly."
        ) from exc.__cause__
    with torch.no_grad():
        a.copy_(torch.randn(size, size, device=device, generator=generator))
        expected = torch.linalg.qr(a, mode="complete")[0]
        graph.replay()
        error = float((q - expected).norm() / expected.norm())
    if not error <= 1e-6:
        raise CaptureError(
            f"{api}: a captured {size}x{size} QR replayed to other values than eager (relative difference {error:.2e}); "
            "the training-mode re-orthogonalisation of Q at t=0 cannot be captured on this device"
        )
    return f"QR of Q ({size}x{size}) captured in the graph: a probe replayed it equal to eager (relative difference {error:.1e})"


def probe_training_qr(api: str, model: torch.nn.Module, T: int, device, stream, mode: str, probed: set, notes: list) -> None:
    """Probe the QR capture once per ``Q`` size if ``model``'s forward will re-orthogonalise (training, T > 0)."""
    if not model.training or T == 0:
        return
    for size in decay_sizes(model):
        if size not in probed:
            notes.append(probe_qr(api, size, device, stream, mode))
            probed.add(size)
