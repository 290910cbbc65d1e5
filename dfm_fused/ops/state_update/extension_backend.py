"""``state_update`` on the C++/CUDA extension: ``torch.ops.dfm_fused.state_update(h, y, Q, D, groups, eps)``.

The op returns ``(h + M GroupNorm(y), mean, rstd, M or an empty tensor)``; the GroupNorm
statistics (``B x groups``) and, where ``y`` needs a gradient and forming ``M`` pays (see
:func:`_keeps_M`), the ``C x C`` matrix ``M`` are all it saves besides its inputs. Backward
(``torch.ops.dfm_fused.state_update_backward``) recomputes the normalised ``y`` (and ``M`` when
not kept) and gives ``grad_y`` and ``grad_Q`` in one fused pass plus a GroupNorm epilogue (with
``scalar_decay``, ``M = diag(D)``: no C x C product but ``A`` for ``grad_Q``);
``grad_h`` is the incoming gradient. Loaded only after :func:`dfm_fused._extension.require` succeeded.
"""
from __future__ import annotations

import torch

from dfm_fused._extension import memory_format_of
from dfm_fused.ops._decay import compute_dtype, decay_vector
from dfm_fused.ops.state_update.torch_backend import keeps_M


@torch.library.register_fake("dfm_fused::state_update")
def _state_update_fake(h, y, Q, D, groups, eps, scalar_decay=False, keep_M=False):
    stats = Q.new_empty((h.shape[0], groups))
    M = Q.new_empty(Q.shape if keep_M and not scalar_decay else (0,))
    return torch.empty_like(h, memory_format=memory_format_of(h)), stats, torch.empty_like(stats), M


@torch.library.register_fake("dfm_fused::state_update_backward")
def _state_update_backward_fake(grad, y, Q, D, mean, rstd, groups, need_y, need_Q, scalar_decay=False, M=None):
    grad_y = torch.empty_like(y, memory_format=memory_format_of(grad)) if need_y else y.new_empty((0,))
    grad_Q = Q.new_empty(Q.shape) if need_Q else Q.new_empty((0,))
    return grad_y, grad_Q


def _setup_context(ctx, inputs, output):
    h, y, Q, D, groups, eps, scalar_decay, keep_M = inputs
    _, mean, rstd, M = output
    ctx.mark_non_differentiable(mean, rstd, M)
    ctx.groups, ctx.scalar_decay = groups, scalar_decay
    ctx.save_for_backward(y, Q, D, mean, rstd, M)


def _backward(ctx, grad, _grad_mean, _grad_rstd, _grad_M):
    y, Q, D, mean, rstd, M = ctx.saved_tensors
    need_h, need_y, need_Q = ctx.needs_input_grad[:3]
    grad_y = grad_Q = None
    if need_y or need_Q:
        grad_y, grad_Q = torch.ops.dfm_fused.state_update_backward(
            grad, y, Q, D, mean, rstd, ctx.groups, need_y, need_Q, ctx.scalar_decay, M
        )
    none = (None,) * 5
    return grad if need_h else None, grad_y if need_y else None, grad_Q if need_Q else None, *none


torch.library.register_autograd("dfm_fused::state_update", _backward, setup_context=_setup_context)


def _keeps_M(y: torch.Tensor, scalar_decay: bool) -> bool:
    """Whether the forward returns ``M`` for the backward: on the CPU by the torch backend's flop
    count (:func:`~dfm_fused.ops.state_update.torch_backend.keeps_M`: ``y`` gets a gradient and
    the pixels outnumber ``C/2``); on CUDA whenever ``y`` gets a gradient, since the forward
    forms ``M`` anyway."""
    needs_grad_y = torch.is_grad_enabled() and y.requires_grad
    if y.device.type == "cpu":
        return keeps_M(y, needs_grad_y, scalar_decay)
    return needs_grad_y and not scalar_decay


def state_update(h, y, Q, S, t, tau, alpha, groups, eps=1e-5, scalar_decay=False):
    """See :func:`dfm_fused.functional.state_update`. h, y: (B, C, H, W); Q: (C, C); S: (C,)."""
    dtype = compute_dtype(h, y, Q)
    act = dtype if dtype == torch.float64 else torch.promote_types(h.dtype, y.dtype)
    out = torch.ops.dfm_fused.state_update(
        h.to(act), y.to(act), Q.to(dtype), decay_vector(S, t, tau, alpha).to(dtype), groups, eps, scalar_decay,
        _keeps_M(y, scalar_decay),
    )[0]
    return out.to(h.dtype)
