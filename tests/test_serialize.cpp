// Cache files (qpkv/cache/serialize.hpp): byte-exact round trips that attend identically, and every
// kind of bad file -- wrong type, newer version, truncation at every length, every single bit
// flipped, absurd sizes, and files crafted to pass the checksums -- is a qpkv::Error.
#include <doctest/doctest.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <streambuf>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "qpkv/cache/serialize.hpp"

using namespace qpkv;
using testing::randn;

namespace {

std::string bytes_of(const auto& cache) {
  std::ostringstream os;
  save(os, cache);
  return os.str();
}

/// A stream buffer that cannot seek and hands out at most 7 bytes per read (a pipe or socket).
class PipeBuf : public std::streambuf {
 public:
  explicit PipeBuf(std::string s) : s_(std::move(s)) {}

 protected:
  int_type underflow() override {
    if (at_ >= s_.size()) return traits_type::eof();
    const std::size_t n = std::min<std::size_t>(7, s_.size() - at_);
    setg(s_.data() + at_, s_.data() + at_, s_.data() + at_ + n);
    at_ += n;
    return traits_type::to_int_type(*gptr());
  }

 private:
  std::string s_;
  std::size_t at_ = 0;
};

/// Section offsets of a v1 file (as written by save): header 32 bytes, then tag/size/sum + payload.
struct Sections {
  std::size_t header_at[4];
  std::size_t payload_at[4];
  std::size_t size[4];
};
Sections sections_of(const std::string& f) {
  Sections s{};
  std::size_t at = 32;
  for (int i = 0; i < 4; ++i) {  // sections past the end (after a crafted size) get offset SIZE_MAX
    s.header_at[i] = s.payload_at[i] = SIZE_MAX;
    if (at > f.size() || f.size() - at < 24) continue;
    std::uint64_t n;
    std::memcpy(&n, f.data() + at + 8, 8);
    s.header_at[i] = at;
    s.payload_at[i] = at + 24;
    s.size[i] = static_cast<std::size_t>(n);
    at = n > f.size() ? SIZE_MAX : at + 24 + static_cast<std::size_t>(n);
  }
  return s;
}

/// Recomputes every checksum, so a crafted file passes them and only validation can stop it.
void reseal(std::string& f) {
  const std::uint64_t hs = XXH3_64bits(f.data(), 24);
  std::memcpy(f.data() + 24, &hs, 8);
  const Sections s = sections_of(f);
  for (int i = 0; i < 4; ++i) {
    if (s.payload_at[i] > f.size() || s.size[i] > f.size() - s.payload_at[i]) return;
    const std::uint64_t sum = XXH3_64bits(f.data() + s.payload_at[i], s.size[i]);
    std::memcpy(f.data() + s.header_at[i] + 16, &sum, 8);
  }
}

template <class T>
void poke(std::string& f, std::size_t at, T v) {
  std::memcpy(f.data() + at, &v, sizeof v);
}

/// SHAP field offsets inside the file.
std::size_t shap_field(const std::string& f, int index) { return sections_of(f).payload_at[1] + 8 * static_cast<std::size_t>(index); }
enum ShapField { kv_heads, q_heads, head_dim, block_tokens, key_part, value_part, residual_limit, blocks, residual, next_position };

template <class Cache>
void load_string(const std::string& f, Cache& c) {
  std::istringstream is(f);
  load(is, c);
}

template <class Cache>
std::vector<float> attend_of(const Cache& c, unsigned seed = 5) {
  auto q = randn(static_cast<std::size_t>(c.shape().q_heads * c.shape().head_dim), seed);
  std::vector<float> out(q.size());
  c.attend(q.data(), out.data());
  return out;
}

/// A small KIVI-4 cache with residual tokens (keeps files small for exhaustive corruption tests).
using SmallCache = CompressedKV<KeepAll, Affine<4>>;
SmallCache small_cache(index_t N = 37, index_t appends = 0) {
  const Shape s{2, 4, 8};
  auto k = randn(static_cast<std::size_t>(2 * N * 8), 1), v = randn(k.size(), 2);
  Affine<4> q;
  q.group = 16;
  SmallCache c(s, {}, q, q);
  c.compress(view(k.data(), 2, N, 8), view(v.data(), 2, N, 8), N);
  for (index_t i = 0; i < appends; ++i) {
    auto kn = randn(16, 10 + static_cast<unsigned>(i)), vn = randn(16, 20 + static_cast<unsigned>(i));
    c.append(kn.data(), vn.data());
  }
  return c;
}
SmallCache empty_small() {
  Affine<4> q;
  q.group = 16;
  return SmallCache(Shape{2, 4, 8}, {}, q, q);
}

template <class Cache>
void check_round_trip(const Cache& c, Cache fresh) {
  const std::string f = bytes_of(c);
  load_string(f, fresh);
  CHECK(fresh.tokens() == c.tokens());
  CHECK(fresh.shape() == c.shape());
  for (index_t h = 0; h < c.shape().kv_heads; ++h) {
    const auto a = c.positions(h), b = fresh.positions(h);
    CHECK(std::vector<index_t>(a.begin(), a.end()) == std::vector<index_t>(b.begin(), b.end()));
  }
  CHECK(bytes_of(fresh) == f);  // byte-exact
  const DenseKV da = c.dequantize(), db = fresh.dequantize();
  CHECK(da.keys == db.keys);
  CHECK(da.values == db.values);
  if (c.tokens() > 0) CHECK(attend_of(c) == attend_of(fresh));  // bit-identical attention
}

}  // namespace

TEST_CASE("save/load round-trips byte-exactly and the loaded cache attends bit-identically") {
  const Shape s{4, 8, 64};
  const index_t N = 300;
  auto k = randn(static_cast<std::size_t>(4 * N * 64), 3), v = randn(k.size(), 4), q = randn(static_cast<std::size_t>(8 * N * 64), 5);
  const auto K = view(k.data(), 4, N, 64), V = view(v.data(), 4, N, 64), Q = view(q.data(), 8, N, 64);

  SUBCASE("KIVI-4 with residual, SnapKV; right after compress the allocation is identical") {
    using C = CompressedKV<SnapKV, Kivi<4, 4, 32, 64>>;
    C c(s);
    c.compress(K, V, Q, 200);
    check_round_trip(c, C(s));
    C d(Shape{1, 1, 8});  // the file's shape replaces the constructed one
    load_string(bytes_of(c), d);
    CHECK(d.bytes() == c.bytes());
    CHECK(std::memcmp(d.state().data, c.state().data, c.bytes()) == 0);
  }
  SUBCASE("after appends (spare capacity is not stored) and appending after a load continues identically") {
    using C = CompressedKV<KeepAll, Kivi<2>>;
    C c(s);
    c.compress(K, V, 100);
    for (int i = 0; i < 45; ++i) {
      auto kn = randn(4 * 64, 100 + static_cast<unsigned>(i)), vn = randn(4 * 64, 200 + static_cast<unsigned>(i));
      c.append(kn.data(), vn.data());
    }
    check_round_trip(c, C(s));
    C d(s);
    load_string(bytes_of(c), d);
    CHECK(d.bytes() <= c.bytes());
    for (int i = 0; i < 40; ++i) {
      auto kn = randn(4 * 64, 300 + static_cast<unsigned>(i)), vn = randn(4 * 64, 400 + static_cast<unsigned>(i));
      c.append(kn.data(), vn.data());
      d.append(kn.data(), vn.data());
    }
    CHECK(attend_of(c) == attend_of(d));
  }
  SUBCASE("3-bit keys, fp16 values, outliers, HQQ zero points, float scales, a custom softmax scale") {
    Affine<3, float> kq;
    kq.zero_point = ZeroPoint::hqq;
    kq.outliers = OutlierRule{std::numeric_limits<float>::infinity(), 0.02};
    using C = CompressedKV<H2O, Affine<3, float>, Fp16>;
    C c(s, H2O{16}, kq, Fp16{}, CacheOptions{8, 0.1f});
    c.compress(K, V, Q, 150);
    check_round_trip(c, C(s, H2O{16}, kq, Fp16{}, CacheOptions{8, 0.1f}));
  }
  SUBCASE("an empty cache round-trips") {
    using C = CompressedKV<KeepAll, Kivi<8>>;
    C c(s);
    check_round_trip(CompressedKV<KeepAll, Kivi<8>>(s), C(s));
    CHECK(c.tokens() == 0);
  }
  SUBCASE("B = 1 (per-token keys, no residual)") {
    Affine<4> kq;
    kq.axis = Axis::token;
    using C = CompressedKV<StreamingLLM, Affine<4>>;
    C c(s, {}, kq, kq);
    c.compress(K, V, 64);
    check_round_trip(c, C(s, {}, kq, kq));
  }
}

TEST_CASE("AnyCompressedKV files rebuild the cache from their KVConfig") {
  const Shape s{2, 8, 32};
  const index_t N = 120;
  auto k = randn(static_cast<std::size_t>(2 * N * 32), 7), v = randn(k.size(), 8), q = randn(static_cast<std::size_t>(8 * N * 32), 9);
  for (const char* text : {"snapkv,kivi4,group=32,residual=32,window=16", "h2o,k4v2,window=8", "keep_all,fp16",
                           "streamingllm,k8v4,outliers=0.01"}) {
    CAPTURE(text);
    AnyCompressedKV a(s, KVConfig::parse(text), 0.25f);
    a.compress(view(k.data(), 2, N, 32), view(v.data(), 2, N, 32), view(q.data(), 8, N, 32), 64);
    const std::string f = bytes_of(a);
    std::istringstream is(f);
    const AnyCompressedKV b = load_any(is);
    CHECK(b.config() == a.config());
    CHECK(b.softmax_scale() == a.softmax_scale());
    CHECK(bytes_of(b) == f);
    CHECK(attend_of(a) == attend_of(b));
  }
  SUBCASE("an Any file loads into the matching compile-time alternative, a compile-time file not into Any") {
    AnyCompressedKV a(s, KVConfig::parse("snapkv,kivi4,window=16"));
    a.compress(view(k.data(), 2, N, 32), view(v.data(), 2, N, 32), view(q.data(), 8, N, 32), 64);
    AnyCompressedKV::cache_type<4, 4> c(s, a.config().selector(), a.config().quantizer<4>(Axis::channel),
                                        a.config().quantizer<4>(Axis::token), CacheOptions{a.config().residual, 0.0f});
    load_string(bytes_of(a), c);
    CHECK(attend_of(c) == attend_of(a));
    std::istringstream is(bytes_of(c));
    CHECK_THROWS_WITH_AS(load_any(is), doctest::Contains("kind: expected 2"), Error);
  }
}

TEST_CASE("several caches follow each other in one stream; file save/load is exact and atomic") {
  const SmallCache a = small_cache(37), b = small_cache(50, 3);
  std::stringstream ss;
  save(ss, a);
  save(ss, b);
  SmallCache x = empty_small(), y = empty_small();
  load(ss, x);
  load(ss, y);
  CHECK(bytes_of(x) == bytes_of(a));
  CHECK(bytes_of(y) == bytes_of(b));

  const auto dir = std::filesystem::temp_directory_path() / "qpkv_test_serialize";
  std::filesystem::create_directories(dir);
  const auto path = dir / "cache.qpkv";
  save(path, a);
  CHECK_FALSE(std::filesystem::exists(dir / "cache.qpkv.partial"));
  SmallCache z = empty_small();
  load(path, z);
  CHECK(bytes_of(z) == bytes_of(a));
  CHECK(inspect(path).tokens() == a.tokens());
  {
    std::ofstream f(path, std::ios::app | std::ios::binary);
    f << "x";
  }
  SmallCache w = empty_small();
  CHECK_THROWS_WITH_AS(load(path, w), doctest::Contains("trailing bytes"), Error);
  CHECK(w.tokens() == 0);
  CHECK_THROWS_WITH_AS(load(dir / "missing.qpkv", w), doctest::Contains("cannot open"), Error);
  std::filesystem::remove_all(dir);
}

TEST_CASE("loading into the wrong compile-time type or parameters is an Error naming both") {
  const std::string f = bytes_of(small_cache());
  SUBCASE("other bit width") {
    Affine<2> q;
    q.group = 16;
    CompressedKV<KeepAll, Affine<2>> c(Shape{2, 4, 8}, {}, q, q);
    CHECK_THROWS_WITH_AS(load_string(f, c), doctest::Contains("type: expected CompressedKV<keep_all,affine<2,float16>"), Error);
  }
  SUBCASE("other selector") {
    Affine<4> q;
    q.group = 16;
    CompressedKV<SnapKV, Affine<4>> c(Shape{2, 4, 8}, {}, q, q);
    CHECK_THROWS_WITH_AS(load_string(f, c), doctest::Contains("got CompressedKV<keep_all"), Error);
  }
  SUBCASE("other group") {
    CompressedKV<KeepAll, Affine<4>> c(Shape{2, 4, 8});
    CHECK_THROWS_WITH_AS(load_string(f, c), doctest::Contains("policy parameters"), Error);
  }
  SUBCASE("other residual length or softmax scale") {
    Affine<4> q;
    q.group = 16;
    SmallCache c(Shape{2, 4, 8}, {}, q, q, CacheOptions{32, 0});
    CHECK_THROWS_WITH_AS(load_string(f, c), doctest::Contains("residual=32"), Error);
    SmallCache d(Shape{2, 4, 8}, {}, q, q, CacheOptions{0, 0.5f});
    CHECK_THROWS_WITH_AS(load_string(f, d), doctest::Contains("softmax_scale"), Error);
  }
}

TEST_CASE("a newer version, another byte order, or a foreign file is an Error") {
  std::string f = bytes_of(small_cache());
  SmallCache c = empty_small();
  SUBCASE("version 2") {
    poke(f, 8, std::uint32_t{2});
    reseal(f);
    CHECK_THROWS_WITH_AS(load_string(f, c), doctest::Contains("written by a newer qpkv"), Error);
  }
  SUBCASE("byte-swapped endianness marker") {
    poke(f, 12, std::uint32_t{0x04030201u});
    reseal(f);
    CHECK_THROWS_WITH_AS(load_string(f, c), doctest::Contains("other byte order"), Error);
  }
  SUBCASE("not a cache file") {
    CHECK_THROWS_WITH_AS(load_string(std::string("\x93NUMPY\x01\x01 and more bytes than a header"), c),
                         doctest::Contains("not a qpkv cache file"), Error);
    CHECK_THROWS_WITH_AS(load_string(std::string(), c), doctest::Contains("truncated"), Error);
  }
  CHECK(c.tokens() == 0);
}

TEST_CASE("a file truncated at any length is an Error, from seekable and non-seekable streams") {
  const std::string f = bytes_of(small_cache(37, 2));
  for (std::size_t n = 0; n < f.size(); ++n) {
    CAPTURE(n);
    SmallCache c = empty_small();
    CHECK_THROWS_AS(load_string(f.substr(0, n), c), Error);
    CHECK(c.tokens() == 0);
    if (n % 13 == 0 || n > f.size() - 40) {
      PipeBuf pb(f.substr(0, n));
      std::istream is(&pb);
      CHECK_THROWS_AS(load(is, c), Error);
    }
  }
  PipeBuf pb(f);
  std::istream is(&pb);
  SmallCache c = empty_small();
  load(is, c);
  CHECK(bytes_of(c) == f);
}

TEST_CASE("every single flipped bit of a file is detected") {
  const SmallCache src = small_cache(37, 2);
  const std::string f = bytes_of(src);
  std::size_t detected = 0;
  for (std::size_t bit = 0; bit < f.size() * 8; ++bit) {
    std::string g = f;
    g[bit / 8] = static_cast<char>(g[bit / 8] ^ (1 << (bit % 8)));
    SmallCache c = empty_small();
    try {
      load_string(g, c);
    } catch (const Error&) {
      ++detected;
      continue;
    }
    FAIL("bit ", bit, " (byte ", bit / 8, ") flipped without an error");
  }
  CHECK(detected == f.size() * 8);
  MESSAGE("file of ", f.size(), " bytes: all ", detected, " single-bit flips detected");
}

TEST_CASE("absurd sizes are rejected before any allocation (2^60 tokens, huge shapes, overflow)") {
  const std::string f = bytes_of(small_cache());
  SmallCache c = empty_small();
  auto crafted = [&](ShapField field, std::int64_t value) {
    std::string g = f;
    poke(g, shap_field(g, field), value);
    reseal(g);
    return g;
  };
  // Under AddressSanitizer an attempt to allocate such sizes would abort the test.
  CHECK_THROWS_WITH_AS(load_string(crafted(blocks, std::int64_t{1} << 56), c), doctest::Contains("blocks"), Error);
  CHECK_THROWS_WITH_AS(load_string(crafted(next_position, std::int64_t{1} << 60), c), doctest::Contains("next_position"), Error);
  CHECK_THROWS_WITH_AS(load_string(crafted(kv_heads, std::int64_t{1} << 40), c), doctest::Contains("kv_heads"), Error);
  CHECK_THROWS_WITH_AS(load_string(crafted(head_dim, -5), c), doctest::Contains("head_dim"), Error);
  CHECK_THROWS_AS(load_string(crafted(key_part, std::int64_t{1} << 62), c), Error);
  // plausible-looking but larger than the file: the POSN and DATA sizes are checked against the
  // bytes left, or (non-seekable) read in chunks that stop at the end of the data
  std::string g = crafted(blocks, std::int64_t{1} << 30);
  poke(g, shap_field(g, next_position), std::int64_t{1} << 36);
  poke(g, shap_field(g, residual), std::int64_t{0});
  poke(g, sections_of(g).header_at[2] + 8, std::uint64_t{2} * (std::uint64_t{1} << 34) * 8);  // POSN size to match
  reseal(g);
  CHECK_THROWS_AS(load_string(g, c), Error);
  std::istringstream gs(g);
  CHECK_THROWS_WITH_AS(inspect(gs), doctest::Contains("truncated"), Error);
  PipeBuf pb(g);
  std::istream is(&pb);
  CHECK_THROWS_WITH_AS(inspect(is), doctest::Contains("truncated"), Error);
  // a CONF section claiming 2^60 bytes
  std::string h = f;
  poke(h, sections_of(h).header_at[0] + 8, std::uint64_t{1} << 60);
  CHECK_THROWS_WITH_AS(load_string(h, c), doctest::Contains("CONF section: size"), Error);
  CHECK(c.tokens() == 0);
}

TEST_CASE("files crafted to pass the checksums are still validated") {
  const SmallCache src = small_cache(37);  // 2 blocks of 16 + 5 residual tokens per head
  const std::string f = bytes_of(src);
  const Sections S = sections_of(f);
  SmallCache c = empty_small();
  auto check = [&](std::string g, const char* what) {
    reseal(g);
    CAPTURE(what);
    CHECK_THROWS_WITH_AS(load_string(g, c), doctest::Contains(what), Error);
    CHECK(c.tokens() == 0);
  };
  {
    std::string g = f;  // positions out of order
    poke(g, S.payload_at[2] + 8, std::int64_t{0});
    check(g, "POSN section: head 0 token 1");
  }
  {
    std::string g = f;  // a position past next_position
    poke(g, S.payload_at[2] + 36 * 8, std::int64_t{1000});
    check(g, "POSN section: head 0 token 36");
  }
  {
    std::string g = f;  // a NaN fp16 scale in head 0, block 0, key part
    poke(g, S.payload_at[3], std::uint16_t{0x7e00});
    check(g, "head 0 block 0 key part: group 0");
  }
  {
    std::string g = f;  // a negative scale
    poke(g, S.payload_at[3], std::uint16_t{0xbc00});
    check(g, "finite scale >= 0");
  }
  {
    std::string g = f;  // an infinite fp16 residual value (the last bytes of DATA)
    poke(g, g.size() - 2, std::uint16_t{0x7c00});
    check(g, "residual element");
  }
  {
    std::string g = f;  // a block size that the policies do not give
    poke(g, shap_field(g, block_tokens), std::int64_t{8});
    check(g, "layout");
  }
  {
    std::string g = f;  // residual >= residual_limit
    poke(g, shap_field(g, residual), std::int64_t{16});
    check(g, "residual: expected in [0, residual_limit)");
  }
  {
    std::string g = f;  // unknown CONF kind
    poke(g, S.payload_at[0], std::uint32_t{7});
    check(g, "kind");
  }
  {
    std::string g = f;  // a string length running past the CONF section
    poke(g, S.payload_at[0] + 4, std::uint32_t{0xffffffffu});
    check(g, "runs past the section end");
  }
}

TEST_CASE("outlier indices from a file are checked before attention writes through them") {
  Affine<4> q;
  q.group = 16;
  q.outliers = OutlierRule{std::numeric_limits<float>::infinity(), 0.05};
  using C = CompressedKV<KeepAll, Affine<4>>;
  const Shape s{1, 1, 8};
  auto k = randn(8 * 32, 1), v = randn(k.size(), 2);
  C src(s, {}, q, q);
  src.compress(view(k.data(), 1, 32, 8), view(v.data(), 1, 32, 8), 32);
  std::string f = bytes_of(src);
  Affine<4> kq = q;  // keys: channel axis, B = 16
  kq.axis = Axis::channel;
  const AffineLayout kl = kq.layout(16, 8);
  poke(f, sections_of(f).payload_at[3] + kl.outlier_idx, std::uint32_t{16 * 8});  // one past the part
  reseal(f);
  C c(s, {}, q, q);
  CHECK_THROWS_WITH_AS(load_string(f, c), doctest::Contains("outlier slot 0"), Error);
}

TEST_CASE("inspect reports the header, configuration and sections") {
  const std::string f = bytes_of(small_cache(37));
  std::istringstream is(f);
  const CacheFileInfo info = inspect(is);
  CHECK(info.version == 1);
  CHECK(info.kind == CacheFileKind::compressed_kv);
  CHECK(info.type == "CompressedKV<keep_all,affine<4,float16>,affine<4,float16>>");
  CHECK(info.tokens() == 37);
  CHECK(info.blocks == 2);
  CHECK(info.residual == 5);
  CHECK(info.file_bytes == f.size());
  CHECK(info.sections.size() == 4);
  const std::string text = to_string(info);
  CHECK(text.find("tokens      37 per KV head") != std::string::npos);
  CHECK(text.find("section     DATA") != std::string::npos);
}

namespace {
/// `xxd`-style dump: offset, 16 bytes in hex, printable ASCII.
std::string hex_dump(const std::string& f) {
  std::string out;
  char line[128];
  for (std::size_t at = 0; at < f.size(); at += 16) {
    int n = std::snprintf(line, sizeof line, "%04zx:", at);
    std::string ascii;
    for (std::size_t i = at; i < at + 16; ++i) {
      if (i < f.size()) {
        const auto b = static_cast<unsigned char>(f[i]);
        n += std::snprintf(line + n, sizeof line - static_cast<std::size_t>(n), "%s%02x", (i - at) % 2 ? "" : " ", b);
        ascii += (b >= 0x20 && b < 0x7f) ? static_cast<char>(b) : '.';
      } else {
        n += std::snprintf(line + n, sizeof line - static_cast<std::size_t>(n), "%s  ", (i - at) % 2 ? "" : " ");
      }
    }
    out += std::string(line) + "  " + ascii + "\n";
  }
  return out;
}
}  // namespace

TEST_CASE("the cache file example of docs/format.md is exactly what save() writes") {
  // the worked example's 4 tokens (one block: keys Affine<4>, values Affine<2>, group 4) + one more
  // token in the fp16 residual
  const float k[20] = {0.0f, 1.0f, -2.0f, 0.5f, 0.5f, 1.0f, -1.0f, 0.5f, 1.0f, 1.0f, 0.0f, 0.25f, 1.5f, 1.0f, 1.0f, 0.0f,
                       0.25f, -0.5f, 1.0f, 2.0f};
  Affine<4> kq;
  kq.group = 4;
  Affine<2> vq;
  vq.group = 4;
  CompressedKV<KeepAll, Affine<4>, Affine<2>> c(Shape{1, 1, 4}, {}, kq, vq);
  c.compress(view(k, 1, 5, 4), view(k, 1, 5, 4), 5);
  const std::string dump = hex_dump(bytes_of(c));
  std::ifstream doc(std::string(QPKV_TEST_DATA) + "/../../docs/format.md");
  REQUIRE(doc);
  const std::string text((std::istreambuf_iterator<char>(doc)), std::istreambuf_iterator<char>());
  const std::string marker = "<!-- cache-file-hexdump: tests/test_serialize.cpp -->\n```\n";
  const auto at = text.find(marker);
  if (at == std::string::npos) {
    MESSAGE("docs/format.md lacks the hex dump; it should read:\n", dump);
    FAIL("marker not found in docs/format.md");
  }
  const auto end = text.find("```", at + marker.size());
  CHECK(text.substr(at + marker.size(), end - at - marker.size()) == dump);
}
