"""The decay ``Q^T diag(D) Q x`` per pixel and its backward, by the cheaper of two GEMM orders."""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import as_dtype
from dfm_fused.ops._decay import decay_grad_Q, decay_matrix
from dfm_fused.ops._torch.channel import apply_channel_matrix, outer_over_pixels

__all__ = ["decay_backward", "decay_forward", "scale_channels"]


def _pixels(x: torch.Tensor) -> int:
    return x.shape[0] * x.shape[2] * x.shape[3]


def scale_channels(D: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``D[c] * x[:, c]`` in ``dtype``: the decay ``M = diag(D)`` of the scalar path (``D`` uniform)."""
    return x.to(dtype) * D.to(dtype)[:, None, None]


def decay_forward(Q: torch.Tensor, D: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                  scalar: bool = False) -> torch.Tensor:
    """``Q^T diag(D) Q x`` per pixel in ``dtype``, by the cheaper of two GEMM orders.

    Forming ``M`` costs ``2 C^3`` flops and applying it ``2 P C^2`` (P pixels);
    applying ``Q``, ``D`` and ``Q^T`` in turn costs ``4 P C^2``. So ``M`` is formed
    only when there are at least as many pixels as channels. ``scalar``: ``Q`` is
    orthonormal and ``D`` uniform, so ``M = diag(D)`` and no GEMM runs.
    """
    if scalar:
        return scale_channels(D, x, dtype)
    C = Q.shape[0]
    if _pixels(x) >= C:
        return apply_channel_matrix(decay_matrix(Q, D, dtype), x)
    Q = Q.to(dtype)
    return apply_channel_matrix(Q.t(), D.to(dtype)[:, None, None] * apply_channel_matrix(Q, x))


def decay_backward(Q, D, x, g, dtype, need_x: bool, need_Q: bool, scalar: bool = False):
    """``(M g, diag(D) Q (A + A^T))`` with ``A = sum x g^T``, each only if needed, in ``dtype``.

    With few pixels (``6 P < 4 C``, by the same flop count as :func:`decay_forward`)
    neither ``M`` nor ``A`` is formed: ``grad_Q = sum (D*Qx) g^T + (D*Qg) x^T``.
    ``scalar`` (as in :func:`decay_forward`): ``M g = D g``; ``A`` is always formed, one
    GEMM instead of four.
    """
    C = Q.shape[0]
    grad_x = grad_Q = None
    if scalar:
        if need_x:
            grad_x = scale_channels(D, g, dtype)
        if need_Q:
            grad_Q = decay_grad_Q(Q, D, outer_over_pixels(x.to(dtype), g))
        return grad_x, grad_Q
    if 6 * _pixels(x) >= 4 * C:
        if need_x:
            grad_x = apply_channel_matrix(decay_matrix(Q, D, dtype), g)
        if need_Q:
            grad_Q = decay_grad_Q(Q, D, outer_over_pixels(x.to(dtype), g))
        return grad_x, grad_Q
    Q_c, D_c = Q.to(dtype), D.to(dtype)[:, None, None]
    Qg = apply_channel_matrix(Q_c, g)
    if need_x:
        grad_x = apply_channel_matrix(Q_c.t(), D_c * Qg)
    if need_Q:
        Qx = apply_channel_matrix(Q_c, x)
        grad_Q = as_dtype(outer_over_pixels(D_c * Qx, g) + outer_over_pixels(D_c * Qg, x), Q.dtype)
    return grad_x, grad_Q
