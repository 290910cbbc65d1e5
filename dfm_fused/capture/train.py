"""``capture_train_step``: one CUDA graph per DFM training iteration.

The graph holds the whole iteration: the frontend, the T steps forward, the loss,
the backward (memory saving on or off, as the model is built) and the optimizer
step. A replay launches it with one call, so the host issues no kernels and
never waits for the device.

What the step does with ``.grad``, as eager does: the backward accumulates into
the gradients the parameters hold, and ``optimizer.zero_grad()`` between calls
(``set_to_none`` or not) starts from zero. Two graphs may be captured for this:
one that zeroes the gradients first (used when every gradient is ``None``,
i.e. after ``zero_grad()``) and one that accumulates (gradient accumulation over
micro-batches, ``optimizer_step=False`` for all but the last). The gradients
live in fixed tensors that the step binds to ``p.grad`` before each replay (a
gradient the user put there is copied in first); after a call ``p.grad`` holds
what eager would hold after ``backward()`` and ``step()``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dfm_fused import _checks
from dfm_fused.capture import _graph
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


class CapturedTrainStep:
    """A captured DFM training iteration; see :func:`capture_train_step`.

    ``step(x, target, *, optimizer_step=True, T=None)`` copies the inputs into the
    graph's static buffers, replays the graph for their shapes and dtypes, T, the
    model's train/eval mode and the gradient case (zeroed or accumulating), capturing
    it first if new, and returns the loss (a new detached 0-d tensor).
    ``optimizer_step=False`` runs forward and backward only (gradient accumulation).

    Attributes: ``counts`` (captures, replays, eager runs), ``notes`` (what was
    decided and why, e.g. where the QR of ``Q`` runs). ``reset()`` drops the graphs.

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
        self._graphs: dict[tuple, _Graph] = {}
        self._grads: list[torch.Tensor] = []
        self._reached: list[torch.Tensor] | None = None
        self._unreached: list[torch.Tensor] = []
        self._qr = _graph.TrainingQR(API, model, self.device, self._stream, mode, self.notes)
        self._hyper: list[dict] | None = None
        self._optimizer_objects = (optimizer.state, optimizer.param_groups)
        self._needs_eager = False
        x, target = (input_tensor(name, t, self.device) for name, t in zip(("x", "target"), example_inputs))
        self._capture(x, target, T, True, True)

    def reset(self) -> None:
        """Drop every captured graph (and its memory); the next call captures anew."""
        self._graphs.clear()
        self._hyper = None

    def __call__(self, x: torch.Tensor, target: torch.Tensor, *, optimizer_step: bool = True, T: int | None = None):
        T = self.T if T is None else _checks.integer("T", T, 0)
        input_tensor("x", x, self.device)
        input_tensor("target", target, self.device)
        self._check_optimizer()
        fresh = self._bind_grads()
        entry = self._graphs.get(self._key(x, target, T, optimizer_step, fresh))
        if entry is None and not (optimizer_step and self._needs_eager):
            entry = self._capture(x, target, T, bool(optimizer_step), fresh)
        if entry is None:
            self._needs_eager = False
            self.counts["eager"] += 1
            return self._iteration(x, target, T, optimizer_step, self._grads if fresh else None)
        entry.x.copy_(x)
        entry.target.copy_(target)
        self._qr.before_forward(T)
        entry.graph.replay()
        for name, value in entry.attributes.items():
            setattr(self.model, name, value)
        self.counts["replays"] += 1
        return entry.loss.clone()

    def _key(self, x, target, T, optimizer_step, fresh) -> tuple:
        return (tuple(x.shape), x.dtype, tuple(target.shape), target.dtype, T, self.model.training,
                bool(optimizer_step), fresh)

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

    def _capture(self, x, target, T, optimizer_step, fresh) -> _Graph | None:
        """Warm up for this case, capture it and cache it; ``None`` if the optimizer must step eagerly first."""
        static_x, static_target = x.detach().clone(), target.detach().clone()
        self._qr.prepare(T)
        snapshot = Snapshot(self.model, self.optimizer, self.device)
        try:
            def iteration(i):
                snapshot.clear_grads()
                self._qr.before_forward(T)
                self._iteration(static_x, static_target, T, optimizer_step, None)
                if self._reached is None:
                    trainable = [p for p in optimizer_params(self.optimizer) if p.requires_grad]
                    self._reached = [p for p in trainable if p.grad is not None]
                    self._unreached = [p for p in trainable if p.grad is None]

            with self._qr.making_graph(T):
                _graph.warm_up(API, iteration, self.warmup, self._stream, self.device)
            created = snapshot.created_state() if optimizer_step else []
        finally:
            snapshot.restore()
        if not self._grads:
            self._grads = [torch.zeros_like(p) for p in self._reached]
            fresh = self._bind_grads()
        if created:
            self._needs_eager = True
            self.notes.append(f"the optimizer creates state at its first step ({', '.join(created[:3])}"
                              f"{', ...' if len(created) > 3 else ''}): that step runs eagerly, the graph is captured after it")
            return None
        # No eager QR before the capture: the capture only records kernels, and an extra QR
        # of Q would change it (a QR may flip the signs of an orthonormal matrix's columns).
        with self._qr.making_graph(T):
            graph, loss = _graph.capture(
                API, lambda: self._iteration(static_x, static_target, T, optimizer_step, self._grads if fresh else None),
                self._stream, self.mode, "the training iteration",
            )
        if optimizer_step and self._hyper is None:
            self._hyper = hyperparameters(self.optimizer)
        self.counts["captures"] += 1
        attributes = {name: self.model.__dict__[name] for name in MODEL_ATTRIBUTES if name in self.model.__dict__}
        entry = self._graphs[self._key(x, target, T, optimizer_step, fresh)] = _Graph(
            graph, static_x, static_target, loss, attributes)
        return entry

    def _bind_grads(self) -> bool:
        """Bind each reached parameter's ``.grad`` to its fixed tensor, keeping its value; return
        whether every gradient was ``None`` (the graph then zeroes them, as eager starts from none)."""
        fresh = all(p.grad is None for p in self._reached)
        for p, grad in zip(self._reached, self._grads):
            if p.grad is grad:
                continue
            if p.grad is not None:
                grad.copy_(p.grad)
            elif not fresh:
                grad.zero_()
            p.grad = grad
        for p in self._unreached:
            if p.grad is not None:
                raise CaptureError(
                    f"{API}: a parameter of shape {tuple(p.shape)} that the iteration gives no gradient holds a .grad; "
                    "eager optimizer.step() would update it with that stale gradient, the captured step skips it. "
                    "Set its .grad to None (optimizer.zero_grad())."
                )
        return fresh

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
