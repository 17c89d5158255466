// Shared by the qpkv_bench sources: synthetic layers and a cache of built caches.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace qpkv::bench {

/// Fast deterministic pseudo-normal numbers (sum of two uniforms; the distribution does not matter
/// for speed, only that values are not constant).
inline void fill(std::vector<float>& x, std::uint64_t seed, float sigma = 1.0f) {
  std::uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& v : x) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    const float a = static_cast<float>(s & 0xffffff) / 16777216.0f, b = static_cast<float>((s >> 24) & 0xffffff) / 16777216.0f;
    v = sigma * 1.7f * (a + b - 1.0f);
  }
}

/// A Llama-3-8B-like layer: 8 KV heads, head_dim 128, an outlier key channel.
struct Layer {
  static constexpr int kv_heads = 8, q_heads = 32, dim = 128;
  long tokens = 0;
  std::vector<float> keys, values;
  explicit Layer(long n) : tokens(n), keys(static_cast<std::size_t>(kv_heads * n * dim)), values(keys.size()) {
    fill(keys, 1);
    fill(values, 2);
    for (long t = 0; t < kv_heads * n; ++t) keys[static_cast<std::size_t>(t * dim + 5)] *= 8.0f;
  }
};

inline void set_threads(int t) {
#if defined(_OPENMP)
  omp_set_num_threads(t);
#else
  (void)t;
#endif
}

}  // namespace qpkv::bench
