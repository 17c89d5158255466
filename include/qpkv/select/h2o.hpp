// qpkv/select/h2o.hpp - H2O (prefill form): keep the "heavy hitters", the tokens that received the
// most attention over the whole prompt.
//
// Algorithm (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large
// Language Models"; prefill form as in the reference code: zhzihao/QPruningKV
// pyramidkv/pyramidkv_utils.py, H2OKVCluster.update_kv):
//  1. Every one of the N prompt queries takes a float32 softmax of q·k/sqrt(D) over its row.
//  2. A key's score is its column sum: the probabilities summed over all N queries (and, with GQA,
//     over the query heads of the group), for the N - W prefix keys. No pooling.
//  3. The C - W best prefix tokens are kept, plus the last W = `window` tokens (C = capacity).
//     Ties: higher score first, then the lower position (see scoring.hpp).
// `mask` chooses which keys a query sees. H2OMask::causal (default) is the attention the model
// computes: query t sees keys [0, t]. H2OMask::window_block reproduces the seed exactly: it masks
// only the last W×W block, so the first N - W queries also attend to future keys.
// If N <= C every token is kept. All N prompt queries are read (queries_needed(n) = n); the N×N
// attention is processed in row tiles, O(tile × N) memory.
#pragma once

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/scoring.hpp"
#include "qpkv/select/selection.hpp"

namespace qpkv {

struct H2O {
  index_t window = 32;  ///< trailing tokens always kept
  H2OMask mask = H2OMask::causal;

  /// Throws qpkv::Error unless window >= 1 and capacity >= window.
  void validate(index_t capacity, LayerInfo layer = {}) const {
    detail::require(window >= 1, "window", ">= 1", window);
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
    const HeadScores scores = detail::h2o_scores_unchecked(keys, queries, window, mask);
    return detail::top_k_plus_window(scores, capacity - window, n, window);
  }

  [[nodiscard]] index_t kept_tokens(index_t n, index_t capacity, LayerInfo layer = {}) const {
    validate(capacity, layer);
    detail::check_token_count(n);
    return n <= capacity ? n : capacity;
  }

  [[nodiscard]] index_t queries_needed(index_t n) const { return n; }
};

static_assert(TokenSelector<H2O>);

}  // namespace qpkv
