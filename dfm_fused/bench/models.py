"""A small DFM for end-to-end benchmarks of :func:`dfm_fused.unroll` without the model zoo.

Same loop as the ResNet DFM (SPEC section 1) at a smaller size: a frontend run
once, a feedback projection of the state concatenated with its output, a conv
body down to the state's resolution, the exponential-decay state update, and a
linear head on the pooled class channels. ``fused=False`` runs the reference ops
(:mod:`dfm_fused.reference`) in a plain Python loop, as the reference package does;
``fused=True`` runs :class:`dfm_fused.FeedbackInput`, :class:`dfm_fused.StateUpdate`
and :func:`dfm_fused.unroll`. Both register the same parameters, so one's
``state_dict`` loads into the other.
"""
from __future__ import annotations

import torch
from torch import nn

from dfm_fused import reference
from dfm_fused.modules import FeedbackInput, StateUpdate
from dfm_fused.unroll import unroll


def _conv_bn(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _Step(nn.Module):
    """One DFM step ``(x, h, t) -> h_next``: feedback, body, state update."""

    def __init__(self, fused: bool, width: int, classes_ch: int, fb: int, tau: float):
        super().__init__()
        self.fused, self.classes_ch, self.fb = fused, classes_ch, fb
        state_ch = classes_ch + fb
        self.body = nn.Sequential(
            _conv_bn(width + fb, 2 * width, 1),
            _conv_bn(2 * width, 2 * width, 2),
            _conv_bn(2 * width, 4 * width, 2),
            nn.Conv2d(4 * width, state_ch, 1),
        )
        self.feedback = FeedbackInput(fb, offset=classes_ch, groups=8)
        self.update = StateUpdate(state_ch, groups=8, tau=tau)

    def forward(self, x: torch.Tensor, h: torch.Tensor, t: int) -> torch.Tensor:
        if self.fused:
            return self.update(h, self.body(self.feedback(x, h)), t)
        u = self.update
        y = self.body(reference.feedback_input(x, h, self.classes_ch, self.fb, self.feedback.groups))
        if self.training and t == 0:  # the reference re-orthogonalises Q at each forward's first step
            u.reorthogonalize(u.Q)
        return reference.state_update(h, y, u.Q, u.S, u.T * t, u.tau, u.alpha, u.groups, u.eps)


class SmallDFM(nn.Module):
    """Images ``(B, 3, H, W)`` -> logits ``(B, n_classes)`` after ``T`` feedback steps.

    State ``(B, classes_ch + fb, H/16, W/16)``; feedback of the last ``fb`` state
    channels at the frontend's resolution ``H/4``.
    """

    def __init__(self, fused: bool, checkpoint: bool | str = True, width: int = 64, classes_ch: int = 256, fb: int = 8,
                 n_classes: int = 200, tau: float = 1.0):
        super().__init__()
        self.fused, self.checkpoint = fused, checkpoint
        self.classes_ch, self.fb = classes_ch, fb
        self.frontend = nn.Sequential(_conv_bn(3, width, 2), _conv_bn(width, width, 2))
        self.loop = _Step(fused, width, classes_ch, fb, tau)
        self.fc = nn.Linear(classes_ch, n_classes)

    def forward(self, images: torch.Tensor, T: int, h0: torch.Tensor | None = None) -> torch.Tensor:
        x = self.frontend(images)
        if h0 is None:
            B, _, H, W = images.shape
            h0 = 1e-3 * torch.randn(B, self.classes_ch + self.fb, H // 16, W // 16, device=x.device)
        if self.fused:
            # The step is its own module: unroll freezes its BatchNorm statistics in the
            # replays; the frontend's BatchNorm runs once, outside the loop.
            h = unroll(self.loop, x, h0, T, checkpoint=self.checkpoint)
        else:
            h = h0
            for t in range(T):
                h = self.loop(x, h, t)
        return self.fc(h[:, : self.classes_ch].mean(dim=(2, 3)))
