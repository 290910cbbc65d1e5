// Channel maps shared by the CPU kernels of exp_decay and state_update: apply
// M = Q^T diag(D) Q (or, with scalar_decay, the (C,) vector D) per pixel, and form grad_Q's
// A = sum a g^T, a being x or GroupNorm(y).
//
// With few pixels (fewer than channels) M is not formed; see thin_forward below. (state_update
// forms it all the same when the caller keeps it for the backward: keep_M.)
//
// scalar_decay (docs/design.md 'Scalar decay': Q orthonormal, D uniform, so M = diag(D)): M is replaced by
// the (C,) vector D, a per-channel scale (tile_apply), and A = sum a g^T for grad_Q is one GEMM
// over all pixels (grad_Q_thin) where the tiles would be too thin for a fast GEMM each.
//
// Each op is one parallel pass over pixel tiles: load (and normalise) a tile into an
// L2-resident float buffer, apply M with ATen's blocked GEMM, and write the result with
// the epilogue fused (cast, + h). Backward does M g, the GroupNorm partial sums and
// A = sum n g^T (for grad_Q) in the same pass. Partial sums are kept per tile or per
// fixed chunk of tiles and reduced in a fixed order, so results do not depend on the
// number of threads.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "../common.h"
#include "tiles.h"

namespace dfm_fused::cpu {

// Chunks of tiles that own one partial C x C sum each (bounded memory, fixed split).
constexpr int64_t kChunks = 8;

// M = Q^T diag(D) Q, (C, C) contiguous.
at::Tensor decay_matrix(const at::Tensor& Q, const at::Tensor& D);

// grad_Q = diag(D) Q (A + A^T) from per-chunk partials of A.
at::Tensor grad_Q_from_parts(const at::Tensor& parts, const at::Tensor& Q, const at::Tensor& D);

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

inline Tiling tiling_of(const at::Tensor& x) {
  return Tiling(x.size(0), x.size(1), x.size(2) * x.size(3), is_channels_last(x));
}

// Few pixels (P = B*H*W): forming M costs 2 C^3 flops and applying it 2 P C^2, while applying Q,
// diag(D) and Q^T in turn costs 4 P C^2; backward with M also forms A = sum x g^T. So, as in
// dfm_fused/ops/_torch/decay.py, M is skipped when P < C (forward) or 6 P < 4 C (backward).
// That is the DFM state at ImageNet scale (7x7 pixels, 520+ channels, small batches). These
// shapes are small, so the thin path is plain GEMMs on float copies. state_update's keep_M changes the count: an M
// kept from the forward saves the backward a P C^2 GEMM (M g instead of Q^T (D Q g)), so forming
// it pays for P > C/2 (ops/state_update/extension_backend.py decides; the operating point has
// P = 512 pixels for C = 528).
inline bool thin_forward(const Tiling& t) { return t.B * t.HW < t.C; }
inline bool thin_backward(const Tiling& t) { return 6 * t.B * t.HW < 4 * t.C; }

// x as a (B, C, H*W) tensor in the math dtype, NCHW order whatever x's layout.
at::Tensor as_bcp(const at::Tensor& x, at::ScalarType acc);

// The thin path works on whole (C, P) matrices, the pixels of all images as columns (a copy):
// plain GEMMs, multithreaded by the BLAS, whose reductions run over C (products by Q) or over
// the pixels (grad_Q's sums, in fixed chunks where they could be long), as the GEMM by Q in
// grad_Q_from_parts, so the results do not depend on the thread count. (A batched at::matmul
// here did depend on it, on an Intel host with MKL.)
at::Tensor columns(const at::Tensor& a);

// A (C, B * P) matrix back as a (B, C, P) tensor.
at::Tensor from_columns(const at::Tensor& cols, int64_t B);

// grad_Q = diag(D) Q (A + A^T), A = sum a g^T, for images too small to make pixel
// tiles wide enough for a fast GEMM each (thin_tiles): A is a few wide GEMMs over all pixels, a
// and g as (C, P) matrices, in fixed chunks of kPixelChunk pixels accumulated in order. No GEMM
// has a longer reduction than that or than C (the GEMM by Q, as in grad_Q_from_parts), so
// results do not depend on the thread count. ac, gc: (C, B * P) columns (columns()) in the math dtype.
constexpr int64_t kPixelChunk = 1024;

inline bool thin_tiles(const Tiling& t) { return t.tile < 64; }

at::Tensor grad_Q_thin(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& ac, const at::Tensor& gc);

// Q^T diag(D) Q a per pixel; a: (B, C, P) in the math dtype, as is the result.
at::Tensor thin_apply(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& a);

// (M g, diag(D) Q (A + A^T)) with A = sum a g^T, without M or A:
// grad_Q = sum over pixels of (D Q a) g^T + (D Q g) a^T (reductions over P < 2C/3 pixels).
// a, g: (B, C, P) in the math dtype, as is grad_a (a is read only for grad_Q). Undefined where not needed.
std::tuple<at::Tensor, at::Tensor> thin_backward_math(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& a,
                                                      const at::Tensor& g, bool need_a, bool need_Q);

}  // namespace dfm_fused::cpu
