"""ResNet DFMs on the fused ops, parameter for parameter the reference's.

``ResNet18/34/50(fb_filters, n_classes, shape, tau, *, checkpoint=True)`` have
the reference constructor and ``state_dict`` keys (less the ``_orig_mod.``
infixes; see :func:`dfm_fused.models.load_reference_state_dict`) and its step
(docs/design.md, 'Reference semantics'), with the feedback path as one ``feedback_input`` op and the
GroupNorm + decay + residual as one ``state_update`` op, unrolled by
:func:`dfm_fused.unroll`.

Differences from the reference, all deliberate:

- ``forward(x, T=5, h0=None, *, atol=None, ...)``: by default exactly ``T`` steps
  and no host sync; ``atol=1e-2`` restores the reference's early stop (read
  every ``check_every`` steps). ``h0`` replaces the random initial draw.
- the state is sized from the frontend output's height *and* width, and the
  feedback is resized to the frontend output's size, so any H, W works (the
  reference assumes square inputs whose size matches ``shape``).
- ``fb_filters=0`` (the reference's default, which crashes in its forward)
  runs without feedback.
"""
from __future__ import annotations

import torch
from torch import nn

from dfm_fused.feedback_model import FeedbackLoop
from dfm_fused.models._skeleton import ARCHITECTURES, build_resnet_dfm, state_spatial
from dfm_fused.modules import FeedbackInput, StateUpdate

__all__ = ["ResNet", "ResNet18", "ResNet34", "ResNet50"]


class ResNet(FeedbackLoop):
    """A ResNet DFM. ``forward(x, T, h0=None)`` -> logits (B, n_classes).

    State: (B, (512 + fb_filters) * e, ceil(H/32), ceil(W/32)), e the block expansion.
    ``checkpoint``: ``True`` (default) memory-saving backward flat in T, ``"selective"`` (keeps the
    convolution outputs, recomputes the cheap ops) or ``False`` (plain graph); settable attribute.
    """

    # The fused ops assume the frozen GroupNorm affines are the identity.
    fused_groupnorm_affine = True

    def __init__(
        self, arch: str, fb_filters: int = 0, n_classes: int = 200, shape=(64, 64), tau: float = 1.0,
        *, checkpoint: bool | str = True,
    ):
        # The decay module and T are registered by build_resnet_dfm, as in the reference.
        super().__init__(checkpoint=checkpoint, init_std=1e-3, reference_init=True)
        if arch not in ARCHITECTURES:
            raise ValueError(f"arch: expected one of {sorted(ARCHITECTURES)}; got {arch!r}")
        block, layers = ARCHITECTURES[arch]
        build_resnet_dfm(
            self, block, layers, fb_filters, n_classes, shape, tau,
            lambda channels: StateUpdate(channels, groups=8, tau=tau),
        )
        fb = fb_filters * self.block_expansion
        # No parameters: adds no state_dict keys.
        self.feedback = FeedbackInput(fb, self.pred_channels, groups=8) if fb else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x: expected (B, 3, H, W); got {tuple(x.shape)}")
        return self.frontend(x)

    def run_body(self, x_tilde: torch.Tensor) -> torch.Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(x_tilde))))

    def step_modules(self):
        return [self.layer1, self.layer2, self.layer3, self.layer4, self.error_head]

    def predict(self, h: torch.Tensor) -> torch.Tensor:
        return self.classification_head(h[:, : self.pred_channels])

    def state_size(self, x: torch.Tensor) -> tuple[int, int]:
        return state_spatial(x.shape[-2:])


def _variant(arch: str, default_shape):
    class Variant(ResNet):
        def __init__(
            self, fb_filters: int = 0, n_classes: int = 200, shape=default_shape, tau: float = 1.0,
            *, checkpoint: bool | str = True,
        ):
            super().__init__(arch, fb_filters, n_classes, shape, tau, checkpoint=checkpoint)

    return Variant


class ResNet18(_variant("resnet18", (64, 64))):
    """ResNet18 DFM (BasicBlock, [2, 2, 2, 2])."""


class ResNet34(_variant("resnet34", (64, 64))):
    """ResNet34 DFM (BasicBlock, [3, 4, 6, 3])."""


class ResNet50(_variant("resnet50", (224, 224))):
    """ResNet50 DFM (Bottleneck, [3, 4, 6, 3]); 224x224 default shape as in the reference."""
