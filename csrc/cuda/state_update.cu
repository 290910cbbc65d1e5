// CUDA kernels of state_update: out = h + M GroupNorm(y), M = Q^T diag(D) Q (or diag(D) with
// scalar_decay), and its backward. The channel maps are in channel_map.cuh; the GroupNorm
// statistics and backward (fixed-order block sums: deterministic) are here.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common.h"
#include "channel_map.cuh"

namespace dfm_fused::cuda {
namespace {

constexpr int STAT_THREADS = 256;

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
  store_group_stats(s, ss, n, eps, blockIdx.x, mean, rstd);
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
}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> state_update(const at::Tensor& h_, const at::Tensor& y_,
                                                                        const at::Tensor& Q, const at::Tensor& D,
                                                                        int64_t groups, double eps, bool scalar_decay,
                                                                        bool keep_M) {
  DFM_FUSED_NO_AUTOCAST();
  check_state_update_args(h_, y_, Q, D, groups);
  const c10::cuda::CUDAGuard guard(h_.device());
  const at::Tensor h = h_.contiguous(), y = y_.contiguous();
  const int64_t B = y.size(0), C = y.size(1), HW = y.size(2) * y.size(3);
  at::Tensor out = empty_output(h.sizes(), h.options());
  at::Tensor mean = empty_output({B, groups}, Q.options()), rstd = empty_output({B, groups}, Q.options());
  const at::Tensor M = channel_map(Q, D, scalar_decay);
  // The forward forms M anyway: kept for the backward when asked (never the scalar path's D).
  const at::Tensor kept = keep_M && !scalar_decay ? M : at::empty({0}, Q.options());
  if (h.numel() == 0) return {to_layout(out, layout_of(h_)), mean, rstd, kept};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dfm_fused_state_update_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    group_stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B * groups), STAT_THREADS, 0,
                                          c10::cuda::getCurrentCUDAStream()>>>(
        y.const_data_ptr<scalar_t>(), C / groups * HW, eps, mean.mutable_data_ptr<acc_t>(),
        rstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_matmul<scalar_t, scalar_t, true, true>(M, y, mean, rstd, groups, h, out);
  });
  return {to_layout(out, layout_of(h_)), mean, rstd, kept};
}

std::tuple<at::Tensor, at::Tensor> state_update_backward(const at::Tensor& grad_, const at::Tensor& y_,
                                                         const at::Tensor& Q, const at::Tensor& D,
                                                         const at::Tensor& mean_, const at::Tensor& rstd_,
                                                         int64_t groups, bool need_y, bool need_Q,
                                                         bool scalar_decay, const std::optional<at::Tensor>& M) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_backward_args(grad_, y_, Q, D, "y");
  const bool saved = !scalar_decay && M.has_value() && M->numel() > 0;
  if (saved) check_saved_M(*M, Q);
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
      const at::Tensor map = saved ? M->contiguous() : channel_map(Q, D, scalar_decay);
      launch_matmul<scalar_t, acc_t, false, false>(map, grad, at::Tensor(), at::Tensor(), 1, at::Tensor(), gn);
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
