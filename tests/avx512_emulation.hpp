// tests/avx512_emulation.hpp - the AVX-512 intrinsics of qpkv's kernels on a CPU with AVX2 but
// without AVX-512, for the test binary qpkv_tests_native on such a machine (tests/CMakeLists.txt),
// which defines QPKV_EMULATE_AVX512 so that backend/cpu/simd.hpp compiles the AVX-512 kernels
// (attention, quantizer group ranges, dequantization) as for an AVX-512 + VNNI target and
// includes this file.
//
// SIMDe (Debian's libsimde-dev) provides the intrinsics under their Intel names (its "native
// aliases"): each 512-bit vector is a pair of 256-bit ones, computed with the CPU's AVX2. What
// SIMDe 0.7.4 lacks is defined below, element by element, with the instructions' semantics: masked
// loads read only the selected elements (a row's tail past the end of a buffer is never touched,
// so AddressSanitizer checks what the hardware would fault on), conversions round as the hardware
// does (AVX2's own instructions on each half), reductions add in the order GCC's intrinsic does.
//
// Only the results are emulated, not the speed: time the AVX-512 kernels on an AVX-512 CPU.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

namespace qpkv_avx512_emulation {

template <class T, int N>
struct Lanes {
  T v[N];
};

template <class T, int N, class V>
inline Lanes<T, N> lanes(const V& x) {
  static_assert(sizeof(V) == sizeof(T) * N);
  Lanes<T, N> r;
  std::memcpy(r.v, &x, sizeof(V));
  return r;
}

template <class V, class T, int N>
inline V vec(const Lanes<T, N>& l) {
  static_assert(sizeof(V) == sizeof(T) * N);
  V r;
  std::memcpy(&r, l.v, sizeof(V));
  return r;
}

/// Elements i with bit i of k set from p, the others from src.
template <class V, class T, int N>
inline V mask_load(const V& src, std::uint32_t k, const void* p) {
  Lanes<T, N> r = lanes<T, N>(src);
  const auto* b = static_cast<const unsigned char*>(p);
  for (int i = 0; i < N; ++i)
    if ((k >> i) & 1u) std::memcpy(&r.v[i], b + i * sizeof(T), sizeof(T));
  return vec<V>(r);
}

inline void mask_storeu_ps(void* p, std::uint32_t k, const __m512& a) {
  const Lanes<float, 16> x = lanes<float, 16>(a);
  auto* b = static_cast<unsigned char*>(p);
  for (int i = 0; i < 16; ++i)
    if ((k >> i) & 1u) std::memcpy(b + i * sizeof(float), &x.v[i], sizeof(float));
}

/// A 512-bit vector as its two 256-bit halves, and back.
template <class H, class V>
inline void halves(const V& a, H& lo, H& hi) {
  static_assert(sizeof(V) == 2 * sizeof(H));
  std::memcpy(&lo, &a, sizeof(H));
  std::memcpy(&hi, reinterpret_cast<const unsigned char*>(&a) + sizeof(H), sizeof(H));
}
template <class V, class H>
inline V join(const H& lo, const H& hi) {
  static_assert(sizeof(V) == 2 * sizeof(H));
  V r;
  std::memcpy(&r, &lo, sizeof(H));
  std::memcpy(reinterpret_cast<unsigned char*>(&r) + sizeof(H), &hi, sizeof(H));
  return r;
}

inline __m512 cvtph_ps(const __m256i& a) {
  return join<__m512>(_mm256_cvtph_ps(_mm256_castsi256_si128(a)), _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1)));
}
inline __m512i cvtps_epi32(const __m512& a) {  // the current rounding mode; out of range: 0x80000000
  __m256 lo, hi;
  halves(a, lo, hi);
  return join<__m512i>(_mm256_cvtps_epi32(lo), _mm256_cvtps_epi32(hi));
}
inline __m512 cvtepi32_ps(const __m512i& a) {
  __m256i lo, hi;
  halves(a, lo, hi);
  return join<__m512>(_mm256_cvtepi32_ps(lo), _mm256_cvtepi32_ps(hi));
}
inline __m512i cvtepu8_epi32(const __m128i& a) {
  return join<__m512i>(_mm256_cvtepu8_epi32(a), _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(a, a)));
}
inline __m512i srai_epi32(const __m512i& a, int n) {
  __m256i lo, hi;
  halves(a, lo, hi);
  const __m128i c = _mm_cvtsi32_si128(n);  // counts above 31 fill with the sign, as vpsrad does
  return join<__m512i>(_mm256_sra_epi32(lo, c), _mm256_sra_epi32(hi, c));
}
template <class T, class R, class V>
inline R truncate(const V& a) {  // vpmovd*: the low bits of each of the 16 elements
  const Lanes<std::int32_t, 16> x = lanes<std::int32_t, 16>(a);
  Lanes<T, 16> r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<T>(x.v[i]);
  return vec<R>(r);
}
inline __m512 permute_ps(const __m512& a, int imm) {  // within each 128-bit lane
  const Lanes<float, 16> x = lanes<float, 16>(a);
  Lanes<float, 16> r;
  for (int i = 0; i < 16; ++i) r.v[i] = x.v[(i & ~3) + ((imm >> (2 * (i & 3))) & 3)];
  return vec<__m512>(r);
}
inline __m512 shuffle_f32x4(const __m512& a, const __m512& b, int imm) {  // 128-bit lanes: two of a, two of b
  const Lanes<float, 16> x = lanes<float, 16>(a), y = lanes<float, 16>(b);
  Lanes<float, 16> r;
  for (int l = 0; l < 4; ++l)
    for (int j = 0; j < 4; ++j) r.v[4 * l + j] = (l < 2 ? x : y).v[4 * ((imm >> (2 * l)) & 3) + j];
  return vec<__m512>(r);
}
/// GCC's _mm512_reduce_*_ps, operand order included (which matters to vminps / vmaxps for NaN and
/// signed zeros: they return the second operand unless the first compares below / above it): the
/// 256-bit halves op(high, low), the 128-bit halves op(high, low), then op(lane, lane + 2) and
/// op(lane, lane + 1).
template <class Op>
inline float reduce(const __m512& a, Op op) {
  Lanes<float, 16> x = lanes<float, 16>(a);
  for (int w = 8; w >= 1; w /= 2)
    for (int i = 0; i < w; ++i) x.v[i] = w >= 4 ? op(x.v[i + w], x.v[i]) : op(x.v[i], x.v[i + w]);
  return x.v[0];
}

}  // namespace qpkv_avx512_emulation

// What SIMDe 0.7.4 does not define under GCC (each name was a GCC intrinsic that needs the avx512f
// target; under Clang SIMDe has a few of them, replaced here too, so both compilers test the same code).
#undef _mm512_cvtph_ps
#define _mm512_cvtph_ps(a) qpkv_avx512_emulation::cvtph_ps(a)
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32(a) qpkv_avx512_emulation::cvtps_epi32(a)
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps(a) qpkv_avx512_emulation::cvtepi32_ps(a)
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32(a) qpkv_avx512_emulation::cvtepu8_epi32(a)
#undef _mm512_srai_epi32
#define _mm512_srai_epi32(a, n) qpkv_avx512_emulation::srai_epi32((a), (n))
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16(a) (qpkv_avx512_emulation::truncate<std::int16_t, __m256i>(a))
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8(a) (qpkv_avx512_emulation::truncate<std::int8_t, __m128i>(a))
#undef _mm512_permute_ps
#define _mm512_permute_ps(a, imm) qpkv_avx512_emulation::permute_ps((a), (imm))
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4(a, b, imm) qpkv_avx512_emulation::shuffle_f32x4((a), (b), (imm))
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps(a) qpkv_avx512_emulation::reduce((a), [](float x, float y) { return x + y; })
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps(a) qpkv_avx512_emulation::reduce((a), [](float x, float y) { return x > y ? x : y; })  // vmaxps
#undef _mm512_reduce_min_ps
#define _mm512_reduce_min_ps(a) qpkv_avx512_emulation::reduce((a), [](float x, float y) { return x < y ? x : y; })  // vminps
#undef _mm512_mask_loadu_ps
#define _mm512_mask_loadu_ps(src, k, p) (qpkv_avx512_emulation::mask_load<__m512, float, 16>((src), (k), (p)))
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(k, p) (qpkv_avx512_emulation::mask_load<__m512, float, 16>(_mm512_setzero_ps(), (k), (p)))
#undef _mm512_maskz_loadu_epi32
#define _mm512_maskz_loadu_epi32(k, p) \
  (qpkv_avx512_emulation::mask_load<__m512i, std::int32_t, 16>(_mm512_setzero_si512(), (k), (p)))
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16(k, p) \
  (qpkv_avx512_emulation::mask_load<__m256i, std::int16_t, 16>(_mm256_setzero_si256(), (k), (p)))
#undef _mm_maskz_loadu_epi8
#define _mm_maskz_loadu_epi8(k, p) (qpkv_avx512_emulation::mask_load<__m128i, std::int8_t, 16>(_mm_setzero_si128(), (k), (p)))
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, k, a) qpkv_avx512_emulation::mask_storeu_ps((p), (k), (a))
