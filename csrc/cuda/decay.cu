// CUDA kernels of exp_decay (out = M x) and state_update (out = h + M GroupNorm(y)),
// M = Q^T diag(D) Q, forward and backward. Activations are read as NCHW.
//
// channel_matmul applies the C x C matrix per pixel as a tiled GEMM (64 channels x 64
// pixels per block, K-steps of 16 through shared memory, 4 x 4 results per thread) with the
// GroupNorm prologue and the "+ h" epilogue fused; pixels are read and written four at a
// time (16-byte accesses for float32). With scalar_decay (Q orthonormal, D uniform: M = diag(D),
// SPEC section 7) channel_scale_kernel applies D per element instead, with the same prologue
// and epilogue. grad_Q's A = sum x g^T is a separate reduction:
// per-chunk partial tiles, then a fixed-order sum over chunks, so it is deterministic.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common.h"
#include "common.cuh"

namespace dfm_fused::cuda {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256, STAT_THREADS = 256;

template <typename scalar_t, typename acc_t, bool NORM>
__device__ inline acc_t load_in(const scalar_t* x, int64_t idx, const acc_t* mean, const acc_t* rstd, int64_t bg) {
  const acc_t v = static_cast<acc_t>(x[idx]);
  if constexpr (NORM) return (v - mean[bg]) * rstd[bg];
  return v;
}

// out[b, m, p] = sum_k M[m, k] in[b, k, p] (+ add[b, m, p]), in = x or (x - mean) * rstd per group.
// Grid: (pixel tiles, channel tiles, B). vec: HW % 4 == 0 and every pointer 4-element aligned.
template <typename scalar_t, typename acc_t, typename out_t, bool NORM, bool ADD>
__global__ void __launch_bounds__(THREADS)
    channel_matmul_kernel(const acc_t* __restrict__ M, const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                          const acc_t* __restrict__ rstd, int cpg, int groups, const scalar_t* __restrict__ add,
                          out_t* __restrict__ out, int C, int64_t HW, bool vec) {
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

// out[b, c, p] = D[c] in[b, c, p] (+ add[b, c, p]), in = x or (x - mean) * rstd per group: the
// channel map diag(D) of the scalar-decay path. One thread per element; all NCHW-contiguous.
template <typename scalar_t, typename acc_t, typename out_t, bool NORM, bool ADD>
__global__ void channel_scale_kernel(const acc_t* __restrict__ D, const scalar_t* __restrict__ x,
                                     const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, int cpg,
                                     int groups, const scalar_t* __restrict__ add, out_t* __restrict__ out, int C,
                                     int64_t HW, int64_t total) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t bc = e / HW;
  const int c = static_cast<int>(bc % C);
  acc_t v = load_in<scalar_t, acc_t, NORM>(x, e, mean, rstd, (bc / C) * groups + c / cpg) * D[c];
  if constexpr (ADD) v += static_cast<acc_t>(add[e]);
  out[e] = static_cast<out_t>(v);
}

// part[s, i, j] = sum over pixels q of chunk s of a(q, i) g(q, j); q runs over (b, p) and a is
// x or GroupNorm(x). Grid: (column tiles j, row tiles i, chunks).
template <typename scalar_t, typename acc_t, bool NORM>
__global__ void __launch_bounds__(THREADS)
    outer_partial_kernel(const scalar_t* __restrict__ a, const acc_t* __restrict__ mean,
                         const acc_t* __restrict__ rstd, int cpg, int groups, const scalar_t* __restrict__ g,
                         acc_t* __restrict__ part, int C, int64_t HW, int64_t P, int64_t chunk) {
  __shared__ acc_t As[BK][BM + 1];
  __shared__ acc_t Gs[BK][BM + 1];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int j0 = blockIdx.x * BM, i0 = blockIdx.y * BM;
  const int64_t q_begin = static_cast<int64_t>(blockIdx.z) * chunk;
  const int64_t q_end = q_begin + chunk < P ? q_begin + chunk : P;
  acc_t acc[4][4] = {};
  for (int64_t q0 = q_begin; q0 < q_end; q0 += BK) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int e = tid + r * THREADS, cc = e / BK, kk = e % BK;
      const int64_t q = q0 + kk;
      acc_t va = 0, vg = 0;
      if (q < q_end) {
        const int64_t b = q / HW, p = q % HW;
        if (i0 + cc < C) {
          const int c = i0 + cc;
          va = load_in<scalar_t, acc_t, NORM>(a, (b * C + c) * HW + p, mean, rstd, b * groups + c / cpg);
        }
        if (j0 + cc < C) vg = static_cast<acc_t>(g[(b * C + j0 + cc) * HW + p]);
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

// mean and rstd (biased variance) of each (b, group): a contiguous run of cpg * HW elements.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(STAT_THREADS)
    group_stats_kernel(const scalar_t* __restrict__ y, int64_t n, double eps, acc_t* mean, acc_t* rstd) {
  const scalar_t* src = y + static_cast<int64_t>(blockIdx.x) * n;
  double s = 0, ss = 0;
  for (int64_t e = threadIdx.x; e < n; e += STAT_THREADS) {
    const double v = static_cast<double>(static_cast<acc_t>(src[e]));
    s += v;
    ss += v * v;
  }
  block_sum2<STAT_THREADS>(s, ss);
  if (threadIdx.x == 0) {
    const double m = s / n, var = fmax(ss / n - m * m, 0.0);
    mean[blockIdx.x] = static_cast<acc_t>(m);
    rstd[blockIdx.x] = static_cast<acc_t>(rsqrt(var + eps));
  }
}

// Per (b, group): c1 = rstd mean(gn), c2 = rstd^2 mean(gn n), n = (y - mean) rstd.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(STAT_THREADS)
    group_grad_sums_kernel(const acc_t* __restrict__ gn, const scalar_t* __restrict__ y, const acc_t* mean,
                           const acc_t* rstd, int64_t n, acc_t* c1, acc_t* c2) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  const acc_t m = mean[blockIdx.x], r = rstd[blockIdx.x];
  double s1 = 0, s2 = 0;
  for (int64_t e = threadIdx.x; e < n; e += STAT_THREADS) {
    const acc_t v = gn[base + e];
    s1 += v;
    s2 += static_cast<double>(v) * ((static_cast<acc_t>(y[base + e]) - m) * r);
  }
  block_sum2<STAT_THREADS>(s1, s2);
  if (threadIdx.x == 0) {
    c1[blockIdx.x] = static_cast<acc_t>(r * s1 / n);
    c2[blockIdx.x] = static_cast<acc_t>(static_cast<double>(r) * r * s2 / n);
  }
}

// grad_y = gn rstd - c1 - (y - mean) c2, per element; group index = element / n.
template <typename scalar_t, typename acc_t>
__global__ void group_norm_backward_kernel(const acc_t* __restrict__ gn, const scalar_t* __restrict__ y,
                                           const acc_t* mean, const acc_t* rstd, const acc_t* c1, const acc_t* c2,
                                           int64_t n, int64_t total, scalar_t* __restrict__ grad_y) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t bg = e / n;
  grad_y[e] = static_cast<scalar_t>(gn[e] * rstd[bg] - c1[bg] - (static_cast<acc_t>(y[e]) - mean[bg]) * c2[bg]);
}

at::Tensor decay_matrix(const at::Tensor& Q, const at::Tensor& D) {
  return at::mm(Q.t() * D.unsqueeze(0), Q).contiguous();
}

bool vec_ok(int64_t HW, std::initializer_list<const at::Tensor*> tensors) {
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
  if (M.dim() == 1) {
    channel_scale_kernel<scalar_t, acc_t, out_t, NORM, ADD>
        <<<blocks_for(x.numel(), 256), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
            M.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), NORM ? mean.const_data_ptr<acc_t>() : nullptr,
            NORM ? rstd.const_data_ptr<acc_t>() : nullptr, static_cast<int>(C / groups), static_cast<int>(groups),
            ADD ? add.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<out_t>(), static_cast<int>(C), HW,
            x.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const dim3 grid(blocks_for(HW, BN), blocks_for(C, BM), static_cast<unsigned>(B));
  const bool vec = vec_ok(HW, {&x, &add, &out});
  channel_matmul_kernel<scalar_t, acc_t, out_t, NORM, ADD><<<grid, THREADS, 0, c10::cuda::getCurrentCUDAStream()>>>(
      M.const_data_ptr<acc_t>(), x.const_data_ptr<scalar_t>(), NORM ? mean.const_data_ptr<acc_t>() : nullptr,
      NORM ? rstd.const_data_ptr<acc_t>() : nullptr, static_cast<int>(C / groups), static_cast<int>(groups),
      ADD ? add.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<out_t>(), static_cast<int>(C), HW, vec);
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
  outer_partial_kernel<scalar_t, acc_t, NORM><<<grid, THREADS, 0, stream>>>(
      a.const_data_ptr<scalar_t>(), NORM ? mean.const_data_ptr<acc_t>() : nullptr,
      NORM ? rstd.const_data_ptr<acc_t>() : nullptr, static_cast<int>(C / groups), static_cast<int>(groups),
      g.const_data_ptr<scalar_t>(), part.mutable_data_ptr<acc_t>(), static_cast<int>(C), HW, P, chunk);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor A = at::empty({C, C}, Q.options());
  sum_parts_kernel<acc_t><<<blocks_for(C * C, 256), 256, 0, stream>>>(part.const_data_ptr<acc_t>(), used, C * C,
                                                                      A.mutable_data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return (D.unsqueeze(1) * at::mm(Q, A + A.t())).contiguous();
}

// The channel map applied per pixel: M = Q^T diag(D) Q, or just D (for diag(D)) with scalar_decay.
at::Tensor channel_map(const at::Tensor& Q, const at::Tensor& D, bool scalar_decay) {
  return scalar_decay ? D.contiguous() : decay_matrix(Q, D);
}

at::Tensor to_layout(const at::Tensor& t, at::MemoryFormat fmt) {
  return fmt == at::MemoryFormat::Contiguous ? t : t.contiguous(fmt);
}

}  // namespace

at::Tensor exp_decay(const at::Tensor& x_, const at::Tensor& Q, const at::Tensor& D, bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_args(x_, Q, D);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  at::Tensor out = empty_output(x.sizes(), x.options());
  if (x.numel() == 0) return to_layout(out, layout_of(x_));
  const at::Tensor M = channel_map(Q, D, scalar_decay);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfm_fused_exp_decay_cuda", [&] {
    launch_matmul<scalar_t, scalar_t, false, false>(M, x, at::Tensor(), at::Tensor(), 1, at::Tensor(), out);
  });
  return to_layout(out, layout_of(x_));
}

std::tuple<at::Tensor, at::Tensor> exp_decay_backward(const at::Tensor& grad_, const at::Tensor& x_,
                                                      const at::Tensor& Q, const at::Tensor& D, bool need_x,
                                                      bool need_Q, bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_args(x_, Q, D);
  TORCH_CHECK(grad_.sizes() == x_.sizes() && grad_.scalar_type() == x_.scalar_type(),
              "dfm_fused: grad must match x in shape and dtype");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), grad = grad_.contiguous();
  at::Tensor grad_x = at::empty({0}, x.options()), grad_Q = at::empty({0}, Q.options());
  if (x.numel() == 0) {
    if (need_x) grad_x = at::zeros_like(x_, x_.options(), layout_of(x_));
    if (need_Q) grad_Q = at::zeros_like(Q);
    return {grad_x, grad_Q};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfm_fused_exp_decay_backward_cuda",
                                  [&] {
    if (need_x) {
      grad_x = empty_output(x.sizes(), x.options());
      launch_matmul<scalar_t, scalar_t, false, false>(channel_map(Q, D, scalar_decay), grad, at::Tensor(),
                                                      at::Tensor(), 1, at::Tensor(), grad_x);
      grad_x = to_layout(grad_x, layout_of(x_));
    }
    if (need_Q) grad_Q = grad_Q_of<scalar_t, false>(x, grad, at::Tensor(), at::Tensor(), 1, Q, D);
  });
  return {grad_x, grad_Q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> state_update(const at::Tensor& h_, const at::Tensor& y_,
                                                            const at::Tensor& Q, const at::Tensor& D, int64_t groups,
                                                            double eps, bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_state_update_args(h_, y_, Q, D, groups);
  const c10::cuda::CUDAGuard guard(h_.device());
  const at::Tensor h = h_.contiguous(), y = y_.contiguous();
  const int64_t B = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  at::Tensor out = empty_output(h.sizes(), h.options());
  at::Tensor mean = empty_output({B, groups}, Q.options()), rstd = empty_output({B, groups}, Q.options());
  if (h.numel() == 0) return {to_layout(out, layout_of(h_)), mean, rstd};
  const at::Tensor M = channel_map(Q, D, scalar_decay);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dfm_fused_state_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    group_stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B * groups), STAT_THREADS, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        y.const_data_ptr<scalar_t>(), C / groups * HW, eps, mean.mutable_data_ptr<acc_t>(),
        rstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_matmul<scalar_t, scalar_t, true, true>(M, y, mean, rstd, groups, h, out);
  });
  return {to_layout(out, layout_of(h_)), mean, rstd};
}

std::tuple<at::Tensor, at::Tensor> state_update_backward(const at::Tensor& grad_, const at::Tensor& y_,
                                                         const at::Tensor& Q, const at::Tensor& D,
                                                         const at::Tensor& mean_, const at::Tensor& rstd_,
                                                         int64_t groups, bool need_y, bool need_Q,
                                                         bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_args(y_, Q, D);
  TORCH_CHECK(grad_.sizes() == y_.sizes() && grad_.scalar_type() == y_.scalar_type(),
              "dfm_fused: grad must match y in shape and dtype");
  const c10::cuda::CUDAGuard guard(y_.device());
  const at::Tensor grad = grad_.contiguous(), y = y_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t B = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3), n = C / groups * HW;
  at::Tensor grad_y = at::empty({0}, y.options()), grad_Q = at::empty({0}, Q.options());
  if (y.numel() == 0) {
    if (need_y) grad_y = at::zeros_like(y_, y_.options(), layout_of(grad_));
    if (need_Q) grad_Q = at::zeros_like(Q);
    return {grad_y, grad_Q};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dfm_fused_state_update_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (need_y) {
      at::Tensor gn = at::empty(y.sizes(), Q.options());
      launch_matmul<scalar_t, acc_t, false, false>(channel_map(Q, D, scalar_decay), grad, at::Tensor(),
                                                   at::Tensor(), 1, at::Tensor(), gn);
      at::Tensor c1 = at::empty({B, groups}, Q.options()), c2 = at::empty({B, groups}, Q.options());
      group_grad_sums_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B * groups), STAT_THREADS, 0, stream>>>(
          gn.const_data_ptr<acc_t>(), y.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
          rstd.const_data_ptr<acc_t>(), n, c1.mutable_data_ptr<acc_t>(), c2.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_y = empty_output(y.sizes(), y.options());
      group_norm_backward_kernel<scalar_t, acc_t><<<blocks_for(y.numel(), 256), 256, 0, stream>>>(
          gn.const_data_ptr<acc_t>(), y.const_data_ptr<scalar_t>(), mean.const_data_ptr<acc_t>(),
          rstd.const_data_ptr<acc_t>(), c1.const_data_ptr<acc_t>(), c2.const_data_ptr<acc_t>(), n, y.numel(),
          grad_y.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_y = to_layout(grad_y, layout_of(grad_));
    }
    if (need_Q) grad_Q = grad_Q_of<scalar_t, true>(y, grad, mean, rstd, groups, Q, D);
  });
  return {grad_y, grad_Q};
}

}  // namespace dfm_fused::cuda
