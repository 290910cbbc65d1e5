// Included last (after every other header) by a CPU kernel file that is compiled once per CPU
// target: csrc/cpu/<op>.cpp gives the baseline x86-64 object, csrc/cpu/avx2/<op>.cpp defines
// DFM_FUSED_TARGET_AVX2 and includes it again for AVX2 + FMA. Code after this header is built
// for that target and goes in namespace dfm_fused::cpu::DFM_FUSED_TARGET_NS, so the two
// objects share no symbol. Headers stay before it: their inline functions and templates are
// baseline code in both objects, so the linker can merge them safely.
#pragma once

#if defined(DFM_FUSED_TARGET_AVX2)
#if !defined(__GNUC__) || defined(__clang__)
#error "the AVX2 kernels need GCC's target pragma; build with DFM_FUSED_CPU_AVX2=0 on this compiler"
#endif
#pragma GCC target("avx2,fma")
#define DFM_FUSED_TARGET_NS avx2
#else
#define DFM_FUSED_TARGET_NS baseline
#endif
