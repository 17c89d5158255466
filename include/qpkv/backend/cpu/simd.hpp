// qpkv/backend/cpu/simd.hpp - which SIMD kernels this translation unit compiles, and how they are
// chosen.
//
//  - Built with AVX-512 enabled (-march=native on an AVX-512 machine, or -mavx512f -mavx512bw
//    -mavx512vl -mavx512dq -mf16c -mfma [-mavx512vnni]): the AVX-512 kernels are compiled for the
//    target and always used (QPKV_CPU_AVX512).
//  - Otherwise, with GCC or Clang on x86-64: the same kernels are compiled with a target attribute
//    (AVX-512 F/BW/VL/DQ + VNNI, F16C, FMA) and attend() uses them when the CPU it runs on has those
//    features, checked once at run time (QPKV_CPU_DISPATCH); elsewhere it runs the portable C++
//    kernels, which the compiler vectorizes for the build's target (SSE2, AVX2, NEON ...).
//  - Define QPKV_NO_SIMD to force the portable kernels, QPKV_NO_DISPATCH to compile only what the
//    build targets (no run-time check).
// Every kernel gives the same results up to float rounding (tests compare them with float64).
#pragma once

#if !defined(QPKV_NO_SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__F16C__) && defined(__FMA__)
#define QPKV_CPU_AVX512 1
#define QPKV_CPU_AVX512_KERNELS 1
#if defined(__AVX512VNNI__)
#define QPKV_CPU_AVX512VNNI 1
#endif
#elif !defined(QPKV_NO_SIMD) && !defined(QPKV_NO_DISPATCH) && defined(__x86_64__) && !defined(__CUDACC__) && \
    (defined(__clang__) ? __clang_major__ >= 14 : (defined(__GNUC__) && __GNUC__ >= 11))
#define QPKV_CPU_DISPATCH 1
#define QPKV_CPU_AVX512_KERNELS 1
#define QPKV_CPU_AVX512VNNI 1
#endif

#if defined(QPKV_CPU_AVX512_KERNELS)
#include <immintrin.h>
#endif

/// The target attribute of every AVX-512 kernel function (empty when the build targets AVX-512).
#if defined(QPKV_CPU_DISPATCH)
#define QPKV_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#else
#define QPKV_TARGET
#endif

/// Forces inlining of small SIMD helpers whose arguments are register arrays: out of line, GCC
/// passes them through memory (a 16-register transpose became 32 stores and loads plus a call).
#if defined(__GNUC__) || defined(__clang__)
#define QPKV_INLINE inline __attribute__((always_inline)) QPKV_TARGET
#else
#define QPKV_INLINE inline
#endif

namespace qpkv::cpu {

/// Can this process run the AVX-512 kernels? (Always, when the build targets AVX-512; with
/// run-time dispatch, when the CPU has every feature of QPKV_TARGET.)
inline bool avx512_usable() {
#if defined(QPKV_CPU_DISPATCH)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
  }();
  return ok;
#elif defined(QPKV_CPU_AVX512_KERNELS)
  return true;
#else
  return false;
#endif
}

/// The kernel family attend() runs for KIVI and fp16 caches in this process: "avx512-vnni",
/// "avx512" (compiled for the target), "avx512-vnni (dispatch)" (chosen at run time) or
/// "portable".
inline const char* simd_name() {
#if defined(QPKV_CPU_DISPATCH)
  return avx512_usable() ? "avx512-vnni (dispatch)" : "portable";
#elif defined(QPKV_CPU_AVX512VNNI)
  return "avx512-vnni";
#elif defined(QPKV_CPU_AVX512)
  return "avx512";
#else
  return "portable";
#endif
}

}  // namespace qpkv::cpu
