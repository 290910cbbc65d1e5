"""Triton GroupNorm kernels (no affine), used by ``state_update``.

In contiguous NCHW, group ``g`` of image ``b`` is one contiguous run of
``L = (C / G) * HW`` elements starting at ``(b * G + g) * L``, so one program
per (image, group) streams it with plain vector loads.

- :func:`group_stats`: mean and 1/std per (image, group), float32, one pass.
- :func:`group_norm_backward`: ``dy = rstd * (dn - mean(dn) - n * mean(dn * n))``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfm_fused.ops._triton.host import autotune_configs, new_output, prune_configs

_PRUNE = {"early_config_prune": prune_configs()}


def _row_configs():
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8), (4096, 8))]
    return autotune_configs(configs, triton.Config({"BLOCK": 256}, num_warps=4))


@triton.jit
def group_moments(x, L, BLOCK: tl.constexpr):
    """(mean, variance) in float32 of the ``L`` (> 0) contiguous elements at pointer ``x``.

    One pass over data shifted by its first element, which keeps ``E[d^2] - E[d]^2`` free of
    cancellation whenever the values sit near one another relative to their offset from zero.
    """
    b_shift = tl.load(x).to(tl.float32)
    s_d = tl.zeros((BLOCK,), dtype=tl.float32)
    s_dd = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, L, BLOCK):
        o = start + tl.arange(0, BLOCK)
        mask = o < L
        b_d = tl.where(mask, tl.load(x + o, mask=mask, other=0.0).to(tl.float32) - b_shift, 0.0)
        s_d += b_d
        s_dd += b_d * b_d
    mean_d = tl.sum(s_d, axis=0) / L
    var = tl.maximum(tl.sum(s_dd, axis=0) / L - mean_d * mean_d, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return b_shift + mean_d, var


@triton.autotune(configs=_row_configs(), key=["L"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["L"])
def group_stats_kernel(y, mean, rstd, L, eps, BLOCK: tl.constexpr):
    """y: (B * G, L) any float dtype; mean, rstd: (B * G,) float32."""
    pid = tl.program_id(0)
    b_mean, b_var = group_moments(y + pid.to(tl.int64) * L, L, BLOCK)
    tl.store(mean + pid, b_mean)
    tl.store(rstd + pid, 1.0 / tl.sqrt(b_var + eps))


@triton.autotune(configs=_row_configs(), key=["L"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=["L"])
def group_norm_backward_kernel(dn, y, mean, rstd, dy, L, BLOCK: tl.constexpr):
    """dn: (B * G, L) float32 gradient of the normalised y; y, dy: (B * G, L); mean, rstd: (B * G,)."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * L
    b_mean = tl.load(mean + pid)
    b_rstd = tl.load(rstd + pid)
    s_dn = tl.zeros((BLOCK,), dtype=tl.float32)
    s_dnn = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, L, BLOCK):
        o = start + tl.arange(0, BLOCK)
        mask = o < L
        b_dn = tl.load(dn + base + o, mask=mask, other=0.0)
        b_n = (tl.load(y + base + o, mask=mask, other=0.0).to(tl.float32) - b_mean) * b_rstd
        s_dn += b_dn
        s_dnn += b_dn * b_n
    c_dn = tl.sum(s_dn, axis=0) / L
    c_dnn = tl.sum(s_dnn, axis=0) / L
    for start in range(0, L, BLOCK):
        o = start + tl.arange(0, BLOCK)
        mask = o < L
        b_dn = tl.load(dn + base + o, mask=mask, other=0.0)
        b_n = (tl.load(y + base + o, mask=mask, other=0.0).to(tl.float32) - b_mean) * b_rstd
        b_dy = b_rstd * (b_dn - c_dn - b_n * c_dnn)
        tl.store(dy + base + o, b_dy.to(dy.dtype.element_ty), mask=mask)


def group_stats(y: torch.Tensor, groups: int, eps: float):
    """``(mean, rstd)``, each (B, groups) float32, of contiguous y (B, C, H, W)."""
    B, C, H, W = y.shape
    mean = new_output((B, groups), torch.float32, y.device)
    rstd = new_output((B, groups), torch.float32, y.device)
    if y.numel() == 0:
        return mean.zero_(), rstd.fill_(eps ** -0.5)
    group_stats_kernel[(B * groups,)](y, mean, rstd, C // groups * H * W, eps)
    return mean, rstd


def group_affine(mean: torch.Tensor, rstd: torch.Tensor, C: int):
    """Per-(image, channel) ``(scale, shift)`` with ``GroupNorm(y) = y * scale + shift``, (B, C) float32."""
    repeat = C // mean.shape[1]
    scale = rstd.repeat_interleave(repeat, dim=1)
    shift = (-mean * rstd).repeat_interleave(repeat, dim=1)
    return scale, shift


def group_norm_backward(dn: torch.Tensor, y: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. contiguous y (B, C, H, W) of GroupNorm(y) given its gradient dn (float32), in y's dtype."""
    B, C, H, W = y.shape
    groups = mean.shape[1]
    dy = new_output(y.shape, y.dtype, y.device)
    if y.numel() == 0:
        return dy
    group_norm_backward_kernel[(B * groups,)](dn, y, mean, rstd, dy, C // groups * H * W)
    return dy
