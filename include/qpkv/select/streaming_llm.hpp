// qpkv/select/streaming_llm.hpp - StreamingLLM: attention sinks plus the most recent tokens.
//
// Algorithm (Xiao et al., "Efficient Streaming Language Models with Attention Sinks"): the first
// few tokens absorb a large share of every query's attention whatever their content ("attention
// sinks"), so keeping them plus a sliding window of recent tokens preserves most of the attention
// mass. No scores are computed; the kept positions depend only on N and the capacity C.
//
//  - Mode::sinks (default, the StreamingLLM paper): keep tokens [0, S) and the most recent C - S
//    tokens [N - (C - S), N), with S = `sinks` = 4. `window` is not used.
//  - Mode::reference: what the reference code does (zhzihao/QPruningKV pyramidkv/pyramidkv_utils.py,
//    StreamingLLMKVCluster.update_kv): keep tokens [0, C - W) and the last W = `window` tokens. With
//    W = 32 and C = 128 that is the first 96 tokens, not 4 sinks; the reference run script sets
//    W = C - 4, which gives the same tokens as Mode::sinks with S = 4.
//
// If N <= C every token is kept. Neither mode reads queries or the values of the keys.
#pragma once

#include <vector>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/selection.hpp"

namespace qpkv {

struct StreamingLLM {
  enum class Mode {
    sinks,      ///< first `sinks` tokens + the most recent (capacity - sinks)
    reference,  ///< first (capacity - window) tokens + the last `window` (the seed code)
  };

  index_t sinks = 4;    ///< attention-sink tokens kept at the start (Mode::sinks)
  index_t window = 32;  ///< trailing tokens always kept (Mode::reference)
  Mode mode = Mode::sinks;

  /// Throws qpkv::Error unless the parameters fit the capacity: Mode::sinks needs
  /// 0 <= sinks < capacity (at least one recent token); Mode::reference needs 1 <= window <= capacity.
  void validate(index_t capacity, LayerInfo layer = {}) const {
    detail::check_layer(layer);
    if (mode == Mode::sinks) {
      detail::require(sinks >= 0, "sinks", ">= 0", sinks);
      detail::require(capacity > sinks, "capacity", detail::concat("> sinks (", sinks, ")"), capacity);
    } else {
      detail::require(window >= 1, "window", ">= 1", window);
      detail::require(capacity >= window, "capacity", detail::concat(">= window (", window, ")"), capacity);
    }
  }

  template <Element T>
  [[nodiscard]] Selection select(const TensorView<T>& keys, const TensorView<T>& /*queries*/,
                                 index_t capacity, LayerInfo layer = {}) const {
    validate(capacity, layer);
    detail::check_view(keys, "keys");
    const index_t n = keys.tokens;
    if (n <= capacity) return detail::all_positions(keys.heads, n);
    const index_t head_tokens = mode == Mode::sinks ? sinks : capacity - window;
    const index_t tail_tokens = capacity - head_tokens;
    std::vector<index_t> row;
    row.reserve(static_cast<std::size_t>(capacity));
    for (index_t t = 0; t < head_tokens; ++t) row.push_back(t);
    for (index_t t = n - tail_tokens; t < n; ++t) row.push_back(t);
    return Selection{std::vector<std::vector<index_t>>(static_cast<std::size_t>(keys.heads), row)};
  }

  [[nodiscard]] index_t kept_tokens(index_t n, index_t capacity, LayerInfo layer = {}) const {
    validate(capacity, layer);
    detail::check_token_count(n);
    return n <= capacity ? n : capacity;
  }

  [[nodiscard]] index_t queries_needed(index_t /*n*/) const { return 0; }
};

static_assert(TokenSelector<StreamingLLM>);

}  // namespace qpkv
