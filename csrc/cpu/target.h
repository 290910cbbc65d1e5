// Included last (after every other header) by a CPU kernel source that is compiled once per CPU
// target. setup.py compiles such a source twice: as is (the baseline x86-64 object) and again with
// -DDFM_FUSED_TARGET_AVX2 (AVX2 + FMA). Code after this header is built for that target and goes
// in namespace dfm_fused::cpu::DFM_FUSED_TARGET_NS, so the two objects share no symbol.
//
// The target is set by a pragma here rather than by -mavx2 -mfma on the command line: headers
// stay before it, so their inline functions and templates (ATen, the standard library) are
// baseline code in both objects and the linker can merge them safely; compiled with -mavx2, the
// linker could keep an AVX2 copy of one of them for the whole library, which would fault on a CPU
// without AVX2.
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
