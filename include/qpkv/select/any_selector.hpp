// qpkv/select/any_selector.hpp - AnySelector: one of the built-in token selectors, chosen at run time.
//
// Selection runs once per layer at prefill and is dominated by the scoring GEMMs, so a runtime
// choice (std::variant + std::visit) costs nothing measurable there; this is what lets
// AnyCompressedKV (cache/any_cache.hpp) keep a single selector type for every bit-width
// instantiation. AnySelector satisfies TokenSelector and forwards every call to the selector it
// holds, with that selector's own parameters, checks and error messages. The hot loops (quantize,
// attend) never see it.
#pragma once

#include <array>
#include <cstddef>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>

#include "qpkv/core/tensor.hpp"
#include "qpkv/select/h2o.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/pyramidkv.hpp"
#include "qpkv/select/selection.hpp"
#include "qpkv/select/snapkv.hpp"
#include "qpkv/select/streaming_llm.hpp"

namespace qpkv {

/// The built-in selection methods, in the order of AnySelector's alternatives.
enum class Method { keep_all, streamingllm, snapkv, h2o, pyramidkv };

inline constexpr std::array<Method, 5> kMethods = {Method::keep_all, Method::streamingllm, Method::snapkv,
                                                   Method::h2o, Method::pyramidkv};

/// The method's name as the KVConfig grammar spells it ("keep_all", "streamingllm", ...).
constexpr std::string_view method_name(Method m) {
  switch (m) {
    case Method::keep_all: return "keep_all";
    case Method::streamingllm: return "streamingllm";
    case Method::snapkv: return "snapkv";
    case Method::h2o: return "h2o";
    case Method::pyramidkv: return "pyramidkv";
  }
  return "?";
}

class AnySelector {
 public:
  /// Alternative i is the selector of Method(i).
  using variant_type = std::variant<KeepAll, StreamingLLM, SnapKV, H2O, PyramidKV>;

  template <class S>
  static constexpr bool is_alternative =
      std::is_same_v<S, KeepAll> || std::is_same_v<S, StreamingLLM> || std::is_same_v<S, SnapKV> ||
      std::is_same_v<S, H2O> || std::is_same_v<S, PyramidKV>;

  /// KeepAll.
  AnySelector() = default;
  /// Holds `selector` (implicit, so a concrete selector converts where an AnySelector is expected).
  template <class S>
    requires is_alternative<std::remove_cvref_t<S>>
  AnySelector(S&& selector) : v_(std::forward<S>(selector)) {}  // NOLINT(google-explicit-constructor)

  template <Element T>
  [[nodiscard]] Selection select(const TensorView<T>& keys, const TensorView<T>& queries, index_t capacity,
                                 LayerInfo layer = {}) const {
    return std::visit([&](const auto& s) { return s.select(keys, queries, capacity, layer); }, v_);
  }
  [[nodiscard]] index_t kept_tokens(index_t n, index_t capacity, LayerInfo layer = {}) const {
    return std::visit([&](const auto& s) -> index_t { return s.kept_tokens(n, capacity, layer); }, v_);
  }
  [[nodiscard]] index_t queries_needed(index_t n) const {
    return std::visit([&](const auto& s) -> index_t { return s.queries_needed(n); }, v_);
  }
  /// Throws qpkv::Error if the held selector's parameters cannot serve `capacity` at `layer`.
  void validate(index_t capacity, LayerInfo layer = {}) const {
    std::visit([&](const auto& s) { s.validate(capacity, layer); }, v_);
  }

  [[nodiscard]] Method method() const { return static_cast<Method>(v_.index()); }
  [[nodiscard]] const variant_type& variant() const { return v_; }
  /// The held selector if it is an S, else nullptr.
  template <class S>
    requires is_alternative<S>
  [[nodiscard]] const S* get_if() const {
    return std::get_if<S>(&v_);
  }

 private:
  variant_type v_;
};

static_assert(TokenSelector<AnySelector>);
static_assert(std::is_same_v<std::variant_alternative_t<static_cast<std::size_t>(Method::streamingllm), AnySelector::variant_type>, StreamingLLM>);
static_assert(std::is_same_v<std::variant_alternative_t<static_cast<std::size_t>(Method::pyramidkv), AnySelector::variant_type>, PyramidKV>);
static_assert(std::variant_size_v<AnySelector::variant_type> == kMethods.size());

}  // namespace qpkv
