// CPU kernels of exp_decay (out = M x) and state_update (out = h + M GroupNorm(y)),
// M = Q^T diag(D) Q, forward and backward.
//
// With few pixels (fewer than channels) M is not formed; see thin_forward below.
//
// scalar_decay (SPEC section 7: Q orthonormal, D uniform, so M = diag(D)): M is replaced by
// the (C,) vector D, a per-channel scale (tile_apply), and A = sum a g^T for grad_Q is one GEMM
// over all pixels (grad_Q_thin) where the tiles would be too thin for a fast GEMM each.
//
// Each op is one parallel pass over pixel tiles: load (and normalise) a tile into an
// L2-resident float buffer, apply M with ATen's blocked GEMM, and write the result with
// the epilogue fused (cast, + h). Backward does M g, the GroupNorm partial sums and
// A = sum n g^T (for grad_Q) in the same pass. Partial sums are kept per tile or per
// fixed chunk of tiles and reduced in a fixed order, so results do not depend on the
// number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <vector>

#include "../common.h"
#include "tiles.h"

namespace dfm_fused::cpu {
namespace {

// Chunks of tiles that own one partial C x C sum each (bounded memory, fixed split).
constexpr int64_t kChunks = 8;

at::Tensor decay_matrix(const at::Tensor& Q, const at::Tensor& D) {
  return at::mm(Q.t() * D.unsqueeze(0), Q).contiguous();
}

template <typename acc_t>
void sum_parts(const acc_t* parts, int64_t chunks, int64_t CC, acc_t* dst) {
  at::parallel_for(0, CC, 4096, [&](int64_t i0, int64_t i1) {
    std::copy(parts + i0, parts + i1, dst + i0);
    for (int64_t k = 1; k < chunks; ++k) {
      const acc_t* part = parts + k * CC;
#pragma omp simd
      for (int64_t i = i0; i < i1; ++i) dst[i] += part[i];
    }
  });
}

// The sum of per-chunk (chunks, C, C) partials, in chunk order.
at::Tensor sum_chunks(const at::Tensor& parts) {
  at::Tensor A = at::empty({parts.size(1), parts.size(2)}, parts.options());
  AT_DISPATCH_FLOATING_TYPES(parts.scalar_type(), "dfm_fused_sum_parts", [&] {
    sum_parts(parts.const_data_ptr<scalar_t>(), parts.size(0), A.numel(), A.mutable_data_ptr<scalar_t>());
  });
  return A;
}

// grad_Q = diag(D) Q (A + A^T) from per-chunk partials of A.
at::Tensor grad_Q_from_parts(const at::Tensor& parts, const at::Tensor& Q, const at::Tensor& D) {
  const at::Tensor A = sum_chunks(parts);
  return (D.unsqueeze(1) * at::mm(Q, A + A.t())).contiguous();
}

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

// out = M (x, or GroupNorm(x) when mean is given) [+ add], tile by tile. M: C x C, or (C,) for diag.
template <bool CL, typename scalar_t, typename acc_t>
void apply_matrix(const Tiling& t, const at::Tensor& M, const scalar_t* x, const acc_t* mean, const acc_t* rstd,
                  int64_t groups, const scalar_t* add, scalar_t* out) {
  at::parallel_for(0, t.num_tiles(), 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> in(t.buf_size()), res(t.buf_size()), sub(t.C), mul(t.C);
    int64_t last_b = -1;
    for (int64_t k = k0; k < k1; ++k) {
      int64_t b, p0, n;
      t.locate(k, b, p0, n);
      if (mean != nullptr && b != last_b) {
        group_affine(mean, rstd, b, t.C, groups, sub.data(), mul.data());
        last_b = b;
      }
      load_tile<CL>(t, b, p0, n, x, mean ? sub.data() : nullptr, mul.data(), in.data());
      tile_apply(t, n, M, in.data(), res.data());
      store_tile<CL>(t, b, p0, n, res.data(), add, out);
    }
  });
}

// One pass of a backward: gM = M g (if M), per-tile group sums of gM and gM * a
// (if tile_sums; [tiles][groups][2]), and per-chunk A += a g^T (if A_parts: (chunks, C, C)).
// a is x, or GroupNorm(x) when mean is given.
template <bool CL, typename scalar_t, typename acc_t, typename out_t>
void backward_pass(const Tiling& t, const scalar_t* g, const scalar_t* a, const acc_t* mean, const acc_t* rstd,
                   int64_t groups, const at::Tensor& M, out_t* gM, double* tile_sums, at::Tensor* A_parts,
                   int64_t chunks) {
  const int64_t cpg = t.C / groups;
  const bool need_a = tile_sums != nullptr || A_parts != nullptr;
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    std::vector<acc_t> bg(t.buf_size()), ba(need_a ? t.buf_size() : 0), bm(M.defined() ? t.buf_size() : 0);
    std::vector<acc_t> sub(t.C), mul(t.C);
    int64_t last_b = -1;
    for (int64_t k = k0; k < k1; ++k) {
      int64_t begin, end;
      chunk_range(t.num_tiles(), chunks, k, begin, end);
      for (int64_t tile = begin; tile < end; ++tile) {
        int64_t b, p0, n;
        t.locate(tile, b, p0, n);
        if (mean != nullptr && b != last_b) {
          group_affine(mean, rstd, b, t.C, groups, sub.data(), mul.data());
          last_b = b;
        }
        load_tile<CL>(t, b, p0, n, g, static_cast<const acc_t*>(nullptr), mul.data(), bg.data());
        if (need_a) load_tile<CL>(t, b, p0, n, a, mean ? sub.data() : nullptr, mul.data(), ba.data());
        if (M.defined()) {
          tile_apply(t, n, M, bg.data(), bm.data());
          store_tile<CL>(t, b, p0, n, bm.data(), static_cast<const out_t*>(nullptr), gM);
        }
        if (tile_sums != nullptr) {
          double* sums = tile_sums + tile * groups * 2;
          std::fill(sums, sums + groups * 2, 0.0);
          for_runs<CL>(t, b, p0, n, [&](int64_t, int64_t bo, int64_t len, int64_t c0) {
            for (int64_t i = 0; i < len; ++i) {
              const int64_t grp = (CL ? c0 + i : c0) / cpg;
              const double v = bm[bo + i];
              sums[grp * 2] += v;
              sums[grp * 2 + 1] += v * ba[bo + i];
            }
          });
        }
        if (A_parts != nullptr) {
          at::Tensor part = (*A_parts)[k];
          tile_outer_acc(t, n, ba.data(), bg.data(), part);
        }
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
template <typename scalar_t, typename acc_t>
void scaled_group_norm_backward(const Tiling& t, const scalar_t* g, const scalar_t* y, const acc_t* D,
                                const acc_t* mean, const acc_t* rstd, int64_t groups, scalar_t* grad_y) {
  const int64_t cpg = t.C / groups, run = cpg * t.HW;
  at::parallel_for(0, t.B * groups, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t base = i * run, c0 = (i % groups) * cpg;
      const acc_t m = mean[i], r = rstd[i];
      double s1 = 0, s2 = 0;
      for (int64_t c = 0; c < cpg; ++c) {
        const acc_t d = D[c0 + c];
        const scalar_t* gs = g + base + c * t.HW;
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
        const acc_t dr = D[c0 + c] * r;
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

Tiling tiling_of(const at::Tensor& x) {
  return Tiling(x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(x));
}

// Few pixels (P = B*H*W): forming M costs 2 C^3 flops and applying it 2 P C^2, while applying Q,
// diag(D) and Q^T in turn costs 4 P C^2; backward with M also forms A = sum x g^T. So, as in
// dfm_fused/ops/common.py, M is skipped when P < C (forward) or 6 P < 4 C (backward). That is the
// DFM state at ImageNet scale (7x7 pixels, 520+ channels, small batches). These shapes are small,
// so the thin path is plain GEMMs on float copies.
bool thin_forward(const Tiling& t) { return t.B * t.HW < t.C; }
bool thin_backward(const Tiling& t) { return 6 * t.B * t.HW < 4 * t.C; }

// x as a (B, C, H*W) tensor in the math dtype, NCHW order whatever x's layout.
at::Tensor as_bcp(const at::Tensor& x, at::ScalarType acc) {
  return x.to(acc).contiguous().view({x.size(0), x.size(1), -1});
}

// The thin path works on whole (C, P) matrices, the pixels of all images as columns (a copy):
// plain GEMMs, multithreaded by the BLAS, whose reductions run over C (products by Q) or over
// the pixels (grad_Q's sums, in fixed chunks where they could be long), as the GEMM by Q in
// grad_Q_from_parts, so the results do not depend on the thread count. (A batched at::matmul
// here did depend on it, on an Intel host with MKL.)
at::Tensor columns(const at::Tensor& a) { return a.transpose(0, 1).reshape({a.size(1), -1}); }

// A (C, B * P) matrix back as a (B, C, P) tensor.
at::Tensor from_columns(const at::Tensor& cols, int64_t B) {
  return cols.view({cols.size(0), B, -1}).transpose(0, 1).contiguous();
}

// grad_Q = diag(D) Q (A + A^T), A = sum a g^T, for images too small to make pixel
// tiles wide enough for a fast GEMM each (thin_tiles): A is a few wide GEMMs over all pixels, a
// and g as (C, P) matrices, in fixed chunks of kPixelChunk pixels accumulated in order. No GEMM
// has a longer reduction than that or than C (the GEMM by Q, as in grad_Q_from_parts), so
// results do not depend on the thread count. ac, gc: (C, B * P) columns (columns()) in the math dtype.
constexpr int64_t kPixelChunk = 1024;

bool thin_tiles(const Tiling& t) { return t.tile < 64; }

at::Tensor grad_Q_thin(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& ac, const at::Tensor& gc) {
  const int64_t P = ac.size(1);
  at::Tensor A = at::mm(ac.narrow(1, 0, std::min(P, kPixelChunk)), gc.narrow(1, 0, std::min(P, kPixelChunk)).t());
  for (int64_t p0 = kPixelChunk; p0 < P; p0 += kPixelChunk) {
    const int64_t n = std::min(kPixelChunk, P - p0);
    A.addmm_(ac.narrow(1, p0, n), gc.narrow(1, p0, n).t());
  }
  return (D.unsqueeze(1) * at::mm(Q, A + A.t())).contiguous();
}

// Q^T diag(D) Q a per pixel; a: (B, C, P) in the math dtype, as is the result.
at::Tensor thin_apply(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& a) {
  const at::Tensor DQa = at::mm(Q, columns(a)).mul_(D.unsqueeze(1));
  return from_columns(at::mm(Q.t(), DQa), a.size(0));
}

// (M g, diag(D) Q (A + A^T)) with A = sum a g^T, without M or A:
// grad_Q = sum over pixels of (D Q a) g^T + (D Q g) a^T (reductions over P < 2C/3 pixels).
// a, g: (B, C, P) in the math dtype, as is grad_a. Undefined where not needed.
std::tuple<at::Tensor, at::Tensor> thin_backward_math(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& a,
                                                      const at::Tensor& g, bool need_a, bool need_Q) {
  const at::Tensor Dc = D.unsqueeze(1), gc = columns(g);
  const at::Tensor DQg = at::mm(Q, gc).mul_(Dc);
  at::Tensor grad_a, grad_Q;
  if (need_a) grad_a = from_columns(at::mm(Q.t(), DQg), g.size(0));
  if (need_Q) {
    const at::Tensor ac = columns(a);
    grad_Q = at::mm(at::mm(Q, ac).mul_(Dc), gc.t()).addmm_(DQg, ac.t());
  }
  return {grad_a, grad_Q};
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

}  // namespace

at::Tensor exp_decay(const at::Tensor& x_, const at::Tensor& Q, const at::Tensor& D, bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_args(x_, Q, D);
  const at::Tensor x = x_.contiguous(layout_of(x_));
  const Tiling t = tiling_of(x);
  at::Tensor out = empty_output(x.sizes(), x.options(), layout_of(x));
  if (x.numel() == 0) return out;
  if (!scalar_decay && thin_forward(t)) {
    out.copy_(thin_apply(Q, D, as_bcp(x, Q.scalar_type())).view(x.sizes()));
    return out;
  }
  const at::Tensor M = scalar_decay ? D.contiguous() : decay_matrix(Q, D);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfm_fused_exp_decay", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dispatch_layout(t.cl, [&](auto cl) {
      apply_matrix<decltype(cl)::value>(t, M, x.const_data_ptr<scalar_t>(),
                                        static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr), 1,
                                        static_cast<const scalar_t*>(nullptr), out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> exp_decay_backward(const at::Tensor& grad_, const at::Tensor& x_,
                                                      const at::Tensor& Q, const at::Tensor& D, bool need_x,
                                                      bool need_Q, bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_args(x_, Q, D);
  TORCH_CHECK(grad_.sizes() == x_.sizes() && grad_.scalar_type() == x_.scalar_type(),
              "dfm_fused: grad must match x in shape and dtype");
  const auto fmt = layout_of(x_);
  const at::Tensor x = x_.contiguous(fmt), grad = grad_.contiguous(fmt);
  const Tiling t = tiling_of(x);
  at::Tensor grad_x = need_x ? empty_output(x.sizes(), x.options(), fmt) : at::empty({0}, x.options());
  at::Tensor grad_Q = at::empty({0}, Q.options());
  if (!need_x && !need_Q) return {grad_x, grad_Q};
  // Small images: grad_Q's A in wide GEMMs (grad_Q_thin), not per thin tile, wherever A is the
  // cheaper form (always with scalar_decay; otherwise unless pixels are very few: thin_backward).
  if (need_Q && x.numel() > 0 && thin_tiles(t) && (scalar_decay || !thin_backward(t))) {
    grad_Q = grad_Q_thin(Q, D, columns(as_bcp(x, Q.scalar_type())), columns(as_bcp(grad, Q.scalar_type())));
    need_Q = false;
  }
  // General decay on small images: M g by groups of images, not per thin tile.
  if (!scalar_decay && x.numel() > 0 && (thin_backward(t) || thin_tiles(t))) {
    auto [gx, gQ] = thin_backward_math(Q, D, as_bcp(x, Q.scalar_type()), as_bcp(grad, Q.scalar_type()), need_x, need_Q);
    if (need_x) grad_x.copy_(gx.view(x.sizes()));
    if (need_Q) grad_Q = gQ;
    return {grad_x, grad_Q};
  }
  const int64_t chunks = std::max<int64_t>(1, std::min(kChunks, t.num_tiles()));
  at::Tensor parts = need_Q ? at::zeros({chunks, t.C, t.C}, Q.options()) : at::Tensor();
  const at::Tensor M = need_x ? (scalar_decay ? D.contiguous() : decay_matrix(Q, D)) : at::Tensor();
  if (x.numel() > 0 && (need_x || need_Q)) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfm_fused_exp_decay_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_layout(t.cl, [&](auto cl) {
        backward_pass<decltype(cl)::value>(
            t, grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), static_cast<const acc_t*>(nullptr),
            static_cast<const acc_t*>(nullptr), 1, M, need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr,
            nullptr, need_Q ? &parts : nullptr, chunks);
      });
    });
  }
  if (need_Q) grad_Q = grad_Q_from_parts(parts, Q, D);
  return {grad_x, grad_Q};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> state_update(const at::Tensor& h_, const at::Tensor& y_,
                                                            const at::Tensor& Q, const at::Tensor& D, int64_t groups,
                                                            double eps, bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_state_update_args(h_, y_, Q, D, groups);
  const auto fmt = layout_of(h_);
  const at::Tensor h = h_.contiguous(fmt), y = y_.contiguous(fmt);
  const Tiling t = tiling_of(h);
  at::Tensor out = empty_output(h.sizes(), h.options(), fmt);
  at::Tensor mean = empty_output({t.B, groups}, Q.options()), rstd = empty_output({t.B, groups}, Q.options());
  if (h.numel() == 0) return {out, mean, rstd};
  const bool thin = !scalar_decay && thin_forward(t);
  const at::Tensor M = thin ? at::Tensor() : (scalar_decay ? D.contiguous() : decay_matrix(Q, D));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "dfm_fused_state_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    group_stats(t, y.const_data_ptr<scalar_t>(), groups, eps, mean.mutable_data_ptr<acc_t>(),
                rstd.mutable_data_ptr<acc_t>());
    if (thin) {
      const at::Tensor update = thin_apply(Q, D, thin_normalize(as_bcp(y, Q.scalar_type()), mean, rstd, groups));
      out.copy_((as_bcp(h, Q.scalar_type()) + update).view(h.sizes()));
      return;
    }
    dispatch_layout(t.cl, [&](auto cl) {
      apply_matrix<decltype(cl)::value>(t, M, y.const_data_ptr<scalar_t>(),
                                        mean.const_data_ptr<acc_t>(), rstd.const_data_ptr<acc_t>(), groups,
                                        h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>());
    });
  });
  return {out, mean, rstd};
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
  if (need_Q && thin_tiles(t) && (scalar_decay || !thin_backward(t))) {
    grad_Q = grad_Q_thin(Q, D, normalized_columns(as_bcp(y, Q.scalar_type()), mean, rstd, groups),
                         columns(as_bcp(grad, Q.scalar_type())));
    need_Q = false;
    if (!need_y) return {grad_y, grad_Q};
  }
  if (!scalar_decay && (thin_backward(t) || thin_tiles(t))) {
    const at::Tensor y3 = as_bcp(y, Q.scalar_type());  // converted once, for GroupNorm and its backward
    auto [gn, gQ] = thin_backward_math(Q, D, thin_normalize(y3, mean, rstd, groups), as_bcp(grad, Q.scalar_type()),
                                       need_y, need_Q);
    if (need_y) {
      const auto gy = at::native_group_norm_backward(gn.view(y.sizes()), y3.view(y.sizes()), mean, rstd, std::nullopt,
                                                     t.B, t.C, t.HW, groups, {true, false, false});
      grad_y.copy_(std::get<0>(gy));
    }
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
  const at::Tensor M = need_y ? (scalar_decay ? D.contiguous() : decay_matrix(Q, D)) : at::Tensor();
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
