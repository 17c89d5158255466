// qpkv/quant/affine_fast.hpp - the fast paths of Affine<Bits>::encode (min-max zero point, no
// outliers: KIVI) and Affine<Bits>::decode (AVX-512 or AVX2, at the end of the file). Encode: the same
// bytes as the generic path in affine_quantizer.hpp, computed with allocation-free loops over
// fixed-size stack buffers that the compiler vectorises:
//  - group ranges: Axis::channel takes a running min/max per channel down the group's rows, in row
//    order, exactly as the generic path; Axis::token reduces each group with 8 partial lanes (one
//    AVX-512 min/max per 16 elements when compiled in and the group is a multiple of 16) and
//    then restores the generic path's sign of zero (a sequential `x < a ? x : a` keeps the FIRST
//    element equal to the minimum; only +0/-0 can be equal yet differ in bits);
//  - parameters: minmax_params<ScaleT> rewritten branch-free (same bit operations as to_half /
//    round_down / round_up in dtype.hpp and affine.hpp, as selects) over whole arrays;
//  - codes: true division, the clamp, then round-half-even by adding 2^23 (for v in [0, 255] the
//    float add rounds exactly as nearbyint does, and the integer is the low mantissa bits);
//  - packing: pack.hpp per row; the AVX2 paths (builds without AVX-512) pack 32 codes in registers
//    (store_packed32) straight into the row, and values take one fused pass per batch
//    (encode_part_token_avx2).
// Parts are independent, so they run under OpenMP when the call is large; every byte of a part
// is computed by one thread with the same code, so the result does not depend on the thread count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "qpkv/backend/cpu/simd.hpp"
#include "qpkv/core/config.hpp"
#include "qpkv/core/dtype.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/quant/affine.hpp"
#include "qpkv/quant/pack.hpp"

namespace qpkv::quant::fast {

/// How far ahead of the range pass the AVX2 encoders prefetch their input (floats).
inline constexpr index_t prefetch_floats = 1024;
/// Largest head_dim (Axis::token: groups per batch) the stack buffers hold; larger goes generic.
inline constexpr index_t max_dim = 1024;
/// Calls with fewer input elements than this stay on the calling thread.
inline constexpr index_t parallel_elements = index_t{1} << 16;

// ---- branch-free 16-bit conversions, bit-identical to dtype.hpp's for every input ----
// Selects are bit masks, not `?:`: GCC will not if-convert a conditional float operation (it may
// trap), and it sinks an operand's computation into the arm that uses it.

/// c ? a : b without a branch.
inline std::uint32_t sel(bool c, std::uint32_t a, std::uint32_t b) {
  const std::uint32_t m = 0u - static_cast<std::uint32_t>(c);
  return (a & m) | (b & ~m);
}

inline std::uint32_t half_bits(float f) {  // to_half(f).bits
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7fffffffu;
  const std::uint32_t nan_inf = 0x7c00u | sel(abs > 0x7f800000u, 0x200u, 0u);
  const std::uint32_t sub = float_bits(bits_float(abs) + 0.5f) - 0x3f000000u;
  const std::uint32_t norm = (abs + 0xc8000fffu + ((abs >> 13) & 1u)) >> 13;
  std::uint32_t h = sel(abs < 0x38800000u, sub, norm);
  h = sel(abs >= 0x477ff000u, 0x7c00u, h);
  h = sel(abs >= 0x7f800000u, nan_inf, h);
  return (sign | h) & 0xffffu;
}
inline float half_value(std::uint32_t h) {  // to_float(half{h})
  const std::uint32_t sign = (h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  const std::uint32_t mant = h & 0x3ffu;
  const std::uint32_t inf = sign | 0x7f800000u | (mant << 13);
  const std::uint32_t sub = sign | float_bits(static_cast<float>(static_cast<std::int32_t>(mant)) * bits_float(0x33800000u));
  const std::uint32_t norm = sign | ((exp + 112u) << 23) | (mant << 13);
  std::uint32_t r = sel(exp == 0u, sub, norm);
  r = sel(exp == 0x1fu, inf, r);
  return bits_float(r);
}
inline std::uint32_t bf16_bits(float f) {  // to_bfloat16(f).bits
  const std::uint32_t x = float_bits(f);
  const std::uint32_t nan = (x >> 16) | 0x40u;
  const std::uint32_t r = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  return sel((x & 0x7fffffffu) > 0x7f800000u, nan, r) & 0xffffu;
}
inline float bf16_value(std::uint32_t b) { return bits_float(b << 16); }

template <class T>
inline std::uint32_t storage_bits(float f) {
  if constexpr (std::is_same_v<T, half>) return half_bits(f);
  else return bf16_bits(f);
}
template <class T>
inline float storage_value(std::uint32_t b) {
  if constexpr (std::is_same_v<T, half>) return half_value(b);
  else return bf16_value(b);
}

/// minmax_params<ScaleT>(lo[i], hi[i], maxc) for i < n: float values to mn/sc, stored values to
/// smn/ssc. Returns false when any is not finite (the caller then takes the generic path, which
/// throws the generic error).
template <class ScaleT>
QPKV_ALWAYS_INLINE bool params_body(const float* QPKV_RESTRICT lo, const float* QPKV_RESTRICT hi, index_t n,
                                    std::uint32_t maxc, float* QPKV_RESTRICT mn, float* QPKV_RESTRICT sc,
                                    ScaleT* QPKV_RESTRICT smn, ScaleT* QPKV_RESTRICT ssc) {
  const float fmaxc = static_cast<float>(maxc);
  std::uint32_t bad = 0;
  if constexpr (std::is_same_v<ScaleT, float>) {
    QPKV_SIMD_REDUCE_OR(bad)
    for (index_t i = 0; i < n; ++i) {
      const float m = lo[i], s = (hi[i] - lo[i]) / fmaxc;
      mn[i] = m;
      sc[i] = s;
      smn[i] = m;
      ssc[i] = s;
      bad |= static_cast<std::uint32_t>((float_bits(m) & 0x7f800000u) == 0x7f800000u) |
             static_cast<std::uint32_t>((float_bits(s) & 0x7f800000u) == 0x7f800000u);
    }
  } else {
    QPKV_SIMD_REDUCE_OR(bad)
    for (index_t i = 0; i < n; ++i) {
      // round_down<ScaleT>(lo)
      const float l = lo[i];
      std::uint32_t t = storage_bits<ScaleT>(l);
      const std::uint32_t down = sel(t == 0u, 0x8001u, sel((t & 0x8000u) != 0u, t + 1u, t - 1u));
      t = sel(storage_value<ScaleT>(t) > l, down & 0xffffu, t);
      const float m = storage_value<ScaleT>(t);
      // round_up<ScaleT>(range / maxc) when range > 0
      const float range = hi[i] - m;
      const float q = range / fmaxc;
      std::uint32_t u = storage_bits<ScaleT>(q);
      const std::uint32_t up = sel(u == 0x8000u, 0x0001u, sel((u & 0x8000u) != 0u, u - 1u, u + 1u));
      u = sel(storage_value<ScaleT>(u) < q, up & 0xffffu, u);
      u = sel(range > 0.0f, u, 0u);
      const float s = storage_value<ScaleT>(u);
      mn[i] = m;
      sc[i] = s;
      smn[i].bits = static_cast<std::uint16_t>(t);
      ssc[i].bits = static_cast<std::uint16_t>(u);
      bad |= static_cast<std::uint32_t>((float_bits(m) & 0x7f800000u) == 0x7f800000u) |
             static_cast<std::uint32_t>((float_bits(s) & 0x7f800000u) == 0x7f800000u);
    }
  }
  return bad == 0;
}

#if defined(QPKV_CPU_AVX2_DISPATCH)
/// params_body compiled for AVX2 as well, where the build's target lacks it: GCC vectorizes its
/// branch-free loop 8 groups at a time there (integer and float selects, no FMA pattern in it).
template <class ScaleT>
QPKV_TARGET_AVX2 bool params_avx2(const float* QPKV_RESTRICT lo, const float* QPKV_RESTRICT hi, index_t n,
                                  std::uint32_t maxc, float* QPKV_RESTRICT mn, float* QPKV_RESTRICT sc,
                                  ScaleT* QPKV_RESTRICT smn, ScaleT* QPKV_RESTRICT ssc) {
  return params_body<ScaleT>(lo, hi, n, maxc, mn, sc, smn, ssc);
}
#endif

template <class ScaleT>
inline bool params(const float* QPKV_RESTRICT lo, const float* QPKV_RESTRICT hi, index_t n, std::uint32_t maxc,
                   float* QPKV_RESTRICT mn, float* QPKV_RESTRICT sc, ScaleT* QPKV_RESTRICT smn,
                   ScaleT* QPKV_RESTRICT ssc) {
#if defined(QPKV_CPU_AVX2_DISPATCH)
  if (cpu::avx2_kernels_usable()) return params_avx2<ScaleT>(lo, hi, n, maxc, mn, sc, smn, ssc);
#endif
  return params_body<ScaleT>(lo, hi, n, maxc, mn, sc, smn, ssc);
}

/// quant::encode(x, min, scale, maxc) with round-half-even through the 2^23 add; v is clamped to
/// [0, maxc] first (NaN -> 0), so the add is exact rounding.
inline std::uint32_t code_of(float x, float m, float s, float fmaxc) {
  float v = (x - m) / s;
  v = v > 0.0f ? v : 0.0f;
  v = v < fmaxc ? v : fmaxc;
  const std::uint32_t c = float_bits(v + 8388608.0f) - 0x4b000000u;
  return s > 0.0f ? c : 0u;
}

#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
QPKV_INTRINSICS_WARNINGS_OFF  // simd.hpp
/// code_of() of 8 elements with AVX2: the same operations in the same order (division, max(v, 0)
/// and min(v, maxc) as x86 defines them, `a > b ? a : b`, so NaN -> 0 as in code_of; rounding to
/// the nearest integer, ties to even, as the 2^23 add and quant::encode's nearbyint do under the
/// default rounding mode), as dwords. Masked: the s > 0 select (a zero scale gives code 0), which
/// a caller that knows s > 0 for all lanes leaves out.
template <bool Masked = true>
QPKV_INLINE_AVX2 __m256i codes8_avx2(__m256 x, __m256 m, __m256 s, __m256 vmax) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 v = _mm256_div_ps(_mm256_sub_ps(x, m), s);
  v = _mm256_min_ps(_mm256_max_ps(v, zero), vmax);
  const __m256i code = _mm256_cvtps_epi32(v);
  if constexpr (!Masked) return code;
  else return _mm256_and_si256(code, _mm256_castps_si256(_mm256_cmp_ps(s, zero, _CMP_GT_OQ)));
}

/// 32 codes (dwords, element order in c[0..3]) as 32 bytes in element order.
QPKV_INLINE_AVX2 __m256i code_bytes32(const __m256i* c) {
  // the two packs interleave 128-bit lanes, the permutation restores the order
  const __m256i b = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/// 32 codes (c[0..3] as in code_bytes32) packed as pack.hpp packs them: 4 * Bits bytes at dst.
template <int Bits>
QPKV_INLINE_AVX2 void store_packed32(const __m256i* c, std::uint8_t* QPKV_RESTRICT dst) {
  const __m256i b = code_bytes32(c);
  if constexpr (Bits == 8) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), b);
  } else if constexpr (Bits == 4) {  // word i = b[2i] + 16 b[2i+1], then its low byte
    const __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x1001));
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(p));
  } else {  // Bits == 2: word i = b[2i] + 4 b[2i+1], dword j = w[2j] + 16 w[2j+1], its low byte
    static_assert(Bits == 2, "store_packed32: Bits must be 2, 4 or 8");
    const __m256i w = _mm256_maddubs_epi16(b, _mm256_set1_epi16(0x0401));
    const __m256i d = _mm256_madd_epi16(w, _mm256_set1_epi32(0x00100001));
    const __m256i lo = _mm256_shuffle_epi8(d, _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                               0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
    const __m256i p = _mm256_permutevar8x32_epi32(lo, _mm256_setr_epi32(0, 4, 1, 1, 1, 1, 1, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm256_castsi256_si128(p));
  }
}

/// codes8_avx2() of the 32 elements at x (c[0..3], element order): parameters per element (mn,
/// sc; PerElement) or one (m1, s1) for all; mn and sc are not read without PerElement.
template <bool PerElement>
QPKV_INLINE_AVX2 void codes32_avx2(const float* QPKV_RESTRICT x, const float* QPKV_RESTRICT mn,
                                   const float* QPKV_RESTRICT sc, float m1, float s1, __m256 vmax, __m256i* c) {
  QPKV_UNROLL
  for (int k = 0; k < 4; ++k) {
    const __m256 m = PerElement ? _mm256_loadu_ps(mn + 8 * k) : _mm256_set1_ps(m1);
    const __m256 s = PerElement ? _mm256_loadu_ps(sc + 8 * k) : _mm256_set1_ps(s1);
    c[k] = codes8_avx2(_mm256_loadu_ps(x + 8 * k), m, s, vmax);
  }
}

/// code_of() for 32 elements at a time with AVX2 (builds that do not target AVX-512: there GCC
/// turned the scalar loop's selects into branches and compare-and-jump, about 2 GB/s per thread).
/// PerElement: parameters per element (mn, sc), else one (m1, s1) for all.
template <bool PerElement>
QPKV_TARGET_AVX2 void codes_avx2(const float* QPKV_RESTRICT x, const float* QPKV_RESTRICT mn,
                                 const float* QPKV_RESTRICT sc, float m1, float s1, index_t n, float fmaxc,
                                 std::uint8_t* QPKV_RESTRICT out) {
  const __m256 vmax = _mm256_set1_ps(fmaxc);
  index_t i = 0;
  for (; i + 32 <= n; i += 32) {
    __m256i c[4];
    codes32_avx2<PerElement>(x + i, PerElement ? mn + i : mn, PerElement ? sc + i : sc, m1, s1, vmax, c);  // (mn, sc null otherwise)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), code_bytes32(c));
  }
  for (; i < n; ++i)
    out[i] = static_cast<std::uint8_t>(PerElement ? code_of(x[i], mn[i], sc[i], fmaxc) : code_of(x[i], m1, s1, fmaxc));
}

/// Codes of one row (n a multiple of 32) with per-element parameters, packed straight into dst
/// (pack_row's bytes, without the byte buffer between).
template <int Bits>
QPKV_TARGET_AVX2 void codes_packed_avx2(const float* QPKV_RESTRICT x, const float* QPKV_RESTRICT mn,
                                        const float* QPKV_RESTRICT sc, index_t n, float fmaxc,
                                        std::uint8_t* QPKV_RESTRICT dst) {
  const __m256 vmax = _mm256_set1_ps(fmaxc);
  for (index_t i = 0; i < n; i += 32) {
    __m256i c[4];
    codes32_avx2<true>(x + i, mn + i, sc + i, 0.0f, 0.0f, vmax, c);
    store_packed32<Bits>(c, dst + i / 8 * Bits);
  }
}
QPKV_INTRINSICS_WARNINGS_ON
#endif

/// Codes of n elements with per-element parameters.
inline void codes_vec(const float* QPKV_RESTRICT x, const float* QPKV_RESTRICT mn, const float* QPKV_RESTRICT sc,
                      index_t n, float fmaxc, std::uint8_t* QPKV_RESTRICT out) {
#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
  if (cpu::avx2_kernels_usable()) {
    codes_avx2<true>(x, mn, sc, 0.0f, 0.0f, n, fmaxc, out);
    return;
  }
#endif
  QPKV_SIMD
  for (index_t i = 0; i < n; ++i) out[i] = static_cast<std::uint8_t>(code_of(x[i], mn[i], sc[i], fmaxc));
}
/// Codes of n elements sharing one (min, scale).
inline void codes_one(const float* QPKV_RESTRICT x, float m, float s, index_t n, float fmaxc,
                      std::uint8_t* QPKV_RESTRICT out) {
  if (!(s > 0.0f)) {
    std::memset(out, 0, static_cast<std::size_t>(n));
    return;
  }
#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
  if (cpu::avx2_kernels_usable()) {
    codes_avx2<false>(x, nullptr, nullptr, m, s, n, fmaxc, out);
    return;
  }
#endif
  QPKV_SIMD
  for (index_t i = 0; i < n; ++i) out[i] = static_cast<std::uint8_t>(code_of(x[i], m, s, fmaxc));
}

/// Writes row bytes of packed codes.
template <int Bits>
inline void pack_row(const std::uint8_t* QPKV_RESTRICT codes, index_t n, std::uint8_t* QPKV_RESTRICT dst) {
  if constexpr (Bits == 8) std::memcpy(dst, codes, static_cast<std::size_t>(n));
  else pack<Bits>(codes, static_cast<std::size_t>(n), dst);
}

#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
/// range_of's vector loop with AVX2 (n a multiple of 8): min_ps(v, lo) is `v < lo ? v : lo` (a
/// NaN v keeps lo), max_ps(v, hi) likewise; the reduction order matters only for +0/-0, which
/// range_of settles afterwards.
QPKV_TARGET_AVX2 inline void range8_avx2(const float* QPKV_RESTRICT x, index_t n, float& a, float& b) {
  __m256 vlo = _mm256_set1_ps(std::numeric_limits<float>::infinity()), vhi = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  for (index_t i = 0; i < n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    vlo = _mm256_min_ps(v, vlo);
    vhi = _mm256_max_ps(v, vhi);
  }
  __m128 lo = _mm_min_ps(_mm256_castps256_ps128(vlo), _mm256_extractf128_ps(vlo, 1));
  __m128 hi = _mm_max_ps(_mm256_castps256_ps128(vhi), _mm256_extractf128_ps(vhi, 1));
  lo = _mm_min_ps(lo, _mm_movehl_ps(lo, lo));
  hi = _mm_max_ps(hi, _mm_movehl_ps(hi, hi));
  a = _mm_cvtss_f32(_mm_min_ss(lo, _mm_movehdup_ps(lo)));
  b = _mm_cvtss_f32(_mm_max_ss(hi, _mm_movehdup_ps(hi)));
}
#endif

/// Min and max of x[0..n) as the generic path's sequential `std::min`/`std::max` loop gives them
/// (NaN ignored; of equal values the first one, which matters only for +0/-0); an empty or all-NaN
/// range gives (0, 0).
inline void range_of(const float* QPKV_RESTRICT x, index_t n, float& lo_out, float& hi_out) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  float a, b;
#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
  if (n % 8 == 0 && cpu::avx2_kernels_usable()) {
    range8_avx2(x, n, a, b);
  } else
#endif
#if defined(QPKV_CPU_AVX512)
  if (n % 16 == 0) {  // min_ps(v, lo) is `v < lo ? v : lo` (a NaN v keeps lo), max_ps(v, hi) likewise
    __m512 vlo = _mm512_set1_ps(inf), vhi = _mm512_set1_ps(-inf);
    for (index_t i = 0; i < n; i += 16) {
      const __m512 v = _mm512_loadu_ps(x + i);
      vlo = _mm512_min_ps(v, vlo);
      vhi = _mm512_max_ps(v, vhi);
    }
    a = _mm512_reduce_min_ps(vlo);
    b = _mm512_reduce_max_ps(vhi);
  } else
#endif
  {
    float lo[8] = {inf, inf, inf, inf, inf, inf, inf, inf};
    float hi[8] = {-inf, -inf, -inf, -inf, -inf, -inf, -inf, -inf};
    index_t i = 0;
    for (; i + 8 <= n; i += 8)
      QPKV_UNROLL
      for (int j = 0; j < 8; ++j) {
        const float v = x[i + j];
        lo[j] = v < lo[j] ? v : lo[j];
        hi[j] = hi[j] < v ? v : hi[j];
      }
    for (; i < n; ++i) {
      const float v = x[i];
      lo[0] = v < lo[0] ? v : lo[0];
      hi[0] = hi[0] < v ? v : hi[0];
    }
    QPKV_UNROLL
    for (int w = 4; w > 0; w /= 2)  // tree over the lanes (the order only matters for +0/-0)
      QPKV_UNROLL
      for (int j = 0; j < w; ++j) {
        lo[j] = lo[j + w] < lo[j] ? lo[j + w] : lo[j];
        hi[j] = hi[j] < hi[j + w] ? hi[j + w] : hi[j];
      }
    a = lo[0];
    b = hi[0];
  }
  // sign of zero: the sequential loop keeps the first element equal to the extreme
  if (a == 0.0f)
    for (index_t k = 0; k < n; ++k)
      if (x[k] == 0.0f) { a = x[k]; break; }
  if (b == 0.0f)
    for (index_t k = 0; k < n; ++k)
      if (x[k] == 0.0f) { b = x[k]; break; }
  if (a > b) a = b = 0.0f;
  lo_out = a;
  hi_out = b;
}

#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
/// The per-channel running min / max down a group's rows (dim a multiple of 8), in blocks of 32
/// channels held in registers: min_ps(v, lo) is `v < lo ? v : lo` and max_ps(v, hi) is
/// `hi < v ? v : hi`, the scalar loop's selects, element for element and in row order.
QPKV_TARGET_AVX2 inline void channel_range_avx2(const float* QPKV_RESTRICT xg, index_t group, index_t dim,
                                                float* QPKV_RESTRICT lo, float* QPKV_RESTRICT hi) {
  for (index_t c0 = 0; c0 < dim; c0 += 32) {
    const index_t nv = std::min<index_t>(4, (dim - c0) / 8);
    __m256 l[4], h[4];
    QPKV_UNROLL
    for (int k = 0; k < 4; ++k) {
      l[k] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
      h[k] = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    }
    for (index_t t = 0; t < group; ++t) {
      const float* r = xg + t * dim + c0;
      for (index_t k = 0; k < nv; ++k) {
        const __m256 v = _mm256_loadu_ps(r + 8 * k);
        l[k] = _mm256_min_ps(v, l[k]);
        h[k] = _mm256_max_ps(v, h[k]);
      }
    }
    for (index_t k = 0; k < nv; ++k) {
      _mm256_storeu_ps(lo + c0 + 8 * k, l[k]);
      _mm256_storeu_ps(hi + c0 + 8 * k, h[k]);
    }
  }
}
#endif

/// One part along Axis::channel (tokens a multiple of group, dim <= max_dim). Returns false if a
/// group's parameters are not storable.
template <int Bits, class ScaleT>
bool encode_part_channel(const float* QPKV_RESTRICT x, index_t tokens, index_t dim, index_t group,
                         std::uint8_t* QPKV_RESTRICT part, std::size_t codes_off, std::size_t row_bytes) {
  constexpr float inf = std::numeric_limits<float>::infinity();
  const float fmaxc = static_cast<float>(max_code(Bits));
  const std::size_t P = static_cast<std::size_t>((tokens / group) * dim);
  auto* ssc = reinterpret_cast<ScaleT*>(part);
  auto* smn = reinterpret_cast<ScaleT*>(part + P * sizeof(ScaleT));
  alignas(64) float lo[max_dim], hi[max_dim], mn[max_dim], sc[max_dim];
  alignas(64) std::uint8_t codes[max_dim];
  for (index_t gt = 0; gt < tokens / group; ++gt) {
    const float* xg = x + gt * group * dim;
#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
    if (dim % 8 == 0 && cpu::avx2_kernels_usable()) {
      channel_range_avx2(xg, group, dim, lo, hi);
    } else
#endif
    {
      QPKV_SIMD
      for (index_t c = 0; c < dim; ++c) {
        lo[c] = inf;
        hi[c] = -inf;
      }
      for (index_t t = 0; t < group; ++t) {
        const float* QPKV_RESTRICT r = xg + t * dim;
        QPKV_SIMD
        for (index_t c = 0; c < dim; ++c) {
          const float v = r[c];
          lo[c] = v < lo[c] ? v : lo[c];
          hi[c] = hi[c] < v ? v : hi[c];
        }
      }
    }
    QPKV_SIMD
    for (index_t c = 0; c < dim; ++c) {
      const bool empty = lo[c] > hi[c];
      lo[c] = empty ? 0.0f : lo[c];
      hi[c] = empty ? 0.0f : hi[c];
    }
    if (!params<ScaleT>(lo, hi, dim, max_code(Bits), mn, sc, smn + gt * dim, ssc + gt * dim)) return false;
    for (index_t t = 0; t < group; ++t) {
      std::uint8_t* row = part + codes_off + static_cast<std::size_t>(gt * group + t) * row_bytes;
#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
      if constexpr (Bits == 2 || Bits == 4 || Bits == 8)
        if (dim % 32 == 0 && cpu::avx2_kernels_usable()) {
          // row t of the next group (of this part, or the next part's first) on its way meanwhile
          for (index_t c = 0; c < dim; c += 16)
            _mm_prefetch(reinterpret_cast<const char*>(xg + (group + t) * dim + c), _MM_HINT_T0);
          codes_packed_avx2<Bits>(xg + t * dim, mn, sc, dim, fmaxc, row);
          continue;
        }
#endif
      codes_vec(xg + t * dim, mn, sc, dim, fmaxc, codes);
      pack_row<Bits>(codes, dim, row);
    }
  }
  return true;
}

#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
QPKV_INTRINSICS_WARNINGS_OFF  // simd.hpp
template <bool Max>
QPKV_INLINE_AVX2 __m256 minmax8(__m256 a, __m256 b) {
  return Max ? _mm256_max_ps(a, b) : _mm256_min_ps(a, b);
}

/// Lane j = the min (Max: max) of the 8 lanes of v[j]. The vectors hold no NaN (running min_ps /
/// max_ps from +-inf skip NaN elements), so only the sign of a zero can depend on the order.
template <bool Max>
QPKV_INLINE_AVX2 __m256 reduce8(const __m256* v) {
  __m256 t[4];  // per 128-bit half: [v[2k] 0|2, v[2k+1] 0|2, v[2k] 1|3, v[2k+1] 1|3]
  QPKV_UNROLL
  for (int k = 0; k < 4; ++k)
    t[k] = minmax8<Max>(_mm256_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm256_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  // per 128-bit half: the four vectors' reductions over that half
  const __m256 u0 = minmax8<Max>(_mm256_shuffle_ps(t[0], t[1], 0x44), _mm256_shuffle_ps(t[0], t[1], 0xee));
  const __m256 u1 = minmax8<Max>(_mm256_shuffle_ps(t[2], t[3], 0x44), _mm256_shuffle_ps(t[2], t[3], 0xee));
  return minmax8<Max>(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/// encode_part_token with AVX2 where every group is whole and a multiple of 32 elements (KIVI's
/// value groups): one vector pass for the ranges (8 groups reduced together; a group whose min or
/// max is zero, or that holds only NaN, is redone by range_of, which settles the sign of zero as
/// the sequential loop does), params over the batch, then codes packed straight into the rows.
template <int Bits, class ScaleT>
QPKV_TARGET_AVX2 bool encode_part_token_avx2(const float* QPKV_RESTRICT x, index_t tokens, index_t dim, index_t group,
                                             std::uint8_t* QPKV_RESTRICT part, std::size_t codes_off,
                                             std::size_t row_bytes) {
  const float fmaxc = static_cast<float>(max_code(Bits));
  const __m256 vmax = _mm256_set1_ps(fmaxc);
  const index_t per_row = dim / group;
  const std::size_t P = static_cast<std::size_t>(tokens * per_row);
  auto* ssc = reinterpret_cast<ScaleT*>(part);
  auto* smn = reinterpret_cast<ScaleT*>(part + P * sizeof(ScaleT));
  alignas(64) float lo[max_dim], hi[max_dim], mn[max_dim], sc[max_dim];
  const index_t batch = max_dim / per_row;
  for (index_t t0 = 0; t0 < tokens; t0 += batch) {
    const index_t rows = tokens - t0 < batch ? tokens - t0 : batch;
    const index_t ng = rows * per_row;
    const float* xb = x + t0 * dim;  // the batch's groups are consecutive runs of `group` floats
    for (index_t g0 = 0; g0 < ng; g0 += 8) {
      __m256 vl[8], vh[8];
      for (index_t j = 0; j < 8; ++j) {
        __m256 l = _mm256_set1_ps(std::numeric_limits<float>::infinity());
        __m256 h = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        if (g0 + j < ng) {
          const float* xg = xb + (g0 + j) * group;
          for (index_t k = 0; k < group; k += 16)  // the input streams in once: ~4 KiB ahead
            _mm_prefetch(reinterpret_cast<const char*>(xg + k + prefetch_floats), _MM_HINT_T0);
          for (index_t k = 0; k < group; k += 8) {
            const __m256 v = _mm256_loadu_ps(xg + k);
            l = _mm256_min_ps(v, l);
            h = _mm256_max_ps(v, h);
          }
        }
        vl[j] = l;
        vh[j] = h;
      }
      alignas(32) float rl[8], rh[8];
      _mm256_store_ps(rl, reduce8<false>(vl));
      _mm256_store_ps(rh, reduce8<true>(vh));
      for (index_t j = 0; j < 8 && g0 + j < ng; ++j) {
        lo[g0 + j] = rl[j];
        hi[g0 + j] = rh[j];
        if (rl[j] == 0.0f || rh[j] == 0.0f || rl[j] > rh[j]) range_of(xb + (g0 + j) * group, group, lo[g0 + j], hi[g0 + j]);
      }
    }
    if (!params<ScaleT>(lo, hi, ng, max_code(Bits), mn, sc, smn + t0 * per_row, ssc + t0 * per_row)) return false;
    for (index_t g = 0; g < ng; ++g) {
      const float* xg = xb + g * group;
      const index_t r = g / per_row;
      std::uint8_t* dst = part + codes_off + static_cast<std::size_t>(t0 + r) * row_bytes +
                          static_cast<std::size_t>((g - r * per_row) * group / 8 * Bits);
      if (!(sc[g] > 0.0f)) {  // constant group: code 0
        std::memset(dst, 0, static_cast<std::size_t>(group / 8 * Bits));
        continue;
      }
      const __m256 m = _mm256_set1_ps(mn[g]), s = _mm256_set1_ps(sc[g]);
      for (index_t e = 0; e < group; e += 32) {
        __m256i c[4];
        QPKV_UNROLL
        for (int k = 0; k < 4; ++k) c[k] = codes8_avx2<false>(_mm256_loadu_ps(xg + e + 8 * k), m, s, vmax);
        store_packed32<Bits>(c, dst + e / 8 * Bits);
      }
    }
  }
  return true;
}
QPKV_INTRINSICS_WARNINGS_ON
#endif

/// One part along Axis::token (dim <= max_dim).
template <int Bits, class ScaleT>
bool encode_part_token(const float* QPKV_RESTRICT x, index_t tokens, index_t dim, index_t group,
                       std::uint8_t* QPKV_RESTRICT part, std::size_t codes_off, std::size_t row_bytes) {
#if defined(QPKV_CPU_AVX2_KERNELS) && !defined(QPKV_CPU_AVX512)
  if constexpr (Bits == 2 || Bits == 4 || Bits == 8)
    if (group % 32 == 0 && dim % group == 0 && cpu::avx2_kernels_usable())
      return encode_part_token_avx2<Bits, ScaleT>(x, tokens, dim, group, part, codes_off, row_bytes);
#endif
  const float fmaxc = static_cast<float>(max_code(Bits));
  const index_t per_row = (dim + group - 1) / group;
  const std::size_t P = static_cast<std::size_t>(tokens * per_row);
  auto* ssc = reinterpret_cast<ScaleT*>(part);
  auto* smn = reinterpret_cast<ScaleT*>(part + P * sizeof(ScaleT));
  alignas(64) float lo[max_dim], hi[max_dim], mn[max_dim], sc[max_dim];
  alignas(64) float mc[max_dim], scc[max_dim];
  alignas(64) std::uint8_t codes[max_dim];
  const index_t batch = max_dim / per_row;  // rows whose groups fit the buffers (>= 1: per_row <= dim)
  for (index_t t0 = 0; t0 < tokens; t0 += batch) {
    const index_t rows = tokens - t0 < batch ? tokens - t0 : batch;
    for (index_t r = 0; r < rows; ++r) {
      const float* xr = x + (t0 + r) * dim;
      for (index_t gc = 0; gc < per_row; ++gc) {
        const index_t b = gc * group, e = (gc + 1) * group < dim ? (gc + 1) * group : dim;
        range_of(xr + b, e - b, lo[r * per_row + gc], hi[r * per_row + gc]);
      }
    }
    const index_t ng = rows * per_row;
    if (!params<ScaleT>(lo, hi, ng, max_code(Bits), mn, sc, smn + t0 * per_row, ssc + t0 * per_row)) return false;
    for (index_t r = 0; r < rows; ++r) {
      const float* xr = x + (t0 + r) * dim;
      if (group >= 16) {  // one vector loop over the row with the parameters spread per channel
        for (index_t gc = 0; gc < per_row; ++gc) {
          const index_t b = gc * group, e = (gc + 1) * group < dim ? (gc + 1) * group : dim;
          const float m = mn[r * per_row + gc], s = sc[r * per_row + gc];
          QPKV_SIMD
          for (index_t c = b; c < e; ++c) {
            mc[c] = m;
            scc[c] = s;
          }
        }
        codes_vec(xr, mc, scc, dim, fmaxc, codes);
      } else {
        for (index_t gc = 0; gc < per_row; ++gc) {
          const index_t b = gc * group, e = (gc + 1) * group < dim ? (gc + 1) * group : dim;
          codes_one(xr + b, mn[r * per_row + gc], sc[r * per_row + gc], e - b, fmaxc, codes + b);
        }
      }
      pack_row<Bits>(codes, dim, part + codes_off + static_cast<std::size_t>(t0 + r) * row_bytes);
    }
  }
  return true;
}

/// Encodes `parts` slabs; returns false (having possibly written some parts) when a group's
/// parameters are not storable, so that the caller reruns the generic path for its error.
/// `channel`: Axis::channel (tokens % group == 0 required) else Axis::token; dim <= max_dim.
template <int Bits, class ScaleT>
bool encode(const float* src, index_t parts, index_t tokens, index_t dim, index_t group, bool channel,
            std::uint8_t* dst, std::size_t dst_stride, std::size_t nparams, std::size_t codes_off,
            std::size_t row_bytes, std::size_t part_bytes) {
  std::atomic<bool> ok{true};
  const std::size_t pad0 = 2 * nparams * sizeof(ScaleT);
  const std::size_t codes_end = codes_off + static_cast<std::size_t>(tokens) * row_bytes;
  auto one = [&](index_t p) {
    std::uint8_t* part = dst + static_cast<std::size_t>(p) * dst_stride;
    const float* x = src + p * tokens * dim;
    std::memset(part + pad0, 0, codes_off - pad0);
    std::memset(part + codes_end, 0, part_bytes - codes_end);
    const bool good = channel ? encode_part_channel<Bits, ScaleT>(x, tokens, dim, group, part, codes_off, row_bytes)
                              : encode_part_token<Bits, ScaleT>(x, tokens, dim, group, part, codes_off, row_bytes);
    if (!good) ok.store(false, std::memory_order_relaxed);
  };
#if defined(_OPENMP)
  // the code loops ask cpu::avx2_kernels_usable(); QPKV_CPU is read here first, so that a bad
  // value throws on the calling thread (an exception leaving a parallel region terminates)
  (void)cpu::cpu_cap();
  const bool parallel = parts > 1 && parts * tokens * dim >= parallel_elements;
#pragma omp parallel for schedule(dynamic, 8) if (parallel)
  for (index_t p = 0; p < parts; ++p) one(p);
#else
  for (index_t p = 0; p < parts; ++p) one(p);
#endif
  return ok.load(std::memory_order_relaxed);
}

// ---- decode ----------------------------------------------------------------------------------

/// Row t's parameters along Axis::token spread per channel (sf[c], mf[c]: those of c's group),
/// for the decode paths whose vectors are not inside one group.
template <class ScaleT>
inline void token_row_params(const ScaleT* sc, const ScaleT* mn, index_t t, index_t dim, index_t group, float* sf, float* mf) {
  const index_t per_row = (dim + group - 1) / group;
  for (index_t c = 0; c < dim; ++c) {
    sf[c] = to_float(sc[t * per_row + c / group]);
    mf[c] = to_float(mn[t * per_row + c / group]);
  }
}

#if defined(QPKV_CPU_AVX512_KERNELS)
QPKV_INTRINSICS_WARNINGS_OFF  // simd.hpp
/// The dwords of 16 codes of a packed row (pack.hpp's layout, 8 % Bits == 0), codes c .. c + 15
/// (c a multiple of 16); lanes at and past n (< 16 on the row's tail) are 0 and read no memory.
/// idx / shr: lane j takes byte j / (8 / Bits) of the 16-code slice, shifted by (j % (8 / Bits)) * Bits.
template <int Bits>
QPKV_INLINE __m512i unpack16(const std::uint8_t* row, index_t c, index_t n, __m128i idx, __m512i shr) {
  const __mmask16 lanes = cpu::tail_mask(n);
  if constexpr (Bits == 8) {
    return _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, row + c));
  } else {
    constexpr index_t per = 8 / Bits;
    const index_t nb = ((n >= 16 ? 16 : n) + per - 1) / per;  // bytes of the slice
    const __m128i b = _mm_maskz_loadu_epi8(cpu::tail_mask(nb), row + c / per);
    const __m512i v = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_shuffle_epi8(b, idx)), shr);
    return _mm512_maskz_and_epi32(lanes, v, _mm512_set1_epi32((1 << Bits) - 1));
  }
}

/// 16 scales or mins (n of them, the rest 0) as float.
template <class ScaleT>
QPKV_INLINE __m512 params16(const ScaleT* p, index_t n) {
  const __mmask16 lanes = cpu::tail_mask(n);
  if constexpr (std::is_same_v<ScaleT, float>) return _mm512_maskz_loadu_ps(lanes, p);
  else return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, &p->bits));
}

/// decode() for one part with the AVX-512 instructions; the checks are decode()'s.
template <int Bits, class ScaleT>
QPKV_TARGET void decode_part_avx512(const std::uint8_t* part, index_t tokens, index_t dim, index_t group, bool channel,
                                    std::size_t mins_off, std::size_t codes_off, std::size_t row_bytes, float* out) {
  const auto* sc = reinterpret_cast<const ScaleT*>(part);
  const auto* mn = reinterpret_cast<const ScaleT*>(part + mins_off);
  constexpr int per = 8 / Bits;
  alignas(16) std::int8_t idx[16];
  alignas(64) std::int32_t shr[16];
  QPKV_UNROLL
  for (int j = 0; j < 16; ++j) {
    idx[j] = static_cast<std::int8_t>(j / per);
    shr[j] = (j % per) * Bits;
  }
  const __m128i vidx = _mm_load_si128(reinterpret_cast<const __m128i*>(idx));
  const __m512i vshr = _mm512_load_si512(shr);
  alignas(64) float sf[max_dim], mf[max_dim];  // per channel: the token group's (channel) or the row's
  const index_t per_row = (dim + group - 1) / group;
  const bool broadcast = !channel && group % 16 == 0;  // each 16-channel slice inside one group
  for (index_t t = 0; t < tokens; ++t) {
    const std::uint8_t* row = part + codes_off + static_cast<std::size_t>(t) * row_bytes;
    float* o = out + t * dim;
    if (channel && t % group == 0) {
      const index_t base = (t / group) * dim;
      for (index_t c = 0; c < dim; c += 16) {
        _mm512_store_ps(sf + c, params16(sc + base + c, dim - c));
        _mm512_store_ps(mf + c, params16(mn + base + c, dim - c));
      }
    } else if (!channel && !broadcast) {
      token_row_params(sc, mn, t, dim, group, sf, mf);
    }
    for (index_t c = 0; c < dim; c += 16) {
      __m512 s, m;
      if (broadcast) {
        const index_t g = t * per_row + c / group;
        s = _mm512_set1_ps(to_float(sc[g]));
        m = _mm512_set1_ps(to_float(mn[g]));
      } else {
        s = _mm512_load_ps(sf + c);
        m = _mm512_load_ps(mf + c);
      }
      __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(unpack16<Bits>(row, c, dim - c, vidx, vshr)), s);
#if defined(QPKV_EMULATE_AVX512)
      __asm__("" : "+m"(x));  // (the tests' emulated vector is an array in memory; simd.hpp)
#elif defined(__GNUC__)
      __asm__("" : "+v"(x));  // code * scale rounded before + min, as quant::decode (no FMA contraction)
#endif
      _mm512_mask_storeu_ps(o + c, cpu::tail_mask(dim - c), _mm512_add_ps(x, m));
    }
  }
}
QPKV_INTRINSICS_WARNINGS_ON
#endif

#if defined(QPKV_CPU_AVX2_KERNELS)
QPKV_INTRINSICS_WARNINGS_OFF  // simd.hpp
/// The dwords of the 8 codes c .. c + 7 of a packed row (c a multiple of 8, all 8 inside the row).
/// Code j sits at bit j * Bits of the slice (pack.hpp, 8 % Bits == 0), so one 32-bit load
/// broadcast to every lane and shifted by shr = (0, Bits, .., 7 Bits) gives them all.
template <int Bits>
QPKV_INLINE_AVX2 __m256i unpack8(const std::uint8_t* row, index_t c, __m256i shr) {
  if constexpr (Bits == 8) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + c)));
  } else {
    std::uint32_t w = 0;
    std::memcpy(&w, row + c * Bits / 8, Bits);  // the slice's 8 * Bits bits
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(w)), shr),
                            _mm256_set1_epi32((1 << Bits) - 1));
  }
}

/// decode() for one part with AVX2 (CPUs without AVX-512); the checks are decode()'s. Whole
/// vectors of 8 channels, the row's last dim % 8 channels by the element rule.
template <int Bits, class ScaleT>
QPKV_TARGET_AVX2 void decode_part_avx2(const std::uint8_t* part, index_t tokens, index_t dim, index_t group, bool channel,
                                       std::size_t mins_off, std::size_t codes_off, std::size_t row_bytes, float* out) {
  const auto* sc = reinterpret_cast<const ScaleT*>(part);
  const auto* mn = reinterpret_cast<const ScaleT*>(part + mins_off);
  const __m256i shr = _mm256_setr_epi32(0, Bits, 2 * Bits, 3 * Bits, 4 * Bits, 5 * Bits, 6 * Bits, 7 * Bits);
  alignas(32) float sf[max_dim], mf[max_dim];  // per channel: the token group's (channel) or the row's
  const index_t per_row = (dim + group - 1) / group, full = dim / 8 * 8;
  const bool broadcast = !channel && group % 8 == 0;  // each 8-channel slice inside one group
  for (index_t t = 0; t < tokens; ++t) {
    const std::uint8_t* row = part + codes_off + static_cast<std::size_t>(t) * row_bytes;
    float* o = out + t * dim;
    if (channel && t % group == 0) {
      const index_t base = (t / group) * dim;
      for (index_t c = 0; c < dim; ++c) {
        sf[c] = to_float(sc[base + c]);
        mf[c] = to_float(mn[base + c]);
      }
    } else if (!channel && !broadcast) {
      token_row_params(sc, mn, t, dim, group, sf, mf);
    }
    for (index_t c = 0; c < full; c += 8) {
      __m256 s, m;
      if (broadcast) {
        const index_t g = t * per_row + c / group;
        s = _mm256_set1_ps(to_float(sc[g]));
        m = _mm256_set1_ps(to_float(mn[g]));
      } else {
        s = _mm256_load_ps(sf + c);
        m = _mm256_load_ps(mf + c);
      }
      __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(unpack8<Bits>(row, c, shr)), s);
#if defined(__GNUC__)
      __asm__("" : "+x"(x));  // code * scale rounded before + min, as quant::decode (no FMA contraction)
#endif
      _mm256_storeu_ps(o + c, _mm256_add_ps(x, m));
    }
    for (index_t c = full; c < dim; ++c) {
      const index_t g = t * per_row + c / group;
      const float s = broadcast ? to_float(sc[g]) : sf[c], m = broadcast ? to_float(mn[g]) : mf[c];
      // quant::decode's rule, with its barrier against contraction whatever the build's target: in
      // this function FMA is enabled by the target attribute, not by __FMA__
      float x = static_cast<float>(unpack_one<Bits>(row, static_cast<std::size_t>(c))) * s;
#if defined(__GNUC__)
      __asm__("" : "+x"(x));
#endif
      o[c] = x + m;
    }
  }
}
QPKV_INTRINSICS_WARNINGS_ON
#endif

/// Decodes one part's T x D codes, out[t * dim + c] = float(code) * scale + min (quant::decode's
/// two roundings, so bit-identical to Affine::decode's element loop), without its outliers.
/// Returns false (nothing written) where this path does not apply: neither AVX-512 nor AVX2 in
/// this process, 8 % Bits != 0, dim > max_dim, a scale type other than half / float, or
/// (Axis::channel) tokens not a multiple of the group. (qpkv_bench dequantize/kivi4/g32/t1: 3.3
/// GB/s with the element loop, whose per-element barrier against FMA contraction kept GCC from
/// vectorising it; 31 GB/s with AVX-512.)
template <int Bits, class ScaleT>
bool decode(const std::uint8_t* part, index_t tokens, index_t dim, index_t group, bool channel, std::size_t mins_off,
            std::size_t codes_off, std::size_t row_bytes, float* out) {
#if defined(QPKV_CPU_AVX512_KERNELS) || defined(QPKV_CPU_AVX2_KERNELS)
  if constexpr (8 % Bits == 0 && (std::is_same_v<ScaleT, half> || std::is_same_v<ScaleT, float>)) {
    if (dim <= 0 || dim > max_dim || group <= 0 || (channel && tokens % group != 0)) return false;
#if defined(QPKV_CPU_AVX512_KERNELS)
    if (cpu::avx512_usable()) {
      decode_part_avx512<Bits, ScaleT>(part, tokens, dim, group, channel, mins_off, codes_off, row_bytes, out);
      return true;
    }
#endif
#if defined(QPKV_CPU_AVX2_KERNELS)
    if (cpu::avx2_kernels_usable()) {
      decode_part_avx2<Bits, ScaleT>(part, tokens, dim, group, channel, mins_off, codes_off, row_bytes, out);
      return true;
    }
#endif
    return false;
  }
#endif
  (void)part, (void)tokens, (void)dim, (void)group, (void)channel, (void)mins_off, (void)codes_off, (void)row_bytes,
      (void)out;
  return false;
}

}  // namespace qpkv::quant::fast
