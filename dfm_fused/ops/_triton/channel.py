"""Triton kernels applying a C x C channel matrix per pixel (used by ``exp_decay`` and ``state_update``).

Tensors are contiguous NCHW. Pixels of all images are flattened into one axis
``n = b * HW + s`` (``N = B * HW``), so a tile of pixels may span images: small
spatial sizes (7x7) still fill whole tiles. Element ``(b, c, s)`` sits at
``b * C * HW + c * HW + s``; offsets are int64.

- :func:`channel_matmul`: ``out[:, n] = M @ norm(x[:, n]) (+ h[:, n])`` with the optional
  per-(image, channel) affine ``norm(x) = x * scale + shift`` (GroupNorm) and residual.
- :func:`channel_scale`: ``out = D[c] * norm(x) (+ h)``, the same for ``M = diag(D)`` (the
  scalar-decay path, docs/design.md 'Scalar decay'), elementwise.
- :func:`decay_map`: one of the two for the decay ``M = Q^T diag(D) Q``.
- :func:`channel_outer`: ``A = sum_n norm(x[:, n]) g[:, n]^T``, split over pixel ranges
  into partial C x C sums that are added in a fixed order (deterministic, no atomics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from dfm_fused.ops._decay import decay_matrix
from dfm_fused.ops._triton.host import autotune_configs, dot_dtype, dot_precision, new_output, prune_configs


@triton.jit
def _load_normalized(p_x, p_scale, p_shift, mask, HAS_NORM: tl.constexpr):
    """A float32 tile of ``x``, normalised when HAS_NORM; masked elements are exactly 0."""
    b_x = tl.load(p_x, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        b_x = b_x * tl.load(p_scale, mask=mask, other=0.0) + tl.load(p_shift, mask=mask, other=0.0)
    return b_x


def _matmul_configs():
    configs = [
        triton.Config({"BLOCK_CO": co, "BLOCK_P": p, "BLOCK_K": k}, num_warps=w, num_stages=s)
        for co, p, k, w, s in (
            # Tensor-core dots (half inputs, TF32).
            (64, 64, 32, 4, 3),
            (128, 64, 32, 4, 3),
            (64, 128, 32, 4, 3),
            (128, 128, 32, 8, 3),
            (128, 64, 64, 8, 3),
            # 8 warps: with the GroupNorm prologue the 4-warp tiles above spill on sm_80 (all of
            # them for float32 inputs); these do not (scripts/check_gpu_compile.py).
            (64, 64, 32, 8, 3),
            (128, 64, 32, 8, 3),
            # IEEE float32 dots (FMA): a 16-deep reduction tile keeps the operands in registers.
            (64, 64, 16, 4, 3),
            (64, 128, 16, 8, 3),
            (128, 64, 16, 8, 3),
            (64, 64, 16, 8, 3),  # the only one of these without spills with the GroupNorm prologue
        )
    ]
    return autotune_configs(configs, triton.Config({"BLOCK_CO": 32, "BLOCK_P": 64, "BLOCK_K": 32}, num_warps=4))


@triton.autotune(configs=_matmul_configs(), key=["C", "HAS_NORM", "HAS_RESIDUAL", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_configs("BLOCK_K")})
@triton.jit(do_not_specialize=["N", "HW"])
def channel_matmul_kernel(
    x, m, h, scale, shift, out,
    N, HW, C,
    HAS_NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """x, h, out: (B, C, HW); m: (C, C), its dtype is the dot operand dtype; scale, shift: (B, C) float32."""
    # Output-channel blocks vary fastest so that consecutive programs reuse the same x tile from L2.
    n_co = tl.cdiv(C, BLOCK_CO)
    pid = tl.program_id(0)
    i_co, i_p = pid % n_co, pid // n_co
    o_co = i_co * BLOCK_CO + tl.arange(0, BLOCK_CO)
    o_p = i_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_co = o_co < C
    m_p = o_p < N
    i_b = o_p // HW
    # Offset of channel 0 of each pixel; channel c adds c * HW.
    o_base = i_b.to(tl.int64) * C * HW + o_p % HW

    b_acc = tl.zeros((BLOCK_CO, BLOCK_P), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < C
        b_m = tl.load(m + o_co[:, None] * C + o_k[None, :], mask=m_co[:, None] & m_k[None, :], other=0.0)
        m_x = m_k[:, None] & m_p[None, :]
        p_stat = i_b[None, :] * C + o_k[:, None]
        b_x = _load_normalized(x + o_base[None, :] + o_k[:, None].to(tl.int64) * HW,
                               scale + p_stat, shift + p_stat, m_x, HAS_NORM)
        b_acc = tl.dot(b_m, b_x.to(m.dtype.element_ty), b_acc, input_precision=INPUT_PRECISION)

    p_out = o_base[None, :] + o_co[:, None].to(tl.int64) * HW
    m_out = m_co[:, None] & m_p[None, :]
    if HAS_RESIDUAL:
        b_acc += tl.load(h + p_out, mask=m_out, other=0.0).to(tl.float32)
    tl.store(out + p_out, b_acc.to(out.dtype.element_ty), mask=m_out)


@triton.jit(do_not_specialize=["TOTAL", "HW"])
def channel_scale_kernel(x, d, h, scale, shift, out, TOTAL, HW, C,
                         HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    """x, h, out: (B, C, HW); d: (C,) float32; scale, shift: (B, C) float32. One block of elements."""
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < TOTAL
    i_bc = o // HW
    b_out = _load_normalized(x + o, scale + i_bc, shift + i_bc, mask, HAS_NORM)
    b_out = b_out * tl.load(d + i_bc % C, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        b_out += tl.load(h + o, mask=mask, other=0.0).to(tl.float32)
    tl.store(out + o, b_out.to(out.dtype.element_ty), mask=mask)


def _outer_configs():
    configs = [
        triton.Config({"BLOCK_I": i, "BLOCK_J": j, "BLOCK_P": p}, num_warps=w, num_stages=s)
        for i, j, p, w, s in (
            # Tensor-core dots (half inputs, TF32).
            (64, 64, 64, 4, 3),
            (64, 64, 32, 4, 4),
            (128, 64, 32, 8, 3),
            (128, 128, 32, 8, 3),
            # IEEE float32 dots (FMA).
            (64, 64, 16, 4, 3),
            (64, 64, 16, 8, 3),
            (128, 64, 16, 8, 3),
        )
    ]
    return autotune_configs(configs, triton.Config({"BLOCK_I": 32, "BLOCK_J": 32, "BLOCK_P": 64}, num_warps=4))


# Every split covers a whole number of pixel tiles of any config (BLOCK_P <= 128).
_SPLIT_QUANTUM = 128


@triton.autotune(configs=_outer_configs(), key=["C", "HAS_NORM", "INPUT_PRECISION"],
                 prune_configs_by={"early_config_prune": prune_configs("BLOCK_P")})
@triton.jit(do_not_specialize=["N", "HW", "SPLIT_LEN"])
def channel_outer_kernel(
    x, g, scale, shift, part,
    N, HW, C, SPLIT_LEN,
    HAS_NORM: tl.constexpr,
    HALF_DOT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """x, g: (B, C, HW); scale, shift: (B, C) float32; part: (n_split, C, C) float32.

    HALF_DOT: the dot runs in g's (half) dtype, else in float32.
    Program (tile, split) writes ``part[split, I, J] = sum over its pixels of norm(x)[I] g[J]^T``.
    """
    n_j = tl.cdiv(C, BLOCK_J)
    pid = tl.program_id(0)
    i_split = tl.program_id(1)
    o_i = (pid // n_j) * BLOCK_I + tl.arange(0, BLOCK_I)
    o_j = (pid % n_j) * BLOCK_J + tl.arange(0, BLOCK_J)
    m_i = o_i < C
    m_j = o_j < C
    start = i_split * SPLIT_LEN
    end = tl.minimum(start + SPLIT_LEN, N)

    b_acc = tl.zeros((BLOCK_I, BLOCK_J), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_P):
        o_p = p0 + tl.arange(0, BLOCK_P)
        m_p = o_p < end
        i_b = o_p // HW
        o_base = i_b.to(tl.int64) * C * HW + o_p % HW
        m_x = m_i[:, None] & m_p[None, :]
        p_stat = i_b[None, :] * C + o_i[:, None]
        b_x = _load_normalized(x + o_base[None, :] + o_i[:, None].to(tl.int64) * HW,
                               scale + p_stat, shift + p_stat, m_x, HAS_NORM)
        b_g = tl.load(g + o_base[:, None] + o_j[None, :].to(tl.int64) * HW,
                      mask=m_p[:, None] & m_j[None, :], other=0.0)
        if HALF_DOT:
            b_acc = tl.dot(b_x.to(g.dtype.element_ty), b_g, b_acc)
        else:
            b_acc = tl.dot(b_x, b_g.to(tl.float32), b_acc, input_precision=INPUT_PRECISION)

    p_part = part + i_split.to(tl.int64) * C * C + o_i[:, None] * C + o_j[None, :]
    tl.store(p_part, b_acc, mask=m_i[:, None] & m_j[None, :])


def channel_matmul(x, M, out_dtype, h=None, scale=None, shift=None) -> torch.Tensor:
    """``M @ norm(x) (+ h)`` per pixel.

    Args:
        x: (B, C, H, W) contiguous, any supported dtype. M: (C, C), the dot operand dtype.
        out_dtype: dtype of the result. h: optional (B, C, H, W) contiguous residual.
        scale, shift: optional (B, C) float32 GroupNorm affine applied to x before the product.
    Returns:
        (B, C, H, W) contiguous ``out_dtype``.
    """
    B, C, H, W = x.shape
    N, HW = B * H * W, H * W
    if N >= 2**31:
        raise ValueError(f"x: expected fewer than 2**31 pixels (B*H*W); got {N}")
    out = new_output(x.shape, out_dtype, x.device)
    if N == 0:
        return out
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_CO"]) * triton.cdiv(N, meta["BLOCK_P"]),)  # noqa: E731
    channel_matmul_kernel[grid](
        x, M, x if h is None else h, M if scale is None else scale, M if shift is None else shift, out,
        N, HW, C,
        HAS_NORM=scale is not None,
        HAS_RESIDUAL=h is not None,
        # Only float32 dots have a precision choice; half dots keep Triton's default.
        INPUT_PRECISION=dot_precision() if M.dtype == torch.float32 else "tf32",
    )
    return out


_SCALE_BLOCK = 1024


def channel_scale(x, D, out_dtype, h=None, scale=None, shift=None) -> torch.Tensor:
    """``D[c] * norm(x) (+ h)``: :func:`channel_matmul` for ``M = diag(D)``, one elementwise kernel.

    Args:
        x: (B, C, H, W) contiguous. D: (C,) float32. Others as in :func:`channel_matmul`.
    """
    B, C, H, W = x.shape
    out = new_output(x.shape, out_dtype, x.device)
    if x.numel() == 0:
        return out
    channel_scale_kernel[(triton.cdiv(x.numel(), _SCALE_BLOCK),)](
        x, D, x if h is None else h, D if scale is None else scale, D if shift is None else shift, out,
        x.numel(), H * W, C,
        HAS_NORM=scale is not None, HAS_RESIDUAL=h is not None, BLOCK=_SCALE_BLOCK,
    )
    return out


def decay_map(x, Q, D, scalar: bool, out_dtype, h=None, scale=None, shift=None) -> torch.Tensor:
    """``M norm(x) (+ h)`` per pixel for the decay ``M = Q^T diag(D) Q``; with ``scalar`` (``Q``
    orthonormal, ``D`` uniform) ``M = diag(D)``. Arguments as in :func:`channel_matmul`."""
    if scalar:
        return channel_scale(x, D.to(torch.float32), out_dtype, h, scale, shift)
    return channel_matmul(x, decay_matrix(Q, D, torch.float32).to(dot_dtype(x)), out_dtype, h, scale, shift)


def _split_len(N: int, C: int, device) -> int:
    """Pixels per split of :func:`channel_outer`: enough splits to fill the device twice over
    (with 64 x 64 tiles), each at least 512 pixels, a multiple of every config's BLOCK_P."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 2
    tiles = triton.cdiv(C, 64) ** 2
    n_split = max(1, min(triton.cdiv(N, 512), triton.cdiv(2 * sms, tiles)))
    return triton.cdiv(triton.cdiv(N, n_split), _SPLIT_QUANTUM) * _SPLIT_QUANTUM


def channel_outer(x, g, dtype, scale=None, shift=None) -> torch.Tensor:
    """``A = sum over images and pixels of norm(x) g^T``, (C, C) float32, deterministic.

    Args:
        x, g: (B, C, H, W) contiguous. dtype: the dot operand dtype, float32 or g's dtype.
        scale, shift: optional (B, C) float32 GroupNorm affine applied to x.
    """
    B, C, H, W = x.shape
    N, HW = B * H * W, H * W
    if N >= 2**31:
        raise ValueError(f"x: expected fewer than 2**31 pixels (B*H*W); got {N}")
    if N == 0:
        return torch.zeros((C, C), dtype=torch.float32, device=x.device)
    split_len = _split_len(N, C, x.device)
    n_split = triton.cdiv(N, split_len)
    part = new_output((n_split, C, C), torch.float32, x.device)
    grid = lambda meta: (triton.cdiv(C, meta["BLOCK_I"]) * triton.cdiv(C, meta["BLOCK_J"]), n_split)  # noqa: E731
    channel_outer_kernel[grid](
        x, g, x if scale is None else scale, x if shift is None else shift, part,
        N, HW, C, split_len,
        HAS_NORM=scale is not None,
        HALF_DOT=dtype != torch.float32,
        INPUT_PRECISION=dot_precision() if dtype == torch.float32 else "tf32",
    )
    return part.sum(0)
