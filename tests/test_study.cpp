// The token-precision study: the retrieval generator's documented properties, the metrics on hand
// cases, and the study's byte accounting (every variant's bytes equal its plan and fit the budget).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include <qpkv/study/study.hpp>

using namespace qpkv;
using namespace qpkv::study;

namespace {

const std::string kSourceDir = std::string(QPKV_TEST_DATA) + "/../..";

RetrievalParams small_params() { return RetrievalParams{}; }

/// Decode output of a cache built from `config` over the case's prompt with `selection`.
std::vector<float> attend_with(const RetrievalCase& c, const KVConfig& config, Selection selection) {
  AnyCompressedKV cache(c.shape(), config);
  cache.compress(c.key_view(), c.value_view(), std::move(selection));
  cache.append(c.decode_k.data(), c.decode_v.data());
  std::vector<float> out(static_cast<std::size_t>(c.shape().q_heads * c.shape().head_dim));
  cache.attend(c.decode_q.data(), out.data());
  return out;
}

double dot(const float* a, const float* b, index_t n) {
  double s = 0;
  for (index_t i = 0; i < n; ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

}  // namespace

TEST_CASE("retrieval generator: shapes, needle position at every depth, determinism") {
  const RetrievalParams p = small_params();
  const index_t N = 512, H = p.shape.kv_heads, Hq = p.shape.q_heads, D = p.shape.head_dim, W = p.window;
  for (double depth : {0.0, 0.1, 0.25, 0.5, 0.9, 1.0}) {
    CAPTURE(depth);
    const RetrievalCase c = make_retrieval_case(p, N, depth, 7);
    CHECK(c.keys.size() == static_cast<std::size_t>(H * (N + 1) * D));
    CHECK(c.values.size() == c.keys.size());
    CHECK(c.queries.size() == static_cast<std::size_t>(Hq * (N + 1) * D));
    CHECK(c.key_view().tokens == N);
    CHECK(c.query_view().heads == Hq);
    CHECK(c.needle == 1 + static_cast<index_t>(std::llround(depth * static_cast<double>(N - W - 2))));
    CHECK(c.needle >= 1);
    CHECK(c.needle <= N - W - 1);
    CHECK(static_cast<index_t>(c.distractor_positions.size()) == p.distractors);
    for (index_t d : c.distractor_positions) {
      CHECK(d != c.needle);
      CHECK(d >= 1);
      CHECK(d <= N - W - 1);
    }
  }
  CHECK(make_retrieval_case(p, N, 0.0, 0).needle == 1);
  CHECK(make_retrieval_case(p, N, 1.0, 0).needle == N - W - 1);

  const RetrievalCase a = make_retrieval_case(p, N, 0.5, 11), b = make_retrieval_case(p, N, 0.5, 11),
                      other = make_retrieval_case(p, N, 0.5, 12);
  CHECK(a.keys == b.keys);
  CHECK(a.values == b.values);
  CHECK(a.queries == b.queries);
  CHECK(a.answer == b.answer);
  CHECK(a.keys != other.keys);
}

TEST_CASE("retrieval generator: only the needle and the distractors carry answers; values are fp16-exact") {
  const RetrievalParams p = small_params();
  const RetrievalCase c = make_retrieval_case(p, 256, 0.4, 3);
  const index_t D = p.shape.head_dim, T = c.tokens + 1;
  for (index_t h = 0; h < p.shape.kv_heads; ++h)
    for (index_t t = 0; t < T; ++t) {
      const float* v = &c.values[static_cast<std::size_t>((h * T + t) * D)];
      for (index_t d = 0; d < D; ++d) REQUIRE(to_float(to_half(v[d])) == v[d]);
      for (index_t m = 0; m < p.answers; ++m) {
        const double proj = dot(v, &c.codebook[static_cast<std::size_t>(m * D)], D);
        bool carries = t == c.needle && m == c.answer[static_cast<std::size_t>(h)];
        for (index_t i = 0; i < p.distractors; ++i)
          carries |= t == c.distractor_positions[static_cast<std::size_t>(i)] &&
                     m == c.distractor_answers[static_cast<std::size_t>(h * p.distractors + i)];
        if (carries)
          CHECK(proj == doctest::Approx(p.answer_scale).epsilon(0.01));
        else
          CHECK(std::abs(proj) < 0.02 * p.answer_scale);
      }
    }
}

TEST_CASE("retrieval: the full cache retrieves in every head by construction") {
  const RetrievalParams p = small_params();
  for (index_t N : {256, 1024})
    for (double depth : {0.0, 0.3, 0.7, 1.0})
      for (std::uint64_t seed : {1u, 2u}) {
        CAPTURE(N);
        CAPTURE(depth);
        const RetrievalCase c = make_retrieval_case(p, N, depth, seed);
        const std::vector<float> out = attend_with(c, KVConfig{}, qpkv::detail::all_positions(p.shape.kv_heads, N));
        CHECK(retrieval_rate(c, out) == 1.0);
        std::vector<float> ref(out.size());
        full_attention(c, ref);
        CHECK(retrieval_rate(c, ref) == 1.0);
        CHECK(relative_l2(out, ref) < 1e-5);
        for (double x : c.full_needle_prob) CHECK(x >= p.decode_prob - 0.01);
        for (double x : c.full_margin) CHECK(x >= p.decode_margin - 0.05);
      }
}

TEST_CASE("retrieval: the question queries put the documented attention on the needle") {
  const RetrievalParams p = small_params();
  const RetrievalCase c = make_retrieval_case(p, 1024, 0.5, 5);
  const index_t N = c.tokens, T = N + 1, D = p.shape.head_dim, g = p.shape.group_size();
  for (index_t qh = 0; qh < p.shape.q_heads; ++qh)
    for (index_t n = N - p.window; n < N; ++n) {
      const index_t h = qh / g;
      std::vector<double> l(static_cast<std::size_t>(n + 1));
      double m = -1e300;
      for (index_t t = 0; t <= n; ++t) {
        l[static_cast<std::size_t>(t)] = dot(&c.queries[static_cast<std::size_t>((qh * T + n) * D)],
                                             &c.keys[static_cast<std::size_t>((h * T + t) * D)], D) / std::sqrt(double(D));
        m = std::max(m, l[static_cast<std::size_t>(t)]);
      }
      double sum = 0;
      for (double x : l) sum += std::exp(x - m);
      const double pn = std::exp(l[static_cast<std::size_t>(c.needle)] - m) / sum;
      CHECK(pn == doctest::Approx(p.question_prob).epsilon(0.05));  // fp16 rounding of the query
    }
}

TEST_CASE("retrieval metric on hand cases") {
  // codebook = the first 4 unit vectors of R^4
  const std::vector<float> book = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
  const float a[] = {0.2f, 0.0f, 0.5f, -1.0f};
  CHECK(read_answer(book, 4, 4, a) == 2);
  const float tie[] = {0.3f, 0.3f, 0.0f, 0.0f};
  CHECK(read_answer(book, 4, 4, tie) == 0);  // ties go to the lower index
  const float neg[] = {-0.1f, -0.2f, -0.3f, -0.05f};
  CHECK(read_answer(book, 4, 4, neg) == 3);
  CHECK_THROWS_AS(read_answer(book, 3, 4, a), Error);

  // retrieval_rate: heads that write beta a_{j*} succeed, a head writing another answer fails
  const RetrievalParams p = small_params();
  const RetrievalCase c = make_retrieval_case(p, 256, 0.5, 9);
  const index_t D = p.shape.head_dim, g = p.shape.group_size();
  std::vector<float> out(static_cast<std::size_t>(p.shape.q_heads * D), 0.0f);
  for (index_t qh = 0; qh < p.shape.q_heads; ++qh) {
    index_t m = c.answer[static_cast<std::size_t>(qh / g)];
    if (qh == 3) m = (m + 1) % p.answers;
    for (index_t d = 0; d < D; ++d) out[static_cast<std::size_t>(qh * D + d)] = c.codebook[static_cast<std::size_t>(m * D + d)];
  }
  CHECK(retrieval_rate(c, out) == doctest::Approx(7.0 / 8.0));
  CHECK_THROWS_AS(retrieval_rate(c, std::vector<float>(3)), Error);

  // a cache that dropped the needle and the distractors cannot read any planted answer
  Selection sel;
  for (index_t h = 0; h < p.shape.kv_heads; ++h) {
    std::vector<index_t> k;
    for (index_t t = 0; t < c.tokens; ++t)
      if (t != c.needle) k.push_back(t);
    sel.kept.push_back(k);
  }
  CHECK(retrieval_rate(c, attend_with(c, KVConfig{}, sel)) < 1.0);
}

TEST_CASE("copy positions: next token seen earlier but not in the last `gap` tokens") {
  //                       0  1  2  3  4  5  6  7
  const std::vector<int> t{9, 5, 6, 7, 8, 5, 9, 6};
  // row r predicts t[r + 1]; gap 3: recent window = t[r-2 .. r]
  // r=4 -> t5=5: seen at 1, recent {6,7,8}: copy. r=5 -> t6=9: seen at 0, recent {7,8,5}: copy.
  // r=6 -> t7=6: seen at 2, recent {8,5,9}: copy. r=3 -> t4=8: never seen.
  CHECK(copy_positions(t, 0, 3) == std::vector<index_t>{4, 5, 6});
  CHECK(copy_positions(t, 5, 3) == std::vector<index_t>{5, 6});
  // gap 5: r=4 has 5 in t[0..4]; r=5 -> 9 only at 0, outside t[1..5]; r=6 has 6 in t[2..6]
  CHECK(copy_positions(t, 0, 5) == std::vector<index_t>{5});
}

TEST_CASE("study accounting: exact variants fit the budget and caches hold exactly the planned bytes") {
  StudyOptions o;
  o.model = false;
  o.lengths = {512};
  o.depths = {0.5};
  o.budgets = {2, 8, 16};
  std::ostringstream log;
  const StudyResults r = run(o, log);  // throws if any cache's bytes() differ from its plan
  CHECK(r.rows.size() == 2 * 4 * 4 * 3);
  CHECK(r.cells.size() <= r.rows.size());
  for (const Row& x : r.rows) {
    CAPTURE(method_name(x.method));
    CAPTURE(x.bits);
    CAPTURE(x.budget);
    CAPTURE(rule_name(x.rule));
    if (!x.feasible) continue;
    CHECK(x.budget_bytes == doctest::Approx(static_cast<double>(Budget::fraction(1, x.budget, 512, o.retrieval_params.shape).bytes)));
    if (x.rule == Rule::exact) CHECK(x.bytes <= x.budget_bytes);
    CHECK(x.retrieval >= 0.0);
    CHECK(x.retrieval <= 1.0);
  }
  // the planner's exact footprint matches a real cache of that many tokens, for every bit width
  for (int bits : {16, 8, 4, 2}) {
    const Shape s = o.retrieval_params.shape;
    const study::detail::Plan p = study::detail::plan_variant(s, 512, 1, study::detail::kv_config(Method::snapkv, bits, o, 32), 8, Rule::exact, 32);
    REQUIRE(p.feasible);
    const RetrievalCase c = make_retrieval_case(o.retrieval_params, 512, 0.5, 1);
    KVConfig cfg = study::detail::kv_config(Method::snapkv, bits, o, 32);
    AnyCompressedKV cache(s, cfg);
    cache.compress(c.key_view(), c.value_view(), c.query_view(), p.capacity);
    CHECK(static_cast<std::int64_t>(cache.bytes()) == p.bytes[0]);
    CHECK(static_cast<std::int64_t>(cache.bytes()) <= p.budget);
    CHECK(cache.tokens() == p.kept[0]);
  }
  // PyramidKV: the mean over the layers fits
  const study::detail::Plan py = study::detail::plan_variant(o.retrieval_params.shape, 4096, 32,
                                               study::detail::kv_config(Method::pyramidkv, 4, o, 32), 16, Rule::exact, 32);
  REQUIRE(py.feasible);
  CHECK(py.mean_bytes() <= static_cast<double>(py.budget));
  // the nominal rule overshoots for quantized caches
  const study::detail::Plan nom = study::detail::plan_variant(o.retrieval_params.shape, 4096, 1,
                                                study::detail::kv_config(Method::snapkv, 4, o, 32), 16, Rule::nominal, 32);
  CHECK(nom.mean_bytes() > static_cast<double>(nom.budget));

  std::ostringstream csv, json, md;
  write_csv(r, csv);
  write_json(r, json);
  write_markdown(r, md);
  const std::string csv_text = csv.str();
  CHECK(std::count(csv_text.begin(), csv_text.end(), '\n') == static_cast<long>(r.rows.size() + 1));
  CHECK(json.str().find("\"rows\"") != std::string::npos);
  CHECK(md.str().find("retrieval rate") != std::string::npos);
}

TEST_CASE("study on stories260K: layer bytes equal the plan, the full config agrees with itself") {
  StudyOptions o;
  o.retrieval = false;
  o.model_path = kSourceDir + "/models/stories260K/stories260K.bin";
  o.texts_dir = kSourceDir + "/data/texts";
  o.texts = 1;
  o.budgets = {2, 32};
  o.methods = {Method::snapkv, Method::pyramidkv};
  o.bits = {16, 2};
  o.rules = {Rule::exact};
  std::ostringstream log;
  const StudyResults r = run(o, log);  // throws if a layer's bytes() differ from its plan
  CHECK(r.rows.size() == 2 * 2 * 2);
  for (const Row& x : r.rows) {
    if (!x.feasible) continue;
    CHECK(x.bytes <= x.budget_bytes);
    CHECK(x.kl >= 0.0);
    CHECK(x.top1 <= 1.0);
  }
  // 1/2 of a 384-token prefix at 16 bits keeps 192 tokens: close to the full cache
  for (const Row& x : r.rows)
    if (x.budget == 2 && x.bits == 16 && x.method == Method::snapkv) {
      CHECK(x.tokens == doctest::Approx(192));
      CHECK(x.top1 > 0.8);
    }
}
