"""``exp_decay`` on the C++/CUDA extension: ``torch.ops.dfm_fused.exp_decay(x, Q, D)``.

``D`` is formed here in Python (traceable); the op forms ``M = Q^T diag(D) Q`` and applies
it per pixel in one fused pass (with ``scalar_decay``, ``M = diag(D)``: a per-channel scale). Backward is ``torch.ops.dfm_fused.exp_decay_backward``:
``grad_x = M g`` and ``grad_Q = diag(D) Q (A + A^T)``, ``A = sum x g^T``, in one pass.
Loaded only after :func:`dfm_fused._extension.require` succeeded.
"""
from __future__ import annotations

import torch

from dfm_fused._extension import memory_format_of
from dfm_fused.ops._decay import compute_dtype, decay_vector


@torch.library.register_fake("dfm_fused::exp_decay")
def _exp_decay_fake(x, Q, D, scalar_decay=False):
    return torch.empty_like(x, memory_format=memory_format_of(x))


@torch.library.register_fake("dfm_fused::exp_decay_backward")
def _exp_decay_backward_fake(grad, x, Q, D, need_x, need_Q, scalar_decay=False):
    grad_x = torch.empty_like(x, memory_format=memory_format_of(x)) if need_x else x.new_empty((0,))
    grad_Q = Q.new_empty(Q.shape) if need_Q else Q.new_empty((0,))
    return grad_x, grad_Q


def _setup_context(ctx, inputs, output):
    x, Q, D, scalar_decay = inputs
    ctx.scalar_decay = scalar_decay
    ctx.save_for_backward(x, Q, D)


def _backward(ctx, grad):
    x, Q, D = ctx.saved_tensors
    need_x, need_Q = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_x or need_Q):
        return None, None, None, None
    grad_x, grad_Q = torch.ops.dfm_fused.exp_decay_backward(grad, x, Q, D, need_x, need_Q, ctx.scalar_decay)
    return grad_x if need_x else None, grad_Q if need_Q else None, None, None


torch.library.register_autograd("dfm_fused::exp_decay", _backward, setup_context=_setup_context)


def exp_decay(x, Q, S, t, tau, alpha, scalar_decay=False):
    """See :func:`dfm_fused.functional.exp_decay`. x: (B, C, H, W); Q: (C, C); S: (C,)."""
    dtype = compute_dtype(x, Q)
    # Kernels take activations whose opmath type is the state dtype (float32, or float64).
    x_in = x.to(dtype) if dtype == torch.float64 else x
    out = torch.ops.dfm_fused.exp_decay(x_in, Q.to(dtype), decay_vector(S, t, tau, alpha).to(dtype), scalar_decay)
    return out.to(x.dtype)
