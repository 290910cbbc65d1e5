"""``general_exp_decay`` in portable PyTorch: ``out = Qinv diag(D) Q x`` per pixel.

``D = exp(t * Delta)``, ``Delta = -(1/tau) |S|**alpha``. ``Delta`` is formed outside
the autograd function with ordinary (differentiable) ops in the reference's order,
so ``S``, ``tau`` and ``alpha`` get their gradients from ``grad_Delta`` by autograd.
Forward saves only its inputs. With ``G`` the incoming gradient, ``X`` the input
(both ``C x pixels``), ``A = G X^T`` and ``B = Qinv^T A`` (C x C each):

- ``backward="exact"`` (the derivative): ``grad_x = Q^T diag(D) Qinv^T G``,
  ``grad_Q = diag(D) B``, ``grad_Qinv = A Q^T diag(D)``, ``grad_D = rowsum(B * Q)``,
  then ``grad_Delta = t D grad_D`` and ``grad_t = sum(Delta D grad_D)``.
- ``backward="neumann"`` (feedback_segmentation's surrogate): the decay stage's
  derivative ``D`` is replaced by ``s = sum_{i=1..n+1} e^{i Delta}``, ``n = trunc(t)``:
  ``grad_x = Q^T diag(s) Qinv^T G``, ``grad_Q = diag(s) B``, ``grad_Qinv`` as above,
  ``grad_Delta = s rowsum(B * Q) / pixels`` (a mean over batch and pixels) and no
  gradient for ``t``. ``s`` is summed in closed form on the device, so no host sync.
"""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import as_dtype, autocast_off
from dfm_fused.ops._decay import compute_dtype, scalar_like
from dfm_fused.ops._torch.channel import apply_channel_matrix, outer_over_pixels


def neumann_factor(delta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``s = sum_{i=1..n+1} e^{i delta}`` with ``n = trunc(t)``, per channel, on ``delta``'s device.

    Closed form ``e^delta expm1((n+1) delta) / expm1(delta)`` (``n+1`` where ``delta == 0``):
    ``expm1`` keeps it accurate for ``|delta| << 1``, where ``1 - e^delta`` cancels.
    """
    terms = torch.trunc(t).to(delta.dtype) + 1
    ratio = torch.expm1(terms * delta) / torch.expm1(delta)
    # ``terms`` may be a 0-d CPU tensor: ``where`` takes it as a scalar, with no copy to the device.
    return torch.where(delta == 0, terms, torch.exp(delta) * ratio)


class GeneralExpDecayFunction(torch.autograd.Function):
    """x: (B, C, H, W) any float dtype; Q, Qinv: (C, C); delta: (C,); t: 0-d. Returns x's dtype."""

    @staticmethod
    def forward(ctx, x, Q, Qinv, delta, t, neumann: bool):
        ctx.save_for_backward(x, Q, Qinv, delta, t)
        ctx.neumann = neumann
        dtype = compute_dtype(x, Q, Qinv)
        D = torch.exp(t * delta).to(dtype)
        Q_c, Qinv_c = Q.to(dtype), Qinv.to(dtype)
        B, C, H, W = x.shape
        if B * H * W >= C:  # one GEMM with the C x C matrix M; else the three-step order (fewer flops)
            out = apply_channel_matrix((Qinv_c * D) @ Q_c, x)
        else:
            out = apply_channel_matrix(Qinv_c, D[:, None, None] * apply_channel_matrix(Q_c, x))
        return as_dtype(out, x.dtype)

    @staticmethod
    @autocast_off
    def backward(ctx, grad_out):
        x, Q, Qinv, delta, t = ctx.saved_tensors
        need_x, need_Q, need_Qinv, need_delta, need_t = ctx.needs_input_grad[:5]
        dtype = compute_dtype(x, Q, Qinv)
        Q_c, Qinv_c = Q.to(dtype), Qinv.to(dtype)
        D = torch.exp(t * delta).to(dtype)
        # The decay stage's backward factor: its derivative, or the surrogate.
        factor = neumann_factor(delta, t).to(dtype) if ctx.neumann else D
        grad_x = grad_Q = grad_Qinv = grad_delta = grad_t = None
        if need_x:
            grad_x = as_dtype(apply_channel_matrix(Q_c.t() @ (factor[:, None] * Qinv_c.t()), grad_out), x.dtype)
        if need_Q or need_Qinv or need_delta or need_t:
            A = outer_over_pixels(x.to(dtype), grad_out).t()  # sum over pixels of g x^T
            if need_Qinv:
                grad_Qinv = as_dtype((A @ Q_c.t()) * D, Qinv.dtype)
            if need_Q or need_delta or need_t:
                B = Qinv_c.t() @ A
                if need_Q:
                    grad_Q = as_dtype(factor[:, None] * B, Q.dtype)
                diag = (B * Q_c).sum(1)  # diag(Qinv^T A Q^T)
                if ctx.neumann:
                    if need_delta:
                        pixels = x.shape[0] * x.shape[2] * x.shape[3]
                        grad_delta = as_dtype(factor * diag / pixels, delta.dtype)
                else:
                    grad_D = diag * D
                    if need_delta:
                        grad_delta = as_dtype(grad_D * t.to(dtype), delta.dtype)
                    if need_t:
                        grad_t = (grad_D * delta.to(dtype)).sum().to(device=t.device, dtype=t.dtype)
        return grad_x, grad_Q, grad_Qinv, grad_delta, grad_t, None


def general_exp_decay(x, Q, Qinv, S, t, tau, alpha, backward: str = "exact"):
    """See :func:`dfm_fused.functional.general_exp_decay`."""
    S_c = S.to(compute_dtype(S))
    # The reference's expression and order, so Delta (and D) are bitwise the reference's.
    delta = (1 / scalar_like(tau, S_c)) * -1.0 * torch.abs(S_c) ** scalar_like(alpha, S_c)
    return GeneralExpDecayFunction.apply(x, Q, Qinv, delta, scalar_like(t, S_c), backward == "neumann")
