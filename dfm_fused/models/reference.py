"""Literal transcription of the reference ResNet DFM (``dfbmodels/models/resnet.py``), and the
reference twin of the small benchmark DFM (:class:`ReferenceSmallDFM`).

A second oracle next to :mod:`dfm_fused.reference`: the reference's
``StateExpDecay``, its feedback path (slice, ``interpolate``, ``GroupNorm``
module, ``softmax``, ``cat``), a plain autograd graph through every step and its
``to_equilibrium`` loop (state zeroed before the loop, ``.item()`` host sync and
``atol`` early stop after every step). Nothing here is optimised. Same
constructor and parameter names as :mod:`dfm_fused.models.resnet`, so one
state_dict loads into both. The only additions: ``forward`` accepts ``h0``
(used instead of the random N(0, 1e-3) draw) and records ``steps_run``; the
layers are not wrapped in ``torch.compile``.

:class:`ReferenceSmallDFM` runs :class:`dfm_fused.models.small.SmallDFM`'s loop with the
reference ops (:mod:`dfm_fused.reference`) in a plain Python loop, as the reference package does.
"""
from __future__ import annotations

import torch
from torch import nn

from dfm_fused import reference
from dfm_fused.models._skeleton import ARCHITECTURES, build_resnet_dfm
from dfm_fused.models.small import GROUPS, small_body, small_frontend, small_initial_state
from dfm_fused.reference import StateExpDecay

__all__ = ["ReferenceResNet", "ReferenceResNet18", "ReferenceResNet34", "ReferenceResNet50", "ReferenceSmallDFM"]


class ReferenceResNet(nn.Module):
    """The reference ResNet DFM. ``forward(x, T, h0=None, atol=1e-2)`` -> logits (B, n_classes)."""

    def __init__(self, arch: str, fb_filters: int = 0, n_classes: int = 200, shape=(64, 64), tau: float = 1.0):
        super().__init__()
        self._literal = True
        block, layers = ARCHITECTURES[arch]
        build_resnet_dfm(
            self, block, layers, fb_filters, n_classes, shape, tau,
            lambda channels: StateExpDecay(channels, (self.shape[0] // 4, self.shape[1] // 4), tau=tau),
        )
        self.layernorm_weight.requires_grad_(True)  # the reference's flag (unused either way)
        self.state = torch.zeros(())
        self.steps_run = 0

    @property
    def states(self):
        return {"layer4": self.state}

    @property
    def inlayer1(self) -> torch.Tensor:
        e = self.block_expansion
        v = self.state[:, 512 * e:(512 + self.fb_filters) * e]
        v = torch.nn.functional.interpolate(v, size=(self.shape[0] // 4, self.shape[1] // 4), mode="bilinear")
        return torch.softmax(self.layernorm_input(v), dim=1)

    def _init_states(self, x: torch.Tensor, h0: torch.Tensor | None) -> None:
        # The reference sizes both state dimensions from the height.
        shape = (x.shape[0], self.state_channels, x.shape[2] // 8, x.shape[2] // 8)
        if h0 is None:
            self.state = torch.ones(shape, device=x.device)
            torch.nn.init.normal_(self.state, mean=0.0, std=1e-3)
        else:
            if tuple(h0.shape) != shape:
                raise ValueError(f"h0: expected shape {shape}; got {tuple(h0.shape)}")
            self.state = h0.detach().clone()

    def init_states(self) -> None:
        for state in self.states.values():
            torch.nn.init.zeros_(state)

    def step(self, x: torch.Tensor) -> None:
        x = self.layer1(torch.concat((x, self.inlayer1), dim=1))
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        self.state = self.state + self.error_head(self.layernorm_error(x), T=self.T)
        torch.nn.init.constant_(self.T, self.T + 1)
        self.steps_run += 1

    def prediction(self) -> torch.Tensor:
        return self.classification_head(self.state[:, : 512 * self.block_expansion])

    def to_equilibrium(self, x: torch.Tensor, T=None, atol: float = 1e-2) -> None:
        if T is not None and T <= 0:
            return
        self.init_states()
        if T is None:
            T = 2**32 - 1
        prev = float("inf")
        for _ in range(T):
            self.step(x)
            eq_val = sum(state.abs().sum() for state in self.states.values()).item()
            if abs(eq_val - prev) <= atol:
                break
            prev = eq_val

    def forward(self, x: torch.Tensor, T: int = 0, h0: torch.Tensor | None = None, atol: float = 1e-2) -> torch.Tensor:
        x = self.frontend(x)
        torch.nn.init.zeros_(self.T)
        self.steps_run = 0
        self._init_states(x, h0)
        if T == 0:
            return self.prediction()
        self.to_equilibrium(x, T=T - 1, atol=atol)
        self.step(x)
        return self.prediction()


def _variant(arch: str, default_shape):
    class Variant(ReferenceResNet):
        def __init__(self, fb_filters: int = 0, n_classes: int = 200, shape=default_shape, tau: float = 1.0):
            super().__init__(arch, fb_filters=fb_filters, n_classes=n_classes, shape=shape, tau=tau)

    return Variant


class ReferenceResNet18(_variant("resnet18", (64, 64))):
    """Reference ResNet18 DFM (BasicBlock, [2, 2, 2, 2])."""


class ReferenceResNet34(_variant("resnet34", (64, 64))):
    """Reference ResNet34 DFM (BasicBlock, [3, 4, 6, 3])."""


class ReferenceResNet50(_variant("resnet50", (224, 224))):
    """Reference ResNet50 DFM (Bottleneck, [3, 4, 6, 3]); 224x224 default shape as in the reference."""


class _ReferenceSmallStep(nn.Module):
    """:class:`dfm_fused.models.small.SmallDFM`'s step on the reference ops; same parameter names."""

    def __init__(self, width: int, classes_ch: int, fb: int, tau: float):
        super().__init__()
        self.classes_ch, self.fb = classes_ch, fb
        state_ch = classes_ch + fb
        self.body = small_body(width, fb, state_ch)
        self.update = StateExpDecay(state_ch, (1, 1), tau=tau)

    def forward(self, x: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        y = self.body(reference.feedback_input(x, h, self.classes_ch, self.fb, GROUPS))
        # StateExpDecay re-orthogonalises Q at t == 0 in training, as the reference does.
        return h + self.update(torch.nn.functional.group_norm(y, GROUPS, eps=1e-5), T=t)


class ReferenceSmallDFM(nn.Module):
    """Reference twin of :class:`dfm_fused.models.small.SmallDFM` (same arguments but ``checkpoint``)."""

    def __init__(self, width: int = 64, classes_ch: int = 256, fb: int = 8, n_classes: int = 200, tau: float = 1.0):
        super().__init__()
        self.classes_ch, self.fb = classes_ch, fb
        self.frontend = small_frontend(width)
        self.loop = _ReferenceSmallStep(width, classes_ch, fb, tau)
        self.fc = nn.Linear(classes_ch, n_classes)

    def forward(self, images: torch.Tensor, T: int, h0: torch.Tensor | None = None) -> torch.Tensor:
        x = self.frontend(images)
        h = small_initial_state(images, self.classes_ch + self.fb, x.device) if h0 is None else h0
        for t in range(T):
            h = self.loop(x, h, t)
        return self.fc(h[:, : self.classes_ch].mean(dim=(2, 3)))
