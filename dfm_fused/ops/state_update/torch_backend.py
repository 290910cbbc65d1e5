"""``state_update`` in portable PyTorch: ``h + M GroupNorm(y)`` with one per-pixel GEMM.

Forward saves ``y`` and the per-group statistics (``B x groups`` floats), not the
normalised tensor; backward rebuilds the normalised ``y`` and ``M`` from them.
"""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import as_dtype, autocast_off
from dfm_fused.ops._decay import compute_dtype, decay_vector
from dfm_fused.ops._torch.decay import decay_backward, decay_forward
from dfm_fused.ops._torch.group_norm import group_norm_backward, group_norm_stats, group_normalize


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
        if scalar:
            decayed, mean, rstd = group_norm_stats(y_c, groups, eps, D.to(dtype))
        else:
            n, mean, rstd = group_norm_stats(y_c, groups, eps)
            decayed = decay_forward(Q, D, n, dtype)
        out = as_dtype(decayed + h, h.dtype)
        ctx.groups, ctx.scalar = groups, scalar
        ctx.save_for_backward(y, Q, D, mean, rstd)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        y, Q, D, mean, rstd = ctx.saved_tensors
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
