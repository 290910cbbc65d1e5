// Non-template parts of the channel maps (channel_map.h): the small GEMMs around the tiled passes
// and the thin path.
#include "channel_map.h"

#include <ATen/Dispatch.h>

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

}  // namespace

at::Tensor decay_matrix(const at::Tensor& Q, const at::Tensor& D) {
  return at::mm(Q.t() * D.unsqueeze(0), Q).contiguous();
}

// grad_Q = diag(D) Q (A + A^T) from per-chunk partials of A.
at::Tensor grad_Q_from_parts(const at::Tensor& parts, const at::Tensor& Q, const at::Tensor& D) {
  const at::Tensor A = sum_chunks(parts);
  return (D.unsqueeze(1) * at::mm(Q, A + A.t())).contiguous();
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
  return at::mm(Q, A + A.t()).mul_(D.unsqueeze(1));
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
