// CPU kernels of feedback_input: out = cat([x, softmax_c(GroupNorm(resize(h[:, off:off+fb])))]).
//
// Forward: GroupNorm statistics of the resized slice (parallel over batch x groups, the
// resize recomputed on the fly from the small state), then one parallel pass over output
// rows that resizes, normalises, takes the channel softmax and writes it next to the copy
// of x. Nothing full-size but the output is written. Backward recomputes the projection
// per row, forms the softmax and GroupNorm gradients, and scatters the bilinear backward
// per (batch, channel) plane, so no two threads ever add into one element.
//
// Compiled twice (setup.py, csrc/cpu/target.h): baseline and AVX2 + FMA (8-wide resize, GroupNorm and
// softmax loops: about 1.8x the baseline build on an AVX2 machine, the kernels alone);
// csrc/cpu/target.cpp picks one per call.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "../common.h"
#include "target.h"  // last: everything below is compiled for the target

namespace dfm_fused::cpu::DFM_FUSED_TARGET_NS {
namespace {

// Source rows/columns and weights of bilinear resizing with align_corners=False, as ATen computes them.
template <typename acc_t>
struct Axis {
  std::vector<int64_t> i0, i1;
  std::vector<acc_t> l0, l1;
  Axis(int64_t in, int64_t out) : i0(out), i1(out), l0(out), l1(out) {
    const acc_t scale = static_cast<acc_t>(in) / static_cast<acc_t>(out);
    for (int64_t d = 0; d < out; ++d) {
      const acc_t src = std::max(scale * (static_cast<acc_t>(d) + acc_t(0.5)) - acc_t(0.5), acc_t(0));
      const int64_t lo = std::min(static_cast<int64_t>(std::floor(src)), in - 1);
      const acc_t lambda = std::min(std::max(src - static_cast<acc_t>(lo), acc_t(0)), acc_t(1));
      i0[d] = lo;
      i1[d] = lo + (lo < in - 1 ? 1 : 0);
      l1[d] = lambda;
      l0[d] = acc_t(1) - lambda;
    }
  }
};

// exp(x) for x <= 0 (softmax arguments): Cephes' expf polynomial (about 2 ulp), branch-free so
// the compiler vectorises the softmax loops. float64 (tests, gradcheck) uses std::exp.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = static_cast<float>(static_cast<int32_t>(x * 1.44269504088896341f - 0.5f));
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * x * x + x + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename scalar_t, typename acc_t>
struct Projection {
  int64_t hh, H, W, fb, groups;
  Axis<acc_t> ay, ax;
  // The state slice resized along x only: (B, fb, hh, W). Small, and it turns each output
  // row into a vectorisable blend of two of its rows.
  std::vector<acc_t> hx;

  Projection(const at::Tensor& h_, int64_t H_, int64_t W_, int64_t offset, int64_t fb_, int64_t groups_)
      : hh(h_.size(2)), H(H_), W(W_), fb(fb_), groups(groups_), ay(hh, H), ax(h_.size(3), W),
        hx(h_.size(0) * fb_ * hh * W_) {
    const scalar_t* h = h_.const_data_ptr<scalar_t>();
    const int64_t Ch = h_.size(1), ww = h_.size(3);
    at::parallel_for(0, h_.size(0) * fb, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const int64_t b = k / fb, c = k % fb;
        const scalar_t* plane = h + (b * Ch + offset + c) * hh * ww;
        for (int64_t y = 0; y < hh; ++y) {
          const scalar_t* src = plane + y * ww;
          acc_t* dst = hx.data() + (k * hh + y) * W;
          for (int64_t j = 0; j < W; ++j) {
            dst[j] = ax.l0[j] * static_cast<acc_t>(src[ax.i0[j]]) + ax.l1[j] * static_cast<acc_t>(src[ax.i1[j]]);
          }
        }
      }
    });
  }

  // dst[j] = resize(h[b, offset + c])[i, j]
  void row(int64_t b, int64_t c, int64_t i, acc_t* dst) const {
    const acc_t* top = hx.data() + ((b * fb + c) * hh + ay.i0[i]) * W;
    const acc_t* bot = hx.data() + ((b * fb + c) * hh + ay.i1[i]) * W;
    const acc_t wy0 = ay.l0[i], wy1 = ay.l1[i];
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) dst[j] = wy0 * top[j] + wy1 * bot[j];
  }

  // n[c * W + j] = GroupNorm(resize)[b, c, i, j] and p = softmax over c of n, for row i.
  void softmax_row(int64_t b, int64_t i, const acc_t* mean, const acc_t* rstd, acc_t* n, acc_t* p,
                   acc_t* tmp) const {
    const int64_t cpg = fb / groups;
    for (int64_t c = 0; c < fb; ++c) {
      row(b, c, i, n + c * W);
      const acc_t m = mean[b * groups + c / cpg], r = rstd[b * groups + c / cpg];
      acc_t* nc = n + c * W;
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) nc[j] = (nc[j] - m) * r;
    }
    std::copy(n, n + W, tmp);
    for (int64_t c = 1; c < fb; ++c) {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) tmp[j] = std::max(tmp[j], n[c * W + j]);
    }
    for (int64_t c = 0; c < fb; ++c) {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) p[c * W + j] = exp_nonpositive(n[c * W + j] - tmp[j]);
    }
    std::copy(p, p + W, tmp);
    for (int64_t c = 1; c < fb; ++c) {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) tmp[j] += p[c * W + j];
    }
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) tmp[j] = acc_t(1) / tmp[j];
    for (int64_t c = 0; c < fb; ++c) {
#pragma omp simd
      for (int64_t j = 0; j < W; ++j) p[c * W + j] *= tmp[j];
    }
  }
};

// Offset of out[b, c, i, 0] and the stride between pixels of a row, for an NCHW (CL = false)
// or NHWC tensor.
template <bool CL>
struct Layout {
  int64_t C, H, W;
  int64_t at(int64_t b, int64_t c, int64_t i) const { return CL ? ((b * H + i) * W) * C + c : ((b * C + c) * H + i) * W; }
  int64_t pixel_stride() const { return CL ? C : 1; }
};

template <bool CL, typename scalar_t>
void forward_impl(const at::Tensor& x, const at::Tensor& h, int64_t offset, int64_t fb, int64_t groups, double eps,
                at::Tensor& out, at::Tensor& mean, at::Tensor& rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), Cx = x.size(1), H = x.size(2), W = x.size(3), Co = Cx + fb;
  const Projection<scalar_t, acc_t> proj(h, H, W, offset, fb, groups);
  const int64_t cpg = fb / groups;
  acc_t* mean_p = mean.mutable_data_ptr<acc_t>();
  acc_t* rstd_p = rstd.mutable_data_ptr<acc_t>();
  at::parallel_for(0, B * groups, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> r(W);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / groups, grp = k % groups;
      double s = 0, ss = 0;
      for (int64_t c = grp * cpg; c < (grp + 1) * cpg; ++c) {
        for (int64_t i = 0; i < H; ++i) {
          proj.row(b, c, i, r.data());
#pragma omp simd reduction(+ : s, ss)
          for (int64_t j = 0; j < W; ++j) {
            s += r[j];
            ss += static_cast<double>(r[j]) * r[j];
          }
        }
      }
      const double count = static_cast<double>(cpg * H * W), m = s / count;
      mean_p[k] = static_cast<acc_t>(m);
      rstd_p[k] = static_cast<acc_t>(1.0 / std::sqrt(std::max(ss / count - m * m, 0.0) + eps));
    }
  });
  const Layout<CL> lo{Co, H, W}, li{Cx, H, W};
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, B * H, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> n(fb * W), p(fb * W), tmp(W);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / H, i = k % H;
      if constexpr (CL) {  // x's channels of each pixel of the row: short runs, an inline loop beats memcpy calls
        for (int64_t j = 0; j < W; ++j) {
          const scalar_t* src = xp + li.at(b, 0, i) + j * Cx;
          scalar_t* dst = op + lo.at(b, 0, i) + j * Co;
          for (int64_t c = 0; c < Cx; ++c) dst[c] = src[c];
        }
      } else if (i == 0) {  // x[b] is one contiguous block in NCHW: copy it whole with the image's first row
        std::copy_n(xp + li.at(b, 0, 0), Cx * H * W, op + lo.at(b, 0, 0));
      }
      proj.softmax_row(b, i, mean_p, rstd_p, n.data(), p.data(), tmp.data());
      for (int64_t c = 0; c < fb; ++c) {
        scalar_t* dst = op + lo.at(b, Cx + c, i);
        const int64_t stride = lo.pixel_stride();
        for (int64_t j = 0; j < W; ++j) dst[j * stride] = static_cast<scalar_t>(p[c * W + j]);
      }
    }
  });
}

template <bool CL, typename scalar_t>
void backward_impl(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& mean, const at::Tensor& rstd,
                 int64_t offset, int64_t fb, int64_t groups, at::Tensor& grad_h) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = grad.size(0), Co = grad.size(1), H = grad.size(2), W = grad.size(3), Cx = Co - fb;
  const int64_t hh = h.size(2), ww = h.size(3);
  const Projection<scalar_t, acc_t> proj(h, H, W, offset, fb, groups);
  const int64_t cpg = fb / groups;
  const acc_t* mean_p = mean.const_data_ptr<acc_t>();
  const acc_t* rstd_p = rstd.const_data_ptr<acc_t>();
  const Layout<CL> lg{Co, H, W};
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  // Softmax backward per row; gn = d loss / d GroupNorm output, kept as (B, fb, H, W) float.
  // Every element is written by the softmax pass below: no need to zero-fill it first.
  const std::unique_ptr<acc_t[]> gn(new acc_t[B * fb * H * W]);
  std::vector<double> row_sums(B * H * groups * 2);
  at::parallel_for(0, B * H, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> n(fb * W), p(fb * W), g(fb * W), tmp(W);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / H, i = k % H;
      proj.softmax_row(b, i, mean_p, rstd_p, n.data(), p.data(), tmp.data());
      for (int64_t c = 0; c < fb; ++c) {
        const scalar_t* src = gp + lg.at(b, Cx + c, i);
        const int64_t stride = lg.pixel_stride();
        for (int64_t j = 0; j < W; ++j) g[c * W + j] = static_cast<acc_t>(src[j * stride]);
      }
      std::fill(tmp.begin(), tmp.end(), acc_t(0));
      for (int64_t c = 0; c < fb; ++c) {
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) tmp[j] += g[c * W + j] * p[c * W + j];
      }
      double* sums = row_sums.data() + k * groups * 2;
      std::fill(sums, sums + groups * 2, 0.0);
      for (int64_t c = 0; c < fb; ++c) {
        acc_t* dst = gn.get() + ((b * fb + c) * H + i) * W;
        double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t j = 0; j < W; ++j) {
          const acc_t v = p[c * W + j] * (g[c * W + j] - tmp[j]);
          dst[j] = v;
          s1 += v;
          s2 += static_cast<double>(v) * n[c * W + j];
        }
        sums[(c / cpg) * 2] += s1;
        sums[(c / cpg) * 2 + 1] += s2;
      }
    }
  });
  // GroupNorm backward coefficients per (b, group), rows summed in order.
  const double count = static_cast<double>(cpg * H * W);
  std::vector<acc_t> c1(B * groups), c2(B * groups);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      double s1 = 0, s2 = 0;
      for (int64_t i = 0; i < H; ++i) {
        s1 += row_sums[((b * H + i) * groups + grp) * 2];
        s2 += row_sums[((b * H + i) * groups + grp) * 2 + 1];
      }
      const double r = rstd_p[b * groups + grp];
      c1[b * groups + grp] = static_cast<acc_t>(r * s1 / count);
      c2[b * groups + grp] = static_cast<acc_t>(r * r * s2 / count);
    }
  }
  scalar_t* ghp = grad_h.mutable_data_ptr<scalar_t>();
  const int64_t Ch = h.size(1);
  // Bilinear backward, separable: rows first (vectorised over output columns into an hh x W
  // buffer), then one scatter along x per state row.
  at::parallel_for(0, B * fb, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> r(W), gy(hh * W), gv(hh * ww);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / fb, c = k % fb, bg = b * groups + c / cpg;
      const acc_t m = mean_p[bg], rs = rstd_p[bg], k1c = c1[bg], k2c = c2[bg];
      std::fill(gy.begin(), gy.end(), acc_t(0));
      std::fill(gv.begin(), gv.end(), acc_t(0));
      for (int64_t i = 0; i < H; ++i) {
        proj.row(b, c, i, r.data());
        const acc_t* gni = gn.get() + ((b * fb + c) * H + i) * W;
        acc_t* top = gy.data() + proj.ay.i0[i] * W;
        acc_t* bot = gy.data() + proj.ay.i1[i] * W;
        const acc_t wy0 = proj.ay.l0[i], wy1 = proj.ay.l1[i];
#pragma omp simd
        for (int64_t j = 0; j < W; ++j) {
          const acc_t gr = gni[j] * rs - k1c - (r[j] - m) * k2c;
          top[j] += wy0 * gr;
          bot[j] += wy1 * gr;
        }
      }
      for (int64_t y = 0; y < hh; ++y) {
        const acc_t* src = gy.data() + y * W;
        acc_t* row = gv.data() + y * ww;
        for (int64_t j = 0; j < W; ++j) {
          row[proj.ax.i0[j]] += proj.ax.l0[j] * src[j];
          row[proj.ax.i1[j]] += proj.ax.l1[j] * src[j];
        }
      }
      scalar_t* dst = ghp + (b * Ch + offset + c) * hh * ww;
      for (int64_t e = 0; e < hh * ww; ++e) dst[e] = static_cast<scalar_t>(gv[e]);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> feedback_input(const at::Tensor& x_, const at::Tensor& h_,
                                                              int64_t offset, int64_t fb, int64_t groups,
                                                              double eps) {
  DFM_FUSED_NO_AUTOCAST();
  check_feedback_args(x_, h_, offset, fb, groups);
  const auto fmt = layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt), h = h_.contiguous();
  const int64_t B = x.size(0);
  const auto acc_dtype = at::toOpMathType(x.scalar_type());
  at::Tensor out = empty_output({B, x.size(1) + fb, x.size(2), x.size(3)}, x.options(), fmt);
  at::Tensor mean = empty_output({B, groups}, x.options().dtype(acc_dtype));
  at::Tensor rstd = empty_output({B, groups}, x.options().dtype(acc_dtype));
  if (B == 0) return {out, mean, rstd};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfm_fused_feedback_input", [&] {
    dispatch_layout(is_channels_last(x), [&](auto cl) {
      forward_impl<decltype(cl)::value, scalar_t>(x, h, offset, fb, groups, eps, out, mean, rstd);
    });
  });
  return {out, mean, rstd};
}

at::Tensor feedback_input_backward(const at::Tensor& grad_, const at::Tensor& h_, const at::Tensor& mean_,
                                   const at::Tensor& rstd_, int64_t offset, int64_t fb, int64_t groups) {
  DFM_FUSED_NO_AUTOCAST();
  check_feedback_backward_args(grad_, h_, fb);
  const auto fmt = layout_of(grad_);
  const at::Tensor grad = grad_.contiguous(fmt), h = h_.contiguous();
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  at::Tensor grad_h = at::zeros(h.sizes(), h.options());
  if (grad.size(0) == 0) return grad_h;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dfm_fused_feedback_input_backward",
                                  [&] {
                                    dispatch_layout(is_channels_last(grad), [&](auto cl) {
                                      backward_impl<decltype(cl)::value, scalar_t>(grad, h, mean, rstd, offset, fb,
                                                                                   groups, grad_h);
                                    });
                                  });
  return grad_h;
}

}  // namespace dfm_fused::cpu::DFM_FUSED_TARGET_NS
