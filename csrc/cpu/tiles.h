// Pixel tiles of a (B, C, H*W) activation for the CPU kernels that apply a C x C matrix
// per pixel. A tile is up to `tile` pixels of one image: wide enough that ATen's blocked
// GEMM (at::mm_out -> MKL/OpenBLAS) runs near full speed on it, small enough that a
// thread's float copies of it stay in cache between the load, GEMM and store steps.
//
// Tile buffers follow the tensor's layout so loads and stores are contiguous runs:
//   NCHW: buf[c * tile + p]  (a run is one channel, n pixels)
//   NHWC: buf[p * C + c]     (a run is one pixel, C channels)
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace dfm_fused::cpu {

struct Tiling {
  int64_t B, C, HW;
  bool cl;
  int64_t tile;
  int64_t per_image;

  Tiling(int64_t B_, int64_t C_, int64_t HW_, bool cl_) : B(B_), C(C_), HW(HW_), cl(cl_) {
    // ~256K elements (1 MB float) per buffer: narrower tiles measurably slow the GEMM down.
    const int64_t target = ((262144 / std::max<int64_t>(C, 1)) + 15) / 16 * 16;
    tile = std::max<int64_t>(1, std::min(HW, std::max<int64_t>(16, target)));
    per_image = (HW + tile - 1) / tile;
  }
  int64_t num_tiles() const { return B * per_image; }
  int64_t buf_size() const { return C * tile; }
  // Offset of element (b, c = 0, p) in the tensor's memory.
  int64_t offset(int64_t b, int64_t p) const { return cl ? (b * HW + p) * C : b * C * HW + p; }
  void locate(int64_t t, int64_t& b, int64_t& p0, int64_t& n) const {
    b = t / per_image;
    p0 = (t % per_image) * tile;
    n = std::min(tile, HW - p0);
  }
};

// Calls f(mem_offset, buf_offset, len, c0) for each contiguous run of a tile. Element i of
// a run has channel c0 + (CL ? i : 0).
template <bool CL, typename F>
inline void for_runs(const Tiling& t, int64_t b, int64_t p0, int64_t n, F&& f) {
  if constexpr (CL) {
    for (int64_t p = 0; p < n; ++p) f(t.offset(b, p0 + p), p * t.C, t.C, int64_t(0));
  } else {
    for (int64_t c = 0; c < t.C; ++c) f(t.offset(b, p0) + c * t.HW, c * t.tile, n, c);
  }
}

// A float tile buffer as a (C, n) matrix view, whatever its layout.
template <typename acc_t>
inline at::Tensor tile_view(const Tiling& t, int64_t n, const acc_t* buf) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  void* data = const_cast<acc_t*>(buf);
  return t.cl ? at::from_blob(data, {t.C, n}, {1, t.C}, options) : at::from_blob(data, {t.C, n}, {t.tile, 1}, options);
}

// out = M in for one tile of n pixels. M is C x C, or a (C,) vector d standing for diag(d) (the
// scalar-decay path, where the decay is a per-channel scale and no GEMM runs). ATen's blocked
// GEMM reads the strided views in place; inside at::parallel_for it runs single-threaded on
// this thread's tile.
template <typename acc_t>
inline void tile_apply(const Tiling& t, int64_t n, const at::Tensor& M, const acc_t* in, acc_t* out) {
  if (M.dim() == 1) {
    const acc_t* d = M.const_data_ptr<acc_t>();
    if (t.cl) {
      for (int64_t p = 0; p < n; ++p) {
#pragma omp simd
        for (int64_t c = 0; c < t.C; ++c) out[p * t.C + c] = in[p * t.C + c] * d[c];
      }
    } else {
      for (int64_t c = 0; c < t.C; ++c) {
#pragma omp simd
        for (int64_t p = 0; p < n; ++p) out[c * t.tile + p] = in[c * t.tile + p] * d[c];
      }
    }
    return;
  }
  at::Tensor result = tile_view(t, n, out);
  at::mm_out(result, M, tile_view(t, n, in));
}

// A += a b^T summed over the n pixels of a tile (A: C x C).
template <typename acc_t>
inline void tile_outer_acc(const Tiling& t, int64_t n, const acc_t* a, const acc_t* b, at::Tensor& A) {
  A.addmm_(tile_view(t, n, a), tile_view(t, n, b).t());
}

// Tiles [begin, end) of chunk k out of `chunks`: a split that depends only on the problem,
// never on the thread count, so per-chunk partial sums reduce to the same bits.
inline void chunk_range(int64_t num_tiles, int64_t chunks, int64_t k, int64_t& begin, int64_t& end) {
  begin = k * num_tiles / chunks;
  end = (k + 1) * num_tiles / chunks;
}

// Per-channel (sub, mul) of GroupNorm for image b: n = (y - sub[c]) * mul[c].
template <typename acc_t>
inline void group_affine(const acc_t* mean, const acc_t* rstd, int64_t b, int64_t C, int64_t groups, acc_t* sub,
                         acc_t* mul) {
  const int64_t cpg = C / groups;
  for (int64_t c = 0; c < C; ++c) {
    sub[c] = mean[b * groups + c / cpg];
    mul[c] = rstd[b * groups + c / cpg];
  }
}

// buf = (acc) x, or (x - sub[c]) * mul[c] when sub is given.
template <bool CL, typename scalar_t, typename acc_t>
inline void load_tile(const Tiling& t, int64_t b, int64_t p0, int64_t n, const scalar_t* x, const acc_t* sub,
                      const acc_t* mul, acc_t* buf) {
  for_runs<CL>(t, b, p0, n, [&](int64_t mo, int64_t bo, int64_t len, int64_t c0) {
    const scalar_t* src = x + mo;
    acc_t* dst = buf + bo;
    if (sub == nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<acc_t>(src[i]);
    } else {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) {
        const int64_t c = CL ? c0 + i : c0;
        dst[i] = (static_cast<acc_t>(src[i]) - sub[c]) * mul[c];
      }
    }
  });
}

// out = (scalar) (buf [+ add]).
template <bool CL, typename scalar_t, typename acc_t>
inline void store_tile(const Tiling& t, int64_t b, int64_t p0, int64_t n, const acc_t* buf, const scalar_t* add,
                       scalar_t* out) {
  for_runs<CL>(t, b, p0, n, [&](int64_t mo, int64_t bo, int64_t len, int64_t) {
    const acc_t* src = buf + bo;
    scalar_t* dst = out + mo;
    if (add == nullptr) {
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<scalar_t>(src[i]);
    } else {
      const scalar_t* a = add + mo;
#pragma omp simd
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<scalar_t>(src[i] + static_cast<acc_t>(a[i]));
    }
  });
}

}  // namespace dfm_fused::cpu
