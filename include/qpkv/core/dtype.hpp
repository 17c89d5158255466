// qpkv/core/dtype.hpp - 16-bit storage types (IEEE half, bfloat16) and their float conversions.
//
// Both are plain 16-bit structs so that they mean the same bytes on the host and on the device
// and never pull Eigen or <cuda_fp16.h> into a header that does not need them. Conversions
// round to nearest even, as the hardware instructions (F16C vcvtps2ph, CUDA __float2half_rn) do.
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "qpkv/core/config.hpp"

namespace qpkv {

struct half {
  std::uint16_t bits = 0;
};
struct bfloat16 {
  std::uint16_t bits = 0;
};
static_assert(sizeof(half) == 2 && sizeof(bfloat16) == 2, "16-bit storage types must be 2 bytes");

QPKV_HD std::uint32_t float_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
QPKV_HD float bits_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

/// float -> IEEE binary16, round to nearest even; overflow gives +-inf, NaN stays NaN.
QPKV_HD half to_half(float f) {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t abs = x & 0x7fffffffu;
  std::uint16_t h;
  if (abs >= 0x7f800000u) {  // inf or nan
    h = static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  } else if (abs >= 0x477ff000u) {  // rounds to >= 65520 -> inf
    h = static_cast<std::uint16_t>(sign | 0x7c00u);
  } else if (abs < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    // Add 0.5 (as a float) so that the FPU's own round-to-nearest-even does the rounding.
    const float magic = bits_float(0x3f000000u);  // 0.5f
    const float v = bits_float(abs) + magic;
    h = static_cast<std::uint16_t>(sign | (float_bits(v) - 0x3f000000u));
  } else {
    const std::uint32_t mant_odd = (abs >> 13) & 1u;
    std::uint32_t v = abs + 0xc8000fffu + mant_odd;  // rebias exponent (-112 << 23) and round
    h = static_cast<std::uint16_t>(sign | (v >> 13));
  }
  return half{h};
}

QPKV_HD float to_float(half h) {
#if defined(__CUDA_ARCH__)
  float f;  // the hardware conversion: exact, like the bit manipulation below, and one instruction
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
#else
  const std::uint32_t sign = static_cast<std::uint32_t>(h.bits & 0x8000u) << 16;
  const std::uint32_t exp = (h.bits >> 10) & 0x1fu;
  const std::uint32_t mant = h.bits & 0x3ffu;
  if (exp == 0x1f) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float v = static_cast<float>(mant) * bits_float(0x33800000u);
    return bits_float(sign | float_bits(v));
  }
  return bits_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

/// to_float over an array, bit for bit, written without branches so that compilers vectorize it
/// (the portable attention kernels convert fp16 rows with it): the exponent is rebased by adding
/// (127 - 15) << 23, Inf/NaN get the rest of the way to 255, and zero/subnormal inputs are
/// renormalised by subtracting 2^-14 from (mant * 2^-23 + 1) * 2^-14, which is exact.
inline void to_float(const half* QPKV_RESTRICT src, std::size_t n, float* QPKV_RESTRICT dst) {
  QPKV_SIMD
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t h = src[i].bits;
    const std::uint32_t em = (h & 0x7fffu) << 13;  // exponent and mantissa in float position
    const std::uint32_t e = em & 0x0f800000u;
    const std::uint32_t rebased = em + ((127u - 15u) << 23);
    const std::uint32_t inf_nan = 0u - static_cast<std::uint32_t>(e == 0x0f800000u);  // all ones or 0
    const std::uint32_t tiny = 0u - static_cast<std::uint32_t>(e == 0u);
    const std::uint32_t normal = rebased + (inf_nan & ((128u - 16u) << 23));
    const std::uint32_t sub = float_bits(bits_float(rebased + (1u << 23)) - bits_float(113u << 23));
    dst[i] = bits_float((tiny & sub) | (~tiny & normal) | ((h & 0x8000u) << 16));
  }
}

/// float -> bfloat16, round to nearest even; NaN stays NaN.
QPKV_HD bfloat16 to_bfloat16(float f) {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return bfloat16{static_cast<std::uint16_t>((x >> 16) | 0x40u)};
  const std::uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return bfloat16{static_cast<std::uint16_t>(rounded >> 16)};
}
QPKV_HD float to_float(bfloat16 b) { return bits_float(static_cast<std::uint32_t>(b.bits) << 16); }
QPKV_HD float to_float(float f) { return f; }

/// Element types accepted for input tensors.
template <class T>
concept Element = std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;

/// Storage types for scales and zero points (a quantizer policy parameter).
template <class T>
concept ScaleStorage = Element<T>;

/// Converts a float to storage type T (identity for float).
template <ScaleStorage T>
QPKV_HD T from_float(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else if constexpr (std::is_same_v<T, half>) {
    return to_half(f);
  } else {
    return to_bfloat16(f);
  }
}

/// Rounds a float through storage type T and back: what a stored value will read as.
template <ScaleStorage T>
QPKV_HD float round_through(float f) {
  return to_float(from_float<T>(f));
}

template <Element T>
constexpr const char* dtype_name() {
  if constexpr (std::is_same_v<T, float>) return "float32";
  else if constexpr (std::is_same_v<T, half>) return "float16";
  else return "bfloat16";
}

}  // namespace qpkv
