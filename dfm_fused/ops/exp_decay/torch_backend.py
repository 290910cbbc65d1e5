"""``exp_decay`` in portable PyTorch: per-pixel GEMMs with the C x C matrix ``M``.

Forward saves only its inputs; backward re-forms ``M`` (C x C, cheap) and uses
the closed forms ``grad_x = M g`` and ``grad_Q = diag(D) Q (A + A^T)``,
``A = sum x g^T`` (or thin GEMMs when there are fewer pixels than channels).
"""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import as_dtype, autocast_off
from dfm_fused.ops._decay import compute_dtype, decay_vector
from dfm_fused.ops._torch.decay import decay_backward, decay_forward


class ExpDecayFunction(torch.autograd.Function):
    """``out = M x`` per pixel (``M = diag(D)`` when ``scalar``). x: (B, C, H, W) any float dtype;
    Q: (C, C); D: (C,) float32/64."""

    @staticmethod
    def forward(ctx, x, Q, D, scalar):
        ctx.scalar = scalar
        ctx.save_for_backward(x, Q, D)
        return as_dtype(decay_forward(Q, D, x, compute_dtype(x, Q), scalar), x.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        x, Q, D = ctx.saved_tensors
        grad_x, grad_Q = decay_backward(
            Q, D, x, grad_out, compute_dtype(x, Q), ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.scalar
        )
        return None if grad_x is None else as_dtype(grad_x, x.dtype), grad_Q, None, None


def exp_decay(x, Q, S, t, tau, alpha, scalar_decay=False):
    """See :func:`dfm_fused.functional.exp_decay`."""
    return ExpDecayFunction.apply(x, Q, decay_vector(S, t, tau, alpha), scalar_decay)
