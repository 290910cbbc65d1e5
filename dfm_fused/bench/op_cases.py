"""Op benchmark cases: one fused op (or the ``StateUpdate`` module) against the reference
(see :mod:`dfm_fused.bench.cases`)."""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

import dfm_fused
from dfm_fused import reference
from dfm_fused.bench._case_base import (
    DTYPES,
    REFERENCE_IMPLS,
    Bench,
    Shape,
    _autocast,
    _Case,
    _generator_seed,
    backend_of,
)

__all__ = ["MODES", "OPS", "OpCase", "op_cases"]

OPS = ("exp_decay", "feedback_input", "state_update", "StateUpdate")
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class OpCase(_Case):
    """One op, mode (``fwd``: training forward; ``fwd+bwd``), shape, dtype, implementation."""

    op: str
    mode: str
    impl: str
    shape: Shape
    dtype: str
    device: str

    kind = "op"

    @property
    def group(self) -> str:
        return f"{self.op} {self.mode} {self.shape.name} {self.dtype}"

    def spec(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def _inputs(self, device, dtype):
        """(positional args, tensors that get gradients, output shape); fresh random values."""
        s = self.shape
        g = torch.Generator().manual_seed(_generator_seed(self.op, s))

        def rand(*size, grad=True, dt=dtype):
            return torch.randn(*size, generator=g, dtype=torch.float32).to(device, dt).requires_grad_(grad)

        if self.op == "StateUpdate":
            h, y = rand(s.B, s.C, s.H, s.W), rand(s.B, s.C, s.H, s.W)
            return (h, y, 3), [h, y], (s.B, s.C, s.H, s.W)

        Q = torch.linalg.qr(torch.randn(s.C, s.C, generator=g, dtype=torch.float64))[0]
        Q = Q.to(device, torch.float32).requires_grad_(True)
        S = (torch.rand(s.C, generator=g) + 0.5).to(device)
        decay = (3.0, 1.0, 1.0)  # t, tau, alpha
        if self.op == "exp_decay":
            x = rand(s.B, s.C, s.H, s.W)
            return (x, Q, S, *decay), [x, Q], (s.B, s.C, s.H, s.W)
        if self.op == "state_update":
            h, y = rand(s.B, s.C, s.H, s.W), rand(s.B, s.C, s.H, s.W)
            return (h, y, Q, S, *decay, s.groups, 1e-5), [h, y, Q], (s.B, s.C, s.H, s.W)
        x, h = rand(s.B, s.Cx, s.fH, s.fW), rand(s.B, s.C, s.H, s.W)
        return (x, h, s.C - s.fb, s.fb, s.fb_groups, 1e-5), [x, h], (s.B, s.Cx + s.fb, s.fH, s.fW)

    def function(self) -> Callable:
        if self.impl == "reference":
            return getattr(reference, self.op)
        if self.impl == "reference-compiled":
            return _compiled_reference(self.op)
        op = getattr(dfm_fused, self.op)
        return lambda *args: op(*args, backend=backend_of(self.impl))

    def _state_update_module(self, device) -> tuple[Callable, torch.Tensor]:
        """``(fn(h, y, t), Q)`` for op ``StateUpdate``: the fused module after its training QR at
        t=0, or the reference's ``h + StateExpDecay(GroupNorm(y), t)`` with the same ``Q``."""
        s = self.shape
        torch.manual_seed(_generator_seed(self.op, s))
        fused = dfm_fused.StateUpdate(s.C, s.groups, tau=1.0).to(device).train()
        with torch.no_grad():  # the QR at t=0; Q is then orthonormal and the module knows it
            fused(torch.zeros(1, s.C, 1, 1, device=device), torch.randn(1, s.C, 1, 1, device=device), 0)
        if self.impl not in REFERENCE_IMPLS:
            def run(h, y, t):
                with dfm_fused.use_backend(backend_of(self.impl)):
                    return fused(h, y, t)

            return run, fused.Q
        decay = reference.StateExpDecay(s.C, (s.H, s.W), tau=1.0).to(device).train()
        decay.load_state_dict(fused.state_dict())

        def composition(h, y, t):
            return h + decay(torch.nn.functional.group_norm(y, s.groups, eps=fused.eps), T=t)

        if self.impl == "reference-compiled":
            composition = torch.compile(composition, dynamic=False)
        return composition, decay.Q

    def build(self) -> Bench:
        device, dtype = torch.device(self.device), DTYPES[self.dtype]
        args, grad_inputs, out_shape = self._inputs(device, dtype)
        if self.op == "StateUpdate":
            fn, Q = self._state_update_module(device)
            grad_inputs = [*grad_inputs, Q]
        else:
            fn = self.function()
        autocast = _autocast(device, dtype) if self.impl in REFERENCE_IMPLS else contextlib.nullcontext()

        def forward():
            with autocast:
                return fn(*args)

        backward = None
        if self.mode == "fwd+bwd":
            grad_out = torch.randn(out_shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)

            def backward(out):
                torch.autograd.grad(out, grad_inputs, grad_out.to(out.dtype))

        # Inputs and parameters (StateUpdate's Q) exist whether or not a graph is kept.
        persistent = [a for a in [*args, *grad_inputs] if isinstance(a, torch.Tensor)]
        return Bench(forward, backward, persistent, device)


_COMPILED: dict[str, Callable] = {}


def _compiled_reference(op: str) -> Callable:
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(getattr(reference, op), dynamic=False)
    return _COMPILED[op]


def op_cases(device_type: str, shapes, dtypes, impls, ops=OPS, modes=MODES) -> list[OpCase]:
    """Every (op, mode, shape, dtype, impl); ``impls`` must include ``"reference"``."""
    if "reference" not in impls:
        raise ValueError(f"impls: expected 'reference' among them (ratios are against it); got {impls}")
    return [
        OpCase(op, mode, impl, shape, dtype, device_type)
        for shape in shapes
        for dtype in dtypes
        for op in ops
        for mode in modes
        for impl in impls
    ]
