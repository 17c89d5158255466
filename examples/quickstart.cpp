// quickstart.cpp - compress one attention layer to 1/8 of its fp16 size and attend on it.
//
// Under the same byte budget, compare fewer tokens at 16 bits with more tokens at 4 bits
// (SnapKV selection, KIVI quantization) — the paper's "more tokens, lower precision" trade-off —
// against exact attention over the full, uncompressed layer.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "qpkv/qpkv.hpp"

namespace {

/// An LLM-like layer: keys drift between topics, a few key channels are ~10x larger, token 0 is an
/// attention sink, and each query looks for one earlier "heavy hitter" key (plus noise).
struct Layer {
  qpkv::Shape shape;
  qpkv::index_t n;
  std::vector<float> k, v, q;  // (kv_heads, n, D), (kv_heads, n, D), (q_heads, n, D)
};

Layer make_layer(qpkv::Shape s, qpkv::index_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  const qpkv::index_t D = s.head_dim, g = s.q_heads / s.kv_heads;
  Layer L{s, n, std::vector<float>(static_cast<std::size_t>(s.kv_heads * n * D)), {}, {}};
  L.v.resize(L.k.size());
  L.q.resize(static_cast<std::size_t>(s.q_heads * n * D));
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(D));
  for (qpkv::index_t h = 0; h < s.kv_heads; ++h) {
    std::vector<float> topic(static_cast<std::size_t>(D));
    for (qpkv::index_t t = 0; t < n; ++t) {
      if (t % 64 == 0)
        for (auto& x : topic) x = nd(rng);
      for (qpkv::index_t c = 0; c < D; ++c) {
        float& key = L.k[(h * n + t) * D + c];
        key = 0.6f * topic[c] + 0.8f * nd(rng);
        if (c % 32 == 3) key = 8.0f + nd(rng);  // outlier channels
        L.v[(h * n + t) * D + c] = 0.8f * topic[c] + 0.6f * nd(rng);
      }
    }
    for (qpkv::index_t c = 0; c < D; ++c) L.k[(h * n) * D + c] = c % 32 == 3 ? 8.0f : 1.5f;  // sink
    std::uniform_int_distribution<qpkv::index_t> pick(1, n - 1);
    for (qpkv::index_t i = 0; i < g; ++i)
      for (qpkv::index_t t = 0; t < n; ++t) {
        const qpkv::index_t target = pick(rng) % std::max<qpkv::index_t>(t, 1);  // an earlier token
        for (qpkv::index_t c = 0; c < D; ++c) {
          const float kc = c % 32 == 3 ? 0.0f : L.k[(h * n + target) * D + c];
          L.q[((h * g + i) * n + t) * D + c] = 3.0f * kc * inv_sqrt_d * 4.0f + 0.4f * nd(rng);
        }
      }
  }
  return L;
}

}  // namespace

int main() {
  const qpkv::Shape shape{8, 32, 128};  // one Llama-3-8B-like layer: 8 KV heads, 32 query heads
  const qpkv::index_t n = 4096, decode_queries = 16;
  const Layer L = make_layer(shape, n + decode_queries, 2024);
  // prompt = first n tokens; the next 16 queries act as decode steps
  const auto keys = qpkv::TensorView<float>{L.k.data(), shape.kv_heads, n, shape.head_dim, (n + decode_queries) * shape.head_dim, shape.head_dim};
  const auto values = qpkv::TensorView<float>{L.v.data(), shape.kv_heads, n, shape.head_dim, (n + decode_queries) * shape.head_dim, shape.head_dim};
  const auto queries = qpkv::TensorView<float>{L.q.data(), shape.q_heads, n, shape.head_dim, (n + decode_queries) * shape.head_dim, shape.head_dim};

  const auto full_bytes = qpkv::fp16_bytes(shape, n);
  const qpkv::Budget budget = qpkv::Budget::fraction(1, 8, n, shape);

  // Same budget, four token/precision splits. capacity_for counts every byte (codes, fp16 scales
  // and mins, the fp16 residual), so every cache really fits; SnapKV needs at least its window.
  const qpkv::TokenLimits limits{qpkv::SnapKV{}.window, n};
  qpkv::CompressedKV<qpkv::SnapKV, qpkv::Fp16> fp16(shape);
  qpkv::CompressedKV<qpkv::SnapKV, qpkv::Kivi<8>> kivi8(shape);
  qpkv::CompressedKV<qpkv::SnapKV, qpkv::Kivi<4>> kivi4(shape);
  qpkv::CompressedKV<qpkv::SnapKV, qpkv::Kivi<2>> kivi2(shape);
  fp16.compress(keys, values, queries, qpkv::capacity_for<qpkv::Fp16>(budget, shape, {}, limits));
  kivi8.compress(keys, values, queries, qpkv::capacity_for<qpkv::Kivi<8>>(budget, shape, {}, limits));
  kivi4.compress(keys, values, queries, qpkv::capacity_for<qpkv::Kivi<4>>(budget, shape, {}, limits));
  kivi2.compress(keys, values, queries, qpkv::capacity_for<qpkv::Kivi<2>>(budget, shape, {}, limits));

  // Decode queries: exact attention over the full layer vs attention on each packed cache.
  std::vector<float> q(static_cast<std::size_t>(shape.q_heads * shape.head_dim)), out(q.size()), ref(q.size());
  double err[4] = {0, 0, 0, 0};
  for (qpkv::index_t step = 0; step < decode_queries; ++step) {
    for (qpkv::index_t h = 0; h < shape.q_heads; ++h)
      for (qpkv::index_t c = 0; c < shape.head_dim; ++c)
        q[h * shape.head_dim + c] = L.q[(h * (n + decode_queries) + n + step) * shape.head_dim + c];
    qpkv::dense_attention(keys, values, q.data(), shape.q_heads, ref.data());
    fp16.attend(q.data(), out.data());
    err[0] += qpkv::relative_l2(out, ref) / decode_queries;
    kivi8.attend(q.data(), out.data());
    err[1] += qpkv::relative_l2(out, ref) / decode_queries;
    kivi4.attend(q.data(), out.data());
    err[2] += qpkv::relative_l2(out, ref) / decode_queries;
    kivi2.attend(q.data(), out.data());
    err[3] += qpkv::relative_l2(out, ref) / decode_queries;
  }
  std::printf("layer: %lld tokens, %lld KV heads x %lld query heads, head_dim %lld; full fp16 cache %lld bytes\n",
              static_cast<long long>(n), static_cast<long long>(shape.kv_heads), static_cast<long long>(shape.q_heads),
              static_cast<long long>(shape.head_dim), static_cast<long long>(full_bytes));
  std::printf("budget 1/8 = %lld bytes\n\n", static_cast<long long>(budget.bytes));
  std::printf("%-22s %8s %10s %10s %14s\n", "cache", "tokens", "bytes", "bits/elem", "attn rel err");
  auto row = [&](const char* name, auto& c, double e) {
    const double bits = 8.0 * static_cast<double>(c.bytes()) / static_cast<double>(2 * shape.kv_heads * c.tokens() * shape.head_dim);
    std::printf("%-22s %8lld %10zu %10.2f %14.4f\n", name, static_cast<long long>(c.tokens()), c.bytes(), bits, e);
  };
  row("SnapKV + fp16", fp16, err[0]);
  row("SnapKV + KIVI 8-bit", kivi8, err[1]);
  row("SnapKV + KIVI 4-bit", kivi4, err[2]);
  row("SnapKV + KIVI 2-bit", kivi2, err[3]);
  std::printf("\n(attention error: mean relative L2 over %lld decode queries vs exact attention on the full layer)\n",
              static_cast<long long>(decode_queries));
  const auto fits = [&](const auto& c) { return static_cast<std::int64_t>(c.bytes()) <= budget.bytes; };
  return fits(fp16) && fits(kivi8) && fits(kivi4) && fits(kivi2) ? 0 : 1;
}
