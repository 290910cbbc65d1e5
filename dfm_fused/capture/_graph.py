"""Warm-up and capture on one side stream, and where the training forward's QR runs.

Both the warm-up and the capture run on the same side stream (the capture
stream), as ``torch.cuda.make_graphed_callables`` and mamba's ``capture_graph``
warm up before capturing: lazy initialisation (cuBLAS/cuDNN handles and
workspaces, which are per stream, Triton autotuning, optimizer state) then
happens outside the graph. The first warm-up iteration runs unchecked, for that
lazy work; the others run with host syncs raising and CPU tensors refused
(:func:`dfm_fused.capture._guards.no_host_sync`).
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from dfm_fused.capture._guards import CaptureError, explain, no_host_sync

__all__ = ["TrainingQR", "bake_scalar_decay", "baked", "capture", "probe_qr", "qr_modules", "stale_decision", "warm_up"]


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


def capture(api: str, fn: Callable[[], object], stream, mode: str, what: str, pool=None):
    """``(graph, outputs of fn)``: ``fn`` captured on ``stream`` into a new graph, in the memory
    pool ``pool`` (a ``torch.cuda.graph_pool_handle()``; ``None``: a pool of its own)."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=mode):
            outputs = fn()
    except CaptureError:
        raise
    except Exception as exc:
        raise CaptureError(explain(api, f"capturing {what}", exc)) from exc
    return graph, outputs


def qr_modules(model: torch.nn.Module) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
    """``model``'s decay modules that re-orthogonalise ``Q`` by QR in a training forward at t=0:
    ``(this package's, which can leave it to the caller; the reference's, which cannot)``.
    feedback_segmentation-style modules (``output_map="Qinv"``) do no QR."""
    from dfm_fused.modules import _DecayParameters
    from dfm_fused.reference import StateExpDecay as ReferenceStateExpDecay

    fused = [m for m in model.modules() if isinstance(m, _DecayParameters) and getattr(m, "output_map", "QT") == "QT"]
    reference = [m for m in model.modules() if isinstance(m, ReferenceStateExpDecay)]
    return fused, reference


def bake_scalar_decay(model: torch.nn.Module, T: int) -> list[tuple[str, torch.nn.Module, bool]]:
    """``(name, module, uniform_S())`` for each of ``model``'s fused decay modules whose forward at
    ``T`` steps runs (or has its caller run) the QR at t=0, so judges ``|S|``.

    ``S`` cannot be read while a graph is captured: the answer is read here, before the warm-up,
    set as ``module.baked_uniform_S`` while the graph is made (:func:`baked`) and re-checked before
    each replay (:func:`stale_decision`). One host read per module, per capture."""
    if T == 0:
        return []
    fused = {id(m) for m in qr_modules(model)[0]}
    return [(name, m, bool(m.uniform_S())) for name, m in model.named_modules() if id(m) in fused and m.training]


@contextlib.contextmanager
def baked(decisions):
    """Around the warm-up and the capture: each module takes the scalar-decay decision read before."""
    for _, module, uniform in decisions:
        module.baked_uniform_S = uniform
    try:
        yield
    finally:
        for _, module, _ in decisions:
            del module.baked_uniform_S  # back to the class default


def stale_decision(decisions) -> str | None:
    """The first module whose baked scalar-decay path no longer holds, in words; else None.

    Only a graph that took the scalar path (``M = d I``) can be wrong: the general path is
    exact for any ``S``. ``S``'s storage is checked with every parameter (its data_ptr and
    stride, :mod:`dfm_fused.capture._fingerprint`); its values are read here because a write
    through ``S.data`` (``m.S.data.uniform_(...)``, a collective, an optimizer over ``S``) moves
    no version counter. Cost: per module with the scalar path baked, a C-element comparison and
    a one-byte device-to-host copy, which waits for the work queued before it (the previous
    replay): the host no longer runs ahead of the device by more than one iteration.
    """
    for name, module, uniform in decisions:
        if uniform and not module.uniform_S():
            return f"{name}.S is no longer uniform in magnitude (the graph took the scalar-decay path)"
    return None


def probe_qr(api: str, size: int, device: torch.device, stream, mode: str) -> str:
    """Capture ``torch.linalg.qr(A, mode="complete")`` of a ``size x size`` float32 matrix, replay it
    on new values and compare with eager. Returns a note; raises :class:`CaptureError` if the QR
    (cuSOLVER) cannot be captured or its replay differs from eager."""
    generator = torch.Generator(device=device).manual_seed(size)
    a = torch.randn(size, size, device=device, generator=generator)
    warm_up(api, lambda i: torch.linalg.qr(a, mode="complete"), 2, stream, device)
    graph, q = capture(api, lambda: torch.linalg.qr(a, mode="complete")[0], stream, mode, f"a {size}x{size} QR")
    with torch.no_grad():
        a.copy_(torch.randn(size, size, device=device, generator=generator))
        expected = torch.linalg.qr(a, mode="complete")[0]
        graph.replay()
        error = float((q - expected).norm() / expected.norm())
    if not error <= 1e-6:
        raise CaptureError(
            f"{api}: a captured {size}x{size} QR replayed to other values than eager (relative difference {error:.2e})"
        )
    return f"QR of Q ({size}x{size}) captured in the graph: a probe replayed it equal to eager (relative difference {error:.1e})"


class TrainingQR:
    """Where the QR of ``Q`` that a training forward does at t=0 runs when that forward is captured.

    In the graph, when a probe shows that this device's QR (cuSOLVER) captures and replays
    equal to eager: every replay re-orthogonalises, as every eager training forward does.
    Otherwise eagerly, before each warm-up iteration, the capture and each replay, with the
    decay modules told to skip it in their forward while the graph is made
    (``qr_in_forward = False``); a model whose reference (``dfbmodels``-style) decay modules
    cannot skip it raises. ``notes`` records the choice.
    """

    def __init__(self, api: str, model: torch.nn.Module, device, stream, mode: str, notes: list):
        self.api, self.model, self.device, self.stream, self.mode, self.notes = api, model, device, stream, mode, notes
        self.eager = False
        self._probed: set[int] = set()

    def _active(self, T: int) -> list[torch.nn.Module]:
        """The fused modules whose QR runs outside the graph for a forward at ``T`` steps."""
        if not (self.eager and T > 0):
            return []
        return [m for m in qr_modules(self.model)[0] if m.training]

    def prepare(self, T: int) -> None:
        """Probe the QR once per ``Q`` size, if a forward at ``T`` steps, in each module's mode, does one."""
        if T == 0:
            return
        fused, reference = ([m for m in found if m.training] for found in qr_modules(self.model))
        for size in sorted({int(m.Q.shape[0]) for m in fused + reference} - self._probed):
            try:
                self.notes.append(probe_qr(self.api, size, self.device, self.stream, self.mode))
            except CaptureError as exc:
                if reference:
                    raise CaptureError(
                        f"{exc}\nThe training-mode re-orthogonalisation of Q at t=0 (torch.linalg.qr) cannot be "
                        f"captured on this device, and the model's {type(reference[0]).__name__} modules cannot leave "
                        "it to the caller; swap them for dfm_fused's with dfm_fused.patch(model), capture the model "
                        "in eval mode, or train it eagerly."
                    ) from exc.__cause__
                if not self.eager:
                    self.notes.append(f"the QR of Q at t=0 runs eagerly before each replay: it cannot be captured ({exc})")
                self.eager = True
            self._probed.add(size)

    def before_forward(self, T: int) -> None:
        """Re-orthogonalise eagerly, where the QR is kept out of the graph; call before each warm-up
        iteration, the capture and each replay of a forward at ``T`` steps."""
        for module in self._active(T):
            module.orthogonalize_Q()

    @contextlib.contextmanager
    def making_graph(self, T: int):
        """Around the warm-up and the capture: the decay modules skip the QR that runs outside."""
        modules = self._active(T)
        for module in modules:
            module.qr_in_forward = False
        try:
            yield
        finally:
            for module in modules:
                del module.qr_in_forward  # back to the class default
