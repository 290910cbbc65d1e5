// Run-time choice of CPU target for the kernels built per target (csrc/cpu/target.h).
#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>

#include "../common.h"

namespace dfm_fused::cpu {
namespace {

bool cpu_has_avx2() {
#if defined(DFM_FUSED_WITH_AVX2)
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return supported;
#else
  return false;
#endif
}

bool built_with_avx2() {
#if defined(DFM_FUSED_WITH_AVX2)
  return true;
#else
  return false;
#endif
}

}  // namespace

const char* cpu_target() {
  // Read per call (cheap next to a kernel) so tests can run both targets in one process.
  const char* asked = std::getenv("DFM_FUSED_CPU_TARGET");
  if (asked == nullptr || asked[0] == '\0') return cpu_has_avx2() ? "avx2" : "baseline";
  if (std::strcmp(asked, "baseline") == 0) return "baseline";
  TORCH_CHECK(std::strcmp(asked, "avx2") == 0, "dfm_fused: DFM_FUSED_CPU_TARGET must be 'baseline' or 'avx2'; got '",
              asked, "'");
  TORCH_CHECK(built_with_avx2(), "dfm_fused: DFM_FUSED_CPU_TARGET=avx2, but this build has no AVX2 kernels "
              "(built with DFM_FUSED_CPU_AVX2=0 or not for x86-64)");
  TORCH_CHECK(cpu_has_avx2(), "dfm_fused: DFM_FUSED_CPU_TARGET=avx2, but this CPU lacks AVX2/FMA");
  return "avx2";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> feedback_input(const at::Tensor& x, const at::Tensor& h,
                                                              int64_t offset, int64_t fb, int64_t groups,
                                                              double eps) {
#if defined(DFM_FUSED_WITH_AVX2)
  if (std::strcmp(cpu_target(), "avx2") == 0) return avx2::feedback_input(x, h, offset, fb, groups, eps);
#endif
  return baseline::feedback_input(x, h, offset, fb, groups, eps);
}

at::Tensor feedback_input_backward(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& mean,
                                   const at::Tensor& rstd, int64_t offset, int64_t fb, int64_t groups) {
#if defined(DFM_FUSED_WITH_AVX2)
  if (std::strcmp(cpu_target(), "avx2") == 0) {
    return avx2::feedback_input_backward(grad, h, mean, rstd, offset, fb, groups);
  }
#endif
  return baseline::feedback_input_backward(grad, h, mean, rstd, offset, fb, groups);
}

}  // namespace dfm_fused::cpu
