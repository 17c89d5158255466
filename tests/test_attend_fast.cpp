// Decode attention at the sizes the CPU kernels are tuned for (head_dim 128, GQA 4, several
// split-K chunks): AttendPrecision::fast within the performance issue's 5e-4 bound and exact
// within 1e-5 of float64 attention over the dequantized cache; results independent of the thread
// count. Built twice: portable (default flags) and with -march=native (test_attend_fast_native),
// where the AVX-512 / VNNI kernels run.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string_view>
#include <vector>

#include "test_util.hpp"
#include "qpkv/attention/dense.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/select/keep_all.hpp"

#if defined(_OPENMP)
#include <omp.h>
#endif

using namespace qpkv;
using testing::randn;

namespace {

template <class Scheme>
void check(index_t N, AttendPrecision precision, double bound, index_t appends = 0, index_t q_heads = 8, index_t D = 128) {
  const Shape s{2, q_heads, D};
  auto k = randn(static_cast<std::size_t>(s.kv_heads * N * s.head_dim), 21);
  auto v = randn(k.size(), 22);
  for (index_t h = 0; h < s.kv_heads; ++h)  // outlier key channels stretch the folded query's range
    for (index_t t = 0; t < N; ++t) {
      k[(h * N + t) * s.head_dim + 3] *= 10.0f;
      k[(h * N + t) * s.head_dim + 77 % D] += 4.0f;
    }
  CompressedKV<KeepAll, Scheme> cache(s, KeepAll{}, Scheme{}, Scheme{}, CacheOptions{0, 0.0f, precision});
  cache.compress(view(k.data(), s.kv_heads, N, s.head_dim), view(v.data(), s.kv_heads, N, s.head_dim), N);
  for (index_t i = 0; i < appends; ++i) {
    auto kn = randn(static_cast<std::size_t>(s.kv_heads * s.head_dim), 300 + static_cast<unsigned>(i));
    cache.append(kn.data(), kn.data());
  }
  for (unsigned seed : {1u, 2u, 3u}) {
    auto q = randn(static_cast<std::size_t>(s.q_heads * s.head_dim), seed);
    std::vector<float> out(q.size()), ref(q.size());
    cache.attend(q.data(), out.data());
    const DenseKV d = cache.dequantize();
    dense_attention(d.key_view(), d.value_view(), q.data(), s.q_heads, ref.data(), cache.softmax_scale());
    CAPTURE(seed);
    CHECK(relative_l2(out, ref) <= bound);
#if defined(_OPENMP)
    std::vector<float> one(q.size());
    const int saved = omp_get_max_threads();
    omp_set_num_threads(1);
    cache.attend(q.data(), one.data());
    omp_set_num_threads(saved);
    CHECK(one == out);
#endif
  }
}

}  // namespace

TEST_CASE("attend at head_dim 128 over several split-K chunks: exact <= 1e-5, fast <= 5e-4, any thread count") {
  for (auto p : {AttendPrecision::exact, AttendPrecision::fast}) {
    const double bound = p == AttendPrecision::exact ? 1e-5 : 5e-4;
    CAPTURE(static_cast<int>(p));
    SUBCASE("KIVI 4-bit, group 32") { check<Kivi<4>>(5000, p, bound, 40); }
    SUBCASE("KIVI 2-bit, group 32") { check<Kivi<2>>(4500, p, bound, 3); }
    SUBCASE("KIVI 8-bit, group 64") { check<Kivi<8, 8, 64>>(4200, p, bound); }
    SUBCASE("KIVI 4-bit keys, 2-bit values, group 64") { check<Kivi<4, 2, 64>>(3000, p, bound, 70); }
    SUBCASE("fp16") { check<Fp16>(4100, p, bound); }
    // value groups of 128 and 16 channels (one group per row; two groups per 32-channel slab), GQA 3
    // and 1 (query tiles of 2 and 1), 8-bit values with 128-token blocks (the int32 headroom limit)
    SUBCASE("KIVI 4-bit, group 128, GQA 3") { check<Kivi<4, 4, 128>>(2600, p, bound, 5, 6); }
    SUBCASE("KIVI 4-bit, group 16, GQA 1") { check<Kivi<4, 4, 16>>(2100, p, bound, 17, 2); }
    SUBCASE("KIVI 8-bit keys, 4-bit values, group 128") { check<Kivi<8, 4, 128>>(2300, p, bound); }
    SUBCASE("KIVI 8-bit, group 128, GQA 2") { check<Kivi<8, 8, 128>>(2200, p, bound, 0, 4); }
    // a block's value weights in an odd number of 16-lane vectors (one; three): the unpaired one.
    // With so few channels per logit the fast path's rounding shows more (6.3e-4 at head_dim 48).
    const double small_d = std::max(bound, 1e-3);
    SUBCASE("KIVI 8-bit, group 16, head_dim 16") { check<Kivi<8, 8, 16>>(2100, p, small_d, 3, 8, 16); }
    SUBCASE("KIVI 8-bit, group 48, head_dim 48") { check<Kivi<8, 8, 48>>(2100, p, small_d, 3, 8, 48); }
    // shapes only the AVX2 kernels take (8-token key tiles, 8-channel fp16 slices): key group 8
    // with a partial 8x8 transpose (6 code dwords per row), GQA 3; fp16 rows of 40 channels
    SUBCASE("KIVI 4-bit, group 8, head_dim 48, GQA 3") { check<Kivi<4, 4, 8>>(1100, p, small_d, 5, 6, 48); }
    SUBCASE("fp16, head_dim 40") { check<Fp16>(700, p, bound, 3, 8, 40); }
    // AVX2 fast path: 16-token key tiles with a partial transpose (6 code dwords per row), three
    // value groups per row (no integer values: the exact value kernel with integer keys)
    SUBCASE("KIVI 4-bit, group 16, head_dim 48") { check<Kivi<4, 4, 16>>(900, p, small_d, 9, 8, 48); }
    SUBCASE("KIVI 8-bit, head_dim 512") { check<Kivi<8>>(600, p, bound, 5, 8, 512); }
  }
}

TEST_CASE("QPKV_CPU=avx2 runs the AVX2 kernels where the build has them and the CPU can") {
  // guards the *_cpu_avx2 ctest entries against a silent fallback to the portable kernels
  const char* cap = std::getenv("QPKV_CPU");
  if (cap == nullptr || std::string_view(cap) != "avx2") return;
#if defined(QPKV_CPU_AVX2_KERNELS) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    CHECK(std::string_view(cpu::simd_name()).substr(0, 4) == "avx2");
#endif
}

#if defined(QPKV_EMULATE_AVX512)
TEST_CASE("the emulated AVX-512 build runs the AVX-512 kernels") {
  // guards the native binary on AVX2-only machines (tests/CMakeLists.txt) against silently
  // running the AVX2 or portable kernels instead of the emulated AVX-512 ones
  const char* cap = std::getenv("QPKV_CPU");
  const std::string_view want = cap == nullptr || *cap == '\0' ? "avx512-vnni" : cap;
  CHECK(std::string_view(cpu::simd_name()) == want);
}
#endif

TEST_CASE("AttendPrecision::fast runs integer products exactly where the kernels in use have them") {
  // AVX-512 VNNI and AVX2 kernels: fast differs from exact (integer q.k and p.v), still within
  // 5e-4; AVX-512 without VNNI and the portable kernels: fast is exact, bit for bit. Guards the
  // *_cpu_* ctest entries against a fast path that silently runs the exact kernel, or the reverse.
  const std::string_view kind = cpu::simd_name();
  const bool integer = kind.substr(0, 11) == "avx512-vnni" || kind.substr(0, 4) == "avx2";
  CAPTURE(kind);
  const Shape s{2, 8, 128};
  const index_t N = 700;
  auto k = randn(static_cast<std::size_t>(s.kv_heads * N * s.head_dim), 31);
  auto v = randn(k.size(), 32);
  auto q = randn(static_cast<std::size_t>(s.q_heads * s.head_dim), 33);
  std::vector<float> out[2];
  for (auto p : {AttendPrecision::exact, AttendPrecision::fast}) {
    CompressedKV<KeepAll, Kivi<4>> cache(s, KeepAll{}, Kivi<4>{}, Kivi<4>{}, CacheOptions{0, 0.0f, p});
    cache.compress(view(k.data(), s.kv_heads, N, s.head_dim), view(v.data(), s.kv_heads, N, s.head_dim), N);
    auto& o = out[p == AttendPrecision::fast ? 1 : 0];
    o.resize(q.size());
    cache.attend(q.data(), o.data());
  }
  if (integer) {
    CHECK(out[1] != out[0]);
    CHECK(relative_l2(out[1], out[0]) <= 5e-4);
  } else {
    CHECK(out[1] == out[0]);
  }
}

TEST_CASE("fast attention with 8-bit keys at head_dim 512 where every product is at its largest") {
  // Keys alternating 0 / 1 in every channel (code 0 / 255) and an all-equal query: every folded
  // query channel rounds to the integer maximum, so a token of ones sums D x 255 x that maximum,
  // more than an int32 holds for 32767 (4.3e9): the AVX2 integer query's range shrinks there
  // (KeyFold::qmax); the AVX-512 path sums its two 8-bit parts separately.
  const Shape s{1, 4, 512};
  const index_t N = 256, D = 512;
  std::vector<float> k(static_cast<std::size_t>(N * D)), v = randn(k.size(), 41);
  for (index_t t = 0; t < N; ++t)
    for (index_t c = 0; c < D; ++c) k[static_cast<std::size_t>(t * D + c)] = static_cast<float>((t / 3) % 2);
  std::vector<float> q(static_cast<std::size_t>(4 * D), 0.02f), out(q.size()), ref(q.size());
  for (auto p : {AttendPrecision::exact, AttendPrecision::fast}) {
    CAPTURE(static_cast<int>(p));
    CompressedKV<KeepAll, Kivi<8>> cache(s, KeepAll{}, Kivi<8>{}, Kivi<8>{}, CacheOptions{0, 0.0f, p});
    cache.compress(view(k.data(), 1, N, D), view(v.data(), 1, N, D), N);
    cache.attend(q.data(), out.data());
    const DenseKV d = cache.dequantize();
    dense_attention(d.key_view(), d.value_view(), q.data(), s.q_heads, ref.data(), cache.softmax_scale());
    CHECK(relative_l2(out, ref) <= (p == AttendPrecision::exact ? 1e-5 : 5e-4));
  }
}

namespace {

/// Attention over one KV head with small queries (weights within a few percent of each other):
/// the output is close to the mean of the values, offset + about 1 / sqrt(N) of their spread. A
/// kernel that sums p s c over uncentred codes and p m apart loses digits to their cancellation
/// at offset 0 (the exact AVX-512 value kernel with uncentred codes: 2.4e-6 for KIVI-8, 4.4e-6
/// for KIVI-2 group 128; centred 1.0e-6 and 1.3e-6), hence the tighter exact bound there.
template <class Scheme>
void check_mean(index_t N, float offset, AttendPrecision p) {
  const Shape s{1, 4, 128};
  auto k = randn(static_cast<std::size_t>(N * 128), 51);
  auto v = randn(k.size(), 52);
  for (auto& x : v) x += offset;
  CompressedKV<KeepAll, Scheme> cache(s, KeepAll{}, Scheme{}, Scheme{}, CacheOptions{0, 0.0f, p});
  cache.compress(view(k.data(), 1, N, 128), view(v.data(), 1, N, 128), N);
  std::vector<float> q = randn(4 * 128, 53, 0.3f), out(q.size()), ref(q.size());
  cache.attend(q.data(), out.data());
  const DenseKV d = cache.dequantize();
  dense_attention(d.key_view(), d.value_view(), q.data(), s.q_heads, ref.data(), cache.softmax_scale());
  CHECK(relative_l2(out, ref) <= (p == AttendPrecision::exact ? (offset == 0.0f ? 2e-6 : 1e-5) : 5e-4));
}

}  // namespace

TEST_CASE("attend with nearly equal weights: the mean of zero-mean and of offset values") {
  // the exact AVX-512 value kernel folds each token's scale into its weight and adds the mins as
  // one constant per block (value_block_folded) where a 16-byte code slice lies in one value
  // group (KIVI-4 g32, KIVI-8, KIVI-2 g128), and dequantizes per lane elsewhere (KIVI-2 g32, KIVI-4 g16)
  for (auto p : {AttendPrecision::exact, AttendPrecision::fast})
    for (const float offset : {0.0f, 8.0f}) {
      CAPTURE(static_cast<int>(p));
      CAPTURE(offset);
      SUBCASE("KIVI 4-bit, group 32") { check_mean<Kivi<4>>(4096 + 32, offset, p); }
      SUBCASE("KIVI 8-bit, group 64") { check_mean<Kivi<8, 8, 64>>(4096, offset, p); }
      SUBCASE("KIVI 2-bit, group 128") { check_mean<Kivi<2, 2, 128>>(4096, offset, p); }
      SUBCASE("KIVI 2-bit, group 32") { check_mean<Kivi<2>>(4096, offset, p); }
      SUBCASE("KIVI 4-bit, group 16") { check_mean<Kivi<4, 4, 16>>(4096, offset, p); }
    }
}

TEST_CASE("attend when every logit is far below zero and the token count is not a multiple of 16") {
  // all logits about -141: a softmax max taken over lanes past the last token (read as 0) would
  // make every weight underflow to 0
  for (const index_t N : {5, 21, 37}) {
    CAPTURE(N);
    const Shape s{1, 4, 128};
    std::vector<float> k(static_cast<std::size_t>(N * 128), 0.0f), v(k.size());
    for (index_t t = 0; t < N; ++t) {
      k[static_cast<std::size_t>(t * 128)] = 40.0f + static_cast<float>(t % 3);
      for (index_t c = 0; c < 128; ++c) v[static_cast<std::size_t>(t * 128 + c)] = static_cast<float>((t * 7 + c) % 11) - 5.0f;
    }
    std::vector<float> q(4 * 128, 0.0f);
    for (index_t i = 0; i < 4; ++i) q[static_cast<std::size_t>(i * 128)] = -40.0f - static_cast<float>(i);
    CompressedKV<KeepAll, Fp16> cache(s);
    cache.compress(view(k.data(), 1, N, 128), view(v.data(), 1, N, 128), N);
    std::vector<float> out(q.size()), ref(q.size());
    cache.attend(q.data(), out.data());
    const DenseKV d = cache.dequantize();
    dense_attention(d.key_view(), d.value_view(), q.data(), s.q_heads, ref.data(), cache.softmax_scale());
    CHECK(relative_l2(out, ref) <= 1e-5);
  }
}

TEST_CASE("the portable kernels' exp, sums and dot products") {
  using cpu::detail::exp_neg;
  // within 2 ulp of std::exp on [-87, 0], exactly 0 below -87.3, NaN stays NaN, no UB on NaN/inf
  float worst = 0.0f;
  for (float x = -87.0f; x <= 0.0f; x += 0.0137f) {
    const float e = std::exp(x);
    worst = std::max(worst, std::abs(exp_neg(x) - e) / e);
  }
  CHECK(worst < 2.5e-7f);
  CHECK(exp_neg(0.0f) == 1.0f);
  CHECK(exp_neg(-100.0f) == 0.0f);
  CHECK(exp_neg(-std::numeric_limits<float>::infinity()) == 0.0f);
  CHECK(std::isnan(exp_neg(std::numeric_limits<float>::quiet_NaN())));
  CHECK(std::isfinite(exp_neg(std::numeric_limits<float>::infinity())));  // clamped, never converted
  // 16-lane partial sums: same value as a float64 sum within float rounding, any length
  for (const index_t n : {0, 1, 15, 16, 17, 100, 128, 1000}) {
    std::vector<float> a = randn(static_cast<std::size_t>(n), 3), b = randn(static_cast<std::size_t>(n), 4);
    double d = 0.0, s = 0.0, m = -1e30;
    for (index_t i = 0; i < n; ++i) {
      d += static_cast<double>(a[i]) * b[i];
      s += a[i];
      m = std::max(m, static_cast<double>(a[i]));
    }
    CAPTURE(n);
    CHECK(cpu::detail::dot(a.data(), b.data(), n) == doctest::Approx(d).epsilon(1e-5).scale(1.0));
    CHECK(cpu::detail::sum(a.data(), n) == doctest::Approx(s).epsilon(1e-5).scale(1.0));
    if (n > 0) CHECK(cpu::detail::max(a.data(), n) == static_cast<float>(m));
  }
}
