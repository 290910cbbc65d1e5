"""``capture_inference``: a DFM forward replayed from CUDA graphs, at fixed T or with early stop.

Fixed T: one graph of ``model(x, T)`` under ``no_grad``.

Early stop (``atol``): the reference stops after the first step whose
``sum |h|`` moved by at most ``atol`` (over the first T-1 steps), then runs one
more step. A graph cannot branch on the host, so three graphs share fixed
tensors: the prologue (frontend, initial state), a chunk of ``check_every``
steps that checks convergence on the device and keeps a step's state only while
the loop is still running (``torch.where``), and the epilogue (the last step at
the step index reached, the head). The host replays chunks and reads one flag
per chunk, so it syncs once per ``check_every`` steps instead of every step,
and the loop stops at the reference's step. Up to ``check_every - 1`` steps of
the last chunk are computed and discarded, as in :class:`dfm_fused.FeedbackModel`.

Before every call, as :func:`dfm_fused.capture_train_step` does: a parameter or buffer moved to
other memory or layout drops the graphs (captured anew), every module's train/eval flag is part
of the key, and a scalar-decay path baked into a training-mode graph is re-checked. All graphs
share one memory pool.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dfm_fused import _checks
from dfm_fused.capture import _fingerprint, _graph
from dfm_fused.capture._guards import CaptureError, input_tensor, model_device, require_cuda
from dfm_fused.capture._state import Snapshot
from dfm_fused.capture.train import autocast, check_common, check_unchanged

__all__ = ["CapturedInference", "capture_inference"]

API = "capture_inference"


def capture_inference(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    T: int = 8,
    *,
    atol: float | None = None,
    check_every: int = 4,
    autocast_dtype: torch.dtype | None = None,
    warmup: int = 3,
    capture_error_mode: str = "global",
) -> "CapturedInference":
    """Capture a DFM forward (no gradients) into CUDA graphs; ``logits = infer(x)``.

    Args:
        model: the DFM on one CUDA device, ``model(x, T)`` -> output. With ``atol``, a
            :class:`dfm_fused.FeedbackModel` or :mod:`dfm_fused.models` model in eval mode.
        example_input: ``x`` on the model's device; graphs for its shape and dtype are
            captured when this is built.
        T: DFM steps (the most steps with ``atol``).
        atol: ``None``: exactly T steps, one graph. A number: the reference's early stop on
            ``|sum|h_t| - sum|h_{t-1}|| <= atol``, checked on the device and read once per
            ``check_every`` steps; ``infer.steps_run`` is the reference's step count.
        autocast_dtype, warmup, capture_error_mode: as in :func:`dfm_fused.capture_train_step`.
    Returns:
        a :class:`CapturedInference`; ``infer(x)`` returns a new tensor each call.
    """
    T = check_common(model, T, autocast_dtype, warmup, capture_error_mode)
    check_every = _checks.integer("check_every", check_every, 1)
    if atol is not None:
        _checks.scalar("atol", atol, allow_negative=False)
        from dfm_fused.feedback_model import FeedbackLoop

        if not isinstance(model, FeedbackLoop):
            raise TypeError(
                f"model: early stop (atol) is captured for dfm_fused's DFMs (FeedbackModel, dfm_fused.models), which "
                f"expose their steps; got {type(model).__name__}. Use atol=None for a fixed number of steps."
            )
        if model.training:
            raise ValueError(
                "model: early stop (atol) is captured in eval mode only (call model.eval()): in training mode the "
                "first step re-orthogonalises Q, a choice the host makes from the step index, which the captured "
                "loop keeps on the device"
            )
    require_cuda(API)
    return CapturedInference(model, example_input, T, None if atol is None else float(atol), check_every,
                             autocast_dtype, warmup, capture_error_mode)


@dataclass
class _Fixed:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    out: torch.Tensor
    attributes: dict
    decisions: list  # (name, decay module, uniform |S|) baked in, see _graph.bake_scalar_decay


@dataclass
class _EarlyStop:
    graphs: tuple  # prologue, chunk, epilogue
    x: torch.Tensor
    status: torch.Tensor  # int64 (finished, steps run before the last step)
    logits: torch.Tensor
    state: torch.Tensor


class CapturedInference:
    """A captured DFM forward; see :func:`capture_inference`.

    ``infer(x)`` copies ``x`` into a static buffer and replays the graphs for its shape,
    dtype and every module's train/eval mode (capturing them first if new). ``steps_run``:
    steps the last call ran; ``counts``: captures and replays; ``notes``: decisions made.
    """

    def __init__(self, model, example_input, T, atol, check_every, autocast_dtype, warmup, mode):
        self.model, self.T, self.atol, self.check_every = model, T, atol, check_every
        self.autocast_dtype, self.warmup, self.mode = autocast_dtype, warmup, mode
        self.device = model_device(API, model)
        self.counts = {"captures": 0, "replays": 0}
        self.notes: list[str] = []
        self.steps_run = 0
        self._stream = torch.cuda.Stream(self.device)
        self._qr = _graph.TrainingQR(API, model, self.device, self._stream, mode, self.notes)
        self.reset()
        self._entry(input_tensor("example_input", example_input, self.device))

    def reset(self) -> None:
        """Drop every captured graph (and its memory); the next call captures anew."""
        self._graphs: dict[tuple, object] = {}
        self._layout: tuple | None = None
        # One pool for every graph (each call replays its graphs in the order they were captured
        # and the host reads their outputs before the next call).
        self._pool = torch.cuda.graph_pool_handle()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        input_tensor("x", x, self.device)
        entry = self._entry(x)
        entry.x.copy_(x)
        self.counts["replays"] += 1
        if isinstance(entry, _Fixed):
            self._qr.before_forward(self.T)
            entry.graph.replay()
            for name, value in entry.attributes.items():
                setattr(self.model, name, value)
            self.steps_run = self.T
            return entry.out.clone()
        prologue, chunk, epilogue = entry.graphs
        prologue.replay()
        steps = 0
        for _ in range(math.ceil((self.T - 1) / self.check_every)):
            chunk.replay()
            finished, steps = entry.status.tolist()  # the one host read per chunk of steps
            if finished:
                break
        epilogue.replay()
        self.steps_run = steps + 1
        self.model.state, self.model.steps_run = entry.state, self.steps_run
        return entry.logits.clone()

    def _entry(self, x):
        scan = _fingerprint.scan(self.model)
        if self._layout is not None and scan.layout != self._layout:
            change = _fingerprint.first_change(self.model, None, (), self._layout, scan.layout)
            self.notes.append(f"{change}: graphs dropped, captured anew")
            self.reset()
        if self.atol is not None and self.model.training:
            raise ValueError("model: early stop (atol) is captured in eval mode only (call model.eval() before "
                             "calling the captured inference): in training mode the first step re-orthogonalises Q")
        key = (tuple(x.shape), x.dtype, scan.mode)
        entry = self._graphs.get(key)
        stale = isinstance(entry, _Fixed) and _graph.stale_decision(entry.decisions)
        if stale:
            self.notes.append(f"{stale}: that graph dropped, captured anew")
        if entry is None or stale:
            self._qr.prepare(self.T)
            static_x = x.detach().clone()
            early = self.atol is not None and self.T >= 1
            entry = self._capture_early_stop(static_x) if early else self._capture_fixed(static_x)
            check_unchanged(API, "the forward", self.model, None, scan)
            self._graphs[key] = entry
            self._layout = scan.layout
        return entry

    def _warm_up(self, run) -> None:
        def iteration(i):
            self._qr.before_forward(self.T)
            run()

        snapshot = Snapshot(self.model, None, self.device)
        try:
            with self._qr.making_graph(self.T):
                _graph.warm_up(API, iteration, self.warmup, self._stream, self.device)
        finally:
            snapshot.restore()

    def _capture(self, fn, what):
        with torch.no_grad(), autocast(self.autocast_dtype):
            graph, out = _graph.capture(API, fn, self._stream, self.mode, what, self._pool)
        self.counts["captures"] += 1
        return graph, out

    def _capture_fixed(self, x) -> _Fixed:
        def forward():
            with torch.no_grad(), autocast(self.autocast_dtype):
                return self.model(x, self.T)

        decisions = _graph.bake_scalar_decay(self.model, self.T)
        with _graph.baked(decisions):
            self._warm_up(forward)
            with self._qr.making_graph(self.T):
                graph, out = self._capture(forward, f"the forward at T={self.T}")
        if not isinstance(out, torch.Tensor):
            raise CaptureError(f"{API}: model(x, T) must return a tensor to be replayed; got {type(out).__name__}")
        attributes = {name: self.model.__dict__[name] for name in ("state", "steps_run") if name in self.model.__dict__}
        return _Fixed(graph, x, out, attributes, decisions)

    def _capture_early_stop(self, x) -> _EarlyStop:
        model, T, atol = self.model, self.T, self.atol
        with torch.no_grad(), autocast(self.autocast_dtype):
            snapshot = Snapshot(model, None, self.device)
            try:  # the shapes of the frontend output and the state
                h_like = model.initial_state(model.encode(x))
            finally:
                snapshot.restore()
        h = torch.empty_like(h_like)
        t = torch.zeros((), dtype=torch.int64, device=self.device)
        done = torch.zeros((), dtype=torch.bool, device=self.device)
        previous = torch.zeros((), dtype=torch.float64, device=self.device)
        status = torch.zeros(2, dtype=torch.int64, device=self.device)
        z_box: list[torch.Tensor] = []

        def prologue():
            z = model.encode(x)
            h0 = model.initial_state(z)
            if model.reference_init and T >= 2:
                h0 = torch.zeros_like(h0)
            h.copy_(h0)
            t.zero_()
            done.zero_()
            previous.fill_(math.inf)
            z_box[:] = [z]
            return z

        def chunk():
            z = z_box[0]
            for _ in range(self.check_every):
                active = done.logical_not() & (t < T - 1)
                h_next = model.step(z, h, t)
                # As the reference: a float32 sum compared in float64.
                total = h_next.abs().sum().to(torch.float64)
                converged = (total - previous).abs() <= atol
                h.copy_(torch.where(active, h_next, h))
                previous.copy_(torch.where(active, total, previous))
                done.logical_or_(active & converged)
                t.add_(active.to(torch.int64))
            status.copy_(torch.stack([(done | (t >= T - 1)).to(torch.int64), t]))

        def epilogue():
            state = model.step(z_box[0], h, t)
            if isinstance(getattr(model, "T", None), torch.Tensor):
                model.T.copy_(t + 1)
            return model.predict(state), state.detach()

        def run():
            prologue()
            if T > 1:
                chunk()
            return epilogue()

        with torch.no_grad(), autocast(self.autocast_dtype):
            self._warm_up(run)
        prologue_graph, z = self._capture(prologue, "the prologue (frontend and initial state)")
        z_box[:] = [z]  # the graphs below read the prologue's output buffer
        chunk_graph = self._capture(chunk, f"a chunk of {self.check_every} steps")[0] if T > 1 else None
        epilogue_graph, (logits, state) = self._capture(epilogue, "the last step and the head")
        self.notes.append(f"early stop: chunks of {self.check_every} steps, one host read per chunk")
        return _EarlyStop((prologue_graph, chunk_graph, epilogue_graph), x, status, logits, state)
