// Shared declarations of the dfm_fused C++ extension: op entry points per device and
// small helpers (output layout, poisoned allocation) used by the CPU and CUDA kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <string>
#include <tuple>
#include <type_traits>

namespace dfm_fused {

// Activations are (B, C, H, W). A kernel reads and writes them either as NCHW or as
// NHWC (channels_last); which one is decided from one input by `is_channels_last` and
// the fake (meta) implementations in Python apply the same rule.
inline bool is_channels_last(const at::Tensor& x) {
  return !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat layout_of(const at::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Calls f(std::true_type{}) for channels_last, f(std::false_type{}) for NCHW, so kernels take
// the layout as a compile-time constant and their NCHW inner loops are unit-stride.
template <typename F>
void dispatch_layout(bool channels_last, F&& f) {
  if (channels_last) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// First statement of every op: the kernels call ATen (GEMMs, small matrix products) and must
// not be re-dispatched to autocast when an op (or its backward) runs inside an autocast region.
#define DFM_FUSED_NO_AUTOCAST() c10::impl::ExcludeDispatchKeyGuard dfm_fused_no_autocast_(c10::autocast_dispatch_keyset)

// at::empty, filled with NaN while poisoning is on (test_hooks.cpp: DFM_FUSED_POISON=1 at load,
// or set_poison) so that elements a kernel fails to write show up in tests.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);
void set_poison(bool enabled);
bool poison_enabled();

// Argument checks of every device's entry points (checks.cpp).
void check_decay_args(const at::Tensor& x, const at::Tensor& Q, const at::Tensor& D);
// check_decay_args(a, Q, D), and grad matches a (named a_name in the message) in shape and dtype.
void check_decay_backward_args(const at::Tensor& grad, const at::Tensor& a, const at::Tensor& Q, const at::Tensor& D,
                               const char* a_name);
void check_state_update_args(const at::Tensor& h, const at::Tensor& y, const at::Tensor& Q, const at::Tensor& D,
                             int64_t groups);
// M (state_update's kept decay matrix) is like Q: shape, dtype and device.
void check_saved_M(const at::Tensor& M, const at::Tensor& Q);
void check_feedback_args(const at::Tensor& x, const at::Tensor& h, int64_t offset, int64_t fb, int64_t groups);
void check_feedback_backward_args(const at::Tensor& grad, const at::Tensor& h, int64_t fb);

// The op entry points, declared once for each device namespace.
#define DFM_FUSED_DECLARE_OPS() \
  at::Tensor exp_decay(const at::Tensor& x, const at::Tensor& Q, const at::Tensor& D, bool scalar_decay); \
  std::tuple<at::Tensor, at::Tensor> exp_decay_backward(const at::Tensor& grad, const at::Tensor& x, \
                                                        const at::Tensor& Q, const at::Tensor& D, \
                                                        bool need_x, bool need_Q, bool scalar_decay); \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> state_update( \
      const at::Tensor& h, const at::Tensor& y, const at::Tensor& Q, const at::Tensor& D, int64_t groups, \
      double eps, bool scalar_decay, bool keep_M); \
  std::tuple<at::Tensor, at::Tensor> state_update_backward(const at::Tensor& grad, const at::Tensor& y, \
                                                           const at::Tensor& Q, const at::Tensor& D, \
                                                           const at::Tensor& mean, const at::Tensor& rstd, \
                                                           int64_t groups, bool need_y, bool need_Q, \
                                                           bool scalar_decay, const std::optional<at::Tensor>& M); \
  DFM_FUSED_DECLARE_FEEDBACK_INPUT_OPS()

#define DFM_FUSED_DECLARE_FEEDBACK_INPUT_OPS() \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> feedback_input(const at::Tensor& x, const at::Tensor& h, \
                                                                int64_t offset, int64_t fb, int64_t groups, \
                                                                double eps); \
  at::Tensor feedback_input_backward(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& mean, \
                                     const at::Tensor& rstd, int64_t offset, int64_t fb, int64_t groups);

namespace cpu {
DFM_FUSED_DECLARE_OPS()

// The CPU kernels built per target (csrc/cpu/target.h); the entry points above pick one.
namespace baseline {
DFM_FUSED_DECLARE_FEEDBACK_INPUT_OPS()
}
#ifdef DFM_FUSED_WITH_AVX2
namespace avx2 {
DFM_FUSED_DECLARE_FEEDBACK_INPUT_OPS()
}
#endif

// The CPU target the next call runs: the one asked for ("baseline" or "avx2": DFM_FUSED_CPU_TARGET
// at load, or set_cpu_target), otherwise the best one this build has and this CPU supports.
// Asking for a target that is not built or not supported raises.
const char* cpu_target();
// "" for the best one; raises for a name that is not a target, or a target that cannot run here
// (the setting is then unchanged). Returns the previous request ("" for the best one).
std::string set_cpu_target(const std::string& name);
}  // namespace cpu

#ifdef DFM_FUSED_WITH_CUDA
namespace cuda {
DFM_FUSED_DECLARE_OPS()
}  // namespace cuda
#endif

}  // namespace dfm_fused
