// Small device helpers shared by the CUDA kernels: vector loads and a deterministic block sum.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

namespace dfm_fused::cuda {

// Four consecutive elements; 16 bytes for float32 (two 16-byte transactions for float64).
template <typename T>
struct alignas(4 * sizeof(T)) Vec4 {
  T v[4];
};

inline bool aligned4(const void* ptr, int64_t element_size) {
  return reinterpret_cast<std::uintptr_t>(ptr) % (4 * element_size) == 0;
}

// Sum of a and b over the block, in a fixed tree order (bitwise reproducible).
// Every thread gets the result. THREADS must be a power of two.
template <int THREADS, typename T>
__device__ inline void block_sum2(T& a, T& b) {
  __shared__ T sa[THREADS];
  __shared__ T sb[THREADS];
  const int tid = threadIdx.x;
  sa[tid] = a;
  sb[tid] = b;
  __syncthreads();
  for (int s = THREADS / 2; s > 0; s >>= 1) {
    if (tid < s) {
      sa[tid] += sa[tid + s];
      sb[tid] += sb[tid + s];
    }
    __syncthreads();
  }
  a = sa[0];
  b = sb[0];
  __syncthreads();
}

// GroupNorm statistics of one group from its block sums: block_sum2 of the values s and of
// their squares ss over n values; thread 0 stores mean and rstd (biased variance) at index i.
template <typename acc_t>
__device__ inline void store_group_stats(double s, double ss, int64_t n, double eps, int64_t i, acc_t* mean,
                                         acc_t* rstd) {
  if (threadIdx.x == 0) {
    const double m = s / n, var = fmax(ss / n - m * m, 0.0);
    mean[i] = static_cast<acc_t>(m);
    rstd[i] = static_cast<acc_t>(rsqrt(var + eps));
  }
}

inline unsigned blocks_for(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

}  // namespace dfm_fused::cuda
