#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "qpkv/core/dtype.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"

using namespace qpkv;

TEST_CASE("half conversion rounds to nearest even and round-trips every half") {
  for (std::uint32_t b = 0; b < 0x10000; ++b) {
    const half h{static_cast<std::uint16_t>(b)};
    const float f = to_float(h);
    if (std::isnan(f)) {
      CHECK(std::isnan(to_float(to_half(f))));
      continue;
    }
    CAPTURE(b);
    REQUIRE(to_half(f).bits == h.bits);
  }
  CHECK(to_float(to_half(1.0f)) == 1.0f);
  CHECK(to_half(65520.0f).bits == 0x7c00);                      // rounds up to inf
  CHECK(to_half(65519.0f).bits == 0x7bff);                      // largest finite
  CHECK(to_half(1.0f + 0x1p-11f).bits == to_half(1.0f).bits);   // tie -> even (down)
  CHECK(to_half(1.0f + 3 * 0x1p-11f).bits == 0x3c02);           // tie -> even (up)
  CHECK(to_float(to_half(0x1p-25f)) == 0.0f);                   // half of smallest subnormal -> 0
  CHECK(to_float(to_half(0x1p-24f)) == 0x1p-24f);
}

TEST_CASE("the branch-free array conversion of halves equals to_float bit for bit, for every half") {
  std::vector<half> h(0x10000);
  for (std::uint32_t b = 0; b < 0x10000; ++b) h[b].bits = static_cast<std::uint16_t>(b);
  std::vector<float> f(h.size(), 1.0f);
  to_float(h.data(), h.size(), f.data());
  std::uint32_t mismatches = 0;
  for (std::uint32_t b = 0; b < 0x10000; ++b) mismatches += float_bits(f[b]) != float_bits(to_float(h[b])) ? 1u : 0u;
  CHECK(mismatches == 0);
  CHECK(float_bits(f[0x0001]) == float_bits(0x1p-24f));  // smallest subnormal
  CHECK(float_bits(f[0x8000]) == 0x80000000u);           // -0
  CHECK(std::isinf(f[0x7c00]));
  CHECK(std::isnan(f[0x7e00]));
}

TEST_CASE("bfloat16 conversion rounds to nearest even") {
  CHECK(to_float(to_bfloat16(1.0f)) == 1.0f);
  CHECK(to_bfloat16(1.0f + 0x1p-8f).bits == to_bfloat16(1.0f).bits);
  CHECK(to_bfloat16(1.0f + 3 * 0x1p-8f).bits == 0x3f82);
  CHECK(std::isnan(to_float(to_bfloat16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST_CASE("shape validation names the argument") {
  Shape s{4, 6, 8};
  CHECK_THROWS_WITH_AS(s.validate(), doctest::Contains("shape.q_heads"), Error);
  CHECK_NOTHROW((Shape{4, 8, 8}.validate()));
  CHECK_THROWS_AS((Shape{0, 8, 8}.validate()), Error);
}
