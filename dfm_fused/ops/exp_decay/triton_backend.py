"""``exp_decay`` in Triton: ``out = M x`` per pixel with one fused GEMM kernel.

``M = Q^T diag(D) Q`` (C x C) is formed once per call in float32 with PyTorch and
handed to the kernel in the dot operand dtype (the input's half type, or float32);
with ``scalar_decay`` ``M = diag(D)`` and an elementwise kernel scales the channels.
Forward saves only its inputs; backward runs the same kernel on the incoming
gradient (``grad_x = M g``, M is symmetric) and the split-pixel outer-product
kernel for ``A = sum x g^T``, then ``grad_Q = diag(D) Q (A + A^T)``.

Precision: for half-precision ``x`` (and ``g``) the GEMMs take ``M`` and ``x`` rounded to that
half type (tensor-core dots, float32 accumulation), as the reference's two linears do under
autocast. ``tests/test_triton.py::test_half_precision_no_worse_than_reference_under_autocast``
holds the error against float64 to at most the reference's under the same autocast; for
bfloat16 only on a GPU (``scripts/gpu_check.sh``): the interpreter's bfloat16 dots get float32
operands.
"""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import autocast_off
from dfm_fused.ops._decay import decay_grad_Q, decay_vector
from dfm_fused.ops._triton.channel import channel_outer, decay_map
from dfm_fused.ops._triton.host import check_dtype, dot_dtype


class ExpDecayTriton(torch.autograd.Function):
    """x: (B, C, H, W) float16/bfloat16/float32; Q: (C, C); D: (C,) float32. Returns x's dtype."""

    @staticmethod
    def forward(ctx, x, Q, D, scalar):
        x = x.contiguous()
        ctx.scalar = scalar
        ctx.save_for_backward(x, Q, D)
        return decay_map(x, Q, D, scalar, x.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        x, Q, D = ctx.saved_tensors
        g = grad_out.contiguous()
        grad_x = grad_Q = None
        if ctx.needs_input_grad[0]:
            grad_x = decay_map(g, Q, D, ctx.scalar, x.dtype)
        if ctx.needs_input_grad[1]:
            grad_Q = decay_grad_Q(Q, D, channel_outer(x, g, dot_dtype(x, g)))
        return grad_x, grad_Q, None, None


def exp_decay(x, Q, S, t, tau, alpha, scalar_decay=False):
    """See :func:`dfm_fused.functional.exp_decay`."""
    check_dtype("x", x)
    check_dtype("Q", Q)
    return ExpDecayTriton.apply(x, Q, decay_vector(S, t, tau, alpha), scalar_decay)
