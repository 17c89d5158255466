// qpkv/select/selection.hpp - the result of token selection and the TokenSelector concept.
#pragma once

#include <concepts>
#include <cstdint>
#include <vector>

#include "qpkv/core/tensor.hpp"

namespace qpkv {

/// Which prefill tokens each KV head keeps: positions in ascending (positional) order.
/// The reference code returns compressed tokens in score order followed by the window; qpkv
/// stores positional order so that token groups of the quantized cache are contiguous in time.
struct Selection {
  std::vector<std::vector<index_t>> kept;  ///< kept[kv_head] = ascending token positions

  [[nodiscard]] index_t heads() const { return static_cast<index_t>(kept.size()); }
  [[nodiscard]] index_t count(index_t head) const { return static_cast<index_t>(kept[head].size()); }
  /// Largest kept count over heads (all heads keep the same count for the built-in selectors).
  [[nodiscard]] index_t max_count() const {
    index_t m = 0;
    for (const auto& k : kept) m = k.size() > static_cast<std::size_t>(m) ? static_cast<index_t>(k.size()) : m;
    return m;
  }
  friend bool operator==(const Selection&, const Selection&) = default;
};

/// Where a layer sits in the model; only depth-dependent selectors (PyramidKV) read it.
struct LayerInfo {
  index_t layer = 0;   ///< 0-based layer index
  index_t layers = 1;  ///< number of layers in the model
};

/// A token-selection policy.
///  - `select(keys, queries, capacity, layer)` returns one ascending list of kept positions per KV
///    head. keys: (kv_heads, N, D); queries: (q_heads, M, D) with M = N (all prompt queries) or at
///    least the selector's window (only the last rows are read by window-based selectors).
///    `capacity` is the number of tokens kept per KV head (the model-average for PyramidKV).
///  - `kept_tokens(n, capacity, layer)` says how many tokens select() keeps for an N-token prompt,
///    without looking at the data (the budget planner uses it).
///  - `queries_needed(n)` is the number of trailing prompt queries select() reads (0 = none).
/// Scores are float32 whatever the input element type; GQA scores are summed over the query heads
/// of a group and one selection is made per KV head.
template <class S>
concept TokenSelector = requires(const S& s, const TensorView<float>& k, const TensorView<float>& q,
                                 index_t n, LayerInfo layer) {
  { s.select(k, q, n, layer) } -> std::same_as<Selection>;
  { s.kept_tokens(n, n, layer) } -> std::convertible_to<index_t>;
  { s.queries_needed(n) } -> std::convertible_to<index_t>;
};

}  // namespace qpkv
