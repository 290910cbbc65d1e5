// Channel maps shared by the CUDA kernels of exp_decay and state_update, activations read as NCHW:
// apply M = Q^T diag(D) Q per pixel (or, with scalar_decay, diag(D)), and form grad_Q's
// A = sum a g^T, a being x or GroupNorm(y).
//
// channel_matmul applies the C x C matrix per pixel as a tiled GEMM (64 channels x 64
// pixels per block, K-steps of 16 through shared memory, 4 x 4 results per thread) with the
// GroupNorm prologue and the "+ h" epilogue fused; pixels are read and written four at a
// time (16-byte accesses for float32). With scalar_decay (Q orthonormal, D uniform: M = diag(D),
// docs/design.md 'Scalar decay') channel_scale_kernel applies D per element instead, with the same prologue
// and epilogue. grad_Q's A = sum x g^T is a separate reduction:
// per-chunk partial tiles, then a fixed-order sum over chunks, so it is deterministic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <initializer_list>

#include "../common.h"
#include "common.cuh"

namespace dfm_fused::cuda {

constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;

// Arguments of the channel-map kernels: out = M in (+ add), in = x, or (x - mean) * rstd per group
// with NORM. Pointers are NCHW-contiguous; mean, rstd (B, groups) are null without NORM, add
// (like x) without ADD.
template <typename scalar_t, typename acc_t, typename out_t>
struct ChannelMapParams {
  const acc_t* M;  // (C, C), or (C,) standing for diag(M)
  const scalar_t* x;
  const acc_t* mean;
  const acc_t* rstd;
  const scalar_t* add;
  out_t* out;
  int C, cpg, groups;
  int64_t HW;
  bool vec;  // HW % 4 == 0 and every pointer 4-element aligned: 16-byte accesses (channel_matmul_kernel)
};

// Arguments of outer_partial_kernel: part[s] = sum over the pixels of chunk s of a g^T, a = x or
// (x - mean) * rstd per group with NORM.
template <typename scalar_t, typename acc_t>
struct OuterParams {
  const scalar_t* a;
  const acc_t* mean;
  const acc_t* rstd;
  const scalar_t* g;
  acc_t* part;  // (chunks, C, C)
  int C, cpg, groups;
  int64_t HW, P, chunk;  // pixels per image, B * HW, pixels per chunk
};

template <typename scalar_t, typename acc_t, bool NORM>
__device__ inline acc_t load_in(const scalar_t* x, int64_t idx, const acc_t* mean, const acc_t* rstd, int64_t bg) {
  const acc_t v = static_cast<acc_t>(x[idx]);
  if constexpr (NORM) return (v - mean[bg]) * rstd[bg];
  return v;
}

// out[b, m, p] = sum_k M[m, k] in[b, k, p] (+ add[b, m, p]). Grid: (pixel tiles, channel tiles, B).
template <typename scalar_t, typename acc_t, typename out_t, bool NORM, bool ADD>
__global__ void __launch_bounds__(THREADS) channel_matmul_kernel(const ChannelMapParams<scalar_t, acc_t, out_t> prm) {
  const acc_t* __restrict__ M = prm.M;
  const scalar_t* __restrict__ x = prm.x;
  const acc_t* __restrict__ mean = prm.mean;
  const acc_t* __restrict__ rstd = prm.rstd;
  const scalar_t* __restrict__ add = prm.add;
  out_t* __restrict__ out = prm.out;
  const int C = prm.C, cpg = prm.cpg, groups = prm.groups;
  const int64_t HW = prm.HW;
  const bool vec = prm.vec;
  __shared__ acc_t Ms[BK][BM + 1];  // +1: column stores hit distinct banks
  __shared__ acc_t Xs[BK][BN];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int m0 = blockIdx.y * BM;
  const int64_t b = blockIdx.z;
  const scalar_t* xb = x + b * C * HW;
  acc_t acc[4][4] = {};
  for (int k0 = 0; k0 < C; k0 += BK) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = tid + r * THREADS, m = e / BK, k = e % BK;
      Ms[k][m] = (m0 + m < C && k0 + k < C) ? M[static_cast<int64_t>(m0 + m) * C + k0 + k] : acc_t(0);
    }
    {
      const int k = tid / 16, c = k0 + k;
      const int64_t p = p0 + (tid % 16) * 4;
      acc_t v[4] = {};
      if (c < C) {
        const int64_t idx = static_cast<int64_t>(c) * HW + p;
        const int64_t bg = b * groups + c / cpg;
        if (vec && p + 3 < HW) {
          const Vec4<scalar_t> q = *reinterpret_cast<const Vec4<scalar_t>*>(xb + idx);
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            v[j] = static_cast<acc_t>(q.v[j]);
            if constexpr (NORM) v[j] = (v[j] - mean[bg]) * rstd[bg];
          }
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (p + j < HW) v[j] = load_in<scalar_t, acc_t, NORM>(xb, idx + j, mean, rstd, bg);
          }
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) Xs[k][(tid % 16) * 4 + j] = v[j];
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t a[4], xv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = Ms[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) xv[j] = Xs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * xv[j];
      }
    }
    __syncthreads();
  }
  const int64_t p = p0 + tx * 4;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int m = m0 + ty * 4 + i;
    if (m >= C) continue;
    const int64_t idx = (b * C + m) * HW + p;
    if (vec && p + 3 < HW) {
      Vec4<out_t> q;
      if constexpr (ADD) {
        const Vec4<scalar_t> h = *reinterpret_cast<const Vec4<scalar_t>*>(add + idx);
#pragma unroll
        for (int j = 0; j < 4; ++j) q.v[j] = static_cast<out_t>(acc[i][j] + static_cast<acc_t>(h.v[j]));
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) q.v[j] = static_cast<out_t>(acc[i][j]);
      }
      *reinterpret_cast<Vec4<out_t>*>(out + idx) = q;
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (p + j >= HW) break;
        acc_t v = acc[i][j];
        if constexpr (ADD) v += static_cast<acc_t>(add[idx + j]);
        out[idx + j] = static_cast<out_t>(v);
      }
    }
  }
}

// out[b, c, p] = D[c] in[b, c, p] (+ add[b, c, p]): the channel map diag(D) of the scalar-decay path
// (prm.M is D). One thread per element.
template <typename scalar_t, typename acc_t, typename out_t, bool NORM, bool ADD>
__global__ void channel_scale_kernel(const ChannelMapParams<scalar_t, acc_t, out_t> prm, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t bc = e / prm.HW;
  const int c = static_cast<int>(bc % prm.C);
  acc_t v = load_in<scalar_t, acc_t, NORM>(prm.x, e, prm.mean, prm.rstd, (bc / prm.C) * prm.groups + c / prm.cpg) *
            prm.M[c];
  if constexpr (ADD) v += static_cast<acc_t>(prm.add[e]);
  prm.out[e] = static_cast<out_t>(v);
}

// part[s, i, j] = sum over pixels q of chunk s of a(q, i) g(q, j); q runs over (b, p).
// Grid: (column tiles j, row tiles i, chunks).
template <typename scalar_t, typename acc_t, bool NORM>
__global__ void __launch_bounds__(THREADS) outer_partial_kernel(const OuterParams<scalar_t, acc_t> prm) {
  const scalar_t* __restrict__ a = prm.a;
  const acc_t* __restrict__ mean = prm.mean;
  const acc_t* __restrict__ rstd = prm.rstd;
  const scalar_t* __restrict__ g = prm.g;
  acc_t* __restrict__ part = prm.part;
  const int C = prm.C, cpg = prm.cpg, groups = prm.groups;
  const int64_t HW = prm.HW, P = prm.P, chunk = prm.chunk;
  __shared__ acc_t As[BK][BM + 1];
  __shared__ acc_t Gs[BK][BM + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int j0 = blockIdx.x * BM, i0 = blockIdx.y * BM;
  const int64_t q_begin = static_cast<int64_t>(blockIdx.z) * chunk;
  const int64_t q_end = q_begin + chunk < P ? q_begin + chunk : P;
  acc_t acc[4][4] = {};
  // A thread loads pixel q0 + kk of channels cc0, cc0 + 16, ...: THREADS is a multiple of BK, so
  // its pixel is the same in all four loads, and its image and offset are divided out once per
  // K-step (with them recomputed per load, ptxas spilled on sm_80).
  static_assert(THREADS % BK == 0 && THREADS / BK * 4 == BM, "one pixel per thread and K-step");
  const int kk = tid % BK, cc0 = tid / BK;
  for (int64_t q0 = q_begin; q0 < q_end; q0 += BK) {
    const int64_t q = q0 + kk;
    const bool inside = q < q_end;
    const int64_t b = inside ? q / HW : 0, pixel = (inside ? q % HW : 0) + b * C * HW;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int cc = cc0 + r * (THREADS / BK);
      acc_t va = 0, vg = 0;
      if (inside) {
        if (i0 + cc < C) {
          const int c = i0 + cc;
          va = load_in<scalar_t, acc_t, NORM>(a, pixel + c * HW, mean, rstd, b * groups + c / cpg);
        }
        if (j0 + cc < C) vg = static_cast<acc_t>(g[pixel + (j0 + cc) * HW]);
      }
      As[kk][cc] = va;
      Gs[kk][cc] = vg;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; ++kk) {
      acc_t av[4], gv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) gv[j] = Gs[kk][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * gv[j];
      }
    }
    __syncthreads();
  }
  acc_t* dst = part + static_cast<int64_t>(blockIdx.z) * C * C;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = i0 + ty * 4 + i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = j0 + tx * 4 + j;
      if (row < C && col < C) dst[static_cast<int64_t>(row) * C + col] = acc[i][j];
    }
  }
}

template <typename acc_t>
__global__ void sum_parts_kernel(const acc_t* __restrict__ part, int64_t chunks, int64_t CC, acc_t* __restrict__ A) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= CC) return;
  acc_t s = 0;
  for (int64_t k = 0; k < chunks; ++k) s += part[k * CC + e];
  A[e] = s;
}

inline at::Tensor decay_matrix(const at::Tensor& Q, const at::Tensor& D) {
  return at::mm(Q.t() * D.unsqueeze(0), Q).contiguous();
}

inline bool vec_ok(int64_t HW, std::initializer_list<const at::Tensor*> tensors) {
  if (HW % 4 != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (t->defined() && !aligned4(t->data_ptr(), t->element_size())) return false;
  }
  return true;
}

// out = M (x or GroupNorm(x)) (+ add); all NCHW-contiguous. M: C x C, or (C,) standing for diag(M).
template <typename scalar_t, typename out_t, bool NORM, bool ADD>
void launch_matmul(const at::Tensor& M, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
                   int64_t groups, const at::Tensor& add, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const ChannelMapParams<scalar_t, acc_t, out_t> prm{
      M.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), NORM ? mean.const_data_ptr<acc_t>() : nullptr,
      NORM ? rstd.const_data_ptr<acc_t>() : nullptr, ADD ? add.const_data_ptr<scalar_t>() : nullptr,
      out.mutable_data_ptr<out_t>(), static_cast<int>(C), static_cast<int>(C / groups), static_cast<int>(groups),
      HW, M.dim() == 2 && vec_ok(HW, {&x, &add, &out})};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (M.dim() == 1) {
    channel_scale_kernel<scalar_t, acc_t, out_t, NORM, ADD><<<blocks_for(x.numel(), 256), 256, 0, stream>>>(
        prm, x.numel());
  } else {
    const dim3 grid(blocks_for(HW, BN), blocks_for(C, BM), static_cast<unsigned>(B));
    channel_matmul_kernel<scalar_t, acc_t, out_t, NORM, ADD><<<grid, THREADS, 0, stream>>>(prm);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// grad_Q = diag(D) Q (A + A^T), A = sum a g^T over batch and pixels (a = x or GroupNorm(x)).
template <typename scalar_t, bool NORM>
at::Tensor grad_Q_of(const at::Tensor& a, const at::Tensor& g, const at::Tensor& mean, const at::Tensor& rstd,
                     int64_t groups, const at::Tensor& Q, const at::Tensor& D) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = a.size(0), C = a.size(1), HW = a.size(2) * a.size(3), P = B * HW;
  // Pixel chunks: enough blocks to fill the GPU, fixed by the problem size alone.
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(64, P / 1024));
  const int64_t chunk = ((P + chunks - 1) / chunks + BK - 1) / BK * BK;
  const int64_t used = (P + chunk - 1) / chunk;
  at::Tensor part = at::empty({used, C, C}, Q.options());
  const dim3 grid(blocks_for(C, BM), blocks_for(C, BM), static_cast<unsigned>(used));
  auto stream = c10::cuda::getCurrentCUDAStream();
  const OuterParams<scalar_t, acc_t> prm{
      a.const_data_ptr<scalar_t>(), NORM ? mean.const_data_ptr<acc_t>() : nullptr,
      NORM ? rstd.const_data_ptr<acc_t>() : nullptr, g.const_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(),
      static_cast<int>(C), static_cast<int>(C / groups), static_cast<int>(groups), HW, P, chunk};
  outer_partial_kernel<scalar_t, acc_t, NORM><<<grid, THREADS, 0, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor A = at::empty({C, C}, Q.options());
  sum_parts_kernel<acc_t><<<blocks_for(C * C, 256), 256, 0, stream>>>(part.const_data_ptr<acc_t>(), used, C * C,
                                                                      A.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return (D.unsqueeze(1) * at::mm(Q, A + A.t())).contiguous();
}

// The channel map applied per pixel: M = Q^T diag(D) Q, or just D (for diag(D)) with scalar_decay.
inline at::Tensor channel_map(const at::Tensor& Q, const at::Tensor& D, bool scalar_decay) {
  return scalar_decay ? D.contiguous() : decay_matrix(Q, D);
}

inline at::Tensor to_layout(const at::Tensor& t, at::MemoryFormat fmt) {
  return fmt == at::MemoryFormat::Contiguous ? t : t.contiguous(fmt);
}

}  // namespace dfm_fused::cuda
