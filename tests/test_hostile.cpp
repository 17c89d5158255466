// Hostile inputs, class by class (issue "Reliability", item 2): each either works correctly --
// attention finite and equal to the float64 reference over the dequantized cache -- or throws a
// qpkv::Error naming the argument. Nothing crashes, reads out of bounds, or returns a silently
// wrong (non-finite) result. docs/reliability.md tabulates the outcomes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "qpkv/attention/dense.hpp"
#include "qpkv/cache/any_cache.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/io/npy.hpp"
#include "qpkv/io/safetensors.hpp"
#include "qpkv/select/select.hpp"

using namespace qpkv;
using testing::randn;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

/// Attention on the packed cache vs float64 attention over dequantize(): finite, and equal within
/// 1e-5 relative (absolute when the reference is ~0).
template <class Cache>
void check_attends_correctly(const Cache& c, const std::vector<float>& q, double bound = 1e-5) {
  const Shape s = c.shape();
  std::vector<float> out(static_cast<std::size_t>(s.q_heads * s.head_dim)), ref(out.size());
  c.attend(q.data(), out.data());
  for (float x : out) REQUIRE(std::isfinite(x));
  const DenseKV d = c.dequantize();
  dense_attention(d.key_view(), d.value_view(), q.data(), s.q_heads, ref.data(), c.softmax_scale());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < out.size(); ++i) {
    num += (double(out[i]) - ref[i]) * (double(out[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  CHECK(std::sqrt(num) <= bound * std::sqrt(den) + 1e-30);
}

/// Runs compress + attend on a few cache types; each must work correctly or throw qpkv::Error.
/// Returns how many of them threw.
int works_or_throws(const Shape& s, index_t N, const std::vector<float>& k, const std::vector<float>& v,
                    const std::vector<float>& q, index_t capacity) {
  int threw = 0;
  auto one = [&](auto cache, double bound = 1e-5) {
    try {
      const auto K = view(k.data(), s.kv_heads, N, s.head_dim), V = view(v.data(), s.kv_heads, N, s.head_dim);
      const auto Q = view(q.data(), s.q_heads, N, s.head_dim);
      cache.compress(K, V, Q, capacity);
      check_attends_correctly(cache, std::vector<float>(q.end() - s.q_heads * s.head_dim, q.end()), bound);
    } catch (const Error&) {
      ++threw;
    }
  };
  one(CompressedKV<KeepAll, Kivi<4>>(s));
  one(CompressedKV<SnapKV, Kivi<2, 2, 32, 32>>(s, SnapKV{std::min<index_t>(8, std::max<index_t>(capacity, 1))}));
  one(CompressedKV<H2O, Affine<3, float>, Fp16>(s, H2O{1}));
  one(CompressedKV<StreamingLLM, Affine<8>>(s, StreamingLLM{0}));
  // the integer kernels (AttendPrecision::fast: AVX-512 VNNI, AVX2) on the same inputs; head_dim
  // 16 leaves few channels per logit, hence test_attend_fast's 1e-3 for it
  const CacheOptions fast{0, 0.0f, AttendPrecision::fast};
  one(CompressedKV<KeepAll, Kivi<4>>(s, KeepAll{}, Kivi<4>{}, Kivi<4>{}, fast), 1e-3);
  one(CompressedKV<KeepAll, Kivi<2, 2, 16>>(s, KeepAll{}, Kivi<2, 2, 16>{}, Kivi<2, 2, 16>{}, fast), 1e-3);
  return threw;
}

std::vector<float> filled(std::size_t n, float x) { return std::vector<float>(n, x); }

}  // namespace

TEST_CASE("NaN and Inf in keys, values, queries, appended tokens and decode queries are errors") {
  const Shape s{2, 4, 16};
  const index_t N = 40;
  for (float bad : {kNaN, kInf, -kInf}) {
    CAPTURE(bad);
    for (int where = 0; where < 3; ++where) {
      auto k = randn(2 * N * 16, 1), v = randn(k.size(), 2), q = randn(4 * N * 16, 3);
      (where == 0 ? k : where == 1 ? v : q)[N * 16 - 3] = bad;  // in the observation window of head 0
      CompressedKV<SnapKV, Kivi<4>> c(s, SnapKV{8});
      CHECK_THROWS_WITH_AS(c.compress(view(k.data(), 2, N, 16), view(v.data(), 2, N, 16), view(q.data(), 4, N, 16), 16),
                           doctest::Contains("expected finite values"), Error);
      CHECK(c.tokens() == 0);
    }
    auto k = randn(2 * N * 16, 1), v = randn(k.size(), 2);
    CompressedKV<KeepAll, Kivi<4>> c(s);
    c.compress(view(k.data(), 2, N, 16), view(v.data(), 2, N, 16), N);
    auto kn = randn(32, 4), vn = randn(32, 5), q = randn(64, 6);
    kn[7] = bad;
    CHECK_THROWS_WITH_AS(c.append(kn.data(), vn.data()), doctest::Contains("k: expected finite"), Error);
    CHECK(c.tokens() == N);
    q[63] = bad;
    std::vector<float> out(64);
    CHECK_THROWS_WITH_AS(c.attend(q.data(), out.data()), doctest::Contains("q: expected finite"), Error);
    // half inputs with NaN/Inf bit patterns
    std::vector<half> kh(2 * N * 16), vh(kh.size());
    for (std::size_t i = 0; i < kh.size(); ++i) kh[i] = vh[i] = to_half(k[i]);
    kh[5].bits = 0x7c00;
    CHECK_THROWS_AS(c.compress(view(kh.data(), 2, N, 16), view(vh.data(), 2, N, 16), N), Error);
  }
}

TEST_CASE("denormal, tiny and constant tensors work: finite attention equal to the reference") {
  const Shape s{2, 4, 16};
  const index_t N = 70;
  const auto q = randn(4 * N * 16, 3);
  for (float scale : {1e-40f, 1e-30f, 1e-10f}) {  // 1e-40 is a float denormal; the others underflow fp16
    CAPTURE(scale);
    auto k = randn(2 * N * 16, 1), v = randn(k.size(), 2);
    for (auto& x : k) x *= scale;
    for (auto& x : v) x *= scale;
    CHECK(works_or_throws(s, N, k, v, q, 48) == 0);
  }
  for (float c : {0.0f, 1.0f, -3.5f, 60000.0f}) {
    CAPTURE(c);
    CHECK(works_or_throws(s, N, filled(2 * N * 16, c), filled(2 * N * 16, c), q, 48) == 0);
  }
  // mixed: a denormal next to a normal value in every group
  auto k = randn(2 * N * 16, 1);
  for (std::size_t i = 0; i < k.size(); i += 2) k[i] = 1e-41f;
  CHECK(works_or_throws(s, N, k, k, q, 48) == 0);
}

TEST_CASE("magnitudes up to 1e30: fp16 storage refuses what it cannot hold, float scales work") {
  const Shape s{1, 2, 8};
  const index_t N = 64;
  const auto q = randn(2 * N * 8, 3);
  for (float m : {1e4f, 1e5f, 1e10f, 1e20f, 1e30f}) {
    CAPTURE(m);
    auto k = randn(N * 8, 1), v = randn(N * 8, 2);
    for (auto& x : k) x *= m;
    for (auto& x : v) x *= m;
    // every cache type: works correctly or throws, never a non-finite or wrong result
    works_or_throws(s, N, k, v, q, 32);
    // fp16 residual, fp16 scales and Fp16 storage overflow above 65504: an error, not a silent inf
    if (m >= 1e5f) {
      CompressedKV<KeepAll, Fp16> f(s);
      CHECK_THROWS_AS(f.compress(view(k.data(), 1, N, 8), view(v.data(), 1, N, 8), N), Error);
      CompressedKV<KeepAll, Kivi<4>> h(s);
      CHECK_THROWS_WITH_AS(h.compress(view(k.data(), 1, N, 8), view(v.data(), 1, N, 8), N),
                           doctest::Contains("float scale storage"), Error);
    }
    // float scales hold the range; the logits are finite as long as |q.k| fits a float
    std::vector<float> small_q(q.end() - 16, q.end());
    for (auto& x : small_q) x /= m;
    CompressedKV<KeepAll, Affine<4, float>> c(s);
    c.compress(view(k.data(), 1, N, 8), view(v.data(), 1, N, 8), N);
    check_attends_correctly(c, small_q);
  }
}

TEST_CASE("N = 1, capacity 0 / 1 / N / > N, window >= N") {
  const Shape s{2, 4, 16};
  for (index_t N : {1, 2, 31, 32, 33}) {
    CAPTURE(N);
    const auto k = randn(static_cast<std::size_t>(2 * N * 16), 1), v = randn(k.size(), 2),
               q = randn(static_cast<std::size_t>(4 * N * 16), 3);
    const auto K = view(k.data(), 2, N, 16), V = view(v.data(), 2, N, 16), Q = view(q.data(), 4, N, 16);
    const std::vector<float> q1(q.end() - 64, q.end());
    for (index_t cap : {index_t{0}, index_t{1}, N, N + 5, index_t{1} << 40}) {
      CAPTURE(cap);
      CompressedKV<KeepAll, Kivi<4>> all(s);
      all.compress(K, V, cap);  // KeepAll ignores the capacity
      CHECK(all.tokens() == N);
      check_attends_correctly(all, q1);
      CompressedKV<StreamingLLM, Kivi<4>> st(s, StreamingLLM{0});
      if (cap == 0) {
        CHECK_THROWS_WITH_AS(st.compress(K, V, cap), doctest::Contains("capacity"), Error);
      } else {
        st.compress(K, V, cap);
        CHECK(st.tokens() == std::min(N, cap));
        check_attends_correctly(st, q1);
      }
      for (index_t window : {index_t{1}, N, N + 3}) {  // window >= N: only the window exists
        CAPTURE(window);
        CompressedKV<SnapKV, Kivi<2>> sn(s, SnapKV{window});
        CompressedKV<H2O, Kivi<2>> h2(s, H2O{window});
        CompressedKV<PyramidKV, Kivi<2>> py(s, PyramidKV{window});
        if (cap < window) {
          CHECK_THROWS_WITH_AS(sn.compress(K, V, Q, cap), doctest::Contains("capacity"), Error);
          CHECK_THROWS_WITH_AS(h2.compress(K, V, Q, cap), doctest::Contains("capacity"), Error);
          CHECK_THROWS_WITH_AS(py.compress(K, V, Q, cap), doctest::Contains("capacity"), Error);
          continue;
        }
        sn.compress(K, V, Q, cap);
        h2.compress(K, V, Q, cap);
        py.compress(K, V, Q, cap);
        CHECK(sn.tokens() == std::min(N, cap));
        CHECK(h2.tokens() == std::min(N, cap));
        check_attends_correctly(sn, q1);
        check_attends_correctly(h2, q1);
        check_attends_correctly(py, q1);
      }
    }
  }
  CompressedKV<KeepAll, Kivi<4>> c(s);
  std::vector<float> out(64), q(64, 0.5f);
  CHECK_THROWS_WITH_AS(c.attend(q.data(), out.data()), doctest::Contains("empty cache"), Error);
  const auto k = randn(32, 1);
  CHECK_THROWS_WITH_AS(c.compress(view(k.data(), 2, 1, 16), view(k.data(), 2, 1, 16), -1), doctest::Contains("capacity"), Error);
  c.append(k.data(), k.data());  // appending to a never-compressed cache starts it
  CHECK(c.tokens() == 1);
  check_attends_correctly(c, q);
}

TEST_CASE("head_dim not a multiple of the group, odd head_dim, group larger than head_dim") {
  for (index_t D : {1, 3, 7, 40, 100, 130}) {
    for (index_t group : {1, 8, 32, 64, 128}) {
      CAPTURE(D);
      CAPTURE(group);
      const Shape s{2, 4, D};
      const index_t N = 2 * group + 3;
      const auto k = randn(static_cast<std::size_t>(2 * N * D), 1), v = randn(k.size(), 2);
      Affine<3> q3;
      q3.group = group;
      CompressedKV<KeepAll, Affine<3>> c(s, {}, q3, q3);
      c.compress(view(k.data(), 2, N, D), view(v.data(), 2, N, D), N);
      CHECK(c.tokens() == N);
      check_attends_correctly(c, randn(static_cast<std::size_t>(4 * D), 3));
    }
  }
  Affine<4> bad;
  bad.group = 0;
  CHECK_THROWS_WITH_AS((CompressedKV<KeepAll, Affine<4>>(Shape{1, 1, 8}, {}, bad, bad)), doctest::Contains("group"), Error);
  bad.group = 5000;
  CHECK_THROWS_WITH_AS((CompressedKV<KeepAll, Affine<4>>(Shape{1, 1, 8}, {}, bad, bad)), doctest::Contains("group"), Error);
}

TEST_CASE("GQA ratios 1 to 8 work; q_heads not a multiple of kv_heads and empty shapes are errors") {
  for (index_t r = 1; r <= 8; ++r) {
    CAPTURE(r);
    const Shape s{3, 3 * r, 16};
    const index_t N = 50;
    const auto k = randn(static_cast<std::size_t>(3 * N * 16), 1), v = randn(k.size(), 2),
               q = randn(static_cast<std::size_t>(3 * r * N * 16), 3);
    CHECK(works_or_throws(s, N, k, v, q, 40) == 0);
  }
  CHECK_THROWS_WITH_AS((CompressedKV<KeepAll, Kivi<4>>(Shape{3, 4, 16})), doctest::Contains("multiple of kv_heads"), Error);
  CHECK_THROWS_AS((CompressedKV<KeepAll, Kivi<4>>(Shape{0, 4, 16})), Error);
  CHECK_THROWS_AS((CompressedKV<KeepAll, Kivi<4>>(Shape{1, 1, 0})), Error);
  CHECK_THROWS_AS((CompressedKV<KeepAll, Kivi<4>>(Shape{-2, -4, 16})), Error);
  CHECK_THROWS_WITH_AS(AnyCompressedKV(Shape{2, 3, 8}, KVConfig::parse("snapkv,kivi4")), doctest::Contains("kv_heads"), Error);
}

TEST_CASE("views: wrong geometry, bad strides and null pointers are errors; overlapping and strided views work") {
  const Shape s{2, 4, 16};
  const index_t N = 40;
  auto k = randn(2 * N * 16, 1), v = randn(k.size(), 2), q = randn(4 * N * 16, 3);
  CompressedKV<SnapKV, Kivi<4>> c(s, SnapKV{8});
  const auto K = view(k.data(), 2, N, 16), V = view(v.data(), 2, N, 16), Q = view(q.data(), 4, N, 16);
  CHECK_THROWS_WITH_AS(c.compress(view(k.data(), 1, N, 16), V, Q, 16), doctest::Contains("keys.heads"), Error);
  CHECK_THROWS_WITH_AS(c.compress(K, view(v.data(), 2, N - 1, 16), Q, 16), doctest::Contains("values.tokens"), Error);
  CHECK_THROWS_WITH_AS(c.compress(K, V, view(q.data(), 4, 4, 16), 16), doctest::Contains("queries.tokens"), Error);
  CHECK_THROWS_WITH_AS(c.compress(K, V, view(q.data(), 4, N, 8), 16), doctest::Contains("queries.dim"), Error);
  CHECK_THROWS_WITH_AS(c.compress(TensorView<float>{nullptr, 2, N, 16, N * 16, 16}, V, Q, 16), doctest::Contains("keys.data"), Error);
  CHECK_THROWS_WITH_AS(c.compress(TensorView<float>{k.data(), 2, N, 16, N * 16, 8}, V, Q, 16), doctest::Contains("token_stride"), Error);
  CHECK_THROWS_WITH_AS(c.compress(TensorView<float>{k.data(), 2, N, 16, -16, 16}, V, Q, 16), doctest::Contains("head_stride"), Error);
  CHECK(c.tokens() == 0);
  std::vector<float> out(64);
  CHECK_THROWS_AS(c.append(static_cast<const float*>(nullptr), v.data()), Error);
  c.compress(K, V, Q, 16);
  CHECK_THROWS_WITH_AS(c.attend(static_cast<const float*>(nullptr), out.data()), doctest::Contains("q"), Error);
  CHECK_THROWS_WITH_AS(c.attend(q.data(), nullptr), doctest::Contains("out"), Error);

  SUBCASE("keys and values the same memory; out aliasing q gives the same result") {
    CompressedKV<KeepAll, Kivi<4>> a(s), b(s);
    a.compress(K, K, N);
    b.compress(K, view(std::vector<float>(k).data(), 2, N, 16), N);
    std::vector<float> qa(q.end() - 64, q.end()), oa(64), ob(64);
    a.attend(qa.data(), oa.data());
    b.attend(qa.data(), ob.data());
    CHECK(oa == ob);
    a.attend(qa.data(), qa.data());  // in place
    CHECK(qa == oa);
    a.append(k.data(), k.data());  // k and v the same pointer
    CHECK(a.tokens() == N + 1);
  }
  SUBCASE("an interleaved (token, head, dim) layout and a layer of a (layer, head, token, dim) array") {
    std::vector<float> inter(static_cast<std::size_t>(N * 2 * 16));
    for (index_t h = 0; h < 2; ++h)
      for (index_t t = 0; t < N; ++t)
        for (index_t d = 0; d < 16; ++d) inter[(t * 2 + h) * 16 + d] = k[(h * N + t) * 16 + d];
    CompressedKV<KeepAll, Kivi<4>> a(s), b(s);
    a.compress(K, K, N);
    b.compress(TensorView<float>{inter.data(), 2, N, 16, 16, 32}, TensorView<float>{inter.data(), 2, N, 16, 16, 32}, N);
    CHECK(a.dequantize().keys == b.dequantize().keys);
    // head_stride 0 broadcasts one head's memory to every head
    CompressedKV<KeepAll, Kivi<4>> z(s);
    z.compress(TensorView<float>{k.data(), 2, N, 16, 0, 16}, TensorView<float>{k.data(), 2, N, 16, 0, 16}, N);
    const DenseKV d = z.dequantize();
    CHECK(std::equal(d.keys.begin(), d.keys.begin() + N * 16, d.keys.begin() + N * 16));
  }
  SUBCASE("4-byte aligned but not 16/64-byte aligned inputs") {
    std::vector<float> buf(k.size() + 3);
    for (int off = 1; off <= 3; ++off) {
      std::copy(k.begin(), k.end(), buf.begin() + off);
      CompressedKV<KeepAll, Kivi<4>> a(s), b(s);
      a.compress(K, K, N);
      b.compress(view(buf.data() + off, 2, N, 16), view(buf.data() + off, 2, N, 16), N);
      CHECK(a.dequantize().keys == b.dequantize().keys);
    }
    std::vector<half> hb(k.size() + 1);
    for (std::size_t i = 0; i < k.size(); ++i) hb[i + 1] = to_half(k[i]);
    CompressedKV<KeepAll, Kivi<4>> a(s);
    a.compress(view(hb.data() + 1, 2, N, 16), view(hb.data() + 1, 2, N, 16), N);  // 2-byte aligned halves
    CHECK(a.tokens() == N);
  }
  SUBCASE("misaligned element pointers are an error, not undefined behaviour") {
    std::vector<unsigned char> raw(k.size() * sizeof(float) + 8);
    const auto* mis = reinterpret_cast<const float*>(raw.data() + 1);
    CompressedKV<KeepAll, Kivi<4>> a(s);
    CHECK_THROWS_WITH_AS(a.compress(TensorView<float>{mis, 2, N, 16, N * 16, 16}, TensorView<float>{mis, 2, N, 16, N * 16, 16}, N),
                         doctest::Contains("aligned"), Error);
    a.compress(K, V, N);
    CHECK_THROWS_WITH_AS(a.append(mis, v.data()), doctest::Contains("aligned"), Error);
    CHECK_THROWS_WITH_AS(a.attend(mis, out.data()), doctest::Contains("aligned"), Error);
    CHECK_THROWS_WITH_AS(a.attend(q.data(), reinterpret_cast<float*>(raw.data() + 2)), doctest::Contains("aligned"), Error);
  }
}

TEST_CASE("selections made elsewhere: unsorted, duplicate, out of range or ragged are errors") {
  const Shape s{2, 2, 8};
  const index_t N = 20;
  const auto k = randn(2 * N * 8, 1);
  const auto K = view(k.data(), 2, N, 8);
  CompressedKV<KeepAll, Kivi<4>> c(s);
  auto sel = [](std::vector<index_t> a, std::vector<index_t> b) { return Selection{{std::move(a), std::move(b)}}; };
  CHECK_THROWS_WITH_AS(c.compress(K, K, sel({0, 2, 1}, {0, 1, 2})), doctest::Contains("ascending"), Error);
  CHECK_THROWS_WITH_AS(c.compress(K, K, sel({0, 1, 1}, {0, 1, 2})), doctest::Contains("ascending"), Error);
  CHECK_THROWS_WITH_AS(c.compress(K, K, sel({0, 1, 20}, {0, 1, 2})), doctest::Contains("selection position"), Error);
  CHECK_THROWS_WITH_AS(c.compress(K, K, sel({-1, 1, 2}, {0, 1, 2})), doctest::Contains("selection position"), Error);
  CHECK_THROWS_WITH_AS(c.compress(K, K, sel({0, 1}, {0, 1, 2})), doctest::Contains("same count"), Error);
  CHECK_THROWS_WITH_AS(c.compress(K, K, Selection{{{0, 1}}}), doctest::Contains("selection.heads"), Error);
  CHECK(c.tokens() == 0);
  c.compress(K, K, sel({}, {}));  // nothing kept: an empty cache, attend then refuses
  CHECK(c.tokens() == 0);
}

TEST_CASE("layer info, selector parameters and run-time configs out of range are errors") {
  const Shape s{2, 4, 16};
  const index_t N = 64;
  const auto k = randn(2 * N * 16, 1), q = randn(4 * N * 16, 3);
  const auto K = view(k.data(), 2, N, 16), Q = view(q.data(), 4, N, 16);
  CompressedKV<PyramidKV, Kivi<4>> p(s, PyramidKV{8});
  CHECK_THROWS_WITH_AS(p.compress(K, K, Q, 32, LayerInfo{5, 4}), doctest::Contains("layer.layer"), Error);
  CHECK_THROWS_WITH_AS(p.compress(K, K, Q, 32, LayerInfo{0, 0}), doctest::Contains("layer.layers"), Error);
  CompressedKV<SnapKV, Kivi<4>> sk(s, SnapKV{8, 4});
  CHECK_THROWS_WITH_AS(sk.compress(K, K, Q, 32), doctest::Contains("kernel"), Error);
  CompressedKV<SnapKV, Kivi<4>> s0(s, SnapKV{0});
  CHECK_THROWS_WITH_AS(s0.compress(K, K, Q, 32), doctest::Contains("window"), Error);
  for (const char* text : {"", "snapkv,kivi5", "snapkv,kivi4,group=0", "snapkv,kivi4,group=-3", "h2o,window=0",
                           "snapkv,kivi4,outliers=2", "snapkv,kivi4,outliers=nan", "snapkv,kivi4,group=99999999999999999999",
                           "snapkv,kivi4,residual=-1", "pyramidkv,beta=0", "snapkv,kernel=4", "keep_all,,", "snapkv,kivi4,group"}) {
    CAPTURE(text);
    CHECK_THROWS_AS((void)KVConfig::parse(text), Error);
  }
}

TEST_CASE("the .npy and .safetensors readers reject malformed files with an Error") {
  auto npy = [](const std::string& header, std::size_t data_bytes) {
    std::string h = header;
    const std::size_t total = 10 + h.size() + 1;
    h.append((64 - total % 64) % 64, ' ');
    h += '\n';
    std::string f = "\x93NUMPY";
    f += '\x01';
    f += '\x00';
    f += static_cast<char>(h.size() & 0xff);
    f += static_cast<char>(h.size() >> 8);
    return f + h + std::string(data_bytes, '\0');
  };
  auto parse = [](const std::string& f) {
    return io::parse_npy(reinterpret_cast<const unsigned char*>(f.data()), f.size());
  };
  CHECK(parse(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }", 24)).size() == 6);
  for (const std::string& f : {npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4611686018427387904,), }", 24),
                               npy("{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1099511627776), }", 24),
                               npy("{'descr': '<f4', 'fortran_order': False, 'shape': (999999999999999999999,), }", 24),
                               npy("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }", 24),
                               npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8),
                               npy("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", 16),
                               npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", 8),
                               npy("{'descr': '<f4', 'shape': (2,), }", 8), npy("{'descr': '", 8),
                               std::string("\x93NUMPY\x01\x00\xff\xff", 10), std::string("\x93NUMPY\x09\x00\x00\x00", 10),
                               std::string("\x93NUM")}) {
    CAPTURE(f);
    CHECK_THROWS_AS(parse(f), Error);
  }
  auto st = [](const std::string& json, std::size_t data_bytes) {
    std::string f(8, '\0');
    const std::uint64_t n = json.size();
    std::memcpy(f.data(), &n, 8);
    return f + json + std::string(data_bytes, '\0');
  };
  auto parse_st = [](const std::string& f) {
    return io::Safetensors::parse(reinterpret_cast<const unsigned char*>(f.data()), f.size(), "test");
  };
  CHECK(parse_st(st(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8)).tensor("a").size() == 2);
  for (const std::string& f :
       {st(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,9]}})", 8),
        st(R"({"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})", 8),
        st(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
        st(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8),
        st(R"({"a":{"dtype":"X","shape":[2],"data_offsets":[0,8]}})", 8),
        st(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", 8),
        st(std::string(100000, '['), 0), st(R"({"a":)", 0), std::string("\xff\xff\xff\xff\xff\xff\xff\xff{}", 10),
        std::string(4, '\0')}) {
    CAPTURE(f.substr(0, 80));
    CHECK_THROWS_AS(parse_st(f), Error);
  }
}

TEST_CASE("a compress or append that throws leaves the cache consistent and usable") {
  const Shape s{2, 4, 16};
  auto consistent = [](const auto& c) {
    for (index_t h = 0; h < c.shape().kv_heads; ++h) REQUIRE(static_cast<index_t>(c.positions(h).size()) == c.tokens());
    REQUIRE(c.bytes() >= c.layout().blocks_bytes());
    REQUIRE(c.state().blocks <= c.layout().capacity_blocks);
    REQUIRE(c.state().residual <= c.layout().residual_capacity);
  };
  const std::vector<float> q = randn(64, 9);
  SUBCASE("compress failing in the fp16 residual, after a successful compress") {
    const index_t N = 200;
    auto k = randn(2 * N * 16, 1), v = randn(k.size(), 2);
    CompressedKV<KeepAll, Kivi<4>> c(s);
    c.compress(view(k.data(), 2, N, 16), view(v.data(), 2, N, 16), N);  // 6 blocks of 32 + 8 residual
    const index_t M = 70;  // 2 blocks + 6 residual tokens; the last one does not fit fp16
    auto k2 = randn(2 * M * 16, 3);
    k2[(M - 1) * 16] = 1e6f;
    CHECK_THROWS_WITH_AS(c.compress(view(k2.data(), 2, M, 16), view(k2.data(), 2, M, 16), M), doctest::Contains("65504"), Error);
    consistent(c);
    if (c.tokens() > 0) check_attends_correctly(c, q);
    c.compress(view(k.data(), 2, N, 16), view(v.data(), 2, N, 16), N);  // and it can be used again
    check_attends_correctly(c, q);
  }
  SUBCASE("a residual flush whose group range does not fit fp16 scales (1-bit keys)") {
    CompressedKV<KeepAll, Kivi<1>> c(s);
    const index_t N = 40;
    auto k = randn(2 * N * 16, 1);
    c.compress(view(k.data(), 2, N, 16), view(k.data(), 2, N, 16), N);  // 1 block + 8 residual
    index_t failures = 0;
    for (int i = 0; i < 60; ++i) {
      auto kn = randn(32, 100 + static_cast<unsigned>(i));
      kn[0] = (i % 2 ? 60000.0f : -60000.0f);  // channel 0 spans 120000: scale 120000 > 65504
      try {
        c.append(kn.data(), kn.data());
      } catch (const Error&) {
        ++failures;
      }
      consistent(c);
      check_attends_correctly(c, q);
    }
    CHECK(failures > 0);
  }
}

TEST_CASE("attention whose logits or output overflow float32 is an error, not a silently wrong output") {
  const Shape s{1, 1, 8};
  const index_t N = 64;  // two whole blocks of 32: no fp16 residual
  std::vector<float> k(8 * N), v(8 * N), q(8, 1e30f), out(8);
  for (std::size_t i = 0; i < k.size(); ++i) {
    k[i] = static_cast<float>(i % 7) * 1e30f;
    v[i] = static_cast<float>(i % 5) * 1e30f;
  }
  CompressedKV<KeepAll, Affine<4, float>> c(s);
  c.compress(view(k.data(), 1, N, 8), view(v.data(), 1, N, 8), N);
  CHECK_THROWS_WITH_AS(c.attend(q.data(), out.data()), doctest::Contains("finite attention logits"), Error);
  for (auto& x : v) x *= 5e7f;  // values near float max (2e38): their weighted sum overflows
  CompressedKV<KeepAll, Affine<4, float>> d(s);
  d.compress(view(k.data(), 1, N, 8), view(v.data(), 1, N, 8), N);
  std::fill(q.begin(), q.end(), 1e-30f);
  try {
    d.attend(q.data(), out.data());
    for (float x : out) CHECK(std::isfinite(x));
  } catch (const Error& e) {
    CHECK(std::string(e.what()).find("overflow") != std::string::npos);
  }
}
