// Token selectors: hand-computed cases, properties (GQA, dtypes, strided views, kept counts),
// error paths, and conformance with the seed's reference vectors (tests/data/conformance).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "qpkv/io/npy.hpp"
#include "qpkv/select/select.hpp"

using namespace qpkv;

namespace {

/// An owned dense (heads, tokens, dim) float tensor.
struct Dense {
  index_t heads = 0, tokens = 0, dim = 0;
  std::vector<float> v;

  Dense(index_t h, index_t n, index_t d) : heads(h), tokens(n), dim(d), v(static_cast<std::size_t>(h * n * d)) {}
  float& at(index_t h, index_t t, index_t c) { return v[static_cast<std::size_t>((h * tokens + t) * dim + c)]; }
  [[nodiscard]] float at(index_t h, index_t t, index_t c) const {
    return v[static_cast<std::size_t>((h * tokens + t) * dim + c)];
  }
  [[nodiscard]] TensorView<float> view() const { return qpkv::view(v.data(), heads, tokens, dim); }
};

/// Uniform in [-scale, scale) from mt19937, whose output sequence the standard fixes (portable).
Dense random_tensor(index_t h, index_t n, index_t d, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 g(seed);
  Dense x(h, n, d);
  for (auto& e : x.v) e = scale * (static_cast<float>(static_cast<double>(g()) / 4294967296.0) * 2.0f - 1.0f);
  return x;
}

template <class T>
std::vector<T> convert(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(v[i]);
  return out;
}

std::vector<index_t> range(index_t first, index_t last) {
  std::vector<index_t> r(static_cast<std::size_t>(last - first));
  std::iota(r.begin(), r.end(), first);
  return r;
}

std::vector<index_t> join(std::vector<index_t> a, const std::vector<index_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

Selection same_for_all_heads(index_t heads, const std::vector<index_t>& row) {
  return Selection{std::vector<std::vector<index_t>>(static_cast<std::size_t>(heads), row)};
}

/// Independent double-precision scores: naive loops, per-query-head softmax, summed per KV group.
std::vector<std::vector<double>> naive_scores(const Dense& k, const Dense& q, index_t window, bool h2o,
                                              H2OMask mask, index_t kernel, Pooling pooling) {
  const index_t n = k.tokens, prefix = n - window, group = q.heads / k.heads, qoff = q.tokens - n;
  std::vector<std::vector<double>> out(static_cast<std::size_t>(k.heads), std::vector<double>(prefix, 0.0));
  for (index_t g = 0; g < k.heads; ++g) {
    auto& acc = out[static_cast<std::size_t>(g)];
    for (index_t h = g * group; h < (g + 1) * group; ++h) {
      for (index_t p = h2o ? 0 : prefix; p < n; ++p) {
        const index_t visible = (h2o && mask == H2OMask::window_block && p < prefix) ? n : p + 1;
        std::vector<double> logit(static_cast<std::size_t>(visible));
        for (index_t t = 0; t < visible; ++t) {
          double dot = 0;
          for (index_t c = 0; c < k.dim; ++c) dot += double(q.at(h, qoff + p, c)) * double(k.at(g, t, c));
          logit[static_cast<std::size_t>(t)] = dot / std::sqrt(double(k.dim));
        }
        const double m = *std::max_element(logit.begin(), logit.end());
        double z = 0;
        for (double& l : logit) z += (l = std::exp(l - m));
        for (index_t t = 0; t < std::min(visible, prefix); ++t) acc[static_cast<std::size_t>(t)] += logit[static_cast<std::size_t>(t)] / z;
      }
    }
    if (!h2o) {
      std::vector<double> pooled(static_cast<std::size_t>(prefix));
      for (index_t i = 0; i < prefix; ++i) {
        double s = 0, mx = -std::numeric_limits<double>::infinity();
        for (index_t j = std::max<index_t>(0, i - kernel / 2); j <= std::min(prefix - 1, i + kernel / 2); ++j) {
          s += acc[static_cast<std::size_t>(j)];
          mx = std::max(mx, acc[static_cast<std::size_t>(j)]);
        }
        pooled[static_cast<std::size_t>(i)] = pooling == Pooling::avg ? s / double(kernel) : mx;
      }
      acc = pooled;
    }
  }
  return out;
}

/// Largest |a - b| / max|b| over all entries.
double max_rel_err(const HeadScores& a, const std::vector<std::vector<double>>& b) {
  double worst = 0;
  for (std::size_t h = 0; h < a.size(); ++h) {
    const double top = *std::max_element(b[h].begin(), b[h].end());
    for (std::size_t t = 0; t < a[h].size(); ++t) worst = std::max(worst, std::abs(a[h][t] - b[h][t]) / top);
  }
  return worst;
}

/// Smallest relative gap between the k-th and (k+1)-th best score over heads (how well separated the cut is).
double min_gap_at_cut(const HeadScores& s, index_t k) {
  double gap = std::numeric_limits<double>::infinity();
  for (const auto& row : s) {
    std::vector<float> sorted(row);
    std::sort(sorted.begin(), sorted.end(), std::greater<>());
    gap = std::min(gap, double(sorted[static_cast<std::size_t>(k - 1)] - sorted[static_cast<std::size_t>(k)]) /
                            double(sorted[static_cast<std::size_t>(k - 1)]));
  }
  return gap;
}

/// Kept positions ascending, unique, in range, with the last `window` tokens at the end.
void check_well_formed(const Selection& s, index_t heads, index_t n, index_t kept, index_t window) {
  REQUIRE(s.heads() == heads);
  for (index_t h = 0; h < heads; ++h) {
    const auto& row = s.kept[static_cast<std::size_t>(h)];
    REQUIRE(s.count(h) == kept);
    CHECK(std::adjacent_find(row.begin(), row.end(), std::greater_equal<>()) == row.end());
    CHECK(row.front() >= 0);
    CHECK(row.back() < n);
    const index_t w = std::min(window, kept);
    for (index_t i = 0; i < w; ++i) CHECK(row[static_cast<std::size_t>(kept - w + i)] == n - w + i);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The concept: every built-in policy satisfies it (the headers static_assert it too).
static_assert(TokenSelector<KeepAll> && TokenSelector<StreamingLLM> && TokenSelector<SnapKV> &&
              TokenSelector<H2O> && TokenSelector<PyramidKV>);

TEST_CASE("defaults are the reference runs' settings") {
  CHECK(SnapKV{}.window == 32);
  CHECK(SnapKV{}.kernel == 5);
  CHECK(SnapKV{}.pooling == Pooling::avg);
  CHECK(PyramidKV{}.window == 32);
  CHECK(PyramidKV{}.kernel == 5);
  CHECK(PyramidKV{}.beta == 20);
  CHECK(H2O{}.window == 32);
  CHECK(H2O{}.mask == H2OMask::causal);
  CHECK(StreamingLLM{}.sinks == 4);
  CHECK(StreamingLLM{}.mode == StreamingLLM::Mode::sinks);
  CHECK(SnapKV{}.queries_needed(512) == 32);
  CHECK(SnapKV{}.queries_needed(10) == 10);
  CHECK(PyramidKV{}.queries_needed(512) == 32);
  CHECK(H2O{}.queries_needed(512) == 512);
  CHECK(StreamingLLM{}.queries_needed(512) == 0);
  CHECK(KeepAll{}.queries_needed(512) == 0);
}

// ---------------------------------------------------------------------------------------------
// Pooling and top-k, by hand.

TEST_CASE("pooling uses same padding: avg counts the zero padding, max pads with -inf") {
  const std::vector<float> x{0, 3, 1, 0, 0, 2, 0};
  const auto near = [](const std::vector<float>& a, const std::vector<double>& b) {
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) CHECK(a[i] == doctest::Approx(b[i]).epsilon(1e-6));
  };
  near(pool_scores(x, 3, Pooling::avg), {3 / 3.0, 4 / 3.0, 4 / 3.0, 1 / 3.0, 2 / 3.0, 2 / 3.0, 2 / 3.0});
  near(pool_scores(x, 3, Pooling::max), {3, 3, 3, 1, 2, 2, 2});
  near(pool_scores(x, 5, Pooling::avg), {4 / 5.0, 4 / 5.0, 4 / 5.0, 6 / 5.0, 3 / 5.0, 2 / 5.0, 2 / 5.0});
  near(pool_scores(x, 5, Pooling::max), {3, 3, 3, 3, 2, 2, 2});
  CHECK(pool_scores(x, 1, Pooling::avg) == x);
  CHECK(pool_scores(x, 1, Pooling::max) == x);
  // A constant signal shrinks at the edges under avg pooling, stays flat under max pooling.
  const std::vector<float> flat(6, 1.0f);
  near(pool_scores(flat, 5, Pooling::avg), {0.6, 0.8, 1.0, 1.0, 0.8, 0.6});
  near(pool_scores(flat, 5, Pooling::max), {1, 1, 1, 1, 1, 1});
  CHECK(pool_scores(std::vector<float>{}, 5, Pooling::avg).empty());
}

TEST_CASE("top-k keeps higher scores first and breaks ties by the lower position") {
  const std::vector<float> s{1, 3, 3, 2, 3};
  CHECK(top_k_positions(s, 0).empty());
  CHECK(top_k_positions(s, 1) == std::vector<index_t>{1});
  CHECK(top_k_positions(s, 2) == std::vector<index_t>{1, 2});
  CHECK(top_k_positions(s, 3) == std::vector<index_t>{1, 2, 4});
  CHECK(top_k_positions(s, 4) == std::vector<index_t>{1, 2, 3, 4});
  CHECK(top_k_positions(s, 5) == std::vector<index_t>{0, 1, 2, 3, 4});
  const std::vector<float> flat(10, 0.5f);
  CHECK(top_k_positions(flat, 4) == std::vector<index_t>{0, 1, 2, 3});
}

// ---------------------------------------------------------------------------------------------
// SnapKV by hand.

TEST_CASE("snapkv scores are the window's softmax probabilities, scaled by 1/sqrt(D)") {
  // D = 4, keys (2 ln(t+1), 0, 0, 0), last query (1, 0, 0, 0): logits = 2 ln(t+1) / sqrt(4) = ln(t+1),
  // so the probabilities are (t+1)/10 over the 4 keys.
  Dense k(1, 4, 4), q(1, 4, 4);
  for (index_t t = 0; t < 4; ++t) k.at(0, t, 0) = 2.0f * std::log(float(t + 1));
  q.at(0, 3, 0) = 1.0f;
  q.at(0, 0, 1) = 100.0f;  // not in the window: never read
  const HeadScores s = snapkv_scores(k.view(), q.view(), 1, 1, Pooling::avg);
  REQUIRE(s.size() == 1);
  REQUIRE(s[0].size() == 3);
  CHECK(s[0][0] == doctest::Approx(0.1).epsilon(1e-6));
  CHECK(s[0][1] == doctest::Approx(0.2).epsilon(1e-6));
  CHECK(s[0][2] == doctest::Approx(0.3).epsilon(1e-6));
  const SnapKV snap{.window = 1, .kernel = 1, .pooling = Pooling::avg};
  CHECK(snap.select(k.view(), q.view(), 3) == same_for_all_heads(1, {1, 2, 3}));
  CHECK(snap.select(k.view(), q.view(), 2) == same_for_all_heads(1, {2, 3}));
  CHECK(snap.select(k.view(), q.view(), 1) == same_for_all_heads(1, {3}));
}

TEST_CASE("snapkv on uniform attention: avg pooling shrinks the padded edges, ties go to lower positions") {
  // Zero queries: every window query spreads 1/(visible keys) uniformly. N = 10, W = 2: the query at
  // position 8 sees 9 keys, the one at 9 sees 10, so every prefix score is u = 1/9 + 1/10.
  const Dense k = random_tensor(2, 10, 4, 7);
  const Dense q(2, 10, 4);
  const double u = 1.0 / 9 + 1.0 / 10;
  const HeadScores raw = window_attention_sums(k.view(), q.view(), 2);
  for (float x : raw[0]) CHECK(x == doctest::Approx(u).epsilon(1e-6));
  const HeadScores avg = snapkv_scores(k.view(), q.view(), 2, 5, Pooling::avg);
  const std::vector<double> shape{0.6, 0.8, 1, 1, 1, 1, 0.8, 0.6};
  for (std::size_t h = 0; h < 2; ++h)
    for (std::size_t t = 0; t < 8; ++t) CHECK(avg[h][t] == doctest::Approx(shape[t] * u).epsilon(1e-6));
  // Capacity 5 = window 2 + 3 scored: the plateau 2..5 is tied, the lowest positions win.
  CHECK(SnapKV{.window = 2, .kernel = 5, .pooling = Pooling::avg}.select(k.view(), q.view(), 5) ==
        same_for_all_heads(2, {2, 3, 4, 8, 9}));
  // Max pooling leaves the scores flat: everything is tied, so the first three are kept.
  CHECK(SnapKV{.window = 2, .kernel = 5, .pooling = Pooling::max}.select(k.view(), q.view(), 5) ==
        same_for_all_heads(2, {0, 1, 2, 8, 9}));
}

TEST_CASE("snapkv keeps everything when the prompt fits the capacity") {
  const Dense k = random_tensor(2, 40, 8, 1), q = random_tensor(2, 40, 8, 2);
  const SnapKV snap{.window = 8};
  CHECK(snap.select(k.view(), q.view(), 40) == same_for_all_heads(2, range(0, 40)));
  CHECK(snap.select(k.view(), q.view(), 64) == same_for_all_heads(2, range(0, 40)));
  CHECK(snap.kept_tokens(40, 64) == 40);
  CHECK(snap.kept_tokens(100, 64) == 64);
  // A prompt shorter than the window needs only as many queries as it has.
  const Dense k5 = random_tensor(1, 5, 8, 3), q5 = random_tensor(1, 5, 8, 4);
  CHECK(snap.select(k5.view(), q5.view(), 8) == same_for_all_heads(1, range(0, 5)));
}

// ---------------------------------------------------------------------------------------------
// H2O by hand.

TEST_CASE("h2o scores are column sums of causal attention over all prompt queries") {
  // Zero queries, N = 3: query 0 sees key 0 (p = 1), query 1 sees 2 keys (1/2 each), query 2 sees 3 (1/3).
  const Dense k = random_tensor(1, 3, 2, 11);
  const Dense q(1, 3, 2);
  const HeadScores causal = h2o_scores(k.view(), q.view(), 1, H2OMask::causal);
  REQUIRE(causal[0].size() == 2);
  CHECK(causal[0][0] == doctest::Approx(1 + 1 / 2.0 + 1 / 3.0).epsilon(1e-6));
  CHECK(causal[0][1] == doctest::Approx(1 / 2.0 + 1 / 3.0).epsilon(1e-6));
  // The seed's mask, W = 1: only the last 1×1 block is masked, so queries 0 and 1 see all 3 keys.
  const HeadScores seed1 = h2o_scores(k.view(), q.view(), 1, H2OMask::window_block);
  CHECK(seed1[0][0] == doctest::Approx(1.0).epsilon(1e-6));
  CHECK(seed1[0][1] == doctest::Approx(1.0).epsilon(1e-6));
  // W = 2: query 0 sees all 3 keys, query 1 is causal inside the block (keys 0, 1), query 2 sees 3.
  const HeadScores seed2 = h2o_scores(k.view(), q.view(), 2, H2OMask::window_block);
  REQUIRE(seed2[0].size() == 1);
  CHECK(seed2[0][0] == doctest::Approx(1 / 3.0 + 1 / 2.0 + 1 / 3.0).epsilon(1e-6));
  CHECK(h2o_scores(k.view(), q.view(), 2)[0][0] == doctest::Approx(1 + 1 / 2.0 + 1 / 3.0).epsilon(1e-6));
}

TEST_CASE("causal h2o on uniform attention favours early tokens") {
  // Key t scores sum_{i >= t} 1/(i+1): strictly decreasing in t, so the first C - W are kept.
  const Dense k = random_tensor(2, 12, 4, 5);
  const Dense q(2, 12, 4);
  const H2O h2o{.window = 2};
  CHECK(h2o.select(k.view(), q.view(), 5) == same_for_all_heads(2, {0, 1, 2, 10, 11}));
  CHECK(h2o.kept_tokens(12, 5) == 5);
  CHECK(h2o.select(k.view(), q.view(), 12) == same_for_all_heads(2, range(0, 12)));
}

// ---------------------------------------------------------------------------------------------
// StreamingLLM by hand.

TEST_CASE("streamingllm keeps sinks plus the most recent tokens, or the seed's first C-W plus W") {
  const Dense k = random_tensor(3, 10, 4, 9);
  const TensorView<float> none{};
  SUBCASE("sinks mode") {
    const StreamingLLM s{.sinks = 2};
    CHECK(s.select(k.view(), none, 6) == same_for_all_heads(3, {0, 1, 6, 7, 8, 9}));
    CHECK(StreamingLLM{.sinks = 0}.select(k.view(), none, 3) == same_for_all_heads(3, {7, 8, 9}));
    CHECK(StreamingLLM{}.select(k.view(), none, 7) == same_for_all_heads(3, {0, 1, 2, 3, 7, 8, 9}));
    CHECK(s.select(k.view(), none, 10) == same_for_all_heads(3, range(0, 10)));
    CHECK(s.kept_tokens(10, 6) == 6);
    CHECK(s.kept_tokens(4, 6) == 4);
  }
  SUBCASE("reference mode") {
    const auto ref = StreamingLLM::Mode::reference;
    CHECK(StreamingLLM{.window = 2, .mode = ref}.select(k.view(), none, 6) ==
          same_for_all_heads(3, {0, 1, 2, 3, 8, 9}));
    // window = capacity - sinks gives the sinks mode's tokens (the seed's run-script setting).
    CHECK(StreamingLLM{.window = 4, .mode = ref}.select(k.view(), none, 6) ==
          StreamingLLM{.sinks = 2}.select(k.view(), none, 6));
    CHECK(StreamingLLM{.window = 6, .mode = ref}.select(k.view(), none, 6) ==
          same_for_all_heads(3, {4, 5, 6, 7, 8, 9}));
    CHECK(StreamingLLM{.window = 2, .mode = ref}.select(k.view(), none, 12) == same_for_all_heads(3, range(0, 10)));
  }
}

TEST_CASE("keepall keeps every token and ignores the capacity") {
  const Dense k = random_tensor(2, 7, 4, 3);
  CHECK(KeepAll{}.select(k.view(), TensorView<float>{}, 0) == same_for_all_heads(2, range(0, 7)));
  CHECK(KeepAll{}.select(k.view(), TensorView<float>{}, 3) == same_for_all_heads(2, range(0, 7)));
  CHECK(KeepAll{}.kept_tokens(100, 3) == 100);
}

// ---------------------------------------------------------------------------------------------
// PyramidKV capacity arithmetic.

TEST_CASE("pyramidkv layer budgets match the reference numbers") {
  const LayerInfo l0{0, 32}, l15{15, 32}, l31{31, 32};
  SUBCASE("w 32: 220 / 145 / 65, mean 142.5") {
    const PyramidKV p{};
    CHECK(p.kept_tokens(512, 128, l0) == 220);
    CHECK(p.kept_tokens(512, 128, l15) == 145);
    CHECK(p.kept_tokens(512, 128, l31) == 65);
    CHECK(p.layer_budget(512, 128, l0) == 188);
    index_t total = 0;
    for (index_t l = 0; l < 32; ++l) total += p.kept_tokens(512, 128, {l, 32});
    CHECK(total == 4560);  // 142.5 per layer
  }
  SUBCASE("w 8, k 7, maxpool: 242 / 137 / 25, mean 133.5") {
    const PyramidKV p{.window = 8, .kernel = 7, .pooling = Pooling::max};
    CHECK(p.kept_tokens(512, 128, l0) == 242);
    CHECK(p.kept_tokens(512, 128, l15) == 137);
    CHECK(p.kept_tokens(512, 128, l31) == 25);
    index_t total = 0;
    for (index_t l = 0; l < 32; ++l) total += p.kept_tokens(512, 128, {l, 32});
    CHECK(total == 4272);  // 133.5 per layer
  }
  SUBCASE("short prompts follow the seed's branches") {
    const PyramidKV p{};  // C = 128, W = 32: B = 96, 2B = 192
    for (const LayerInfo l : {l0, l15, l31}) {
      CAPTURE(l.layer);
      CHECK(p.kept_tokens(100, 128, l) == 100);  // N < C: everything
      CHECK(p.kept_tokens(128, 128, l) == 128);  // N = C: everything
      CHECK(p.kept_tokens(150, 128, l) == 128);  // C <= N < 2B: SnapKV's C, any layer
      CHECK(p.kept_tokens(191, 128, l) == 128);
    }
    // N = 192: max 188 >= N - W = 160, so max = 160, min = 192 - 160 = 32, steps = 128 / 31 = 4.
    CHECK(p.kept_tokens(192, 128, l0) == 192);
    CHECK(p.kept_tokens(192, 128, l15) == 160 - 60 + 32);
    CHECK(p.kept_tokens(192, 128, l31) == 160 - 124 + 32);
    // N = 200: max = 168, min = 24, steps = 144 / 31 = 4.
    CHECK(p.kept_tokens(200, 128, l0) == 200);
    CHECK(p.kept_tokens(200, 128, l31) == 168 - 124 + 32);
    // N = 221: max 188 < 189, no clamp: 220 / 65 as for long prompts.
    CHECK(p.kept_tokens(221, 128, l0) == 220);
    CHECK(p.kept_tokens(221, 128, l31) == 65);
    // One layer: no pyramid, the average budget (the seed would divide by zero).
    CHECK(p.kept_tokens(512, 128) == 128);
    // capacity = window: only the window survives.
    CHECK(p.kept_tokens(512, 32, l0) == 32);
  }
}

TEST_CASE("pyramidkv selects snapkv's top tokens with its layer budget") {
  const Dense k = random_tensor(2, 200, 16, 21), q = random_tensor(2, 200, 16, 22, 3.0f);
  const PyramidKV p{.window = 8};
  const SnapKV snap{.window = 8};
  SUBCASE("C <= N < 2B: plain snapkv at every layer") {
    for (index_t l : {0, 5, 9})
      CHECK(p.select(k.view(), q.view(), 150, {l, 10}) == snap.select(k.view(), q.view(), 150));
  }
  SUBCASE("long prompt: top layer_budget of the snapkv scores") {
    const HeadScores s = snapkv_scores(k.view(), q.view(), 8, 5, Pooling::avg);
    for (index_t l : {0, 4, 9}) {
      const LayerInfo layer{l, 10};
      const index_t budget = p.layer_budget(200, 64, layer);
      CAPTURE(budget);
      const Selection sel = p.select(k.view(), q.view(), 64, layer);
      check_well_formed(sel, 2, 200, budget + 8, 8);
      for (std::size_t h = 0; h < 2; ++h)
        CHECK(sel.kept[h] == join(top_k_positions(s[h], budget), range(192, 200)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Properties on random data.

TEST_CASE("scores match an independent double-precision computation (GQA, both masks, both poolings)") {
  const Dense k = random_tensor(2, 70, 16, 31), q = random_tensor(6, 70, 16, 32, 4.0f);
  for (Pooling pool : {Pooling::avg, Pooling::max}) {
    CAPTURE(static_cast<int>(pool));
    const double err = max_rel_err(snapkv_scores(k.view(), q.view(), 9, 5, pool),
                                   naive_scores(k, q, 9, false, H2OMask::causal, 5, pool));
    CHECK(err < 1e-5);
  }
  for (H2OMask mask : {H2OMask::causal, H2OMask::window_block}) {
    CAPTURE(static_cast<int>(mask));
    const double err = max_rel_err(h2o_scores(k.view(), q.view(), 9, mask),
                                   naive_scores(k, q, 9, true, mask, 1, Pooling::avg));
    CHECK(err < 1e-5);
  }
}

TEST_CASE("gqa: summing two query heads' scores per KV head equals selecting from the summed scores") {
  // 2 KV heads, 4 query heads (group 2). The MHA twin repeats each KV head for its query heads.
  const index_t n = 80, d = 8, w = 8, cap = 32;
  const Dense k = random_tensor(2, n, d, 41), q = random_tensor(4, n, d, 42, 4.0f);
  Dense k_rep(4, n, d);
  for (index_t h = 0; h < 4; ++h)
    for (index_t t = 0; t < n; ++t)
      for (index_t c = 0; c < d; ++c) k_rep.at(h, t, c) = k.at(h / 2, t, c);
  const auto pair_sum = [](const HeadScores& per_query_head) {
    HeadScores s(2);
    for (std::size_t g = 0; g < 2; ++g) {
      s[g] = per_query_head[2 * g];
      for (std::size_t t = 0; t < s[g].size(); ++t) s[g][t] += per_query_head[2 * g + 1][t];
    }
    return s;
  };
  const auto expected = [&](const HeadScores& summed) {
    Selection sel;
    for (const auto& row : summed) sel.kept.push_back(join(top_k_positions(row, cap - w), range(n - w, n)));
    return sel;
  };
  SUBCASE("snapkv sums before pooling") {
    for (Pooling pool : {Pooling::avg, Pooling::max}) {
      const HeadScores summed = pair_sum(window_attention_sums(k_rep.view(), q.view(), w));
      CHECK(window_attention_sums(k.view(), q.view(), w) == summed);
      HeadScores pooled = summed;
      for (auto& row : pooled) row = pool_scores(row, 5, pool);
      CHECK(snapkv_scores(k.view(), q.view(), w, 5, pool) == pooled);
      const Selection sel = SnapKV{.window = w, .kernel = 5, .pooling = pool}.select(k.view(), q.view(), cap);
      CHECK(sel.heads() == 2);
      CHECK(sel == expected(pooled));
    }
  }
  SUBCASE("h2o") {
    const HeadScores summed = pair_sum(h2o_scores(k_rep.view(), q.view(), w));
    CHECK(h2o_scores(k.view(), q.view(), w) == summed);
    CHECK(H2O{.window = w}.select(k.view(), q.view(), cap) == expected(summed));
  }
  SUBCASE("pyramidkv") {
    const PyramidKV p{.window = w};
    const LayerInfo layer{3, 8};
    const index_t budget = p.layer_budget(n, cap, layer);
    HeadScores pooled = pair_sum(window_attention_sums(k_rep.view(), q.view(), w));
    for (auto& row : pooled) row = pool_scores(row, 5, Pooling::avg);
    Selection want;
    for (const auto& row : pooled) want.kept.push_back(join(top_k_positions(row, budget), range(n - w, n)));
    CHECK(p.select(k.view(), q.view(), cap, layer) == want);
  }
}

TEST_CASE("half and bfloat16 inputs are scored in float32: same values give the same scores") {
  const Dense k0 = random_tensor(2, 60, 16, 51), q0 = random_tensor(4, 60, 16, 52, 4.0f);
  const auto check_dtype = [&](auto tag) {
    using T = decltype(tag);
    CAPTURE(dtype_name<T>());
    const std::vector<T> kt = convert<T>(k0.v), qt = convert<T>(q0.v);
    Dense k = k0, q = q0;  // float tensors holding exactly the rounded values
    for (std::size_t i = 0; i < k.v.size(); ++i) k.v[i] = to_float(kt[i]);
    for (std::size_t i = 0; i < q.v.size(); ++i) q.v[i] = to_float(qt[i]);
    const auto kv = view(kt.data(), 2, 60, 16), qv = view(qt.data(), 4, 60, 16);
    CHECK(snapkv_scores(kv, qv, 8, 5, Pooling::avg) == snapkv_scores(k.view(), q.view(), 8, 5, Pooling::avg));
    CHECK(h2o_scores(kv, qv, 8) == h2o_scores(k.view(), q.view(), 8));
    CHECK(SnapKV{.window = 8}.select(kv, qv, 24) == SnapKV{.window = 8}.select(k.view(), q.view(), 24));
    CHECK(H2O{.window = 8}.select(kv, qv, 24) == H2O{.window = 8}.select(k.view(), q.view(), 24));
    CHECK(PyramidKV{.window = 8}.select(kv, qv, 24, {1, 4}) ==
          PyramidKV{.window = 8}.select(k.view(), q.view(), 24, {1, 4}));
    CHECK(StreamingLLM{}.select(kv, qv, 24) == StreamingLLM{}.select(k.view(), q.view(), 24));
  };
  check_dtype(half{});
  check_dtype(bfloat16{});
}

TEST_CASE("half and bfloat16 rounding of well-separated data does not change the selection") {
  // One informative channel: key t has strength a_t (a shuffled ladder with logit steps of 0.25),
  // every query looks along that channel. The other channels are small noise.
  const index_t n = 72, d = 16, w = 8, cap = 28;
  Dense k = random_tensor(2, n, d, 61, 0.05f), q = random_tensor(2, n, d, 62, 0.05f);
  std::mt19937 g(63);
  for (index_t h = 0; h < 2; ++h) {
    std::vector<index_t> ladder = range(0, n);
    std::shuffle(ladder.begin(), ladder.end(), g);
    for (index_t t = 0; t < n; ++t) {
      k.at(h, t, 0) = 0.25f * static_cast<float>(ladder[static_cast<std::size_t>(t)]) / 2.0f;
      q.at(h, t, 0) = 8.0f;  // 8 * 0.125 * step / sqrt(16) = 0.25 logit per ladder step
    }
  }
  const SnapKV snap{.window = w, .kernel = 1};
  const H2O h2o{.window = w};
  const PyramidKV pyr{.window = w, .kernel = 1};
  const LayerInfo layer{2, 6};
  // Precondition: the float32 scores are well separated at every cut used below.
  REQUIRE(min_gap_at_cut(snapkv_scores(k.view(), q.view(), w, 1, Pooling::avg), cap - w) > 0.05);
  REQUIRE(min_gap_at_cut(snapkv_scores(k.view(), q.view(), w, 1, Pooling::avg), pyr.layer_budget(n, cap, layer)) > 0.05);
  REQUIRE(min_gap_at_cut(h2o_scores(k.view(), q.view(), w), cap - w) > 0.05);
  const auto check_dtype = [&](auto tag) {
    using T = decltype(tag);
    CAPTURE(dtype_name<T>());
    const std::vector<T> kt = convert<T>(k.v), qt = convert<T>(q.v);
    const auto kv = view(kt.data(), 2, n, d), qv = view(qt.data(), 2, n, d);
    CHECK(snap.select(kv, qv, cap) == snap.select(k.view(), q.view(), cap));
    CHECK(h2o.select(kv, qv, cap) == h2o.select(k.view(), q.view(), cap));
    CHECK(pyr.select(kv, qv, cap, layer) == pyr.select(k.view(), q.view(), cap, layer));
  };
  check_dtype(half{});
  check_dtype(bfloat16{});
}

TEST_CASE("strided views select the same tokens as dense copies") {
  // Keys and queries interleaved as [token][head][dim] inside a wider buffer (row pitch 3·D + 5).
  const index_t heads = 2, n = 50, d = 8, pitch = heads * d + 5;
  const Dense k = random_tensor(heads, n, d, 71), q = random_tensor(heads, n, d, 72, 4.0f);
  std::vector<float> kb(static_cast<std::size_t>(n * pitch), 0.0f), qb(kb.size(), 0.0f);
  for (index_t h = 0; h < heads; ++h)
    for (index_t t = 0; t < n; ++t)
      for (index_t c = 0; c < d; ++c) {
        kb[static_cast<std::size_t>(t * pitch + h * d + c)] = k.at(h, t, c);
        qb[static_cast<std::size_t>(t * pitch + h * d + c)] = q.at(h, t, c);
      }
  const TensorView<float> ks{kb.data(), heads, n, d, d, pitch}, qs{qb.data(), heads, n, d, d, pitch};
  CHECK(SnapKV{.window = 8}.select(ks, qs, 20) == SnapKV{.window = 8}.select(k.view(), q.view(), 20));
  CHECK(H2O{.window = 8}.select(ks, qs, 20) == H2O{.window = 8}.select(k.view(), q.view(), 20));
  // Only the window's queries are passed: a suffix view is enough for SnapKV.
  CHECK(SnapKV{.window = 8}.select(ks, qs.last_tokens(8), 20) == SnapKV{.window = 8}.select(k.view(), q.view(), 20));
}

TEST_CASE("every selector keeps kept_tokens() tokens, ascending, with the window last") {
  const Dense k = random_tensor(2, 130, 8, 81), q = random_tensor(4, 130, 8, 82, 3.0f);
  for (index_t n : {1, 7, 16, 40, 63, 64, 65, 100, 130}) {
    const auto kv = k.view().last_tokens(n), qv = q.view().last_tokens(n);
    for (index_t cap : {16, 40, 64}) {
      CAPTURE(n);
      CAPTURE(cap);
      const auto run = [&](const auto& sel, index_t window, LayerInfo layer = {}) {
        check_well_formed(sel.select(kv, qv, cap, layer), 2, n, sel.kept_tokens(n, cap, layer), window);
      };
      run(KeepAll{}, 0);
      run(StreamingLLM{}, 0);
      run(StreamingLLM{.window = 8, .mode = StreamingLLM::Mode::reference}, 8);
      run(SnapKV{.window = 8}, 8);
      run(SnapKV{.window = 16, .kernel = 7, .pooling = Pooling::max}, 16);
      run(H2O{.window = 8}, 8);
      run(H2O{.window = 8, .mask = H2OMask::window_block}, 8);
      for (index_t l : {0, 3, 7}) run(PyramidKV{.window = 8, .beta = 4}, 8, {l, 8});
    }
  }
}

TEST_CASE("h2o's tiling covers prompts longer than one tile") {
  // N > kH2OTileRows exercises several tiles, a partial last tile and the causal column skip.
  const index_t n = 2 * kH2OTileRows + 19;
  const Dense k = random_tensor(1, n, 8, 91), q = random_tensor(2, n, 8, 92, 3.0f);
  for (H2OMask mask : {H2OMask::causal, H2OMask::window_block})
    CHECK(max_rel_err(h2o_scores(k.view(), q.view(), 5, mask), naive_scores(k, q, 5, true, mask, 1, Pooling::avg)) <
          1e-5);
}

// ---------------------------------------------------------------------------------------------
// Errors.

TEST_CASE("invalid arguments throw qpkv::Error naming the argument") {
  const Dense k = random_tensor(2, 64, 8, 1), q = random_tensor(4, 64, 8, 2);
  const auto kv = k.view(), qv = q.view();
  const SnapKV snap{.window = 8};
  const H2O h2o{.window = 8};
  const PyramidKV pyr{.window = 8};
  using doctest::Contains;

  SUBCASE("capacity below the window") {
    CHECK_THROWS_WITH_AS((void)snap.select(kv, qv, 7), Contains("capacity: expected >= window (8), got 7"), Error);
    CHECK_THROWS_WITH_AS((void)h2o.select(kv, qv, 7), Contains("capacity"), Error);
    CHECK_THROWS_WITH_AS((void)pyr.select(kv, qv, 7), Contains("capacity"), Error);
    CHECK_THROWS_WITH_AS((void)snap.kept_tokens(64, 7), Contains("capacity"), Error);
    CHECK_THROWS_WITH_AS((void)pyr.kept_tokens(64, 7), Contains("capacity"), Error);
    CHECK_THROWS_WITH_AS((void)(StreamingLLM{.window = 8, .mode = StreamingLLM::Mode::reference}.select(kv, qv, 7)),
                         Contains("capacity"), Error);
    CHECK_THROWS_WITH_AS((void)StreamingLLM{}.select(kv, qv, 4), Contains("capacity: expected > sinks (4), got 4"), Error);
    CHECK_THROWS_WITH_AS((void)KeepAll{}.select(kv, qv, -1), Contains("capacity"), Error);
    // capacity above N is fine: everything is kept.
    CHECK(snap.select(kv, qv, 1000).count(0) == 64);
  }
  SUBCASE("too few query rows") {
    CHECK_THROWS_WITH_AS((void)snap.select(kv, qv.last_tokens(7), 16),
                         Contains("queries.tokens: expected >= 8"), Error);
    CHECK_THROWS_WITH_AS((void)pyr.select(kv, qv.last_tokens(7), 16), Contains("queries.tokens"), Error);
    CHECK_THROWS_WITH_AS((void)h2o.select(kv, qv.last_tokens(32), 16), Contains("queries.tokens: expected >= 64"), Error);
    CHECK_THROWS_WITH_AS((void)h2o_scores(kv, qv.last_tokens(32), 8), Contains("queries.tokens"), Error);
    CHECK_THROWS_WITH_AS((void)snap.select(kv, TensorView<float>{}, 16), Contains("queries.data"), Error);
    // Selectors that read no queries accept none.
    CHECK_NOTHROW((void)StreamingLLM{}.select(kv, TensorView<float>{}, 16));
  }
  SUBCASE("query heads not a multiple of KV heads") {
    const Dense q3 = random_tensor(3, 64, 8, 3);
    CHECK_THROWS_WITH_AS((void)snap.select(kv, q3.view(), 16),
                         Contains("queries.heads: expected a multiple of keys.heads (2), got 3"), Error);
    CHECK_THROWS_WITH_AS((void)h2o.select(kv, q3.view(), 16), Contains("queries.heads"), Error);
    const Dense q1 = random_tensor(1, 64, 8, 3);
    CHECK_THROWS_WITH_AS((void)pyr.select(kv, q1.view(), 16), Contains("queries.heads"), Error);
  }
  SUBCASE("head dim mismatch") {
    const Dense q16 = random_tensor(4, 64, 16, 4);
    CHECK_THROWS_WITH_AS((void)snap.select(kv, q16.view(), 16), Contains("queries.dim: expected keys.dim (8), got 16"), Error);
    CHECK_THROWS_WITH_AS((void)h2o.select(kv, q16.view(), 16), Contains("queries.dim"), Error);
  }
  SUBCASE("empty inputs") {
    TensorView<float> no_tokens = kv;
    no_tokens.tokens = 0;
    CHECK_THROWS_WITH_AS((void)snap.select(no_tokens, qv, 16), Contains("keys.tokens: expected > 0, got 0"), Error);
    CHECK_THROWS_WITH_AS((void)KeepAll{}.select(no_tokens, qv, 16), Contains("keys.tokens"), Error);
    CHECK_THROWS_WITH_AS((void)StreamingLLM{}.select(TensorView<float>{}, qv, 16), Contains("keys.data"), Error);
    TensorView<float> no_heads = kv;
    no_heads.heads = 0;
    CHECK_THROWS_WITH_AS((void)h2o.select(no_heads, qv, 16), Contains("keys.heads"), Error);
    TensorView<float> no_dim = qv;
    no_dim.dim = 0;
    CHECK_THROWS_WITH_AS((void)pyr.select(kv, no_dim, 16), Contains("queries.dim"), Error);
  }
  SUBCASE("non-finite inputs") {
    Dense kn = k;
    kn.at(1, 5, 3) = std::numeric_limits<float>::quiet_NaN();
    CHECK_THROWS_WITH_AS((void)snap.select(kn.view(), qv, 16), Contains("keys: expected finite values, got nan"), Error);
    CHECK_THROWS_WITH_AS((void)h2o.select(kn.view(), qv, 16), Contains("[head 1, token 5, dim 3]"), Error);
    Dense qn = q;
    qn.at(2, 60, 0) = std::numeric_limits<float>::infinity();  // inside the window
    CHECK_THROWS_WITH_AS((void)pyr.select(kv, qn.view(), 16), Contains("queries: expected finite values, got inf"), Error);
    const std::vector<half> kh = convert<half>(kn.v), qh = convert<half>(q.v);
    CHECK_THROWS_WITH_AS((void)snap.select(view(kh.data(), 2, 64, 8), view(qh.data(), 4, 64, 8), 16), Contains("keys"), Error);
    // A query row SnapKV never reads (outside the window) is not checked; H2O reads every row.
    Dense qo = q;
    qo.at(0, 3, 0) = std::numeric_limits<float>::quiet_NaN();
    CHECK_NOTHROW((void)snap.select(kv, qo.view(), 16));
    CHECK_THROWS_WITH_AS((void)h2o.select(kv, qo.view(), 16), Contains("queries"), Error);
    // Finite inputs whose logits overflow float32.
    Dense kbig = k, qbig = q;
    for (auto& x : kbig.v) x = 1e20f;
    for (auto& x : qbig.v) x = 1e20f;
    CHECK_THROWS_WITH_AS((void)snap.select(kbig.view(), qbig.view(), 16), Contains("scores"), Error);
  }
  SUBCASE("bad policy parameters") {
    CHECK_THROWS_WITH_AS((void)(SnapKV{.window = 8, .kernel = 4}.select(kv, qv, 16)),
                         Contains("kernel: expected an odd size >= 1, got 4"), Error);
    CHECK_THROWS_WITH_AS((void)(PyramidKV{.window = 8, .kernel = 0}.select(kv, qv, 16)), Contains("kernel"), Error);
    CHECK_THROWS_WITH_AS((void)(SnapKV{.window = 0}.select(kv, qv, 16)), Contains("window: expected >= 1, got 0"), Error);
    CHECK_THROWS_WITH_AS((void)(H2O{.window = 0}.select(kv, qv, 16)), Contains("window"), Error);
    CHECK_THROWS_WITH_AS((void)(PyramidKV{.window = 8, .beta = 0}.select(kv, qv, 16)), Contains("beta: expected >= 1, got 0"),
                         Error);
    CHECK_THROWS_WITH_AS((void)(StreamingLLM{.sinks = -1}.select(kv, qv, 16)), Contains("sinks"), Error);
    CHECK_THROWS_WITH_AS((void)pyr.select(kv, qv, 16, {32, 32}), Contains("layer.layer: expected in [0, 32), got 32"), Error);
    CHECK_THROWS_WITH_AS((void)pyr.kept_tokens(64, 16, {0, 0}), Contains("layer.layers"), Error);
    CHECK_THROWS_WITH_AS((void)snap.select(kv, qv, 16, {-1, 4}), Contains("layer.layer"), Error);
    CHECK_THROWS_WITH_AS((void)snap.kept_tokens(-1, 16), Contains("n: expected >= 0, got -1"), Error);
    CHECK_THROWS_WITH_AS((void)KeepAll{}.kept_tokens(-1, 16), Contains("n:"), Error);
  }
  SUBCASE("scoring helpers") {
    CHECK_THROWS_WITH_AS((void)top_k_positions(std::vector<float>{1, 2}, 3), Contains("k: expected in [0, 2]"), Error);
    CHECK_THROWS_WITH_AS((void)top_k_positions(std::vector<float>{1, 2}, -1), Contains("k:"), Error);
    CHECK_THROWS_WITH_AS((void)pool_scores(std::vector<float>{1, 2}, 2, Pooling::avg), Contains("kernel"), Error);
    CHECK_THROWS_WITH_AS((void)snapkv_scores(kv, qv, 65, 5, Pooling::avg), Contains("window: expected <= keys.tokens (64)"),
                         Error);
    CHECK_THROWS_WITH_AS((void)h2o_scores(kv, qv, 0), Contains("window"), Error);
  }
}

// ---------------------------------------------------------------------------------------------
// Conformance with the seed (zhzihao/QPruningKV pyramidkv/pyramidkv_utils.py), case a:
// (1, 4, 512, 64) float32, query heads == KV heads.

namespace {

const std::string kConformance = std::string(QPKV_TEST_DATA) + "/conformance/";

struct CaseA {
  std::vector<float> keys, queries;
  index_t heads = 0, tokens = 0, dim = 0;
  [[nodiscard]] TensorView<float> k() const { return view(keys.data(), heads, tokens, dim); }
  [[nodiscard]] TensorView<float> q() const { return view(queries.data(), heads, tokens, dim); }
};

const CaseA& case_a() {
  static const CaseA a = [] {
    CaseA c;
    const io::NpyArray k = io::load_npy(kConformance + "inputs_a_key_states.npy");
    const io::NpyArray q = io::load_npy(kConformance + "inputs_a_query_states.npy");
    REQUIRE(k.shape == std::vector<std::int64_t>{1, 4, 512, 64});
    REQUIRE(q.shape == k.shape);
    c.heads = k.shape[1];
    c.tokens = k.shape[2];
    c.dim = k.shape[3];
    c.keys = k.as<float>();
    c.queries = q.as<float>();
    return c;
  }();
  return a;
}

struct Table {
  std::vector<std::int64_t> shape;
  std::vector<float> f;
  std::vector<std::int64_t> i;
};

Table load_table(const std::string& file) {
  const io::NpyArray a = io::load_npy(kConformance + "selection/" + file);
  Table t{a.shape, {}, {}};
  if (a.dtype == "f4") t.f = a.as<float>();
  else t.i = a.as<std::int64_t>();
  REQUIRE(t.shape.size() == 2);
  return t;
}

struct TieCheck {
  bool valid = false;      ///< the README's tie-aware rule holds
  bool ambiguous = false;  ///< tied scores straddle the cut, so the set is not unique
};

/// README section 2, "Checking the selection sets (tie-aware)": every prefix token scoring above
/// the k-th score is kept, and exactly k - #(score > k-th) of those equal to it.
TieCheck tie_aware(const float* scores, index_t prefix, const std::vector<index_t>& kept_prefix) {
  const auto k = static_cast<index_t>(kept_prefix.size());
  TieCheck r;
  if (k == 0) return {true, false};
  std::vector<float> sorted(scores, scores + prefix);
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  const float kth = sorted[static_cast<std::size_t>(k - 1)];
  const auto above = static_cast<index_t>(std::count_if(sorted.begin(), sorted.end(), [&](float s) { return s > kth; }));
  const auto equal = static_cast<index_t>(std::count(sorted.begin(), sorted.end(), kth));
  std::vector<char> kept(static_cast<std::size_t>(prefix), 0);
  for (index_t t : kept_prefix) kept[static_cast<std::size_t>(t)] = 1;
  index_t kept_above = 0, kept_equal = 0;
  for (index_t t = 0; t < prefix; ++t) {
    if (!kept[static_cast<std::size_t>(t)]) continue;
    if (scores[t] > kth) ++kept_above;
    else if (scores[t] == kth) ++kept_equal;
  }
  r.valid = kept_above == above && kept_equal == k - above;
  r.ambiguous = equal > k - above;
  return r;
}

struct Config {
  std::string stem;    ///< file stem after "sel_a_"
  std::string scores;  ///< file stem after "scores_a_"; empty for StreamingLLM
  index_t window;
  std::function<Selection(const TensorView<float>&, const TensorView<float>&)> run;
};

std::vector<Config> configs() {
  const auto snap = [](index_t cap, index_t w, index_t k, Pooling p) {
    return [=](const TensorView<float>& kv, const TensorView<float>& qv) {
      return SnapKV{.window = w, .kernel = k, .pooling = p}.select(kv, qv, cap);
    };
  };
  const auto pyr = [](index_t l, index_t w, index_t k, Pooling p) {
    return [=](const TensorView<float>& kv, const TensorView<float>& qv) {
      return PyramidKV{.window = w, .kernel = k, .pooling = p, .beta = 20}.select(kv, qv, 128, {l, 32});
    };
  };
  const auto h2o = [](index_t w) {
    return [=](const TensorView<float>& kv, const TensorView<float>& qv) {
      return H2O{.window = w, .mask = H2OMask::window_block}.select(kv, qv, 128);
    };
  };
  const auto streaming = [](index_t w) {
    return [=](const TensorView<float>& kv, const TensorView<float>& qv) {
      return StreamingLLM{.window = w, .mode = StreamingLLM::Mode::reference}.select(kv, qv, 128);
    };
  };
  const Pooling avg = Pooling::avg, max = Pooling::max;
  return {
      {"snapkv_cap128_w32_k5_avg", "snap_w32_k5_avg", 32, snap(128, 32, 5, avg)},
      {"snapkv_cap128_w32_k5_max", "snap_w32_k5_max", 32, snap(128, 32, 5, max)},
      {"snapkv_cap256_w32_k5_avg", "snap_w32_k5_avg", 32, snap(256, 32, 5, avg)},
      {"snapkv_cap256_w32_k5_max", "snap_w32_k5_max", 32, snap(256, 32, 5, max)},
      {"h2o_cap128_w32", "h2o_w32", 32, h2o(32)},
      {"streamingllm_cap128_w32", "", 32, streaming(32)},
      {"pyramidkv_cap128_w32_k5_avg_L0of32", "snap_w32_k5_avg", 32, pyr(0, 32, 5, avg)},
      {"pyramidkv_cap128_w32_k5_avg_L15of32", "snap_w32_k5_avg", 32, pyr(15, 32, 5, avg)},
      {"pyramidkv_cap128_w32_k5_avg_L31of32", "snap_w32_k5_avg", 32, pyr(31, 32, 5, avg)},
      {"snapkv_cap128_w8_k7_max", "snap_w8_k7_max", 8, snap(128, 8, 7, max)},
      {"h2o_cap128_w8", "h2o_w8", 8, h2o(8)},
      {"streamingllm_cap128_w124", "", 124, streaming(124)},
      {"pyramidkv_cap128_w8_k7_max_L0of32", "snap_w8_k7_max", 8, pyr(0, 8, 7, max)},
      {"pyramidkv_cap128_w8_k7_max_L15of32", "snap_w8_k7_max", 8, pyr(15, 8, 7, max)},
      {"pyramidkv_cap128_w8_k7_max_L31of32", "snap_w8_k7_max", 8, pyr(31, 8, 7, max)},
  };
}

}  // namespace

TEST_CASE("conformance: scores equal the seed's within float32 re-association") {
  const CaseA& a = case_a();
  const struct {
    std::string file;
    std::function<HeadScores()> compute;
  } cases[] = {
      {"snap_w32_k5_avg", [&] { return snapkv_scores(a.k(), a.q(), 32, 5, Pooling::avg); }},
      {"snap_w32_k5_max", [&] { return snapkv_scores(a.k(), a.q(), 32, 5, Pooling::max); }},
      {"snap_w8_k7_max", [&] { return snapkv_scores(a.k(), a.q(), 8, 7, Pooling::max); }},
      {"h2o_w32", [&] { return h2o_scores(a.k(), a.q(), 32, H2OMask::window_block); }},
      {"h2o_w8", [&] { return h2o_scores(a.k(), a.q(), 8, H2OMask::window_block); }},
  };
  for (const auto& c : cases) {
    CAPTURE(c.file);
    const Table ref = load_table("scores_a_" + c.file + ".npy");
    const HeadScores ours = c.compute();
    REQUIRE(static_cast<std::int64_t>(ours.size()) == ref.shape[0]);
    double worst = 0;
    for (std::size_t h = 0; h < ours.size(); ++h) {
      REQUIRE(static_cast<std::int64_t>(ours[h].size()) == ref.shape[1]);
      for (std::size_t t = 0; t < ours[h].size(); ++t) {
        const double r = ref.f[h * ours[h].size() + t];
        const double err = std::abs(ours[h][t] - r) / std::max(std::abs(r), 1e-30);
        worst = std::max(worst, err);
      }
    }
    MESSAGE("scores_a_" << c.file << ": max relative error " << worst);
    CHECK(worst < 1e-4);
  }
  // The strictly causal H2O differs from the seed's mask (its first N - W queries see the future).
  CHECK(h2o_scores(a.k(), a.q(), 32, H2OMask::causal) != h2o_scores(a.k(), a.q(), 32, H2OMask::window_block));
}

TEST_CASE("conformance: selections match the seed under the tie-aware rule") {
  const CaseA& a = case_a();
  int exact = 0, tie_only = 0;
  for (const Config& c : configs()) {
    CAPTURE(c.stem);
    const Table want = load_table("sel_a_" + c.stem + ".npy");
    const Selection got = c.run(a.k(), a.q());
    const index_t kept = want.shape[1];
    check_well_formed(got, a.heads, a.tokens, kept, c.window);
    const index_t prefix = a.tokens - c.window;
    bool all_exact = true;
    for (index_t h = 0; h < a.heads; ++h) {
      CAPTURE(h);
      const auto& row = got.kept[static_cast<std::size_t>(h)];
      const std::vector<index_t> want_row(want.i.begin() + h * kept, want.i.begin() + (h + 1) * kept);
      if (c.scores.empty()) {
        CHECK(row == want_row);  // StreamingLLM: fixed positions
        continue;
      }
      const Table ref = load_table("scores_a_" + c.scores + ".npy");
      REQUIRE(ref.shape[1] == prefix);
      const std::vector<index_t> ours_prefix(row.begin(), row.end() - c.window);
      const std::vector<index_t> seed_prefix(want_row.begin(), want_row.end() - c.window);
      const float* s = ref.f.data() + h * prefix;
      const TieCheck ours = tie_aware(s, prefix, ours_prefix);
      CHECK(ours.valid);
      CHECK(tie_aware(s, prefix, seed_prefix).valid);  // the rule itself is sound on the seed's choice
      if (!ours.ambiguous) CHECK(row == want_row);     // a unique top-k must match exactly
      all_exact = all_exact && row == want_row;
    }
    if (!all_exact) MESSAGE(c.stem << ": differs from the seed only among tied scores at the cut");
    (all_exact ? exact : tie_only) += 1;
  }
  MESSAGE(exact << " configs match the seed exactly, " << tie_only << " match up to ties at the cut");
  CHECK(exact + tie_only == 15);
}
