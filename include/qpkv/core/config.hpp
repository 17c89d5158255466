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

#define QPKV_STRINGIFY(x) #x

/// Put before a kernel loop whose trip count is a compile-time constant (query tiles NQ, code
/// vectors per slice, 16-token halves H, ...): the loop is unrolled completely at every
/// optimisation level. The kernels keep their accumulators in arrays of vectors indexed by such
/// loops; only complete unrolling turns those arrays into registers. GCC does that at -O3 but not
/// at -O2 (nor RelWithDebInfo's -O2 -g), where the arrays stayed on the stack, a load and a store
/// around every FMA, and the AVX2 kernels ran 1.5-3x slower (docs/performance.md, fourteenth
/// session). Clang reads the same pragma; nvcc's front end does not know it (empty there: its
/// translation units use the CPU kernels only as references in tests).
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
#define QPKV_UNROLL _Pragma("GCC unroll 32")
#else
#define QPKV_UNROLL
#endif

/// Put before a loop written for the auto-vectoriser (independent iterations, branch-free
/// bodies): `#pragma omp simd` makes GCC vectorise it at -O2 too, where GCC 12's default cost
/// model ("very cheap") leaves most such loops scalar (the portable kernels ran 5-7x slower, the
/// quantizer's parameters 4x). Honoured under -fopenmp or -fopenmp-simd (the qpkv CMake target
/// adds the latter where it does not link OpenMP); elsewhere, and with Clang (whose -O2
/// vectorises these loops, and which warns where a requested vectorisation fails), it is empty.
#if defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && (defined(_OPENMP) || defined(QPKV_OPENMP_SIMD))
#define QPKV_SIMD _Pragma("omp simd")
#define QPKV_SIMD_REDUCE_OR(x) _Pragma(QPKV_STRINGIFY(omp simd reduction(| : x)))
#else
#define QPKV_SIMD
#define QPKV_SIMD_REDUCE_OR(x)
#endif
