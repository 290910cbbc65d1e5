"""``exp_decay`` in portable PyTorch: one per-pixel GEMM with the C x C matrix ``M``.

Forward saves only its inputs; backward re-forms ``M`` (C x C, cheap) and uses
the closed forms ``grad_x = M g`` and ``grad_Q = diag(D) Q (A + A^T)``,
``A = sum x g^T``.
"""
from __future__ import annotations

import torch

from dfm_fused.ops.common import (
    autocast_off,
    apply_channel_matrix,
    channel_outer,
    compute_dtype,
    decay_grad_Q,
    decay_matrix,
    decay_vector,
)


class ExpDecayFunction(torch.autograd.Function):
    """``out = M x`` per pixel. x: (B, C, H, W) any float dtype; Q: (C, C); D: (C,) float32/64."""

    @staticmethod
    def forward(ctx, x, Q, D):
        M = decay_matrix(Q, D, compute_dtype(x, Q))
        ctx.save_for_backward(x, Q, D)
        return apply_channel_matrix(M, x).to(x.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        x, Q, D = ctx.saved_tensors
        dtype = compute_dtype(x, Q)
        grad_x = grad_Q = None
        if ctx.needs_input_grad[0]:
            grad_x = apply_channel_matrix(decay_matrix(Q, D, dtype), grad_out).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_Q = decay_grad_Q(Q, D, channel_outer(x.to(dtype), grad_out))
        return grad_x, grad_Q, None


def exp_decay(x, Q, S, t, tau, alpha):
    """See :func:`dfm_fused.functional.exp_decay`."""
    return ExpDecayFunction.apply(x, Q, decay_vector(S, t, tau, alpha))
