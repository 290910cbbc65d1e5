"""End-to-end benchmark cases: a DFM training step or inference, reference against the fused
``unroll`` modes (see :mod:`dfm_fused.bench.cases`).

Besides the eager models:

- ``reference-compiled``: the reference ResNet DFM with ``layer1..4`` and
  ``frontend`` wrapped in ``torch.compile`` (default mode), as ``dfbmodels`` ships
  it; compiled on its first (warm-up) run, not timed.
- ``graphed``: the fused model (plain graph, ``checkpoint=False``) with the whole
  iteration captured by :func:`dfm_fused.capture_train_step` (training) or
  :func:`dfm_fused.capture_inference` (``mode="eval"``). Built with two calls
  made: the first runs eagerly (SGD creates its momentum buffers at its first
  step), the second captures, so every timed call is one replay.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from dfm_fused.bench._case_base import DTYPES, Bench, _autocast, _Case, _generator_seed

__all__ = ["COMPILED_MODULES", "E2E_ALL_IMPLS", "E2E_CHECKPOINT", "E2E_IMPLS", "E2E_MODES", "E2ECase",
           "compile_as_shipped", "e2e_cases", "graphed_forward", "models_available"]

# Every end-to-end implementation, and those run unless others are asked for.
E2E_ALL_IMPLS = ("reference", "reference-compiled", "fused", "fused-selective", "fused-nockpt", "graphed")
E2E_IMPLS = ("reference", "fused", "fused-selective", "fused-nockpt")
# The submodules dfbmodels wraps in torch.compile.
COMPILED_MODULES = ("frontend", "layer1", "layer2", "layer3", "layer4")
# The ``checkpoint`` of each fused end-to-end implementation.
E2E_CHECKPOINT = {"fused": True, "fused-selective": "selective"}
E2E_MODES = ("train", "eval")


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


def compile_as_shipped(model: torch.nn.Module) -> torch.nn.Module:
    for name in COMPILED_MODULES:
        setattr(model, name, torch.compile(getattr(model, name)))
    return model


def graphed_forward(case, model, optimizer, x, labels, autocast_dtype):
    """``forward()`` of a ``graphed`` bench: one replay of the captured iteration (or forward)."""
    import dfm_fused

    if case.mode == "eval":
        infer = dfm_fused.capture_inference(model, x, case.T, autocast_dtype=autocast_dtype)
        return lambda: infer(x)
    step = dfm_fused.capture_train_step(model, optimizer, torch.nn.functional.cross_entropy, (x, labels), case.T,
                                        autocast_dtype=autocast_dtype)

    def forward():
        optimizer.zero_grad(set_to_none=True)
        return step(x, labels)

    forward()
    forward()
    if step.counts["replays"] != 1:
        raise RuntimeError(f"graphed: expected the second call to replay a captured graph; got {step.counts}")
    return forward


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
