// Op registration (TORCH_LIBRARY namespace `dfm_fused`, CPU and CUDA kernels: the dispatcher picks
// by device), the pybind11 build report and the test-hook setters. Argument checks: checks.cpp.
//
// Autograd and fake (meta) kernels are registered from Python, next to each op's backend
// (dfm_fused/ops/<op>/extension_backend.py), with torch.library.register_autograd and
// register_fake, so torch.compile traces the ops without graph breaks.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <string>

#include "common.h"

TORCH_LIBRARY(dfm_fused, m) {
  // scalar_decay: Q is orthonormal and D uniform (docs/design.md 'Scalar decay'), so M = diag(D): a per-channel
  // scale instead of a C x C product; grad_Q keeps the general closed form diag(D) Q (A + A^T).
  m.def("exp_decay(Tensor x, Tensor Q, Tensor D, bool scalar_decay=False) -> Tensor");
  m.def(
      "exp_decay_backward(Tensor grad, Tensor x, Tensor Q, Tensor D, bool need_x, bool need_Q, "
      "bool scalar_decay=False) -> (Tensor, Tensor)");
  m.def(
      "state_update(Tensor h, Tensor y, Tensor Q, Tensor D, int groups, float eps, bool scalar_decay=False, "
      "bool keep_M=False) -> (Tensor, Tensor, Tensor, Tensor)");
  // keep_M: also return M = Q^T diag(D) Q (else an empty tensor) for the backward to reuse, one C x C
  // GEMM fewer there; ignored with scalar_decay.
  m.def(
      "state_update_backward(Tensor grad, Tensor y, Tensor Q, Tensor D, Tensor mean, Tensor rstd, int groups, "
      "bool need_y, bool need_Q, bool scalar_decay=False, Tensor? M=None) -> (Tensor, Tensor)");
  m.def("feedback_input(Tensor x, Tensor h, int offset, int fb, int groups, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "feedback_input_backward(Tensor grad, Tensor h, Tensor mean, Tensor rstd, int offset, int fb, int groups) "
      "-> Tensor");
}

#define DFM_FUSED_IMPL(device)                                          \
  m.impl("exp_decay", &dfm_fused::device::exp_decay);                   \
  m.impl("exp_decay_backward", &dfm_fused::device::exp_decay_backward); \
  m.impl("state_update", &dfm_fused::device::state_update);             \
  m.impl("state_update_backward", &dfm_fused::device::state_update_backward); \
  m.impl("feedback_input", &dfm_fused::device::feedback_input);         \
  m.impl("feedback_input_backward", &dfm_fused::device::feedback_input_backward);

TORCH_LIBRARY_IMPL(dfm_fused, CPU, m) { DFM_FUSED_IMPL(cpu) }

#ifdef DFM_FUSED_WITH_CUDA
TORCH_LIBRARY_IMPL(dfm_fused, CUDA, m) { DFM_FUSED_IMPL(cuda) }
#endif

// The build facts are also embedded as a plain string so that a loader which cannot
// import this library (e.g. built against another torch) can still read them from the file.
#define DFM_STR2(x) #x
#define DFM_STR(x) DFM_STR2(x)
extern "C" {
__attribute__((used)) const char dfm_fused_build_marker[] = "DFM_FUSED_TORCH_VERSION=" DFM_STR(DFM_FUSED_TORCH_VERSION) ";";
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", [] {
    pybind11::dict info;
    info["torch_version"] = DFM_STR(DFM_FUSED_TORCH_VERSION);
#ifdef DFM_FUSED_WITH_CUDA
    info["cuda"] = true;
    info["cuda_version"] = DFM_STR(DFM_FUSED_CUDA_VERSION);
    info["cuda_arch_list"] = DFM_STR(DFM_FUSED_CUDA_ARCHS);
#else
    info["cuda"] = false;
    info["cuda_version"] = pybind11::none();
    info["cuda_arch_list"] = pybind11::none();
#endif
    pybind11::list cpu_targets;
    cpu_targets.append("baseline");
#ifdef DFM_FUSED_WITH_AVX2
    cpu_targets.append("avx2");
#endif
    info["cpu_targets"] = cpu_targets;
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["parallel_info"] = at::get_parallel_info();
    return info;
  }, "Facts about this build: torch and CUDA versions it was built against, CUDA archs, CPU targets "
     "built, OpenMP.");
  m.def("cpu_target", [] { return std::string(dfm_fused::cpu::cpu_target()); },
        "The CPU target the next CPU kernel call runs (DFM_FUSED_CPU_TARGET at load or set_cpu_target, "
        "or the best supported).");
  // Test hooks (csrc/test_hooks.cpp, csrc/cpu/target.cpp): the environment is read once, at load.
  m.def("set_cpu_target", &dfm_fused::cpu::set_cpu_target, pybind11::arg("name"),
        "Run CPU kernels built for `name` ('baseline' or 'avx2'; '' for the best supported) from now on; "
        "returns the previous request.");
  m.def("set_poison", &dfm_fused::set_poison, pybind11::arg("enabled"),
        "Fill kernel outputs with NaN before the kernel writes them (DFM_FUSED_POISON=1 at load).");
  m.def("poison_enabled", &dfm_fused::poison_enabled, "Whether kernel outputs are NaN-filled first.");
}
