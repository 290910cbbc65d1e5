"""GroupNorm through ATen's native kernels, for the ``torch`` backends.

Forward returns the per-group statistics so that a backward can rebuild the normalised
tensor from ``y`` instead of saving it.
"""
from __future__ import annotations

import torch

__all__ = ["group_norm_backward", "group_norm_stats", "group_normalize"]


def group_norm_stats(y: torch.Tensor, groups: int, eps: float, weight: torch.Tensor | None = None):
    """``(weight * normalised y, mean, rstd)`` of y (B, C, H, W); mean and rstd are ``(B, groups)`` in y's dtype."""
    B, C, H, W = y.shape
    # torch 2.11's CPU kernel rejects inputs dense in neither NCHW nor NHWC (2.14's takes them).
    if not (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)):
        y = y.contiguous()
    return torch.ops.aten.native_group_norm(y, weight, None, B, C, H * W, groups, eps)


def group_normalize(y, mean, rstd, groups):
    """``(y - mean) * rstd`` per group, from saved statistics; y (B, C, H, W), mean and rstd (B, groups)."""
    B, C, H, W = y.shape
    y5 = y.reshape(B, groups, C // groups, H * W)
    return ((y5 - mean.view(B, groups, 1, 1)) * rstd.view(B, groups, 1, 1)).view(B, C, H, W)


def group_norm_backward(grad_n, y, mean, rstd, groups, weight: torch.Tensor | None = None):
    """Gradient of ``weight * GroupNorm(y)`` (default: no affine) w.r.t. ``y``, given its gradient ``grad_n``."""
    B, C, H, W = y.shape
    return torch.ops.aten.native_group_norm_backward(
        grad_n, y, mean, rstd, weight, B, C, H * W, groups, [True, False, False]
    )[0]
