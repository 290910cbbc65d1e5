"""Small pieces of math shared by every backend of the decay ops.

The decay of step ``t`` is ``M = Q^T diag(D) Q`` with ``D = exp(t * Delta)`` and
``Delta = -(1/tau) * |S|**alpha``. ``M`` is ``C x C`` and symmetric, so it is
formed once per call on the host side of a kernel launch (a tiny GEMM) and the
kernels only apply it per pixel.
"""
from __future__ import annotations

import contextlib
import functools

import torch

__all__ = [
    "as_dtype",
    "autocast_off",
    "concat_grad_x",
    "compute_dtype",
    "decay_grad_Q",
    "decay_matrix",
    "decay_vector",
]


def autocast_off(fn):
    """Run ``fn`` with autocast disabled: for ``backward`` methods, which autograd may
    run inside the caller's autocast region, so the state math stays float32."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for kind in ("cpu", "cuda"):
                if torch.is_autocast_enabled(kind):
                    stack.enter_context(torch.autocast(kind, enabled=False))
            return fn(*args, **kwargs)

    return wrapper


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, converted only when it is not already.

    For what an ``autograd.Function`` returns: under ``torch.compile`` (torch 2.11), an
    output made by a same-dtype ``.to()`` of a view received a zero gradient.
    """
    return t if t.dtype == dtype else t.to(dtype)


def concat_grad_x(grad_out: torch.Tensor, channels: int, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of the ``x`` part of a channel concat: a view of ``grad_out[:, :channels]``
    (cast only when ``x`` had another dtype than the output)."""
    return as_dtype(grad_out[:, :channels], dtype)


def _scalar(value, like: torch.Tensor) -> torch.Tensor:
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
    delta = (1 / _scalar(tau, S)) * -1.0 * torch.abs(S) ** _scalar(alpha, S)
    return torch.exp(_scalar(t, S) * delta)


def decay_matrix(Q: torch.Tensor, D: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``M = Q^T diag(D) Q``, shape ``(C, C)``, in ``dtype`` (default: float32, float64 if ``Q`` is)."""
    dtype = dtype or compute_dtype(Q)
    Q = Q.to(dtype)
    return (Q.t() * D.to(dtype)) @ Q


def decay_grad_Q(Q: torch.Tensor, D: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Gradient of ``sum(g * (M x))`` w.r.t. ``Q``: ``diag(D) Q (A + A^T)`` with ``A = sum x g^T``.

    Returned in ``Q``'s dtype.
    """
    dtype = A.dtype
    grad = D.to(dtype)[:, None] * (Q.to(dtype) @ (A + A.t()))
    return as_dtype(grad, Q.dtype)


# Pixels per image from which a per-image GEMM (C x C by C x H*W) is wide enough to run near full speed.
_WIDE_IMAGE = 64


def _pixels_last(x: torch.Tensor) -> bool:
    """True when ``x`` (B, C, H, W) is stored channels-last, so (B*H*W, C) is a free view."""
    return x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last)


def apply_channel_matrix(M: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``M @ x[b, :, i, j]`` for every pixel: one GEMM, in ``M``'s dtype, keeping ``x``'s layout.

    ``x`` is ``(B, C, H, W)``; ``M`` is ``(C, C)``. Channels-last inputs give a
    channels-last result without a copy; anything else is read as NCHW.
    """
    x = x.to(M.dtype)
    B, C, H, W = x.shape
    if _pixels_last(x):
        # Rows are pixels here, so the product is x_rows @ M^T.
        return (x.permute(0, 2, 3, 1).reshape(-1, C) @ M.t()).view(B, H, W, C).permute(0, 3, 1, 2)
    if H * W < _WIDE_IMAGE:
        # Small images (the operating point's 2x2 states): one wide GEMM over all pixels, with a
        # copy to (C, B*H*W) and back, instead of B thin ones.
        wide = M @ x.transpose(0, 1).reshape(C, -1)
        return wide.view(C, B, H, W).transpose(0, 1).contiguous()
    return torch.matmul(M, x.reshape(B, C, H * W)).view(B, C, H, W)


def channel_outer(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``A = sum over batch and pixels of x g^T``, shape ``(C, C)``, in ``x``'s dtype.

    Deterministic (plain GEMMs and a fixed-order sum, no atomics).
    """
    B, C, H, W = x.shape
    g = g.to(x.dtype)
    if _pixels_last(x) and _pixels_last(g):
        return x.permute(0, 2, 3, 1).reshape(-1, C).t() @ g.permute(0, 2, 3, 1).reshape(-1, C)
    x3, g3 = x.reshape(B, C, H * W), g.reshape(B, C, H * W)
    if C <= 2 * H * W:
        # (B, C, C) partials are no larger than copying x and g to (C, B*H*W).
        return torch.matmul(x3, g3.transpose(1, 2)).sum(0)
    return x3.transpose(0, 1).reshape(C, -1) @ g3.transpose(0, 1).reshape(C, -1).t()


def _pixels(x: torch.Tensor) -> int:
    return x.shape[0] * x.shape[2] * x.shape[3]


def channel_scale(D: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``D[c] * x[:, c]`` in ``dtype``: the decay ``M = diag(D)`` of the scalar path (``D`` uniform)."""
    return x.to(dtype) * D.to(dtype)[:, None, None]


def decay_forward(Q: torch.Tensor, D: torch.Tensor, x: torch.Tensor, dtype: torch.dtype,
                  scalar: bool = False) -> torch.Tensor:
    """``Q^T diag(D) Q x`` per pixel in ``dtype``, by the cheaper of two GEMM orders.

    Forming ``M`` costs ``2 C^3`` flops and applying it ``2 P C^2`` (P pixels);
    applying ``Q``, ``D`` and ``Q^T`` in turn costs ``4 P C^2``. So ``M`` is formed
    only when there are at least as many pixels as channels. ``scalar``: ``Q`` is
    orthonormal and ``D`` uniform, so ``M = diag(D)`` and no GEMM runs.
    """
    if scalar:
        return channel_scale(D, x, dtype)
    C = Q.shape[0]
    if _pixels(x) >= C:
        return apply_channel_matrix(decay_matrix(Q, D, dtype), x)
    Q = Q.to(dtype)
    return apply_channel_matrix(Q.t(), D.to(dtype)[:, None, None] * apply_channel_matrix(Q, x))


def decay_backward(Q, D, x, g, dtype, need_x: bool, need_Q: bool, scalar: bool = False):
    """``(M g, diag(D) Q (A + A^T))`` with ``A = sum x g^T``, each only if needed, in ``dtype``.

    With few pixels (``6 P < 4 C``, by the same flop count as :func:`decay_forward`)
    neither ``M`` nor ``A`` is formed: ``grad_Q = sum (D*Qx) g^T + (D*Qg) x^T``.
    ``scalar`` (as in :func:`decay_forward`): ``M g = D g``; ``A`` is always formed, one
    GEMM instead of four.
    """
    C = Q.shape[0]
    grad_x = grad_Q = None
    if scalar:
        if need_x:
            grad_x = channel_scale(D, g, dtype)
        if need_Q:
            grad_Q = decay_grad_Q(Q, D, channel_outer(x.to(dtype), g))
        return grad_x, grad_Q
    if 6 * _pixels(x) >= 4 * C:
        if need_x:
            grad_x = apply_channel_matrix(decay_matrix(Q, D, dtype), g)
        if need_Q:
            grad_Q = decay_grad_Q(Q, D, channel_outer(x.to(dtype), g))
        return grad_x, grad_Q
    Q_c, D_c = Q.to(dtype), D.to(dtype)[:, None, None]
    Qg = apply_channel_matrix(Q_c, g)
    if need_x:
        grad_x = apply_channel_matrix(Q_c.t(), D_c * Qg)
    if need_Q:
        Qx = apply_channel_matrix(Q_c, x)
        grad_Q = as_dtype(channel_outer(D_c * Qx, g) + channel_outer(D_c * Qg, x), Q.dtype)
    return grad_x, grad_Q
