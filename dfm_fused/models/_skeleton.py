"""The module layout of the reference ResNet DFM (``dfbmodels/models/resnet.py``).

Both :mod:`dfm_fused.models.resnet` (fused) and :mod:`dfm_fused.models.reference`
(literal transcription) build their modules here, in the reference's
registration order, so that one ``state_dict`` loads into either and into the
reference itself (after :func:`dfm_fused.models.load_reference_state_dict`
strips the ``_orig_mod.`` infixes of its compiled layers).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dfm_fused import _checks
from dfm_fused.models._blocks import BasicBlock, Bottleneck, init_resnet_weights, make_layer, resnet_frontend_modules

ARCHITECTURES = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def build_resnet_dfm(
    model: nn.Module,
    block,
    layers,
    fb_filters: int,
    n_classes: int,
    shape,
    tau: float,
    error_head: Callable[[int], nn.Module],
) -> None:
    """Register the reference ResNet DFM's modules and parameters on ``model``.

    ``error_head(channels)`` builds the state update module (the reference
    ``StateExpDecay`` or the fused ``StateUpdate``), registered as ``error_head``.
    """
    fb_filters = _checks.integer("fb_filters", fb_filters, 0)
    n_classes = _checks.integer("n_classes", n_classes, 1)
    if len(tuple(shape)) != 2:
        raise ValueError(f"shape: expected (height, width); got {shape!r}")
    e = block.expansion
    if (fb_filters * e) % 8:
        raise ValueError(
            f"fb_filters: expected fb_filters * {e} (block expansion) divisible by 8 for the feedback GroupNorm; "
            f"got fb_filters={fb_filters}"
        )
    model.shape = tuple(int(s) for s in shape)
    model.block_expansion = e
    model.fb_filters = fb_filters
    model.classes = n_classes
    model.in_channels = 64
    model.state_channels = (512 + fb_filters) * e
    model.pred_channels = 512 * e

    model.conv1, model.bn1, model.relu, model.maxpool = resnet_frontend_modules()
    model.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    model.fc = nn.Linear(512 * e, n_classes)
    model.layer1 = make_layer(block, 64 + fb_filters * e, 64, layers[0])
    model.layer2 = make_layer(block, 64 * e, 128, layers[1], stride=2)
    model.layer3 = make_layer(block, 128 * e, 256, layers[2], stride=2)
    model.layer4 = make_layer(block, 256 * e, 512 + fb_filters, layers[3], stride=2)
    model.frontend = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    init_resnet_weights(model, model.fc)
    model.classification_head = nn.Sequential(model.avgpool, nn.Flatten(start_dim=1), model.fc)
    model.error_head = error_head(model.state_channels)
    model.layernorm_error = nn.GroupNorm(8, model.state_channels)
    model.layernorm_input = nn.GroupNorm(8, fb_filters * e)
    for norm in (model.layernorm_error, model.layernorm_input):
        nn.init.constant_(norm.weight, 1)
        nn.init.constant_(norm.bias, 0)
        norm.weight.requires_grad = False
        norm.bias.requires_grad = False
    # Registered by the reference and never used; kept so checkpoints load. Frozen (with the
    # decay's unused Qinv) so that DistributedDataParallel needs no find_unused_parameters.
    model.layernorm_weight = nn.Parameter(torch.zeros(1, model.state_channels, 1, 1), requires_grad=False)
    if hasattr(model.error_head, "Qinv") and not getattr(model, "_literal", False):
        model.error_head.Qinv.requires_grad_(False)
    # The reference's step counter (a frozen 0-d parameter); after a forward it holds the steps run.
    model.T = nn.Parameter(torch.zeros(()), requires_grad=False)


def state_spatial(frontend_hw) -> tuple[int, int]:
    """The state's size: layer2..layer4 each halve with ceiling (3x3 stride-2, padding 1)."""
    return tuple(-(-int(s) // 8) for s in frontend_hw)
