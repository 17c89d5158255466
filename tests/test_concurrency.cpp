// Concurrent const calls on one cache (issue "Reliability", item 3): attend(), dequantize(),
// positions() and the size queries are const and share no mutable state, so any number of threads
// may call them on one cache at once and get the single-threaded results bit for bit. scripts/test
// also runs this binary under ThreadSanitizer (preset tsan: clang + libomp, whose Archer tool
// makes the OpenMP regions inside attend() visible to TSan).
#include <doctest/doctest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "test_util.hpp"
#include "qpkv/cache/any_cache.hpp"
#include "qpkv/cache/compressed_kv.hpp"

using namespace qpkv;
using testing::randn;

namespace {

template <class Cache>
void hammer(const Cache& cache, int threads, int iterations) {
  const Shape s = cache.shape();
  const std::size_t n = static_cast<std::size_t>(s.q_heads * s.head_dim);
  std::vector<std::vector<float>> queries, expected;
  for (int i = 0; i < 8; ++i) {
    queries.push_back(randn(n, 100 + static_cast<unsigned>(i)));
    expected.emplace_back(n);
    cache.attend(queries.back().data(), expected.back().data());
  }
  const DenseKV dense = cache.dequantize();
  std::atomic<int> mismatches{0};
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t)
    pool.emplace_back([&, t] {
      std::vector<float> out(n);
      for (int it = 0; it < iterations; ++it) {
        const std::size_t i = static_cast<std::size_t>(t + it) % queries.size();
        cache.attend(queries[i].data(), out.data());
        if (out != expected[i]) ++mismatches;
        if (it % 4 == t % 4) {
          if (cache.dequantize().keys != dense.keys) ++mismatches;
          if (static_cast<index_t>(cache.positions(t % s.kv_heads).size()) != cache.tokens()) ++mismatches;
          if (cache.bytes() == 0) ++mismatches;
        }
      }
    });
  for (auto& th : pool) th.join();
  CHECK(mismatches.load() == 0);
}

}  // namespace

TEST_CASE("concurrent const attend calls on one cache from several threads give the single-threaded results") {
  const Shape s{4, 16, 64};
  const index_t N = 300;
  const auto k = randn(static_cast<std::size_t>(4 * N * 64), 1), v = randn(k.size(), 2),
             q = randn(static_cast<std::size_t>(16 * N * 64), 3);
  SUBCASE("KIVI-4 with an fp16 residual") {
    CompressedKV<KeepAll, Kivi<4, 4, 32, 32>> c(s);
    c.compress(view(k.data(), 4, N, 64), view(v.data(), 4, N, 64), N);
    hammer(c, 4, 12);
  }
  SUBCASE("3-bit keys with outliers (the decode-to-scratch path), 2-bit values") {
    Affine<3> kq;
    kq.outliers = OutlierRule{std::numeric_limits<float>::infinity(), 0.01};
    CompressedKV<KeepAll, Affine<3>, Affine<2>> c(s, {}, kq);
    c.compress(view(k.data(), 4, N, 64), view(v.data(), 4, N, 64), N);
    hammer(c, 4, 12);
  }
  SUBCASE("AnyCompressedKV") {
    AnyCompressedKV c(s, KVConfig::parse("snapkv,k4v2,window=16"));
    c.compress(view(k.data(), 4, N, 64), view(v.data(), 4, N, 64), view(q.data(), 16, N, 64), 128);
    hammer(c, 3, 12);
  }
}
