// qpkv/cache/compressed_kv.hpp - CompressedKV: one layer's KV cache, pruned by a TokenSelector and
// stored bit-packed by a key and a value Quantizer; decode attention runs on the packed bytes.
//
//   compress(keys, values, queries, capacity)  prefill: select per KV head, gather the kept tokens
//                                              in positional order, quantize whole blocks, keep the
//                                              remainder in the fp16 residual
//   append(k, v)                               decode: one new token per KV head into the residual;
//                                              a full residual is quantized into blocks
//   attend(q, out)                             softmax(q K^T / sqrt(D)) V for all query heads
//   dequantize(), positions(head), tokens(), bytes()
//
// Residual rule (KIVI's runtime, see docs/design.md): the residual holds up to R = round_up(max(
// residual, B), B) tokens, or none when B = 1 and residual = 0. compress() stores C mod R of the C
// kept tokens there; append() quantizes all R at once when it fills. bytes() is the exact size of
// the one allocation: blocks (codes, scales, mins, outlier slots) plus the allocated residual slots.
// compress() allocates exactly what the C tokens need; the first append() grows the residual to R
// slots and later flushes grow the blocks geometrically (reserve() avoids both).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "qpkv/backend/backend.hpp"
#include "qpkv/backend/cpu/attend.hpp"
#include "qpkv/backend/cpu/precision.hpp"
#include "qpkv/cache/layout.hpp"
#include "qpkv/core/buffer.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/quant/affine_fast.hpp"
#include "qpkv/quant/kivi.hpp"
#include "qpkv/quant/quantizer.hpp"
#include "qpkv/select/selection.hpp"

namespace qpkv {

namespace detail {
/// fp16 residual store: a finite input that overflows half is an error, not a silent inf.
inline half residual_half(float x, const char* what) {
  const half h = to_half(x);
  if (!std::isfinite(to_float(h)))
    throw Error(concat("qpkv: ", what, ": expected |x| <= 65504 for the fp16 residual, got ", x));
  return h;
}

template <class Q>
struct key_of { using type = Q; };
template <KVScheme S>
struct key_of<S> { using type = decltype(S{}.key); };
template <class Q>
struct value_of { using type = Q; };
template <KVScheme S>
struct value_of<S> { using type = decltype(S{}.value); };

template <class Q>
auto key_part(const Q& q) {
  if constexpr (KVScheme<Q>) return q.key; else return q;
}
template <class Q>
auto value_part(const Q& q) {
  if constexpr (KVScheme<Q>) return q.value; else return q;
}
template <class Q>
index_t residual_of(const Q& q) {
  if constexpr (KVScheme<Q>) return q.residual; else return 0;
}
}  // namespace detail

namespace detail {
struct CacheFileAccess;  // cache/serialize.hpp: save/load read and restore the private state
}  // namespace detail

/// Options of a cache that belong to neither policy.
struct CacheOptions {
  index_t residual = 0;  ///< recent tokens kept in fp16 (max'ed with a KV scheme's own residual)
  float scale = 0.0f;    ///< softmax scale; 0 means 1/sqrt(head_dim)
  AttendPrecision precision = AttendPrecision::exact;  ///< q.k arithmetic of attend() (backend/cpu/precision.hpp)
};

namespace detail {
/// The key quantizer a cache uses for the argument `q` (a Quantizer or a KV scheme): the scheme's
/// key part, with Axis::automatic resolved to Axis::channel (KIVI). Shared with the budget planner.
template <class Q>
auto key_quantizer_of(const Q& q) {
  auto k = key_part(q);
  if (k.axis == Axis::automatic) k.axis = Axis::channel;
  return k;
}
/// The value quantizer for the argument `q`: the scheme's value part, Axis::automatic -> token.
template <class Q>
auto value_quantizer_of(const Q& q) {
  auto v = value_part(q);
  if (v.axis == Axis::automatic) v.axis = Axis::token;
  return v;
}
/// Requested residual length: the largest of the options' and the KV schemes' residuals.
template <class KeyQ, class ValueQ>
index_t residual_length_of(const KeyQ& key_q, const ValueQ& value_q, const CacheOptions& options) {
  return std::max({options.residual, residual_of(key_q), residual_of(value_q)});
}
}  // namespace detail

/// Dense copy of a cache, [kv_head][token][dim] in positional order.
struct DenseKV {
  index_t heads = 0, tokens = 0, dim = 0;
  std::vector<float> keys, values;
  [[nodiscard]] TensorView<float> key_view() const { return view(keys.data(), heads, tokens, dim); }
  [[nodiscard]] TensorView<float> value_view() const { return view(values.data(), heads, tokens, dim); }
};

/// The exact geometry of a cache of `shape` holding `tokens` tokens per head right after
/// compress() (the budget planner's numbers come from here, so they equal bytes()).
template <class KQ, class VQ>
CacheLayout plan_layout(const Shape& shape, const KQ& kq, const VQ& vq, index_t residual, index_t tokens,
                        index_t* residual_tokens = nullptr) {
  CacheLayout L;
  L.kv_heads = shape.kv_heads;
  L.q_heads = shape.q_heads;
  L.head_dim = shape.head_dim;
  L.block_tokens = std::lcm(kq.group_tokens(), vq.group_tokens());
  L.key_part = kq.part_bytes(L.block_tokens, shape.head_dim);
  L.value_part = vq.part_bytes(L.block_tokens, shape.head_dim);
  const index_t B = L.block_tokens;
  L.residual_limit = (B == 1 && residual == 0) ? 0 : (std::max(residual, B) + B - 1) / B * B;
  const index_t res = L.residual_limit ? tokens % L.residual_limit : 0;
  L.residual_capacity = res;
  L.capacity_blocks = (tokens - res) / B;
  if (residual_tokens) *residual_tokens = res;
  return L;
}

template <TokenSelector Selector, class KeyQ, class ValueQ = KeyQ, class Backend = backend::Cpu>
class CompressedKV {
 public:
  using selector_type = Selector;
  using key_quantizer = typename detail::key_of<KeyQ>::type;
  using value_quantizer = typename detail::value_of<ValueQ>::type;
  using backend_type = Backend;
  static_assert(Quantizer<key_quantizer>, "qpkv::CompressedKV: KeyQ must satisfy qpkv::Quantizer (or be a KV scheme such as qpkv::Kivi)");
  static_assert(Quantizer<value_quantizer>, "qpkv::CompressedKV: ValueQ must satisfy qpkv::Quantizer (or be a KV scheme such as qpkv::Kivi)");
  static_assert(std::is_same_v<Backend, backend::Cpu>,
                "qpkv::CompressedKV: this header provides backend::Cpu; include qpkv/backend/cuda/*.cuh for backend::Cuda");

  explicit CompressedKV(Shape shape, Selector selector = {}, KeyQ key_q = {}, ValueQ value_q = {}, CacheOptions options = {})
      : shape_(shape), selector_(std::move(selector)), kq_(detail::key_quantizer_of(key_q)),
        vq_(detail::value_quantizer_of(value_q)), options_(options) {
    shape_.validate();
    kq_.validate(shape_.head_dim, "key_quantizer");
    vq_.validate(shape_.head_dim, "value_quantizer");
    detail::require(options_.residual >= 0, "options.residual", ">= 0", options_.residual);
    detail::require(options_.scale >= 0.0f && std::isfinite(options_.scale), "options.scale", ">= 0 and finite", options_.scale);
    residual_length_ = detail::residual_length_of(key_q, value_q, options_);
    layout_ = plan_layout(shape_, kq_, vq_, residual_length_, 0);
    positions_.resize(static_cast<std::size_t>(shape_.kv_heads));
  }

  /// Prefill: selects `capacity` tokens per KV head (see the selector), gathers and quantizes them.
  /// keys/values: (kv_heads, N, D); queries: (q_heads, M, D), the prompt's last M queries (M >=
  /// selector.queries_needed(N); not read when that is 0). Replaces any previous content.
  template <Element T>
  void compress(const TensorView<T>& keys, const TensorView<T>& values, const TensorView<T>& queries,
                index_t capacity, LayerInfo layer = {}) {
    check_kv(keys, values);
    if (selector_.queries_needed(keys.tokens) > 0) {
      detail::check_view(queries, "queries");
      detail::require(queries.heads == shape_.q_heads, "queries.heads", shape_.q_heads, queries.heads);
      detail::require(queries.dim == shape_.head_dim, "queries.dim", shape_.head_dim, queries.dim);
    }
    Selection sel = selector_.select(keys, queries, capacity, layer);
    store(keys, values, std::move(sel));
  }

  /// Prefill for selectors that read no queries (KeepAll, StreamingLLM, ...).
  template <Element T>
  void compress(const TensorView<T>& keys, const TensorView<T>& values, index_t capacity, LayerInfo layer = {}) {
    detail::require(selector_.queries_needed(keys.tokens) == 0, "queries",
                    detail::concat("the last ", selector_.queries_needed(keys.tokens), " prompt queries (this selector scores with them)"),
                    "none");
    compress(keys, values, TensorView<T>{nullptr, shape_.q_heads, 0, shape_.head_dim, 0, shape_.head_dim}, capacity, layer);
  }

  /// Prefill with a selection made elsewhere (one ascending list of positions per KV head).
  template <Element T>
  void compress(const TensorView<T>& keys, const TensorView<T>& values, Selection selection) {
    check_kv(keys, values);
    store(keys, values, std::move(selection));
  }

  /// Decode: appends one token. k and v are (kv_heads, D) row-major.
  template <Element T>
  void append(const T* k, const T* v) {
    detail::require(k != nullptr, "k", "a non-null pointer", "nullptr");
    detail::require(v != nullptr, "v", "a non-null pointer", "nullptr");
    detail::check_aligned(k, "k");
    detail::check_aligned(v, "v");
    const index_t H = shape_.kv_heads, D = shape_.head_dim;
    detail::check_finite(view(k, H, 1, D), "k");
    detail::check_finite(view(v, H, 1, D), "v");
    if (layout_.residual_limit == 0) {  // B = 1: every token is a block of its own
      std::vector<float> kf(static_cast<std::size_t>(H * D)), vf(kf.size());
      for (index_t i = 0; i < H * D; ++i) {
        kf[i] = to_float(k[i]);
        vf[i] = to_float(v[i]);
      }
      grow(blocks_ + 1, 0);
      encode_blocks(kf.data(), vf.data(), 1, blocks_);
      ++blocks_;
    } else {
      if (residual_ == layout_.residual_capacity) grow(blocks_, layout_.residual_limit);
      for (index_t h = 0; h < H; ++h) {
        auto* rk = reinterpret_cast<half*>(data_.data() + layout_.residual_key_offset(h, residual_));
        auto* rv = reinterpret_cast<half*>(data_.data() + layout_.residual_value_offset(h, residual_));
        for (index_t c = 0; c < D; ++c) {
          rk[c] = detail::residual_half(to_float(k[h * D + c]), "k");
          rv[c] = detail::residual_half(to_float(v[h * D + c]), "v");
        }
      }
      ++residual_;
      if (residual_ == layout_.residual_limit) {
        try {
          flush_residual();
        } catch (...) {
          --residual_;  // a block that cannot be encoded: the token is not appended
          throw;
        }
      }
    }
    for (auto& p : positions_) p.push_back(next_position_);
    ++next_position_;
  }

  /// out = softmax(scale * q K^T) V for every query head; q and out are (q_heads, D) row-major.
  template <Element T>
  void attend(const T* q, float* out) const {
    detail::require(q != nullptr, "q", "a non-null pointer", "nullptr");
    detail::require(out != nullptr, "out", "a non-null pointer", "nullptr");
    detail::check_aligned(q, "q");
    detail::check_aligned(out, "out");
    detail::require(tokens() > 0, "cache", "at least one token (call compress first)", "an empty cache");
    const index_t n = shape_.q_heads * shape_.head_dim;
    std::vector<float> qf(static_cast<std::size_t>(n));
    for (index_t i = 0; i < n; ++i) qf[i] = to_float(q[i]);
    detail::check_finite(view(qf.data(), shape_.q_heads, 1, shape_.head_dim), "q");
    cpu::attend(kq_, vq_, state(), qf.data(), out, softmax_scale(), options_.precision);
  }

  /// Dense float copy of what the cache stores (keys, values) in positional order.
  [[nodiscard]] DenseKV dequantize() const {
    const index_t H = shape_.kv_heads, D = shape_.head_dim, B = layout_.block_tokens, N = tokens();
    DenseKV d{H, N, D, std::vector<float>(static_cast<std::size_t>(H * N * D)), std::vector<float>(static_cast<std::size_t>(H * N * D))};
    // blocks in parallel (each writes its own rows; the result does not depend on the thread count)
    const index_t nb = H * blocks_;
    // decode's SIMD choice reads QPKV_CPU: first here, so that a bad value throws on this thread
    // (an exception leaving the parallel region would terminate the process)
    (void)cpu::cpu_cap();
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) if (nb > 1 && nb * B * D >= quant::fast::parallel_elements)
#endif
    for (index_t i = 0; i < nb; ++i) {
      const index_t h = i / blocks_, b = i % blocks_;
      const std::uint8_t* blk = data_.data() + layout_.block_offset(h, b);
      kq_.decode(blk, B, D, d.keys.data() + (h * N + b * B) * D);
      vq_.decode(blk + layout_.key_part, B, D, d.values.data() + (h * N + b * B) * D);
    }
    for (index_t h = 0; h < H; ++h) {
      const auto* rk = reinterpret_cast<const half*>(data_.data() + layout_.residual_key_offset(h, 0));
      const auto* rv = reinterpret_cast<const half*>(data_.data() + layout_.residual_value_offset(h, 0));
      for (index_t i = 0; i < residual_ * D; ++i) {
        d.keys[(h * N + blocks_ * B) * D + i] = to_float(rk[i]);
        d.values[(h * N + blocks_ * B) * D + i] = to_float(rv[i]);
      }
    }
    return d;
  }

  /// Prompt positions of the tokens head `head` holds, ascending (appended tokens continue after
  /// the prompt: N, N+1, ...).
  [[nodiscard]] std::span<const index_t> positions(index_t head) const {
    detail::require(head >= 0 && head < shape_.kv_heads, "head", detail::concat("in [0, ", shape_.kv_heads, ")"), head);
    return std::span<const index_t>(positions_[static_cast<std::size_t>(head)]);
  }

  [[nodiscard]] index_t tokens() const { return blocks_ * layout_.block_tokens + residual_; }
  /// Exact bytes of the KV storage allocation (codes, scales, mins, outlier slots, residual).
  [[nodiscard]] std::size_t bytes() const { return data_.size(); }
  /// Bytes of the position lists (bookkeeping for the caller; attention never reads them).
  [[nodiscard]] std::size_t metadata_bytes() const {
    std::size_t n = 0;
    for (const auto& p : positions_) n += p.capacity() * sizeof(index_t);
    return n;
  }
  [[nodiscard]] const Shape& shape() const { return shape_; }
  [[nodiscard]] const CacheLayout& layout() const { return layout_; }
  [[nodiscard]] CacheState state() const { return CacheState{layout_, data_.data(), blocks_, residual_}; }
  [[nodiscard]] const key_quantizer& keys_quantizer() const { return kq_; }
  [[nodiscard]] const value_quantizer& values_quantizer() const { return vq_; }
  [[nodiscard]] const Selector& selector() const { return selector_; }
  /// Requested residual length (the allocated residual is layout().residual_capacity slots).
  [[nodiscard]] index_t residual_length() const { return residual_length_; }
  [[nodiscard]] float softmax_scale() const {
    return options_.scale > 0.0f ? options_.scale : 1.0f / std::sqrt(static_cast<float>(shape_.head_dim));
  }

  /// Grows the allocation so that `tokens` tokens fit without reallocating during append().
  void reserve(index_t tokens) {
    detail::require(tokens >= 0, "tokens", ">= 0", tokens);
    grow((tokens + layout_.block_tokens - 1) / layout_.block_tokens, layout_.residual_limit);
  }

 private:
  template <Element T>
  void check_kv(const TensorView<T>& keys, const TensorView<T>& values) const {
    detail::check_view(keys, "keys");
    detail::check_view(values, "values");
    detail::require(keys.heads == shape_.kv_heads, "keys.heads", shape_.kv_heads, keys.heads);
    detail::require(keys.dim == shape_.head_dim, "keys.dim", shape_.head_dim, keys.dim);
    detail::require(values.heads == keys.heads, "values.heads", keys.heads, values.heads);
    detail::require(values.tokens == keys.tokens, "values.tokens", keys.tokens, values.tokens);
    detail::require(values.dim == keys.dim, "values.dim", keys.dim, values.dim);
    detail::check_finite(keys, "keys");
    detail::check_finite(values, "values");
  }

  template <Element T>
  void store(const TensorView<T>& keys, const TensorView<T>& values, Selection sel) {
    const index_t H = shape_.kv_heads, D = shape_.head_dim, N = keys.tokens;
    detail::require(sel.heads() == H, "selection.heads", H, sel.heads());
    const index_t C = sel.count(0);
    for (index_t h = 0; h < H; ++h) {
      detail::require(sel.count(h) == C, "selection.kept[" + std::to_string(h) + "].size()",
                      detail::concat(C, " (the same count for every head)"), sel.count(h));
      for (index_t i = 0; i < C; ++i) {
        const index_t p = sel.kept[h][i];
        detail::require(p >= 0 && p < N, "selection position", detail::concat("in [0, ", N, ")"), p);
        if (i) detail::require(p > sel.kept[h][i - 1], "selection order", "strictly ascending positions", p);
      }
    }
    index_t res = 0;
    blocks_ = residual_ = 0;  // empty until the new content is complete: a throw below leaves an
    for (auto& p : positions_) p.clear();  // empty, consistent cache (tests/test_hostile.cpp)
    layout_ = plan_layout(shape_, kq_, vq_, residual_length_, C, &res);
    data_ = AlignedBuffer(layout_.total_bytes());
    if (data_.size()) std::memset(data_.data(), 0, data_.size());  // an empty selection has no buffer
    const index_t B = layout_.block_tokens, nb = layout_.capacity_blocks;
    // gather the quantized part as [head][token][dim] floats, the rest into the fp16 residual
    std::vector<float> kf(static_cast<std::size_t>(H * nb * B * D)), vf(kf.size());
    for (index_t h = 0; h < H; ++h)
      for (index_t i = 0; i < C; ++i) {
        const index_t p = sel.kept[h][i];
        const T* kr = keys.row(h, p);
        const T* vr = values.row(h, p);
        if (i < nb * B) {
          for (index_t c = 0; c < D; ++c) {
            kf[(h * nb * B + i) * D + c] = to_float(kr[c]);
            vf[(h * nb * B + i) * D + c] = to_float(vr[c]);
          }
        } else {
          auto* rk = reinterpret_cast<half*>(data_.data() + layout_.residual_key_offset(h, i - nb * B));
          auto* rv = reinterpret_cast<half*>(data_.data() + layout_.residual_value_offset(h, i - nb * B));
          for (index_t c = 0; c < D; ++c) {
            rk[c] = detail::residual_half(to_float(kr[c]), "keys");
            rv[c] = detail::residual_half(to_float(vr[c]), "values");
          }
        }
      }
    if (nb > 0) {
      // one encode call per tensor for the whole layer (HQQ's optimizer stops on the layer's error)
      kq_.encode(kf.data(), H * nb, B, D, data_.data(), layout_.block_bytes());
      vq_.encode(vf.data(), H * nb, B, D, data_.data() + layout_.key_part, layout_.block_bytes());
    }
    blocks_ = nb;
    residual_ = res;
    positions_ = std::move(sel.kept);
    next_position_ = N;
  }

  /// Quantizes `n` new blocks per head (k, v: [head][n*B][D] floats) into block slots [first, first+n).
  void encode_blocks(const float* k, const float* v, index_t n, index_t first) {
    const index_t B = layout_.block_tokens, D = shape_.head_dim;
    for (index_t h = 0; h < shape_.kv_heads; ++h) {
      std::uint8_t* dst = data_.data() + layout_.block_offset(h, first);
      kq_.encode(k + h * n * B * D, n, B, D, dst, layout_.block_bytes());
      vq_.encode(v + h * n * B * D, n, B, D, dst + layout_.key_part, layout_.block_bytes());
    }
  }

  void flush_residual() {
    const index_t H = shape_.kv_heads, D = shape_.head_dim, R = layout_.residual_limit;
    std::vector<float> kf(static_cast<std::size_t>(H * R * D)), vf(kf.size());
    for (index_t h = 0; h < H; ++h) {
      const auto* rk = reinterpret_cast<const half*>(data_.data() + layout_.residual_key_offset(h, 0));
      const auto* rv = reinterpret_cast<const half*>(data_.data() + layout_.residual_value_offset(h, 0));
      for (index_t i = 0; i < R * D; ++i) {
        kf[h * R * D + i] = to_float(rk[i]);
        vf[h * R * D + i] = to_float(rv[i]);
      }
    }
    const index_t n = R / layout_.block_tokens;
    grow(blocks_ + n, layout_.residual_capacity);
    encode_blocks(kf.data(), vf.data(), n, blocks_);
    blocks_ += n;
    residual_ = 0;
  }

  /// Ensures room for `need_blocks` blocks and `need_residual` residual slots per head. Blocks grow
  /// geometrically (x1.5) so append is amortised O(1). bytes() always reports the allocation.
  void grow(index_t need_blocks, index_t need_residual) {
    if (need_blocks <= layout_.capacity_blocks && need_residual <= layout_.residual_capacity) return;
    CacheLayout nl = layout_;
    if (need_blocks > layout_.capacity_blocks)
      nl.capacity_blocks = std::max(need_blocks, layout_.capacity_blocks + layout_.capacity_blocks / 2);
    nl.residual_capacity = std::max(need_residual, layout_.residual_capacity);
    AlignedBuffer nd(nl.total_bytes());
    std::memset(nd.data(), 0, nd.size());
    const std::size_t res_bytes = static_cast<std::size_t>(residual_ * shape_.head_dim) * sizeof(half);
    for (index_t h = 0; h < shape_.kv_heads && data_.size() > 0; ++h) {
      std::memcpy(nd.data() + nl.block_offset(h, 0), data_.data() + layout_.block_offset(h, 0),
                  static_cast<std::size_t>(blocks_) * layout_.block_bytes());
      std::memcpy(nd.data() + nl.residual_key_offset(h, 0), data_.data() + layout_.residual_key_offset(h, 0), res_bytes);
      std::memcpy(nd.data() + nl.residual_value_offset(h, 0), data_.data() + layout_.residual_value_offset(h, 0), res_bytes);
    }
    layout_ = nl;
    data_ = std::move(nd);
  }

  friend struct detail::CacheFileAccess;

  Shape shape_;
  Selector selector_;
  key_quantizer kq_;
  value_quantizer vq_;
  CacheOptions options_;
  index_t residual_length_ = 0;  // requested residual length
  index_t residual_ = 0;         // filled residual slots per head
  CacheLayout layout_;
  AlignedBuffer data_;
  index_t blocks_ = 0;
  std::vector<std::vector<index_t>> positions_;
  index_t next_position_ = 0;
};

}  // namespace qpkv
