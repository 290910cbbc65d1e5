"""``state_update`` in portable PyTorch: ``h + M GroupNorm(y)`` with one per-pixel GEMM.

Forward saves ``y`` and the per-group statistics (``B x groups`` floats), not the
normalised tensor; backward rebuilds the normalised ``y`` from them, and ``M`` too unless the
forward kept it (:func:`keeps_M`).
"""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import as_dtype, autocast_off
from dfm_fused.ops._decay import compute_dtype, decay_grad_Q, decay_matrix, decay_vector
from dfm_fused.ops._torch.channel import apply_channel_matrix, outer_over_pixels
from dfm_fused.ops._torch.decay import decay_backward, decay_forward
from dfm_fused.ops._torch.group_norm import group_norm_backward, group_norm_stats, group_normalize


def keeps_M(y: torch.Tensor, needs_grad_y: bool, scalar: bool) -> bool:
    """Whether the forward forms ``M`` and keeps it (``C x C``, whatever the batch) for the backward.

    With ``P`` pixels, the forward costs ``2 P C^2`` flops (applying ``Q``, ``D``, ``Q^T``; below
    ``P = C``) or ``C^3 + P C^2`` (forming and applying ``M``), and a kept ``M`` saves the backward
    ``C^3`` (forming it again) or ``P C^2`` (``Q^T (D Q g)``): keeping pays for ``P > C/2`` when ``y``
    gets a gradient (the operating point: ``C = 528``, ``P = 512``).
    """
    B, C, H, W = y.shape
    return needs_grad_y and not scalar and 2 * B * H * W > C


class StateUpdateFunction(torch.autograd.Function):
    """h: (B, C, H, W) state; y: (B, C, H, W) body output; Q: (C, C); D: (C,). Returns h's dtype.

    ``scalar``: ``M = diag(D)`` (see :func:`dfm_fused.ops._torch.decay.decay_forward`), folded into
    the GroupNorm as its weight, forward and backward.
    """

    @staticmethod
    def forward(ctx, h, y, Q, D, groups, eps, scalar):
        dtype = compute_dtype(h, y, Q)
        y_c = y.to(dtype)
        # Out of place: under torch.compile (torch 2.11) an in-place add on the returned tensor
        # left every input with a zero gradient.
        M = None
        if scalar:
            decayed, mean, rstd = group_norm_stats(y_c, groups, eps, D.to(dtype))
        elif keeps_M(y, ctx.needs_input_grad[1], scalar):
            n, mean, rstd = group_norm_stats(y_c, groups, eps)
            M = decay_matrix(Q, D, dtype)
            decayed = apply_channel_matrix(M, n)
        else:
            n, mean, rstd = group_norm_stats(y_c, groups, eps)
            decayed = decay_forward(Q, D, n, dtype)
        out = as_dtype(decayed + h, h.dtype)
        ctx.groups, ctx.scalar = groups, scalar
        ctx.save_for_backward(y, Q, D, mean, rstd, M)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        y, Q, D, mean, rstd, M = ctx.saved_tensors
        groups = ctx.groups
        grad_h = grad_y = grad_Q = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_out
        y_c = y.to(mean.dtype)
        # The normalised y is needed only for grad_Q; otherwise y stands in for its shape.
        n = group_normalize(y_c, mean, rstd, groups) if ctx.needs_input_grad[2] else y_c
        if ctx.scalar:
            # D g is the GroupNorm weight's part of the backward.
            grad_n, weight = grad_out.to(mean.dtype), D.to(mean.dtype)
            grad_Q = decay_backward(Q, D, n, grad_out, mean.dtype, False, ctx.needs_input_grad[2], True)[1]
        elif M is not None:  # y needs a gradient: M g with the kept M, A for grad_Q (P > C/2)
            weight = None
            grad_n = apply_channel_matrix(M, grad_out)
            if ctx.needs_input_grad[2]:
                grad_Q = decay_grad_Q(Q, D, outer_over_pixels(n, grad_out))
        else:
            weight = None
            grad_n, grad_Q = decay_backward(
                Q, D, n, grad_out, mean.dtype, ctx.needs_input_grad[1], ctx.needs_input_grad[2]
            )
        if ctx.needs_input_grad[1]:
            grad_y = as_dtype(
                group_norm_backward(grad_n.contiguous(), y_c.contiguous(), mean, rstd, groups, weight), y.dtype
            )
        return grad_h, grad_y, grad_Q, None, None, None, None


def state_update(h, y, Q, S, t, tau, alpha, groups, eps=1e-5, scalar_decay=False):
    """See :func:`dfm_fused.functional.state_update`."""
    return StateUpdateFunction.apply(h, y, Q, decay_vector(S, t, tau, alpha), groups, eps, scalar_decay)
