// Argument checks shared by the CPU and CUDA entry points (declared in common.h): shapes, dtypes
// and sizes, each message naming the argument, the expected and the actual value.
#include <ATen/OpMathType.h>

#include "common.h"

namespace dfm_fused {

void check_decay_args(const at::Tensor& x, const at::Tensor& Q, const at::Tensor& D) {
  TORCH_CHECK(x.dim() == 4, "dfm_fused: x must be (B, C, H, W); got ", x.sizes());
  const int64_t C = x.size(1);
  TORCH_CHECK(Q.dim() == 2 && Q.size(0) == C && Q.size(1) == C, "dfm_fused: Q must be (", C, ", ", C, "); got ",
              Q.sizes());
  TORCH_CHECK(D.dim() == 1 && D.size(0) == C, "dfm_fused: D must be (", C, ",); got ", D.sizes());
  const auto acc = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(Q.scalar_type() == acc && D.scalar_type() == acc, "dfm_fused: Q and D must be ", acc, " for ",
              x.scalar_type(), " activations; got ", Q.scalar_type(), " and ", D.scalar_type());
}

void check_state_update_args(const at::Tensor& h, const at::Tensor& y, const at::Tensor& Q, const at::Tensor& D,
                             int64_t groups) {
  check_decay_args(y, Q, D);
  TORCH_CHECK(h.sizes() == y.sizes() && h.scalar_type() == y.scalar_type(),
              "dfm_fused: h and y must have one shape and dtype; got ", h.sizes(), " ", h.scalar_type(), " and ",
              y.sizes(), " ", y.scalar_type());
  TORCH_CHECK(groups >= 1 && y.size(1) % groups == 0, "dfm_fused: groups must divide C");
}

void check_feedback_args(const at::Tensor& x, const at::Tensor& h, int64_t offset, int64_t fb, int64_t groups) {
  TORCH_CHECK(x.dim() == 4 && h.dim() == 4 && x.size(0) == h.size(0), "dfm_fused: x and h must be (B, C, H, W)");
  TORCH_CHECK(x.scalar_type() == h.scalar_type(), "dfm_fused: x and h must have one dtype");
  TORCH_CHECK(offset >= 0 && fb >= 1 && offset + fb <= h.size(1) && groups >= 1 && fb % groups == 0,
              "dfm_fused: bad offset/fb/groups");
}

void check_decay_backward_args(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& Q, const at::Tensor& D,
                               const char* a_name) {
  check_decay_args(a, Q, D);
  TORCH_CHECK(grad.sizes() == a.sizes() && grad.scalar_type() == a.scalar_type(), "dfm_fused: grad must match ",
              a_name, " in shape and dtype; got ", grad.sizes(), " ", grad.scalar_type(), " and ", a.sizes(), " ",
              a.scalar_type());
}

void check_saved_M(const at::Tensor& M, const at::Tensor& Q) {
  TORCH_CHECK(M.sizes() == Q.sizes() && M.scalar_type() == Q.scalar_type() && M.device() == Q.device(),
              "dfm_fused: M (the forward's decay matrix) must be like Q, ", Q.sizes(), " ", Q.scalar_type(), " on ",
              Q.device(), "; got ", M.sizes(), " ", M.scalar_type(), " on ", M.device());
}

void check_feedback_backward_args(const at::Tensor& grad, const at::Tensor& h, int64_t fb) {
  TORCH_CHECK(grad.dim() == 4 && h.dim() == 4 && grad.size(0) == h.size(0) && grad.size(1) >= fb,
              "dfm_fused: grad and h must be (B, C, H, W)");
  TORCH_CHECK(grad.scalar_type() == h.scalar_type(), "dfm_fused: grad and h must have one dtype");
}

}  // namespace dfm_fused
