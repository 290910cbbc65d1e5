"""A C x C channel matrix applied per pixel, and the outer product summed over pixels, as ATen GEMMs.

Both keep the input's layout: channels-last tensors are read as (pixels, C) rows without a copy.
"""
from __future__ import annotations

import torch

__all__ = ["apply_channel_matrix", "outer_over_pixels"]


# Pixels per image from which a per-image GEMM (C x C by C x H*W) is wide enough to run near full speed.
_WIDE_IMAGE = 64


def _pixels_last(x: torch.Tensor) -> bool:
    """True when ``x`` (B, C, H, W) is stored channels-last, so (B*H*W, C) is a free view."""
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def apply_channel_matrix(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M @ x[b, :, i, j]`` for every pixel: one GEMM, in ``M``'s dtype, keeping ``x``'s layout.

    ``x`` is ``(B, C, H, W)``; ``M`` is ``(C, C)``. Channels-last inputs give a
    channels-last result without a copy; anything else is read as NCHW.
    """
    x = x.to(M.dtype)
    B, C, H, W = x.shape
    if _pixels_last(x):
        # Rows are pixels here, so the product is x_rows @ M^T.
        return (x.permute(0, 2, 3, 1).reshape(-1, C) @ M.t()).view(B, H, W, C).permute(0, 3, 1, 2)
    if H * W < _WIDE_IMAGE:
        # Small images (the operating point's 2x2 states): one wide GEMM over all pixels, with a
        # copy to (C, B*H*W) and back, instead of B thin ones.
        wide = M @ x.transpose(0, 1).reshape(C, -1)
        return wide.view(C, B, H, W).transpose(0, 1).contiguous()
    return torch.matmul(M, x.reshape(B, C, H * W)).view(B, C, H, W)


def outer_over_pixels(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``A = sum over batch and pixels of x g^T``, shape ``(C, C)``, in ``x``'s dtype.

    Deterministic (plain GEMMs and a fixed-order sum, no atomics).
    """
    B, C, H, W = x.shape
    g = g.to(x.dtype)
    if _pixels_last(x) and _pixels_last(g):
        return x.permute(0, 2, 3, 1).reshape(-1, C).t() @ g.permute(0, 2, 3, 1).reshape(-1, C)
    x3, g3 = x.reshape(B, C, H * W), g.reshape(B, C, H * W)
    if C <= 2 * H * W:
        # (B, C, C) partials are no larger than copying x and g to (C, B*H*W).
        return torch.matmul(x3, g3.transpose(1, 2)).sum(0)
    return x3.transpose(0, 1).reshape(C, -1) @ g3.transpose(0, 1).reshape(C, -1).t()
