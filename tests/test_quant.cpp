// Quantizer policies: packing, round-trip bounds, constant groups, conformance with KIVI's rule.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "test_util.hpp"
#include "qpkv/quant/affine_fast.hpp"
#include "qpkv/quant/affine_quantizer.hpp"
#include "qpkv/quant/fp16.hpp"
#include "qpkv/quant/kivi.hpp"
#include "qpkv/quant/pack.hpp"

using namespace qpkv;

using testing::randn;

namespace {

template <int Bits>
void check_pack_roundtrip(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::vector<std::uint8_t> codes(n), back(n);
  for (auto& c : codes) c = static_cast<std::uint8_t>(rng() & ((1u << Bits) - 1u));
  std::vector<std::uint8_t> packed(quant::packed_bytes(n, Bits) + 1, 0xAB);
  quant::pack<Bits>(codes.data(), n, packed.data());
  CHECK(packed.back() == 0xAB);  // nothing written past ceil(n*b/8) bytes
  quant::unpack<Bits>(packed.data(), n, back.data());
  CHECK(codes == back);
  if (n * Bits % 8) {  // unused high bits of the last byte are zero
    const unsigned used = n * Bits % 8;
    CHECK((packed[quant::packed_bytes(n, Bits) - 1] >> used) == 0);
  }
}

/// Element-wise round trip of an Affine quantizer over one part; returns max |x - x'| / (scale/2).
template <int Bits, class S>
double worst_ratio(const Affine<Bits, S>& q, const std::vector<float>& x, index_t T, index_t D) {
  const AffineLayout l = q.layout(T, D);
  std::vector<std::uint8_t> part(l.bytes);
  q.encode(x.data(), 1, T, D, part.data(), l.bytes);
  std::vector<float> y(x.size());
  q.decode(part.data(), T, D, y.data());
  const auto* sc = reinterpret_cast<const S*>(part.data() + l.scales);
  double worst = 0;
  for (index_t t = 0; t < T; ++t)
    for (index_t c = 0; c < D; ++c) {
      const double s = to_float(sc[q.group_of(t, c, D)]);
      const double err = std::fabs(double(x[t * D + c]) - y[t * D + c]);
      const double bound = s / 2 * (1 + 1e-5) + 1e-6 * std::fabs(x[t * D + c]) + 1e-30;
      worst = std::max(worst, err / bound);
    }
  return worst;
}

}  // namespace

TEST_CASE("packing is LSB-first and round-trips for every bit width and odd lengths") {
  const std::uint8_t c4[2] = {1, 2};
  std::uint8_t b = 0;
  quant::pack<4>(c4, 2, &b);
  CHECK(b == 0x21);
  const std::uint8_t c2[4] = {1, 2, 3, 0};
  quant::pack<2>(c2, 4, &b);
  CHECK(b == 0x39);
  const std::uint8_t c3[8] = {0, 1, 2, 3, 4, 5, 6, 7};  // 0b111'110'101'100'011'010'001'000
  std::uint8_t b3[3];
  quant::pack<3>(c3, 8, b3);
  CHECK(b3[0] == 0x88);
  CHECK(b3[1] == 0xC6);
  CHECK(b3[2] == 0xFA);
  for (std::size_t n : {1u, 2u, 3u, 5u, 7u, 8u, 9u, 31u, 33u, 64u, 127u}) {
    CAPTURE(n);
    check_pack_roundtrip<1>(n, 1);
    check_pack_roundtrip<2>(n, 2);
    check_pack_roundtrip<3>(n, 3);
    check_pack_roundtrip<4>(n, 4);
    check_pack_roundtrip<8>(n, 5);
  }
}

TEST_CASE_TEMPLATE("affine round trip is within half a step for every bit width and axis", S, half, float, bfloat16) {
  auto run = [](auto tag) {
    constexpr int B = decltype(tag)::value;
    for (Axis axis : {Axis::channel, Axis::token})
      for (index_t group : {8, 32, 64}) {
        for (index_t D : {8, 20, 64}) {
          CAPTURE(B);
          CAPTURE(axis_name(axis));
          CAPTURE(group);
          CAPTURE(D);
          Affine<B, S> q;
          q.axis = axis;
          q.group = group;
          const index_t T = axis == Axis::channel ? group * 2 : 3;
          auto x = randn(static_cast<std::size_t>(T * D), static_cast<unsigned>(B * 131 + D));
          x[5] = 7.5f;  // an outlier stretches one group
          CHECK(worst_ratio(q, x, T, D) <= 1.0);
        }
      }
  };
  run(std::integral_constant<int, 1>{});
  run(std::integral_constant<int, 2>{});
  run(std::integral_constant<int, 3>{});
  run(std::integral_constant<int, 4>{});
  run(std::integral_constant<int, 8>{});
}

TEST_CASE("fp16 scale storage keeps the half-step bound when |min| >> range") {
  Affine<4> q;
  q.axis = Axis::token;
  q.group = 8;
  std::vector<float> x(8);
  for (int i = 0; i < 8; ++i) x[i] = 1000.0f + 0.01f * static_cast<float>(i);
  CHECK(worst_ratio(q, x, 1, 8) <= 1.0);
}

TEST_CASE("constant groups get scale 0 and decode to their value exactly") {
  for (Axis axis : {Axis::channel, Axis::token}) {
    Affine<4, float> q;
    q.axis = axis;
    q.group = 4;
    std::vector<float> x(16, 0.3f), y(16);
    const AffineLayout l = q.layout(4, 4);
    std::vector<std::uint8_t> part(l.bytes);
    q.encode(x.data(), 1, 4, 4, part.data(), l.bytes);
    q.decode(part.data(), 4, 4, y.data());
    CHECK(y == x);
    const auto* sc = reinterpret_cast<const float*>(part.data() + l.scales);
    CHECK(sc[0] == 0.0f);
  }
  Affine<2> qh;  // fp16 storage: a representable constant is exact too
  qh.axis = Axis::token;
  qh.group = 4;
  std::vector<float> x(4, 0.5f), y(4);
  std::vector<std::uint8_t> part(qh.part_bytes(1, 4));
  qh.encode(x.data(), 1, 1, 4, part.data(), part.size());
  qh.decode(part.data(), 1, 4, y.data());
  CHECK(y == x);
}

TEST_CASE("affine codes follow KIVI's float32 rule bit for bit") {
  // Independent scalar statement of the rule: mn, mx, scale=(mx-mn)/(2^b-1),
  // code = nearbyint(clamp((x-mn)/scale)), deq = code*scale + mn.
  const index_t T = 64, D = 16;
  auto x = randn(static_cast<std::size_t>(T * D), 7);
  for (auto& v : x) v = to_float(to_half(v));  // fp16 grid: exact .5 ties occur
  for (int bits : {2, 4, 8}) {
    CAPTURE(bits);
    auto check = [&](auto q) {
      q.axis = Axis::channel;
      q.group = 32;
      const AffineLayout l = q.layout(T, D);
      std::vector<std::uint8_t> part(l.bytes);
      q.encode(x.data(), 1, T, D, part.data(), l.bytes);
      std::vector<float> y(x.size());
      q.decode(part.data(), T, D, y.data());
      const std::uint32_t maxc = (1u << decltype(q)::bits) - 1;
      for (index_t c = 0; c < D; ++c)
        for (index_t gt = 0; gt < T / 32; ++gt) {
          float mn = x[gt * 32 * D + c], mx = mn;
          for (index_t t = gt * 32; t < gt * 32 + 32; ++t) {
            mn = std::min(mn, x[t * D + c]);
            mx = std::max(mx, x[t * D + c]);
          }
          const float scale = (mx - mn) / static_cast<float>(maxc);
          for (index_t t = gt * 32; t < gt * 32 + 32; ++t) {
            float v = (x[t * D + c] - mn) / scale;
            v = std::min(std::max(v, 0.0f), static_cast<float>(maxc));
            const auto code = static_cast<std::uint32_t>(std::nearbyint(v));
            const std::uint8_t* row = part.data() + l.codes + t * l.row_bytes;
            REQUIRE(quant::unpack_one<decltype(q)::bits>(row, c) == code);
            const float p = static_cast<float>(code) * scale;
            REQUIRE(y[t * D + c] == p + mn);
          }
        }
    };
    if (bits == 2) check(Affine<2, float>{});
    if (bits == 4) check(Affine<4, float>{});
    if (bits == 8) check(Affine<8, float>{});
  }
}

TEST_CASE("a NaN element gets code 0 in the element rules and in every encode path (found by fuzz_quant)") {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  CHECK(quant::encode(nan, -1.0f, 0.5f, 15) == 0u);
  CHECK(quant::encode(nan, 0.0f, 1.0f, 255) == 0u);
  CHECK(quant::hqq_encode(nan, quant::hqq_init(-1.0f, 1.0f, 7), 7) == 0u);
  CHECK(quant::encode(-0.0f, 0.0f, 1.0f, 15) == 0u);  // the clamp's other edge as before
  CHECK(quant::encode(20.0f, 0.0f, 1.0f, 15) == 15u);
  // 3-bit (the generic path) and 4-bit (the fast paths) alike: the NaN's code is 0
  std::vector<float> x(64);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 9) - 4.0f;
  x[5] = nan;
  Affine<3> q3;
  Affine<4> q4;
  q3.axis = q4.axis = Axis::token;
  std::vector<std::uint8_t> b3(q3.part_bytes(2, 32)), b4(q4.part_bytes(2, 32));
  q3.encode(x.data(), 1, 2, 32, b3.data(), b3.size());
  q4.encode(x.data(), 1, 2, 32, b4.data(), b4.size());
  CHECK(quant::unpack_one<3>(b3.data() + q3.layout(2, 32).codes, 5) == 0u);
  CHECK(quant::unpack_one<4>(b4.data() + q4.layout(2, 32).codes, 5) == 0u);
}

TEST_CASE("outliers are stored exactly and shrink the group range") {
  Affine<4, float> q;
  q.axis = Axis::token;
  q.group = 16;
  q.outliers = OutlierRule{6.0f, 0.25};
  std::vector<float> x = randn(16, 3, 0.5f);
  x[3] = 40.0f;
  x[9] = -12.0f;
  const AffineLayout l = q.layout(1, 16);
  CHECK(l.slots == 4);
  std::vector<std::uint8_t> part(l.bytes);
  q.encode(x.data(), 1, 1, 16, part.data(), l.bytes);
  std::vector<float> y(16);
  q.decode(part.data(), 1, 16, y.data());
  CHECK(y[3] == 40.0f);
  CHECK(y[9] == -12.0f);
  const float scale = *reinterpret_cast<const float*>(part.data() + l.scales);
  CHECK(scale < 4.0f / 15.0f);  // range of the N(0, 0.5) rest, not 52
  for (int i = 0; i < 16; ++i) CHECK(std::fabs(y[i] - x[i]) <= scale / 2 * 1.0001f);
  Affine<4, float> bad = q;
  bad.outliers = OutlierRule{6.0f, 0.0};
  CHECK_THROWS_WITH_AS(bad.validate(16, "key_quantizer"), doctest::Contains("outliers.fraction"), Error);
}

TEST_CASE("fp16 storage round-trips through half") {
  Fp16 q;
  auto x = randn(40, 9);
  std::vector<std::uint8_t> part(q.part_bytes(5, 8));
  CHECK(part.size() == 80);
  q.encode(x.data(), 1, 5, 8, part.data(), part.size());
  std::vector<float> y(40);
  q.decode(part.data(), 5, 8, y.data());
  for (int i = 0; i < 40; ++i) CHECK(y[i] == to_float(to_half(x[i])));
}

TEST_CASE("Kivi scheme puts keys per channel and values per token") {
  Kivi<4, 2, 64, 128> k;
  CHECK(k.key.axis == Axis::channel);
  CHECK(k.value.axis == Axis::token);
  CHECK(k.key.group == 64);
  CHECK(k.value.group == 64);
  CHECK(k.residual == 128);
  static_assert(decltype(k.key)::bits == 4 && decltype(k.value)::bits == 2);
  static_assert(Quantizer<Affine<3>> && Quantizer<Fp16>);
  static_assert(KVScheme<Kivi<16>>);
}

TEST_CASE("the worked example of docs/format.md produces exactly the documented bytes") {
  const float k[16] = {0.0f, 1.0f, -2.0f, 0.5f, 0.5f, 1.0f, -1.0f, 0.5f, 1.0f, 1.0f, 0.0f, 0.25f, 1.5f, 1.0f, 1.0f, 0.0f};
  Affine<4> kq;
  kq.axis = Axis::channel;
  kq.group = 4;
  std::vector<std::uint8_t> p(kq.part_bytes(4, 4));
  kq.encode(k, 1, 4, 4, p.data(), p.size());
  const std::vector<std::uint8_t> key_bytes = {0x67, 0x2e, 0x00, 0x00, 0x67, 0x32, 0x45, 0x28, 0x00, 0x00, 0x00, 0x3c,
                                               0x00, 0xc0, 0x00, 0x00, 0x00, 0xf0, 0x05, 0xf5, 0x0a, 0x7a, 0x0f, 0x0f};
  CHECK(p == key_bytes);
  Affine<2> vq;
  vq.axis = Axis::token;
  vq.group = 4;
  std::vector<std::uint8_t> pv(vq.part_bytes(4, 4));
  vq.encode(k, 1, 4, 4, pv.data(), pv.size());
  const std::vector<std::uint8_t> value_bytes = {0x00, 0x3c, 0x56, 0x39, 0x56, 0x35, 0x00, 0x38, 0x00, 0xc0,
                                                 0x00, 0xbc, 0x00, 0x00, 0x00, 0x00, 0x8e, 0x8e, 0x4f, 0x2b};
  CHECK(pv == value_bytes);
}

// The fast encode path's group range must be the generic path's bit for bit: a sequential
// std::min / std::max (NaN ignored, the first of +0 / -0 kept), (0, 0) when nothing is left. With
// -march=native (test_quant_native) this runs the AVX-512 reduction used for 16-multiple groups.
TEST_CASE("fast::range_of equals the sequential min/max, signed zeros and NaN included") {
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-3.0f, 3.0f);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float specials[] = {0.0f, -0.0f, nan, 1e-40f, -1e-40f};
  for (index_t n : {1, 7, 16, 24, 31, 32, 40, 48, 64, 100, 128}) {  // multiples of 8: the vector loops
    for (int trial = 0; trial < 200; ++trial) {
      std::vector<float> x(static_cast<std::size_t>(n));
      const int mode = trial % 5;  // plain, sprinkled specials, all zeros of mixed sign, all NaN, zeros + NaN
      for (auto& v : x) {
        const unsigned r = rng() % 8;
        if (mode == 0) v = u(rng);
        else if (mode == 1) v = r < 3 ? specials[rng() % 5] : u(rng);
        else if (mode == 2) v = r < 4 ? 0.0f : -0.0f;
        else if (mode == 3) v = nan;
        else v = r < 3 ? nan : (r < 6 ? -0.0f : 0.0f);
      }
      float a = std::numeric_limits<float>::infinity(), b = -a;
      for (float v : x) {
        a = std::min(a, v);
        b = std::max(b, v);
      }
      if (a > b) a = b = 0.0f;
      float lo = 1, hi = 1;
      quant::fast::range_of(x.data(), n, lo, hi);
      CAPTURE(n);
      CAPTURE(mode);
      CHECK(std::memcmp(&lo, &a, 4) == 0);
      CHECK(std::memcmp(&hi, &b, 4) == 0);
    }
  }
}

namespace {

/// Three parts of Affine<Bits, S> codes of x (3 x T x D floats), with element accessors.
template <int Bits, class S>
struct Encoded {
  static constexpr index_t parts = 3;
  Affine<Bits, S> q;
  AffineLayout l;
  index_t T, D;
  std::vector<std::uint8_t> buf;
  Encoded(Axis axis, index_t T_, index_t D_, index_t group, const std::vector<float>& x) : T(T_), D(D_) {
    q.axis = axis;
    q.group = group;
    l = q.layout(T, D);
    buf.resize(l.bytes * static_cast<std::size_t>(parts));
    q.encode(x.data(), parts, T, D, buf.data(), l.bytes);
  }
  [[nodiscard]] const std::uint8_t* part(index_t p) const { return buf.data() + static_cast<std::size_t>(p) * l.bytes; }
  [[nodiscard]] float scale(index_t p, std::size_t g) const { return to_float(reinterpret_cast<const S*>(part(p) + l.scales)[g]); }
  [[nodiscard]] float min(index_t p, std::size_t g) const { return to_float(reinterpret_cast<const S*>(part(p) + l.mins)[g]); }
  [[nodiscard]] std::uint32_t code(index_t p, index_t t, index_t c) const {
    return quant::unpack_one<Bits>(part(p) + l.codes + static_cast<std::size_t>(t) * l.row_bytes, static_cast<std::size_t>(c));
  }
};

/// True when ok(t, c) holds for every element of a T x D part; else one failed check naming the
/// first element that does not (msg(t, c)).
template <class Ok, class Msg>
bool every_element(index_t T, index_t D, Ok&& ok, Msg&& msg) {
  for (index_t t = 0; t < T; ++t)
    for (index_t c = 0; c < D; ++c)
      if (!ok(t, c)) {
        FAIL_CHECK(msg(t, c));
        return false;
      }
  return true;
}

/// Affine::decode (the AVX-512 or AVX2 path where this process has it) against the element rule
/// quant::decode(unpack_one) computed here, bit for bit, over a few parts of one buffer.
template <int Bits, class S>
void check_decode_bits(Axis axis, index_t T, index_t D, index_t group, unsigned seed) {
  CAPTURE(Bits);
  CAPTURE(static_cast<int>(axis));
  CAPTURE(T);
  CAPTURE(D);
  CAPTURE(group);
  auto x = randn(static_cast<std::size_t>(3 * T * D), seed);
  for (std::size_t i = 0; i < x.size(); i += 7) x[i] *= 9.0f;  // wide groups
  const Encoded<Bits, S> e(axis, T, D, group, x);
  for (index_t p = 0; p < e.parts; ++p) {
    std::vector<float> y(static_cast<std::size_t>(T * D) + 1, -7.0f);
    e.q.decode(e.part(p), T, D, y.data());
    CHECK(y.back() == -7.0f);  // nothing written past T x D
    const auto want = [&](index_t t, index_t c) {
      const std::size_t g = e.q.group_of(t, c, D);
      return quant::decode(e.code(p, t, c), e.min(p, g), e.scale(p, g));
    };
    const auto got = [&](index_t t, index_t c) { return y[static_cast<std::size_t>(t * D + c)]; };
    CHECK(every_element(
        T, D, [&](index_t t, index_t c) { return float_bits(want(t, c)) == float_bits(got(t, c)); },
        [&](index_t t, index_t c) {
          return doctest::String("decode differs at t=") + doctest::toString(t) + " c=" + doctest::toString(c) + ": " +
                 doctest::toString(got(t, c)) + " vs " + doctest::toString(want(t, c));
        }));
  }
}

/// Encodes a few parts; every group's stored min and scale must be minmax_params' of its
/// sequential min / max, and every code quant::encode's with those parameters.
/// specials: signed zeros and NaN sprinkled in, and a stretch of zeros (-0 first) whose groups'
/// min and max are zeros of either sign (the sequential loop keeps the first).
template <int Bits, class S>
void check_encode_codes(Axis axis, index_t T, index_t D, index_t group, unsigned seed, bool specials = false) {
  CAPTURE(Bits);
  CAPTURE(D);
  CAPTURE(T);
  CAPTURE(group);
  CAPTURE(specials);
  auto x = randn(static_cast<std::size_t>(3 * T * D), seed);
  for (auto& v : x) v = to_float(to_half(v));  // fp16 grid: exact .5 ties occur
  for (std::size_t i = 0; i < x.size(); i += 11) x[i] *= 50.0f;
  for (index_t t = 0; t < T; ++t)  // a constant stretch: scale 0 where a group lies inside it
    for (index_t c = 0; c < std::min<index_t>(D, 20); ++c) x[static_cast<std::size_t>(t * D + c)] = 1.5f;
  if (specials) {
    for (std::size_t i = 0; i < x.size(); ++i) {
      if (i % 13 == 5) x[i] = (i / 13) % 2 ? 0.0f : -0.0f;
      if (i % 29 == 7) x[i] = std::numeric_limits<float>::quiet_NaN();
    }
    for (std::size_t i = 0; i < x.size(); ++i)  // zeros only, -0 first, in channels [D/2, D)
      if (static_cast<index_t>(i % static_cast<std::size_t>(D)) >= D / 2) x[i] = i % 3 ? 0.0f : -0.0f;
  }
  const Encoded<Bits, S> e(axis, T, D, group, x);
  const std::uint32_t maxc = (1u << Bits) - 1;
  for (index_t p = 0; p < e.parts; ++p) {
    const auto xv = [&](index_t t, index_t c) { return x[static_cast<std::size_t>((p * T + t) * D + c)]; };
    std::vector<float> glo(e.l.params, std::numeric_limits<float>::infinity()), ghi(e.l.params, -std::numeric_limits<float>::infinity());
    for (index_t t = 0; t < T; ++t)
      for (index_t c = 0; c < D; ++c) {
        const std::size_t g = e.q.group_of(t, c, D);
        glo[g] = std::min(glo[g], xv(t, c));
        ghi[g] = std::max(ghi[g], xv(t, c));
      }
    for (std::size_t g = 0; g < e.l.params; ++g)
      if (glo[g] > ghi[g]) glo[g] = ghi[g] = 0.0f;  // all NaN: range (0, 0)
    bool params_same = true;
    for (std::size_t g = 0; g < e.l.params && params_same; ++g) {
      const quant::GroupParams gp = quant::minmax_params<S>(glo[g], ghi[g], maxc);
      params_same = float_bits(e.min(p, g)) == float_bits(gp.min) && float_bits(e.scale(p, g)) == float_bits(gp.scale);
      if (!params_same)
        FAIL_CHECK("group " << g << " of part " << p << ": stored (" << e.min(p, g) << ", " << e.scale(p, g) << ") vs ("
                            << gp.min << ", " << gp.scale << ")");
    }
    CHECK(params_same);
    const auto want = [&](index_t t, index_t c) {
      const std::size_t g = e.q.group_of(t, c, D);
      return quant::encode(xv(t, c), e.min(p, g), e.scale(p, g), maxc);
    };
    CHECK(every_element(
        T, D, [&](index_t t, index_t c) { return e.code(p, t, c) == want(t, c); },
        [&](index_t t, index_t c) {
          return doctest::String("code differs at part ") + doctest::toString(p) + " t=" + doctest::toString(t) +
                 " c=" + doctest::toString(c) + ": " + doctest::toString(e.code(p, t, c)) + " vs " +
                 doctest::toString(want(t, c));
        }));
  }
}

}  // namespace

TEST_CASE("encode's parameters are minmax_params' and its codes quant::encode's for every width, axis, tail and group") {
  // head_dim 36 / 100: tails of 4 past 32-element vectors; token groups >= 16 run the per-element
  // loop (codes_vec), narrower ones the shared-parameter loop (codes_one); channel groups of 32
  for (const index_t D : {16, 36, 100, 128}) {
    check_encode_codes<4, half>(Axis::channel, 64, D, 32, 21);
    check_encode_codes<2, half>(Axis::channel, 32, D, 16, 22);
    check_encode_codes<8, float>(Axis::channel, 32, D, 32, 23);
    check_encode_codes<4, half>(Axis::token, 9, D, 32, 24);
    check_encode_codes<2, float>(Axis::token, 7, D, 16, 25);
    check_encode_codes<8, half>(Axis::token, 5, D, 64, 26);
    check_encode_codes<4, half>(Axis::token, 6, D, 4, 27);
    check_encode_codes<8, half>(Axis::token, 6, D, 12, 28);
    check_encode_codes<4, bfloat16>(Axis::token, 6, D, 32, 29);
    check_encode_codes<2, bfloat16>(Axis::channel, 32, D, 32, 30);
  }
  // the AVX2 encoders' shapes (head_dim a multiple of 32; token groups of 32k dividing it), with
  // signed zeros and NaN, and more rows than one token batch (1024 groups) holds
  for (const bool sp : {false, true}) {
    check_encode_codes<4, half>(Axis::token, 300, 128, 32, 31, sp);
    check_encode_codes<2, half>(Axis::token, 33, 128, 64, 32, sp);
    check_encode_codes<8, float>(Axis::token, 17, 128, 128, 33, sp);
    check_encode_codes<2, bfloat16>(Axis::token, 10, 96, 32, 34, sp);
    check_encode_codes<4, half>(Axis::channel, 96, 128, 32, 35, sp);
    check_encode_codes<2, half>(Axis::channel, 64, 64, 32, 36, sp);
    check_encode_codes<8, bfloat16>(Axis::channel, 32, 96, 16, 37, sp);
  }
}

TEST_CASE("decode is bit-identical to the element rule for every packed width, axis, tail and scale type") {
  // head_dim 100 / 136 / 40 / 36: row tails of 4 / 8 / 8 / 4 channels for 16-lane vectors (AVX-512),
  // 4 / 0 / 0 / 4 for 8-lane ones (AVX2: QPKV_CPU=avx2); groups of 48 (not a multiple of 16) and
  // 100 (one group per row, not a multiple of 16); Axis::channel groups of 16 and 32 tokens
  for (const index_t D : {16, 36, 40, 100, 128, 136}) {
    check_decode_bits<4, half>(Axis::channel, 32, D, 32, 1);
    check_decode_bits<2, half>(Axis::channel, 32, D, 16, 2);
    check_decode_bits<8, half>(Axis::channel, 64, D, 32, 3);
    check_decode_bits<4, float>(Axis::channel, 32, D, 32, 4);
    check_decode_bits<4, half>(Axis::token, 5, D, 32, 5);
    check_decode_bits<2, half>(Axis::token, 3, D, 16, 6);
    check_decode_bits<8, half>(Axis::token, 4, D, 64, 7);
    check_decode_bits<2, float>(Axis::token, 4, D, 48, 8);
    check_decode_bits<4, half>(Axis::token, 2, D, D, 9);
    check_decode_bits<3, half>(Axis::token, 2, D, 32, 10);  // 3-bit: the generic loop
    check_decode_bits<4, half>(Axis::token, 3, D, 4, 11);   // groups narrower than a vector
  }
}
