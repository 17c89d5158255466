// qpkv/quant/fp16.hpp - unquantized 16-bit storage (the paper's "16-bit" baseline).
#pragma once

#include <cstring>
#include <string_view>

#include "qpkv/core/dtype.hpp"
#include "qpkv/quant/quantizer.hpp"

namespace qpkv {

/// Stores every element as IEEE half (round to nearest even), row-major [token][dim]: 2 bytes per
/// element, no scales. This is the full-precision reference cache of the paper (fp16 models).
struct Fp16 {
  static constexpr int bits = 16;
  Axis axis = Axis::automatic;  ///< irrelevant for fp16; kept so every quantizer has one

  [[nodiscard]] index_t group_tokens() const { return 1; }
  [[nodiscard]] std::size_t part_bytes(index_t tokens, index_t dim) const {
    return align4(static_cast<std::size_t>(tokens * dim) * sizeof(half));
  }
  void validate(index_t, std::string_view) const {}

  void encode(const float* src, index_t parts, index_t tokens, index_t dim, std::uint8_t* dst,
              std::size_t dst_stride) const {
    for (index_t p = 0; p < parts; ++p) {
      auto* h = reinterpret_cast<half*>(dst + p * dst_stride);
      const float* s = src + p * tokens * dim;
      for (index_t i = 0; i < tokens * dim; ++i) {
        h[i] = to_half(s[i]);
        if ((h[i].bits & 0x7c00u) == 0x7c00u)  // a finite input above 65504: an error, not a silent inf
          throw Error(detail::concat("qpkv: Fp16 storage: expected |x| <= 65504, got ", s[i]));
      }
      std::memset(reinterpret_cast<std::uint8_t*>(h + tokens * dim), 0,
                  part_bytes(tokens, dim) - static_cast<std::size_t>(tokens * dim) * sizeof(half));
    }
  }
  void decode(const std::uint8_t* part, index_t tokens, index_t dim, float* out) const {
    to_float(reinterpret_cast<const half*>(part), static_cast<std::size_t>(tokens * dim), out);
  }
};

}  // namespace qpkv
