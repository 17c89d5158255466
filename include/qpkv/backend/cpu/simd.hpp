// qpkv/backend/cpu/simd.hpp - which SIMD kernels this translation unit compiles, from the
// compiler's target macros (-march=native, -mavx512f ...). Nothing is detected at run time: a
// build without -march gets the portable C++ kernels, which give the same results up to float
// rounding. Define QPKV_NO_SIMD to force the portable kernels (tests compare the two).
#pragma once

#if !defined(QPKV_NO_SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__F16C__) && defined(__FMA__)
#define QPKV_CPU_AVX512 1
#if defined(__AVX512VNNI__)
#define QPKV_CPU_AVX512VNNI 1
#endif
#endif

#if defined(QPKV_CPU_AVX512)
#include <immintrin.h>
#endif

/// Forces inlining of small SIMD helpers whose arguments are register arrays: out of line, GCC
/// passes them through memory (a 16-register transpose became 32 stores and loads plus a call).
#if defined(__GNUC__) || defined(__clang__)
#define QPKV_INLINE inline __attribute__((always_inline))
#else
#define QPKV_INLINE inline
#endif

namespace qpkv::cpu {

/// The widest kernel family compiled into this translation unit ("avx512-vnni", "avx512", "scalar").
constexpr const char* simd_name() {
#if defined(QPKV_CPU_AVX512VNNI)
  return "avx512-vnni";
#elif defined(QPKV_CPU_AVX512)
  return "avx512";
#else
  return "scalar";
#endif
}

}  // namespace qpkv::cpu
