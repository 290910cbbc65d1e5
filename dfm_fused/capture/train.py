"""``capture_train_step``: one CUDA graph per DFM training iteration.

The graph holds the whole iteration: the frontend, the T steps forward, the loss,
the backward (memory saving on or off, as the model is built) and the optimizer
step. A replay launches it with one call, so the host issues no kernels and
never waits for the device.

What the step does with ``.grad``, as eager does, for every parameter (in the
optimizer or not): the backward accumulates into the gradient a parameter holds,
a parameter holding none (after ``zero_grad()``) starts from zero, a parameter the
iteration does not reach keeps what it holds, and the optimizer steps the
parameters that hold a gradient. Which parameters hold one is part of the graph's
key (in practice two graphs: after ``zero_grad()``, and accumulating over
micro-batches); the graph zeroes those it reaches that hold none. The gradients
live in fixed tensors bound to ``p.grad`` before each replay (a gradient the user
put there is copied in first).

Before every call the step checks, on the host, what its graphs assume
(:mod:`dfm_fused.capture._fingerprint`): a parameter, buffer, optimizer tensor or
fixed gradient moved to other memory or layout drops every graph (they are
captured anew); the modules' train/eval flags and the parameters'
``requires_grad`` are part of the key; a scalar-decay path baked into a graph is
re-checked (:func:`dfm_fused.capture._graph.stale_decision`). All graphs share one
memory pool: they replay one at a time, in the order the host calls them, and
what one leaves for the host (the loss, ``model.state``) is read before the next
(``model.state`` after a call is valid until the next call, as a graph's outputs are).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dfm_fused import _checks
from dfm_fused.capture import _fingerprint, _graph
from dfm_fused.capture._guards import (
    CaptureError, capture_error_mode, input_tensor, model_device, require_cuda,
)
from dfm_fused.capture._state import Snapshot, changed_hyperparameter, check_capturable, hyperparameters, optimizer_params

__all__ = ["CapturedTrainStep", "capture_train_step"]

API = "capture_train_step"
AUTOCAST_DTYPES = (None, torch.float16, torch.bfloat16)
# Python attributes a FeedbackLoop's forward rebinds (the last state, the steps run): each graph
# has its own, so they are rebound after each replay to those of the graph replayed.
MODEL_ATTRIBUTES = ("state", "steps_run")


def check_common(model, T, autocast_dtype, warmup, mode) -> int:
    """Checks shared with :func:`dfm_fused.capture_inference`; returns ``T``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module; got {type(model).__name__}")
    T = _checks.integer("T", T, 0)
    if autocast_dtype not in AUTOCAST_DTYPES:
        raise ValueError(f"autocast_dtype: expected None, torch.float16 or torch.bfloat16; got {autocast_dtype!r}")
    _checks.integer("warmup", warmup, 2)
    capture_error_mode(mode)
    return T


def check_unchanged(api: str, what: str, model, optimizer, before: _fingerprint.Scan) -> None:
    """Raise if capturing ``what`` rebound a tensor of the model or optimizer or changed a mode
    since ``before`` (shared with :func:`dfm_fused.capture_inference`)."""
    after = _fingerprint.scan(model, optimizer)
    if after.layout != before.layout:
        raise CaptureError(
            f"{api}: {what} itself rebinds a tensor of the model or optimizer "
            f"({_fingerprint.first_change(model, optimizer, (), before.layout, after.layout)}); a graph would keep "
            "using the one it was captured with. Update such tensors in place (tensor.copy_) instead of assigning new ones."
        )
    if after.mode != before.mode:
        raise CaptureError(
            f"{api}: {what} itself changes {_fingerprint.mode_change(model, optimizer, before.mode, after.mode)}; "
            "a graph keeps the mode it was captured in, so it cannot replay that change"
        )


def autocast(dtype):
    """CUDA autocast without its weight-cast cache: a cast cached before capture would be read
    by the graph at its old address, one cached during capture would never be refreshed."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype, cache_enabled=False)


def capture_train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn,
    example_inputs,
    T: int = 5,
    *,
    autocast_dtype: torch.dtype | None = None,
    warmup: int = 3,
    capture_error_mode: str = "global",
    atol: float | None = None,
) -> "CapturedTrainStep":
    """Capture a DFM training iteration into a CUDA graph; returns ``step`` with ``loss = step(x, target)``.

    ``step(x, target)`` does what this eager code does, in one graph replay::

        loss = loss_fn(model(x, T), target)   # under autocast if autocast_dtype is set
        loss.backward()
        optimizer.step()

    Args:
        model: the DFM, on one CUDA device; ``model(x, T)`` returns what ``loss_fn`` takes.
        optimizer: over (some of) the model's parameters. Optimizers with a ``capturable``
            flag (Adam, AdamW) need ``capturable=True``. Its hyperparameters that are Python
            numbers are baked into the graph: changing one later raises (use a tensor ``lr``
            to schedule it).
        loss_fn: ``loss_fn(output, target)`` -> 0-d tensor.
        example_inputs: ``(x, target)`` on the model's device; the first graph is captured for
            their shapes and dtypes when the step is built.
        T: DFM steps per forward.
        autocast_dtype: ``torch.bfloat16`` or ``torch.float16`` to run the forward under
            ``torch.autocast("cuda", cache_enabled=False)``; ``None``: no autocast.
            ``GradScaler`` is not supported (it reads ``found_inf`` on the host).
        warmup: eager iterations before each capture (>= 2), on the capture stream; parameters,
            buffers, gradients, optimizer state and RNG are put back afterwards. All but the
            first run with host syncs raising and CPU tensors refused.
        capture_error_mode: as in ``torch.cuda.graph``.
        atol: early stop cannot be captured in training; anything but ``None`` raises.
    Returns:
        a :class:`CapturedTrainStep`.
    Raises:
        RuntimeError: no CUDA device. ValueError, TypeError: bad arguments.
        CaptureError: something in the iteration cannot be captured (the message names it).
    """
    T = check_common(model, T, autocast_dtype, warmup, capture_error_mode)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer; got {type(optimizer).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (output, target) -> loss; got {type(loss_fn).__name__}")
    if not isinstance(example_inputs, (tuple, list)) or len(example_inputs) != 2:
        raise TypeError(f"example_inputs: expected a pair (x, target); got {type(example_inputs).__name__}"
                        f"{f' of length {len(example_inputs)}' if isinstance(example_inputs, (tuple, list)) else ''}")
    if atol is not None:
        raise ValueError(
            f"atol: expected None; got {atol!r}. Early stop cannot be captured in a training step: it decides on the "
            "host, after every step, whether to run the next one, and a CUDA graph replays a fixed number of steps. "
            "Train at a fixed T; for inference, capture_inference(model, x, T, atol=...) checks convergence on the "
            "device and reads it once per chunk of steps."
        )
    check_capturable(optimizer)
    require_cuda(API)
    return CapturedTrainStep(model, optimizer, loss_fn, tuple(example_inputs), T, autocast_dtype, warmup,
                             capture_error_mode)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    target: torch.Tensor
    loss: torch.Tensor
    attributes: dict
    bound: list  # the parameters whose fixed gradient tensor the graph reads and writes
    decisions: list  # (name, decay module, uniform |S|) baked in, see _graph.bake_scalar_decay


class CapturedTrainStep:
    """A captured DFM training iteration; see :func:`capture_train_step`.

    ``step(x, target, *, optimizer_step=True, T=None)`` copies the inputs into the
    graph's static buffers, replays the graph for their shapes and dtypes, T, every
    module's train/eval mode and parameter's ``requires_grad``, and which parameters hold
    a gradient, capturing it first if new, and returns the loss (a new detached 0-d tensor).
    ``optimizer_step=False`` runs forward and backward only (gradient accumulation).

    Attributes: ``counts`` (captures, replays, eager runs), ``notes`` (what was
    decided and why, e.g. where the QR of ``Q`` runs, why graphs were dropped).
    ``reset()`` drops the graphs.

    If the optimizer creates its state at its first step (momentum buffers, Adam
    moments) and has not stepped yet, the first call runs eagerly, so that the
    graph reads the state tensors eager training made.
    """

    def __init__(self, model, optimizer, loss_fn, example_inputs, T, autocast_dtype, warmup, mode):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.T, self.autocast_dtype, self.warmup, self.mode = T, autocast_dtype, warmup, mode
        self.device = model_device(API, model, optimizer_params(optimizer))
        self.counts = {"captures": 0, "replays": 0, "eager": 0}
        self.notes: list[str] = []
        self._stream = torch.cuda.Stream(self.device)
        self._qr = _graph.TrainingQR(API, model, self.device, self._stream, mode, self.notes)
        self._optimizer_objects = (optimizer.state, optimizer.param_groups)
        self._needs_eager = False
        self._first_mode: tuple | None = None
        self.reset()
        x, target = (input_tensor(name, t, self.device) for name, t in zip(("x", "target"), example_inputs))
        self._capture(x, target, T, True, self._scan())

    def reset(self) -> None:
        """Drop every captured graph (and its memory); the next call captures anew."""
        self._graphs: dict[tuple, _Graph] = {}
        self._grads: dict[int, tuple[str, torch.Tensor]] = {}  # id(param) -> (name, fixed gradient)
        self._hyper: list[dict] | None = None
        self._layout: tuple | None = None
        # One pool for every graph of this step (gradient accumulation uses two or more graphs of
        # the whole iteration); a new one after a reset, the old one goes with its graphs.
        self._pool = torch.cuda.graph_pool_handle()

    def __call__(self, x: torch.Tensor, target: torch.Tensor, *, optimizer_step: bool = True, T: int | None = None):
        T = self.T if T is None else _checks.integer("T", T, 0)
        input_tensor("x", x, self.device)
        input_tensor("target", target, self.device)
        self._check_optimizer()
        scan = self._scan()
        key = self._key(x, target, T, optimizer_step, scan)
        entry = self._graphs.get(key)
        if entry is not None:
            stale = _graph.stale_decision(entry.decisions)
            if stale:
                self.notes.append(f"{stale}: that graph dropped, captured anew")
                del self._graphs[key]
                entry = None
        if entry is None and not (optimizer_step and self._needs_eager):
            entry = self._capture(x, target, T, bool(optimizer_step), scan)
        if entry is None:
            self._needs_eager = False
            self.counts["eager"] += 1
            return self._iteration(x, target, T, optimizer_step, None)
        self._bind(entry.bound)
        entry.x.copy_(x)
        entry.target.copy_(target)
        self._qr.before_forward(T)
        entry.graph.replay()
        for name, value in entry.attributes.items():
            setattr(self.model, name, value)
        self.counts["replays"] += 1
        return entry.loss.clone()

    def _scan(self) -> _fingerprint.Scan:
        """The model and optimizer now; every graph dropped if a tensor they replay on moved."""
        scan = _fingerprint.scan(self.model, self.optimizer, self._grads.values())
        if self._layout is not None and scan.layout != self._layout:
            change = _fingerprint.first_change(self.model, self.optimizer, self._grads.values(), self._layout, scan.layout)
            self.notes.append(f"{change}: graphs dropped, captured anew")
            self.reset()
        return scan

    def _key(self, x, target, T, optimizer_step, scan) -> tuple:
        """The case a graph is for; its last two entries: the indices in ``scan.params`` of the
        parameters that hold a gradient, and ``scan.mode``."""
        holding = tuple(i for i, p in enumerate(scan.params) if p.grad is not None)
        return (tuple(x.shape), x.dtype, tuple(target.shape), target.dtype, T, bool(optimizer_step), holding, scan.mode)

    def _iteration(self, x, target, T, optimizer_step, zero):
        if zero:
            torch._foreach_zero_(zero)
        with torch.enable_grad(), autocast(self.autocast_dtype):
            loss = self.loss_fn(self.model(x, T), target)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not loss.requires_grad:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise TypeError(f"loss_fn: expected a 0-d tensor that requires grad; got {shape}"
                            f"{'' if not isinstance(loss, torch.Tensor) or loss.requires_grad else ' without grad'}")
        loss.backward()
        if optimizer_step:
            self.optimizer.step()
        return loss.detach()

    def _capture(self, x, target, T, optimizer_step, scan) -> _Graph | None:
        """Warm up for this case, capture it and cache it; ``None`` if the optimizer must step eagerly first."""
        key = self._key(x, target, T, optimizer_step, scan)
        holding, params = key[-2], scan.params
        static_x, static_target = x.detach().clone(), target.detach().clone()
        self._qr.prepare(T)
        before = _fingerprint.scan(self.model, self.optimizer)
        decisions = _graph.bake_scalar_decay(self.model, T)
        snapshot = Snapshot(self.model, self.optimizer, self.device)
        reached: list[torch.Tensor] = []
        try:
            def iteration(i):
                snapshot.clear_grads()
                self._qr.before_forward(T)
                self._iteration(static_x, static_target, T, optimizer_step, None)
                if i == 0:  # the parameters this case gives a gradient, from none
                    reached[:] = [p for p in params if p.grad is not None]

            with _graph.baked(decisions), self._qr.making_graph(T):
                _graph.warm_up(API, iteration, self.warmup, self._stream, self.device)
            created = snapshot.created_state() if optimizer_step else []
        finally:
            snapshot.restore()
        if created:
            self._needs_eager = True
            self.notes.append(f"the optimizer creates state at its first step ({', '.join(created[:3])}"
                              f"{', ...' if len(created) > 3 else ''}): that step runs eagerly, the graph is captured after it")
            return None
        held = {id(params[i]) for i in holding}
        bound = list({id(p): p for p in (*reached, *(params[i] for i in holding))}.values())
        names = {id(p): f"optimizer param {i}" for i, p in enumerate(optimizer_params(self.optimizer))}
        names.update((id(p), name) for name, p in self.model.named_parameters())
        for p in bound:
            if id(p) not in self._grads:
                self._grads[id(p)] = (names[id(p)], torch.zeros_like(p))
        zero = [self._grads[id(p)][1] for p in reached if id(p) not in held]
        self._bind(bound)
        # No eager QR before the capture: the capture only records kernels, and an extra QR
        # of Q would change it (a QR may flip the signs of an orthonormal matrix's columns).
        with _graph.baked(decisions), self._qr.making_graph(T):
            graph, loss = _graph.capture(
                API, lambda: self._iteration(static_x, static_target, T, optimizer_step, zero),
                self._stream, self.mode, "the training iteration", self._pool,
            )
        self._check_unchanged(before)
        if optimizer_step and self._hyper is None:
            self._hyper = hyperparameters(self.optimizer)
        self.counts["captures"] += 1
        self._note_capture(key, decisions, T)
        attributes = {name: self.model.__dict__[name] for name in MODEL_ATTRIBUTES if name in self.model.__dict__}
        entry = self._graphs[key] = _Graph(graph, static_x, static_target, loss, attributes, bound, decisions)
        self._layout = _fingerprint.scan(self.model, self.optimizer, self._grads.values()).layout
        return entry

    def _check_unchanged(self, before: _fingerprint.Scan) -> None:
        """The iteration itself must leave the model's tensors and modes as they were: a graph
        keeps replaying on the tensors and in the modes it was captured with."""
        check_unchanged(API, "the training iteration", self.model, self.optimizer, before)

    def _note_capture(self, key: tuple, decisions: list, T: int) -> None:
        mode = key[-1]
        if self._first_mode is None:
            self._first_mode = mode
        elif mode != self._first_mode:
            self.notes.append(f"captured a graph for another mode than the first ("
                              f"{_fingerprint.mode_change(self.model, self.optimizer, self._first_mode, mode)})")
        scalar = [name for name, _, uniform in decisions if uniform]
        if scalar:
            note = (f"scalar-decay path (|S| uniform, M = d I) baked into the graph at T={T} for {', '.join(scalar)}; "
                    "S is re-checked before each replay")
            if note not in self.notes:
                self.notes.append(note)

    def _bind(self, bound) -> None:
        """Bind each parameter's ``.grad`` to its fixed tensor, keeping its value (one that holds
        none is zeroed by the graph, which was captured for that)."""
        for p in bound:
            fixed = self._grads[id(p)][1]
            if p.grad is fixed:
                continue
            if p.grad is not None:
                fixed.copy_(p.grad)
            p.grad = fixed

    def _check_optimizer(self) -> None:
        state, groups = self._optimizer_objects
        if self.optimizer.state is not state or self.optimizer.param_groups is not groups:
            # optimizer.load_state_dict() made new state tensors: the graphs read the old ones.
            self.reset()
            self._optimizer_objects = (self.optimizer.state, self.optimizer.param_groups)
            self.notes.append("the optimizer's state was replaced (load_state_dict): graphs dropped, captured anew")
            return
        if self._hyper is not None:
            changed = changed_hyperparameter(self.optimizer, self._hyper)
            if changed:
                raise CaptureError(
                    f"{API}: optimizer {changed} since the graph was captured; a captured step keeps the value it "
                    "had then. Use a tensor for a scheduled value (e.g. lr=torch.tensor(1e-3, device='cuda') with "
                    "Adam(capturable=True)) or call step.reset() after the change to capture anew."
                )
