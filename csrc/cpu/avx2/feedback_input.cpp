// The feedback_input CPU kernels built for AVX2 + FMA (8-wide resize, GroupNorm and softmax
// loops): about 1.8x the baseline build on an AVX2 machine (the kernels alone). Chosen at run time by
// csrc/cpu/target.cpp when the CPU has both extensions.
#define DFM_FUSED_TARGET_AVX2
#include "../feedback_input.cpp"
