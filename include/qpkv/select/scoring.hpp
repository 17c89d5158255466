// qpkv/select/scoring.hpp - the attention scores that SnapKV, PyramidKV and H2O rank tokens by,
// the 1-D pooling, and the deterministic top-k.
//
// What the reference code does (zhzihao/QPruningKV pyramidkv/pyramidkv_utils.py, update_kv of
// SnapKVCluster, PyramidKVCluster and H2OKVCluster), and what is computed here:
//   1. logits = q·k / sqrt(D) for every observing query q and every key k, in float32;
//   2. a float32 softmax over each query's whole visible row (all N keys, minus masked ones);
//   3. the probabilities summed over the observing queries, kept for the N - W prefix keys only
//      (the last W tokens, the window, are always kept and need no score);
//   4. SnapKV/PyramidKV only: a stride-1 pooling of kernel k with "same" padding k/2;
//   5. top-k over the prefix.
//
// snapkv_scores - observing queries: the last W. Window query i (position N-W+i) sees keys
//   [0, N-W+i]: causal inside the W×W block. (The seed adds finfo(float32).min there instead of
//   -inf; both give exactly zero probability.) Pooling::avg zero-pads and counts the padding
//   (PyTorch avg_pool1d, count_include_pad=True), so the first and last k/2 prefix scores shrink;
//   Pooling::max pads with -inf (max_pool1d).
// h2o_scores - observing queries: all N prompt queries, no pooling. H2OMask::causal (default):
//   query t sees keys [0, t]. H2OMask::window_block: the seed's mask, which covers only the last
//   W×W block, so the first N-W queries also see future keys and their rows enter the sums.
// GQA: query head h reads KV head h / group (group = q_heads / kv_heads). Each query head gets its
//   own softmax; the probabilities are summed over the query heads of a group (before pooling),
//   giving one score row per KV head. KV rows are never repeated.
//
// Numerics: float, half and bfloat16 inputs are converted to float32 rows (an Eigen::Map over the
// caller's strided rows for float), and every product, softmax and sum is float32. H2O's N×N
// attention is processed in tiles of `kH2OTileRows` query rows, so its memory is O(tile × N).
// OpenMP threads, when enabled, split the KV heads and never a sum, so results do not depend on
// the thread count.
//
// Top-k tie rule (top_k_positions): higher score first; among equal scores the lower position
// wins. The rule is a strict total order, so the selection is unique and deterministic. (torch's
// topk picks an arbitrary subset of a tied plateau; max-pooling creates such plateaus, so the seed's
// choice among tied tokens can differ from ours - both keep the same number of them.)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include <Eigen/Core>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/score_options.hpp"
#include "qpkv/select/selection.hpp"

#if defined(_OPENMP)
#define QPKV_SELECT_PARALLEL_FOR _Pragma("omp parallel for schedule(static)")
#else
#define QPKV_SELECT_PARALLEL_FOR
#endif

namespace qpkv {

/// One float32 score per prefix token (positions 0 .. N-W-1) for each KV head: scores[kv_head][t].
using HeadScores = std::vector<std::vector<float>>;

/// Query rows per tile in h2o_scores; fixed (not derived from the thread count) so sums are reproducible.
inline constexpr index_t kH2OTileRows = 64;

/// Applies `pooling` with stride 1, kernel `kernel` (odd) and padding kernel/2, so the output has
/// the input's length. Pooling::avg divides by `kernel` even where the window overlaps the padding.
inline std::vector<float> pool_scores(std::span<const float> x, index_t kernel, Pooling pooling) {
  detail::require(kernel >= 1 && kernel % 2 == 1, "kernel", "an odd size >= 1", kernel);
  const auto n = static_cast<index_t>(x.size());
  const index_t pad = kernel / 2;
  std::vector<float> out(x.size());
  for (index_t i = 0; i < n; ++i) {
    const index_t lo = std::max<index_t>(0, i - pad);
    const index_t hi = std::min<index_t>(n, i + pad + 1);
    if (pooling == Pooling::avg) {
      float sum = 0.0f;  // padded positions contribute 0
      for (index_t j = lo; j < hi; ++j) sum += x[static_cast<std::size_t>(j)];
      out[static_cast<std::size_t>(i)] = sum / static_cast<float>(kernel);
    } else {
      float m = -std::numeric_limits<float>::infinity();  // padded positions are -inf
      for (index_t j = lo; j < hi; ++j) m = std::max(m, x[static_cast<std::size_t>(j)]);
      out[static_cast<std::size_t>(i)] = m;
    }
  }
  return out;
}

/// The positions of the `k` best scores, returned in ascending position order.
/// Tie rule: higher score first; among equal scores the lower position wins. Scores must not be NaN.
inline std::vector<index_t> top_k_positions(std::span<const float> scores, index_t k) {
  const auto n = static_cast<index_t>(scores.size());
  detail::require(k >= 0 && k <= n, "k", detail::concat("in [0, ", n, "] (the number of scores)"), k);
  std::vector<index_t> pos(scores.size());
  std::iota(pos.begin(), pos.end(), index_t{0});
  const auto better = [&](index_t a, index_t b) {
    const float sa = scores[static_cast<std::size_t>(a)], sb = scores[static_cast<std::size_t>(b)];
    return sa > sb || (sa == sb && a < b);
  };
  if (k < n) std::nth_element(pos.begin(), pos.begin() + k, pos.end(), better);
  pos.resize(static_cast<std::size_t>(k));
  std::sort(pos.begin(), pos.end());
  return pos;
}

namespace detail {

using RowMajorMatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// Rows [first, first + count) of one head as a dense float32 matrix (count × dim).
template <Element T>
RowMajorMatrixF rows_as_float(const TensorView<T>& v, index_t head, index_t first, index_t count) {
  if constexpr (std::is_same_v<T, float>) {
    using Strided = Eigen::Map<const RowMajorMatrixF, Eigen::Unaligned, Eigen::OuterStride<>>;
    return Strided(v.row(head, first), count, v.dim, Eigen::OuterStride<>(v.token_stride));
  } else {
    RowMajorMatrixF m(count, v.dim);
    for (index_t t = 0; t < count; ++t) {
      const T* src = v.row(head, first + t);
      for (index_t c = 0; c < v.dim; ++c) m(t, c) = to_float(src[c]);
    }
    return m;
  }
}

/// Float32 softmax of row[0, visible) in place; row[visible, cols) are masked keys and become 0.
inline void masked_softmax(float* row, index_t visible, index_t cols) {
  Eigen::Map<Eigen::ArrayXf> live(row, visible);
  const float m = live.maxCoeff();
  live = (live - m).exp();
  live /= live.sum();
  std::fill(row + visible, row + cols, 0.0f);
}

/// Validates what a scoring function reads: all keys and the last `needed` query rows.
template <Element T>
void check_scoring_inputs(const TensorView<T>& keys, const TensorView<T>& queries, index_t window,
                          index_t needed) {
  check_view(keys, "keys");
  require(window >= 1, "window", ">= 1", window);
  check_view(queries, "queries");
  require(queries.dim == keys.dim, "queries.dim", concat("keys.dim (", keys.dim, ")"), queries.dim);
  require(queries.heads % keys.heads == 0, "queries.heads",
          concat("a multiple of keys.heads (", keys.heads, ")"), queries.heads);
  require(queries.tokens >= needed, "queries.tokens",
          concat(">= ", needed, " (the trailing prompt queries this selector reads)"), queries.tokens);
  check_finite(keys, "keys");
  check_finite(queries.last_tokens(needed), "queries");
}

inline void check_scores_finite(const std::vector<char>& ok) {
  for (std::size_t h = 0; h < ok.size(); ++h)
    if (!ok[h])
      fail("scores", concat("non-finite attention for KV head ", h,
                            " (finite inputs whose logits overflow float32)"));
}

/// Window attention sums, unpooled; inputs already validated and window <= N.
template <Element T>
HeadScores window_attention_sums_unchecked(const TensorView<T>& keys, const TensorView<T>& queries,
                                           index_t window) {
  const index_t n = keys.tokens, prefix = n - window, group = queries.heads / keys.heads;
  const index_t q0 = queries.tokens - window;  // queries end where the keys end
  const float scale = std::sqrt(static_cast<float>(keys.dim));
  HeadScores out(static_cast<std::size_t>(keys.heads));
  std::vector<char> ok(out.size(), 1);
  QPKV_SELECT_PARALLEL_FOR
  for (index_t g = 0; g < keys.heads; ++g) {
    const RowMajorMatrixF k = rows_as_float(keys, g, 0, n);
    RowMajorMatrixF logits(window, n);
    Eigen::RowVectorXf acc = Eigen::RowVectorXf::Zero(prefix);
    for (index_t h = g * group; h < (g + 1) * group; ++h) {
      const RowMajorMatrixF q = rows_as_float(queries, h, q0, window);
      logits.noalias() = q * k.transpose();
      logits /= scale;
      for (index_t i = 0; i < window; ++i) masked_softmax(logits.row(i).data(), prefix + i + 1, n);
      acc += logits.leftCols(prefix).colwise().sum();
    }
    ok[static_cast<std::size_t>(g)] = acc.allFinite() ? 1 : 0;
    out[static_cast<std::size_t>(g)].assign(acc.data(), acc.data() + prefix);
  }
  check_scores_finite(ok);
  return out;
}

template <Element T>
HeadScores snapkv_scores_unchecked(const TensorView<T>& keys, const TensorView<T>& queries, index_t window,
                                   index_t kernel, Pooling pooling) {
  HeadScores s = window_attention_sums_unchecked(keys, queries, window);
  for (auto& row : s) row = pool_scores(row, kernel, pooling);
  return s;
}

template <Element T>
HeadScores h2o_scores_unchecked(const TensorView<T>& keys, const TensorView<T>& queries, index_t window,
                                H2OMask mask) {
  const index_t n = keys.tokens, prefix = n - window, group = queries.heads / keys.heads;
  const index_t q0 = queries.tokens - n;  // query row of prompt position 0
  const float scale = std::sqrt(static_cast<float>(keys.dim));
  HeadScores out(static_cast<std::size_t>(keys.heads));
  std::vector<char> ok(out.size(), 1);
  QPKV_SELECT_PARALLEL_FOR
  for (index_t g = 0; g < keys.heads; ++g) {
    const RowMajorMatrixF k = rows_as_float(keys, g, 0, n);
    std::vector<float> tile_buffer(static_cast<std::size_t>(std::min(kH2OTileRows, n) * n));
    Eigen::RowVectorXf acc = Eigen::RowVectorXf::Zero(prefix);
    Eigen::RowVectorXf head_acc(prefix);  // one query head's column sums, added to acc once complete
    for (index_t h = g * group; h < (g + 1) * group; ++h) {
      head_acc.setZero();
      for (index_t r0 = 0; r0 < n; r0 += kH2OTileRows) {
        const index_t rows = std::min(kH2OTileRows, n - r0);
        // Causal rows of this tile see at most keys [0, r0 + rows); skip the all-masked columns.
        const index_t cols = mask == H2OMask::causal ? r0 + rows : n;
        Eigen::Map<RowMajorMatrixF> logits(tile_buffer.data(), rows, cols);
        const RowMajorMatrixF q = rows_as_float(queries, h, q0 + r0, rows);
        logits.noalias() = q * k.topRows(cols).transpose();
        logits /= scale;
        for (index_t i = 0; i < rows; ++i) {
          const index_t t = r0 + i;
          const index_t visible = (mask == H2OMask::window_block && t < prefix) ? n : t + 1;
          masked_softmax(logits.row(i).data(), visible, cols);
        }
        const index_t used = std::min(prefix, cols);
        head_acc.head(used) += logits.leftCols(used).colwise().sum();
      }
      acc += head_acc;
    }
    ok[static_cast<std::size_t>(g)] = acc.allFinite() ? 1 : 0;
    out[static_cast<std::size_t>(g)].assign(acc.data(), acc.data() + prefix);
  }
  check_scores_finite(ok);
  return out;
}

/// Per head: the top `k` prefix positions by score (tie rule above), then the window [n - window, n).
inline Selection top_k_plus_window(const HeadScores& scores, index_t k, index_t n, index_t window) {
  Selection sel;
  sel.kept.reserve(scores.size());
  for (const auto& row : scores) {
    std::vector<index_t> kept = top_k_positions(row, k);
    for (index_t t = n - window; t < n; ++t) kept.push_back(t);
    sel.kept.push_back(std::move(kept));
  }
  return sel;
}

}  // namespace detail

/// Window attention summed over the last `window` queries (and the query heads of each group),
/// unpooled: scores[kv_head][t] for prefix tokens t < N - window. Validates its inputs.
template <Element T>
HeadScores window_attention_sums(const TensorView<T>& keys, const TensorView<T>& queries, index_t window) {
  detail::check_scoring_inputs(keys, queries, window, std::min(window, keys.tokens));
  detail::require(window <= keys.tokens, "window", detail::concat("<= keys.tokens (", keys.tokens, ")"), window);
  return detail::window_attention_sums_unchecked(keys, queries, window);
}

/// The score SnapKV and PyramidKV rank prefix tokens by (window_attention_sums, then pooled).
template <Element T>
HeadScores snapkv_scores(const TensorView<T>& keys, const TensorView<T>& queries, index_t window,
                         index_t kernel, Pooling pooling) {
  detail::require(kernel >= 1 && kernel % 2 == 1, "kernel", "an odd size >= 1", kernel);
  detail::check_scoring_inputs(keys, queries, window, std::min(window, keys.tokens));
  detail::require(window <= keys.tokens, "window", detail::concat("<= keys.tokens (", keys.tokens, ")"), window);
  return detail::snapkv_scores_unchecked(keys, queries, window, kernel, pooling);
}

/// The score H2O ranks prefix tokens by: attention column sums over all N prompt queries.
template <Element T>
HeadScores h2o_scores(const TensorView<T>& keys, const TensorView<T>& queries, index_t window,
                      H2OMask mask = H2OMask::causal) {
  detail::check_scoring_inputs(keys, queries, window, keys.tokens);
  detail::require(window <= keys.tokens, "window", detail::concat("<= keys.tokens (", keys.tokens, ")"), window);
  return detail::h2o_scores_unchecked(keys, queries, window, mask);
}

}  // namespace qpkv

#undef QPKV_SELECT_PARALLEL_FOR
