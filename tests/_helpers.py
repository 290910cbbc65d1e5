"""Shared test utilities: random inputs, tolerances and comparisons against the reference."""
from __future__ import annotations

import pytest
import torch

import dfm_fused

# Relative-norm tolerances per dtype of the inputs.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """``|actual - expected| / max(|expected|, floor)`` in the 2-norm. ``floor`` sets the scale
    for results that are ~0 by cancellation (e.g. GroupNorm gradients of 2-element groups)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(floor)).item()


def assert_close(actual, expected, dtype, name="", floor=1e-30, tol=None):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    err = rel_err(actual, expected, floor)
    tol = TOLERANCE[dtype] if tol is None else tol
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.0e}"


def orthogonal(C, dtype=torch.float32, device="cpu"):
    return torch.linalg.qr(torch.randn(C, C, dtype=torch.float64))[0].to(dtype=dtype, device=device)


def decay_args(C, dtype=torch.float32, device="cpu"):
    """Random (Q, S) in ``dtype`` with eigenvalue magnitudes in [0.5, 1.5) and non-trivial scalars."""
    Q = orthogonal(C, dtype, device).requires_grad_()
    S = (torch.rand(C, dtype=dtype, device=device) + 0.5)
    return Q, S


def cpu_backends():
    """Fused backends that can run CPU tensors here (the reference is the oracle, not a candidate)."""
    return [b for b in dfm_fused.available_backends("cpu") if b != "reference"]


def grads(out, inputs, seed_grad):
    return torch.autograd.grad(out, inputs, seed_grad, allow_unused=True)


# Fake CUDA tensors (FakeTensorMode) stand in for a GPU in CPU tests of host-device traffic; a
# CPU-only build of torch aborts the process when autograd meets them.
needs_cuda_build = pytest.mark.skipif(
    torch.version.cuda is None, reason="fake CUDA tensors need a CUDA build of torch (a CPU-only build aborts)"
)
