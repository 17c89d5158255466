// Property tests over random configurations (issue "Reliability", item 5): N in 1..5000, head_dim in
// 8..256, bits in {1, 2, 3, 4, 8} (and fp16 on one side), groups 8..128, residual, GQA 1..8. For
// each cache: the planner's bytes equal the allocation; every quantized element decodes within
// half a step of its stored scale, every residual element is its fp16 rounding; attention is
// finite and equals the float64 reference over the dequantized cache; it is bit-identical with 1
// and 2 OpenMP threads and after a save/load round trip. A fixed seed keeps CI reproducible;
// QPKV_PROPERTY_SEED and QPKV_PROPERTY_CASES (environment) explore further.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdlib>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "test_util.hpp"
#include "qpkv/attention/dense.hpp"
#include "qpkv/cache/any_cache.hpp"
#include "qpkv/cache/budget.hpp"
#include "qpkv/cache/serialize.hpp"

using namespace qpkv;

namespace {

unsigned env_or(const char* name, unsigned fallback) {
  const char* v = std::getenv(name);
  return v ? static_cast<unsigned>(std::strtoul(v, nullptr, 10)) : fallback;
}

struct Case {
  Shape shape;
  index_t N = 0;
  KVConfig config;
  std::string text;
};

Case random_case(std::mt19937& rng) {
  auto pick = [&](index_t lo, index_t hi) { return std::uniform_int_distribution<index_t>(lo, hi)(rng); };
  static constexpr int kBits[] = {1, 2, 3, 4, 8};
  Case c;
  const index_t kv = pick(1, 3), ratio = pick(1, 8), D = pick(8, 256);
  c.shape = Shape{kv, kv * ratio, D};
  // N up to 5000, but keep kv x N x D (and so the test's time) bounded
  const index_t max_n = std::min<index_t>(5000, 400'000 / (kv * D));
  c.N = pick(1, std::max<index_t>(1, max_n));
  int kb = kBits[pick(0, 4)], vb = kBits[pick(0, 4)];
  if (pick(0, 5) == 0) (pick(0, 1) ? kb : vb) = 16;
  if (!any_supports({kb, vb})) vb = kb;
  c.text = "keep_all," + (kb == vb ? "kivi" + std::to_string(kb) : "k" + std::to_string(kb) + "v" + std::to_string(vb)) +
           ",group=" + std::to_string(pick(8, 128)) + ",residual=" + std::to_string(pick(0, 1) ? 0 : pick(1, 160));
  if (kb == 16 && vb == 16) c.text = "keep_all,fp16";
  c.config = KVConfig::parse(c.text);
  return c;
}

/// |x - x'| <= scale/2 for every quantized element (scale as stored), x' = fp16(x) in the residual.
template <class Cache>
void check_decode_bound(const Cache& cache, const std::vector<float>& k, const std::vector<float>& v, index_t N) {
  const Shape s = cache.shape();
  const CacheLayout& L = cache.layout();
  const CacheState st = cache.state();
  const index_t B = L.block_tokens, D = s.head_dim, quantized = st.blocks * B;
  const DenseKV d = cache.dequantize();
  auto check_part = [&](const auto& q, const std::vector<float>& x, const std::vector<float>& xd, std::size_t part_offset) {
    using Q = std::remove_cvref_t<decltype(q)>;
    for (index_t h = 0; h < s.kv_heads; ++h)
      for (index_t b = 0; b < st.blocks; ++b) {
        const std::uint8_t* part = st.data + L.block_offset(h, b) + part_offset;
        for (index_t t = 0; t < B; ++t)
          for (index_t c = 0; c < D; ++c) {
            const std::size_t i = static_cast<std::size_t>((h * N + b * B + t) * D + c);
            const float orig = x[i], dec = xd[i];
            if constexpr (Q::bits == 16) {
              REQUIRE(dec == to_float(to_half(orig)));
            } else {
              using S = typename Q::scale_type;
              const AffineLayout l = q.layout(B, D);
              S sc;
              std::memcpy(&sc, part + l.scales + q.group_of(t, c, D) * sizeof(S), sizeof sc);
              const float bound = to_float(sc) / 2 * (1 + 1e-5f) + 4e-7f * std::max(std::fabs(orig), 1e-30f);
              if (!(std::fabs(orig - dec) <= bound)) {
                CAPTURE(h);
                CAPTURE(b);
                CAPTURE(t);
                CAPTURE(c);
                CAPTURE(orig);
                CAPTURE(dec);
                CAPTURE(to_float(sc));
                FAIL("element decodes farther than scale/2");
              }
            }
          }
      }
  };
  check_part(cache.keys_quantizer(), k, d.keys, 0);
  check_part(cache.values_quantizer(), v, d.values, L.key_part);
  for (index_t h = 0; h < s.kv_heads; ++h)
    for (index_t t = quantized; t < N; ++t)
      for (index_t c = 0; c < D; ++c) {
        const std::size_t i = static_cast<std::size_t>((h * N + t) * D + c);
        REQUIRE(d.keys[i] == to_float(to_half(k[i])));
        REQUIRE(d.values[i] == to_float(to_half(v[i])));
      }
}

std::vector<float> attend(const AnyCompressedKV& c, const std::vector<float>& q) {
  std::vector<float> out(q.size());
  c.attend(q.data(), out.data());
  return out;
}

}  // namespace

TEST_CASE("random shapes, bit widths and groups: exact bytes, half-step decode, reference attention, thread- and file-independence") {
  const unsigned seed = env_or("QPKV_PROPERTY_SEED", 20240611u), cases = env_or("QPKV_PROPERTY_CASES", 40u);
  std::mt19937 rng(seed);
  MESSAGE("seed ", seed, ", ", cases, " cases");
  for (unsigned n = 0; n < cases; ++n) {
    const Case c = random_case(rng);
    const Shape s = c.shape;
    const index_t N = c.N;
    CAPTURE(n);
    CAPTURE(c.text);
    CAPTURE(s.kv_heads);
    CAPTURE(s.q_heads);
    CAPTURE(s.head_dim);
    CAPTURE(N);
    // keys with an outlier channel and a drift, values plain Gaussian, from a per-case seed
    auto k = testing::randn(static_cast<std::size_t>(s.kv_heads * N * s.head_dim), 1000 + n);
    auto v = testing::randn(k.size(), 2000 + n);
    for (index_t h = 0; h < s.kv_heads; ++h)
      for (index_t t = 0; t < N; ++t) {
        k[static_cast<std::size_t>((h * N + t) * s.head_dim)] *= 10.0f;
        k[static_cast<std::size_t>((h * N + t) * s.head_dim + s.head_dim - 1)] += 0.001f * static_cast<float>(t);
      }
    AnyCompressedKV cache(s, c.config);
    const TensorView<float> no_queries{nullptr, s.q_heads, 0, s.head_dim, 0, s.head_dim};  // KeepAll reads none
    cache.compress(view(k.data(), s.kv_heads, N, s.head_dim), view(v.data(), s.kv_heads, N, s.head_dim), no_queries, N);
    REQUIRE(cache.tokens() == N);

    // planned bytes == allocated bytes (the planner's run-time QuantSpec and plan_layout)
    const QuantSpec spec{c.config.key_bits, c.config.value_bits, c.config.group, c.config.residual};
    CHECK(footprint(s, spec, N) == cache.bytes());

    cache.visit([&](const auto& cc) { check_decode_bound(cc, k, v, N); });

    // attention: finite and equal to float64 attention over the dequantized cache
    const auto q = testing::randn(static_cast<std::size_t>(s.q_heads * s.head_dim), 3000 + n);
    const std::vector<float> out = attend(cache, q);
    for (float x : out) REQUIRE(std::isfinite(x));
    const DenseKV d = cache.dequantize();
    std::vector<float> ref(q.size());
    dense_attention(d.key_view(), d.value_view(), q.data(), s.q_heads, ref.data(), cache.softmax_scale());
    CHECK(relative_l2(out, ref) <= 1e-5);

#if defined(_OPENMP)
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    const std::vector<float> one = attend(cache, q);
    omp_set_num_threads(2);
    const std::vector<float> two = attend(cache, q);
    omp_set_num_threads(saved);
    CHECK(one == out);
    CHECK(two == out);
#endif

    // a save/load round trip changes nothing
    std::stringstream ss;
    save(ss, cache);
    const AnyCompressedKV loaded = load_any(ss);
    CHECK(attend(loaded, q) == out);
    CHECK(loaded.bytes() == cache.bytes());
  }
}
