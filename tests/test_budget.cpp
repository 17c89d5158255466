// Budget planner: capacity_for() is the largest fitting count (checked exhaustively up to a proven
// horizon), planned bytes equal CompressedKV::bytes() of real caches, the hand-computed Llama-3-8B
// case, the nominal rule vs exact accounting, LayerQuant and PyramidKV model plans, error paths.
#include <doctest/doctest.h>

#include <algorithm>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "qpkv/cache/budget.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/select/select.hpp"

using namespace qpkv;

using testing::randn;

namespace {

CacheOptions residual_opt(index_t r) {
  CacheOptions o;
  o.residual = r;
  return o;
}

template <class S>
S windowed(index_t w) {
  S s;
  s.window = w;
  return s;
}

/// Runs f and checks that it throws qpkv::Error whose message contains every one of `parts`.
template <class F>
void check_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    FAIL("expected qpkv::Error");
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* p : parts) {
      INFO("message: ", msg);
      CHECK(msg.find(p) != std::string::npos);
    }
  }
}

/// Random prompt data of one layer: keys and values (H, N, D), the last `m` queries (Q, m, D).
struct Prompt {
  Shape s;
  index_t n = 0, m = 0;
  std::vector<float> k, v, q;
  Prompt(Shape shape, index_t tokens, index_t queries, unsigned seed)
      : s(shape), n(tokens), m(std::max<index_t>(queries, 1)),
        k(randn(static_cast<std::size_t>(shape.kv_heads * tokens * shape.head_dim), seed)),
        v(randn(k.size(), seed + 1)),
        q(randn(static_cast<std::size_t>(shape.q_heads * m * shape.head_dim), seed + 2)) {}
  [[nodiscard]] TensorView<float> keys() const { return view(k.data(), s.kv_heads, n, s.head_dim); }
  [[nodiscard]] TensorView<float> values() const { return view(v.data(), s.kv_heads, n, s.head_dim); }
  [[nodiscard]] TensorView<float> queries() const { return view(q.data(), s.q_heads, m, s.head_dim); }
};

/// bytes() of a real cache with every one of `n` random tokens (KeepAll).
template <class KQ, class VQ>
std::size_t real_bytes(Shape s, index_t n, const KQ& kq, const VQ& vq, index_t residual) {
  const Prompt p(s, n, 1, static_cast<unsigned>(n) * 7u + 3u);
  CompressedKV<KeepAll, KQ, VQ> cache(s, {}, kq, vq, residual_opt(residual));
  cache.compress(p.keys(), p.values(), p.queries(), n);
  REQUIRE(cache.tokens() == n);
  return cache.bytes();
}

/// capacity_for() is the largest count in [1, limits.max] that fits, checked by brute force.
/// Horizon: compress() of c tokens allocates the blocks of floor(c / R) whole residual steps of R
/// tokens, P bytes each (R = the layout's residual limit, or 1 without a residual), so footprint(c)
/// >= floor(c / R) P, and no c >= R (floor(b / P) + 1) can fit. The footprint is NOT monotone (a
/// nearly full fp16 residual costs more than the next quantized step), so every count in (C, horizon]
/// is scanned, not just C + 1.
template <class KQ, class VQ>
index_t check_capacity(Budget b, Shape s, const KQ& kq, const VQ& vq, index_t residual, TokenLimits limits = {}) {
  const index_t C = capacity_for(b, s, kq, vq, residual, limits);
  CHECK(C >= limits.min);
  CHECK(C <= limits.max);
  CHECK(static_cast<std::int64_t>(footprint(s, kq, vq, C, residual)) <= b.bytes);
  const CompressedKV<KeepAll, KQ, VQ> probe(s, {}, kq, vq, residual_opt(residual));
  const CacheLayout& L = probe.layout();
  const index_t R = L.residual_limit > 0 ? L.residual_limit : 1;
  const auto P = static_cast<std::int64_t>(s.kv_heads * (R / L.block_tokens)) * static_cast<std::int64_t>(L.block_bytes());
  const index_t horizon = std::min(limits.max, R * (b.bytes / P + 1));
  index_t fitting_above = 0;
  for (index_t c = C + 1; c <= horizon; ++c)
    if (static_cast<std::int64_t>(footprint(s, kq, vq, c, residual)) <= b.bytes) ++fitting_above;
  CHECK(fitting_above == 0);
  return C;
}

/// The planned capacity holds in a real cache, and one more token does not.
template <class KQ, class VQ>
void check_real_cache(Budget b, Shape s, const KQ& kq, const VQ& vq, index_t residual) {
  const index_t C = check_capacity(b, s, kq, vq, residual);
  const std::size_t planned = footprint(s, kq, vq, C, residual);
  const std::size_t at = real_bytes(s, C, kq, vq, residual);
  CHECK(at == planned);
  CHECK(static_cast<std::int64_t>(at) <= b.bytes);
  CHECK(static_cast<std::int64_t>(real_bytes(s, C + 1, kq, vq, residual)) > b.bytes);
}

/// A prompt of N tokens pruned by `sel` to the planned capacity: the cache holds exactly the
/// planned bytes within the budget; capacity + 1 (when the prompt is longer) exceeds it.
template <class Sel, class Scheme>
void check_selector_cache(Budget b, Shape s, index_t N, const Sel& sel, const Scheme& scheme) {
  const TokenLimits limits{std::max<index_t>(1, min_capacity(sel)), N};
  const index_t C = check_capacity(b, s, scheme, scheme, 0, limits);
  const Prompt p(s, N, sel.queries_needed(N), 41u + static_cast<unsigned>(N));
  CompressedKV<Sel, Scheme> cache(s, sel, scheme, scheme);
  cache.compress(p.keys(), p.values(), p.queries(), C);
  CHECK(cache.tokens() == C);
  CHECK(cache.bytes() == footprint(s, scheme, scheme, C));
  CHECK(static_cast<std::int64_t>(cache.bytes()) <= b.bytes);
  if (C < N) {
    cache.compress(p.keys(), p.values(), p.queries(), C + 1);
    CHECK(static_cast<std::int64_t>(cache.bytes()) > b.bytes);
  }
}

const Shape kShapes[] = {{2, 2, 8}, {2, 8, 64}, {1, 4, 128}};

}  // namespace

TEST_CASE("fp16 bytes and budget helpers") {
  const Shape s{8, 32, 128};
  CHECK(fp16_bytes(s, 1) == 4096);  // K and V, 8 heads x 128 channels x 2 bytes
  CHECK(fp16_bytes(s, 32768) == 134217728);
  CHECK(Budget::fraction(1, 8, 32768, s).bytes == 16777216);
  CHECK(Budget::fraction(3, 7, 10, Shape{1, 1, 1}).bytes == 17);  // floor(40 x 3 / 7)
  CHECK(Budget::split(Budget{1000}, 3).bytes == 333);
}

TEST_CASE("capacity_for is the largest fitting count: exhaustive check over many budgets") {
  std::mt19937 rng(5);
  for (const Shape& s : kShapes) {
    CAPTURE(s.head_dim);
    const std::int64_t lo = fp16_bytes(s, 1), hi = fp16_bytes(s, 300);
    std::uniform_int_distribution<std::int64_t> pick(lo, hi);
    Affine<3> a3;
    a3.outliers.fraction = 0.02;
    for (int i = 0; i < 25; ++i) {
      const Budget b{pick(rng)};
      CAPTURE(b.bytes);
      check_capacity(b, s, Kivi<4>{}, Kivi<4>{}, 0);
      check_capacity(b, s, Kivi<2, 4, 64, 128>{}, Kivi<2, 4, 64, 128>{}, 0);
      check_capacity(b, s, Kivi<8>{}, Kivi<8>{}, 0);
      check_capacity(b, s, Fp16{}, Fp16{}, 0);
      check_capacity(b, s, Fp16{}, Fp16{}, 5);  // fp16 blocks with a residual: R = 5, B = 1
      check_capacity(b, s, a3, a3, 40);         // R = round_up(40, 32) = 64
      check_capacity(b, s, Affine<1>{}, Affine<8>{}, 0, TokenLimits{1, 100});
    }
    // budgets that sit exactly on, just below and just above a footprint, around a step end
    for (const index_t c : {1, 31, 32, 33, 63, 64, 95, 96, 200}) {
      const auto f = static_cast<std::int64_t>(footprint<Kivi<4>>(s, c));
      for (const std::int64_t b : {f - 1, f, f + 1}) {
        if (b < fp16_bytes(s, 1)) continue;
        CAPTURE(c);
        CAPTURE(b);
        const index_t C = check_capacity(Budget{b}, s, Kivi<4>{}, Kivi<4>{}, 0);
        if (b >= f) CHECK(C >= c);
      }
    }
  }
}

TEST_CASE("the footprint is not monotone: a budget can hold C tokens but not C - 1") {
  // head_dim 8, one head, KIVI 4-bit group 32: a block of 32 tokens is 160 (keys) + 256 (values)
  // = 416 bytes; one fp16 residual token is 2 x 8 x 2 = 32 bytes, so 31 of them cost 992.
  const Shape s{1, 1, 8};
  CHECK(footprint<Kivi<4>>(s, 32) == 416);
  CHECK(footprint<Kivi<4>>(s, 31) == 992);
  CHECK(footprint<Kivi<4>>(s, 13) == 416);
  const Budget b{416};
  CHECK(capacity_for<Kivi<4>>(b, s) == 32);
  // a 31-token prompt under that budget: capacity 32 would keep all 31 (992 bytes) ->
  // limits.max = N gives 13, which a selector keeps exactly
  CHECK(capacity_for<Kivi<4>>(b, s, {}, TokenLimits{1, 31}) == 13);
  CHECK(check_capacity(b, s, Kivi<4>{}, Kivi<4>{}, 0, TokenLimits{1, 31}) == 13);
  check_selector_cache(b, s, 31, StreamingLLM{}, Kivi<4>{});
  check_selector_cache(b, s, 31, windowed<SnapKV>(8), Kivi<4>{});
}

TEST_CASE("planned bytes equal CompressedKV::bytes() of real caches (KeepAll)") {
  Affine<3> a3;
  a3.outliers.fraction = 0.02;
  a3.outliers.threshold = 2.0f;
  for (const Shape& s : kShapes) {
    CAPTURE(s.head_dim);
    CAPTURE(s.q_heads);
    const Budget base = Budget::fraction(1, 3, 1024, s);
    // three budgets in different residual phases: a fraction, a few fp16 tokens more, a step end
    const Budget step_end{static_cast<std::int64_t>(footprint<Kivi<4>>(s, 32 * 9 - 1))};
    for (const Budget& b : {base, Budget{base.bytes + 5 * fp16_bytes(s, 1) + 3}, step_end}) {
      CAPTURE(b.bytes);
      check_real_cache(b, s, Kivi<4>{}, Kivi<4>{}, 0);
      check_real_cache(b, s, Kivi<2, 4, 64, 128>{}, Kivi<2, 4, 64, 128>{}, 0);
      check_real_cache(b, s, Kivi<8>{}, Kivi<8>{}, 0);
      check_real_cache(b, s, Fp16{}, Fp16{}, 0);
      check_real_cache(b, s, a3, a3, 0);
      check_real_cache(b, s, Kivi<4>{}, Kivi<4>{}, 70);  // options.residual 70 -> R = 96
    }
  }
}

TEST_CASE("planned bytes equal bytes() with selectors pruning a longer prompt") {
  for (const Shape& s : kShapes) {
    CAPTURE(s.head_dim);
    const Budget b = Budget::fraction(1, 3, 1024, s);
    check_selector_cache(b, s, 1200, windowed<SnapKV>(8), Kivi<4>{});        // C < N: pruned to C
    check_selector_cache(b, s, 1200, windowed<H2O>(16), Kivi<8>{});
    check_selector_cache(b, s, 1200, StreamingLLM{}, Kivi<2, 4, 64, 128>{});  // C = N: all kept
    check_selector_cache(b, s, 700, windowed<SnapKV>(8), Kivi<4, 4, 32, 64>{});
  }
}

TEST_CASE("min_capacity reads the selector's own rule") {
  CHECK(min_capacity(KeepAll{}) == 0);
  CHECK(min_capacity(SnapKV{}) == 32);
  CHECK(min_capacity(windowed<SnapKV>(8)) == 8);
  CHECK(min_capacity(H2O{}) == 32);
  CHECK(min_capacity(PyramidKV{}, LayerInfo{3, 32}) == 32);
  CHECK(min_capacity(StreamingLLM{}) == 5);  // 4 sinks + at least one recent token
  StreamingLLM ref;
  ref.mode = StreamingLLM::Mode::reference;
  CHECK(min_capacity(ref) == 32);
  SnapKV even;
  even.kernel = 4;
  check_error([&] { (void)min_capacity(even); }, {"kernel", "odd"});
}

TEST_CASE("hand-computed: Llama-3-8B layer, N = 32768, budget 1/8 of fp16") {
  // One layer: 8 KV heads (32 query heads), head_dim 128. Full fp16 K+V: 2 x 8 x 32768 x 128 x 2 =
  // 134217728 bytes; 1/8 of it is b = 16777216. One fp16 token costs T = 2 x 8 x 128 x 2 = 4096
  // bytes, so the budget is 4096 fp16 tokens, and the paper's nominal rule gives 4 x 4096 = 16384
  // tokens at 4 bits.
  const Shape s{8, 32, 128};
  const index_t N = 32768;
  const Budget b = Budget::fraction(1, 8, N, s);
  REQUIRE(b.bytes == 16777216);
  CHECK(nominal_tokens(b, s, 16) == 4096);
  CHECK(nominal_tokens(b, s, 4) == 16384);
  CHECK(nominal_tokens(b, s, 8) == 8192);
  CHECK(nominal_tokens(b, s, 3) == 21845);  // floor(4096 x 16 / 3)

  // KIVI 4-bit, group 32, fp16 scale + min per group (Kivi<4>). A block is 32 tokens of one head:
  //   keys (per channel): 128 groups x (2 + 2) bytes = 512, codes 32 x 128 x 4 / 8 = 2048 -> 2560
  //   values (per token): 32 x 4 groups x 4 bytes = 512, codes 2048                          -> 2560
  // 5120 bytes per head and block = 5 bits per element; P = 8 heads x 5120 = 40960 bytes per 32
  // tokens. The residual limit is R = 32; footprint(32q + r) = 40960 q + 4096 r (r < 32).
  // Largest q: floor(16777216 / 40960) = 409 (16752640 bytes); the 24576 bytes left hold r = 6
  // fp16 tokens. C = 409 x 32 + 6 = 13094 tokens, footprint 16752640 + 24576 = 16777216 = b.
  // One more token: 16781312 > b; the next step (13120 tokens): 410 x 40960 = 16793600 > b.
  CHECK(footprint<Kivi<4>>(s, 32) == 40960);
  CHECK(capacity_for<Kivi<4>>(b, s) == 13094);
  CHECK(footprint<Kivi<4>>(s, 13094) == 16777216);
  CHECK(footprint<Kivi<4>>(s, 13095) == 16781312);
  CHECK(footprint<Kivi<4>>(s, 13120) == 16793600);
  CHECK(check_capacity(b, s, Kivi<4>{}, Kivi<4>{}, 0) == 13094);
  // the nominal 16384 tokens really take 512 x 40960 = 20971520 bytes: 1.25 x the budget, 5 bits
  CHECK(footprint<Kivi<4>>(s, 16384) == 20971520);
  CHECK(bits_per_element(20971520, s, 16384) == doctest::Approx(5.0));
  CHECK(bits_per_element(16777216, s, 13094) == doctest::Approx(5.00501).epsilon(1e-5));

  // Group 64 (the paper's runs): blocks of 64 tokens, 512 + 4096 bytes per part = 9216 per head
  // (4.5 bits), P = 73728; q = floor(16777216 / 73728) = 227 (16736256), r = 40960 / 4096 = 10:
  // C = 227 x 64 + 10 = 14538, footprint = b exactly; the nominal 16384 take 18874368 (1.125 x b).
  CHECK(capacity_for<Kivi<4, 4, 64>>(b, s) == 14538);
  CHECK(footprint<Kivi<4, 4, 64>>(s, 14538) == 16777216);
  CHECK(footprint<Kivi<4, 4, 64>>(s, 16384) == 18874368);
  CHECK(bits_per_element(18874368, s, 16384) == doctest::Approx(4.5));

  // The table, group 32, residual 0 (R = 32). Per-step bytes P (8 heads, 32 tokens):
  //   8-bit: 8 x (2 x (512 + 4096)) = 73728 -> q = 227, r = (16777216 - 16736256) / 4096 = 10 -> 7274
  //   3-bit: 8 x (2 x (512 + 32 x 48)) = 32768 -> q = 512 exactly, r = 0 -> 16384
  //   2-bit: 8 x (2 x (512 + 1024)) = 24576 -> q = 682 (16760832), r = 4 -> 21828
  //   1-bit: 8 x (2 x (512 + 512)) = 16384 -> q = 1024 -> 32768 = N (the whole prompt)
  const std::vector<PlanRow> rows = plan_table(s, N, b);
  REQUIRE(rows.size() == 6);
  const int bits[] = {16, 8, 4, 3, 2, 1};
  const index_t exact[] = {4096, 7274, 13094, 16384, 21828, 32768};
  const index_t nominal[] = {4096, 8192, 16384, 21845, 32768, 32768};  // 2 and 1 bit capped at N
  const std::size_t nominal_bytes[] = {16777216, 18874368, 20971520,
                                       682 * 32768 + 21 * 4096,  // 21845 = 682 x 32 + 21
                                       25165824, 16777216};
  for (std::size_t i = 0; i < rows.size(); ++i) {
    CAPTURE(bits[i]);
    CHECK(rows[i].bits == bits[i]);
    CHECK(rows[i].tokens == exact[i]);
    CHECK(rows[i].bytes == 16777216);  // every row fills the budget to the byte
    CHECK(rows[i].nominal_tokens == nominal[i]);
    CHECK(rows[i].nominal_bytes == nominal_bytes[i]);
    CHECK(rows[i].nominal_fits == (bits[i] == 16 || bits[i] == 1));
    CHECK(rows[i].effective_bits == doctest::Approx(bits_per_element(rows[i].bytes, s, rows[i].tokens)));
  }
  CHECK(rows[0].effective_bits == doctest::Approx(16.0));
  CHECK(rows[3].effective_bits == doctest::Approx(4.0));  // 3-bit codes + 1 bit of scales
  CHECK(rows[5].capacity == 32768);
  const std::string text = format_plan(rows);
  CHECK(text.find("13094") != std::string::npos);
  CHECK(text.find("20971520") != std::string::npos);
  CHECK(std::count(text.begin(), text.end(), '\n') == 8);
  // a chosen set of bit widths, group 64 and a 128-token residual
  const std::vector<PlanRow> two = plan_table(s, N, b, 64, 128, {4, 2});
  REQUIRE(two.size() == 2);
  CHECK(two[0].tokens == capacity_for<Kivi<4, 4, 64, 128>>(b, s, {}, TokenLimits{1, N}));
  CHECK(two[1].tokens == capacity_for<Kivi<2, 2, 64, 128>>(b, s, {}, TokenLimits{1, N}));
}

TEST_CASE("run-time QuantSpec has the bytes of the compile-time Kivi scheme") {
  const Shape s{2, 4, 64};
  auto same = [&]<int KB, int VB, index_t G, index_t R>() {
    const QuantSpec q{KB, VB, G, R};
    for (const index_t t : {0, 1, 31, 32, 64, 100, 333}) {
      CAPTURE(KB);
      CAPTURE(VB);
      CAPTURE(t);
      CHECK(footprint(s, q, t) == footprint<Kivi<KB, VB, G, R>>(s, t));
    }
    const Budget b = Budget::fraction(1, 5, 1000, s);
    CHECK(capacity_for(b, s, q) == capacity_for<Kivi<KB, VB, G, R>>(b, s));
  };
  same.template operator()<4, 4, 32, 0>();
  same.template operator()<2, 8, 64, 128>();
  same.template operator()<16, 4, 32, 0>();
  same.template operator()<3, 1, 32, 32>();
  same.template operator()<16, 16, 32, 0>();
  same.template operator()<8, 16, 16, 40>();
}

TEST_CASE("plan_model: LayerQuant keeps every layer within the same bytes") {
  const Shape s{2, 4, 64};
  const index_t N = 700, L = 4;
  ModelSpec spec{s, L, N, QuantSpec::kivi(4), {LayerQuant{1, 3, QuantSpec::kivi(8)}}};
  const Budget per_layer = Budget::fraction(1, 4, N, s);
  const SnapKV snap = windowed<SnapKV>(16);
  const ModelPlan plan = plan_model(spec, per_layer, snap);
  REQUIRE(plan.layers.size() == 4);
  CHECK(plan.budget == 4 * per_layer.bytes);
  CHECK(plan.full_fp16_bytes == 4 * fp16_bytes(s, N));
  std::int64_t total = 0;
  index_t tokens = 0;
  const Prompt p(s, N, 16, 99);
  for (const LayerPlan& lp : plan.layers) {
    CAPTURE(lp.layer);
    CHECK(lp.quant == (lp.layer == 1 || lp.layer == 2 ? QuantSpec::kivi(8) : QuantSpec::kivi(4)));
    CHECK(lp.tokens == lp.capacity);
    CHECK(static_cast<std::int64_t>(lp.bytes) <= per_layer.bytes);
    CHECK(lp.capacity == capacity_for(per_layer, s, lp.quant, TokenLimits{16, N}));
    // the real cache of this layer
    const LayerInfo li{lp.layer, L};
    std::size_t real = 0;
    if (lp.quant.key_bits == 8) {
      CompressedKV<SnapKV, Kivi<8>> c(s, snap);
      c.compress(p.keys(), p.values(), p.queries(), lp.capacity, li);
      CHECK(c.tokens() == lp.tokens);
      real = c.bytes();
    } else {
      CompressedKV<SnapKV, Kivi<4>> c(s, snap);
      c.compress(p.keys(), p.values(), p.queries(), lp.capacity, li);
      CHECK(c.tokens() == lp.tokens);
      real = c.bytes();
    }
    CHECK(real == lp.bytes);
    total += static_cast<std::int64_t>(real);
    tokens += lp.tokens;
  }
  CHECK(plan.total_bytes == total);
  CHECK(plan.total_tokens == tokens);
  CHECK(plan.total_bytes <= plan.budget);
  // fewer bits, more tokens at the same bytes
  CHECK(plan.layers[0].tokens > plan.layers[1].tokens);
  CHECK(plan.layers[0].tokens == plan.layers[3].tokens);
  const std::string text = format_model(plan);
  CHECK(text.find("total: ") != std::string::npos);

  // Budget::split: a model-wide budget shared equally
  const ModelPlan split = plan_model(spec, Budget::split(Budget{4 * per_layer.bytes + 3}, L), snap);
  CHECK(split.layers[0].capacity == plan.layers[0].capacity);

  // a 16-bit range (Kivi<16>: plain fp16, no residual) gets the fewest tokens
  spec.layer_quant.push_back(LayerQuant{3, 4, QuantSpec::kivi(16)});
  const ModelPlan with16 = plan_model(spec, per_layer, snap);
  CHECK(with16.layers[3].tokens == per_layer.bytes / fp16_bytes(s, 1));
  CHECK(with16.layers[3].bytes == footprint<Kivi<16>>(s, with16.layers[3].tokens));
}

TEST_CASE("plan_model_at_capacity: PyramidKV's depth-varying token counts") {
  const Shape s{2, 4, 32};
  const index_t N = 600, L = 6, capacity = 96;
  const PyramidKV pyr = windowed<PyramidKV>(8);
  const ModelSpec spec{s, L, N, QuantSpec::kivi(4), {}};
  const ModelPlan plan = plan_model_at_capacity(spec, capacity, pyr);
  REQUIRE(plan.layers.size() == 6);
  CHECK(plan.budget == 0);
  const Prompt p(s, N, 8, 123);
  std::int64_t total = 0;
  for (const LayerPlan& lp : plan.layers) {
    CAPTURE(lp.layer);
    const LayerInfo li{lp.layer, L};
    CHECK(lp.tokens == pyr.kept_tokens(N, capacity, li));
    CompressedKV<PyramidKV, Kivi<4>> c(s, pyr);
    c.compress(p.keys(), p.values(), p.queries(), capacity, li);
    CHECK(c.tokens() == lp.tokens);
    CHECK(c.bytes() == lp.bytes);
    total += static_cast<std::int64_t>(c.bytes());
  }
  CHECK(plan.total_bytes == total);
  CHECK(plan.layers.front().tokens > plan.layers.back().tokens);
  // the budget planner refuses a selector that keeps more than its capacity
  check_error([&] { (void)plan_model(spec, Budget::fraction(1, 16, N, s), pyr); },
              {"selector.kept_tokens", "plan_model_at_capacity"});
  // with a short prompt (N <= capacity) PyramidKV keeps everything and the plan holds
  const ModelSpec short_spec{s, L, 90, QuantSpec::kivi(4), {}};
  const ModelPlan short_plan = plan_model(short_spec, Budget{1 << 20}, pyr);
  for (const LayerPlan& lp : short_plan.layers) CHECK(lp.tokens == 90);
}

TEST_CASE("error paths name the argument, the expected and the actual value") {
  const Shape s{2, 4, 8};
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{0}, s); }, {"budget", "> 0", "got 0"});
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{-5}, s); }, {"budget", "> 0", "got -5"});
  check_error([&] { (void)capacity_for(Budget{-1}, s, QuantSpec{}); }, {"budget", "got -1"});
  // one fp16 token of 2 heads x 8 channels costs 64 bytes: less cannot hold a token
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{63}, s); },
              {"budget: expected >= 64 bytes", "one token", "got 63 bytes"});
  // SnapKV's window of 32 needs 32 tokens: one quantized block, 2 x 416 = 832 bytes
  CHECK(footprint<Kivi<4>>(s, 32) == 832);
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{831}, s, {}, TokenLimits{min_capacity(SnapKV{}), 1000}); },
              {"budget: expected >= 832 bytes", "limits.min = 32", "got 831 bytes", "room for 12 tokens"});
  CHECK(capacity_for<Kivi<4>>(Budget{832}, s, {}, TokenLimits{32, 1000}) == 32);
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{1000}, s, {}, TokenLimits{10, 5}); }, {"limits.max", "got 5"});
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{1000}, s, {}, TokenLimits{0, 5}); }, {"limits.min", "got 0"});
  // bad shapes
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{1000}, Shape{0, 4, 8}); }, {"shape.kv_heads", "got 0"});
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{1000}, Shape{2, 3, 8}); }, {"shape.q_heads", "got 3"});
  check_error([&] { (void)footprint<Kivi<4>>(Shape{2, 4, -1}, 3); }, {"shape.head_dim"});
  check_error([&] { (void)Budget::fraction(1, 8, 100, Shape{2, 4, 0}); }, {"shape.head_dim"});
  check_error([&] { (void)fp16_bytes(Shape{}, 1); }, {"shape.kv_heads"});
  // budget helpers
  check_error([&] { (void)Budget::fraction(0, 8, 100, s); }, {"num", "got 0"});
  check_error([&] { (void)Budget::fraction(1, 0, 100, s); }, {"den", "got 0"});
  check_error([&] { (void)Budget::fraction(1, 8, 0, s); }, {"full_tokens", "got 0"});
  check_error([&] { (void)Budget::fraction(1, 1000000, 1, s); }, {"budget", "> 0"});
  check_error([&] { (void)Budget::split(Budget{10}, 0); }, {"layers", "got 0"});
  check_error([&] { (void)fp16_bytes(s, -1); }, {"tokens", "got -1"});
  // quantizers and residuals
  check_error([&] { (void)footprint<Kivi<4>>(s, -1); }, {"tokens", "got -1"});
  check_error([&] { (void)footprint(s, Kivi<4>{}, Kivi<4>{}, 10, -2); }, {"residual", "got -2"});
  check_error([&] { (void)capacity_for<Kivi<4>>(Budget{1000}, s, residual_opt(-3)); }, {"options.residual", "got -3"});
  Affine<4> bad;
  bad.group = 0;
  check_error([&] { (void)capacity_for(Budget{1000}, s, bad, Affine<4>{}); }, {"key_quantizer.group", "got 0"});
  check_error([&] { (void)footprint(s, QuantSpec{5, 4, 32, 0}, 10); }, {"quant.key_bits", "got 5"});
  check_error([&] { (void)footprint(s, QuantSpec{4, 0, 32, 0}, 10); }, {"quant.value_bits", "got 0"});
  check_error([&] { (void)footprint(s, QuantSpec{4, 4, 0, 0}, 10); }, {"quant.group", "got 0"});
  check_error([&] { (void)footprint(s, QuantSpec{4, 4, 32, -1}, 10); }, {"quant.residual", "got -1"});
  check_error([&] { (void)nominal_tokens(Budget{1000}, s, 0); }, {"bits", "got 0"});
  check_error([&] { (void)plan_table(s, 0, Budget{1000}); }, {"full_tokens", "got 0"});
  // model specs
  const QuantSpec q4 = QuantSpec::kivi(4);
  check_error([&] { (void)plan_model(ModelSpec{s, 0, 100, q4, {}}, Budget{4096}, windowed<SnapKV>(8)); }, {"spec.layers", "got 0"});
  check_error([&] { (void)plan_model(ModelSpec{s, 2, 0, q4, {}}, Budget{4096}, windowed<SnapKV>(8)); }, {"spec.full_tokens", "got 0"});
  check_error([&] { (void)plan_model(ModelSpec{s, 4, 100, q4, {LayerQuant{3, 2, q4}}}, Budget{4096}, windowed<SnapKV>(8)); },
              {"spec.layer_quant[0]", "got [3, 2)"});
  check_error([&] { (void)plan_model(ModelSpec{s, 4, 100, q4, {LayerQuant{0, 5, q4}}}, Budget{4096}, windowed<SnapKV>(8)); },
              {"spec.layer_quant[0]", "<= 4"});
  check_error([&] { (void)plan_model(ModelSpec{s, 4, 100, q4, {}}, Budget{0}, windowed<SnapKV>(8)); }, {"per_layer", "got 0"});
  check_error([&] { (void)plan_model_at_capacity(ModelSpec{s, 4, 100, q4, {}}, -1, windowed<SnapKV>(8)); }, {"capacity", "got -1"});
  check_error([&] { (void)plan_model_at_capacity(ModelSpec{s, 4, 100, q4, {}}, 4, windowed<SnapKV>(8)); }, {"capacity", "window"});
  // KeepAll keeps the whole prompt, whatever the budget allows
  check_error([&] { (void)plan_model(ModelSpec{s, 2, 1000, q4, {}}, Budget{4096}, KeepAll{}); },
              {"selector.kept_tokens", "1000 tokens"});
}
