// libFuzzer target: Affine<Bits, ScaleT>::encode and ::decode (the fast paths this process picks:
// AVX-512, AVX2 or the vectorised loops, and the generic path where they do not apply) against
// the element rule written out here. The first bytes choose the bit width, the scale type, the
// axis, head_dim, the group, the token count and how the values are made (raw float bit patterns;
// small integers times a power of two, some of them replaced by +-0, NaN, +-inf or denormals;
// or 0..7 times a power of two with zeros of both signs, so that groups' minima are zeros).
// Oracles, per part and group: the sequential min / max of the group's elements (NaN skipped; the
// first of equal zeros kept; all NaN -> 0, 0) through quant::minmax_params; encode throws a
// qpkv::Error exactly when some group's parameters are not finite in the scale type, and
// otherwise stores those parameters bit for bit, codes equal to quant::encode's, zero high bits
// past a row's last code, and nothing past the parts; decode gives quant::decode's floats bit for
// bit and writes nothing past T x D.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "fuzz_bytes.hpp"
#include "qpkv/quant/affine_quantizer.hpp"

namespace {

using qpkv::index_t;
using qpkv_fuzz::Bytes;

float value(Bytes& b, int mode, float scale) {
  if (mode == 0) return b.raw_float();
  const std::uint8_t v = b.byte();
  if (mode >= 2 && v >= 240) {  // specials
    constexpr float inf = std::numeric_limits<float>::infinity();
    const float s[] = {0.0f, -0.0f, std::numeric_limits<float>::quiet_NaN(), 1e-40f, -1e-40f, inf, -inf, 3e38f};
    return s[v % 8];
  }
  if (mode == 3)  // 0..7 times scale, zeros of either sign: groups whose min is a zero
    return v % 8 == 0 ? (v & 8 ? -0.0f : 0.0f) : static_cast<float>(v % 8) * scale;
  return static_cast<float>(static_cast<std::int8_t>(v)) * scale;
}

std::uint32_t bits_of(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

template <int Bits, class S>
void run(Bytes& b, qpkv::Axis axis, index_t T, index_t D, index_t group, index_t parts) {
  const std::uint8_t m = b.byte();
  const int mode = m % 4;
  const float scale = std::ldexp(1.0f, static_cast<int>((m / 4) % 64) - 40);  // 2^-40 .. 2^23
  std::vector<float> x(static_cast<std::size_t>(parts * T * D));
  for (auto& v : x) v = value(b, mode, scale);

  qpkv::Affine<Bits, S> q;
  q.axis = axis;
  q.group = group;
  const qpkv::AffineLayout l = q.layout(T, D);
  constexpr std::uint8_t guard = 0xa5;
  std::vector<std::uint8_t> buf(l.bytes * static_cast<std::size_t>(parts) + 16, guard);
  bool threw = false;
  try {
    q.encode(x.data(), parts, T, D, buf.data(), l.bytes);
  } catch (const qpkv::Error&) {
    threw = true;
  }

  const std::uint32_t maxc = qpkv::quant::max_code(Bits);
  std::vector<qpkv::quant::GroupParams> gp(l.params * static_cast<std::size_t>(parts));
  bool storable = true;
  for (index_t p = 0; p < parts; ++p) {
    const float* xp = x.data() + p * T * D;
    for (std::size_t g = 0; g < l.params; ++g) {
      float lo = std::numeric_limits<float>::infinity(), hi = -lo;
      q.for_group(g, T, D, [&](index_t e) {
        lo = std::min(lo, xp[e]);
        hi = std::max(hi, xp[e]);
      });
      if (lo > hi) lo = hi = 0.0f;
      const qpkv::quant::GroupParams r = qpkv::quant::minmax_params<S>(lo, hi, maxc);
      storable = storable && std::isfinite(r.min) && std::isfinite(r.scale);
      gp[static_cast<std::size_t>(p) * l.params + g] = r;
    }
  }
  if (threw != !storable) std::abort();
  for (std::size_t i = l.bytes * static_cast<std::size_t>(parts); i < buf.size(); ++i)
    if (buf[i] != guard) std::abort();
  if (threw) return;

  for (index_t p = 0; p < parts; ++p) {
    const std::uint8_t* part = buf.data() + static_cast<std::size_t>(p) * l.bytes;
    const auto* sc = reinterpret_cast<const S*>(part + l.scales);
    const auto* mn = reinterpret_cast<const S*>(part + l.mins);
    const qpkv::quant::GroupParams* pg = gp.data() + static_cast<std::size_t>(p) * l.params;
    for (std::size_t g = 0; g < l.params; ++g)
      if (bits_of(qpkv::to_float(sc[g])) != bits_of(pg[g].scale) || bits_of(qpkv::to_float(mn[g])) != bits_of(pg[g].min))
        std::abort();
    const float* xp = x.data() + p * T * D;
    for (index_t t = 0; t < T; ++t) {
      const std::uint8_t* row = part + l.codes + static_cast<std::size_t>(t) * l.row_bytes;
      for (index_t c = 0; c < D; ++c) {
        const qpkv::quant::GroupParams& r = pg[q.group_of(t, c, D)];
        if (qpkv::quant::unpack_one<Bits>(row, static_cast<std::size_t>(c)) !=
            qpkv::quant::encode(xp[t * D + c], r.min, r.scale, maxc))
          std::abort();
      }
      const std::size_t used = static_cast<std::size_t>(D) * Bits;  // high bits of the last byte: 0
      if (used % 8 != 0 && (row[used / 8] >> (used % 8)) != 0) std::abort();
    }
    std::vector<float> y(static_cast<std::size_t>(T * D) + 1, -7.0f);
    q.decode(part, T, D, y.data());
    if (y.back() != -7.0f) std::abort();
    for (index_t t = 0; t < T; ++t) {
      const std::uint8_t* row = part + l.codes + static_cast<std::size_t>(t) * l.row_bytes;
      for (index_t c = 0; c < D; ++c) {
        const qpkv::quant::GroupParams& r = pg[q.group_of(t, c, D)];
        const float want = qpkv::quant::decode(qpkv::quant::unpack_one<Bits>(row, static_cast<std::size_t>(c)), r.min, r.scale);
        if (bits_of(y[static_cast<std::size_t>(t * D + c)]) != bits_of(want)) std::abort();
      }
    }
  }
}

template <int Bits>
void run_bits(Bytes& b, int scale_type, qpkv::Axis axis, index_t T, index_t D, index_t group, index_t parts) {
  if (scale_type == 0) run<Bits, qpkv::half>(b, axis, T, D, group, parts);
  else if (scale_type == 1) run<Bits, float>(b, axis, T, D, group, parts);
  else run<Bits, qpkv::bfloat16>(b, axis, T, D, group, parts);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes b{data, size};
  const int bits = b.byte() % 5;  // 1, 2, 3, 4, 8
  const int scale_type = b.byte() % 3;
  const qpkv::Axis axis = b.byte() % 2 ? qpkv::Axis::channel : qpkv::Axis::token;
  // head_dim and group: mostly the shapes the vector paths take (multiples of 8 / 16 / 32), else any
  static constexpr index_t kDims[] = {8, 16, 32, 64, 96, 128, 256};
  const std::uint8_t d = b.byte();
  const index_t D = d < 160 ? kDims[d % 7] : 1 + d % 96;
  static constexpr index_t kGroups[] = {8, 16, 32, 64, 128};
  const std::uint8_t g = b.byte();
  index_t group = g < 160 ? kGroups[g % 5] : 1 + g % 70;
  if (axis == qpkv::Axis::channel) group = std::min<index_t>(group, 64);
  const std::uint8_t t = b.byte();
  // channel groups span tokens: T is a whole number of them
  const index_t T = axis == qpkv::Axis::channel ? group * (1 + t % 3) : 1 + t % 40;
  const index_t parts = 1 + b.byte() % 3;
  if (parts * T * D > 65536) return 0;
  switch (bits) {
    case 0: run_bits<1>(b, scale_type, axis, T, D, group, parts); break;
    case 1: run_bits<2>(b, scale_type, axis, T, D, group, parts); break;
    case 2: run_bits<3>(b, scale_type, axis, T, D, group, parts); break;
    case 3: run_bits<4>(b, scale_type, axis, T, D, group, parts); break;
    default: run_bits<8>(b, scale_type, axis, T, D, group, parts); break;
  }
  return 0;
}
