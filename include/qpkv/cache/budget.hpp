// qpkv/cache/budget.hpp - the budget planner: exact bytes <-> tokens, for one layer and a model.
//
// A budget is bytes per layer (one layer's keys and values, all its KV heads). Every byte count
// here comes from plan_layout(), the function CompressedKV allocates with, so a planned footprint
// IS CompressedKV::bytes() right after compress() of that many tokens: codes, fp16 scales and
// mins, outlier slots and the fp16 residual buffer (tests/test_budget.cpp builds the caches).
//
//   fp16_bytes(shape, tokens)                   full fp16 K+V of one layer: 2 x kv_heads x tokens x head_dim x 2
//   Budget{bytes}                               a per-layer budget (aggregate; bytes > 0)
//   Budget::fraction(num, den, N, shape)        floor(num / den x fp16_bytes(shape, N))
//   Budget::split(total, layers)                floor(total / layers) per layer
//
//   footprint(shape, key_q, value_q, tokens, residual = 0)      exact bytes of `tokens` kept tokens
//   footprint<KeyQ, ValueQ = KeyQ>(shape, tokens, options = {})
//   capacity_for(budget, shape, key_q, value_q, residual = 0, limits = {})
//   capacity_for<KeyQ, ValueQ = KeyQ>(budget, shape, options = {}, limits = {})
//       the largest token count C in [limits.min, limits.max] with footprint(C) <= budget.
//       Quantizers are taken exactly as CompressedKV takes them: a Quantizer, or a KV scheme such
//       as Kivi<4> (key part, value part, residual); Axis::automatic becomes channel for keys and
//       token for values; residual = max(residual argument or options.residual, the schemes').
//   TokenLimits{min = 1, max = unlimited}       min: the least capacity the selector accepts (see
//                                               min_capacity); max: the prompt length N, so that a
//                                               selector given C keeps exactly C tokens (or all N)
//   min_capacity(selector, layer = {})          the least capacity the selector's validate() accepts
//                                               (its window; 0 for KeepAll)
//   QuantSpec{key_bits, value_bits, group, residual}  a KIVI scheme chosen at run time (bits in
//                                               1, 2, 3, 4, 8, 16): the same bytes as
//                                               Kivi<key_bits, value_bits, group, residual>;
//                                               footprint(shape, spec, tokens) and
//                                               capacity_for(budget, shape, spec, limits = {})
//   nominal_tokens(budget, shape, bits)         the paper's rule: floor(budget / (4 kv_heads head_dim))
//                                               fp16 tokens, x 16 / bits (floor); scales, mins and
//                                               residual ignored
//   plan_table(shape, N, budget, group = 32, residual = 0, bits = {16, 8, 4, 3, 2, 1})
//       one PlanRow per bit width: exact capacity vs the nominal rule, the exact bytes of each and
//       bits per element; format_plan(rows) prints it as fixed-width text
//   ModelSpec{shape, layers, full_tokens, quant, layer_quant}  with LayerQuant{first, last, quant}:
//       the reference code's LayerQuant, a different QuantSpec for the layers [first, last)
//   plan_model(spec, per_layer_budget, selector)      every layer gets the same bytes; each layer's
//       capacity is capacity_for() of its own QuantSpec (fewer bits -> more tokens), tokens =
//       selector.kept_tokens(N, capacity, layer); total <= layers x per_layer_budget
//   plan_model_at_capacity(spec, capacity, selector)  the same capacity for every layer; tokens and
//       bytes per layer follow selector.kept_tokens (PyramidKV: more tokens low, fewer high)
//   format_model(plan)
// Everything validates its arguments and throws qpkv::Error "qpkv: <argument>: expected ..., got ...".
//
// The footprint function. With B = block tokens and R = the residual limit of the layout (see
// cache/layout.hpp; R = 0 only when B = 1 and no residual is asked for), compress() of C = qR + r
// tokens (0 <= r < R) quantizes qR of them into blocks and keeps r in fp16 residual slots, and
// allocates exactly that:
//     footprint(qR + r) = q P + r T,   P = kv_heads x (R / B) x block_bytes   (R quantized tokens)
//                                      T = 2 x kv_heads x head_dim x 2        (one fp16 token)
// (R = 0: footprint(C) = C x kv_heads x block_bytes.) This is NOT monotone in C: when (R - 1) T > P
// (every quantized KIVI scheme: 31 fp16 tokens cost more than a 4-bit block of 32), footprint(qR - 1)
// > footprint(qR), so a budget can hold C tokens but not C - 1. It is increasing within a step (q
// fixed), and the step minima footprint(qR) = qP increase with q. Hence the largest C <= U (U =
// limits.max) that fits budget b is found in O(1): take the largest step q with qP <= b and qR <= U,
// then the largest r with qP + rT <= b, r <= R - 1 and qR + r <= U. capacity_for() then verifies
// with plan_layout() itself that footprint(C) <= b, footprint(C + 1) > b (or C = U) and the next
// step's minimum footprint((q + 1)R) > b (or beyond U) — by the two facts above that proves no count
// in (C, U] fits — and throws if the closed form and plan_layout() ever disagree.
// Consequences: "one more token" never fits, but a smaller count may not fit either, so pass the
// prompt length as limits.max (the planner functions below do): a selector given C >= N keeps all N
// tokens, and footprint(N) may exceed a budget that footprint(C) meets. If fewer than limits.min
// tokens fit (at least one token is always required), capacity_for() throws an Error naming the
// budget, the least budget that would fit limits.min tokens, and the given bytes.
//
// The budget covers the cache after prefill. Decoding appends tokens: the first append() grows the
// residual to its R slots, and flushes grow the blocks (by half at least; CompressedKV::reserve()
// grows once).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/cache/layout.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/quant/kivi.hpp"
#include "qpkv/quant/quantizer.hpp"
#include "qpkv/select/selection.hpp"

namespace qpkv {

namespace detail {
/// Budgets and byte counts stay below 2^60 so that no planner arithmetic can overflow int64.
inline constexpr std::int64_t max_plan_bytes = std::int64_t{1} << 60;

inline std::int64_t checked_mul(std::int64_t a, std::int64_t b, std::string_view what) {
  require(a >= 0 && b >= 0 && (a == 0 || b <= max_plan_bytes / a), what, "a size below 2^60", concat(a, " x ", b));
  return a * b;
}
}  // namespace detail

/// Bytes of the full fp16 cache of one layer holding `tokens` tokens: K and V, 2 bytes each.
inline std::int64_t fp16_bytes(const Shape& shape, index_t tokens) {
  shape.validate();
  detail::require(tokens >= 0, "tokens", ">= 0", tokens);
  const std::int64_t per_token = detail::checked_mul(4 * shape.kv_heads, shape.head_dim, "fp16 bytes per token");
  return detail::checked_mul(per_token, tokens, "fp16_bytes");
}

/// A memory budget for one layer's KV cache, in bytes.
struct Budget {
  std::int64_t bytes = 0;

  /// Throws unless 0 < bytes <= 2^60.
  void validate(std::string_view name = "budget") const {
    detail::require(bytes > 0, name, "> 0 bytes", bytes);
    detail::require(bytes <= detail::max_plan_bytes, name, "<= 2^60 bytes", bytes);
  }

  /// num/den of the full fp16 cache of one layer holding `full_tokens` tokens (floor).
  static Budget fraction(std::int64_t num, std::int64_t den, index_t full_tokens, const Shape& shape) {
    detail::require(num > 0, "num", "> 0", num);
    detail::require(den > 0, "den", "> 0", den);
    detail::require(full_tokens > 0, "full_tokens", "> 0", full_tokens);
    const std::int64_t full = fp16_bytes(shape, full_tokens);
    // floor(full * num / den) without forming full * num
    const std::int64_t q = full / den, r = full % den;
    Budget b{detail::checked_mul(q, num, "budget") + detail::checked_mul(r, num, "budget") / den};
    b.validate("budget (num/den of the fp16 cache)");
    return b;
  }

  /// A model-wide budget shared equally by `layers` layers (floor).
  static Budget split(Budget total, index_t layers) {
    total.validate("total");
    detail::require(layers >= 1, "layers", ">= 1", layers);
    Budget b{total.bytes / layers};
    b.validate("budget (total / layers)");
    return b;
  }
};

namespace detail {

template <class Q>
concept QuantizerOrScheme = Quantizer<typename key_of<Q>::type> && Quantizer<typename value_of<Q>::type>;

/// The quantizers and residual length a CompressedKV built from these arguments uses, validated
/// in the same order and with the same messages as its constructor.
template <class KeyQ, class ValueQ>
struct Resolved {
  typename key_of<KeyQ>::type key;
  typename value_of<ValueQ>::type value;
  index_t residual = 0;
};

template <class KeyQ, class ValueQ>
Resolved<KeyQ, ValueQ> resolve(const Shape& shape, const KeyQ& key_q, const ValueQ& value_q, const CacheOptions& options,
                               std::string_view residual_name) {
  shape.validate();
  Resolved<KeyQ, ValueQ> r{key_quantizer_of(key_q), value_quantizer_of(value_q), 0};
  r.key.validate(shape.head_dim, "key_quantizer");
  r.value.validate(shape.head_dim, "value_quantizer");
  require(options.residual >= 0, residual_name, ">= 0", options.residual);
  r.residual = residual_length_of(key_q, value_q, options);
  return r;
}

template <class KQ, class VQ>
std::int64_t layout_bytes(const Shape& shape, const KQ& kq, const VQ& vq, index_t residual, index_t tokens) {
  return static_cast<std::int64_t>(plan_layout(shape, kq, vq, residual, tokens).total_bytes());
}

/// The bytes of C tokens: (P, T, R) of the closed form at the top, checked against plan_layout.
struct Steps {
  index_t R = 0;           ///< residual limit, or 1 when there is no residual (every token a block)
  std::int64_t P = 0;      ///< bytes of R quantized tokens (all heads)
  std::int64_t T = 0;      ///< bytes of one fp16 residual token (all heads); unused when R = 1 and no residual
  [[nodiscard]] std::int64_t bytes(index_t c) const { return (c / R) * P + (c % R) * T; }
  /// The least budget that holds some count in [m, u]: within a step bytes grow and the step
  /// minima grow, so it is footprint(m) or the start of the next step.
  [[nodiscard]] std::int64_t min_bytes_between(index_t m, index_t u) const {
    return m % R == 0 || m / R + 1 > u / R ? bytes(m) : std::min(bytes(m), (m / R + 1) * P);
  }
};

template <class KQ, class VQ>
Steps steps_of(const Shape& shape, const KQ& kq, const VQ& vq, index_t residual) {
  const CacheLayout L = plan_layout(shape, kq, vq, residual, 0);
  Steps s;
  s.R = L.residual_limit > 0 ? L.residual_limit : L.block_tokens;  // residual_limit 0 implies B = 1
  s.P = checked_mul(shape.kv_heads * (s.R / L.block_tokens), static_cast<std::int64_t>(L.block_bytes()),
                    "bytes per residual step");
  s.T = checked_mul(4 * shape.kv_heads, shape.head_dim, "bytes per fp16 token");
  require(s.P > 0, "bytes per residual step", "> 0", s.P);
  return s;
}

}  // namespace detail

/// Bounds on the token count capacity_for() may return.
struct TokenLimits {
  index_t min = 1;                                      ///< fewer fitting tokens is an Error
  index_t max = std::numeric_limits<index_t>::max();    ///< e.g. the prompt length N
};

namespace detail {

/// The largest C in [limits.min, limits.max] with footprint(C) <= budget, for resolved and
/// validated quantizers (see the top).
template <class KQ, class VQ>
index_t capacity(Budget budget, const Shape& shape, const KQ& kq, const VQ& vq, index_t residual, TokenLimits limits) {
  budget.validate();
  require(limits.min >= 1, "limits.min", ">= 1 token", limits.min);
  require(limits.max >= limits.min, "limits.max", concat(">= limits.min (", limits.min, ")"), limits.max);
  const Steps st = steps_of(shape, kq, vq, residual);
  const std::int64_t b = budget.bytes;
  const index_t R = st.R, U = limits.max;
  // largest step q with qP <= b and qR <= U, then the largest remainder r in that step
  const index_t q = std::min(b / st.P, U / R);
  const index_t r = R == 1 ? 0 : std::min({R - 1, (b - q * st.P) / st.T, U - q * R});
  const index_t C = q * R + r;
  // verify with the allocator's own arithmetic (see the top for why these three checks suffice)
  auto bytes = [&](index_t c) { return layout_bytes(shape, kq, vq, residual, c); };
  const bool fits = bytes(C) <= b && bytes(C) == st.bytes(C);
  const bool next_token = C == U || bytes(C + 1) > b;
  const bool next_step = (q + 1) > U / R || bytes((q + 1) * R) > b;
  if (!(fits && next_token && next_step))
    throw Error(concat("qpkv: capacity_for: internal: the closed form gives ", C, " tokens = ", bytes(C),
                       " bytes for a budget of ", b, " bytes, which plan_layout() does not confirm (its rule changed?)"));
  if (C < limits.min)
    throw Error(concat("qpkv: budget: expected >= ", st.min_bytes_between(limits.min, U), " bytes (room for ",
                       limits.min == 1 ? "one token" : concat("limits.min = ", limits.min, " tokens, the least capacity the selector accepts"),
                       "), got ", b, " bytes (room for ", C, " tokens)"));
  return C;
}

}  // namespace detail

/// Exact bytes of a cache holding `tokens` tokens per head right after compress().
template <class KeyQ, class ValueQ>
  requires detail::QuantizerOrScheme<KeyQ> && detail::QuantizerOrScheme<ValueQ>
std::size_t footprint(const Shape& shape, const KeyQ& key_q, const ValueQ& value_q, index_t tokens, index_t residual = 0) {
  CacheOptions o;
  o.residual = residual;
  const auto r = detail::resolve(shape, key_q, value_q, o, "residual");
  detail::require(tokens >= 0, "tokens", ">= 0", tokens);
  return plan_layout(shape, r.key, r.value, r.residual, tokens).total_bytes();
}

/// footprint() for default-constructed quantizers, e.g. footprint<Kivi<4>>(shape, 4096).
template <class KeyQ, class ValueQ = KeyQ>
  requires detail::QuantizerOrScheme<KeyQ> && detail::QuantizerOrScheme<ValueQ>
std::size_t footprint(const Shape& shape, index_t tokens, CacheOptions options = {}) {
  const auto r = detail::resolve(shape, KeyQ{}, ValueQ{}, options, "options.residual");
  detail::require(tokens >= 0, "tokens", ">= 0", tokens);
  return plan_layout(shape, r.key, r.value, r.residual, tokens).total_bytes();
}

/// The largest token count C in [limits.min, limits.max] whose footprint fits `budget` (else an Error).
template <class KeyQ, class ValueQ>
  requires detail::QuantizerOrScheme<KeyQ> && detail::QuantizerOrScheme<ValueQ>
index_t capacity_for(Budget budget, const Shape& shape, const KeyQ& key_q, const ValueQ& value_q, index_t residual = 0,
                     TokenLimits limits = {}) {
  CacheOptions o;
  o.residual = residual;
  const auto r = detail::resolve(shape, key_q, value_q, o, "residual");
  return detail::capacity(budget, shape, r.key, r.value, r.residual, limits);
}

/// capacity_for() for default-constructed quantizers, e.g. capacity_for<Kivi<4>>(budget, shape).
template <class KeyQ, class ValueQ = KeyQ>
  requires detail::QuantizerOrScheme<KeyQ> && detail::QuantizerOrScheme<ValueQ>
index_t capacity_for(Budget budget, const Shape& shape, CacheOptions options = {}, TokenLimits limits = {}) {
  const auto r = detail::resolve(shape, KeyQ{}, ValueQ{}, options, "options.residual");
  return detail::capacity(budget, shape, r.key, r.value, r.residual, limits);
}

/// The least capacity `selector.validate(capacity, layer)` accepts (SnapKV/H2O/PyramidKV: the
/// window; StreamingLLM: sinks + 1 or the window; KeepAll: 0), found by bisection. Assumes, as for
/// every built-in selector, that the accepted capacities are all those above a threshold; a
/// parameter error no capacity cures (an even pooling kernel) is rethrown. Selectors without
/// validate() need 0.
template <class Sel>
index_t min_capacity(const Sel& selector, LayerInfo layer = {}) {
  if constexpr (requires { selector.validate(index_t{}, layer); }) {
    index_t hi = index_t{1} << 40;
    selector.validate(hi, layer);
    auto ok = [&](index_t c) {
      try {
        selector.validate(c, layer);
        return true;
      } catch (const Error&) {
        return false;
      }
    };
    if (ok(0)) return 0;
    index_t lo = 0;  // invariant: lo is rejected, hi accepted
    while (hi - lo > 1) {
      const index_t mid = lo + (hi - lo) / 2;
      (ok(mid) ? hi : lo) = mid;
    }
    return hi;
  } else {
    (void)selector;
    (void)layer;
    return 0;
  }
}

// ---------------------------------------------------------------------------------------------
// Run-time KIVI schemes

/// A KIVI scheme chosen at run time: the bytes of Kivi<key_bits, value_bits, group, residual>.
struct QuantSpec {
  int key_bits = 4;       ///< 1, 2, 3, 4, 8 or 16 (fp16)
  int value_bits = 4;     ///< 1, 2, 3, 4, 8 or 16 (fp16)
  index_t group = 32;     ///< elements per scale (keys: tokens of a channel; values: channels of a token)
  index_t residual = 0;   ///< recent tokens kept in fp16 (rounded up to a whole number of key groups)

  static constexpr QuantSpec kivi(int bits, index_t group = 32, index_t residual = 0) {
    return QuantSpec{bits, bits, group, residual};
  }
  friend bool operator==(const QuantSpec&, const QuantSpec&) = default;
};

namespace detail {

inline bool supported_bits(int b) { return b == 1 || b == 2 || b == 3 || b == 4 || b == 8 || b == 16; }

template <class F>
decltype(auto) visit_bits(int bits, std::string_view name, F&& f) {
  switch (bits) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 8: return f(std::integral_constant<int, 8>{});
    case 16: return f(std::integral_constant<int, 16>{});
    default: break;
  }
  fail(name, concat("expected one of 1, 2, 3, 4, 8, 16, got ", bits));
}

/// Calls f(key quantizer, value quantizer) with the quantizers Kivi<...> of `q` would hold
/// (validated for `shape`).
template <class F>
decltype(auto) visit_spec(const QuantSpec& q, const Shape& shape, std::string_view role, F&& f) {
  const std::string r(role);
  require(supported_bits(q.key_bits), r + ".key_bits", "one of 1, 2, 3, 4, 8, 16", q.key_bits);
  require(supported_bits(q.value_bits), r + ".value_bits", "one of 1, 2, 3, 4, 8, 16", q.value_bits);
  require(q.group > 0, r + ".group", "> 0", q.group);
  require(q.residual >= 0, r + ".residual", ">= 0", q.residual);
  shape.validate();
  return visit_bits(q.key_bits, r + ".key_bits", [&](auto kb) -> decltype(auto) {
    return visit_bits(q.value_bits, r + ".value_bits", [&](auto vb) -> decltype(auto) {
      QuantizerFor<decltype(kb)::value> k{};
      QuantizerFor<decltype(vb)::value> v{};
      k.axis = Axis::channel;
      v.axis = Axis::token;
      if constexpr (decltype(kb)::value != 16) k.group = q.group;
      if constexpr (decltype(vb)::value != 16) v.group = q.group;
      k.validate(shape.head_dim, r + ".key");
      v.validate(shape.head_dim, r + ".value");
      return f(k, v);
    });
  });
}

}  // namespace detail

/// Exact bytes of `tokens` tokens under the run-time scheme `quant`.
inline std::size_t footprint(const Shape& shape, const QuantSpec& quant, index_t tokens) {
  detail::require(tokens >= 0, "tokens", ">= 0", tokens);
  return detail::visit_spec(quant, shape, "quant", [&](const auto& k, const auto& v) {
    return plan_layout(shape, k, v, quant.residual, tokens).total_bytes();
  });
}

/// The largest token count whose footprint under `quant` fits `budget` (see capacity_for above).
inline index_t capacity_for(Budget budget, const Shape& shape, const QuantSpec& quant, TokenLimits limits = {}) {
  return detail::visit_spec(quant, shape, "quant", [&](const auto& k, const auto& v) {
    return detail::capacity(budget, shape, k, v, quant.residual, limits);
  });
}

/// The paper's nominal rule: the budget buys floor(budget / fp16 bytes per token) fp16 tokens, and
/// b bits buy 16 / b times as many (floor), as if codes were all a quantized cache stored.
inline index_t nominal_tokens(Budget budget, const Shape& shape, int bits) {
  budget.validate();
  detail::require(bits >= 1 && bits <= 16, "bits", "in [1, 16]", bits);
  const index_t fp16_tokens = budget.bytes / fp16_bytes(shape, 1);
  return fp16_tokens * 16 / bits;
}

/// Bits per stored element: bytes x 8 / (2 x kv_heads x tokens x head_dim); 0 for no tokens.
inline double bits_per_element(std::size_t bytes, const Shape& shape, index_t tokens) {
  if (tokens <= 0) return 0.0;
  return static_cast<double>(bytes) * 8.0 /
         (2.0 * static_cast<double>(shape.kv_heads) * static_cast<double>(tokens) * static_cast<double>(shape.head_dim));
}

// ---------------------------------------------------------------------------------------------
// The token / precision table of one layer

/// One bit width of plan_table(). Token counts are limited to the prompt length N (no selector keeps
/// more tokens than the prompt has); bytes are the exact footprint of the count.
struct PlanRow {
  int bits = 16;
  index_t capacity = 0;               ///< capacity_for() under exact accounting, no limit
  index_t tokens = 0;                 ///< capacity_for() with limits.max = N (may be < min(capacity, N))
  std::size_t bytes = 0;              ///< footprint(tokens) <= budget
  double effective_bits = 0;          ///< bits_per_element(bytes, tokens)
  index_t nominal_tokens = 0;         ///< min(nominal_tokens(budget, bits), N)
  std::size_t nominal_bytes = 0;      ///< the true footprint of the nominal count
  double nominal_effective_bits = 0;  ///< bits_per_element(nominal_bytes, nominal_tokens)
  bool nominal_fits = true;           ///< nominal_bytes <= budget
};

/// One row per entry of `bits`: KIVI with `group` and `residual` (QuantSpec::kivi); the 16-bit row
/// is the plain fp16 cache (no residual: every token is already fp16).
inline std::vector<PlanRow> plan_table(const Shape& shape, index_t full_tokens, Budget budget, index_t group = 32,
                                       index_t residual = 0, std::span<const int> bits = {}) {
  static constexpr int default_bits[] = {16, 8, 4, 3, 2, 1};
  if (bits.empty()) bits = default_bits;
  shape.validate();
  detail::require(full_tokens > 0, "full_tokens", "> 0", full_tokens);
  budget.validate();
  std::vector<PlanRow> rows;
  for (const int b : bits) {
    const QuantSpec q = QuantSpec::kivi(b, group, b == 16 ? 0 : residual);
    PlanRow r;
    r.bits = b;
    r.capacity = capacity_for(budget, shape, q);
    r.tokens = capacity_for(budget, shape, q, TokenLimits{1, full_tokens});
    r.bytes = footprint(shape, q, r.tokens);
    r.effective_bits = bits_per_element(r.bytes, shape, r.tokens);
    r.nominal_tokens = std::min(nominal_tokens(budget, shape, b), full_tokens);
    r.nominal_bytes = footprint(shape, q, r.nominal_tokens);
    r.nominal_effective_bits = bits_per_element(r.nominal_bytes, shape, r.nominal_tokens);
    r.nominal_fits = static_cast<std::int64_t>(r.nominal_bytes) <= budget.bytes;
    rows.push_back(r);
  }
  return rows;
}

inline std::vector<PlanRow> plan_table(const Shape& shape, index_t full_tokens, Budget budget, index_t group,
                                       index_t residual, std::initializer_list<int> bits) {
  return plan_table(shape, full_tokens, budget, group, residual, std::span<const int>(bits.begin(), bits.size()));
}

/// The table as fixed-width text, one line per row after a two-line header.
inline std::string format_plan(const std::vector<PlanRow>& rows) {
  std::string out;
  char line[192];
  std::snprintf(line, sizeof line, "%4s | %10s %12s %9s | %10s %12s %9s %5s\n", "bits", "tokens", "bytes", "bits/el",
                "nominal", "bytes", "bits/el", "fits");
  out += line;
  out += std::string(std::char_traits<char>::length(line) - 1, '-') + "\n";
  for (const PlanRow& r : rows) {
    std::snprintf(line, sizeof line, "%4d | %10lld %12llu %9.3f | %10lld %12llu %9.3f %5s\n", r.bits,
                  static_cast<long long>(r.tokens), static_cast<unsigned long long>(r.bytes), r.effective_bits,
                  static_cast<long long>(r.nominal_tokens), static_cast<unsigned long long>(r.nominal_bytes),
                  r.nominal_effective_bits, r.nominal_fits ? "yes" : "NO");
    out += line;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Model-level plans

/// The reference code's LayerQuant: layers [first, last) use `quant` instead of the model's default.
struct LayerQuant {
  index_t first = 0;
  index_t last = 0;
  QuantSpec quant{};
};

/// What a model-level plan needs to know about the model and the prompt.
struct ModelSpec {
  Shape shape{};                        ///< every layer's attention shape
  index_t layers = 1;
  index_t full_tokens = 0;              ///< prompt length N
  QuantSpec quant{};                    ///< every layer's scheme unless overridden
  std::vector<LayerQuant> layer_quant{};  ///< overrides; a later range wins where ranges overlap

  /// Throws unless the shape is valid, layers >= 1, full_tokens > 0 and every range lies in [0, layers).
  void validate() const {
    shape.validate();
    detail::require(layers >= 1, "spec.layers", ">= 1", layers);
    detail::require(full_tokens > 0, "spec.full_tokens", "> 0", full_tokens);
    for (std::size_t i = 0; i < layer_quant.size(); ++i) {
      const LayerQuant& q = layer_quant[i];
      const std::string n = detail::concat("spec.layer_quant[", i, "]");
      detail::require(q.first >= 0 && q.first < q.last && q.last <= layers, n, detail::concat("0 <= first < last <= ", layers),
                      detail::concat("[", q.first, ", ", q.last, ")"));
    }
  }
  [[nodiscard]] QuantSpec quant_of(index_t layer) const {
    QuantSpec q = quant;
    for (const LayerQuant& o : layer_quant)
      if (layer >= o.first && layer < o.last) q = o.quant;
    return q;
  }
};

struct LayerPlan {
  index_t layer = 0;
  QuantSpec quant{};
  index_t capacity = 0;         ///< the capacity given to the selector
  index_t tokens = 0;           ///< selector.kept_tokens(N, capacity, layer)
  std::size_t bytes = 0;        ///< footprint(tokens): CompressedKV::bytes() after compress()
  double effective_bits = 0;    ///< bits_per_element(bytes, tokens)
};

struct ModelPlan {
  std::vector<LayerPlan> layers;
  std::int64_t budget = 0;           ///< layers x per-layer budget (plan_model); 0 for plan_model_at_capacity
  std::int64_t total_bytes = 0;      ///< sum of the layers' bytes
  index_t total_tokens = 0;          ///< sum of the layers' tokens (per KV head)
  std::int64_t full_fp16_bytes = 0;  ///< layers x fp16_bytes(shape, N): the uncompressed cache
};

namespace detail {
inline LayerPlan layer_plan(const ModelSpec& spec, index_t l, index_t capacity, index_t tokens) {
  const QuantSpec q = spec.quant_of(l);
  LayerPlan p{l, q, capacity, tokens, footprint(spec.shape, q, tokens), 0.0};
  p.effective_bits = bits_per_element(p.bytes, spec.shape, tokens);
  return p;
}
inline void add_layer(ModelPlan& m, LayerPlan p) {
  m.total_bytes += static_cast<std::int64_t>(p.bytes);
  m.total_tokens += p.tokens;
  m.layers.push_back(p);
}
}  // namespace detail

/// Equal bytes per layer (LayerQuant): layer l gets capacity_for(per_layer, shape, quant_of(l),
/// {max(1, min_capacity(selector, l)), N}) and keeps selector.kept_tokens(N, capacity, l) tokens. Layers with
/// fewer bits get more tokens; every layer's bytes <= per_layer, so the total <= layers x per_layer
/// (use Budget::split for a model-wide budget). A selector that keeps more than its capacity at
/// some layer (PyramidKV for N > capacity; KeepAll for N > capacity) breaks that: an Error says
/// so; plan such selectors with plan_model_at_capacity().
template <TokenSelector Sel>
ModelPlan plan_model(const ModelSpec& spec, Budget per_layer, const Sel& selector) {
  spec.validate();
  per_layer.validate("per_layer");
  ModelPlan m;
  m.budget = detail::checked_mul(per_layer.bytes, spec.layers, "total budget");
  m.full_fp16_bytes = detail::checked_mul(fp16_bytes(spec.shape, spec.full_tokens), spec.layers, "full_fp16_bytes");
  for (index_t l = 0; l < spec.layers; ++l) {
    const LayerInfo li{l, spec.layers};
    const TokenLimits limits{std::max<index_t>(1, min_capacity(selector, li)), spec.full_tokens};
    const index_t cap = capacity_for(per_layer, spec.shape, spec.quant_of(l), limits);
    const index_t kept = static_cast<index_t>(selector.kept_tokens(spec.full_tokens, cap, li));
    LayerPlan p = detail::layer_plan(spec, l, cap, kept);
    detail::require(static_cast<std::int64_t>(p.bytes) <= per_layer.bytes,
                    detail::concat("selector.kept_tokens(", spec.full_tokens, ", ", cap, ", layer ", l, ")"),
                    detail::concat("a count that fits the per-layer budget of ", per_layer.bytes, " bytes (<= ", cap,
                                   " tokens)"),
                    detail::concat(kept, " tokens = ", p.bytes,
                                   " bytes (the selector keeps more than its capacity here; plan depth-varying "
                                   "selectors with plan_model_at_capacity)"));
    detail::add_layer(m, p);
  }
  return m;
}

/// The same capacity for every layer; layer l keeps selector.kept_tokens(N, capacity, l) tokens
/// (PyramidKV: more in low layers, fewer in high ones) stored with quant_of(l). Reports the bytes
/// per layer and the total; ModelPlan::budget is 0.
template <TokenSelector Sel>
ModelPlan plan_model_at_capacity(const ModelSpec& spec, index_t capacity, const Sel& selector) {
  spec.validate();
  detail::require(capacity >= 0, "capacity", ">= 0", capacity);
  ModelPlan m;
  m.full_fp16_bytes = detail::checked_mul(fp16_bytes(spec.shape, spec.full_tokens), spec.layers, "full_fp16_bytes");
  for (index_t l = 0; l < spec.layers; ++l) {
    const LayerInfo li{l, spec.layers};
    const index_t kept = static_cast<index_t>(selector.kept_tokens(spec.full_tokens, capacity, li));
    detail::add_layer(m, detail::layer_plan(spec, l, capacity, kept));
  }
  return m;
}

/// A model plan as fixed-width text: one line per layer, then the totals.
inline std::string format_model(const ModelPlan& plan) {
  std::string out;
  char line[192];
  std::snprintf(line, sizeof line, "%5s %5s %6s %10s %10s %12s %9s\n", "layer", "kbits", "vbits", "capacity", "tokens",
                "bytes", "bits/el");
  out += line;
  for (const LayerPlan& p : plan.layers) {
    std::snprintf(line, sizeof line, "%5lld %5d %6d %10lld %10lld %12llu %9.3f\n", static_cast<long long>(p.layer),
                  p.quant.key_bits, p.quant.value_bits, static_cast<long long>(p.capacity),
                  static_cast<long long>(p.tokens), static_cast<unsigned long long>(p.bytes), p.effective_bits);
    out += line;
  }
  std::snprintf(line, sizeof line, "total: %lld tokens, %lld bytes", static_cast<long long>(plan.total_tokens),
                static_cast<long long>(plan.total_bytes));
  out += line;
  if (plan.budget > 0) {
    std::snprintf(line, sizeof line, " of a %lld-byte budget", static_cast<long long>(plan.budget));
    out += line;
  }
  if (plan.full_fp16_bytes > 0) {
    std::snprintf(line, sizeof line, " (%.4f of the full fp16 cache, %lld bytes)",
                  static_cast<double>(plan.total_bytes) / static_cast<double>(plan.full_fp16_bytes),
                  static_cast<long long>(plan.full_fp16_bytes));
    out += line;
  }
  out += "\n";
  return out;
}

}  // namespace qpkv
