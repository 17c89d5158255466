// The fuzzer's input as a stream of choices and values, shared by the fuzz targets: past the end
// every byte reads as 0, so any input is a complete one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace qpkv_fuzz {

struct Bytes {
  const std::uint8_t* p;
  std::size_t n;
  std::uint8_t byte() {
    if (n == 0) return 0;
    --n;
    return *p++;
  }
  /// Four bytes as a float's bit pattern (NaN, Inf, denormals, 1e38 all reachable).
  float raw_float() {
    std::uint32_t u = 0;
    for (int i = 0; i < 4; ++i) u |= static_cast<std::uint32_t>(byte()) << (8 * i);
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  /// One byte as a signed integer times scale.
  float small(float scale) { return static_cast<float>(static_cast<std::int8_t>(byte())) * scale; }
};

}  // namespace qpkv_fuzz
