"""Pure-PyTorch transcription of the reference DFM semantics (docs/design.md, 'Reference semantics').

This module is the correctness oracle for every backend. It is deliberately
literal: the same permutes, the same two ``linear`` calls and the same
elementwise decay as the public ``dfbmodels`` package, so that what it computes
is what a reference user computes. Do not optimise it.

Shapes: ``x``/``y``/``h`` are ``(B, C, H, W)``; ``Q`` is ``(C, C)``; ``S`` is ``(C,)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "ExpDecay",
    "StateExpDecay",
    "exp_decay",
    "feedback_input",
    "state_update",
]

# The dispatch's reference backend is this module: it transcribes dfbmodels only.
DECLINED = {
    "general_exp_decay": "it transcribes dfbmodels, which has no general output map; the torch backend runs "
    "general_exp_decay (its oracle is the feedback_segmentation transcription in tests/)",
}


class ExpDecay(torch.autograd.Function):
    """Elementwise ``z * exp(T * Delta)`` over channels.

    As in the reference, only ``z`` receives a gradient: ``T`` and ``Delta`` are
    treated as constants.
    """

    @staticmethod
    def forward(ctx, z, T, Delta):
        exp_term = torch.exp(T * Delta).unsqueeze(0).unsqueeze(2).unsqueeze(3)
        out = z * exp_term
        # The reference keeps its input and output alive too; so does this copy, so
        # that memory comparisons against it are honest.
        ctx.save_for_backward(z, T, Delta, out)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        _, T, Delta, _ = ctx.saved_tensors
        exp_term = torch.exp(Delta * T).unsqueeze(0).unsqueeze(2).unsqueeze(3)
        return grad_output * exp_term, None, None


def _as_tensor(value, like: torch.Tensor) -> torch.Tensor:
    # The reference module holds these as 0-d parameters of S's dtype.
    # On the CPU whatever ``like``'s device: device kernels take 0-d CPU tensors as arguments,
    # so a Python number costs no host-to-device copy (a synchronisation on CUDA).
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(float(value), dtype=like.dtype)


def exp_decay(x, Q, S, t, tau, alpha):
    """Reference ``Q^T diag(exp(t * Delta)) Q x`` per pixel, the literal permute/linear form.

    Args:
        x: ``(B, C, H, W)``.
        Q: ``(C, C)``.
        S: ``(C,)`` eigenvalue magnitudes.
        t: step time, a number or 0-d tensor (the reference passes ``module.T * T``).
        tau, alpha: numbers or 0-d tensors.
    """
    tau = _as_tensor(tau, S)
    alpha = _as_tensor(alpha, S)
    t = _as_tensor(t, S)
    Delta = (1 / tau) * -1.0 * torch.abs(S) ** alpha
    z = F.linear(x.permute(0, 2, 3, 1), Q).permute(0, 3, 1, 2)
    z2 = ExpDecay.apply(z, t, Delta)
    return F.linear(z2.permute(0, 2, 3, 1), Q.T).permute(0, 3, 1, 2)


def feedback_input(x, h, offset, fb, groups, eps=1e-5):
    """Reference feedback projection: slice, bilinear resize, GroupNorm, softmax, concat.

    Args:
        x: ``(B, Cx, H, W)`` frontend output.
        h: ``(B, Ch, h, w)`` state; channels ``offset:offset+fb`` are fed back.
    Returns:
        ``(B, Cx + fb, H, W)``.
    """
    v = h[:, offset:offset + fb]
    v = F.interpolate(v, size=tuple(x.shape[-2:]), mode="bilinear")
    weight = torch.ones(fb, dtype=v.dtype, device=v.device)
    bias = torch.zeros(fb, dtype=v.dtype, device=v.device)
    v = F.group_norm(v, groups, weight, bias, eps)
    p = torch.softmax(v, dim=1)
    return torch.concat((x, p), dim=1)


def state_update(h, y, Q, S, t, tau, alpha, groups, eps=1e-5):
    """Reference ``h + StateExpDecay(GroupNorm(y))`` with a frozen (1, 0) GroupNorm affine."""
    C = y.shape[1]
    weight = torch.ones(C, dtype=y.dtype, device=y.device)
    bias = torch.zeros(C, dtype=y.dtype, device=y.device)
    n = F.group_norm(y, groups, weight, bias, eps)
    return h + exp_decay(n, Q, S, t, tau, alpha)


class StateExpDecay(torch.nn.Module):
    """The reference ``dfbmodels.state.StateExpDecay`` module, transcribed.

    ``forward(x, T)`` re-orthogonalises ``Q`` by QR when training at ``T == 0``
    and returns ``Q^T diag(exp(self.T * T * Delta)) Q x`` per pixel.
    """

    def __init__(self, filters, shape, tau=0.1, alpha=1.0):
        super().__init__()
        self.filters = filters
        self.tau = torch.nn.Parameter(tau * torch.ones(()), requires_grad=False)
        self.T = torch.nn.Parameter(torch.ones(()), requires_grad=False)
        self.alpha = torch.nn.Parameter(alpha * torch.ones(()), requires_grad=False)
        self.state = torch.zeros((1, filters, *shape), requires_grad=False)
        self.S = torch.nn.Parameter(torch.ones((filters,), dtype=torch.float32), requires_grad=False)
        self.Q = torch.nn.Parameter(torch.ones((filters, filters), dtype=torch.float32), requires_grad=True)
        self.Qinv = torch.nn.Parameter(torch.ones((filters, filters), dtype=torch.float32), requires_grad=True)
        torch.nn.init.ones_(self.S)
        torch.nn.init.orthogonal_(self.Q)
        torch.nn.init.orthogonal_(self.Qinv)

    @staticmethod
    def reorthogonalize(p):
        with torch.no_grad():
            p.copy_(torch.linalg.qr(p, mode="complete")[0])

    def forward(self, x, T=5):
        if self.training and T == 0:
            StateExpDecay.reorthogonalize(self.Q)
        return exp_decay(x, self.Q, self.S, self.T * T, self.tau, self.alpha)
