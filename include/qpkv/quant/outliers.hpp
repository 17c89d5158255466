// qpkv/quant/outliers.hpp - dense-and-sparse outlier rule (KVQuant-style, as the paper's reference
// code applies it: values with |x| > 6 are kept exactly, the rest quantized).
//
// qpkv gives every part (one block of one head) a fixed number of outlier slots so that blocks keep
// a fixed size and bytes() stays exact: slots = ceil(fraction * tokens * dim). Each slot holds a
// uint32 element index (token * dim + channel; 0xffffffff = unused) and the exact float32 value.
//  - threshold finite: the entries with |x| > threshold, largest |x| first, fill the slots; any
//    beyond the slot budget are quantized normally (and widen their group's range).
//  - threshold infinite: the `fraction` largest-magnitude entries of the part ("top fraction").
// Ties in |x| go to the lower element index. Group min/max are taken over the non-outliers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"

namespace qpkv {

struct OutlierRule {
  float threshold = std::numeric_limits<float>::infinity();  ///< |x| above this is an outlier
  double fraction = 0.0;  ///< slot budget per part as a fraction of its elements (0 = no outliers)

  static constexpr std::uint32_t unused = 0xffffffffu;
  static constexpr std::size_t slot_bytes = sizeof(std::uint32_t) + sizeof(float);

  [[nodiscard]] bool enabled() const { return fraction > 0.0; }
  [[nodiscard]] std::size_t slots(index_t tokens, index_t dim) const {
    if (!enabled()) return 0;
    return static_cast<std::size_t>(std::ceil(fraction * static_cast<double>(tokens * dim) - 1e-9));
  }
  void validate(std::string_view role) const {
    const std::string r(role);
    detail::require(fraction >= 0.0 && fraction <= 1.0, r + ".outliers.fraction", "in [0, 1]", fraction);
    detail::require(!(threshold < 0.0f) && !std::isnan(threshold), r + ".outliers.threshold", ">= 0", threshold);
    detail::require(std::isinf(threshold) || fraction > 0.0, r + ".outliers.fraction",
                    "> 0 when a threshold is set (it sizes the slot budget)", fraction);
  }

  /// Picks the outliers of one slab of n floats: writes their indices (ascending by rank) to idx,
  /// returns how many. `scratch` is reused storage.
  std::size_t pick(const float* x, std::size_t n, std::size_t slots, std::vector<std::uint32_t>& scratch,
                   std::uint32_t* idx) const {
    if (slots == 0) return 0;
    scratch.clear();
    for (std::size_t i = 0; i < n; ++i)
      if (std::fabs(x[i]) > threshold || std::isinf(threshold)) scratch.push_back(static_cast<std::uint32_t>(i));
    const std::size_t k = std::min(slots, scratch.size());
    auto by_magnitude = [x](std::uint32_t a, std::uint32_t b) {
      const float fa = std::fabs(x[a]), fb = std::fabs(x[b]);
      return fa > fb || (fa == fb && a < b);
    };
    std::partial_sort(scratch.begin(), scratch.begin() + static_cast<std::ptrdiff_t>(k), scratch.end(), by_magnitude);
    std::copy_n(scratch.begin(), k, idx);
    return k;
  }
};

}  // namespace qpkv
