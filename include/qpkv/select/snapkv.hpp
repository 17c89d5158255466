// qpkv/select/snapkv.hpp - SnapKV: keep the prefix tokens the observation window attends to most.
//
// Algorithm (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation"; as the
// reference code does it: zhzihao/QPruningKV pyramidkv/pyramidkv_utils.py, SnapKVCluster.update_kv):
//  1. The last W = `window` prompt queries observe: each takes a float32 softmax of q·k/sqrt(D)
//     over its whole causal row (all N keys up to its own position).
//  2. Their probabilities are summed over the W queries (and, with GQA, over the query heads of
//     the group) for each of the N - W prefix keys.
//  3. The sums are smoothed along the token axis: pooling `pooling` (avg or max), kernel `kernel`,
//     stride 1, padding kernel/2; avg counts the zero padding, max pads with -inf (as PyTorch).
//  4. The C - W best prefix tokens are kept, plus the W window tokens: C = capacity tokens per KV
//     head. Ties: higher score first, then the lower position (see scoring.hpp).
// If N <= C every token is kept. Defaults are the paper's reference runs: W = 32, kernel 5, avg.
// The reference code requires C > W; here C = W is allowed (only the window is kept).
#pragma once

#include <algorithm>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/scoring.hpp"
#include "qpkv/select/selection.hpp"

namespace qpkv {

struct SnapKV {
  index_t window = 32;  ///< observation queries; these trailing tokens are always kept
  index_t kernel = 5;   ///< pooling kernel (odd)
  Pooling pooling = Pooling::avg;

  /// Throws qpkv::Error unless window >= 1, kernel is odd and capacity >= window.
  void validate(index_t capacity, LayerInfo layer = {}) const {
    detail::require(window >= 1, "window", ">= 1", window);
    detail::require(kernel >= 1 && kernel % 2 == 1, "kernel", "an odd size >= 1", kernel);
    detail::require(capacity >= window, "capacity", detail::concat(">= window (", window, ")"), capacity);
    detail::check_layer(layer);
  }

  template <Element T>
  [[nodiscard]] Selection select(const TensorView<T>& keys, const TensorView<T>& queries, index_t capacity,
                                 LayerInfo layer = {}) const {
    validate(capacity, layer);
    detail::check_view(keys, "keys");
    const index_t n = keys.tokens;
    detail::check_scoring_inputs(keys, queries, window, queries_needed(n));
    if (n <= capacity) return detail::all_positions(keys.heads, n);
    const HeadScores scores = detail::snapkv_scores_unchecked(keys, queries, window, kernel, pooling);
    return detail::top_k_plus_window(scores, capacity - window, n, window);
  }

  [[nodiscard]] index_t kept_tokens(index_t n, index_t capacity, LayerInfo layer = {}) const {
    validate(capacity, layer);
    detail::check_token_count(n);
    return n <= capacity ? n : capacity;
  }

  [[nodiscard]] index_t queries_needed(index_t n) const { return std::min(window, n); }
};

static_assert(TokenSelector<SnapKV>);

}  // namespace qpkv
