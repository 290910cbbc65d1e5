"""Triton kernels for ``feedback_input``: bilinear resize, GroupNorm, channel softmax, concat.

Shapes: x (B, Cx, H, W); h (B, Ch, Hi, Wi) with fed-back channels
``offset:offset+fb`` in ``G`` groups of ``CG = fb / G``; out (B, Cx + fb, H, W). All
contiguous NCHW. ``r = resize(h[:, offset:offset+fb])`` is never stored: every kernel
recomputes it from four taps of ``h`` with PyTorch's ``align_corners=False`` index math.

Forward: :func:`feedback_stats` (mean, 1/std of r per image and group), then
:func:`feedback_forward` writes the whole output, the copy of x and the softmax.
Backward: :func:`feedback_backward` computes ``dn = p * (g - sum_c g p)`` and
``n`` per output pixel plus per-tile partial GroupNorm sums, and a gather kernel
applies the GroupNorm backward and the transposed resize for every element of
``grad_h`` (zeros outside the slice), each input pixel summing over the output
pixels that read it, so no atomics are needed and the result is deterministic.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from dfm_fused.ops._triton.host import autotune_configs, new_output, prune_configs

_PRUNE = {"early_config_prune": prune_configs()}


@triton.jit
def source_index(o, scale, size):
    """Taps ``(i0, i1)`` and weights ``(l0, l1)`` of output index ``o`` for an input axis of
    ``size``, ``scale = size / out_size`` (float32), as ``upsample_bilinear2d`` computes them."""
    src = tl.maximum((o.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = tl.minimum(src.to(tl.int32), size - 1)
    i1 = tl.minimum(i0 + 1, size - 1)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def resize_taps(p_h, o_p, W, Wi, Hi, scale_h, scale_w, mask):
    """Bilinear value at output pixels ``o_p`` (flat in an H x W image) of the Hi x Wi planes that
    ``p_h`` points at (any broadcastable shape), float32."""
    y0, y1, ly0, ly1 = source_index(o_p // W, scale_h, Hi)
    x0, x1, lx0, lx1 = source_index(o_p % W, scale_w, Wi)
    v00 = tl.load(p_h + y0 * Wi + x0, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(p_h + y0 * Wi + x1, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(p_h + y1 * Wi + x0, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(p_h + y1 * Wi + x1, mask=mask, other=0.0).to(tl.float32)
    return ly0 * (lx0 * v00 + lx1 * v01) + ly1 * (lx0 * v10 + lx1 * v11)


# Sizes change with every input resolution; specialising on them would recompile per size.
_SPATIAL = ["Hi", "Wi", "H", "W"]


def _stats_configs():
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((1024, 4), (2048, 8))]
    return autotune_configs(configs, triton.Config({"BLOCK": 256}, num_warps=4))


@triton.autotune(configs=_stats_configs(), key=["CG"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_SPATIAL)
def feedback_stats_kernel(
    h, mean, rstd,
    Ch, offset, Hi, Wi, H, W, CG, G, scale_h, scale_w, eps,
    BLOCK: tl.constexpr,
):
    """mean, rstd: (B * G,) float32 statistics of r over each group's CG x H x W values."""
    pid = tl.program_id(0)
    i_b, i_g = pid // G, pid % G
    HW = H * W
    L = CG * HW
    p_h = h + (i_b.to(tl.int64) * Ch + offset + i_g * CG) * Hi * Wi
    # Shifting by one value of the group keeps the one-pass variance free of cancellation.
    zero = pid * 0
    b_shift = resize_taps(p_h, zero, W, Wi, Hi, scale_h, scale_w, zero == 0)
    s_d = tl.zeros((BLOCK,), dtype=tl.float32)
    s_dd = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, L, BLOCK):
        o = start + tl.arange(0, BLOCK)
        mask = o < L
        b_r = resize_taps(p_h + (o // HW).to(tl.int64) * Hi * Wi, o % HW, W, Wi, Hi, scale_h, scale_w, mask)
        b_d = tl.where(mask, b_r - b_shift, 0.0)
        s_d += b_d
        s_dd += b_d * b_d
    mean_d = tl.sum(s_d, axis=0) / L
    var = tl.maximum(tl.sum(s_dd, axis=0) / L - mean_d * mean_d, 0.0, propagate_nan=tl.PropagateNan.ALL)
    tl.store(mean + pid, b_shift + mean_d)
    tl.store(rstd + pid, 1.0 / tl.sqrt(var + eps))


def _pixel_configs():
    configs = [triton.Config({"TILE": t}, num_warps=w) for t, w in ((2048, 4), (4096, 4), (4096, 8), (8192, 8))]
    return autotune_configs(configs, triton.Config({"TILE": 1024}, num_warps=4))


@triton.jit
def _normalized_softmax(h, mean, rstd, i_b, o_f, o_p, m_f, m_p,
                        Ch, offset, Hi, Wi, W, CG, G, scale_h, scale_w):
    """``(n, p)``: GroupNorm of r and its softmax over the fb channels, (BLOCK_F, BLOCK_P) float32."""
    m_fp = m_f[:, None] & m_p[None, :]
    p_h = h + (i_b.to(tl.int64) * Ch + offset + o_f[:, None]) * Hi * Wi
    b_r = resize_taps(p_h, o_p[None, :], W, Wi, Hi, scale_h, scale_w, m_fp)
    i_stat = i_b * G + o_f // CG
    b_mean = tl.load(mean + i_stat, mask=m_f, other=0.0)
    b_rstd = tl.load(rstd + i_stat, mask=m_f, other=0.0)
    b_n = (b_r - b_mean[:, None]) * b_rstd[:, None]
    b_z = tl.where(m_f[:, None], b_n, float("-inf"))
    b_e = tl.exp(b_z - tl.max(b_z, axis=0)[None, :])
    return b_n, b_e / tl.sum(b_e, axis=0)[None, :]


@triton.autotune(configs=_pixel_configs(), key=["Cx", "CG", "G"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_SPATIAL)
def feedback_forward_kernel(
    x, h, mean, rstd, out,
    Cx, Ch, offset, Hi, Wi, H, W, CG, G, scale_h, scale_w,
    BLOCK_F: tl.constexpr,
    TILE: tl.constexpr,
):
    """out[:, :Cx] = x; out[:, Cx:] = softmax_c((r - mean) * rstd). Grid: (pixel blocks, B).

    A program owns BLOCK_P = TILE // BLOCK_F pixels of one image and all fb channels, so the
    channel softmax is a register reduction."""
    BLOCK_P: tl.constexpr = TILE // BLOCK_F
    i_p, i_b = tl.program_id(0), tl.program_id(1)
    HW = H * W
    fb = CG * G
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < HW
    o_f = tl.arange(0, BLOCK_F)
    m_f = o_f < fb
    p_out = out + i_b.to(tl.int64) * (Cx + fb) * HW
    p_x = x + i_b.to(tl.int64) * Cx * HW
    for c0 in range(0, Cx, BLOCK_F):
        o_c = c0 + o_f
        m_c = (o_c < Cx)[:, None] & m_p[None, :]
        o_cp = o_c[:, None].to(tl.int64) * HW + o_p[None, :]
        b_x = tl.load(p_x + o_cp, mask=m_c, other=0.0)
        tl.store(p_out + o_cp, b_x.to(out.dtype.element_ty), mask=m_c)
    _, b_s = _normalized_softmax(h, mean, rstd, i_b, o_f, o_p, m_f, m_p,
                                 Ch, offset, Hi, Wi, W, CG, G, scale_h, scale_w)
    o_sp = (Cx + o_f[:, None]).to(tl.int64) * HW + o_p[None, :]
    tl.store(p_out + o_sp, b_s.to(out.dtype.element_ty), mask=m_f[:, None] & m_p[None, :])


@triton.autotune(configs=_pixel_configs(), key=["Cx", "CG", "G"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_SPATIAL + ["n_pb"])
def feedback_backward_kernel(
    grad, h, mean, rstd, dn, n, part,
    Cx, Ch, offset, Hi, Wi, H, W, CG, G, scale_h, scale_w, n_pb,
    BLOCK_F: tl.constexpr,
    TILE: tl.constexpr,
):
    """grad: (B, Cx + fb, H, W); dn, n: (B, fb, H, W) float32 gradient of the normalised r and
    n itself; part: (B, n_pb, 2, BLOCK_F) float32 per-tile sums of dn and dn * n per channel.

    Grid: (n_pb, B) with n_pb = cdiv(HW, min TILE // BLOCK_F), the block count of the smallest
    tile, whatever this config's tile: programs past its last block see no pixels and write zero
    partial sums, so every config writes all of ``part`` (autotuning runs them all on one buffer)."""
    BLOCK_P: tl.constexpr = TILE // BLOCK_F
    i_p, i_b = tl.program_id(0), tl.program_id(1)
    HW = H * W
    fb = CG * G
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < HW
    o_f = tl.arange(0, BLOCK_F)
    m_f = o_f < fb
    m_fp = m_f[:, None] & m_p[None, :]
    b_n, b_s = _normalized_softmax(h, mean, rstd, i_b, o_f, o_p, m_f, m_p,
                                   Ch, offset, Hi, Wi, W, CG, G, scale_h, scale_w)
    o_fp = o_f[:, None].to(tl.int64) * HW + o_p[None, :]
    b_g = tl.load(grad + i_b.to(tl.int64) * (Cx + fb) * HW + Cx * HW + o_fp, mask=m_fp, other=0.0).to(tl.float32)
    b_dn = b_s * (b_g - tl.sum(b_g * b_s, axis=0)[None, :])
    b_dn = tl.where(m_fp, b_dn, 0.0)
    b_n = tl.where(m_fp, b_n, 0.0)
    tl.store(dn + i_b.to(tl.int64) * fb * HW + o_fp, b_dn, mask=m_fp)
    tl.store(n + i_b.to(tl.int64) * fb * HW + o_fp, b_n, mask=m_fp)
    p_part = part + ((i_b * n_pb + i_p) * 2) * BLOCK_F + o_f
    tl.store(p_part, tl.sum(b_dn, axis=1))
    tl.store(p_part + BLOCK_F, tl.sum(b_dn * b_n, axis=1))


@triton.jit
def _taps_window(i, inv_scale):
    """First output index whose taps may include input index ``i``; outputs ``o`` with a tap at ``i``
    satisfy ``(i - 0.5) / scale - 0.5 <= o < (i + 1.5) / scale - 0.5``; one index of slack each side."""
    lo = ((i.to(tl.float32) - 0.5) * inv_scale - 0.5).to(tl.int32) - 1
    return tl.maximum(lo, 0)


def _resize_configs():
    configs = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((32, 4), (64, 4), (128, 8))]
    return autotune_configs(configs, triton.Config({"BLOCK": 64}, num_warps=4))


@triton.autotune(configs=_resize_configs(), key=["fb", "BLOCK_KW"], prune_configs_by=_PRUNE)
@triton.jit(do_not_specialize=_SPATIAL + ["KH"])
def feedback_grad_h_kernel(
    dn, n, coef, grad_h,
    Ch, offset, fb, Hi, Wi, H, W, scale_h, scale_w, inv_scale_h, inv_scale_w, KH,
    BLOCK_KW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """grad_h: (B, Ch, Hi, Wi) in h's dtype; coef: (B, fb, 3) float32 with the GroupNorm backward
    ``grad_r = c0 * dn + c1 + c2 * n`` per (image, channel). Grid: (pixel blocks of Hi*Wi, Ch, B).

    Input pixel (iy, ix) gathers ``grad_r`` from the KH x BLOCK_KW output pixels that may tap it,
    weighting each by the taps' weights recomputed exactly as in the forward; an output pixel
    that does not tap it gets weight 0, so the window only has to be large enough."""
    i_q, i_c, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_q = i_q * BLOCK + tl.arange(0, BLOCK)
    m_q = o_q < Hi * Wi
    b_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    i_f = i_c - offset
    if (i_f >= 0) & (i_f < fb):
        HW = H * W
        o_plane = (i_b.to(tl.int64) * fb + i_f) * HW
        p_coef = coef + (i_b * fb + i_f) * 3
        c0 = tl.load(p_coef)
        c1 = tl.load(p_coef + 1)
        c2 = tl.load(p_coef + 2)
        iy = o_q // Wi
        ix = o_q % Wi
        # Column taps do not depend on the row: (BLOCK, BLOCK_KW) weights, computed once.
        ox = _taps_window(ix, inv_scale_w)[:, None] + tl.arange(0, BLOCK_KW)[None, :]
        x0, x1, lx0, lx1 = source_index(ox, scale_w, Wi)
        w_x = tl.where(x0 == ix[:, None], lx0, 0.0) + tl.where(x1 == ix[:, None], lx1, 0.0)
        m_x = m_q[:, None] & (ox < W) & (w_x != 0.0)
        oy_lo = _taps_window(iy, inv_scale_h)
        for dy in range(0, KH):
            oy = oy_lo + dy
            y0, y1, ly0, ly1 = source_index(oy, scale_h, Hi)
            w_y = tl.where(y0 == iy, ly0, 0.0) + tl.where(y1 == iy, ly1, 0.0)
            m = m_x & ((oy < H) & (w_y != 0.0))[:, None]
            o = o_plane + (oy * W)[:, None] + ox
            b_dn = tl.load(dn + o, mask=m, other=0.0)
            b_n = tl.load(n + o, mask=m, other=0.0)
            b_grad_r = tl.where(m, w_x * (c0 * b_dn + c1 + c2 * b_n), 0.0)
            b_acc += w_y * tl.sum(b_grad_r, axis=1)
    p_out = grad_h + (i_b.to(tl.int64) * Ch + i_c) * Hi * Wi + o_q
    tl.store(p_out, b_acc.to(grad_h.dtype.element_ty), mask=m_q)


# Every config's TILE is at least this, so BLOCK_P = TILE // BLOCK_F >= 1.
MAX_FB = 1024


def _block_f(fb: int) -> int:
    if fb > MAX_FB:
        raise ValueError(f"fb: the triton backend handles at most {MAX_FB} fed-back channels; got {fb}")
    return triton.next_power_of_2(fb)


def _geometry(h, H, W, offset, fb, groups):
    """Ch, offset, Hi, Wi, H, W, CG, G, scale_h, scale_w: the kernels' shared runtime arguments."""
    _, Ch, Hi, Wi = h.shape
    return (Ch, offset, Hi, Wi, H, W, fb // groups, groups, Hi / H, Wi / W)


def feedback_stats(h, x, offset, fb, groups, eps):
    """(mean, rstd), each (B, groups) float32, of the resized, sliced h (contiguous)."""
    B = x.shape[0]
    mean = new_output((B, groups), torch.float32, x.device)
    rstd = new_output((B, groups), torch.float32, x.device)
    # No pixels to normalise (B, H or W is 0). x may have no channels (Cx = 0): the
    # statistics come from h alone, so that is not a reason to skip the kernel.
    if B * x.shape[-2] * x.shape[-1] == 0:
        return mean.zero_(), rstd.fill_(eps ** -0.5)
    feedback_stats_kernel[(B * groups,)](h, mean, rstd, *_geometry(h, *x.shape[-2:], offset, fb, groups), eps)
    return mean, rstd


def feedback_forward(x, h, mean, rstd, offset, fb, groups, out_dtype):
    """(B, Cx + fb, H, W) ``out_dtype``: x and the softmax projection of h; x, h contiguous."""
    B, Cx, H, W = x.shape
    out = new_output((B, Cx + fb, H, W), out_dtype, x.device)
    if out.numel() == 0:
        return out
    block_f = _block_f(fb)
    grid = lambda meta: (triton.cdiv(H * W, meta["TILE"] // block_f), B)  # noqa: E731
    feedback_forward_kernel[grid](x, h, mean, rstd, out, Cx, *_geometry(h, H, W, offset, fb, groups), BLOCK_F=block_f)
    return out


def feedback_grad_h(grad, h, mean, rstd, offset, fb, groups, Cx):
    """Gradient w.r.t. contiguous h (B, Ch, Hi, Wi) given contiguous grad (B, Cx + fb, H, W)."""
    B, _, H, W = grad.shape
    _, Ch, Hi, Wi = h.shape
    HW = H * W
    if B * HW == 0:
        return torch.zeros_like(h)
    block_f = _block_f(fb)
    # Pixel blocks of the smallest tile; see feedback_backward_kernel.
    n_pb = triton.cdiv(HW, _min_tile() // block_f)
    dn = new_output((B, fb, H, W), torch.float32, grad.device)
    n = new_output((B, fb, H, W), torch.float32, grad.device)
    part = new_output((B, n_pb, 2, block_f), torch.float32, grad.device)
    feedback_backward_kernel[(n_pb, B)](
        grad, h, mean, rstd, dn, n, part, Cx, *_geometry(h, H, W, offset, fb, groups), n_pb, BLOCK_F=block_f
    )
    # GroupNorm backward: grad_r = rstd * (dn - mean(dn) - n * mean(dn * n)) over each group.
    sums = part.sum(1)[..., :fb].reshape(B, 2, groups, fb // groups).sum(-1) / (fb // groups * HW)
    rstd_c = rstd.repeat_interleave(fb // groups, dim=1)
    coef = torch.stack(
        (rstd_c, -(rstd * sums[:, 0]).repeat_interleave(fb // groups, dim=1),
         -(rstd * sums[:, 1]).repeat_interleave(fb // groups, dim=1)),
        dim=-1,
    ).contiguous()
    grad_h = new_output(h.shape, h.dtype, h.device)
    # Output pixels tapping one input index span (i + 1.5) / s - (i - 0.5) / s = 2 / s, plus the slack.
    KH = math.ceil(2 * H / Hi) + 3
    KW = math.ceil(2 * W / Wi) + 3
    feedback_grad_h_kernel[lambda meta: (triton.cdiv(Hi * Wi, meta["BLOCK"]), Ch, B)](
        dn, n, coef, grad_h,
        Ch, offset, fb, Hi, Wi, H, W, Hi / H, Wi / W, H / Hi, W / Wi, KH,
        BLOCK_KW=triton.next_power_of_2(KW),
    )
    return grad_h


def _min_tile() -> int:
    return min(c.kwargs["TILE"] for c in feedback_backward_kernel.configs)
