// CUDA kernels of exp_decay: out = M x, M = Q^T diag(D) Q (or diag(D) with scalar_decay), and its
// backward (grad_x = M g, grad_Q = diag(D) Q (A + A^T), A = sum x g^T), on the channel maps of
// channel_map.cuh.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../common.h"
#include "channel_map.cuh"

namespace dfm_fused::cuda {

at::Tensor exp_decay(const at::Tensor& x_, const at::Tensor& Q, const at::Tensor& D, bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_args(x_, Q, D);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  at::Tensor out = empty_output(x.sizes(), x.options());
  if (x.numel() == 0) return to_layout(out, layout_of(x_));
  const at::Tensor M = channel_map(Q, D, scalar_decay);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfm_fused_exp_decay_cuda", [&] {
    launch_matmul<scalar_t, scalar_t, false, false>(M, x, at::Tensor(), at::Tensor(), 1, at::Tensor(), out);
  });
  return to_layout(out, layout_of(x_));
}

std::tuple<at::Tensor, at::Tensor> exp_decay_backward(const at::Tensor& grad_, const at::Tensor& x_,
                                                      const at::Tensor& Q, const at::Tensor& D, bool need_x,
                                                      bool need_Q, bool scalar_decay) {
  DFM_FUSED_NO_AUTOCAST();
  check_decay_backward_args(grad_, x_, Q, D, "x");
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous(), grad = grad_.contiguous();
  at::Tensor grad_x = at::empty({0}, x.options()), grad_Q = at::empty({0}, Q.options());
  if (x.numel() == 0) {
    if (need_x) grad_x = at::zeros_like(x_, x_.options(), layout_of(x_));
    if (need_Q) grad_Q = at::zeros_like(Q);
    return {grad_x, grad_Q};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfm_fused_exp_decay_backward_cuda",
                                  [&] {
    if (need_x) {
      grad_x = empty_output(x.sizes(), x.options());
      launch_matmul<scalar_t, scalar_t, false, false>(channel_map(Q, D, scalar_decay), grad, at::Tensor(),
                                                      at::Tensor(), 1, at::Tensor(), grad_x);
      grad_x = to_layout(grad_x, layout_of(x_));
    }
    if (need_Q) grad_Q = grad_Q_of<scalar_t, false>(x, grad, at::Tensor(), at::Tensor(), 1, Q, D);
  });
  return {grad_x, grad_Q};
}

}  // namespace dfm_fused::cuda
