"""Helpers for the ``autograd.Function`` of every backend (torch, Triton, extension)."""
from __future__ import annotations

import contextlib
import functools

import torch

__all__ = ["as_dtype", "autocast_off", "concat_grad_x"]


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
