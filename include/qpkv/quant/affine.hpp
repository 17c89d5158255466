// qpkv/quant/affine.hpp - the per-element rules of asymmetric min-max quantization.
//
// KIVI (jy-yuan/KIVI quant/new_pack.py) and the paper's reference runs use asymmetric min-max
// groups: scale = (max - min) / (2^b - 1), code = round_half_even(clamp((x - min) / scale, 0,
// 2^b - 1)) with true division in float32, x' = code * scale + min. These functions are that
// rule and nothing else; they are QPKV_HD so the CPU and CUDA paths share one definition and
// produce identical codes.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "qpkv/core/config.hpp"
#include "qpkv/core/dtype.hpp"

namespace qpkv::quant {

/// Largest code of a b-bit quantizer.
QPKV_HD constexpr std::uint32_t max_code(int bits) { return (1u << bits) - 1u; }

/// KIVI's code for x: clamp-then-round, float32 true division, round half to even (nearbyint
/// under the default rounding mode). A zero scale (constant group) maps everything to code 0, and
/// so does a NaN x (the clamp's `v > 0 ? v : 0` takes it to 0, as the vector paths' max(v, 0)
/// does; converting a NaN to an integer would be undefined).
QPKV_HD std::uint32_t encode(float x, float min, float scale, std::uint32_t maxc) {
  if (!(scale > 0.0f)) return 0u;
  float v = (x - min) / scale;
  v = v > 0.0f ? v : 0.0f;
  const float hi = static_cast<float>(maxc);
  v = v > hi ? hi : v;
  return static_cast<std::uint32_t>(std::nearbyint(v));
}

/// a * b rounded to float32 before whatever the caller adds to it. GCC contracts a*b + c into
/// one FMA (a single rounding) whenever the target has FMA (-march=native, -mfma), in C++ under
/// -std=c++20 as well as gnu++20, and nvcc does by default; the references (KIVI's and hqq's
/// torch code) round the product and the sum separately. An empty asm keeps the product rounded.
QPKV_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  float p = a * b;
#if defined(__GNUC__) && defined(__FMA__) && (defined(__x86_64__) || defined(__i386__))
  __asm__("" : "+x"(p));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(p));
#endif
  return p;
#endif
}

/// x' = code * scale + min (two separately rounded float32 operations, as KIVI does).
QPKV_HD float decode(std::uint32_t code, float min, float scale) { return mul_rn(static_cast<float>(code), scale) + min; }

/// The largest value of storage type T that is <= f (f itself when representable).
template <ScaleStorage T>
QPKV_HD T round_down(float f) {
  T t = from_float<T>(f);
  if constexpr (!std::is_same_v<T, float>) {
    if (to_float(t) > f) {
      // one ulp towards -inf in sign-magnitude encoding
      if (t.bits == 0x0000u) t.bits = 0x8001u;
      else if (t.bits & 0x8000u) t.bits = static_cast<std::uint16_t>(t.bits + 1u);
      else t.bits = static_cast<std::uint16_t>(t.bits - 1u);
    }
  }
  return t;
}

/// The smallest value of storage type T that is >= f (f itself when representable).
template <ScaleStorage T>
QPKV_HD T round_up(float f) {
  T t = from_float<T>(f);
  if constexpr (!std::is_same_v<T, float>) {
    if (to_float(t) < f) {
      if (t.bits == 0x8000u) t.bits = 0x0001u;
      else if (t.bits & 0x8000u) t.bits = static_cast<std::uint16_t>(t.bits - 1u);
      else t.bits = static_cast<std::uint16_t>(t.bits + 1u);
    }
  }
  return t;
}

/// Scale and minimum of one group as they will be stored.
struct GroupParams {
  float min = 0.0f;
  float scale = 0.0f;
};

/// Min-max parameters of a group with range [lo, hi], stored as T.
/// With T = float they are KIVI's exactly. With a 16-bit T the minimum is rounded down and the
/// scale up (outward) before encoding, so every x in [lo, hi] still decodes within scale/2 of
/// itself using the stored parameters; rounding them to nearest instead (as transformers' HQQ
/// cache does) can move a whole group by more than a step when |min| >> max - min.
template <ScaleStorage T>
QPKV_HD GroupParams minmax_params(float lo, float hi, std::uint32_t maxc) {
  GroupParams p;
  if constexpr (std::is_same_v<T, float>) {
    p.min = lo;
    p.scale = (hi - lo) / static_cast<float>(maxc);
  } else {
    p.min = to_float(round_down<T>(lo));
    const float range = hi - p.min;
    p.scale = range > 0.0f ? to_float(round_up<T>(range / static_cast<float>(maxc))) : 0.0f;
  }
  return p;
}

}  // namespace qpkv::quant
