// qpkv/core/tensor.hpp - shapes and non-owning views over the caller's [head][token][dim] tensors.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "qpkv/core/dtype.hpp"
#include "qpkv/core/error.hpp"

namespace qpkv {

using index_t = std::int64_t;

/// Attention geometry of one layer. GQA group = q_heads / kv_heads query heads share a KV head.
struct Shape {
  index_t kv_heads = 0;
  index_t q_heads = 0;
  index_t head_dim = 0;

  [[nodiscard]] constexpr index_t group_size() const { return kv_heads > 0 ? q_heads / kv_heads : 0; }

  /// Throws qpkv::Error unless all sizes are positive and q_heads is a multiple of kv_heads.
  void validate() const {
    detail::require(kv_heads > 0, "shape.kv_heads", "> 0", kv_heads);
    detail::require(q_heads > 0, "shape.q_heads", "> 0", q_heads);
    detail::require(head_dim > 0, "shape.head_dim", "> 0", head_dim);
    detail::require(q_heads % kv_heads == 0, "shape.q_heads",
                    detail::concat("a multiple of kv_heads (", kv_heads, ")"), q_heads);
  }
  friend constexpr bool operator==(const Shape&, const Shape&) = default;
};

/// A read-only view of a (heads, tokens, dim) tensor in the caller's memory. The innermost (dim)
/// axis is contiguous; heads and tokens may be strided, so a view can address one layer of a
/// (layer, head, token, dim) array or a (token, head, dim) interleaved cache without a copy.
template <Element T>
struct TensorView {
  const T* data = nullptr;
  index_t heads = 0;
  index_t tokens = 0;
  index_t dim = 0;
  index_t head_stride = 0;   ///< elements between consecutive heads
  index_t token_stride = 0;  ///< elements between consecutive tokens

  using element_type = T;

  /// Dense row-major [head][token][dim].
  static constexpr TensorView dense(const T* data, index_t heads, index_t tokens, index_t dim) {
    return TensorView{data, heads, tokens, dim, tokens * dim, dim};
  }

  [[nodiscard]] const T* row(index_t head, index_t token) const {
    return data + head * head_stride + token * token_stride;
  }
  [[nodiscard]] float at(index_t head, index_t token, index_t c) const {
    return to_float(row(head, token)[c]);
  }
  [[nodiscard]] bool empty() const { return heads == 0 || tokens == 0 || dim == 0; }

  /// The last `n` tokens of every head (a suffix view, e.g. the observation window).
  [[nodiscard]] TensorView last_tokens(index_t n) const {
    TensorView v = *this;
    v.data = row(0, tokens - n);
    v.tokens = n;
    return v;
  }
};

template <Element T>
TensorView<T> view(const T* data, index_t heads, index_t tokens, index_t dim) {
  return TensorView<T>::dense(data, heads, tokens, dim);
}

namespace detail {

/// Throws unless p is aligned for T (reading a misaligned T is undefined behaviour).
template <class T>
void check_aligned(const T* p, std::string_view name) {
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(T) != 0)
    throw Error(concat("qpkv: ", name, ": expected a pointer aligned to ", alignof(T), " bytes, got ",
                       static_cast<const void*>(p)));
}

/// Validates a view's sizes and strides (name is the argument name used in messages).
template <Element T>
void check_view(const TensorView<T>& v, std::string_view name) {
  const std::string n(name);
  require(v.data != nullptr, n + ".data", "a non-null pointer", "nullptr");
  check_aligned(v.data, n + ".data");
  require(v.heads > 0, n + ".heads", "> 0", v.heads);
  require(v.tokens > 0, n + ".tokens", "> 0", v.tokens);
  require(v.dim > 0, n + ".dim", "> 0", v.dim);
  require(v.token_stride >= v.dim, n + ".token_stride", concat(">= dim (", v.dim, ")"), v.token_stride);
  require(v.head_stride >= 0, n + ".head_stride", ">= 0", v.head_stride);
}

/// Throws unless every element is finite; names the first offending element.
template <Element T>
void check_finite(const TensorView<T>& v, std::string_view name) {
  for (index_t h = 0; h < v.heads; ++h)
    for (index_t t = 0; t < v.tokens; ++t) {
      const T* r = v.row(h, t);
      for (index_t c = 0; c < v.dim; ++c) {
        const float x = to_float(r[c]);
        if (!std::isfinite(x))
          throw Error(concat("qpkv: ", name, ": expected finite values, got ", x, " at [head ", h,
                             ", token ", t, ", dim ", c, "]"));
      }
    }
}

}  // namespace detail
}  // namespace qpkv
