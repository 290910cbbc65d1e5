"""A small DFM, for end-to-end benchmarks and tests that need a whole model but not a ResNet.

Same loop as the ResNet DFM (docs/design.md, 'The feedback loop') at a smaller size: a frontend run once, a
feedback projection of the state concatenated with its output, a conv body down to the
state's resolution, the exponential-decay state update, and a linear head on the pooled
class channels. :class:`SmallDFM` runs :class:`dfm_fused.FeedbackInput`,
:class:`dfm_fused.StateUpdate` and :func:`dfm_fused.unroll`; its literal twin is
:class:`dfm_fused.models.reference.ReferenceSmallDFM` (the reference ops in a plain Python
loop). Both register the same parameters, so one's ``state_dict`` loads into the other.
"""
from __future__ import annotations

import torch
from torch import nn

from dfm_fused.modules import FeedbackInput, StateUpdate
from dfm_fused.unroll import unroll

__all__ = ["SmallDFM", "small_body", "small_frontend", "small_initial_state"]

# GroupNorm groups of the feedback projection and of the state update.
GROUPS = 8


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def small_frontend(width: int) -> nn.Sequential:
    """Images (B, 3, H, W) -> (B, width, H/4, W/4)."""
    return nn.Sequential(_conv_bn(3, width, 2), _conv_bn(width, width, 2))


def small_body(width: int, fb: int, state_ch: int) -> nn.Sequential:
    """(B, width + fb, H/4, W/4) -> (B, state_ch, H/16, W/16)."""
    return nn.Sequential(
        _conv_bn(width + fb, 2 * width, 1),
        _conv_bn(2 * width, 2 * width, 2),
        _conv_bn(2 * width, 4 * width, 2),
        nn.Conv2d(4 * width, state_ch, 1),
    )


def small_initial_state(images: torch.Tensor, channels: int, device) -> torch.Tensor:
    """The N(0, 1e-3) state ``(B, channels, H/16, W/16)`` drawn when no ``h0`` is given."""
    B, _, H, W = images.shape
    return 1e-3 * torch.randn(B, channels, H // 16, W // 16, device=device)


class _Step(nn.Module):
    """One DFM step ``(x, h, t) -> h_next``: feedback, body, state update."""

    def __init__(self, width: int, classes_ch: int, fb: int, tau: float):
        super().__init__()
        state_ch = classes_ch + fb
        self.body = small_body(width, fb, state_ch)
        self.feedback = FeedbackInput(fb, offset=classes_ch, groups=GROUPS)
        self.update = StateUpdate(state_ch, groups=GROUPS, tau=tau)

    def forward(self, x: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        return self.update(h, self.body(self.feedback(x, h)), t)


class SmallDFM(nn.Module):
    """Images ``(B, 3, H, W)`` -> logits ``(B, n_classes)`` after ``T`` feedback steps.

    State ``(B, classes_ch + fb, H/16, W/16)``; feedback of the last ``fb`` state
    channels at the frontend's resolution ``H/4``. ``checkpoint`` as in :func:`dfm_fused.unroll`.
    """

    def __init__(self, checkpoint: bool | str = True, width: int = 64, classes_ch: int = 256, fb: int = 8,
                 n_classes: int = 200, tau: float = 1.0):
        super().__init__()
        self.checkpoint = checkpoint
        self.classes_ch, self.fb = classes_ch, fb
        self.frontend = small_frontend(width)
        self.loop = _Step(width, classes_ch, fb, tau)
        self.fc = nn.Linear(classes_ch, n_classes)

    def forward(self, images: torch.Tensor, T: int, h0: torch.Tensor | None = None) -> torch.Tensor:
        x = self.frontend(images)
        if h0 is None:
            h0 = small_initial_state(images, self.classes_ch + self.fb, x.device)
        # The step is its own module: unroll freezes its BatchNorm statistics in the replays;
        # the frontend's BatchNorm runs once, outside the loop.
        h = unroll(self.loop, x, h0, T, checkpoint=self.checkpoint)
        return self.fc(h[:, : self.classes_ch].mean(dim=(2, 3)))
