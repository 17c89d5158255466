// qpkv/quant/pack.hpp - the one bit-packing layout used everywhere in qpkv.
//
// Codes of b bits are written into a little-endian bit stream, LSB first: code i occupies bits
// [i*b, (i+1)*b) of the stream, bit k of the stream is bit (k % 8) of byte k / 8. So 4-bit codes
// {1, 2} pack to byte 0x21, 2-bit codes {1, 2, 3, 0} to 0x39, and eight 3-bit codes fill exactly
// three bytes. A row of n codes takes ceil(n*b/8) bytes; unused high bits of the last byte are 0.
// docs/format.md has a worked example.
#pragma once

#include <cstddef>
#include <cstdint>

#include "qpkv/core/config.hpp"

namespace qpkv::quant {

/// Bytes needed for n codes of `bits` bits.
QPKV_HD constexpr std::size_t packed_bytes(std::size_t n, int bits) {
  return (n * static_cast<std::size_t>(bits) + 7u) / 8u;
}

/// Packs n codes (each < 2^Bits) into ceil(n*Bits/8) bytes at dst.
template <int Bits>
QPKV_HD void pack(const std::uint8_t* QPKV_RESTRICT codes, std::size_t n, std::uint8_t* QPKV_RESTRICT dst) {
  static_assert(Bits >= 1 && Bits <= 8, "pack: Bits must be 1..8");
  if constexpr (Bits == 8) {
    for (std::size_t i = 0; i < n; ++i) dst[i] = codes[i];
  } else if constexpr (8 % Bits == 0) {
    constexpr int per = 8 / Bits;
    const std::size_t full = n / per;
    QPKV_SIMD
    for (std::size_t j = 0; j < full; ++j) {
      unsigned v = 0;
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) v |= static_cast<unsigned>(codes[j * per + k]) << (k * Bits);
      dst[j] = static_cast<std::uint8_t>(v);
    }
    if (n % per) {
      unsigned v = 0;
      for (std::size_t k = 0; k < n % per; ++k) v |= static_cast<unsigned>(codes[full * per + k]) << (k * Bits);
      dst[full] = static_cast<std::uint8_t>(v);
    }
  } else {  // 3, 5, 6, 7 bits: general bit stream
    const std::size_t nb = packed_bytes(n, Bits);
    for (std::size_t j = 0; j < nb; ++j) dst[j] = 0;
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t bit = i * Bits;
      const unsigned v = static_cast<unsigned>(codes[i]) << (bit % 8);
      dst[bit / 8] = static_cast<std::uint8_t>(dst[bit / 8] | (v & 0xffu));
      if ((bit % 8) + Bits > 8) dst[bit / 8 + 1] = static_cast<std::uint8_t>(dst[bit / 8 + 1] | (v >> 8));
    }
  }
}

/// Reads code i from a packed stream.
template <int Bits>
QPKV_HD std::uint32_t unpack_one(const std::uint8_t* src, std::size_t i) {
  static_assert(Bits >= 1 && Bits <= 8, "unpack: Bits must be 1..8");
  constexpr unsigned mask = (1u << Bits) - 1u;
  if constexpr (Bits == 8) {
    return src[i];
  } else if constexpr (8 % Bits == 0) {
    constexpr int per = 8 / Bits;
    return (src[i / per] >> ((i % per) * Bits)) & mask;
  } else {
    const std::size_t bit = i * Bits;
    unsigned v = src[bit / 8];
    if ((bit % 8) + Bits > 8) v |= static_cast<unsigned>(src[bit / 8 + 1]) << 8;
    return (v >> (bit % 8)) & mask;
  }
}

/// Unpacks n codes.
template <int Bits>
QPKV_HD void unpack(const std::uint8_t* QPKV_RESTRICT src, std::size_t n, std::uint8_t* QPKV_RESTRICT codes) {
  for (std::size_t i = 0; i < n; ++i) codes[i] = static_cast<std::uint8_t>(unpack_one<Bits>(src, i));
}

}  // namespace qpkv::quant
