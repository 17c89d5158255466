// qpkv/core/config.hpp - portability macros shared by the CPU and CUDA paths.
#pragma once

// Per-element numeric rules (quantize, dequantize, pack) are written once as
// QPKV_HD inline functions and compiled by both g++ and nvcc (STYLE.md: no
// copy-paste between CPU and CUDA paths).
#if defined(__CUDACC__)
#define QPKV_HD __host__ __device__ inline
#else
#define QPKV_HD inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define QPKV_RESTRICT __restrict__
#else
#define QPKV_RESTRICT
#endif
