"""Benchmark cases, shared by the ``benchmarks/`` pytest suite and the CLI.

A case is a frozen description (op or model, shape, dtype, device, implementation)
that :meth:`build` turns into a :class:`Bench`: ready inputs and a ``run()`` that
does one forward (and backward) pass and waits for the device. Cases compare
implementations on the same inputs: every case of a :attr:`group` builds the
same tensors from the same seed.

Implementations (``impl``): ``reference`` (:mod:`dfm_fused.reference`, eager),
``reference-compiled`` (the reference under ``torch.compile``, as ``dfbmodels`` ships its
layers) and the dfm_fused backends (``torch``, ``triton``, and ``extension``, named ``cpp`` on the
CPU and ``cuda`` on a GPU as in earlier results) forced with ``backend=``. Op cases: the three ops, and ``StateUpdate``: the module in training after
its QR at t=0, which takes the scalar-decay path (SPEC section 7), against the reference's
``h + StateExpDecay(GroupNorm(y), t)``. End-to-end
cases compare a reference model (plain graph over T steps; ``reference-compiled``:
its layers under ``torch.compile`` as shipped) with the dfm_fused model in the three
``unroll`` modes: full recompute (``fused``, ``checkpoint=True``), selective
(``fused-selective``) and the plain graph (``fused-nockpt``), and with the
whole iteration as one CUDA graph (``graphed``, :mod:`dfm_fused.bench.e2e`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

import dfm_fused
from dfm_fused import reference

__all__ = [
    "Bench",
    "E2ECase",
    "OpCase",
    "Shape",
    "case_from_spec",
    "default_shapes",
    "e2e_cases",
    "fused_impls",
    "models_available",
    "op_cases",
    "parse_shape",
]

OPS = ("exp_decay", "feedback_input", "state_update", "StateUpdate")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
E2E_IMPLS = ("reference", "fused", "fused-selective", "fused-nockpt")
# The ``checkpoint`` of each fused end-to-end implementation.
E2E_CHECKPOINT = {"fused": True, "fused-selective": "selective"}
E2E_MODES = ("train", "eval")
REFERENCE_IMPLS = ("reference", "reference-compiled")


@dataclass(frozen=True)
class Shape:
    """Sizes of one benchmark setting.

    The state and the inputs of ``exp_decay`` / ``state_update`` are ``(B, C, H, W)``
    with ``groups`` GroupNorm groups. ``feedback_input`` takes ``x`` ``(B, Cx, fH, fW)``
    and feeds back the last ``fb`` channels of the state, normalised in ``fb_groups``
    groups.
    """

    name: str
    B: int
    C: int
    H: int
    W: int
    groups: int
    Cx: int
    fb: int
    fb_groups: int
    fH: int
    fW: int

    def label(self) -> str:
        return (
            f"{self.name}[B={self.B} C={self.C} {self.H}x{self.W} g={self.groups}; "
            f"fb: Cx={self.Cx} fb={self.fb} {self.fH}x{self.fW}]"
        )


# The operating point (SPEC section 7: dfbmodels' ResNet18 DFM on 64x64 Tiny ImageNet, B=128:
# 528x2x2 state, 16x16 frontend map), ResNet18 DFM at 224x224 (7x7 state, 56x56 frontend map)
# and the DeepLabV3+ DFM at 512x512 (state at H/4 with 256+fb channels and 256+fb groups,
# feedback at H/2), in this order of importance.
OPERATING_POINT = Shape("operating-point", B=128, C=528, H=2, W=2, groups=8, Cx=64, fb=16, fb_groups=8, fH=16, fW=16)
GPU_SHAPES = {
    "operating-point": OPERATING_POINT,
    "resnet18": Shape("resnet18", B=64, C=520, H=7, W=7, groups=8, Cx=64, fb=16, fb_groups=8, fH=56, fW=56),
    "segmentation": Shape(
        "segmentation", B=8, C=258, H=128, W=128, groups=258, Cx=64, fb=2, fb_groups=2, fH=256, fW=256
    ),
}
# Scaled down on the CPU (batch and spatial size) so the suite runs in minutes.
CPU_SHAPES = {
    "operating-point": OPERATING_POINT,
    "resnet18": dataclasses.replace(GPU_SHAPES["resnet18"], B=8),
    "segmentation": dataclasses.replace(GPU_SHAPES["segmentation"], B=1, H=32, W=32, fH=64, fW=64),
}
QUICK_SHAPES = {
    "operating-point": dataclasses.replace(OPERATING_POINT, B=4, C=40, fH=8, fW=8),
    "resnet18": dataclasses.replace(GPU_SHAPES["resnet18"], B=2, H=4, W=4, fH=16, fW=16),
    "segmentation": dataclasses.replace(GPU_SHAPES["segmentation"], B=1, H=8, W=8, fH=16, fW=16),
}


def default_shapes(device_type: str, quick: bool = False) -> dict[str, Shape]:
    if quick:
        return dict(QUICK_SHAPES)
    return dict(GPU_SHAPES if device_type == "cuda" else CPU_SHAPES)


def parse_shape(text: str, device_type: str, quick: bool = False) -> Shape:
    """``"resnet18"`` or ``"resnet18:B=8,H=16,W=16"`` (a preset with fields overridden)."""
    presets = default_shapes(device_type, quick)
    name, _, overrides = text.partition(":")
    if name not in presets:
        raise ValueError(f"shape: expected one of {', '.join(presets)} (optionally ':FIELD=N,...'); got {text!r}")
    fields = {f.name for f in dataclasses.fields(Shape)} - {"name"}
    changes = {}
    for item in filter(None, overrides.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in fields or not value.isdigit() or int(value) < 1:
            raise ValueError(
                f"shape: expected FIELD=N with FIELD in {sorted(fields)} and N >= 1; got {item!r} in {text!r}"
            )
        changes[key] = int(value)
    shape = dataclasses.replace(presets[name], **changes)
    if shape.fb > shape.C or shape.C % shape.groups or shape.fb % shape.fb_groups:
        raise ValueError(f"shape: need fb <= C, groups | C and fb_groups | fb; got {shape}")
    if overrides:
        shape = dataclasses.replace(shape, name=f"{name}:{overrides}")
    return shape


# Impl names of the extension backend per device: the names of its two former backends, which
# the committed results use.
EXTENSION_IMPLS = {"cpu": "cpp", "cuda": "cuda"}


def backend_of(impl: str) -> str:
    """The dfm_fused backend an impl name forces."""
    return "extension" if impl in EXTENSION_IMPLS.values() else impl


def fused_impls(device_type: str) -> list[str]:
    """dfm_fused backends worth timing on ``device_type`` (Triton on the CPU is an interpreter)."""
    names = [EXTENSION_IMPLS[device_type] if b == "extension" else b
             for b in dfm_fused.available_backends(device_type) if b != "reference"]
    return [b for b in names if not (device_type == "cpu" and b == "triton")]


@dataclass
class Bench:
    """A built case: ``forward()`` returns the graph's root; ``run()`` is one timed iteration.

    ``persistent`` holds the tensors that exist whether or not the pass runs
    (inputs, parameters); memory figures leave them out.
    """

    forward: Callable[[], torch.Tensor]
    backward: Callable[[torch.Tensor], None] | None
    persistent: list[torch.Tensor]
    device: torch.device

    def run(self) -> None:
        out = self.forward()
        if self.backward is not None:
            self.backward(out)
        del out
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _autocast(device: torch.device, dtype: torch.dtype):
    """Half-precision reference runs need autocast: its ``linear`` mixes x's dtype with float32 Q."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()


def _generator_seed(*parts) -> int:
    """A seed that depends only on what the cases of one group share."""
    return zlib.crc32(repr(parts).encode())


class _Case:
    """Naming shared by op and end-to-end cases: ``group`` is what is compared, ``impl`` who runs it."""

    group: str
    impl: str

    @property
    def id(self) -> str:
        return f"{self.group} {self.impl}"

    @property
    def is_reference(self) -> bool:
        return self.impl == "reference"


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


@dataclass(frozen=True)
class E2ECase(_Case):
    """A DFM training step (forward over T steps, cross-entropy, backward to every parameter).

    ``model``: ``resnet18`` (:mod:`dfm_fused.models`, ``fb_filters=16``, 200 classes)
    or ``small`` (:class:`dfm_fused.models.small.SmallDFM`; its reference:
    :class:`dfm_fused.models.reference.ReferenceSmallDFM`).
    """

    model: str
    impl: str
    T: int
    B: int
    image: tuple[int, int]
    dtype: str
    device: str
    mode: str = "train"

    kind = "e2e"

    @property
    def group(self) -> str:
        mode = " eval" if self.mode == "eval" else ""
        return f"e2e {self.model}{mode} T={self.T} B={self.B} {self.image[0]}x{self.image[1]} {self.dtype}"

    @property
    def shape(self):
        return {"B": self.B, "image": list(self.image), "T": self.T, "mode": self.mode}

    def spec(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self)}

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        checkpoint = E2E_CHECKPOINT.get(self.impl, False)
        if self.model == "small":
            from dfm_fused.models.reference import ReferenceSmallDFM
            from dfm_fused.models.small import SmallDFM

            fused = SmallDFM(checkpoint=checkpoint)
            model = fused if self.impl != "reference" else ReferenceSmallDFM()
        else:
            from dfm_fused import models

            kwargs = dict(fb_filters=16, n_classes=200, shape=self.image, tau=1.0)
            fused = models.ResNet18(**kwargs, checkpoint=checkpoint)
            reference = self.impl in ("reference", "reference-compiled")
            model = models.reference.ReferenceResNet18(**kwargs) if reference else fused
        if model is not fused:
            model.load_state_dict(fused.state_dict())
        if self.impl == "reference-compiled":
            if self.model != "resnet18":
                raise ValueError(f"reference-compiled: the reference ResNet DFM only; got model {self.model!r}")
            from dfm_fused.bench.e2e import compile_as_shipped

            compile_as_shipped(model)
        return model.to(self.device).train(self.mode == "train")

    def build(self) -> Bench:
        device, dtype = torch.device(self.device), DTYPES[self.dtype]
        model = self.build_model()
        g = torch.Generator().manual_seed(_generator_seed(self.B, self.image))
        x = torch.randn(self.B, 3, *self.image, generator=g).to(device)
        labels = torch.randint(0, model.fc.out_features, (self.B,), generator=g).to(device)
        persistent = [x, labels, *model.parameters(), *model.buffers()]
        autocast = _autocast(device, dtype)
        # A training iteration ends with an SGD step, as the captured one does; gradients are
        # dropped after it, so each iteration allocates them as autograd.grad would.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if self.mode == "train" else None
        if self.impl == "graphed":
            from dfm_fused.bench.e2e import graphed_forward

            half = dtype if dtype in (torch.float16, torch.bfloat16) else None
            return Bench(graphed_forward(self, model, optimizer, x, labels, half), None, persistent, device)
        # The reference's early stop (atol=1e-2 by default) must not cut its T steps short:
        # every implementation runs exactly T steps (the reference still reads sum|h| each step).
        kwargs = {"atol": -1.0} if self.model == "resnet18" and self.impl.startswith("reference") else {}

        if self.mode == "eval":
            def forward():
                with torch.no_grad(), autocast:
                    return model(x, self.T, **kwargs)

            return Bench(forward, None, persistent, device)

        def forward():
            with autocast:
                logits = model(x, self.T, **kwargs)
            return torch.nn.functional.cross_entropy(logits.float(), labels)

        def backward(loss):
            loss.backward()  # Qinv gets no gradient, as in the reference
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return Bench(forward, backward, persistent, device)


def models_available() -> str | None:
    """None if :mod:`dfm_fused.models` can be imported, else why not."""
    try:
        from dfm_fused import models  # noqa: F401
        from dfm_fused.models import reference as _  # noqa: F401
    except ImportError as exc:
        return f"dfm_fused.models is not available ({exc})"
    return None


def e2e_cases(device_type: str, model: str, Ts, B: int, image, dtype: str = "float32", impls=E2E_IMPLS,
              mode: str = "train"):
    if mode not in E2E_MODES:
        raise ValueError(f"mode: expected one of {E2E_MODES}; got {mode!r}")
    return [E2ECase(model, impl, T, B, tuple(image), dtype, device_type, mode) for T in Ts for impl in impls]


def case_from_spec(spec: dict):
    """Inverse of ``case.spec()``."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind == "op":
        return OpCase(**{**spec, "shape": Shape(**spec["shape"])})
    return E2ECase(**{**spec, "image": tuple(spec["image"])})
