// qpkv/select/pyramidkv.hpp - PyramidKV: SnapKV scores with a budget that shrinks with depth.
//
// Algorithm (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information
// Funneling"; as the reference code does it: zhzihao/QPruningKV pyramidkv/pyramidkv_utils.py,
// PyramidKVCluster.update_kv). Lower layers attend broadly and get more tokens, upper layers fewer;
// the budgets fall linearly so that their mean stays near the nominal capacity C. With W = `window`,
// B = C - W (the scored budget excluding the window), L layers and all divisions integer (floor):
//   min = B / beta,  max = 2B - min;
//   if max >= N - W (too few prefix tokens): max = N - W and min = 2B - max;
//   steps = (max - min) / (L - 1);   layer l keeps  max - l·steps  scored tokens + the W window.
// E.g. C = 128, W = 32, beta = 20, L = 32: min 4, max 188, steps 5, so layers 0 / 15 / 31 keep
// 220 / 145 / 65 tokens (mean 142.5: the floored steps put it 11% above C). With W = 8: 242/137/25.
// Short prompts follow the seed's branches:
//   N <= C          every token is kept (the seed returns its input for N < C; N = C keeps all anyway);
//   C < N < 2B      plain SnapKV: B scored tokens + W, whatever the layer;
//   otherwise       the layer budget above.
// One deviation: with L = 1 the seed divides by zero; here a one-layer model keeps B (as SnapKV).
// Scoring and selection are SnapKV's (scoring.hpp): last W queries, float32 softmax over the causal
// row, summed, pooled (kernel 5, avg, "same" padding), top-k with ties to the lower position.
#pragma once

#include <algorithm>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/scoring.hpp"
#include "qpkv/select/selection.hpp"

namespace qpkv {

struct PyramidKV {
  index_t window = 32;  ///< observation queries; these trailing tokens are always kept
  index_t kernel = 5;   ///< pooling kernel (odd)
  Pooling pooling = Pooling::avg;
  index_t beta = 20;    ///< min budget = (C - W) / beta: how steep the pyramid is

  /// Throws qpkv::Error unless window >= 1, kernel is odd, beta >= 1, capacity >= window and
  /// 0 <= layer.layer < layer.layers.
  void validate(index_t capacity, LayerInfo layer = {}) const {
    detail::require(window >= 1, "window", ">= 1", window);
    detail::require(kernel >= 1 && kernel % 2 == 1, "kernel", "an odd size >= 1", kernel);
    detail::require(beta >= 1, "beta", ">= 1", beta);
    detail::require(capacity >= window, "capacity", detail::concat(">= window (", window, ")"), capacity);
    detail::check_layer(layer);
  }

  /// Scored (non-window) tokens layer `layer` keeps for an N-token prompt, by the rule above.
  /// For N <= capacity that is the whole prefix, N - min(N, window).
  [[nodiscard]] index_t layer_budget(index_t n, index_t capacity, LayerInfo layer = {}) const {
    validate(capacity, layer);
    detail::check_token_count(n);
    const index_t b = capacity - window;
    if (n <= capacity) return n - std::min(n, window);
    if (n < 2 * b || layer.layers == 1) return b;
    index_t min_num = b / beta;
    index_t max_num = 2 * b - min_num;
    if (max_num >= n - window) {
      max_num = n - window;
      min_num = 2 * b - max_num;
    }
    const index_t steps = (max_num - min_num) / (layer.layers - 1);
    return max_num - layer.layer * steps;
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
    return detail::top_k_plus_window(scores, layer_budget(n, capacity, layer), n, window);
  }

  [[nodiscard]] index_t kept_tokens(index_t n, index_t capacity, LayerInfo layer = {}) const {
    const index_t budget = layer_budget(n, capacity, layer);
    return n <= capacity ? n : budget + window;
  }

  [[nodiscard]] index_t queries_needed(index_t n) const { return std::min(window, n); }
};

static_assert(TokenSelector<PyramidKV>);

}  // namespace qpkv
