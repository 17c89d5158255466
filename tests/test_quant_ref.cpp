// Quantizers against the reference libraries' own outputs on the case-a conformance inputs
// (tests/data/quant_ref, produced by KIVI's quant/new_pack.py and hqq 0.2.8.post1; see its README).
#include <doctest/doctest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "qpkv/attention/dense.hpp"
#include "qpkv/io/npy.hpp"
#include "qpkv/quant/affine_quantizer.hpp"

using namespace qpkv;

namespace {

const std::string kDir = std::string(QPKV_TEST_DATA) + "/quant_ref/";
constexpr index_t H = 4, N = 512, D = 64;            // case a
constexpr index_t SH = 2, SN = 256;                   // stored slice: heads 0-1, tokens 0-255

std::vector<float> input(char tensor) {
  const std::string f = std::string(QPKV_TEST_DATA) + "/conformance/inputs_a_" + (tensor == 'K' ? "key" : "value") + "_states.npy";
  return io::load_npy(f).as<float>();
}

struct Result {
  std::vector<std::uint8_t> codes;  // (H, N, D)
  std::vector<float> deq;           // (H, N, D)
  std::vector<float> scale, min;    // per group, in the reference's (head, group-row, col) order
};

/// Quantizes the whole (H, N, D) tensor in one encode call, KIVI axes: K per channel over `gs`
/// tokens (parts of gs tokens), V per token over `gs` channels (one part per head).
template <int Bits>
Result run(char tensor, index_t gs, ZeroPoint zp, int iters) {
  Affine<Bits, float> q;
  q.axis = tensor == 'K' ? Axis::channel : Axis::token;
  q.group = gs;
  q.zero_point = zp;
  q.hqq.iters = iters;
  const index_t T = tensor == 'K' ? gs : N;
  const index_t parts = H * N / T;
  const AffineLayout l = q.layout(T, D);
  std::vector<std::uint8_t> buf(l.bytes * parts);
  const std::vector<float> x = input(tensor);
  q.encode(x.data(), parts, T, D, buf.data(), l.bytes);
  Result r;
  r.codes.resize(x.size());
  r.deq.resize(x.size());
  for (index_t p = 0; p < parts; ++p) {
    const std::uint8_t* part = buf.data() + p * l.bytes;
    q.decode(part, T, D, r.deq.data() + p * T * D);
    for (index_t t = 0; t < T; ++t)
      for (index_t c = 0; c < D; ++c)
        r.codes[(p * T + t) * D + c] = static_cast<std::uint8_t>(
            quant::unpack_one<Bits>(part + l.codes + t * l.row_bytes, static_cast<std::size_t>(c)));
    const auto* sc = reinterpret_cast<const float*>(part + l.scales);
    const auto* mn = reinterpret_cast<const float*>(part + l.mins);
    r.scale.insert(r.scale.end(), sc, sc + l.params);
    r.min.insert(r.min.end(), mn, mn + l.params);
  }
  return r;
}

/// Element (h, t, c) of the stored slice as a flat index into our (H, N, D) arrays.
index_t full_index(index_t i) {
  const index_t h = i / (SN * D), t = (i / D) % SN, c = i % D;
  return (h * N + t) * D + c;
}

std::string stem(const char* method, char tensor, int bits, index_t gs) {
  return std::string(method) + "_" + tensor + "_b" + std::to_string(bits) + "_g" + std::to_string(gs);
}

template <int Bits>
void check_kivi(char tensor, index_t gs) {
  const std::string s = stem("kivi", tensor, Bits, gs);
  CAPTURE(s);
  const Result r = run<Bits>(tensor, gs, ZeroPoint::minmax, 0);
  const auto codes = io::load_npy(kDir + s + "_codes.npy").as<int>();
  const auto deq = io::load_npy(kDir + s + "_deq.npy").as<float>();
  const auto scale = io::load_npy(kDir + s + "_scale.npy").as<float>();
  const auto mn = io::load_npy(kDir + s + "_mn.npy").as<float>();
  std::size_t code_diff = 0, deq_diff = 0;
  for (index_t i = 0; i < SH * SN * D; ++i) {
    code_diff += r.codes[full_index(i)] != codes[i];
    deq_diff += r.deq[full_index(i)] != deq[i];
  }
  CHECK(code_diff == 0);  // bit-exact, .5 ties included
  CHECK(deq_diff == 0);
  // group parameters: K (h, N/gs, D) stored as (SH, SN/gs, D); V (h, N, D/gs) as (SH, SN, D/gs)
  const index_t rows = tensor == 'K' ? SN / gs : SN, full_rows = tensor == 'K' ? N / gs : N;
  const index_t cols = tensor == 'K' ? D : D / gs;
  std::size_t param_diff = 0;
  for (index_t h = 0; h < SH; ++h)
    for (index_t rr = 0; rr < rows; ++rr)
      for (index_t c = 0; c < cols; ++c) {
        const index_t ours = (h * full_rows + rr) * cols + c, ref = (h * rows + rr) * cols + c;
        param_diff += r.scale[ours] != scale[ref] || r.min[ours] != mn[ref];
      }
  CHECK(param_diff == 0);
}

template <int Bits>
void check_hqq(char tensor, index_t gs, bool optimize, const nlohmann::json& meta) {
  const std::string s = stem(optimize ? "hqqopt" : "hqqmm", tensor, Bits, gs);
  CAPTURE(s);
  const Result r = run<Bits>(tensor, gs, ZeroPoint::hqq, optimize ? 20 : 0);
  const auto codes = io::load_npy(kDir + s + "_codes.npy").as<int>();
  const auto deq = io::load_npy(kDir + s + "_deq.npy").as<float>();
  std::size_t code_diff = 0;
  double worst_deq = 0;
  for (index_t i = 0; i < SH * SN * D; ++i) {
    code_diff += r.codes[full_index(i)] != codes[i];
    worst_deq = std::max(worst_deq, std::fabs(double(r.deq[full_index(i)]) - deq[i]));
  }
  const double ours = relative_l2(r.deq, input(tensor));
  const double ref = meta["rel_err"][s].get<double>();
  CAPTURE(ours);
  CAPTURE(ref);
  if (!optimize) {
    CHECK(code_diff == 0);
    CHECK(worst_deq < 1e-5);  // (code - zero) * scale vs code * scale + min: float rounding only
    CHECK(std::fabs(ours - ref) <= 1e-6 * ref);
  } else {
    // The reference README's tolerance for the order-sensitive optimizer.
    CHECK(double(code_diff) <= 1e-3 * double(SH * SN * D));
    CHECK(std::fabs(ours - ref) <= 1e-2 * ref);
  }
}

nlohmann::json meta() {
  std::ifstream f(kDir + "rel_err.json");
  return nlohmann::json::parse(f);
}

}  // namespace

TEST_CASE("KIVI codes, scales, mins and dequantized values match KIVI's quant_and_pack bit for bit") {
  for (char t : {'K', 'V'})
    for (index_t gs : {32, 64}) {
      check_kivi<2>(t, gs);
      check_kivi<4>(t, gs);
      check_kivi<8>(t, gs);
    }
}

TEST_CASE("HQQ min-max (optimize=False) codes match hqq's Quantizer bit for bit") {
  const auto m = meta();
  for (char t : {'K', 'V'})
    for (index_t gs : {32, 64}) {
      check_hqq<2>(t, gs, false, m);
      check_hqq<4>(t, gs, false, m);
      check_hqq<8>(t, gs, false, m);
    }
}

TEST_CASE("HQQ proximal zero-point refinement matches hqq's optimizer within the README's tolerance") {
  const auto m = meta();
  for (char t : {'K', 'V'}) {
    check_hqq<2>(t, 64, true, m);
    check_hqq<4>(t, 64, true, m);
    check_hqq<8>(t, 64, true, m);
    check_hqq<4>(t, 32, true, m);
  }
}
