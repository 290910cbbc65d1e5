"""``feedback_input`` in Triton.

Forward: a statistics kernel (GroupNorm mean and 1/std of the resized slice per
image and group), then one kernel that writes the whole ``(B, Cx + fb, H, W)``
output: the copy of ``x`` and ``softmax_c(GroupNorm(resize(h[:, offset:offset+fb])))``.
Only ``h`` and the ``B x groups`` statistics are saved. Backward: ``grad_x`` is a
view of the incoming gradient; ``grad_h`` comes from two kernels that recompute
the resize, norm and softmax (softmax and GroupNorm backward, then the
transposed resize as a deterministic gather).
"""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import autocast_off, concat_grad_x
from dfm_fused.ops.feedback_input.triton_kernels import feedback_forward, feedback_grad_h, feedback_stats
from dfm_fused.ops._triton.host import check_dtype


class FeedbackInputTriton(torch.autograd.Function):
    """x: (B, Cx, H, W); h: (B, Ch, Hi, Wi); float16/bfloat16/float32. Returns the promoted dtype."""

    @staticmethod
    def forward(ctx, x, h, offset, fb, groups, eps):
        x, h = x.contiguous(), h.contiguous()
        mean, rstd = feedback_stats(h, x, offset, fb, groups, eps)
        out = feedback_forward(x, h, mean, rstd, offset, fb, groups, torch.promote_types(x.dtype, h.dtype))
        ctx.meta = (x.shape[1], offset, fb, groups, x.dtype)
        ctx.save_for_backward(h, mean, rstd)
        return out

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        h, mean, rstd = ctx.saved_tensors
        Cx, offset, fb, groups, x_dtype = ctx.meta
        grad_x = grad_h = None
        if ctx.needs_input_grad[0]:
            grad_x = concat_grad_x(grad_out, Cx, x_dtype)
        if ctx.needs_input_grad[1]:
            grad_h = feedback_grad_h(grad_out.contiguous(), h, mean, rstd, offset, fb, groups, Cx)
        return grad_x, grad_h, None, None, None, None


def feedback_input(x, h, offset, fb, groups, eps=1e-5):
    """See :func:`dfm_fused.functional.feedback_input`."""
    check_dtype("x", x)
    check_dtype("h", h)
    if h.shape[-1] * h.shape[-2] == 0:
        raise ValueError(f"h: expected a non-empty spatial size to resize from; got {tuple(h.shape[-2:])}")
    return FeedbackInputTriton.apply(x, h, offset, fb, groups, eps)
