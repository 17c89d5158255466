// custom_policy.cpp - write your own token selector and quantizer, plug them into CompressedKV.
//
// A selector is any type with select / kept_tokens / queries_needed (qpkv::TokenSelector); a
// quantizer is any type with bits / axis / group_tokens / part_bytes / encode / decode / validate
// (qpkv::Quantizer). The static_asserts below turn a mistake into one readable line.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "qpkv/qpkv.hpp"

/// Keeps `sinks` first tokens, every `stride`-th token of the middle, and the last `window`.
struct StridedSelector {
  qpkv::index_t sinks = 4, stride = 4, window = 32;

  template <qpkv::Element T>
  qpkv::Selection select(const qpkv::TensorView<T>& keys, const qpkv::TensorView<T>&, qpkv::index_t capacity,
                         qpkv::LayerInfo = {}) const {
    qpkv::Selection s;
    const qpkv::index_t n = keys.tokens;
    for (qpkv::index_t h = 0; h < keys.heads; ++h) {
      std::vector<qpkv::index_t> kept;
      for (qpkv::index_t t = 0; t < n; ++t)
        if (t < sinks || t >= n - window || (t - sinks) % stride == 0) kept.push_back(t);
      if (static_cast<qpkv::index_t>(kept.size()) > capacity)  // too many: drop middle tokens
        kept.erase(kept.begin() + sinks, kept.begin() + sinks + (static_cast<qpkv::index_t>(kept.size()) - capacity));
      s.kept.push_back(std::move(kept));
    }
    return s;
  }
  qpkv::index_t kept_tokens(qpkv::index_t n, qpkv::index_t capacity, qpkv::LayerInfo = {}) const {
    qpkv::index_t k = 0;
    for (qpkv::index_t t = 0; t < n; ++t) k += (t < sinks || t >= n - window || (t - sinks) % stride == 0);
    return std::min(k, capacity);
  }
  qpkv::index_t queries_needed(qpkv::index_t) const { return 0; }
};
static_assert(qpkv::TokenSelector<StridedSelector>, "StridedSelector must model qpkv::TokenSelector");

/// Symmetric int8 per token: x' = code * absmax / 127 with one float scale per token row.
struct AbsMaxInt8 {
  static constexpr int bits = 8;
  qpkv::Axis axis = qpkv::Axis::token;

  qpkv::index_t group_tokens() const { return 1; }
  std::size_t part_bytes(qpkv::index_t tokens, qpkv::index_t dim) const {
    return qpkv::align4(static_cast<std::size_t>(tokens) * (sizeof(float) + static_cast<std::size_t>(dim)));
  }
  void validate(qpkv::index_t, std::string_view) const {}
  void encode(const float* src, qpkv::index_t parts, qpkv::index_t tokens, qpkv::index_t dim, std::uint8_t* dst,
              std::size_t stride) const {
    for (qpkv::index_t p = 0; p < parts; ++p) {
      std::uint8_t* out = dst + p * stride;
      std::memset(out, 0, part_bytes(tokens, dim));
      for (qpkv::index_t t = 0; t < tokens; ++t) {
        const float* x = src + (p * tokens + t) * dim;
        float amax = 0.0f;
        for (qpkv::index_t c = 0; c < dim; ++c) amax = std::max(amax, std::fabs(x[c]));
        const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
        std::uint8_t* row = out + t * (sizeof(float) + dim);
        std::memcpy(row, &scale, sizeof scale);
        for (qpkv::index_t c = 0; c < dim; ++c)
          row[sizeof(float) + c] = static_cast<std::uint8_t>(static_cast<std::int8_t>(std::nearbyint(x[c] / scale)));
      }
    }
  }
  void decode(const std::uint8_t* part, qpkv::index_t tokens, qpkv::index_t dim, float* out) const {
    for (qpkv::index_t t = 0; t < tokens; ++t) {
      const std::uint8_t* row = part + t * (sizeof(float) + dim);
      float scale;
      std::memcpy(&scale, row, sizeof scale);
      for (qpkv::index_t c = 0; c < dim; ++c)
        out[t * dim + c] = static_cast<float>(static_cast<std::int8_t>(row[sizeof(float) + c])) * scale;
    }
  }
};
static_assert(qpkv::Quantizer<AbsMaxInt8>, "AbsMaxInt8 must model qpkv::Quantizer");

int main() {
  const qpkv::Shape shape{2, 8, 64};
  const qpkv::index_t n = 512;
  std::mt19937 rng(1);
  std::normal_distribution<float> nd;
  std::vector<float> k(static_cast<std::size_t>(shape.kv_heads * n * shape.head_dim)), v(k.size());
  for (auto& x : k) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<float> q(static_cast<std::size_t>(shape.q_heads * shape.head_dim));
  for (auto& x : q) x = nd(rng);

  // Custom selector + custom key quantizer + a built-in 4-bit value quantizer.
  qpkv::CompressedKV<StridedSelector, AbsMaxInt8, qpkv::Affine<4>> cache(shape);
  const auto keys = qpkv::view(k.data(), shape.kv_heads, n, shape.head_dim);
  const auto values = qpkv::view(v.data(), shape.kv_heads, n, shape.head_dim);
  cache.compress(keys, values, 160);  // this selector reads no queries

  std::vector<float> out(q.size()), ref(q.size());
  cache.attend(q.data(), out.data());
  const qpkv::DenseKV d = cache.dequantize();
  qpkv::dense_attention(d.key_view(), d.value_view(), q.data(), shape.q_heads, ref.data());
  const double err = qpkv::relative_l2(out, ref);
  std::printf("custom policies: %lld tokens/head kept, %zu bytes, packed attention vs dense on the same cache: %.2e\n",
              static_cast<long long>(cache.tokens()), cache.bytes(), err);
  return err < 1e-5 ? 0 : 1;
}
