// qpkv/model/cache_config.hpp - how a model's per-layer KV caches are built and sized: a KVConfig
// (method, bits, quantizer and selector parameters; cache/any_cache.hpp) plus a budget.
//
// Text form (CacheConfig::parse / to_string; the qpkv CLI's --kv reads it): the KVConfig grammar
// of cache/any_cache.hpp with three more keys, which may appear anywhere after the method:
//
//   key         value                      meaning
//   budget      <num>/<den>                per layer: floor(num/den x the fp16 bytes of the P-token
//                                          prefix of one layer), Budget::fraction(num, den, P, shape)
//               <bytes>                    per layer, in bytes
//   capacity    integer >= 1               tokens per KV head handed to the selector directly (for
//                                          PyramidKV the layer average); no byte accounting
//   accounting  exact | nominal (exact)    how a budget becomes a capacity (only with budget=):
//                 exact    the most tokens whose exact footprint (codes, fp16 scales and mins,
//                          outlier slots, fp16 residual) fits: capacity_for(budget, shape, key
//                          quantizer, value quantizer, residual, {min_capacity(selector), P})
//                 nominal  the paper's rule: floor(budget / fp16 bytes per token) x 32 / (key_bits
//                          + value_bits), capped at P (for key_bits == value_bits this is
//                          nominal_tokens() of budget.hpp); it may exceed the budget, and says so
//                          in CachePlan
//
// e.g. "snapkv,kivi4,budget=1/8", "pyramidkv,kivi2,budget=1/16,window=8", "h2o,fp16,capacity=64",
// "keep_all,kivi8" (every token, 8 bits), "keep_all,fp16" (the default: the full-precision cache).
// Rules: budget and capacity exclude each other; both need a pruning method (keep_all keeps every
// token, so a budget could not bind; use keep_all with bits alone); a pruning method needs one of
// them. Unknown keys are rejected with the list of valid keys (KVConfig's and these three).
//
// Planning (plan_cache): the prompt's P tokens are prefilled; every layer's selector gets the same
// capacity C (budget or capacity= as above) and keeps selector.kept_tokens(P, C, {layer, layers})
// tokens per KV head — C, or all P when P <= C; PyramidKV more in low layers and fewer in high ones.
// A prompt no longer than the selector's least capacity (its window) is kept whole whatever the
// budget: the window tokens are always kept. The planned bytes of a layer are footprint() of its
// token count under the config's quantizers — exactly CompressedKV::bytes() right after compress().
#pragma once

#include <algorithm>
#include <charconv>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include "qpkv/cache/any_cache.hpp"
#include "qpkv/cache/budget.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"

namespace qpkv::model {

/// How a budget becomes a token count (see the header comment).
enum class Accounting { exact, nominal };

/// The token limit of every layer's cache: none (keep_all), a byte budget, or a capacity.
struct CacheBudget {
  enum class Kind { none, fraction, bytes, capacity };
  Kind kind = Kind::none;
  std::int64_t num = 0, den = 1;  ///< Kind::fraction: num/den of the fp16 prefix cache
  std::int64_t bytes = 0;         ///< Kind::bytes: bytes per layer
  index_t capacity = 0;           ///< Kind::capacity: tokens per KV head
  Accounting accounting = Accounting::exact;

  /// Per-layer bytes for a P-token prefix (0 for Kind::none and Kind::capacity).
  [[nodiscard]] std::int64_t bytes_for(const Shape& shape, index_t prefix) const {
    if (kind == Kind::fraction) return Budget::fraction(num, den, prefix, shape).bytes;
    if (kind == Kind::bytes) return bytes;
    return 0;
  }
  friend bool operator==(const CacheBudget&, const CacheBudget&) = default;
};

/// A model's cache setup: the per-layer cache (KVConfig) and its budget.
struct CacheConfig {
  KVConfig kv{};         ///< default: keep_all, fp16 — the full-precision cache
  CacheBudget budget{};

  friend bool operator==(const CacheConfig&, const CacheConfig&) = default;

  /// Throws qpkv::Error naming the first invalid field (KVConfig::validate, then the budget rules).
  void validate() const {
    kv.validate();
    using K = CacheBudget::Kind;
    const auto& b = budget;
    if (b.kind == K::fraction) {
      qpkv::detail::require(b.num > 0, "CacheConfig.budget", "num/den with num > 0", b.num);
      qpkv::detail::require(b.den > 0, "CacheConfig.budget", "num/den with den > 0", b.den);
    }
    if (b.kind == K::bytes) qpkv::detail::require(b.bytes > 0, "CacheConfig.budget", "> 0 bytes", b.bytes);
    if (b.kind == K::capacity) qpkv::detail::require(b.capacity >= 1, "CacheConfig.capacity", ">= 1", b.capacity);
    const bool prunes = kv.method != Method::keep_all;
    qpkv::detail::require(!(b.kind != K::none && !prunes), "CacheConfig.budget",
                          "no budget or capacity with keep_all (it keeps every token; give bits alone)",
                          b.kind == K::capacity ? "capacity" : "budget");
    qpkv::detail::require(!(b.kind == K::none && prunes), "CacheConfig.budget",
                          qpkv::detail::concat("budget= or capacity= with ", method_name(kv.method)), "neither");
  }

  /// Reads the text form (see the header comment) and validates it.
  [[nodiscard]] static CacheConfig parse(std::string_view text);
  /// The canonical text form: KVConfig::to_string() then budget/capacity/accounting when set.
  [[nodiscard]] std::string to_string() const;
};

namespace detail {
using namespace qpkv::detail;

inline constexpr std::string_view kBudgetKeys[] = {"budget", "capacity", "accounting"};

inline std::int64_t parse_int(std::string_view s, std::string_view field) {
  std::int64_t v = 0;
  const auto r = std::from_chars(s.data(), s.data() + s.size(), v);
  if (s.empty() || r.ec != std::errc{} || r.ptr != s.data() + s.size())
    throw Error(concat("qpkv: CacheConfig.", field, ": expected an integer, got '", s, "'"));
  return v;
}

inline std::string all_keys() {
  std::string s;
  for (const auto& k : any_detail::config_keys()) s += (s.empty() ? "" : ", ") + std::string(k.name);
  for (const auto k : kBudgetKeys) s += ", " + std::string(k);
  return s;
}

}  // namespace detail

inline CacheConfig CacheConfig::parse(std::string_view text) {
  CacheConfig c;
  std::string rest;  // the tokens KVConfig::parse reads
  bool given[3] = {false, false, false};
  std::size_t index = 0;
  for (std::size_t start = 0;; ++index) {
    const std::size_t comma = text.find(',', start);
    const std::string_view t =
        any_detail::trim(text.substr(start, comma == std::string_view::npos ? comma : comma - start));
    const std::size_t eq = t.find('=');
    const std::string_view name = eq == std::string_view::npos ? t : any_detail::trim(t.substr(0, eq));
    const std::string_view value = eq == std::string_view::npos ? std::string_view{} : any_detail::trim(t.substr(eq + 1));
    std::size_t k = 0;
    while (k < 3 && detail::kBudgetKeys[k] != name) ++k;
    if (index > 0 && eq != std::string_view::npos && k == 3) {
      bool known = false;
      for (const auto& ck : any_detail::config_keys()) known = known || ck.name == name;
      if (!known)
        throw Error(detail::concat("qpkv: CacheConfig key: expected one of ", detail::all_keys(), ", got '", name,
                                   "' in \"", text, "\""));
    }
    if (index > 0 && eq != std::string_view::npos && k < 3) {
      if (given[k])
        throw Error(detail::concat("qpkv: CacheConfig.", name, ": expected at most once, got it twice in \"", text, "\""));
      given[k] = true;
      using K = CacheBudget::Kind;
      if (k == 0) {
        const std::size_t slash = value.find('/');
        if (slash == std::string_view::npos) {
          c.budget.kind = K::bytes;
          c.budget.bytes = detail::parse_int(value, "budget");
        } else {
          c.budget.kind = K::fraction;
          c.budget.num = detail::parse_int(any_detail::trim(value.substr(0, slash)), "budget (numerator)");
          c.budget.den = detail::parse_int(any_detail::trim(value.substr(slash + 1)), "budget (denominator)");
        }
      } else if (k == 1) {
        c.budget.kind = K::capacity;
        c.budget.capacity = detail::parse_int(value, "capacity");
      } else if (value == "exact" || value == "nominal") {
        c.budget.accounting = value == "exact" ? Accounting::exact : Accounting::nominal;
      } else {
        throw Error(detail::concat("qpkv: CacheConfig.accounting: expected exact or nominal, got '", value, "'"));
      }
    } else {
      rest += (rest.empty() ? "" : ",") + std::string(t);
    }
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  if (given[0] && given[1])
    throw Error(detail::concat("qpkv: CacheConfig: expected budget= or capacity=, not both, in \"", text, "\""));
  if (given[2] && !given[0])
    throw Error(detail::concat("qpkv: CacheConfig.accounting: expected it only with budget=, in \"", text, "\""));
  c.kv = KVConfig::parse(rest);
  c.validate();
  return c;
}

inline std::string CacheConfig::to_string() const {
  std::string s = kv.to_string();
  using K = CacheBudget::Kind;
  if (budget.kind == K::fraction) s += detail::concat(",budget=", budget.num, "/", budget.den);
  if (budget.kind == K::bytes) s += detail::concat(",budget=", budget.bytes);
  if (budget.kind == K::capacity) s += detail::concat(",capacity=", budget.capacity);
  if ((budget.kind == K::fraction || budget.kind == K::bytes) && budget.accounting == Accounting::nominal)
    s += ",accounting=nominal";
  return s;
}

/// One layer of a CachePlan.
struct LayerCachePlan {
  index_t layer = 0;
  index_t tokens = 0;      ///< kept per KV head after prefill: selector.kept_tokens(P, capacity, layer)
  std::size_t bytes = 0;   ///< footprint of those tokens = the cache's bytes() right after compress()
};

/// What every layer's cache holds right after the P-token prefill (plan_cache).
struct CachePlan {
  index_t prefix = 0;               ///< P
  std::int64_t budget_bytes = 0;    ///< per layer; 0 without a byte budget
  index_t capacity = 0;             ///< handed to every layer's selector (P for keep_all)
  std::vector<LayerCachePlan> layers;
  std::size_t total_bytes = 0;      ///< sum over layers
  std::int64_t full_fp16_bytes = 0; ///< layers x fp16_bytes(shape, P): the uncompressed prefix cache
  /// True when every layer's bytes fit budget_bytes (always for exact accounting and pruning
  /// methods other than PyramidKV, whose layers trade tokens around the average).
  [[nodiscard]] bool within_budget() const {
    if (budget_bytes == 0) return true;
    for (const auto& l : layers)
      if (static_cast<std::int64_t>(l.bytes) > budget_bytes) return false;
    return true;
  }
};

/// The capacity and the bytes of every layer after prefilling `prefix` tokens (see the header
/// comment). Throws qpkv::Error for an invalid config or a budget too small for the selector's
/// least capacity.
inline CachePlan plan_cache(const Shape& shape, index_t layers, index_t prefix, const CacheConfig& config) {
  config.validate();
  shape.validate();
  qpkv::detail::require(layers >= 1, "layers", ">= 1", layers);
  qpkv::detail::require(prefix >= 0, "prefix", ">= 0", prefix);
  using K = CacheBudget::Kind;
  const CacheBudget& b = config.budget;
  qpkv::detail::require(prefix >= 1 || b.kind == K::none, "prefix",
                        ">= 1 token with a budget or capacity (nothing to compress otherwise)", prefix);
  const AnyCompressedKV probe(shape, config.kv);  // the quantizers and residual exactly as the caches hold them
  const AnySelector& selector = probe.selector();
  CachePlan plan;
  plan.prefix = prefix;
  plan.full_fp16_bytes = qpkv::detail::checked_mul(fp16_bytes(shape, prefix), layers, "full_fp16_bytes");
  if (b.kind == K::none) {
    plan.capacity = prefix;
  } else if (b.kind == K::capacity) {
    selector.validate(b.capacity, LayerInfo{0, layers});
    plan.capacity = b.capacity;
  } else {
    plan.budget_bytes = b.bytes_for(shape, prefix);
    const Budget budget{plan.budget_bytes};
    budget.validate("CacheConfig.budget");
    const index_t least = std::max<index_t>(1, min_capacity(selector, LayerInfo{0, layers}));
    if (prefix <= least) {
      plan.capacity = least;  // the whole prompt is the window: kept whole
    } else if (b.accounting == Accounting::exact) {
      plan.capacity = probe.visit([&](const auto& c) {
        return capacity_for(budget, shape, c.keys_quantizer(), c.values_quantizer(), c.residual_length(),
                            TokenLimits{least, prefix});
      });
    } else {
      const index_t fp16_tokens = budget.bytes / fp16_bytes(shape, 1);
      const index_t nominal = std::min<index_t>(fp16_tokens * 32 / (config.kv.key_bits + config.kv.value_bits), prefix);
      qpkv::detail::require(nominal >= least, "CacheConfig.budget",
                            qpkv::detail::concat("room for >= ", least,
                                                 " tokens under the nominal rule (the selector's least capacity)"),
                            qpkv::detail::concat(budget.bytes, " bytes (", nominal, " tokens)"));
      plan.capacity = nominal;
    }
  }
  probe.visit([&](const auto& c) {
    for (index_t l = 0; l < layers; ++l) {
      LayerCachePlan p;
      p.layer = l;
      p.tokens = prefix == 0 ? 0 : static_cast<index_t>(selector.kept_tokens(prefix, plan.capacity, LayerInfo{l, layers}));
      p.bytes = footprint(shape, c.keys_quantizer(), c.values_quantizer(), p.tokens, c.residual_length());
      plan.total_bytes += p.bytes;
      plan.layers.push_back(p);
    }
  });
  return plan;
}

}  // namespace qpkv::model
