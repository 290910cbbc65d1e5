"""``feedback_input`` on the C++/CUDA extension: ``torch.ops.dfm_fused.feedback_input(x, h, offset, fb, groups, eps)``.

The op writes ``x`` and the softmax projection of the resized, normalised state slice
into one output in a single pass and returns ``(out, mean, rstd)``; only ``h`` and the
``B x groups`` statistics are saved. Backward (``torch.ops.dfm_fused.feedback_input_backward``)
recomputes the projection; ``grad_x`` is a view of the incoming gradient.
Loaded only after :func:`dfm_fused._extension.require` succeeded.
"""
from __future__ import annotations

import torch

from dfm_fused._extension import memory_format_of


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@torch.library.register_fake("dfm_fused::feedback_input")
def _feedback_input_fake(x, h, offset, fb, groups, eps):
    B, Cx, H, W = x.shape
    out = x.new_empty((B, Cx + fb, H, W)).contiguous(memory_format=memory_format_of(x))
    stats = x.new_empty((B, groups), dtype=_stats_dtype(x))
    return out, stats, torch.empty_like(stats)


@torch.library.register_fake("dfm_fused::feedback_input_backward")
def _feedback_input_backward_fake(grad, h, mean, rstd, offset, fb, groups):
    return torch.empty_like(h, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, h, offset, fb, groups, eps = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.meta = (x.shape[1], offset, fb, groups)
    ctx.save_for_backward(h, mean, rstd)


def _backward(ctx, grad, _grad_mean, _grad_rstd):
    h, mean, rstd = ctx.saved_tensors
    Cx, offset, fb, groups = ctx.meta
    grad_x = grad[:, :Cx] if ctx.needs_input_grad[0] else None
    grad_h = None
    if ctx.needs_input_grad[1]:
        grad_h = torch.ops.dfm_fused.feedback_input_backward(grad, h, mean, rstd, offset, fb, groups)
    return grad_x, grad_h, None, None, None, None


torch.library.register_autograd("dfm_fused::feedback_input", _backward, setup_context=_setup_context)


def feedback_input(x, h, offset, fb, groups, eps=1e-5):
    """See :func:`dfm_fused.functional.feedback_input`. x: (B, Cx, H, W); h: (B, Ch, h, w)."""
    dtype = torch.promote_types(x.dtype, h.dtype)
    out, _, _ = torch.ops.dfm_fused.feedback_input(x.to(dtype), h.to(dtype), offset, fb, groups, eps)
    return out
