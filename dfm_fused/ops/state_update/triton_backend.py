"""``state_update`` in Triton: ``h + M GroupNorm(y)`` in two kernels.

Forward: a statistics kernel (mean, 1/std per image and group), then one GEMM
kernel that normalises each ``y`` tile as it loads it, multiplies by ``M`` and
adds ``h``, writing the new state once (with ``scalar_decay``, ``M = diag(D)``: an
elementwise kernel instead of the GEMM, here and for ``grad_y``). Only ``y``, ``Q``, ``D`` and the
``B x groups`` statistics are saved. Backward: ``grad_h`` is the incoming
gradient itself; ``grad_y`` is ``M g`` (GEMM kernel) through the GroupNorm
backward kernel; ``grad_Q`` uses ``A = sum GroupNorm(y) g^T`` from the
deterministic split-pixel outer-product kernel.

Precision: for half-precision ``y`` the forward GEMM takes ``M`` and the float32-normalised
``y`` tile rounded to ``y``'s half type (tensor-core dots, float32 accumulation), as the
reference's linears under autocast; statistics and ``+ h`` stay float32, and so do the
backward GEMMs unless ``h`` is half as well. The test
``test_half_precision_no_worse_than_reference_under_autocast`` (tests/test_triton.py) holds the
error against float64 to at most the reference's under the same autocast; for bfloat16 only on a
GPU (``scripts/gpu_check.sh``): the interpreter's bfloat16 dots get float32 operands.
"""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import autocast_off
from dfm_fused.ops._decay import decay_grad_Q, decay_vector
from dfm_fused.ops._triton.channel import channel_outer, decay_map
from dfm_fused.ops._triton.group_norm import group_affine, group_norm_backward, group_stats
from dfm_fused.ops._triton.host import check_dtype, dot_dtype


class StateUpdateTriton(torch.autograd.Function):
    """h, y: (B, C, H, W) float16/bfloat16/float32; Q: (C, C); D: (C,) float32. Returns h's dtype."""

    @staticmethod
    def forward(ctx, h, y, Q, D, groups, eps, scalar):
        h, y = h.contiguous(), y.contiguous()
        mean, rstd = group_stats(y, groups, eps)
        scale, shift = group_affine(mean, rstd, y.shape[1])
        ctx.scalar = scalar
        ctx.save_for_backward(y, Q, D, mean, rstd)
        return decay_map(y, Q, D, scalar, h.dtype, h=h, scale=scale, shift=shift)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        y, Q, D, mean, rstd = ctx.saved_tensors
        grad_h = grad_out if ctx.needs_input_grad[0] else None
        grad_y = grad_Q = None
        g = grad_out.contiguous()
        if ctx.needs_input_grad[1]:
            dn = decay_map(g, Q, D, ctx.scalar, torch.float32)
            grad_y = group_norm_backward(dn, y, mean, rstd)
        if ctx.needs_input_grad[2]:
            scale, shift = group_affine(mean, rstd, y.shape[1])
            grad_Q = decay_grad_Q(Q, D, channel_outer(y, g, dot_dtype(y, g), scale, shift))
        return grad_h, grad_y, grad_Q, None, None, None, None


def state_update(h, y, Q, S, t, tau, alpha, groups, eps=1e-5, scalar_decay=False):
    """See :func:`dfm_fused.functional.state_update`."""
    for name, tensor in (("h", h), ("y", y), ("Q", Q)):
        check_dtype(name, tensor)
    return StateUpdateTriton.apply(h, y, Q, decay_vector(S, t, tau, alpha), groups, eps, scalar_decay)
