// CPU kernels of exp_decay: out = M x, M = Q^T diag(D) Q (or diag(D) with scalar_decay), and its
// backward (grad_x = M g, grad_Q = diag(D) Q (A + A^T), A = sum x g^T). The passes are in
// channel_map.h.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common.h"
#include "channel_map.h"

namespace dfm_fused::cpu {

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
  check_decay_backward_args(grad_, x_, Q, D, "x");
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
}  // namespace dfm_fused::cpu
