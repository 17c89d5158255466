// qpkv/model/sampler.hpp - next-token sampling: greedy, temperature and nucleus (top-p).
//
//   temperature == 0   argmax (the lowest id among equal maxima): deterministic, no random numbers
//   temperature > 0    softmax(logits / temperature) in double; with top_p < 1 only the smallest set
//                      of most likely tokens whose probability reaches top_p (ties: lower id first)
//                      is kept and renormalised; one uniform draw picks a token by inverse CDF.
// Random numbers come from xorshift64* seeded with `seed` (the same sequence on every platform and
// standard library, unlike std:: distributions); draw i uses the i-th number of the stream.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <span>
#include <vector>

#include "qpkv/core/error.hpp"

namespace qpkv::model {

/// How generate() picks each next token.
struct Sampling {
  float temperature = 0.0f;  ///< 0 = greedy
  float top_p = 1.0f;        ///< nucleus mass in (0, 1]; 1 = off
  std::uint64_t seed = 0;    ///< random stream (unused when greedy)

  /// Throws unless temperature >= 0 and finite and top_p in (0, 1].
  void validate() const {
    qpkv::detail::require(temperature >= 0.0f && std::isfinite(temperature), "sampling.temperature",
                          ">= 0 and finite", temperature);
    qpkv::detail::require(top_p > 0.0f && top_p <= 1.0f, "sampling.top_p", "in (0, 1]", top_p);
  }
};

class Sampler {
 public:
  explicit Sampler(Sampling s = {}) : s_(s), state_(s.seed ^ 0x9E3779B97F4A7C15ull) {
    s_.validate();
    if (state_ == 0) state_ = 0x9E3779B97F4A7C15ull;  // xorshift must not start at 0
  }

  /// The next token for these logits (a full vocabulary row; every value finite).
  [[nodiscard]] int sample(std::span<const float> logits) {
    qpkv::detail::require(!logits.empty(), "logits", "a non-empty row", "an empty one");
    for (const float x : logits)
      qpkv::detail::require(std::isfinite(x), "logits", "finite values", x);
    if (s_.temperature == 0.0f) return argmax(logits);
    const double t = s_.temperature;
    const double m = *std::max_element(logits.begin(), logits.end());
    std::vector<double> p(logits.size());
    double sum = 0.0;
    for (std::size_t i = 0; i < p.size(); ++i) sum += p[i] = std::exp((logits[i] - m) / t);
    std::vector<int> order(p.size());
    std::iota(order.begin(), order.end(), 0);
    std::size_t kept = p.size();
    if (s_.top_p < 1.0f) {
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[static_cast<std::size_t>(a)] > p[static_cast<std::size_t>(b)]; });
      double mass = 0.0;
      for (kept = 0; kept < order.size();) {
        mass += p[static_cast<std::size_t>(order[kept++])] / sum;
        if (mass >= s_.top_p) break;
      }
      sum = 0.0;
      for (std::size_t i = 0; i < kept; ++i) sum += p[static_cast<std::size_t>(order[i])];
    }
    const double r = uniform() * sum;
    double c = 0.0;
    for (std::size_t i = 0; i < kept; ++i) {
      c += p[static_cast<std::size_t>(order[i])];
      if (r < c) return order[i];
    }
    return order[kept - 1];  // rounding left r at the very end
  }

  /// The lowest index of the largest value.
  static int argmax(std::span<const float> logits) {
    return static_cast<int>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  }

 private:
  /// Uniform in [0, 1) with 53 random bits (xorshift64*).
  double uniform() {
    state_ ^= state_ >> 12;
    state_ ^= state_ << 25;
    state_ ^= state_ >> 27;
    return static_cast<double>((state_ * 0x2545F4914F6CDD1Dull) >> 11) * 0x1.0p-53;
  }

  Sampling s_;
  std::uint64_t state_;
};

}  // namespace qpkv::model
