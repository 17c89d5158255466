// qpkv/select/keep_all.hpp - the identity selector (no pruning), and the checks every selector shares.
//
// Algorithm: keep every prefill token of every KV head. `capacity` only has to be non-negative; it
// does not limit anything. This is the "full KV" baseline of the paper's tables and the policy to
// pair with a Quantizer when only the precision dimension is compressed.
//
// The reference code (zhzihao/QPruningKV pyramidkv/pyramidkv_utils.py) has the same behaviour in
// every cluster class for prompts shorter than the capacity (`q_len < max_capacity_prompt` returns
// the input unchanged); KeepAll is that branch made unconditional.
#pragma once

#include <numeric>
#include <vector>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/select/selection.hpp"

namespace qpkv {

namespace detail {

/// Throws unless 0 <= layer.layer < layer.layers.
inline void check_layer(LayerInfo layer) {
  require(layer.layers >= 1, "layer.layers", ">= 1", layer.layers);
  require(layer.layer >= 0 && layer.layer < layer.layers, "layer.layer",
          concat("in [0, ", layer.layers, ")"), layer.layer);
}

/// Throws unless n (a prompt length given to kept_tokens) is non-negative.
inline void check_token_count(index_t n) { require(n >= 0, "n", ">= 0", n); }

/// Every position 0 .. tokens-1 for each of `heads` heads.
inline Selection all_positions(index_t heads, index_t tokens) {
  std::vector<index_t> row(static_cast<std::size_t>(tokens));
  std::iota(row.begin(), row.end(), index_t{0});
  return Selection{std::vector<std::vector<index_t>>(static_cast<std::size_t>(heads), row)};
}

}  // namespace detail

/// Keeps every token: no pruning. Reads only the key tensor's geometry, never its values.
struct KeepAll {
  /// Throws qpkv::Error on a negative capacity or an invalid layer.
  void validate(index_t capacity, LayerInfo layer = {}) const {
    detail::require(capacity >= 0, "capacity", ">= 0", capacity);
    detail::check_layer(layer);
  }

  template <Element T>
  [[nodiscard]] Selection select(const TensorView<T>& keys, const TensorView<T>& /*queries*/,
                                 index_t capacity, LayerInfo layer = {}) const {
    validate(capacity, layer);
    detail::check_view(keys, "keys");
    return detail::all_positions(keys.heads, keys.tokens);
  }

  [[nodiscard]] index_t kept_tokens(index_t n, index_t capacity, LayerInfo layer = {}) const {
    validate(capacity, layer);
    detail::check_token_count(n);
    return n;
  }

  [[nodiscard]] index_t queries_needed(index_t /*n*/) const { return 0; }
};

static_assert(TokenSelector<KeepAll>);

}  // namespace qpkv
