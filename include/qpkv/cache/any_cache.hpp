// qpkv/cache/any_cache.hpp - KVConfig (a compression setup as run-time data, with a one-line text
// form) and AnyCompressedKV (a CompressedKV whose selector and bit widths are chosen at run time).
//
// AnyCompressedKV is the edge where run-time values become compile-time constants (as FlashInfer's
// DISPATCH_* macros): it holds a std::variant over CompressedKV<AnySelector, QuantizerFor<KB>,
// QuantizerFor<VB>> for every supported (KB, VB) pair and forwards each call with std::visit, so
// quantization and attention run the same fully templated code as a hand-written CompressedKV and
// produce the same bytes. Only token selection (once per prefill, GEMM-bound) is a run-time choice,
// through AnySelector. Group size, residual, zero point and outliers are run-time members of the
// quantizers, so they need no instantiations.
//
// Bit pairs (kAnyBitPairs): every pair costs one CompressedKV instantiation (packing, fused
// attention) in each TU that uses AnyCompressedKV. With all 36 pairs of {1, 2, 3, 4, 8, 16},
// tests/test_any_cache.cpp took 62-67 s to compile (g++ 12, -O3, a loaded 2-core machine; a minimal
// float-only user TU 28 s), so by default 18 pairs are instantiated (test TU 40 s, minimal TU
// 19 s): KB == VB, the mixed pairs of key/value asymmetry studies (k4v2, k2v4, k8v4, k4v8, k8v2,
// k2v8) and fp16 on one side (k16v4, k4v16, k16v2, k2v16, k16v8, k8v16). Define
// QPKV_ANY_ALL_BIT_PAIRS for all 36, the same way in every TU of a program: the choice names the
// inline namespace of everything below, so a mix fails to link instead of breaking the ODR.
// A config naming a pair that is not instantiated is a qpkv::Error listing the ones that are.
//
// Fixed choices (not in KVConfig): keys are quantized per channel over token groups and values per
// token over channel groups (KIVI); scales and mins are stored as fp16; the same group, zero point
// and outlier rule serve keys and values (a 16-bit side ignores them); HQQ's solver uses its
// library defaults (HqqParams).
//
// Text form (KVConfig::parse and KVConfig::to_string; the qpkv CLI reads the same grammar):
//
//   config := method [ "," bits ] { "," key "=" value }      spaces around tokens are ignored
//   method := keep_all | streamingllm | snapkv | h2o | pyramidkv
//   bits   := fp16                 16-bit keys and values (the default when omitted)
//           | kivi<b>              b-bit keys and values, b in {1, 2, 3, 4, 8, 16}   e.g. kivi4
//           | k<kb>v<vb>           kb-bit keys, vb-bit values                         e.g. k4v2
//
//   key                applies when                          value (default)
//   group              key_bits or value_bits < 16           integer in [1, 4096]: elements per scale (32)
//   residual           always                                integer >= 0: recent tokens kept in fp16 (0)
//   zero               key_bits or value_bits < 16           minmax | hqq: zero point rule (minmax)
//   outliers           key_bits or value_bits < 16           number in [0, 1]: outlier slots per block as
//                                                            a fraction of its elements; 0 = off (0)
//   outlier_threshold  key_bits or value_bits < 16           number >= 0 or inf: |x| above it is an
//                                                            outlier; inf = the largest `outliers` (inf)
//   window             snapkv, h2o, pyramidkv; streamingllm  integer >= 1: observation window / trailing
//                      with streaming=reference              tokens kept (32)
//   kernel             snapkv, pyramidkv                     odd integer >= 1: pooling kernel (5)
//   pooling            snapkv, pyramidkv                     avg | max (avg)
//   beta               pyramidkv                             integer >= 1: pyramid steepness (20)
//   mask               h2o                                   causal | reference (causal; reference = the
//                                                            seed's window-block mask)
//   streaming          streamingllm                          sinks | reference (sinks)
//   sinks              streamingllm with streaming=sinks     integer >= 0: attention sinks kept (4)
//   precision          key_bits or value_bits < 16           exact | fast: attend()'s arithmetic
//                                                            (AttendPrecision, backend/cpu/precision.hpp;
//                                                            exact). to_string writes it only when fast,
//                                                            so texts written before it read the same
//
// Examples: "snapkv,kivi4,group=64,residual=32,window=32,kernel=5,pooling=max", "h2o,k4v2",
// "keep_all,fp16", "pyramidkv,kivi2,zero=hqq,beta=20", "streamingllm,k8v4,streaming=reference,window=124".
// parse() rejects an unknown key (listing the valid ones), a key given twice, a key that does not
// apply to the config (listing those that do), and then runs validate(). to_string() writes the
// method, the bits and every key that applies (precision only when fast), in the table's order;
// parse(to_string(c)) == c for every valid c whose non-applying fields hold their defaults.
#pragma once

#include <array>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/quant/affine_quantizer.hpp"
#include "qpkv/quant/fp16.hpp"
#include "qpkv/quant/kivi.hpp"
#include "qpkv/select/any_selector.hpp"

// The instantiated pair set is part of every type and function below (see the header comment).
#if defined(QPKV_ANY_ALL_BIT_PAIRS)
#define QPKV_ANY_PAIRS_NAMESPACE any_all_pairs
#else
#define QPKV_ANY_PAIRS_NAMESPACE any_reduced_pairs
#endif

namespace qpkv {
inline namespace QPKV_ANY_PAIRS_NAMESPACE {

/// A (key bits, value bits) pair.
struct BitPair {
  int key = 16;
  int value = 16;
  friend constexpr bool operator==(BitPair, BitPair) = default;
};

/// The code widths a KVConfig may name (16 = unquantized fp16).
inline constexpr std::array<int, 6> kBitWidths = {1, 2, 3, 4, 8, 16};

/// The (key, value) bit pairs AnyCompressedKV instantiates (see the header comment).
#if defined(QPKV_ANY_ALL_BIT_PAIRS)
inline constexpr std::array<BitPair, 36> kAnyBitPairs = [] {
  std::array<BitPair, 36> pairs{};
  std::size_t i = 0;
  for (int k : kBitWidths)
    for (int v : kBitWidths) pairs[i++] = BitPair{k, v};
  return pairs;
}();
#else
inline constexpr std::array<BitPair, 18> kAnyBitPairs = {{
    {1, 1}, {2, 2}, {3, 3}, {4, 4}, {8, 8}, {16, 16},
    {4, 2}, {2, 4}, {8, 4}, {4, 8}, {8, 2}, {2, 8},
    {16, 4}, {4, 16}, {16, 2}, {2, 16}, {16, 8}, {8, 16},
}};
#endif

/// True if AnyCompressedKV has an instantiation for (key_bits, value_bits).
constexpr bool any_supports(BitPair p) {
  for (const BitPair& q : kAnyBitPairs)
    if (q == p) return true;
  return false;
}

namespace any_detail {
using namespace qpkv::detail;


inline std::string bits_token(int key_bits, int value_bits) {
  if (key_bits == 16 && value_bits == 16) return "fp16";
  if (key_bits == value_bits) return concat("kivi", key_bits);
  return concat("k", key_bits, "v", value_bits);
}

/// "k1v1, k1v2, ..." for error messages.
inline std::string supported_pairs_list() {
  std::string s;
  for (const BitPair& p : kAnyBitPairs) s += (s.empty() ? "" : ", ") + concat("k", p.key, "v", p.value);
  return s;
}

inline bool is_bit_width(int b) {
  for (int w : kBitWidths)
    if (w == b) return true;
  return false;
}

/// Shortest text that reads back as the same value (std::to_chars), "inf" for infinity.
template <class F>
std::string number_text(F x) {
  std::array<char, 64> buf{};
  const auto r = std::to_chars(buf.data(), buf.data() + buf.size(), x);
  return std::string(buf.data(), r.ptr);
}

inline std::string_view trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t')) s.remove_prefix(1);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t')) s.remove_suffix(1);
  return s;
}

/// Parses all of `text` as a T (integer or floating point) or throws naming `field`.
template <class T>
T parse_number(std::string_view text, std::string_view field, std::string_view expected) {
  T x{};
  const char* end = text.data() + text.size();
  const auto r = std::from_chars(text.data(), end, x);
  if (text.empty() || r.ec != std::errc{} || r.ptr != end)
    throw Error(concat("qpkv: KVConfig.", field, ": expected ", expected, ", got '", text, "'"));
  return x;
}

}  // namespace any_detail

/// A compression setup as run-time data: selection method and its parameters, key/value bit widths
/// and the quantizers' parameters. Field names equal the text form's keys (see the header comment).
struct KVConfig {
  Method method = Method::keep_all;
  int key_bits = 16;    ///< 1, 2, 3, 4, 8 or 16 (fp16)
  int value_bits = 16;  ///< 1, 2, 3, 4, 8 or 16 (fp16)
  index_t group = 32;   ///< elements per scale: tokens of a key channel, channels of a value token
  index_t residual = 0;  ///< recent tokens kept in fp16 (the cache rounds up to whole key groups)
  ZeroPoint zero = ZeroPoint::minmax;
  double outliers = 0.0;  ///< outlier slots per block as a fraction of its elements (0 = off)
  float outlier_threshold = std::numeric_limits<float>::infinity();
  index_t window = 32;  ///< SnapKV/H2O/PyramidKV window; StreamingLLM's in Mode::reference
  index_t kernel = 5;
  Pooling pooling = Pooling::avg;
  index_t beta = 20;
  H2OMask mask = H2OMask::causal;
  StreamingLLM::Mode streaming = StreamingLLM::Mode::sinks;
  index_t sinks = 4;
  AttendPrecision precision = AttendPrecision::exact;  ///< attend()'s arithmetic (integer products: fast)

  friend bool operator==(const KVConfig&, const KVConfig&) = default;

  [[nodiscard]] bool quantized() const { return key_bits < 16 || value_bits < 16; }

  /// Throws qpkv::Error("qpkv: KVConfig.<field>: expected ..., got ...") for the first invalid
  /// field, including a bit pair AnyCompressedKV does not instantiate. Capacity-dependent checks
  /// (window <= capacity, ...) are the selector's, at compress() time.
  void validate() const {
    const auto m = static_cast<int>(method);
    detail::require(m >= 0 && m < static_cast<int>(kMethods.size()), "KVConfig.method",
                    "keep_all, streamingllm, snapkv, h2o or pyramidkv", m);
    detail::require(any_detail::is_bit_width(key_bits), "KVConfig.key_bits", "one of 1, 2, 3, 4, 8, 16", key_bits);
    detail::require(any_detail::is_bit_width(value_bits), "KVConfig.value_bits", "one of 1, 2, 3, 4, 8, 16", value_bits);
    detail::require(any_supports({key_bits, value_bits}), "KVConfig.key_bits/value_bits",
                    detail::concat("a pair AnyCompressedKV instantiates (", any_detail::supported_pairs_list(), ")"),
                    any_detail::bits_token(key_bits, value_bits));
    detail::require(group >= 1 && group <= 4096, "KVConfig.group", "in [1, 4096]", group);
    detail::require(residual >= 0, "KVConfig.residual", ">= 0", residual);
    detail::require(zero == ZeroPoint::minmax || zero == ZeroPoint::hqq, "KVConfig.zero", "minmax or hqq",
                    static_cast<int>(zero));
    detail::require(outliers >= 0.0 && outliers <= 1.0, "KVConfig.outliers", "in [0, 1]", outliers);
    detail::require(outlier_threshold >= 0.0f, "KVConfig.outlier_threshold", ">= 0 (or inf)", outlier_threshold);
    detail::require(std::isinf(outlier_threshold) || outliers > 0.0, "KVConfig.outliers",
                    "> 0 when outlier_threshold is set (it sizes the slot budget)", outliers);
    detail::require(window >= 1, "KVConfig.window", ">= 1", window);
    detail::require(kernel >= 1 && kernel % 2 == 1, "KVConfig.kernel", "an odd integer >= 1", kernel);
    detail::require(pooling == Pooling::avg || pooling == Pooling::max, "KVConfig.pooling", "avg or max",
                    static_cast<int>(pooling));
    detail::require(beta >= 1, "KVConfig.beta", ">= 1", beta);
    detail::require(mask == H2OMask::causal || mask == H2OMask::window_block, "KVConfig.mask",
                    "causal or reference", static_cast<int>(mask));
    detail::require(streaming == StreamingLLM::Mode::sinks || streaming == StreamingLLM::Mode::reference,
                    "KVConfig.streaming", "sinks or reference", static_cast<int>(streaming));
    detail::require(sinks >= 0, "KVConfig.sinks", ">= 0", sinks);
    detail::require(precision == AttendPrecision::exact || precision == AttendPrecision::fast, "KVConfig.precision",
                    "exact or fast", static_cast<int>(precision));
  }

  /// The selector this config names, with its parameters.
  [[nodiscard]] AnySelector selector() const {
    switch (method) {
      case Method::keep_all: return KeepAll{};
      case Method::streamingllm: {
        StreamingLLM s;
        s.sinks = sinks;
        s.window = window;
        s.mode = streaming;
        return s;
      }
      case Method::snapkv: {
        SnapKV s;
        s.window = window;
        s.kernel = kernel;
        s.pooling = pooling;
        return s;
      }
      case Method::h2o: {
        H2O s;
        s.window = window;
        s.mask = mask;
        return s;
      }
      case Method::pyramidkv: {
        PyramidKV s;
        s.window = window;
        s.kernel = kernel;
        s.pooling = pooling;
        s.beta = beta;
        return s;
      }
    }
    detail::fail("KVConfig.method", detail::concat("expected keep_all, streamingllm, snapkv, h2o or pyramidkv, got ",
                                                   static_cast<int>(method)));
  }

  /// The quantizer for `Bits` bits along `axis` (keys: Axis::channel, values: Axis::token).
  template <int Bits>
  [[nodiscard]] QuantizerFor<Bits> quantizer(Axis axis) const {
    QuantizerFor<Bits> q{};
    q.axis = axis;
    if constexpr (Bits != 16) {
      q.group = group;
      q.zero_point = zero;
      q.outliers = OutlierRule{outlier_threshold, outliers};
    }
    return q;
  }

  /// The canonical text form (see the header comment).
  [[nodiscard]] std::string to_string() const;
  /// Reads the text form; throws qpkv::Error naming the offending token or field.
  [[nodiscard]] static KVConfig parse(std::string_view text);
  /// The keys that apply to this config, in canonical order.
  [[nodiscard]] std::vector<std::string_view> keys() const;
};

namespace any_detail {
using namespace qpkv::detail;


/// One `key=value` of the text form: when it applies, how it is written and read, and (optional)
/// when to_string writes it although it applies (null: always).
struct ConfigKey {
  std::string_view name;
  bool (*applies)(const KVConfig&);
  std::string (*write)(const KVConfig&);
  void (*read)(KVConfig&, std::string_view);
  bool (*written)(const KVConfig&) = nullptr;
};

template <class E, std::size_t N>
E parse_enum(std::string_view text, std::string_view field, const std::array<std::pair<std::string_view, E>, N>& names) {
  std::string expected;
  for (const auto& [name, value] : names) {
    if (text == name) return value;
    expected += (expected.empty() ? "" : " or ") + std::string(name);
  }
  throw Error(concat("qpkv: KVConfig.", field, ": expected ", expected, ", got '", text, "'"));
}

inline constexpr std::array<std::pair<std::string_view, ZeroPoint>, 2> kZeroNames = {
    {{"minmax", ZeroPoint::minmax}, {"hqq", ZeroPoint::hqq}}};
inline constexpr std::array<std::pair<std::string_view, Pooling>, 2> kPoolingNames = {
    {{"avg", Pooling::avg}, {"max", Pooling::max}}};
inline constexpr std::array<std::pair<std::string_view, H2OMask>, 2> kMaskNames = {
    {{"causal", H2OMask::causal}, {"reference", H2OMask::window_block}}};
inline constexpr std::array<std::pair<std::string_view, StreamingLLM::Mode>, 2> kStreamingNames = {
    {{"sinks", StreamingLLM::Mode::sinks}, {"reference", StreamingLLM::Mode::reference}}};
inline constexpr std::array<std::pair<std::string_view, AttendPrecision>, 2> kPrecisionNames = {
    {{"exact", AttendPrecision::exact}, {"fast", AttendPrecision::fast}}};

template <class E, std::size_t N>
std::string enum_text(E e, const std::array<std::pair<std::string_view, E>, N>& names) {
  for (const auto& [name, value] : names)
    if (value == e) return std::string(name);
  return concat(static_cast<int>(e));
}

inline bool uses_scores(const KVConfig& c) {
  return c.method == Method::snapkv || c.method == Method::h2o || c.method == Method::pyramidkv;
}
inline bool uses_pooling(const KVConfig& c) { return c.method == Method::snapkv || c.method == Method::pyramidkv; }

inline index_t read_index(std::string_view v, std::string_view field) {
  return parse_number<index_t>(v, field, "an integer");
}

inline const std::array<ConfigKey, 13>& config_keys() {
  static const std::array<ConfigKey, 13> keys = {{
      {"group", [](const KVConfig& c) { return c.quantized(); },
       [](const KVConfig& c) { return concat(c.group); },
       [](KVConfig& c, std::string_view v) { c.group = read_index(v, "group"); }},
      {"residual", [](const KVConfig&) { return true; },
       [](const KVConfig& c) { return concat(c.residual); },
       [](KVConfig& c, std::string_view v) { c.residual = read_index(v, "residual"); }},
      {"zero", [](const KVConfig& c) { return c.quantized(); },
       [](const KVConfig& c) { return enum_text(c.zero, kZeroNames); },
       [](KVConfig& c, std::string_view v) { c.zero = parse_enum(v, "zero", kZeroNames); }},
      {"outliers", [](const KVConfig& c) { return c.quantized(); },
       [](const KVConfig& c) { return number_text(c.outliers); },
       [](KVConfig& c, std::string_view v) { c.outliers = parse_number<double>(v, "outliers", "a number in [0, 1]"); }},
      {"outlier_threshold", [](const KVConfig& c) { return c.quantized(); },
       [](const KVConfig& c) { return number_text(c.outlier_threshold); },
       [](KVConfig& c, std::string_view v) {
         c.outlier_threshold = parse_number<float>(v, "outlier_threshold", "a number >= 0 or inf");
       }},
      {"window",
       [](const KVConfig& c) {
         return uses_scores(c) || (c.method == Method::streamingllm && c.streaming == StreamingLLM::Mode::reference);
       },
       [](const KVConfig& c) { return concat(c.window); },
       [](KVConfig& c, std::string_view v) { c.window = read_index(v, "window"); }},
      {"kernel", uses_pooling, [](const KVConfig& c) { return concat(c.kernel); },
       [](KVConfig& c, std::string_view v) { c.kernel = read_index(v, "kernel"); }},
      {"pooling", uses_pooling, [](const KVConfig& c) { return enum_text(c.pooling, kPoolingNames); },
       [](KVConfig& c, std::string_view v) { c.pooling = parse_enum(v, "pooling", kPoolingNames); }},
      {"beta", [](const KVConfig& c) { return c.method == Method::pyramidkv; },
       [](const KVConfig& c) { return concat(c.beta); },
       [](KVConfig& c, std::string_view v) { c.beta = read_index(v, "beta"); }},
      {"mask", [](const KVConfig& c) { return c.method == Method::h2o; },
       [](const KVConfig& c) { return enum_text(c.mask, kMaskNames); },
       [](KVConfig& c, std::string_view v) { c.mask = parse_enum(v, "mask", kMaskNames); }},
      {"streaming", [](const KVConfig& c) { return c.method == Method::streamingllm; },
       [](const KVConfig& c) { return enum_text(c.streaming, kStreamingNames); },
       [](KVConfig& c, std::string_view v) { c.streaming = parse_enum(v, "streaming", kStreamingNames); }},
      {"sinks",
       [](const KVConfig& c) { return c.method == Method::streamingllm && c.streaming == StreamingLLM::Mode::sinks; },
       [](const KVConfig& c) { return concat(c.sinks); },
       [](KVConfig& c, std::string_view v) { c.sinks = read_index(v, "sinks"); }},
      {"precision", [](const KVConfig& c) { return c.quantized(); },
       [](const KVConfig& c) { return enum_text(c.precision, kPrecisionNames); },
       [](KVConfig& c, std::string_view v) { c.precision = parse_enum(v, "precision", kPrecisionNames); },
       [](const KVConfig& c) { return c.precision != AttendPrecision::exact; }},
  }};
  return keys;
}

inline std::string join(std::span<const std::string_view> names) {
  std::string s;
  for (std::string_view n : names) s += (s.empty() ? "" : ", ") + std::string(n);
  return s;
}

/// Reads a bits token (fp16, kivi<b>, k<kb>v<vb>) into c; false if `t` is not one.
inline bool read_bits(std::string_view t, KVConfig& c) {
  auto width = [](std::string_view s, int& out) {
    const auto r = std::from_chars(s.data(), s.data() + s.size(), out);
    return !s.empty() && r.ec == std::errc{} && r.ptr == s.data() + s.size() && is_bit_width(out);
  };
  if (t == "fp16") {
    c.key_bits = c.value_bits = 16;
    return true;
  }
  if (t.starts_with("kivi")) {
    int b = 0;
    if (!width(t.substr(4), b)) return false;
    c.key_bits = c.value_bits = b;
    return true;
  }
  const std::size_t v = t.find('v');
  if (t.starts_with("k") && v != std::string_view::npos) {
    int kb = 0, vb = 0;
    if (!width(t.substr(1, v - 1), kb) || !width(t.substr(v + 1), vb)) return false;
    c.key_bits = kb;
    c.value_bits = vb;
    return true;
  }
  return false;
}

}  // namespace any_detail

inline std::vector<std::string_view> KVConfig::keys() const {
  std::vector<std::string_view> names;
  for (const any_detail::ConfigKey& k : any_detail::config_keys())
    if (k.applies(*this)) names.push_back(k.name);
  return names;
}

inline std::string KVConfig::to_string() const {
  std::string s = std::string(method_name(method)) + "," + any_detail::bits_token(key_bits, value_bits);
  for (const any_detail::ConfigKey& k : any_detail::config_keys())
    if (k.applies(*this) && (k.written == nullptr || k.written(*this))) s += detail::concat(",", k.name, "=", k.write(*this));
  return s;
}

inline KVConfig KVConfig::parse(std::string_view text) {
  KVConfig c;
  std::vector<std::string_view> tokens;
  for (std::size_t start = 0;;) {
    const std::size_t comma = text.find(',', start);
    tokens.push_back(any_detail::trim(text.substr(start, comma == std::string_view::npos ? comma : comma - start)));
    if (comma == std::string_view::npos) break;
    start = comma + 1;
  }
  std::string methods;
  bool found = false;
  for (Method m : kMethods) {
    methods += (methods.empty() ? "" : ", ") + std::string(method_name(m));
    if (tokens[0] == method_name(m)) {
      c.method = m;
      found = true;
    }
  }
  if (!found)
    throw Error(detail::concat("qpkv: KVConfig.method: expected one of ", methods, " as the first token of \"",
                               text, "\", got '", tokens[0], "'"));
  const auto& keys = any_detail::config_keys();
  std::vector<std::string_view> all;
  for (const any_detail::ConfigKey& k : keys) all.push_back(k.name);
  std::vector<bool> given(keys.size(), false);
  for (std::size_t i = 1; i < tokens.size(); ++i) {
    const std::string_view t = tokens[i];
    const std::size_t eq = t.find('=');
    if (eq == std::string_view::npos) {
      if (i == 1 && any_detail::read_bits(t, c)) continue;
      throw Error(detail::concat("qpkv: KVConfig token ", i + 1, " of \"", text, "\": expected ",
                                 i == 1 ? "bits (fp16, kivi<b> or k<kb>v<vb> with b in 1, 2, 3, 4, 8, 16) or " : "",
                                 "key=value, got '", t, "'"));
    }
    const std::string_view name = any_detail::trim(t.substr(0, eq)), value = any_detail::trim(t.substr(eq + 1));
    std::size_t k = 0;
    while (k < keys.size() && keys[k].name != name) ++k;
    if (k == keys.size())
      throw Error(detail::concat("qpkv: KVConfig key: expected one of ", any_detail::join(all), ", got '", name,
                                 "' in \"", text, "\""));
    if (given[k])
      throw Error(detail::concat("qpkv: KVConfig.", name, ": expected at most once, got it twice in \"", text, "\""));
    given[k] = true;
    keys[k].read(c, value);
  }
  // Applicability depends on the whole config (bits, streaming mode), so it is checked last.
  for (std::size_t k = 0; k < keys.size(); ++k)
    if (given[k] && !keys[k].applies(c)) {
      const std::vector<std::string_view> ok = c.keys();
      throw Error(detail::concat("qpkv: KVConfig.", keys[k].name, ": expected a key that applies to ",
                                 method_name(c.method), ",", any_detail::bits_token(c.key_bits, c.value_bits),
                                 c.method == Method::streamingllm
                                     ? detail::concat(",streaming=", any_detail::enum_text(c.streaming, any_detail::kStreamingNames))
                                     : std::string(),
                                 " (", any_detail::join(ok), "), got ", keys[k].name));
    }
  c.validate();
  return c;
}

namespace any_detail {
using namespace qpkv::detail;

template <int KB, int VB>
using AnyCacheAlternative = CompressedKV<AnySelector, QuantizerFor<KB>, QuantizerFor<VB>>;

template <std::size_t... I>
auto any_cache_variant(std::index_sequence<I...>)
    -> std::variant<AnyCacheAlternative<kAnyBitPairs[I].key, kAnyBitPairs[I].value>...>;
}  // namespace any_detail

/// A CompressedKV chosen at run time from a KVConfig; the same API, the same bytes and results as
/// the equivalent CompressedKV<Selector, QuantizerFor<KB>, QuantizerFor<VB>> (see the header comment).
class AnyCompressedKV {
 public:
  /// Alternative i is cache_type<kAnyBitPairs[i].key, kAnyBitPairs[i].value>.
  using variant_type = decltype(any_detail::any_cache_variant(std::make_index_sequence<kAnyBitPairs.size()>{}));
  template <int KB, int VB>
  using cache_type = any_detail::AnyCacheAlternative<KB, VB>;

  /// Validates `config` (qpkv::Error naming the field) and builds the cache for its bit pair.
  /// softmax_scale: 0 means 1/sqrt(head_dim).
  AnyCompressedKV(Shape shape, KVConfig config, float softmax_scale = 0.0f)
      : config_((config.validate(), std::move(config))),
        cache_(make(shape, config_, softmax_scale, std::make_index_sequence<kAnyBitPairs.size()>{})) {}

  /// Prefill: the configured selector keeps `capacity` tokens per KV head (CompressedKV::compress).
  template <Element T>
  void compress(const TensorView<T>& keys, const TensorView<T>& values, const TensorView<T>& queries,
                index_t capacity, LayerInfo layer = {}) {
    std::visit([&](auto& c) { c.compress(keys, values, queries, capacity, layer); }, cache_);
  }
  /// Prefill with a selection made elsewhere.
  template <Element T>
  void compress(const TensorView<T>& keys, const TensorView<T>& values, Selection selection) {
    std::visit([&](auto& c) { c.compress(keys, values, std::move(selection)); }, cache_);
  }
  /// Decode: appends one token; k and v are (kv_heads, D) row-major.
  template <Element T>
  void append(const T* k, const T* v) {
    std::visit([&](auto& c) { c.append(k, v); }, cache_);
  }
  /// out = softmax(scale * q K^T) V for every query head; q and out are (q_heads, D) row-major.
  template <Element T>
  void attend(const T* q, float* out) const {
    std::visit([&](const auto& c) { c.attend(q, out); }, cache_);
  }
  [[nodiscard]] DenseKV dequantize() const {
    return std::visit([](const auto& c) { return c.dequantize(); }, cache_);
  }
  [[nodiscard]] std::span<const index_t> positions(index_t head) const {
    return std::visit([&](const auto& c) { return c.positions(head); }, cache_);
  }
  [[nodiscard]] index_t tokens() const {
    return std::visit([](const auto& c) { return c.tokens(); }, cache_);
  }
  [[nodiscard]] std::size_t bytes() const {
    return std::visit([](const auto& c) { return c.bytes(); }, cache_);
  }
  [[nodiscard]] std::size_t metadata_bytes() const {
    return std::visit([](const auto& c) { return c.metadata_bytes(); }, cache_);
  }
  [[nodiscard]] const Shape& shape() const {
    return std::visit([](const auto& c) -> const Shape& { return c.shape(); }, cache_);
  }
  [[nodiscard]] const CacheLayout& layout() const {
    return std::visit([](const auto& c) -> const CacheLayout& { return c.layout(); }, cache_);
  }
  [[nodiscard]] CacheState state() const {
    return std::visit([](const auto& c) { return c.state(); }, cache_);
  }
  [[nodiscard]] const AnySelector& selector() const {
    return std::visit([](const auto& c) -> const AnySelector& { return c.selector(); }, cache_);
  }
  [[nodiscard]] index_t residual_length() const {
    return std::visit([](const auto& c) { return c.residual_length(); }, cache_);
  }
  [[nodiscard]] float softmax_scale() const {
    return std::visit([](const auto& c) { return c.softmax_scale(); }, cache_);
  }
  void reserve(index_t tokens) {
    std::visit([&](auto& c) { c.reserve(tokens); }, cache_);
  }
  [[nodiscard]] const KVConfig& config() const { return config_; }

  /// The concrete cache, for code that wants the compile-time type (f is called with it).
  template <class F>
  decltype(auto) visit(F&& f) const {
    return std::visit(std::forward<F>(f), cache_);
  }
  template <class F>
  decltype(auto) visit(F&& f) {
    return std::visit(std::forward<F>(f), cache_);
  }
  /// The concrete cache if this holds cache_type<KB, VB>, else nullptr.
  template <int KB, int VB>
  [[nodiscard]] const cache_type<KB, VB>* get_if() const {
    static_assert(any_supports({KB, VB}), "qpkv::AnyCompressedKV::get_if: (KB, VB) is not in kAnyBitPairs");
    return std::get_if<cache_type<KB, VB>>(&cache_);
  }

 private:
  template <std::size_t I>
  static variant_type make_one(const Shape& shape, const KVConfig& c, float scale) {
    constexpr BitPair p = kAnyBitPairs[I];
    return variant_type(std::in_place_index<I>, shape, c.selector(), c.quantizer<p.key>(Axis::channel),
                        c.quantizer<p.value>(Axis::token), CacheOptions{c.residual, scale, c.precision});
  }
  template <std::size_t... I>
  static variant_type make(const Shape& shape, const KVConfig& c, float scale, std::index_sequence<I...>) {
    using Maker = variant_type (*)(const Shape&, const KVConfig&, float);
    static constexpr std::array<Maker, sizeof...(I)> makers = {&make_one<I>...};
    for (std::size_t i = 0; i < kAnyBitPairs.size(); ++i)
      if (kAnyBitPairs[i] == BitPair{c.key_bits, c.value_bits}) return makers[i](shape, c, scale);
    detail::fail("KVConfig.key_bits/value_bits", "no instantiation (validate() should have caught this)");
  }

  KVConfig config_;
  variant_type cache_;
};

}  // inline namespace QPKV_ANY_PAIRS_NAMESPACE
}  // namespace qpkv

#undef QPKV_ANY_PAIRS_NAMESPACE
