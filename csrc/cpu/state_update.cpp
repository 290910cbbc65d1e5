// CPU kernels of state_update: out = h + M GroupNorm(y), M = Q^T diag(D) Q (or diag(D) with
// scalar_decay), and its backward. The channel-map passes are in channel_map.h; the GroupNorm
// statistics and backward are here.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <vector>

#include "../common.h"
#include "channel_map.h"

namespace dfm_fused::cpu {
namespace {

// GroupNorm statistics (biased variance) of y, one pass with double accumulators.
template <typename scalar_t, typename acc_t>
void group_stats(const Tiling& t, const scalar_t* y, int64_t groups, double eps, acc_t* mean, acc_t* rstd) {
  const int64_t cpg = t.C / groups;
  const double count = static_cast<double>(cpg * t.HW);
  auto finish = [&](int64_t i, double s, double ss) {
    const double m = s / count;
    const double var = std::max(ss / count - m * m, 0.0);
    mean[i] = static_cast<acc_t>(m);
    rstd[i] = static_cast<acc_t>(1.0 / std::sqrt(var + eps));
  };
  if (!t.cl) {
    at::parallel_for(0, t.B * groups, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const scalar_t* src = y + i * cpg * t.HW;  // groups are contiguous in NCHW
        double s = 0, ss = 0;
#pragma omp simd reduction(+ : s, ss)
        for (int64_t j = 0; j < cpg * t.HW; ++j) {
          const double v = static_cast<double>(src[j]);
          s += v;
          ss += v * v;
        }
        finish(i, s, ss);
      }
    });
    return;
  }
  at::parallel_for(0, t.B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> s(t.C), ss(t.C);
    for (int64_t b = b0; b < b1; ++b) {
      std::fill(s.begin(), s.end(), 0.0);
      std::fill(ss.begin(), ss.end(), 0.0);
      for (int64_t p = 0; p < t.HW; ++p) {
        const scalar_t* src = y + t.offset(b, p);
#pragma omp simd
        for (int64_t c = 0; c < t.C; ++c) {
          const double v = static_cast<double>(src[c]);
          s[c] += v;
          ss[c] += v * v;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        double gs = 0, gss = 0;
        for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c) {
          gs += s[c];
          gss += ss[c];
        }
        finish(b * groups + g, gs, gss);
      }
    }
  });
}

// grad_y = rstd (gn - mean(gn)) - (y - mean) rstd^2 mean(gn n), group means from tile sums.
template <bool CL, typename scalar_t, typename acc_t>
void group_norm_backward(const Tiling& t, const acc_t* gn, const scalar_t* y, const acc_t* mean, const acc_t* rstd,
                         int64_t groups, const double* tile_sums, scalar_t* grad_y) {
  const int64_t cpg = t.C / groups;
  const double count = static_cast<double>(cpg * t.HW);
  // Per (b, group): sums over the image's tiles in tile order.
  std::vector<acc_t> c1(t.B * groups), c2(t.B * groups);
  for (int64_t b = 0; b < t.B; ++b) {
    for (int64_t grp = 0; grp < groups; ++grp) {
      double s1 = 0, s2 = 0;
      for (int64_t k = b * t.per_image; k < (b + 1) * t.per_image; ++k) {
        s1 += tile_sums[(k * groups + grp) * 2];
        s2 += tile_sums[(k * groups + grp) * 2 + 1];
      }
      const double r = rstd[b * groups + grp];
      c1[b * groups + grp] = static_cast<acc_t>(r * s1 / count);
      c2[b * groups + grp] = static_cast<acc_t>(r * r * s2 / count);
    }
  }
  at::parallel_for(0, t.num_tiles(), 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> sub(t.C), mul(t.C), k1c(t.C), k2c(t.C);
    int64_t last_b = -1;
    for (int64_t k = k0; k < k1; ++k) {
      int64_t b, p0, n;
      t.locate(k, b, p0, n);
      if (b != last_b) {
        group_affine(mean, rstd, b, t.C, groups, sub.data(), mul.data());
        group_affine(c1.data(), c2.data(), b, t.C, groups, k1c.data(), k2c.data());
        last_b = b;
      }
      for_runs<CL>(t, b, p0, n, [&](int64_t mo, int64_t, int64_t len, int64_t c0) {
        const acc_t* src = gn + mo;
        const scalar_t* ys = y + mo;
        scalar_t* dst = grad_y + mo;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
          const int64_t c = CL ? c0 + i : c0;
          dst[i] = static_cast<scalar_t>(src[i] * mul[c] - k1c[c] - (static_cast<acc_t>(ys[i]) - sub[c]) * k2c[c]);
        }
      });
    }
  });
}

// Scalar decay (gn = D g), NCHW: grad_y = rstd (gn - mean(gn)) - (y - mean) rstd^2 mean(gn n) per
// (image, group), each group one contiguous run of cpg * HW elements: two passes over the run,
// no pixel tiles (the operating point's 2x2 images make them 4 pixels wide).
// D == nullptr: no scale (the general path, g = M grad already formed, in the math dtype g_t).
template <typename g_t, typename scalar_t, typename acc_t>
void scaled_group_norm_backward(const Tiling& t, const g_t* g, const scalar_t* y, const acc_t* D,
                                const acc_t* mean, const acc_t* rstd, int64_t groups, scalar_t* grad_y) {
  const int64_t cpg = t.C / groups, run = cpg * t.HW;
  at::parallel_for(0, t.B * groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t base = i * run, c0 = (i % groups) * cpg;
      const acc_t m = mean[i], r = rstd[i];
      double s1 = 0, s2 = 0;
      for (int64_t c = 0; c < cpg; ++c) {
        const acc_t d = D ? D[c0 + c] : acc_t(1);
        const g_t* gs = g + base + c * t.HW;
        const scalar_t* ys = y + base + c * t.HW;
#pragma omp simd reduction(+ : s1, s2)
        for (int64_t p = 0; p < t.HW; ++p) {
          const acc_t gn = d * static_cast<acc_t>(gs[p]);
          s1 += gn;
          s2 += static_cast<double>(gn) * ((static_cast<acc_t>(ys[p]) - m) * r);
        }
      }
      const acc_t k1 = static_cast<acc_t>(r * s1 / run), k2 = static_cast<acc_t>(static_cast<double>(r) * r * s2 / run);
      for (int64_t c = 0; c < cpg; ++c) {
        const acc_t dr = (D ? D[c0 + c] : acc_t(1)) * r;
        const int64_t o = base + c * t.HW;
#pragma omp simd
        for (int64_t p = 0; p < t.HW; ++p) {
          grad_y[o + p] = static_cast<scalar_t>(dr * static_cast<acc_t>(g[o + p]) - k1 -
                                                (static_cast<acc_t>(y[o + p]) - m) * k2);
        }
      }
    }
  });
}

// GroupNorm(y) from the saved statistics; y3 is y as (B, C, P) in the math dtype (as_bcp).
at::Tensor thin_normalize(const at::Tensor& y3, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups) {
  const int64_t B = y3.size(0);
  return ((y3.view({B, groups, -1}) - mean.unsqueeze(2)) * rstd.unsqueeze(2)).view(y3.sizes());
}

// columns(thin_normalize(y3, ...)) in one pass: y rstd - mean rstd written straight into the columns.
at::Tensor normalized_columns(const at::Tensor& y3, const at::Tensor& mean, const at::Tensor& rstd, int64_t groups) {
  const int64_t B = y3.size(0), C = y3.size(1), HW = y3.size(2);
  at::Tensor cols = at::empty({C, B, HW}, y3.options());
  at::Tensor out = cols.transpose(0, 1).view({B, groups, C / groups, HW});
  const at::Tensor r = rstd.view({B, groups, 1, 1});
  at::addcmul_out(out, -mean.view({B, groups, 1, 1}) * r, y3.view({B, groups, C / groups, HW}), r);
  return cols.view({C, -1});
}

// grad_y of GroupNorm for the incoming gn = M grad ((B, C, P), math dtype): the run-wise kernel for
// NCHW y, ATen's for channels_last (y3: y as (B, C, P) in the math dtype).
at::Tensor group_norm_backward_of(const Tiling& t, const at::Tensor& gn, const at::Tensor& y, const at::Tensor& y3,
                                  const at::Tensor& mean, const at::Tensor& rstd, int64_t groups, at::Tensor grad_y) {
  if (t.cl) {
    const auto gy = at::native_group_norm_backward(gn.view(y.sizes()), y3.view(y.sizes()), mean, rstd, std::nullopt,
                                                   t.B, t.C, t.HW, groups, {true, false, false});
    grad_y.copy_(std::get<0>(gy));
    return grad_y;
  }
  const at::Tensor g = gn.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dfm_fused_group_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scaled_group_norm_backward(t, g.const_data_ptr<acc_t>(), y.const_data_ptr<scalar_t>(),
                               static_cast<const acc_t*>(nullptr), mean.const_data_ptr<acc_t>(),
                               rstd.const_data_ptr<acc_t>(), groups, grad_y.mutable_data_ptr<scalar_t>());
  });
  return grad_y;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> state_update(const at::Tensor& h_, const at::Tensor& y_,
                                                                        const at::Tensor& Q, const at::Tensor& D,
                                                                        int64_t groups, double eps, bool scalar_decay,
                                                                        bool keep_M) {
  DFM_FUSED_NO_AUTOCAST();
  check_state_update_args(h_, y_, Q, D, groups);
  const auto fmt = layout_of(h_);
  const at::Tensor h = h_.contiguous(fmt), y = y_.contiguous(fmt);
  const Tiling t = tiling_of(h);
  at::Tensor out = empty_output(h.sizes(), h.options(), fmt);
  at::Tensor mean = empty_output({t.B, groups}, Q.options()), rstd = empty_output({t.B, groups}, Q.options());
  keep_M = keep_M && !scalar_decay;
  const at::Tensor no_M = at::empty({0}, Q.options());
  if (h.numel() == 0) return {out, mean, rstd, keep_M ? decay_matrix(Q, D) : no_M};
  // Few pixels: whole-matrix GEMMs over the pixels as columns; M itself only when the backward keeps it.
  const bool thin = !scalar_decay && thin_forward(t);
  const at::Tensor M = scalar_decay ? D.contiguous() : (thin && !keep_M ? at::Tensor() : decay_matrix(Q, D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dfm_fused_state_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    group_stats(t, y.const_data_ptr<scalar_t>(), groups, eps, mean.mutable_data_ptr<acc_t>(),
                rstd.mutable_data_ptr<acc_t>());
    if (thin) {
      const at::Tensor y3 = as_bcp(y, Q.scalar_type());
      if (keep_M && !t.cl && h.scalar_type() == Q.scalar_type()) {  // out = h + (M a) read from its columns
        const at::Tensor Ma = at::mm(M, normalized_columns(y3, mean, rstd, groups)).view({t.C, t.B, t.HW});
        at::Tensor out3 = out.view({t.B, t.C, t.HW});
        at::add_out(out3, h.view({t.B, t.C, t.HW}), Ma.transpose(0, 1));
        return;
      }
      const at::Tensor update = keep_M ? from_columns(at::mm(M, normalized_columns(y3, mean, rstd, groups)), t.B)
                                       : thin_apply(Q, D, thin_normalize(y3, mean, rstd, groups));
      out.copy_((as_bcp(h, Q.scalar_type()) + update).view(h.sizes()));
      return;
    }
    dispatch_layout(t.cl, [&](auto cl) {
      apply_matrix<decltype(cl)::value>(t, M, y.const_data_ptr<scalar_t>(),
                                        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), groups,
                                        h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    });
  });
  return {out, mean, rstd, keep_M ? M : no_M};
}

std::tuple<at::Tensor, at::Tensor> state_update_backward(const at::Tensor& grad_, const at::Tensor& y_,
                                                         const at::Tensor& Q, const at::Tensor& D,
                                                         const at::Tensor& mean_, const at::Tensor& rstd_,
                                                         int64_t groups, bool need_y, bool need_Q,
                                                         bool scalar_decay, const std::optional<at::Tensor>& M_) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_backward_args(grad_, y_, Q, D, "y");
  // M as the forward formed it (keep_M), or an empty tensor: recomputed from Q and D where needed.
  const at::Tensor saved_M = !scalar_decay && M_.has_value() && M_->numel() > 0 ? M_->contiguous() : at::Tensor();
  if (saved_M.defined()) check_saved_M(saved_M, Q);
  const auto fmt = layout_of(grad_);
  const at::Tensor grad = grad_.contiguous(fmt), y = y_.contiguous(fmt);
  const at::Tensor mean = mean_.contiguous(), rstd = rstd_.contiguous();
  const Tiling t = tiling_of(grad);
  at::Tensor grad_y = need_y ? empty_output(y.sizes(), y.options(), fmt) : at::empty({0}, y.options());
  at::Tensor grad_Q = at::empty({0}, Q.options());
  if ((!need_y && !need_Q) || y.numel() == 0) {
    if (need_Q) grad_Q = at::zeros_like(Q);
    return {grad_y, grad_Q};
  }
  // Small images: A in wide GEMMs, M g by groups of images, as in exp_decay_backward.
  at::Tensor gc;  // grad as (C, B * P) columns, made once for the GEMMs that take it
  if (need_Q && thin_tiles(t) && (scalar_decay || !thin_backward(t))) {
    gc = columns(as_bcp(grad, Q.scalar_type()));
    grad_Q = grad_Q_thin(Q, D, normalized_columns(as_bcp(y, Q.scalar_type()), mean, rstd, groups), gc);
    need_Q = false;
    if (!need_y) return {grad_y, grad_Q};
  }
  if (!scalar_decay && (thin_backward(t) || thin_tiles(t))) {
    const at::Tensor y3 = as_bcp(y, Q.scalar_type());  // converted once, for GroupNorm and its backward
    const at::Tensor g3 = as_bcp(grad, Q.scalar_type());
    // M g: one GEMM with the kept M, else Q^T (D Q g) in two.
    auto [gn, gQ] = thin_backward_math(Q, D, need_Q ? thin_normalize(y3, mean, rstd, groups) : at::Tensor(), g3,
                                       need_y && !saved_M.defined(), need_Q);
    if (need_y && saved_M.defined()) gn = from_columns(at::mm(saved_M, gc.defined() ? gc : columns(g3)), t.B);
    if (need_y) grad_y = group_norm_backward_of(t, gn, y, y3, mean, rstd, groups, grad_y);
    if (need_Q) grad_Q = gQ;
    return {grad_y, grad_Q};
  }
  if (scalar_decay && !need_Q && !t.cl && thin_tiles(t)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dfm_fused_scaled_gn_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scaled_group_norm_backward(t, grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                                 D.contiguous().const_data_ptr<acc_t>(), mean.const_data_ptr<acc_t>(),
                                 rstd.const_data_ptr<acc_t>(), groups, grad_y.mutable_data_ptr<scalar_t>());
    });
    return {grad_y, grad_Q};
  }
  const int64_t chunks = std::max<int64_t>(1, std::min(kChunks, t.num_tiles()));
  at::Tensor parts = need_Q ? at::zeros({chunks, t.C, t.C}, Q.options()) : at::Tensor();
  at::Tensor sums = need_y ? at::empty({t.num_tiles(), groups, 2}, Q.options().dtype(at::kDouble)) : at::Tensor();
  // M g is kept in float until the GroupNorm backward reads it; for float32/64 it lives in grad_y.
  const bool in_place = y.scalar_type() == Q.scalar_type();
  at::Tensor gn = need_y ? (in_place ? grad_y : at::empty(y.sizes(), Q.options().memory_format(fmt))) : at::Tensor();
  const at::Tensor M = !need_y ? at::Tensor()
                       : scalar_decay ? D.contiguous()
                       : saved_M.defined() ? saved_M
                                           : decay_matrix(Q, D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "dfm_fused_state_update_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_layout(t.cl, [&](auto cl) {
      constexpr bool CL = decltype(cl)::value;
      backward_pass<CL>(t, grad.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(),
                        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), groups, M,
                        need_y ? gn.mutable_data_ptr<acc_t>() : nullptr,
                        need_y ? sums.mutable_data_ptr<double>() : nullptr, need_Q ? &parts : nullptr, chunks);
      if (need_y) {
        group_norm_backward<CL>(t, gn.const_data_ptr<acc_t>(), y.const_data_ptr<scalar_t>(),
                                mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), groups,
                                sums.const_data_ptr<double>(), grad_y.mutable_data_ptr<scalar_t>());
      }
    });
  });
  if (need_Q) grad_Q = grad_Q_from_parts(parts, Q, D);
  return {grad_y, grad_Q};
}

}  // namespace dfm_fused::cpu
