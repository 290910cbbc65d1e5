"""Where the decay modules' scalar-decay decision lives: one forward call, one step.

A decay module may compute ``M = d I`` (``d = exp(t * Delta)``, no C x C product) only while
``Q`` is orthonormal and ``|S|**alpha`` uniform (docs/design.md, "The decay is usually a
scalar"). Nothing process-wide can tell that reliably: ``Q`` and ``S`` can be written by an
optimizer, a collective, ``.data`` or ``to_empty()`` without any trace. So the decision is made
from what the current call did and saw:

- a training call whose step ``t = 0`` runs the QR knows ``Q`` is orthonormal for the rest of
  that call; it judges ``|S|`` on its values right then (:class:`Judgement`);
- the call's later steps read that judgement from the :class:`Call` the loop opened
  (:func:`call`); without one (a hand-written loop), a step past ``t = 0`` takes the general path;
- each step records the decision it took in its :class:`Step` frame, and the replay of that
  step in ``unroll``'s backward re-enters the same frame and takes the same decision, whatever
  happened to ``Q`` or ``S`` in between (another optimizer's step between a forward and its
  backward, as in a GAN loop).

Everything here is per thread and per call: importing the package registers nothing.
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["Call", "Judgement", "Step", "call", "current_call", "current_step", "step"]

_local = threading.local()


class Judgement:
    """Whether ``|S|`` was uniform when a call's QR ran, read from ``S``'s values.

    On the CPU (and for a value baked in for CUDA-graph capture) the answer is known at once.
    On CUDA the comparison runs on the device next to the QR and is copied into pinned host
    memory without blocking; the host waits for it only when a later step of the call needs
    it, by which time the device is usually past it: no read beyond the QR's own cost.
    """

    def __init__(self, S: torch.Tensor | None = None, value: bool | None = None):
        self._value, self._host, self._event = value, None, None
        if value is not None:
            return
        with torch.no_grad():
            magnitude = S.detach().abs()
            uniform = (magnitude == magnitude[:1]).all()
        if S.device.type == "cuda":
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(uniform, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._value = bool(uniform)

    @property
    def known(self) -> bool:
        """Whether the answer is available without waiting for the device."""
        return self._value is not None

    def value(self) -> bool:
        if self._value is None:
            self._event.synchronize()
            self._value = bool(self._host)
            self._host = self._event = None
        return self._value


class Call:
    """One forward call of a DFM loop: the judgement of each decay module that ran its QR in it."""

    def __init__(self):
        self.judged: dict[int, Judgement] = {}


class Step:
    """One step of a loop: the decision each decay module took in it, for the step's replays."""

    def __init__(self, owner: Call):
        self.call = owner
        self.decisions: dict[int, bool] = {}


def current_call() -> Call | None:
    return getattr(_local, "call", None)


def current_step() -> Step | None:
    return getattr(_local, "step", None)


@contextlib.contextmanager
def call(new: bool = False):
    """The current :class:`Call`, opened here if there is none (or ``new``): a model's forward
    opens a new one, ``unroll`` joins the one its caller opened."""
    outer = current_call()
    if outer is not None and not new:
        yield outer
        return
    _local.call = Call()
    try:
        yield _local.call
    finally:
        _local.call = outer


@contextlib.contextmanager
def step(frame: Step):
    """Run one step (or its replay) in ``frame`` and in the call it belongs to."""
    outer_call, outer_step = current_call(), current_step()
    _local.call, _local.step = frame.call, frame
    try:
        yield frame
    finally:
        _local.call, _local.step = outer_call, outer_step
