// Helpers shared by the test suites (not part of the library).
#pragma once

#include <cstddef>
#include <random>
#include <vector>

namespace qpkv::testing {

/// n samples of N(0, sigma^2) from a fixed seed.
inline std::vector<float> randn(std::size_t n, unsigned seed, float sigma = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> x(n);
  for (auto& v : x) v = d(rng);
  return x;
}

}  // namespace qpkv::testing
