"""``feedback_input`` in portable PyTorch.

Forward writes ``x`` and the softmax projection straight into one preallocated
``(B, Cx + fb, H, W)`` output (no separate ``cat``) and saves only ``h`` (an
input) and the GroupNorm statistics. Backward recomputes the resize, the norm
and the softmax; ``grad_x`` is a view of the incoming gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfm_fused.ops._autograd import autocast_off, concat_grad_x
from dfm_fused.ops._decay import compute_dtype
from dfm_fused.ops._torch.group_norm import group_norm_backward, group_norm_stats, group_normalize


def _resize(v: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(v, size=size, mode="bilinear", align_corners=False)


class FeedbackInputFunction(torch.autograd.Function):
    """x: (B, Cx, H, W); h: (B, Ch, h, w). Returns (B, Cx + fb, H, W) in the promoted dtype of x and h."""

    @staticmethod
    def forward(ctx, x, h, offset, fb, groups, eps):
        B, Cx, H, W = x.shape
        dtype = compute_dtype(x, h)
        r = _resize(h[:, offset:offset + fb].to(dtype), (H, W))
        n, mean, rstd = group_norm_stats(r.contiguous(), groups, eps)
        out = torch.empty((B, Cx + fb, H, W), dtype=torch.promote_types(x.dtype, h.dtype), device=x.device)
        out[:, :Cx] = x
        out[:, Cx:] = torch.softmax(n, dim=1)
        ctx.meta = (Cx, offset, fb, groups, x.dtype)
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
            H, W = grad_out.shape[-2:]
            v = h[:, offset:offset + fb]
            r = _resize(v.to(mean.dtype), (H, W)).contiguous()
            p = torch.softmax(group_normalize(r, mean, rstd, groups), dim=1)
            g = grad_out[:, Cx:].to(mean.dtype)
            grad_n = p * (g - (g * p).sum(dim=1, keepdim=True))
            grad_r = group_norm_backward(grad_n, r, mean, rstd, groups)
            grad_v = torch.ops.aten.upsample_bilinear2d_backward(
                grad_r, [H, W], list(v.shape), False, None, None
            )
            grad_h = h.new_zeros(h.shape)
            grad_h[:, offset:offset + fb] = grad_v
        return grad_x, grad_h, None, None, None, None


def feedback_input(x, h, offset, fb, groups, eps=1e-5):
    """See :func:`dfm_fused.functional.feedback_input`."""
    return FeedbackInputFunction.apply(x, h, offset, fb, groups, eps)
