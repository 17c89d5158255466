// qpkv/cache/serialize.hpp - a persistent file format for CompressedKV and AnyCompressedKV (prefix
// caching across requests and processes).
//
//   save(os, cache) / save(path, cache)           CompressedKV<...> or AnyCompressedKV
//   load(is, cache) / load(path, cache)           into a CompressedKV constructed with the same types
//                                                 and parameters (the file supplies shape and content)
//   load_any(is) / load_any(path)                 -> AnyCompressedKV, configured from the file
//   inspect(is) / inspect(path)                   -> CacheFileInfo (header, config, shape, sections),
//   to_string(CacheFileInfo)                         every checksum verified, no cache type needed
//
// docs/format.md ("Cache files") has the byte layout and a hex dump. In short: a 32-byte header
// (magic, version, endianness marker, section count, header checksum), then four sections CONF
// (policy types and parameters; for AnyCompressedKV its KVConfig text), SHAP (shape, layout and
// fill), POSN (token positions) and DATA (the packed cache, compacted: no spare capacity), each
// preceded by its tag, size and XXH3-64 checksum (xxHash, Debian's libxxhash-dev, used header-only).
//
// Hostile input: every failure is a qpkv::Error ("qpkv: cache file: ..."), never UB. Sizes are
// checked for overflow, against what the cache's own policies imply, and against the bytes the
// stream still holds *before* anything is allocated (a non-seekable stream is read in bounded
// chunks, so memory only grows with bytes that actually arrived). Checksums catch accidental
// corruption; a file crafted to pass them is still validated: positions ascending and in range,
// scales, mins, outlier values and fp16 residual finite, outlier indices inside their part. A load
// either succeeds or leaves the destination cache untouched.
//
// Round trip: save(load(save(c))) is byte-identical to save(c); the loaded cache dequantizes and
// attends bit-identically to c. Its allocation is the compact one compress() would make for the
// same content (equal to c's bytes right after compress()); spare capacity from append growth or
// reserve() is not stored.
//
// Policy types are named by PolicyTraits<T> (name and canonical parameter text), specialised below
// for the built-in selectors and quantizers; specialise it for your own policy to save its caches.
// This header is not part of qpkv.hpp because it needs <xxhash.h>.
#pragma once

#include <array>
#include <bit>
#include <charconv>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <istream>
#include <limits>
#include <ostream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "qpkv/cache/any_cache.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/quant/affine_quantizer.hpp"
#include "qpkv/quant/fp16.hpp"
#include "qpkv/select/any_selector.hpp"

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#define QPKV_DEFINED_XXH_INLINE_ALL
#endif
#include <xxhash.h>
#ifdef QPKV_DEFINED_XXH_INLINE_ALL
#undef XXH_INLINE_ALL
#undef QPKV_DEFINED_XXH_INLINE_ALL
#endif

namespace qpkv {

// ---------------------------------------------------------------------------------------------
// Policy names and parameters
// ---------------------------------------------------------------------------------------------

/// Names a policy type in cache files: `name(p)` is a short type name ("snapkv", "affine<4,float16>")
/// and `params(p)` the canonical text of every parameter that affects stored bytes or results.
/// A file loads only into a cache whose policies give the same names and parameters.
template <class T>
struct PolicyTraits {
  static constexpr bool defined = false;
};

namespace serial_detail {
template <class F>
std::string num(F x) {
  std::array<char, 64> buf{};
  const auto r = std::to_chars(buf.data(), buf.data() + buf.size(), x);
  return std::string(buf.data(), r.ptr);
}
inline const char* pooling_text(Pooling p) { return p == Pooling::max ? "max" : "avg"; }
}  // namespace serial_detail

template <>
struct PolicyTraits<KeepAll> {
  static constexpr bool defined = true;
  static std::string name(const KeepAll&) { return "keep_all"; }
  static std::string params(const KeepAll&) { return ""; }
};
template <>
struct PolicyTraits<StreamingLLM> {
  static constexpr bool defined = true;
  static std::string name(const StreamingLLM&) { return "streamingllm"; }
  static std::string params(const StreamingLLM& s) {
    return detail::concat("sinks=", s.sinks, ",window=", s.window, ",mode=",
                          s.mode == StreamingLLM::Mode::sinks ? "sinks" : "reference");
  }
};
template <>
struct PolicyTraits<SnapKV> {
  static constexpr bool defined = true;
  static std::string name(const SnapKV&) { return "snapkv"; }
  static std::string params(const SnapKV& s) {
    return detail::concat("window=", s.window, ",kernel=", s.kernel, ",pooling=", serial_detail::pooling_text(s.pooling));
  }
};
template <>
struct PolicyTraits<H2O> {
  static constexpr bool defined = true;
  static std::string name(const H2O&) { return "h2o"; }
  static std::string params(const H2O& s) {
    return detail::concat("window=", s.window, ",mask=", s.mask == H2OMask::causal ? "causal" : "reference");
  }
};
template <>
struct PolicyTraits<PyramidKV> {
  static constexpr bool defined = true;
  static std::string name(const PyramidKV&) { return "pyramidkv"; }
  static std::string params(const PyramidKV& s) {
    return detail::concat("window=", s.window, ",kernel=", s.kernel, ",pooling=", serial_detail::pooling_text(s.pooling),
                          ",beta=", s.beta);
  }
};
/// AnySelector: "any", parameters "<method>:<that selector's parameters>".
template <>
struct PolicyTraits<AnySelector> {
  static constexpr bool defined = true;
  static std::string name(const AnySelector&) { return "any_selector"; }
  static std::string params(const AnySelector& s) {
    return std::visit([](const auto& x) {
      using X = std::remove_cvref_t<decltype(x)>;
      return PolicyTraits<X>::name(x) + ":" + PolicyTraits<X>::params(x);
    }, s.variant());
  }
};
template <int Bits, ScaleStorage S>
struct PolicyTraits<Affine<Bits, S>> {
  static constexpr bool defined = true;
  static std::string name(const Affine<Bits, S>&) { return detail::concat("affine<", Bits, ",", dtype_name<S>(), ">"); }
  static std::string params(const Affine<Bits, S>& q) {
    using serial_detail::num;
    return detail::concat("axis=", axis_name(q.axis), ",group=", q.group, ",zero=",
                          q.zero_point == ZeroPoint::hqq ? "hqq" : "minmax", ",hqq=", num(q.hqq.lp_norm), "/",
                          num(q.hqq.beta), "/", q.hqq.iters, ",outliers=", num(q.outliers.fraction), "/",
                          num(q.outliers.threshold));
  }
};
template <>
struct PolicyTraits<Fp16> {
  static constexpr bool defined = true;
  static std::string name(const Fp16&) { return "fp16"; }
  static std::string params(const Fp16& q) { return detail::concat("axis=", axis_name(q.axis)); }
};

// ---------------------------------------------------------------------------------------------
// File metadata
// ---------------------------------------------------------------------------------------------

/// The format version this header writes and the newest it reads.
inline constexpr std::uint32_t kCacheFileVersion = 1;
/// "\x89QPKV\r\n\x1a": a non-ASCII first byte and CR LF catch text-mode transfers (as PNG's).
inline constexpr std::array<unsigned char, 8> kCacheFileMagic = {0x89, 'Q', 'P', 'K', 'V', '\r', '\n', 0x1a};
/// Written in the writer's byte order; a reader of the other order sees 0x04030201.
inline constexpr std::uint32_t kCacheFileEndianMarker = 0x01020304u;

/// What kind of object wrote a file.
enum class CacheFileKind : std::uint32_t {
  compressed_kv = 1,  ///< a compile-time CompressedKV<...>
  any = 2,            ///< an AnyCompressedKV (the CONF section holds its KVConfig text)
};

/// One section as stored: tag, payload offset in the file, size and XXH3-64 checksum (verified).
struct CacheFileSection {
  std::string tag;
  std::uint64_t offset = 0;
  std::uint64_t size = 0;
  std::uint64_t checksum = 0;
};

/// Everything a file says about itself (inspect()).
struct CacheFileInfo {
  std::uint32_t version = 0;
  CacheFileKind kind = CacheFileKind::compressed_kv;
  std::string type;      ///< "CompressedKV<snapkv,affine<4,float16>,affine<4,float16>>"
  std::string params;    ///< "selector{...} key{...} value{...} residual=N"
  std::string kvconfig;  ///< KVConfig::to_string() for kind any, else empty
  Shape shape;
  float softmax_scale = 0.0f;  ///< as configured (0: 1/sqrt(head_dim))
  CacheLayout layout;          ///< the compact layout of the stored content
  index_t blocks = 0;          ///< filled blocks per head
  index_t residual = 0;        ///< filled fp16 residual slots per head
  index_t next_position = 0;   ///< the position the next appended token gets
  std::vector<CacheFileSection> sections;
  std::uint64_t file_bytes = 0;

  [[nodiscard]] index_t tokens() const { return blocks * layout.block_tokens + residual; }
};

namespace serial_detail {

inline constexpr std::size_t kHeaderBytes = 32;
inline constexpr std::size_t kSectionHeaderBytes = 24;
inline constexpr std::size_t kShapeBytes = 96;
inline constexpr std::uint64_t kMaxConfigBytes = 1u << 20;
inline constexpr std::array<std::string_view, 4> kTags = {"CONF", "SHAP", "POSN", "DATA"};
// Sanity bounds on what a file may declare (far above any real model, far below overflow).
inline constexpr index_t kMaxHeads = index_t{1} << 20;
inline constexpr index_t kMaxDim = index_t{1} << 20;
inline constexpr index_t kMaxTokens = index_t{1} << 40;
inline constexpr std::size_t kChunk = std::size_t{1} << 20;

[[noreturn]] inline void bad(std::string_view what) { throw Error(detail::concat("qpkv: cache file: ", what)); }

inline std::uint64_t checksum(const void* p, std::size_t n) { return XXH3_64bits(p, n); }

#if defined(FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION)
inline constexpr bool kVerifyChecksums = false;  // fuzz builds: explore the checks behind the checksums
#else
inline constexpr bool kVerifyChecksums = true;
#endif

/// a * b, or an Error naming `what` if it overflows (sizes are non-negative).
inline std::uint64_t mul(std::uint64_t a, std::uint64_t b, std::string_view what) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) bad(detail::concat(what, ": size overflows 64 bits"));
  return a * b;
}
inline std::uint64_t add(std::uint64_t a, std::uint64_t b, std::string_view what) {
  if (b > std::numeric_limits<std::uint64_t>::max() - a) bad(detail::concat(what, ": size overflows 64 bits"));
  return a + b;
}

// ---- little-endian encoding into a byte vector (host order = little endian, checked at save) ----
struct Bytes {
  std::vector<unsigned char> b;
  template <class T>
  void put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* p = reinterpret_cast<const unsigned char*>(&v);
    b.insert(b.end(), p, p + sizeof v);
  }
  void put_string(std::string_view s) {
    put(static_cast<std::uint32_t>(s.size()));
    b.insert(b.end(), s.begin(), s.end());
  }
};

/// Reads fixed fields from a section payload already in memory; running off its end is an Error.
struct Cursor {
  const unsigned char* p;
  std::size_t n;
  std::string_view section;
  std::size_t at = 0;
  template <class T>
  T get(std::string_view field) {
    if (n - at < sizeof(T)) bad(detail::concat(section, " section: ", field, ": expected ", sizeof(T), " more bytes, got ", n - at));
    T v;
    std::memcpy(&v, p + at, sizeof v);
    at += sizeof v;
    return v;
  }
  std::string get_string(std::string_view field) {
    const std::uint32_t len = get<std::uint32_t>(field);
    if (len > n - at) bad(detail::concat(section, " section: ", field, ": length ", len, " runs past the section end (", n - at, " bytes left)"));
    std::string s(reinterpret_cast<const char*>(p + at), len);
    at += len;
    return s;
  }
  void finish() const {
    if (at != n) bad(detail::concat(section, " section: expected ", at, " bytes, got ", n));
  }
};

/// Writes through the stream buffer (no ios exceptions, no sentry); a short write is an Error.
class Writer {
 public:
  explicit Writer(std::ostream& os) : buf_(os.rdbuf()) {
    if (!buf_) bad("write: the stream has no buffer");
  }
  void write(const void* p, std::size_t n) {
    const auto* c = static_cast<const char*>(p);
    while (n > 0) {
      const auto chunk = static_cast<std::streamsize>(std::min(n, kChunk));
      if (buf_->sputn(c, chunk) != chunk) bad("write: short write (disk full or stream closed?)");
      c += chunk;
      n -= static_cast<std::size_t>(chunk);
    }
  }
  void section(std::string_view tag, std::uint64_t size, std::uint64_t sum) {
    Bytes h;
    h.b.insert(h.b.end(), tag.begin(), tag.end());
    h.put(std::uint32_t{0});
    h.put(size);
    h.put(sum);
    write(h.b.data(), h.b.size());
  }
  void flush() {
    if (buf_->pubsync() != 0) bad("write: flush failed");
  }

 private:
  std::streambuf* buf_;
};

/// Reads through the stream buffer. remaining() is the bytes left when the stream can seek, else
/// unknown (max), in which case large reads proceed in chunks that grow only with data received.
class Reader {
 public:
  explicit Reader(std::istream& is) : buf_(is.rdbuf()) {
    if (!buf_) bad("read: the stream has no buffer");
    const auto cur = buf_->pubseekoff(0, std::ios_base::cur, std::ios_base::in);
    if (cur != std::streampos(std::streamoff(-1))) {
      const auto end = buf_->pubseekoff(0, std::ios_base::end, std::ios_base::in);
      if (end != std::streampos(std::streamoff(-1)) &&
          buf_->pubseekpos(cur, std::ios_base::in) == cur && end >= cur) {
        remaining_ = static_cast<std::uint64_t>(std::streamoff(end - cur));
        seekable_ = true;
      }
    }
  }
  [[nodiscard]] std::uint64_t offset() const { return offset_; }
  [[nodiscard]] bool seekable() const { return seekable_; }
  [[nodiscard]] std::uint64_t remaining() const { return remaining_; }

  /// Fails unless `n` more bytes can exist (cheap check before any allocation).
  void expect(std::uint64_t n, std::string_view what) const {
    if (seekable_ && n > remaining_)
      bad(detail::concat("truncated: ", what, " needs ", n, " bytes at offset ", offset_, ", the file has ", remaining_, " left"));
  }
  void read(void* p, std::size_t n, std::string_view what) {
    expect(n, what);
    auto* c = static_cast<char*>(p);
    std::size_t got = 0;
    while (got < n) {
      const auto chunk = static_cast<std::streamsize>(std::min(n - got, kChunk));
      const std::streamsize r = buf_->sgetn(c + got, chunk);
      if (r <= 0) break;
      got += static_cast<std::size_t>(r);
      if (r < chunk) break;
    }
    offset_ += got;
    if (seekable_) remaining_ -= std::min<std::uint64_t>(remaining_, got);
    if (got != n) bad(detail::concat("truncated: ", what, " needs ", n, " bytes at offset ", offset_ - got, ", got ", got));
  }
  /// Reads n bytes into a vector that grows as data arrives (for streams that cannot seek).
  std::vector<unsigned char> read_vector(std::uint64_t n, std::string_view what) {
    expect(n, what);
    std::vector<unsigned char> v;
    if (seekable_) {
      v.resize(static_cast<std::size_t>(n));
      read(v.data(), v.size(), what);
      return v;
    }
    while (v.size() < n) {
      const std::size_t chunk = static_cast<std::size_t>(std::min<std::uint64_t>(n - v.size(), kChunk));
      const std::size_t old = v.size();
      v.resize(old + chunk);
      read(v.data() + old, chunk, what);
    }
    return v;
  }
  /// True at end of stream (nothing more to read).
  bool at_end() {
    return buf_->sgetc() == std::char_traits<char>::eof();
  }

 private:
  std::streambuf* buf_;
  std::uint64_t offset_ = 0;
  std::uint64_t remaining_ = std::numeric_limits<std::uint64_t>::max();
  bool seekable_ = false;
};

struct SectionHeader {
  std::uint64_t size = 0;
  std::uint64_t sum = 0;
  std::uint64_t offset = 0;
};

inline SectionHeader read_section_header(Reader& r, std::string_view tag) {
  std::array<unsigned char, kSectionHeaderBytes> h{};
  r.read(h.data(), h.size(), detail::concat(tag, " section header"));
  if (std::memcmp(h.data(), tag.data(), 4) != 0)
    bad(detail::concat("section at offset ", r.offset() - h.size(), ": expected tag ", tag, ", got '",
                       std::string(reinterpret_cast<const char*>(h.data()), 4), "'"));
  Cursor c{h.data() + 4, h.size() - 4, tag};
  if (const auto reserved = c.get<std::uint32_t>("reserved"); reserved != 0)
    bad(detail::concat(tag, " section: reserved field: expected 0, got ", reserved));
  SectionHeader s;
  s.size = c.get<std::uint64_t>("size");
  s.sum = c.get<std::uint64_t>("checksum");
  s.offset = r.offset();
  return s;
}

inline void verify(const SectionHeader& s, const void* p, std::size_t n, std::string_view tag) {
  const std::uint64_t got = checksum(p, n);
  if (kVerifyChecksums && got != s.sum)
    bad(detail::concat(tag, " section: checksum mismatch (stored ", std::hex, s.sum, ", computed ", got,
                       "): the file is corrupt"));
}

/// Reads a whole section whose size must be `expected` (or at most `max` when expected is 0).
inline std::vector<unsigned char> read_section(Reader& r, std::string_view tag, std::uint64_t expected,
                                               std::uint64_t max, SectionHeader* out = nullptr) {
  const SectionHeader s = read_section_header(r, tag);
  if (expected && s.size != expected)
    bad(detail::concat(tag, " section: size: expected ", expected, " bytes, got ", s.size));
  if (!expected && s.size > max) bad(detail::concat(tag, " section: size: expected <= ", max, " bytes, got ", s.size));
  std::vector<unsigned char> v = r.read_vector(s.size, detail::concat(tag, " section"));
  verify(s, v.data(), v.size(), tag);
  if (out) *out = s;
  return v;
}

inline void read_header(Reader& r, CacheFileInfo& info) {
  std::array<unsigned char, kHeaderBytes> h{};
  r.read(h.data(), 8, "magic");
  if (std::memcmp(h.data(), kCacheFileMagic.data(), 8) != 0) bad("magic: expected \\x89QPKV\\r\\n\\x1a (not a qpkv cache file)");
  r.read(h.data() + 8, h.size() - 8, "header");
  Cursor c{h.data() + 8, h.size() - 8, "header"};
  info.version = c.get<std::uint32_t>("version");
  const auto endian = c.get<std::uint32_t>("endianness");
  const auto sections = c.get<std::uint32_t>("sections");
  const auto flags = c.get<std::uint32_t>("flags");
  const auto sum = c.get<std::uint64_t>("checksum");
  // the version first: a newer format may change everything after it
  if (info.version == 0 || info.version > kCacheFileVersion)
    bad(detail::concat("version: expected 1..", kCacheFileVersion, " (this qpkv), got ", info.version,
                       info.version > kCacheFileVersion ? " (written by a newer qpkv)" : ""));
  if (endian != kCacheFileEndianMarker)
    bad(detail::concat("endianness marker: expected ", std::hex, kCacheFileEndianMarker, ", got ", endian,
                       endian == 0x04030201u ? " (written on a host of the other byte order)" : " (corrupt)"));
  if (kVerifyChecksums && checksum(h.data(), 24) != sum) bad("header: checksum mismatch: the file is corrupt");
  if (sections != kTags.size()) bad(detail::concat("header: sections: expected ", kTags.size(), ", got ", sections));
  if (flags != 0) bad(detail::concat("header: flags: expected 0, got ", flags));
}

/// Parses SHAP into info and checks it for internal consistency and sanity bounds.
inline void parse_shape(const std::vector<unsigned char>& v, CacheFileInfo& info) {
  Cursor c{v.data(), v.size(), "SHAP"};
  auto& s = info.shape;
  auto& L = info.layout;
  s.kv_heads = c.get<index_t>("kv_heads");
  s.q_heads = c.get<index_t>("q_heads");
  s.head_dim = c.get<index_t>("head_dim");
  L.block_tokens = c.get<index_t>("block_tokens");
  const auto key_part = c.get<std::uint64_t>("key_part");
  const auto value_part = c.get<std::uint64_t>("value_part");
  L.residual_limit = c.get<index_t>("residual_limit");
  info.blocks = c.get<index_t>("blocks");
  info.residual = c.get<index_t>("residual");
  info.next_position = c.get<index_t>("next_position");
  const auto scale_bits = c.get<std::uint32_t>("softmax_scale");
  const auto pad = c.get<std::uint32_t>("reserved");
  const auto reserved2 = c.get<std::uint64_t>("reserved");
  c.finish();
  info.softmax_scale = std::bit_cast<float>(scale_bits);
  auto in = [](index_t x, index_t lo, index_t hi) { return x >= lo && x <= hi; };
  auto need = [](bool ok, std::string_view field, std::string_view expected, auto got) {
    if (!ok) bad(detail::concat("SHAP section: ", field, ": expected ", expected, ", got ", got));
  };
  need(in(s.kv_heads, 1, kMaxHeads), "kv_heads", "in [1, 2^20]", s.kv_heads);
  need(in(s.q_heads, 1, kMaxHeads) && s.q_heads % s.kv_heads == 0, "q_heads", "in [1, 2^20], a multiple of kv_heads", s.q_heads);
  need(in(s.head_dim, 1, kMaxDim), "head_dim", "in [1, 2^20]", s.head_dim);
  need(in(L.block_tokens, 1, kMaxTokens), "block_tokens", "in [1, 2^40]", L.block_tokens);
  need(key_part <= (std::uint64_t{1} << 50) && value_part <= (std::uint64_t{1} << 50), "part bytes", "<= 2^50", key_part);
  need(in(L.residual_limit, 0, kMaxTokens), "residual_limit", "in [0, 2^40]", L.residual_limit);
  need(in(info.blocks, 0, kMaxTokens), "blocks", "in [0, 2^40]", info.blocks);
  need(L.residual_limit == 0 ? info.residual == 0 : in(info.residual, 0, L.residual_limit - 1), "residual",
       detail::concat("in [0, residual_limit) = [0, ", L.residual_limit, ")"), info.residual);
  need(std::isfinite(info.softmax_scale) && info.softmax_scale >= 0.0f, "softmax_scale", ">= 0 and finite", info.softmax_scale);
  need(pad == 0 && reserved2 == 0, "reserved", "0", pad);
  L.kv_heads = s.kv_heads;
  L.q_heads = s.q_heads;
  L.head_dim = s.head_dim;
  L.key_part = static_cast<std::size_t>(key_part);
  L.value_part = static_cast<std::size_t>(value_part);
  L.capacity_blocks = info.blocks;
  L.residual_capacity = info.residual;
  const std::uint64_t tokens = add(mul(static_cast<std::uint64_t>(info.blocks), static_cast<std::uint64_t>(L.block_tokens), "tokens"),
                                   static_cast<std::uint64_t>(info.residual), "tokens");
  need(tokens <= static_cast<std::uint64_t>(kMaxTokens), "tokens (blocks x block_tokens + residual)", "<= 2^40", tokens);
  need(in(info.next_position, static_cast<index_t>(tokens), kMaxTokens), "next_position",
       detail::concat("in [tokens (", tokens, "), 2^40]"), info.next_position);
}

/// DATA section bytes of the compact layout, overflow-checked.
inline std::uint64_t data_bytes(const CacheFileInfo& info) {
  const auto& L = info.layout;
  const std::uint64_t H = static_cast<std::uint64_t>(L.kv_heads);
  const std::uint64_t block = add(L.key_part, L.value_part, "block bytes");
  const std::uint64_t blocks = mul(mul(H, static_cast<std::uint64_t>(info.blocks), "blocks"), block, "blocks");
  const std::uint64_t res = mul(mul(mul(4, H, "residual"), static_cast<std::uint64_t>(info.residual), "residual"),
                                static_cast<std::uint64_t>(L.head_dim), "residual");
  return add(blocks, res, "DATA");
}

/// Reads header, CONF and SHAP (everything but positions and data).
inline CacheFileInfo read_front(Reader& r) {
  CacheFileInfo info;
  read_header(r, info);
  SectionHeader sh;
  const auto conf = read_section(r, kTags[0], 0, kMaxConfigBytes, &sh);
  info.sections.push_back({std::string(kTags[0]), sh.offset, sh.size, sh.sum});
  Cursor c{conf.data(), conf.size(), "CONF"};
  const auto kind = c.get<std::uint32_t>("kind");
  if (kind != 1 && kind != 2) bad(detail::concat("CONF section: kind: expected 1 (CompressedKV) or 2 (AnyCompressedKV), got ", kind));
  info.kind = static_cast<CacheFileKind>(kind);
  info.type = c.get_string("type");
  info.params = c.get_string("params");
  info.kvconfig = c.get_string("kvconfig");
  c.finish();
  if ((info.kind == CacheFileKind::any) == info.kvconfig.empty())
    bad("CONF section: kvconfig: expected a KVConfig exactly when kind is 2 (AnyCompressedKV)");
  const auto shap = read_section(r, kTags[1], kShapeBytes, 0, &sh);
  info.sections.push_back({std::string(kTags[1]), sh.offset, sh.size, sh.sum});
  parse_shape(shap, info);
  return info;
}

inline std::uint64_t positions_bytes(const CacheFileInfo& info) {
  return mul(mul(static_cast<std::uint64_t>(info.shape.kv_heads), static_cast<std::uint64_t>(info.tokens()), "POSN"),
             sizeof(index_t), "POSN");
}

/// Reads POSN; each head's positions must be strictly ascending in [0, next_position).
inline std::vector<std::vector<index_t>> read_positions(Reader& r, CacheFileInfo& info) {
  SectionHeader sh;
  const std::uint64_t n = positions_bytes(info);
  const auto raw = read_section(r, kTags[2], n, 0, &sh);
  info.sections.push_back({std::string(kTags[2]), sh.offset, sh.size, sh.sum});
  const index_t H = info.shape.kv_heads, N = info.tokens();
  std::vector<std::vector<index_t>> pos(static_cast<std::size_t>(H), std::vector<index_t>(static_cast<std::size_t>(N)));
  for (index_t h = 0; h < H && N > 0; ++h) {
    std::memcpy(pos[h].data(), raw.data() + static_cast<std::size_t>(h * N) * sizeof(index_t),
                static_cast<std::size_t>(N) * sizeof(index_t));
    for (index_t i = 0; i < N; ++i) {
      const index_t p = pos[h][i];
      if (p < 0 || p >= info.next_position || (i > 0 && p <= pos[h][i - 1]))
        bad(detail::concat("POSN section: head ", h, " token ", i, ": expected a position in [0, ", info.next_position,
                           ") above the previous one, got ", p));
    }
  }
  return pos;
}

/// Reads DATA into a buffer of exactly data_bytes(info), allocating only after the size checks.
inline AlignedBuffer read_data(Reader& r, CacheFileInfo& info) {
  const SectionHeader sh = read_section_header(r, kTags[3]);
  const std::uint64_t n = data_bytes(info);
  if (sh.size != n) bad(detail::concat("DATA section: size: expected ", n, " bytes (from SHAP), got ", sh.size));
  if (n > std::numeric_limits<std::size_t>::max() / 2) bad("DATA section: too large for this machine");
  r.expect(n, "DATA section");
  AlignedBuffer buf;
  if (r.seekable()) {
    buf = AlignedBuffer(static_cast<std::size_t>(n));
    r.read(buf.data(), buf.size(), "DATA section");
  } else {
    const auto v = r.read_vector(n, "DATA section");
    buf = AlignedBuffer(v.size());
    if (!v.empty()) std::memcpy(buf.data(), v.data(), v.size());
  }
  verify(sh, buf.data(), buf.size(), kTags[3]);
  info.sections.push_back({std::string(kTags[3]), sh.offset, sh.size, sh.sum});
  return buf;
}

inline bool finite16(half h) { return (h.bits & 0x7c00u) != 0x7c00u; }
inline bool finite16(bfloat16 b) { return (b.bits & 0x7f80u) != 0x7f80u; }
inline bool finite16(float f) { return std::isfinite(f); }

/// Checks one stored part for values that would make attention non-finite or index out of range.
template <class Q>
void check_part(const Q& q, const std::uint8_t* part, index_t B, index_t D, const char* role, index_t head, index_t block) {
  auto fail = [&](std::string_view what) {
    bad(detail::concat("DATA section: head ", head, " block ", block, " ", role, " part: ", what));
  };
  if constexpr (std::is_same_v<Q, Fp16>) {
    for (index_t i = 0; i < B * D; ++i) {
      half h;
      std::memcpy(&h, part + i * sizeof(half), sizeof h);
      if (!finite16(h)) fail(detail::concat("element ", i, ": expected a finite fp16 value, got bits 0x", std::hex, h.bits));
    }
  } else if constexpr (requires { typename Q::scale_type; q.layout(B, D); }) {
    using S = typename Q::scale_type;
    const AffineLayout l = q.layout(B, D);
    for (std::size_t g = 0; g < l.params; ++g) {
      S s, m;
      std::memcpy(&s, part + l.scales + g * sizeof(S), sizeof s);
      std::memcpy(&m, part + l.mins + g * sizeof(S), sizeof m);
      if (!finite16(s) || !finite16(m) || to_float(s) < 0.0f)
        fail(detail::concat("group ", g, ": expected a finite scale >= 0 and a finite min, got ", to_float(s), " and ", to_float(m)));
    }
    for (std::size_t i = 0; i < l.slots; ++i) {
      std::uint32_t idx;
      float v;
      std::memcpy(&idx, part + l.outlier_idx + i * sizeof idx, sizeof idx);
      std::memcpy(&v, part + l.outlier_val + i * sizeof v, sizeof v);
      if (idx == OutlierRule::unused) continue;
      if (idx >= static_cast<std::uint64_t>(B * D) || !std::isfinite(v))
        fail(detail::concat("outlier slot ", i, ": expected an index < ", B * D, " and a finite value, got ", idx, " and ", v));
    }
  }
  // other (user) quantizers: any bytes are accepted; the checksum is their only guard
}

template <class S, class KQ, class VQ>
std::string type_name() {
  static_assert(PolicyTraits<S>::defined && PolicyTraits<KQ>::defined && PolicyTraits<VQ>::defined,
                "qpkv cache files: specialise qpkv::PolicyTraits<T> (name, params) for every policy of the cache");
  return detail::concat("CompressedKV<", PolicyTraits<S>::name(S{}), ",", PolicyTraits<KQ>::name(KQ{}), ",",
                        PolicyTraits<VQ>::name(VQ{}), ">");
}

inline void write_le_host_check() {
  if constexpr (std::endian::native != std::endian::little) bad("save: only little-endian hosts write qpkv cache files");
}

}  // namespace serial_detail

namespace detail {
/// The private state of a CompressedKV, for save and load (befriended in compressed_kv.hpp).
struct CacheFileAccess {
  template <class C>
  static std::string params(const C& c) {
    using S = typename C::selector_type;
    using K = typename C::key_quantizer;
    using V = typename C::value_quantizer;
    return concat("selector{", PolicyTraits<S>::params(c.selector_), "} key{", PolicyTraits<K>::params(c.kq_), "} value{",
                  PolicyTraits<V>::params(c.vq_), "} residual=", c.residual_length_);
  }
  template <class C>
  static std::string type(const C&) {
    return serial_detail::type_name<typename C::selector_type, typename C::key_quantizer, typename C::value_quantizer>();
  }

  template <class C>
  static void save(std::ostream& os, const C& c, CacheFileKind kind, std::string_view kvconfig) {
    using namespace serial_detail;
    write_le_host_check();
    const CacheLayout& L = c.layout_;
    const index_t H = c.shape_.kv_heads, D = c.shape_.head_dim, N = c.tokens();
    Writer w(os);
    // header
    Bytes h;
    h.b.assign(kCacheFileMagic.begin(), kCacheFileMagic.end());
    h.put(kCacheFileVersion);
    h.put(kCacheFileEndianMarker);
    h.put(static_cast<std::uint32_t>(kTags.size()));
    h.put(std::uint32_t{0});
    h.put(checksum(h.b.data(), h.b.size()));
    w.write(h.b.data(), h.b.size());
    // CONF
    Bytes conf;
    conf.put(static_cast<std::uint32_t>(kind));
    conf.put_string(type(c));
    conf.put_string(params(c));
    conf.put_string(kvconfig);
    w.section(kTags[0], conf.b.size(), checksum(conf.b.data(), conf.b.size()));
    w.write(conf.b.data(), conf.b.size());
    // SHAP
    Bytes shap;
    for (index_t x : {H, c.shape_.q_heads, D, L.block_tokens}) shap.put(x);
    shap.put(static_cast<std::uint64_t>(L.key_part));
    shap.put(static_cast<std::uint64_t>(L.value_part));
    for (index_t x : {L.residual_limit, c.blocks_, c.residual_, c.next_position_}) shap.put(x);
    shap.put(std::bit_cast<std::uint32_t>(c.options_.scale));
    shap.put(std::uint32_t{0});
    shap.put(std::uint64_t{0});
    w.section(kTags[1], shap.b.size(), checksum(shap.b.data(), shap.b.size()));
    w.write(shap.b.data(), shap.b.size());
    // POSN
    Bytes pos;
    for (const auto& p : c.positions_) pos.b.insert(pos.b.end(), reinterpret_cast<const unsigned char*>(p.data()),
                                                    reinterpret_cast<const unsigned char*>(p.data() + p.size()));
    if (pos.b.size() != static_cast<std::size_t>(H * N) * sizeof(index_t)) bad("save: positions do not match tokens()");
    w.section(kTags[2], pos.b.size(), checksum(pos.b.data(), pos.b.size()));
    w.write(pos.b.data(), pos.b.size());
    // DATA: the compact layout (blocks of each head, then residual keys, then residual values)
    const std::size_t head_blocks = static_cast<std::size_t>(c.blocks_) * L.block_bytes();
    const std::size_t res = static_cast<std::size_t>(c.residual_ * D) * sizeof(half);
    const std::uint8_t* base = c.data_.data();
    auto each_piece = [&](auto&& fn) {
      for (index_t hh = 0; hh < H; ++hh) fn(base + L.block_offset(hh, 0), head_blocks);
      for (index_t hh = 0; hh < H; ++hh) fn(base + L.residual_key_offset(hh, 0), res);
      for (index_t hh = 0; hh < H; ++hh) fn(base + L.residual_value_offset(hh, 0), res);
    };
    XXH3_state_t st;
    XXH3_64bits_reset(&st);
    std::uint64_t total = 0;
    each_piece([&](const std::uint8_t* p, std::size_t n) {
      if (n) XXH3_64bits_update(&st, p, n);
      total += n;
    });
    w.section(kTags[3], total, XXH3_64bits_digest(&st));
    each_piece([&](const std::uint8_t* p, std::size_t n) { w.write(p, n); });
    w.flush();
  }

  /// Loads the sections after `info` (header, CONF and SHAP, already read) into `c`. Strong
  /// guarantee: on any Error, c is unchanged.
  template <class C>
  static void load(serial_detail::Reader& r, C& c, CacheFileInfo info) {
    using namespace serial_detail;
    const std::string want_type = type(c), want_params = params(c);
    if (info.type != want_type)
      bad(concat("type: expected ", want_type, " (the cache loaded into), got ", info.type));
    if (info.params != want_params)
      bad(concat("policy parameters: expected ", want_params, " (the cache loaded into), got ", info.params));
    if (std::bit_cast<std::uint32_t>(info.softmax_scale) != std::bit_cast<std::uint32_t>(c.options_.scale))
      bad(concat("softmax_scale: expected ", c.options_.scale, " (the cache loaded into), got ", info.softmax_scale));
    const Shape shape = info.shape;
    index_t res = 0;
    const CacheLayout planned = plan_layout(shape, c.kq_, c.vq_, c.residual_length_, info.tokens(), &res);
    const CacheLayout& L = info.layout;
    if (planned.block_tokens != L.block_tokens || planned.key_part != L.key_part || planned.value_part != L.value_part ||
        planned.residual_limit != L.residual_limit || planned.capacity_blocks != info.blocks || res != info.residual)
      bad(concat("SHAP section: layout (block_tokens ", L.block_tokens, ", parts ", L.key_part, "+", L.value_part,
                 ", residual_limit ", L.residual_limit, ", blocks ", info.blocks, ", residual ", info.residual,
                 "): expected what the policies give (", planned.block_tokens, ", ", planned.key_part, "+",
                 planned.value_part, ", ", planned.residual_limit, ", ", planned.capacity_blocks, ", ", res, ")"));
    auto positions = read_positions(r, info);
    AlignedBuffer data = read_data(r, info);
    // semantic checks of the content
    const index_t B = L.block_tokens, D = shape.head_dim;
    for (index_t h = 0; h < shape.kv_heads; ++h)
      for (index_t b = 0; b < info.blocks; ++b) {
        const std::uint8_t* blk = data.data() + L.block_offset(h, b);
        check_part(c.kq_, blk, B, D, "key", h, b);
        check_part(c.vq_, blk + L.key_part, B, D, "value", h, b);
      }
    const std::size_t res_elems = static_cast<std::size_t>(2 * shape.kv_heads * info.residual * D);
    for (std::size_t i = 0; i < res_elems; ++i) {
      half x;
      std::memcpy(&x, data.data() + L.blocks_bytes() + i * sizeof(half), sizeof x);
      if (!finite16(x)) bad(concat("DATA section: residual element ", i, ": expected a finite fp16 value, got bits 0x", std::hex, x.bits));
    }
    // commit (nothing below throws)
    c.shape_ = shape;
    c.layout_ = L;
    c.data_ = std::move(data);
    c.blocks_ = info.blocks;
    c.residual_ = info.residual;
    c.positions_ = std::move(positions);
    c.next_position_ = info.next_position;
  }
};
}  // namespace detail

// ---------------------------------------------------------------------------------------------
// Public API
// ---------------------------------------------------------------------------------------------

/// Writes `cache` to `os` (qpkv::Error on a short write). Several caches may follow each other in
/// one stream (e.g. one per layer); load() reads exactly one.
template <TokenSelector S, class K, class V, class B>
void save(std::ostream& os, const CompressedKV<S, K, V, B>& cache) {
  detail::CacheFileAccess::save(os, cache, CacheFileKind::compressed_kv, "");
}

/// Writes an AnyCompressedKV; the file also holds its KVConfig, so load_any() can rebuild it.
inline void save(std::ostream& os, const AnyCompressedKV& cache) {
  const std::string config = cache.config().to_string();
  cache.visit([&](const auto& c) { detail::CacheFileAccess::save(os, c, CacheFileKind::any, config); });
}

/// Reads one cache from `is` into `cache`, which must have the file's policy types and parameters
/// (residual length and softmax scale included); shape, positions and content come from the file.
/// Any mismatch or malformed input is a qpkv::Error and leaves `cache` unchanged. A file written by
/// an AnyCompressedKV loads into the matching CompressedKV<AnySelector, QuantizerFor<K>, QuantizerFor<V>>.
template <TokenSelector S, class K, class V, class B>
void load(std::istream& is, CompressedKV<S, K, V, B>& cache) {
  serial_detail::Reader r(is);
  detail::CacheFileAccess::load(r, cache, serial_detail::read_front(r));
}

/// Reads an AnyCompressedKV (a file written by save(os, AnyCompressedKV)), configured from the
/// file's KVConfig, shape and softmax scale.
inline AnyCompressedKV load_any(std::istream& is) {
  serial_detail::Reader r(is);
  CacheFileInfo front = serial_detail::read_front(r);
  if (front.kind != CacheFileKind::any)
    serial_detail::bad(detail::concat("kind: expected 2 (AnyCompressedKV, with a KVConfig), got 1 (", front.type,
                                      "): load it into that CompressedKV type with load()"));
  KVConfig config;
  try {
    config = KVConfig::parse(front.kvconfig);
  } catch (const Error& e) {
    serial_detail::bad(detail::concat("CONF section: kvconfig: ", e.what()));
  }
  AnyCompressedKV any(front.shape, config, front.softmax_scale);
  // the alternative re-checks type, parameters and layout against the file
  any.visit([&](auto& c) { detail::CacheFileAccess::load(r, c, std::move(front)); });
  return any;
}

/// Reads one cache file's header, configuration and shape, and verifies the checksums and the
/// structure of its positions and data, without loading it into a cache (for `qpkv inspect`).
inline CacheFileInfo inspect(std::istream& is) {
  serial_detail::Reader r(is);
  CacheFileInfo info = serial_detail::read_front(r);
  (void)serial_detail::read_positions(r, info);
  (void)serial_detail::read_data(r, info);
  info.file_bytes = r.offset();
  return info;
}

namespace serial_detail {
inline std::ifstream open_in(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) bad(detail::concat("cannot open ", path.string(), " for reading"));
  return f;
}
inline void expect_end(Reader& r, const std::filesystem::path& path) {
  if (!r.at_end()) bad(detail::concat(path.string(), ": trailing bytes after the cache at offset ", r.offset()));
}
/// Writes through `fn(ostream&)` to path + ".partial", then renames it over `path`, so a reader
/// never sees a half-written file under the final name.
template <class Fn>
void save_file(const std::filesystem::path& path, Fn&& fn) {
  std::filesystem::path tmp = path;
  tmp += ".partial";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) bad(detail::concat("cannot open ", tmp.string(), " for writing"));
    try {
      fn(f);
    } catch (...) {
      f.close();
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      throw;
    }
    f.close();
    if (!f) bad(detail::concat("write: closing ", tmp.string(), " failed"));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) bad(detail::concat("cannot rename ", tmp.string(), " to ", path.string(), ": ", ec.message()));
}
}  // namespace serial_detail

/// File versions: the file holds exactly one cache (trailing bytes are an Error on load).
template <TokenSelector S, class K, class V, class B>
void save(const std::filesystem::path& path, const CompressedKV<S, K, V, B>& cache) {
  serial_detail::save_file(path, [&](std::ostream& os) { save(os, cache); });
}
inline void save(const std::filesystem::path& path, const AnyCompressedKV& cache) {
  serial_detail::save_file(path, [&](std::ostream& os) { save(os, cache); });
}
template <TokenSelector S, class K, class V, class B>
void load(const std::filesystem::path& path, CompressedKV<S, K, V, B>& cache) {
  auto f = serial_detail::open_in(path);
  serial_detail::Reader r(f);
  CompressedKV<S, K, V, B> tmp = cache;  // keep `cache` unchanged if the trailing-bytes check fails
  detail::CacheFileAccess::load(r, tmp, serial_detail::read_front(r));
  serial_detail::expect_end(r, path);
  cache = std::move(tmp);
}
inline AnyCompressedKV load_any(const std::filesystem::path& path) {
  auto f = serial_detail::open_in(path);
  AnyCompressedKV any = load_any(f);
  if (f.rdbuf()->sgetc() != std::char_traits<char>::eof())
    serial_detail::bad(detail::concat(path.string(), ": trailing bytes after the cache"));
  return any;
}
inline CacheFileInfo inspect(const std::filesystem::path& path) {
  auto f = serial_detail::open_in(path);
  CacheFileInfo info = inspect(f);
  if (f.rdbuf()->sgetc() != std::char_traits<char>::eof())
    serial_detail::bad(detail::concat(path.string(), ": trailing bytes after the cache at offset ", info.file_bytes));
  return info;
}

/// Human-readable summary of inspect()'s result (what `qpkv inspect FILE` prints).
inline std::string to_string(const CacheFileInfo& info) {
  std::string s = detail::concat("qpkv cache file, format version ", info.version, "\n",
                                 "kind        ", info.kind == CacheFileKind::any ? "AnyCompressedKV" : "CompressedKV", "\n",
                                 "type        ", info.type, "\n", "params      ", info.params, "\n");
  if (!info.kvconfig.empty()) s += detail::concat("kvconfig    ", info.kvconfig, "\n");
  const auto& L = info.layout;
  s += detail::concat("shape       kv_heads ", info.shape.kv_heads, ", q_heads ", info.shape.q_heads, ", head_dim ",
                      info.shape.head_dim, "\n", "tokens      ", info.tokens(), " per KV head (", info.blocks,
                      " blocks of ", L.block_tokens, " + ", info.residual, " fp16 residual; residual limit ",
                      L.residual_limit, "), next position ", info.next_position, "\n",
                      "block       ", L.block_bytes(), " bytes (key part ", L.key_part, ", value part ", L.value_part, ")\n",
                      "cache bytes ", L.total_bytes(), "\n", "softmax     ",
                      info.softmax_scale > 0.0f ? serial_detail::num(info.softmax_scale) : std::string("1/sqrt(head_dim)"), "\n");
  for (const auto& sec : info.sections) {
    std::array<char, 17> hex{};
    std::to_chars(hex.data(), hex.data() + 16, sec.checksum, 16);
    s += detail::concat("section     ", sec.tag, " at ", sec.offset, ", ", sec.size, " bytes, xxh3 ", hex.data(), " ok\n");
  }
  s += detail::concat("file bytes  ", info.file_bytes, "\n");
  return s;
}

}  // namespace qpkv
