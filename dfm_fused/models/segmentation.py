"""An encoder-decoder DFM for dense prediction, shaped like the reference DeepLabV3+ DFM.

Frontend (once): 3x3 stride-2 conv, norm, ReLU -> (B, width, H/2, W/2). Each step
feeds the state's feedback channels back at H/2 (bilinear resize, GroupNorm with
``fb_filters`` groups, softmax), then the body: max-pool to H/4, three residual
stages (H/4, H/8, H/16), an atrous pyramid at H/16, and a DeepLabV3+ decoder
that upsamples to H/4 and merges the H/4 features into the state's
``class_filters + fb_filters`` channels. The state lives at H/4; the head is a
1x1 conv to ``classes`` logits upsampled by 4 to the input size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dfm_fused import _checks
from dfm_fused.feedback_model import FeedbackLoop
from dfm_fused.models._blocks import BasicBlock
from dfm_fused.modules import FeedbackInput, StateUpdate

__all__ = ["SegmentationDFM"]


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(math.gcd(8, channels), channels)


def _conv_norm_relu(cin: int, cout: int, norm: str, kernel: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False), _norm(norm, cout), nn.ReLU(inplace=True)
    )


class _Stage(nn.Sequential):
    """``blocks`` BasicBlocks; the first projects with a 1x1 conv when the shape changes."""

    def __init__(self, cin: int, cout: int, blocks: int, stride: int, norm: str):
        down = None
        if stride != 1 or cin != cout:
            down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout))
        layers = [BasicBlock(cin, cout, stride, down)] + [BasicBlock(cout, cout) for _ in range(1, blocks)]
        if norm != "batch":
            for block in layers:
                block.bn1, block.bn2 = _norm(norm, cout), _norm(norm, cout)
        super().__init__(*layers)


class _ASPP(nn.Module):
    """Atrous pyramid: 1x1, two dilated 3x3 and image pooling, fused by a 1x1 conv."""

    def __init__(self, cin: int, cout: int, rates, norm: str):
        super().__init__()
        self.branches = nn.ModuleList(
            [_conv_norm_relu(cin, cout, norm, kernel=1)] + [_conv_norm_relu(cin, cout, norm, dilation=r) for r in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.ReLU(inplace=True))
        self.project = _conv_norm_relu(cout * (len(rates) + 2), cout, norm, kernel=1)

    def forward(self, x):
        pooled = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([b(x) for b in self.branches] + [pooled], dim=1))


class SegmentationDFM(FeedbackLoop):
    """Encoder-decoder DFM, state (B, class_filters + fb_filters, ceil(H/4), ceil(W/4)).

    Args:
        in_channels: input channels. classes: output classes per pixel.
        fb_filters: fed-back channels (>= 1). class_filters: prediction channels of the state.
        width: channels of the frontend and first stage (stages: width, 2 width, 4 width).
        blocks: BasicBlocks per stage. rates: atrous rates at H/16.
        norm: ``"batch"`` or ``"group"`` (GroupNorm, free of batch statistics) in the body.
        tau, alpha: decay parameters.
        checkpoint: ``True`` (default), ``"selective"`` or ``False``, as for :func:`dfm_fused.unroll`.
    ``forward(x, T=5, h0=None, ...)`` -> logits (B, classes, H', W') with H' = 4 ceil(H/4).
    """

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 2,
        fb_filters: int = 2,
        class_filters: int = 256,
        width: int = 64,
        blocks=(2, 2, 2),
        rates=(6, 12),
        norm: str = "batch",
        tau: float = 1.0,
        alpha: float = 1.0,
        *,
        checkpoint: bool | str = True,
    ):
        in_channels = _checks.integer("in_channels", in_channels, 1)
        classes = _checks.integer("classes", classes, 1)
        fb_filters = _checks.integer("fb_filters", fb_filters, 1)
        class_filters = _checks.integer("class_filters", class_filters, 1)
        width = _checks.integer("width", width, 1)
        if norm not in ("batch", "group"):
            raise ValueError(f"norm: expected 'batch' or 'group'; got {norm!r}")
        if len(tuple(blocks)) != 3:
            raise ValueError(f"blocks: expected 3 stage depths; got {blocks!r}")
        state_channels = class_filters + fb_filters
        frontend = _conv_norm_relu(in_channels, width, norm)
        frontend[0].stride = (2, 2)
        b1, b2, b3 = blocks
        decoder = max(state_channels, 8)
        # Built in this order (the random initial weights depend on it), registered in it.
        modules = dict(frontend=frontend, maxpool=nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        modules["stage1"] = _Stage(width + fb_filters, width, b1, 1, norm)
        modules["stage2"] = _Stage(width, 2 * width, b2, 2, norm)
        modules["stage3"] = _Stage(2 * width, 4 * width, b3, 2, norm)
        modules["aspp"] = _ASPP(4 * width, decoder, tuple(rates), norm)
        modules["low_level"] = _conv_norm_relu(width, 48, norm, kernel=1)
        modules["fuse"] = _conv_norm_relu(decoder + 48, decoder, norm)
        modules["to_state"] = nn.Conv2d(decoder, state_channels, 1)
        modules["segmentation_head"] = nn.Conv2d(class_filters, classes, 1)
        super().__init__(
            **modules,
            feedback=FeedbackInput(fb_filters, class_filters, groups=fb_filters),
            error_head=StateUpdate(state_channels, groups=state_channels, tau=tau, alpha=alpha),
            checkpoint=checkpoint,
            init_std=1e-3,
            reference_init=True,
        )
        self.in_channels = in_channels
        self.fb_filters, self.class_filters = fb_filters, class_filters
        self.pred_channels = class_filters
        self.state_channels = state_channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def encode(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x: expected (B, {self.in_channels}, H, W); got {tuple(x.shape)}")
        return self.frontend(x)

    def run_body(self, x_tilde):
        low = self.stage1(self.maxpool(x_tilde))
        deep = self.aspp(self.stage3(self.stage2(low)))
        deep = F.interpolate(deep, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.to_state(self.fuse(torch.cat([deep, self.low_level(low)], dim=1)))

    def step_modules(self):
        return [self.stage1, self.stage2, self.stage3, self.aspp, self.low_level, self.fuse, self.to_state, self.error_head]

    def predict(self, h):
        logits = self.segmentation_head(h[:, : self.class_filters])
        return F.interpolate(logits, scale_factor=4, mode="bilinear", align_corners=False)

    def state_size(self, x):
        return tuple(-(-s // 2) for s in x.shape[-2:])
