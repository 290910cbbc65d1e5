// Non-template parts of the channel maps (channel_map.h): the small GEMMs around the tiled passes
// and the thin path.
#include "channel_map.h"

#include <ATen/Dispatch.h>

#include <utility>
#include <vector>

namespace dfm_fused::cpu {
namespace {

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

// A + A^T in place (A: n x n, contiguous): each entry above the diagonal and its mirror get their
// sum, the diagonal twice itself (the same float additions as A + A.t(), without a transposed
// read into a new n x n buffer). Work is split by pairs of 32 x 32 blocks, each pair one task.
template <typename scalar_t>
void symmetrize(scalar_t* a, int64_t n) {
  constexpr int64_t kBlock = 32;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (int64_t bi = 0; bi < blocks; ++bi)
    for (int64_t bj = bi; bj < blocks; ++bj) pairs.emplace_back(bi, bj);
  at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const auto [bi, bj] = pairs[k];
      const int64_t i1 = std::min(n, (bi + 1) * kBlock), j1 = std::min(n, (bj + 1) * kBlock);
      for (int64_t i = bi * kBlock; i < i1; ++i) {
        for (int64_t j = bi == bj ? i : bj * kBlock; j < j1; ++j) {
          const scalar_t sum = a[i * n + j] + a[j * n + i];
          a[i * n + j] = sum;
          a[j * n + i] = sum;
        }
      }
    }
  });
}

// diag(D) Q (A + A^T), A consumed (symmetrised in place).
at::Tensor grad_Q_of_A(at::Tensor A, const at::Tensor& Q, const at::Tensor& D) {
  A = A.contiguous();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "dfm_fused_symmetrize", [&] {
    symmetrize(A.mutable_data_ptr<scalar_t>(), A.size(0));
  });
  return at::mm(Q, A).mul_(D.unsqueeze(1));
}

}  // namespace

at::Tensor decay_matrix(const at::Tensor& Q, const at::Tensor& D) {
  return at::mm(Q.t() * D.unsqueeze(0), Q).contiguous();
}

// grad_Q = diag(D) Q (A + A^T) from per-chunk partials of A.
at::Tensor grad_Q_from_parts(const at::Tensor& parts, const at::Tensor& Q, const at::Tensor& D) {
  return grad_Q_of_A(sum_chunks(parts), Q, D);
}

at::Tensor as_bcp(const at::Tensor& x, at::ScalarType acc) {
  return x.to(acc).contiguous().view({x.size(0), x.size(1), -1});
}

at::Tensor columns(const at::Tensor& a) { return a.transpose(0, 1).reshape({a.size(1), -1}); }

at::Tensor from_columns(const at::Tensor& cols, int64_t B) {
  return cols.view({cols.size(0), B, -1}).transpose(0, 1).contiguous();
}

at::Tensor grad_Q_thin(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& ac, const at::Tensor& gc) {
  const int64_t P = ac.size(1);
  at::Tensor A = at::mm(ac.narrow(1, 0, std::min(P, kPixelChunk)), gc.narrow(1, 0, std::min(P, kPixelChunk)).t());
  for (int64_t p0 = kPixelChunk; p0 < P; p0 += kPixelChunk) {
    const int64_t n = std::min(kPixelChunk, P - p0);
    A.addmm_(ac.narrow(1, p0, n), gc.narrow(1, p0, n).t());
  }
  return grad_Q_of_A(std::move(A), Q, D);
}

at::Tensor thin_apply(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& a) {
  const at::Tensor DQa = at::mm(Q, columns(a)).mul_(D.unsqueeze(1));
  return from_columns(at::mm(Q.t(), DQa), a.size(0));
}

std::tuple<at::Tensor, at::Tensor> thin_backward_math(const at::Tensor& Q, const at::Tensor& D, const at::Tensor& a,
                                                      const at::Tensor& g, bool need_a, bool need_Q) {
  at::Tensor grad_a, grad_Q;
  if (!need_a && !need_Q) return {grad_a, grad_Q};
  const at::Tensor Dc = D.unsqueeze(1), gc = columns(g);
  const at::Tensor DQg = at::mm(Q, gc).mul_(Dc);
  if (need_a) grad_a = from_columns(at::mm(Q.t(), DQg), g.size(0));
  if (need_Q) {
    const at::Tensor ac = columns(a);
    grad_Q = at::mm(at::mm(Q, ac).mul_(Dc), gc.t()).addmm_(DQg, ac.t());
  }
  return {grad_a, grad_Q};
}

}  // namespace dfm_fused::cpu
