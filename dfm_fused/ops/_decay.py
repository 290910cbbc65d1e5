"""The decay math every backend of ``exp_decay`` and ``state_update`` shares.

The decay of step ``t`` is ``M = Q^T diag(D) Q`` with ``D = exp(t * Delta)`` and
``Delta = -(1/tau) * |S|**alpha``. ``M`` is ``C x C`` and symmetric, so it is
formed once per call on the host side of a kernel launch (a tiny GEMM) and the
kernels only apply it per pixel.
"""
from __future__ import annotations

import torch

from dfm_fused.ops._autograd import as_dtype

__all__ = ["compute_dtype", "decay_grad_Q", "decay_matrix", "decay_vector", "scalar_like"]


def scalar_like(value, like: torch.Tensor) -> torch.Tensor:
    """``value`` as a 0-d tensor of ``like``'s dtype, without a host-device copy.

    Python numbers become 0-d CPU tensors, which device kernels take as arguments (no
    copy to the device, so no synchronisation); so do 0-d CPU tensors. Device tensors
    stay where they are.
    """
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=like.dtype)
    if value.device.type == "cpu" and value.dim() == 0:
        return value.to(dtype=like.dtype)
    return value.to(device=like.device, dtype=like.dtype)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the state math never runs in half precision."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def decay_vector(S: torch.Tensor, t, tau, alpha) -> torch.Tensor:
    """``D = exp(t * -(1/tau) * |S|**alpha)``, shape ``(C,)``, float32 (float64 if ``S`` is).

    Evaluated in the reference's order of operations so that ``D`` is bitwise the
    reference's. No host synchronisation: ``t``, ``tau``, ``alpha`` may be device tensors.
    """
    S = S.to(compute_dtype(S))
    delta = (1 / scalar_like(tau, S)) * -1.0 * torch.abs(S) ** scalar_like(alpha, S)
    return torch.exp(scalar_like(t, S) * delta)


def decay_matrix(Q: torch.Tensor, D: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``M = Q^T diag(D) Q``, shape ``(C, C)``, in ``dtype`` (default: float32, float64 if ``Q`` is)."""
    dtype = dtype or compute_dtype(Q)
    Q = Q.to(dtype)
    return (Q.t() * D.to(dtype)) @ Q


def decay_grad_Q(Q: torch.Tensor, D: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum(g * (M x))`` w.r.t. ``Q``: ``diag(D) Q (A + A^T)`` with ``A = sum x g^T``.

    ``A`` is ``(C, C)``; returned in ``Q``'s dtype.
    """
    dtype = A.dtype
    grad = D.to(dtype)[:, None] * (Q.to(dtype) @ (A + A.t()))
    return as_dtype(grad, Q.dtype)
