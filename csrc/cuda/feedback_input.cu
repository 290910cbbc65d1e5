// CUDA kernels of feedback_input: out = cat([x, softmax_c(GroupNorm(resize(h[:, off:off+fb])))]).
//
// The bilinear resize is never materialised: each kernel recomputes the value it needs from
// the small state (four taps, cached). Forward: per-(b, group) statistics, then one thread
// per output pixel copies x's channels and writes the channel softmax. Backward: per pixel
// softmax gradient into a float scratch, per-(b, group) GroupNorm sums (fixed-order block
// reductions), then the bilinear backward as a gather, one thread per state element, so no
// atomics and bitwise-reproducible results.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common.h"
#include "common.cuh"

namespace dfm_fused::cuda {
namespace {

constexpr int THREADS = 256;

// Bilinear taps of output index d (align_corners=False), as ATen computes them.
template <typename acc_t>
struct Taps {
  int i0, i1;
  acc_t l0, l1;
};

template <typename acc_t>
__device__ inline Taps<acc_t> taps(int64_t d, int64_t in, acc_t scale) {
  acc_t src = scale * (static_cast<acc_t>(d) + acc_t(0.5)) - acc_t(0.5);
  src = src < acc_t(0) ? acc_t(0) : src;
  int lo = static_cast<int>(floor(src));
  lo = lo < in - 1 ? lo : static_cast<int>(in - 1);
  acc_t lambda = src - static_cast<acc_t>(lo);
  lambda = lambda < acc_t(0) ? acc_t(0) : (lambda > acc_t(1) ? acc_t(1) : lambda);
  return {lo, lo + (lo < in - 1 ? 1 : 0), acc_t(1) - lambda, lambda};
}

// The kernels' shapes and resize scales (one struct instead of a dozen positional arguments).
template <typename acc_t>
struct Geometry {
  int64_t B, Cx, H, W;  // output spatial size and x channels
  int64_t Ch, hh, ww;   // state
  int64_t offset, fb, groups;
  acc_t sy, sx;  // state size over output size, per axis
};

template <typename scalar_t, typename acc_t>
__device__ inline acc_t resized(const scalar_t* h, const Geometry<acc_t>& g, int64_t b, int64_t c, const Taps<acc_t>& ty,
                                const Taps<acc_t>& tx) {
  const scalar_t* plane = h + (b * g.Ch + g.offset + c) * g.hh * g.ww;
  const acc_t top = tx.l0 * static_cast<acc_t>(plane[ty.i0 * g.ww + tx.i0]) +
                    tx.l1 * static_cast<acc_t>(plane[ty.i0 * g.ww + tx.i1]);
  const acc_t bot = tx.l0 * static_cast<acc_t>(plane[ty.i1 * g.ww + tx.i0]) +
                    tx.l1 * static_cast<acc_t>(plane[ty.i1 * g.ww + tx.i1]);
  return ty.l0 * top + ty.l1 * bot;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(THREADS)
    stats_kernel(const scalar_t* __restrict__ h, Geometry<acc_t> g, double eps, acc_t* mean, acc_t* rstd) {
  const int64_t b = blockIdx.x / g.groups, grp = blockIdx.x % g.groups, cpg = g.fb / g.groups;
  const int64_t HW = g.H * g.W, n = cpg * HW;
  double s = 0, ss = 0;
  for (int64_t e = threadIdx.x; e < n; e += THREADS) {
    const int64_t c = grp * cpg + e / HW, i = (e % HW) / g.W, j = e % g.W;
    const double v = resized(h, g, b, c, taps(i, g.hh, g.sy), taps(j, g.ww, g.sx));
    s += v;
    ss += v * v;
  }
  block_sum2<THREADS>(s, ss);
  store_group_stats(s, ss, n, eps, blockIdx.x, mean, rstd);
}

// Softmax over channels of the normalised resize at one pixel: returns max and 1 / sum(exp).
template <typename scalar_t, typename acc_t>
__device__ inline void softmax_norm(const scalar_t* h, const Geometry<acc_t>& g, int64_t b, const Taps<acc_t>& ty,
                                    const Taps<acc_t>& tx, const acc_t* mean, const acc_t* rstd, acc_t& mx,
                                    acc_t& inv_sum) {
  const int64_t cpg = g.fb / g.groups;
  mx = -INFINITY;
  for (int64_t c = 0; c < g.fb; ++c) {
    const int64_t bg = b * g.groups + c / cpg;
    mx = fmax(mx, (resized(h, g, b, c, ty, tx) - mean[bg]) * rstd[bg]);
  }
  acc_t sum = 0;
  for (int64_t c = 0; c < g.fb; ++c) {
    const int64_t bg = b * g.groups + c / cpg;
    sum += exp((resized(h, g, b, c, ty, tx) - mean[bg]) * rstd[bg] - mx);
  }
  inv_sum = acc_t(1) / sum;
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ h, Geometry<acc_t> g,
                               const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd,
                               scalar_t* __restrict__ out) {
  const int64_t HW = g.H * g.W, pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= g.B * HW) return;
  const int64_t b = pix / HW, q = pix % HW, Co = g.Cx + g.fb, cpg = g.fb / g.groups;
  for (int64_t c = 0; c < g.Cx; ++c) out[(b * Co + c) * HW + q] = x[(b * g.Cx + c) * HW + q];
  const Taps<acc_t> ty = taps(q / g.W, g.hh, g.sy), tx = taps(q % g.W, g.ww, g.sx);
  acc_t mx, inv_sum;
  softmax_norm(h, g, b, ty, tx, mean, rstd, mx, inv_sum);
  for (int64_t c = 0; c < g.fb; ++c) {
    const int64_t bg = b * g.groups + c / cpg;
    const acc_t n = (resized(h, g, b, c, ty, tx) - mean[bg]) * rstd[bg];
    out[(b * Co + g.Cx + c) * HW + q] = static_cast<scalar_t>(exp(n - mx) * inv_sum);
  }
}

// gn[b, c, q] = p (grad - sum_c grad p): the softmax backward, one thread per pixel.
template <typename scalar_t, typename acc_t>
__global__ void softmax_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ h,
                                        Geometry<acc_t> g, const acc_t* __restrict__ mean,
                                        const acc_t* __restrict__ rstd, acc_t* __restrict__ gn) {
  const int64_t HW = g.H * g.W, pix = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (pix >= g.B * HW) return;
  const int64_t b = pix / HW, q = pix % HW, Co = g.Cx + g.fb, cpg = g.fb / g.groups;
  const Taps<acc_t> ty = taps(q / g.W, g.hh, g.sy), tx = taps(q % g.W, g.ww, g.sx);
  acc_t mx, inv_sum;
  softmax_norm(h, g, b, ty, tx, mean, rstd, mx, inv_sum);
  acc_t dot = 0;
  for (int64_t c = 0; c < g.fb; ++c) {
    const int64_t bg = b * g.groups + c / cpg;
    const acc_t p = exp((resized(h, g, b, c, ty, tx) - mean[bg]) * rstd[bg] - mx) * inv_sum;
    dot += p * static_cast<acc_t>(grad[(b * Co + g.Cx + c) * HW + q]);
  }
  for (int64_t c = 0; c < g.fb; ++c) {
    const int64_t bg = b * g.groups + c / cpg;
    const acc_t p = exp((resized(h, g, b, c, ty, tx) - mean[bg]) * rstd[bg] - mx) * inv_sum;
    gn[(b * g.fb + c) * HW + q] = p * (static_cast<acc_t>(grad[(b * Co + g.Cx + c) * HW + q]) - dot);
  }
}

// Per (b, group): c1 = rstd mean(gn), c2 = rstd^2 mean(gn n).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(THREADS)
    grad_sums_kernel(const acc_t* __restrict__ gn, const scalar_t* __restrict__ h, Geometry<acc_t> g,
                     const acc_t* mean, const acc_t* rstd, acc_t* c1, acc_t* c2) {
  const int64_t b = blockIdx.x / g.groups, grp = blockIdx.x % g.groups, cpg = g.fb / g.groups;
  const int64_t HW = g.H * g.W, n = cpg * HW;
  const acc_t m = mean[blockIdx.x], r = rstd[blockIdx.x];
  const acc_t* src = gn + (b * g.fb + grp * cpg) * HW;  // the group's channels are contiguous
  double s1 = 0, s2 = 0;
  for (int64_t e = threadIdx.x; e < n; e += THREADS) {
    const int64_t c = grp * cpg + e / HW, i = (e % HW) / g.W, j = e % g.W;
    const acc_t v = src[e];
    s1 += v;
    s2 += static_cast<double>(v) * ((resized(h, g, b, c, taps(i, g.hh, g.sy), taps(j, g.ww, g.sx)) - m) * r);
  }
  block_sum2<THREADS>(s1, s2);
  if (threadIdx.x == 0) {
    c1[blockIdx.x] = static_cast<acc_t>(r * s1 / n);
    c2[blockIdx.x] = static_cast<acc_t>(static_cast<double>(r) * r * s2 / n);
  }
}

// First and last output index whose taps may include source index s (a safe superset).
__device__ inline void tap_range(int64_t s, int64_t in, int64_t out, int64_t& lo, int64_t& hi) {
  const double scale = static_cast<double>(in) / out;
  lo = static_cast<int64_t>(floor((s - 0.5) / scale - 0.5)) - 2;
  hi = static_cast<int64_t>(ceil((s + 1.5) / scale - 0.5)) + 2;
  lo = lo < 0 ? 0 : lo;
  hi = hi > out - 1 ? out - 1 : hi;
}

template <typename acc_t>
__device__ inline acc_t tap_weight(const Taps<acc_t>& t, int64_t s) {
  return (t.i0 == s ? t.l0 : acc_t(0)) + (t.i1 == s ? t.l1 : acc_t(0));
}

// grad_h[b, offset + c, ys, xs] = sum over output pixels of weight * d loss / d resize, one thread per
// state element of the fed-back channels (a gather: no atomics).
template <typename scalar_t, typename acc_t>
__global__ void resize_backward_kernel(const acc_t* __restrict__ gn, const scalar_t* __restrict__ h,
                                       Geometry<acc_t> g, const acc_t* __restrict__ mean, const acc_t* __restrict__ rstd, const acc_t* __restrict__ c1,
                                       const acc_t* __restrict__ c2, scalar_t* __restrict__ grad_h) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t plane = g.hh * g.ww;
  if (e >= g.B * g.fb * plane) return;
  const int64_t b = e / (g.fb * plane), c = (e / plane) % g.fb, ys = (e % plane) / g.ww, xs = e % g.ww;
  const int64_t bg = b * g.groups + c / (g.fb / g.groups), HW = g.H * g.W;
  const acc_t m = mean[bg], r = rstd[bg], k1 = c1[bg], k2 = c2[bg];
  int64_t i_lo, i_hi, j_lo, j_hi;
  tap_range(ys, g.hh, g.H, i_lo, i_hi);
  tap_range(xs, g.ww, g.W, j_lo, j_hi);
  const acc_t* src = gn + (b * g.fb + c) * HW;
  acc_t total = 0;
  for (int64_t i = i_lo; i <= i_hi; ++i) {
    const Taps<acc_t> ty = taps(i, g.hh, g.sy);
    const acc_t wy = tap_weight(ty, ys);
    if (wy == acc_t(0)) continue;
    for (int64_t j = j_lo; j <= j_hi; ++j) {
      const Taps<acc_t> tx = taps(j, g.ww, g.sx);
      const acc_t wx = tap_weight(tx, xs);
      if (wx == acc_t(0)) continue;
      const acc_t gr = src[i * g.W + j] * r - k1 - (resized(h, g, b, c, ty, tx) - m) * k2;
      total += wy * wx * gr;
    }
  }
  grad_h[(b * g.Ch + g.offset + c) * plane + ys * g.ww + xs] = static_cast<scalar_t>(total);
}

template <typename acc_t>
Geometry<acc_t> geometry(const at::Tensor& h, int64_t B, int64_t Cx, int64_t H, int64_t W, int64_t offset, int64_t fb,
                         int64_t groups) {
  const int64_t hh = h.size(2), ww = h.size(3);
  return Geometry<acc_t>{B, Cx, H, W, h.size(1), hh, ww, offset, fb, groups,
                         static_cast<acc_t>(hh) / static_cast<acc_t>(H), static_cast<acc_t>(ww) / static_cast<acc_t>(W)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> feedback_input(const at::Tensor& x_, const at::Tensor& h_,
                                                              int64_t offset, int64_t fb, int64_t groups,
                                                              double eps) {
  DFM_FUSED_NO_AUTOCAST();
  check_feedback_args(x_, h_, offset, fb, groups);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), h = h_.contiguous();
  const int64_t B = x.size(0), Cx = x.size(1), H = x.size(2), W = x.size(3);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor out = empty_output({B, Cx + fb, H, W}, x.options());
  at::Tensor mean = empty_output({B, groups}, x.options().dtype(acc_dtype));
  at::Tensor rstd = empty_output({B, groups}, x.options().dtype(acc_dtype));
  if (B == 0 || H * W == 0) return {out.contiguous(layout_of(x_)), mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfm_fused_feedback_input_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry<acc_t> g = geometry<acc_t>(h, B, Cx, H, W, offset, fb, groups);
    auto stream = c10::cuda::getCurrentCUDAStream();
    stats_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B * groups), THREADS, 0, stream>>>(
        h.const_data_ptr<scalar_t>(), g, eps, mean.mutable_data_ptr<acc_t>(), rstd.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    forward_kernel<scalar_t, acc_t><<<blocks_for(B * H * W, THREADS), THREADS, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), g, mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {layout_of(x_) == at::MemoryFormat::Contiguous ? out : out.contiguous(layout_of(x_)), mean, rstd};
}

at::Tensor feedback_input_backward(const at::Tensor& grad_, const at::Tensor& h_, const at::Tensor& mean_,
                                   const at::Tensor& rstd_, int64_t offset, int64_t fb, int64_t groups) {
  DFM_FUSED_NO_AUTOCAST();
  check_feedback_backward_args(grad_, h_, fb);
  const c10::cuda::CUDAGuard guard(grad_.device());
  const at::Tensor grad = grad_.contiguous(), h = h_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const int64_t B = grad.size(0), H = grad.size(2), W = grad.size(3);
  at::Tensor grad_h = at::zeros(h.sizes(), h.options());
  if (B == 0 || H * W == 0) return grad_h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dfm_fused_feedback_input_backward_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Geometry<acc_t> g = geometry<acc_t>(h, B, grad.size(1) - fb, H, W, offset, fb, groups);
    auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor gn = at::empty({B, fb, H, W}, mean.options());
    at::Tensor c1 = at::empty({B, groups}, mean.options()), c2 = at::empty({B, groups}, mean.options());
    softmax_backward_kernel<scalar_t, acc_t><<<blocks_for(B * H * W, THREADS), THREADS, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), g, mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), gn.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_sums_kernel<scalar_t, acc_t><<<static_cast<unsigned>(B * groups), THREADS, 0, stream>>>(
        gn.const_data_ptr<acc_t>(), h.const_data_ptr<scalar_t>(), g, mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), c1.mutable_data_ptr<acc_t>(), c2.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    resize_backward_kernel<scalar_t, acc_t><<<blocks_for(B * fb * g.hh * g.ww, THREADS), THREADS, 0, stream>>>(
        gn.const_data_ptr<acc_t>(), h.const_data_ptr<scalar_t>(), g, mean.const_data_ptr<acc_t>(),
        rstd.const_data_ptr<acc_t>(), c1.const_data_ptr<acc_t>(), c2.const_data_ptr<acc_t>(),
        grad_h.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_h;
}

}  // namespace dfm_fused::cuda
