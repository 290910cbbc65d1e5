// Run-time choice of CPU target for the kernels built per target (csrc/cpu/target.h).
// DFM_FUSED_CPU_TARGET is read once, when the library is loaded; tests switch targets afterwards
// with set_cpu_target (dfm_fused._extension.set_cpu_target), not through the environment.
#include <ATen/ATen.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

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

enum Target : int { kBest, kBaseline, kAvx2, kInvalid };

// The environment's value, kept only when it is not a target name: the first CPU kernel call
// raises with it (an exception cannot leave the library's static initialisation).
const std::string& invalid_request() {
  static const std::string value = [] {
    const char* asked = std::getenv("DFM_FUSED_CPU_TARGET");
    return asked == nullptr ? std::string() : std::string(asked);
  }();
  return value;
}

Target parse(const char* asked) {
  if (asked == nullptr || asked[0] == '\0') return kBest;
  if (std::strcmp(asked, "baseline") == 0) return kBaseline;
  if (std::strcmp(asked, "avx2") == 0) return kAvx2;
  return kInvalid;
}

std::atomic<int> requested{parse(std::getenv("DFM_FUSED_CPU_TARGET"))};

const char* resolve(Target target, const std::string& asked) {
  TORCH_CHECK(target != kInvalid, "dfm_fused: DFM_FUSED_CPU_TARGET must be 'baseline' or 'avx2'; got '", asked, "'");
  if (target == kBest) return cpu_has_avx2() ? "avx2" : "baseline";
  if (target == kBaseline) return "baseline";
  TORCH_CHECK(built_with_avx2(), "dfm_fused: DFM_FUSED_CPU_TARGET=avx2, but this build has no AVX2 kernels "
              "(built with DFM_FUSED_CPU_AVX2=0 or not for x86-64)");
  TORCH_CHECK(cpu_has_avx2(), "dfm_fused: DFM_FUSED_CPU_TARGET=avx2, but this CPU lacks AVX2/FMA");
  return "avx2";
}

}  // namespace

const char* cpu_target() {
  return resolve(static_cast<Target>(requested.load(std::memory_order_relaxed)), invalid_request());
}

std::string set_cpu_target(const std::string& name) {
  const Target target = parse(name.c_str());
  resolve(target, name);  // raises, as a kernel call would, for a target that cannot run here
  switch (static_cast<Target>(requested.exchange(target, std::memory_order_relaxed))) {
    case kBaseline:
      return "baseline";
    case kAvx2:
      return "avx2";
    case kInvalid:
      return invalid_request();
    default:
      return "";
  }
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
