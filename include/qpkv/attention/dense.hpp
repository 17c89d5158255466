// qpkv/attention/dense.hpp - reference decode attention over dense tensors (Eigen, float64).
//
// The yardstick for every compressed path: out_i = softmax(scale * q_i K^T) V for query head i
// reading KV head i / (q_heads / kv_heads). Computed in double so that its own rounding error is
// negligible next to float32 kernels.
#pragma once

#include <Eigen/Core>
#include <cmath>
#include <span>
#include <vector>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"

namespace qpkv {

/// keys, values: (kv_heads, N, D) views; q: (q_heads, D) row-major; out: (q_heads, D).
/// scale = 0 means 1/sqrt(D).
template <Element T, Element Q>
void dense_attention(const TensorView<T>& keys, const TensorView<T>& values, const Q* q, index_t q_heads, float* out,
                     float scale = 0.0f) {
  detail::check_view(keys, "keys");
  detail::check_view(values, "values");
  detail::require(values.heads == keys.heads && values.tokens == keys.tokens && values.dim == keys.dim, "values",
                  "the same (heads, tokens, dim) as keys", detail::concat("(", values.heads, ", ", values.tokens, ", ", values.dim, ")"));
  detail::require(q_heads > 0 && q_heads % keys.heads == 0, "q_heads", detail::concat("a positive multiple of kv_heads (", keys.heads, ")"), q_heads);
  const index_t H = keys.heads, N = keys.tokens, D = keys.dim, g = q_heads / H;
  const double s = scale > 0.0f ? static_cast<double>(scale) : 1.0 / std::sqrt(static_cast<double>(D));
  Eigen::MatrixXd K(N, D), V(N, D);
  for (index_t h = 0; h < H; ++h) {
    for (index_t t = 0; t < N; ++t)
      for (index_t c = 0; c < D; ++c) {
        K(t, c) = keys.at(h, t, c);
        V(t, c) = values.at(h, t, c);
      }
    for (index_t i = 0; i < g; ++i) {
      Eigen::VectorXd qi(D);
      for (index_t c = 0; c < D; ++c) qi(c) = to_float(q[(h * g + i) * D + c]);
      Eigen::VectorXd logits = (K * qi) * s;
      const double m = logits.maxCoeff();
      Eigen::VectorXd p = (logits.array() - m).exp().matrix();
      p /= p.sum();
      const Eigen::VectorXd o = V.transpose() * p;
      for (index_t c = 0; c < D; ++c) out[(h * g + i) * D + c] = static_cast<float>(o(c));
    }
  }
}

/// ||a - ref||_2 / ||ref||_2 in double: the error measure of the tests, examples and benchmarks.
inline double relative_l2(std::span<const float> a, std::span<const float> ref) {
  detail::require(a.size() == ref.size(), "a.size()", detail::concat(ref.size(), " (ref.size())"), a.size());
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(ref[i]);
    num += d * d;
    den += static_cast<double>(ref[i]) * static_cast<double>(ref[i]);
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

}  // namespace qpkv
