// CompressedKV: fused attention on the packed cache vs a float64 dense reference on the dequantized
// cache, append across group boundaries, exact bytes, GQA, and the error paths.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "test_util.hpp"
#include "qpkv/attention/dense.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/snapkv.hpp"
#include "qpkv/io/npy.hpp"

using namespace qpkv;

using testing::randn;

namespace {

/// A selector that keeps every other token plus the last one: exercises gathering.
struct EveryOther {
  template <Element T>
  Selection select(const TensorView<T>& k, const TensorView<T>&, index_t, LayerInfo = {}) const {
    Selection s;
    for (index_t h = 0; h < k.heads; ++h) {
      std::vector<index_t> row;
      for (index_t t = h % 2; t < k.tokens - 1; t += 2) row.push_back(t);
      if (row.size() < static_cast<std::size_t>(k.tokens / 2)) row.insert(row.begin(), 0);
      row.push_back(k.tokens - 1);
      s.kept.push_back(row);
    }
    return s;
  }
  index_t kept_tokens(index_t n, index_t, LayerInfo = {}) const { return n / 2 + 1; }
  index_t queries_needed(index_t) const { return 0; }
};
static_assert(TokenSelector<EveryOther>);

/// attend() on the packed cache vs float64 attention over dequantize(): the kernel's own error.
template <class Cache>
double kernel_error(const Cache& cache, unsigned seed) {
  const Shape s = cache.shape();
  auto q = randn(static_cast<std::size_t>(s.q_heads * s.head_dim), seed);
  std::vector<float> out(q.size()), ref(q.size());
  cache.attend(q.data(), out.data());
  const DenseKV d = cache.dequantize();
  dense_attention(d.key_view(), d.value_view(), q.data(), s.q_heads, ref.data(), cache.softmax_scale());
  return relative_l2(out, ref);
}

template <class KQ, class VQ = KQ, class Sel = KeepAll>
void check_cache(Shape s, index_t N, KQ kq = {}, VQ vq = {}, CacheOptions opt = {}, index_t appends = 0) {
  auto k = randn(static_cast<std::size_t>(s.kv_heads * N * s.head_dim), 11);
  auto v = randn(k.size(), 12);
  for (index_t h = 0; h < s.kv_heads; ++h)  // an outlier channel in the keys, as real models have
    for (index_t t = 0; t < N; ++t) k[(h * N + t) * s.head_dim + 1] *= 8.0f;
  auto q = randn(static_cast<std::size_t>(s.q_heads * N * s.head_dim), 13);
  CompressedKV<Sel, KQ, VQ> cache(s, Sel{}, kq, vq, opt);
  cache.compress(view(k.data(), s.kv_heads, N, s.head_dim), view(v.data(), s.kv_heads, N, s.head_dim),
                 view(q.data(), s.q_heads, N, s.head_dim), N);
  const index_t kept = Sel{}.kept_tokens(N, N);
  CHECK(cache.tokens() == kept);
  index_t res = 0;
  const CacheLayout planned = plan_layout(s, cache.keys_quantizer(), cache.values_quantizer(), cache.residual_length(), kept, &res);
  CHECK(cache.bytes() == planned.total_bytes());
  CHECK(cache.state().residual == res);
  CHECK(kernel_error(cache, 1) <= 1e-5);
  for (index_t i = 0; i < appends; ++i) {
    auto kn = randn(static_cast<std::size_t>(s.kv_heads * s.head_dim), 100 + static_cast<unsigned>(i));
    auto vn = randn(kn.size(), 200 + static_cast<unsigned>(i));
    cache.append(kn.data(), vn.data());
    CHECK(cache.tokens() == kept + i + 1);
    CHECK(cache.positions(0).back() == N + i);
    if (i % 7 == 0 || i == appends - 1) CHECK(kernel_error(cache, 2 + static_cast<unsigned>(i)) <= 1e-5);
  }
}

}  // namespace

TEST_CASE("fused attention equals float64 attention over the dequantized cache (<= 1e-5 relative)") {
  const Shape s{2, 8, 64};
  SUBCASE("KIVI 4-bit, group 32") { check_cache<Kivi<4>>(s, 300); }
  SUBCASE("KIVI 2-bit keys, 4-bit values, group 64, residual 128") { check_cache<Kivi<2, 4, 64, 128>>(s, 517); }
  SUBCASE("KIVI 8-bit") { check_cache<Kivi<8>>(s, 97); }
  SUBCASE("1- and 3-bit") {
    check_cache<Affine<1>>(s, 200);
    check_cache<Affine<3>>(s, 200);
  }
  SUBCASE("fp16 keys and values (no residual, one token per block)") { check_cache<Fp16>(s, 123); }
  SUBCASE("per-token keys and per-channel values") {
    Affine<4> kq, vq;
    kq.axis = Axis::token;
    vq.axis = Axis::channel;
    vq.group = 16;
    check_cache<Affine<4>>(s, 131, kq, vq);
  }
  SUBCASE("outliers and HQQ zero points (block-wise decode path)") {
    Affine<4> kq;
    kq.outliers = OutlierRule{6.0f, 0.01};
    kq.zero_point = ZeroPoint::hqq;
    check_cache<Affine<4>>(s, 160, kq);
  }
  SUBCASE("head_dim not a multiple of the value group") {
    Affine<4> vq;
    vq.group = 24;
    check_cache<Affine<4>>(Shape{1, 3, 40}, 77, Affine<4>{}, vq);
  }
  SUBCASE("gathered selection") { check_cache<Kivi<4>, Kivi<4>, EveryOther>(s, 301); }
}

TEST_CASE("GQA: every query head reads its own KV head, for ratios 1, 2, 4, 8") {
  for (index_t g : {1, 2, 4, 8}) {
    CAPTURE(g);
    check_cache<Kivi<4>>(Shape{2, 2 * g, 32}, 96);
  }
}

TEST_CASE("append across group boundaries flushes the residual into blocks") {
  const Shape s{2, 4, 32};
  check_cache<Kivi<4>>(s, 70, {}, {}, {}, 70);                     // residual = group = 32
  check_cache<Kivi<2, 2, 32, 64>>(s, 40, {}, {}, {}, 90);          // residual 64: flush at 64
  check_cache<Fp16>(s, 10, {}, {}, {}, 5);                         // no residual at all
  // appending to a cache that was never compressed
  CompressedKV<KeepAll, Kivi<4>> c(s);
  auto k = randn(64, 1), v = randn(64, 2);
  for (int i = 0; i < 40; ++i) c.append(k.data(), v.data());
  CHECK(c.tokens() == 40);
  CHECK(c.state().blocks == 1);
  CHECK(c.state().residual == 8);
  CHECK(kernel_error(c, 3) <= 1e-5);
}

TEST_CASE("residual tokens are stored as fp16 and quantized tokens within half a step") {
  const Shape s{1, 1, 16};
  const index_t N = 40;
  auto k = randn(static_cast<std::size_t>(N * 16), 5), v = randn(k.size(), 6);
  CompressedKV<KeepAll, Kivi<8, 8, 32, 0, float>> c(s);
  c.compress(view(k.data(), 1, N, 16), view(v.data(), 1, N, 16), view(k.data(), 1, N, 16), N);
  CHECK(c.state().blocks == 1);
  CHECK(c.state().residual == 8);
  const DenseKV d = c.dequantize();
  for (index_t t = 32; t < N; ++t)
    for (index_t ch = 0; ch < 16; ++ch) CHECK(d.keys[t * 16 + ch] == to_float(to_half(k[t * 16 + ch])));
  for (index_t i = 0; i < 32 * 16; ++i) CHECK(std::fabs(d.keys[i] - k[i]) < 0.03f);
}

TEST_CASE("bytes() is the exact allocation: KIVI 4-bit group 32, head_dim 64") {
  // key part: 64 fp16 scales + 64 fp16 mins + 32 rows x 32 bytes = 1280;
  // value part: 32 tokens x 2 groups x (scale + min) x 2 bytes + 32 x 32 = 1280
  const Shape s{4, 4, 64};
  CompressedKV<KeepAll, Kivi<4>> c(s);
  CHECK(c.layout().key_part == 1280);
  CHECK(c.layout().value_part == 1280);
  const index_t N = 100;  // 3 blocks + 4 fp16 residual tokens
  auto k = randn(static_cast<std::size_t>(4 * N * 64), 1);
  c.compress(view(k.data(), 4, N, 64), view(k.data(), 4, N, 64), view(k.data(), 4, N, 64), N);
  CHECK(c.bytes() == 4u * (3u * 2560u + 4u * 64u * 2u * 2u));
  c.append(k.data(), k.data());  // the residual grows to its 32 slots
  CHECK(c.bytes() == 4u * (3u * 2560u + 32u * 64u * 2u * 2u));
  c.reserve(200);
  CHECK(c.bytes() == 4u * (7u * 2560u + 32u * 64u * 2u * 2u));
  CHECK(c.tokens() == 101);
}

TEST_CASE("half and bfloat16 inputs are accepted and read as their float values") {
  const Shape s{2, 4, 32};
  const index_t N = 64;
  auto kf = randn(static_cast<std::size_t>(2 * N * 32), 1), vf = randn(kf.size(), 2);
  std::vector<half> kh(kf.size()), vh(kf.size());
  for (std::size_t i = 0; i < kf.size(); ++i) {
    kh[i] = to_half(kf[i]);
    vh[i] = to_half(vf[i]);
    kf[i] = to_float(kh[i]);
    vf[i] = to_float(vh[i]);
  }
  CompressedKV<KeepAll, Kivi<4>> a(s), b(s);
  a.compress(view(kf.data(), 2, N, 32), view(vf.data(), 2, N, 32), view(kf.data(), 4, N / 2, 32), N);
  b.compress(view(kh.data(), 2, N, 32), view(vh.data(), 2, N, 32), view(kh.data(), 4, N / 2, 32), N);
  CHECK(a.dequantize().keys == b.dequantize().keys);
}

TEST_CASE("bad input raises qpkv::Error naming the argument") {
  const Shape s{2, 4, 16};
  const index_t N = 8;
  std::vector<float> k(2 * N * 16, 0.5f), q(4 * N * 16, 0.5f);
  CompressedKV<KeepAll, Kivi<4>> c(s);
  CHECK_THROWS_WITH_AS(c.compress(view(k.data(), 3, N / 2, 16), view(k.data(), 3, N / 2, 16), view(q.data(), 4, N, 16), N),
                       doctest::Contains("keys.heads"), Error);
  CHECK_THROWS_WITH_AS(c.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N / 2, 16), view(q.data(), 4, N, 16), N),
                       doctest::Contains("values.tokens"), Error);
  CompressedKV<SnapKV, Kivi<4>> snap(s, SnapKV{.window = 4});
  CHECK_THROWS_WITH_AS(snap.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N, 16), view(q.data(), 2, N, 16), N),
                       doctest::Contains("queries.heads"), Error);
  CHECK_THROWS_WITH_AS(snap.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N, 16), N), doctest::Contains("queries"), Error);
  CompressedKV<KeepAll, Kivi<4>> c2(s);
  CHECK_NOTHROW(c2.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N, 16), N));  // KeepAll reads no queries
  CHECK_THROWS_WITH_AS(c.attend(q.data(), q.data()), doctest::Contains("empty cache"), Error);
  k[17] = std::numeric_limits<float>::quiet_NaN();
  CHECK_THROWS_WITH_AS(c.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N, 16), view(q.data(), 4, N, 16), N),
                       doctest::Contains("keys: expected finite"), Error);
  k[17] = 0.5f;
  c.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N, 16), view(q.data(), 4, N, 16), N);
  q[3] = std::numeric_limits<float>::infinity();
  std::vector<float> out(64);
  CHECK_THROWS_WITH_AS(c.attend(q.data(), out.data()), doctest::Contains("q: expected finite"), Error);
  CHECK_THROWS_WITH_AS((void)c.positions(2), doctest::Contains("head"), Error);
  CHECK_THROWS_WITH_AS((CompressedKV<KeepAll, Kivi<4>>(Shape{2, 3, 16})), doctest::Contains("shape.q_heads"), Error);
  Selection bad{{{0, 1}, {1, 0}}};
  CHECK_THROWS_WITH_AS(c.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N, 16), bad), doctest::Contains("ascending"), Error);
  Selection uneven{{{0, 1}, {1}}};
  CHECK_THROWS_WITH_AS(c.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N, 16), uneven), doctest::Contains("kept[1]"), Error);
  std::vector<float> big(2 * 64 * 16, 1e6f), qb(4 * 64 * 16, 0.5f);
  big[0] = -1e6f;  // the quantized blocks' fp16 scales cannot hold it
  CHECK_THROWS_WITH_AS(c.compress(view(big.data(), 2, 64, 16), view(big.data(), 2, 64, 16), view(qb.data(), 4, 64, 16), 64),
                       doctest::Contains("float16"), Error);
  // nor can the fp16 residual
  CHECK_THROWS_WITH_AS(c.compress(view(big.data(), 2, N, 16), view(big.data(), 2, N, 16), view(q.data(), 4, N, 16), N),
                       doctest::Contains("fp16 residual"), Error);
  // float scale storage takes such magnitudes in its blocks
  CompressedKV<KeepAll, Kivi<4, 4, 32, 0, float>> cf(s);
  cf.compress(view(big.data(), 2, 64, 16), view(big.data(), 2, 64, 16), view(qb.data(), 4, 64, 16), 64);
  CHECK(cf.tokens() == 64);
}

TEST_CASE("SnapKV + KIVI-4 on the case-a conformance layer keeps the reference code's tokens") {
  const std::string dir = std::string(QPKV_TEST_DATA) + "/conformance/";
  const auto k = io::load_npy(dir + "inputs_a_key_states.npy").as<float>();
  const auto v = io::load_npy(dir + "inputs_a_value_states.npy").as<float>();
  const auto q = io::load_npy(dir + "inputs_a_query_states.npy").as<float>();
  const auto ref = io::load_npy(dir + "selection/sel_a_snapkv_cap128_w32_k5_avg.npy");
  const auto sel = ref.as<index_t>();
  const Shape s{4, 4, 64};
  CompressedKV<SnapKV, Kivi<4>> cache(s);
  cache.compress(view(k.data(), 4, 512, 64), view(v.data(), 4, 512, 64), view(q.data(), 4, 512, 64), 128);
  CHECK(cache.tokens() == 128);
  CHECK(cache.state().blocks == 4);
  for (index_t h = 0; h < 4; ++h) {
    const auto p = cache.positions(h);
    CHECK(std::vector<index_t>(p.begin(), p.end()) == std::vector<index_t>(sel.begin() + h * 128, sel.begin() + (h + 1) * 128));
  }
  CHECK(kernel_error(cache, 9) <= 1e-5);
  // against the uncompressed layer: the decode query is the last prompt query
  std::vector<float> qd(4 * 64), out(qd.size()), full(qd.size());
  for (index_t h = 0; h < 4; ++h)
    for (index_t c = 0; c < 64; ++c) qd[h * 64 + c] = q[(h * 512 + 511) * 64 + c];
  cache.attend(qd.data(), out.data());
  dense_attention(view(k.data(), 4, 512, 64), view(v.data(), 4, 512, 64), qd.data(), 4, full.data());
  MESSAGE("SnapKV cap 128 + KIVI-4 vs full layer, last query: rel err " << relative_l2(out, full) << ", " << cache.bytes()
                                                                       << " bytes vs " << 2 * 4 * 512 * 64 * 2 << " fp16");
  CHECK(relative_l2(out, full) < 0.2);
}

#if defined(_OPENMP)
#include <omp.h>
TEST_CASE("attend gives identical results with 1 and 2 threads") {
  const Shape s{4, 16, 64};
  const index_t N = 1000;
  auto k = randn(static_cast<std::size_t>(4 * N * 64), 1), v = randn(k.size(), 2);
  CompressedKV<KeepAll, Kivi<4>> c(s);
  c.compress(view(k.data(), 4, N, 64), view(v.data(), 4, N, 64), N);
  auto q = randn(16 * 64, 3);
  std::vector<float> a(q.size()), b(q.size());
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  c.attend(q.data(), a.data());
  omp_set_num_threads(2);
  c.attend(q.data(), b.data());
  omp_set_num_threads(saved);
  CHECK(a == b);
}

TEST_CASE("dequantize gives identical results with 1 and 2 threads, and equals each block's decode") {
  const Shape s{4, 16, 64};
  const index_t N = 1000;  // 31 blocks per head (4 x 31 x 32 x 64 elements: the parallel loop) + 8 residual
  auto k = randn(static_cast<std::size_t>(4 * N * 64), 4), v = randn(k.size(), 5);
  CompressedKV<KeepAll, Kivi<2>> c(s);
  c.compress(view(k.data(), 4, N, 64), view(v.data(), 4, N, 64), N);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const DenseKV one = c.dequantize();
  omp_set_num_threads(2);
  const DenseKV two = c.dequantize();
  omp_set_num_threads(saved);
  CHECK(one.keys == two.keys);
  CHECK(one.values == two.values);
  // block 17 of head 3 through the quantizers directly (the 2-bit parts' own decode)
  const CacheLayout& L = c.layout();
  const std::uint8_t* blk = c.state().data + L.block_offset(3, 17);
  std::vector<float> kb(32 * 64), vb(kb.size());
  c.keys_quantizer().decode(blk, 32, 64, kb.data());
  c.values_quantizer().decode(blk + L.key_part, 32, 64, vb.data());
  CHECK(std::equal(kb.begin(), kb.end(), one.keys.begin() + (3 * N + 17 * 32) * 64));
  CHECK(std::equal(vb.begin(), vb.end(), one.values.begin() + (3 * N + 17 * 32) * 64));
}
#endif
