"""What op and end-to-end benchmark cases share: shapes, dtypes, implementation names, the built
:class:`Bench`, and the seeding and naming of cases (see :mod:`dfm_fused.bench.cases`)."""
from __future__ import annotations

import contextlib
import dataclasses
import zlib
from dataclasses import dataclass
from typing import Callable

import torch

import dfm_fused

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
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


# The operating point (docs/design.md, 'The operating point': dfbmodels' ResNet18 DFM on 64x64 Tiny ImageNet, B=128:
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
