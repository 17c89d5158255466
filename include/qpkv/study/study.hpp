// qpkv/study/study.hpp - the token-precision study: under one memory budget, fewer tokens at 16
// bits or more tokens at 8, 4, 2 bits? (arXiv 2412.12706, "More Tokens, Lower Precision".)
//
// Entry point (the `qpkv study [--quick] [--out DIR]` command calls exactly this):
//
//   qpkv::study::StudyOptions opt;            // defaults = the full study; opt.quick = true for CI
//   opt.quick = true;
//   qpkv::study::StudyResults r = qpkv::study::run(opt, std::clog);   // progress lines on `log`
//   qpkv::study::write_markdown(r, std::cout);                         // paper-style tables
//   std::vector<std::string> files = qpkv::study::write_outputs(r, "out");  // study.md, study.csv,
//                                            // retrieval_cells.csv, study.json, study.gp (+ PNGs
//                                            // when gnuplot is on PATH and opt.gnuplot)
//
// What is measured (docs/results.md section 1 is the full definition, fixed before any run):
//  - variants: selector (StreamingLLM, H2O, SnapKV, PyramidKV) x budget (1/2 .. 1/64 of one
//    layer's fp16 prompt cache) x bits (16, 8, 4, 2; KIVI min-max, keys per channel / values per
//    token, group 32, fp16 scales) x accounting rule:
//      Rule::exact    tokens = capacity_for(budget, shape, QuantSpec::kivi(bits), {window, N}): the
//                     real bytes (codes + scales + fp16 leftovers) fit the budget. PyramidKV: the
//                     largest capacity whose mean footprint over the model's layers fits.
//      Rule::nominal  tokens = min(nominal_tokens(budget, shape, bits), N), the paper's rule; the real
//                     bytes (reported) may exceed the budget.
//    A capacity below the selector's window is infeasible (Row::feasible = false).
//  - retrieval benchmark (study/retrieval.hpp): per grid cell (N x depth) one generated layer;
//    retrieval rate, needle kept, attention-output relative error vs the KeepAll fp16 cache.
//  - stories260K (model/session.hpp): texts under data/texts/ (written by the model itself with
//    fixed seeds, see generate_texts); the first `prefix` tokens prefilled and compressed in every
//    layer, the rest teacher-forced through append; mean KL(full || compressed), top-1 agreement with
//    the full cache, accuracy at long-range copy positions (next token seen earlier, not in the
//    last 64 tokens).
// Every number is computed from the caches' own bytes(): the study checks that bytes() right after
// compress() equals the planned footprint (and is <= the budget under Rule::exact) and throws
// qpkv::Error otherwise.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <limits>
#include <map>
#include <ostream>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "qpkv/attention/dense.hpp"
#include "qpkv/cache/any_cache.hpp"
#include "qpkv/cache/budget.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/model/cache_config.hpp"
#include "qpkv/model/llama.hpp"
#include "qpkv/model/sampler.hpp"
#include "qpkv/model/session.hpp"
#include "qpkv/model/tokenizer.hpp"
#include "qpkv/quant/fp16.hpp"
#include "qpkv/select/select.hpp"
#include "qpkv/study/retrieval.hpp"

namespace qpkv::study {

enum class Rule { exact, nominal };
inline const char* rule_name(Rule r) { return r == Rule::exact ? "exact" : "nominal"; }

/// The study's parameters; the defaults are the full study of docs/results.md.
struct StudyOptions {
  bool quick = false;     ///< CI size: fewer lengths, depths and texts (see resolved())
  bool retrieval = true;  ///< run the retrieval benchmark
  bool model = true;      ///< run stories260K
  bool gnuplot = true;    ///< write_outputs also runs gnuplot on study.gp when it is on PATH

  std::vector<Method> methods{Method::streamingllm, Method::h2o, Method::snapkv, Method::pyramidkv};
  std::vector<int> bits{16, 8, 4, 2};
  std::vector<int> budgets{};  ///< denominators d (budget = 1/d of the fp16 cache); empty: 2 .. 64 (quick: 2, 8, 32)
  std::vector<Rule> rules{Rule::exact, Rule::nominal};
  index_t group = 32;  ///< KIVI group (keys: tokens per channel; values: channels per token)
  index_t kernel = 5;  ///< SnapKV/PyramidKV pooling kernel (avg)
  index_t beta = 20;   ///< PyramidKV
  index_t sinks = 4;   ///< StreamingLLM

  // retrieval benchmark
  RetrievalParams retrieval_params{};
  std::vector<index_t> lengths{};  ///< empty: 4096, 8192, 16384, 32768 (quick: 2048, 4096)
  std::vector<double> depths{};    ///< empty: 0, 0.1, ..., 1 (quick: 0, 0.25, 0.5, 0.75, 1)
  std::uint64_t seed = 20250301;
  index_t pyramid_layers = 32;     ///< the model the retrieval layer belongs to (PyramidKV)
  index_t pyramid_layer = 16;      ///< ... and which of its layers it is

  // stories260K
  std::string model_path = "models/stories260K/stories260K.bin";
  std::string texts_dir = "data/texts";
  index_t texts = 0;         ///< 0: 16 (quick: 4)
  index_t prefix = 384;      ///< tokens prefilled and compressed
  index_t model_window = 8;  ///< W of the selectors on stories260K (the reference run script's)
  index_t copy_gap = 64;     ///< long-range copy: the next token is not among the last copy_gap tokens

  /// The lengths, depths and text count this run uses (quick or full defaults where empty / 0).
  [[nodiscard]] StudyOptions resolved() const {
    StudyOptions o = *this;
    if (o.lengths.empty()) o.lengths = quick ? std::vector<index_t>{2048, 4096} : std::vector<index_t>{4096, 8192, 16384, 32768};
    if (o.depths.empty()) {
      if (quick) o.depths = {0.0, 0.25, 0.5, 0.75, 1.0};
      else
        for (int i = 0; i <= 10; ++i) o.depths.push_back(i / 10.0);
    }
    if (o.texts == 0) o.texts = quick ? 4 : 16;
    if (o.budgets.empty()) o.budgets = quick ? std::vector<int>{2, 8, 32} : std::vector<int>{2, 4, 8, 16, 32, 64};
    return o;
  }
};

/// One variant of one benchmark (means over the retrieval grid, or over the texts).
struct Row {
  std::string bench;  ///< "retrieval" or "stories260K"
  Rule rule = Rule::exact;
  Method method = Method::snapkv;
  int bits = 16;
  int budget = 2;              ///< denominator d of the 1/d budget
  bool feasible = true;
  double capacity = 0;         ///< handed to the selector (mean over lengths)
  double tokens = 0;           ///< kept per KV head (mean over lengths / layers)
  double bytes = 0;            ///< per layer right after prefill (mean)
  double budget_bytes = 0;     ///< per layer (mean)
  double bits_per_element = 0; ///< bytes x 8 / (2 kv_heads tokens head_dim)
  double retrieval = NAN, needle_kept = NAN, error = NAN;  ///< retrieval benchmark
  double kl = NAN, top1 = NAN, copy = NAN;                 ///< stories260K
};

/// One retrieval grid cell of one variant (the heat maps).
struct Cell {
  Rule rule = Rule::exact;
  Method method = Method::snapkv;
  int bits = 16;
  int budget = 2;
  index_t tokens = 0;  ///< N
  double depth = 0;
  double retrieval = 0, needle_kept = 0, error = 0;
};

struct StudyResults {
  StudyOptions options;          ///< resolved
  std::vector<Row> rows;
  std::vector<Cell> cells;
  double full_copy = NAN;        ///< stories260K: the full cache's long-range copy accuracy
  double full_top1_truth = NAN;  ///< stories260K: the full cache's next-token accuracy on the texts
  index_t copy_positions = 0;    ///< stories260K: how many long-range copy positions the texts have
  double retrieval_seconds = 0, model_seconds = 0;
  std::vector<std::string> notes;
};

namespace detail {
using namespace ::qpkv::detail;

inline QuantSpec spec_of(int bits, index_t group) { return QuantSpec::kivi(bits, group, 0); }

inline KVConfig kv_config(Method m, int bits, const StudyOptions& o, index_t window) {
  KVConfig c;
  c.method = m;
  c.key_bits = c.value_bits = bits;
  c.group = o.group;
  c.window = window;
  c.kernel = o.kernel;
  c.beta = o.beta;
  c.sinks = o.sinks;
  return c;
}

/// The tokens and bytes a variant plans for an N-token prompt of `layers` layers.
struct Plan {
  bool feasible = false;
  index_t capacity = 0;
  std::vector<index_t> kept;          ///< per layer
  std::vector<std::int64_t> bytes;    ///< per layer: footprint(kept)
  std::int64_t budget = 0;
  [[nodiscard]] double mean_bytes() const {
    double s = 0;
    for (auto b : bytes) s += static_cast<double>(b);
    return bytes.empty() ? 0.0 : s / static_cast<double>(bytes.size());
  }
  [[nodiscard]] double mean_tokens() const {
    double s = 0;
    for (auto k : kept) s += static_cast<double>(k);
    return kept.empty() ? 0.0 : s / static_cast<double>(kept.size());
  }
};

inline Plan plan_variant(const Shape& shape, index_t n, index_t layers, const KVConfig& cfg, int den, Rule rule,
                         index_t group) {
  Plan p;
  p.budget = Budget::fraction(1, den, n, shape).bytes;
  const AnySelector sel = cfg.selector();
  const index_t least = std::max<index_t>(1, min_capacity(sel, LayerInfo{0, layers}));
  const QuantSpec spec = spec_of(cfg.key_bits, group);
  auto fill = [&](index_t cap) {
    p.capacity = cap;
    p.kept.clear();
    p.bytes.clear();
    for (index_t l = 0; l < layers; ++l) {
      const index_t k = sel.kept_tokens(n, cap, LayerInfo{l, layers});
      p.kept.push_back(k);
      p.bytes.push_back(static_cast<std::int64_t>(footprint(shape, spec, k)));
    }
  };
  if (rule == Rule::nominal) {
    const index_t cap = std::min(nominal_tokens(Budget{p.budget}, shape, cfg.key_bits), n);
    if (cap < least) return p;
    fill(cap);
    p.feasible = true;
    return p;
  }
  index_t cap = 0;
  try {
    cap = capacity_for(Budget{p.budget}, shape, spec, TokenLimits{least, n});
  } catch (const Error&) {
    return p;  // not even the window fits
  }
  fill(cap);
  if (cfg.method == Method::pyramidkv) {
    // the largest capacity whose mean footprint over the layers fits the budget
    while (p.mean_bytes() > static_cast<double>(p.budget) && cap > least) fill(--cap);
    if (p.mean_bytes() > static_cast<double>(p.budget)) return p;
  }
  p.feasible = true;
  return p;
}

inline std::string method_label(Method m) {
  switch (m) {
    case Method::streamingllm: return "StreamingLLM";
    case Method::h2o: return "H2O";
    case Method::snapkv: return "SnapKV";
    case Method::pyramidkv: return "PyramidKV";
    case Method::keep_all: return "KeepAll";
  }
  return "?";
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Key of a variant for accumulation.
using VariantKey = std::tuple<int, int, int, int>;  // rule, method, bits, budget
inline VariantKey key_of(Rule r, Method m, int bits, int den) {
  return {static_cast<int>(r), static_cast<int>(m), bits, den};
}

/// Calls fn(rule, method, bits, budget) for every variant of the study's grid, in table order.
template <class Fn>
void for_each_variant(const StudyOptions& o, Fn&& fn) {
  for (Rule rule : o.rules)
    for (Method m : o.methods)
      for (int b : o.bits)
        for (int den : o.budgets) fn(rule, m, b, den);
}

/// A result row of benchmark `bench` with its variant filled in.
inline Row variant_row(const char* bench, Rule rule, Method m, int bits, int den) {
  Row row;
  row.bench = bench;
  row.rule = rule;
  row.method = m;
  row.bits = bits;
  row.budget = den;
  return row;
}

struct Acc {
  double n = 0, capacity = 0, tokens = 0, bytes = 0, budget = 0, a = 0, b = 0, c = 0;
  double cn = 0;  ///< count for c when it is a conditional mean (copy accuracy)
  bool feasible = true;
};

}  // namespace detail

/// Runs the retrieval half of the study, appending rows and cells to `r`.
inline void run_retrieval(const StudyOptions& o, StudyResults& r, std::ostream& log) {
  const auto t0 = std::chrono::steady_clock::now();
  const RetrievalParams& rp = o.retrieval_params;
  const Shape shape = rp.shape;
  const index_t W = rp.window;
  std::map<detail::VariantKey, detail::Acc> acc;
  std::size_t cell_index = 0;
  const std::size_t cells_total = o.lengths.size() * o.depths.size();
  for (std::size_t li = 0; li < o.lengths.size(); ++li) {
    const index_t N = o.lengths[li];
    // plans depend on N only
    std::map<detail::VariantKey, detail::Plan> plans;
    detail::for_each_variant(o, [&](Rule rule, Method m, int b, int den) {
      plans[detail::key_of(rule, m, b, den)] = detail::plan_variant(
          shape, N, m == Method::pyramidkv ? o.pyramid_layers : 1, detail::kv_config(m, b, o, W), den, rule, o.group);
    });
    for (std::size_t di = 0; di < o.depths.size(); ++di) {
      const double depth = o.depths[di];
      const auto tc = std::chrono::steady_clock::now();
      const RetrievalCase c = make_retrieval_case(rp, N, depth, o.seed + 1000 * li + di);
      const auto keys = c.key_view(), values = c.value_view(), queries = c.query_view();
      // the full cache: KeepAll + fp16, after the same append
      std::vector<float> full(static_cast<std::size_t>(shape.q_heads * shape.head_dim)), out(full.size());
      {
        AnyCompressedKV f(shape, KVConfig{});
        f.compress(keys, values, queries, N);
        f.append(c.decode_k.data(), c.decode_v.data());
        f.attend(c.decode_q.data(), full.data());
      }
      // scores once per cell
      const HeadScores snap = snapkv_scores(keys, queries, W, o.kernel, Pooling::avg);
      HeadScores h2o;
      if (std::find(o.methods.begin(), o.methods.end(), Method::h2o) != o.methods.end())
        h2o = h2o_scores(keys, queries, W, H2OMask::causal);
      detail::for_each_variant(o, [&](Rule rule, Method m, int b, int den) {
              const detail::Plan& plan = plans.at(detail::key_of(rule, m, b, den));
              detail::Acc& a = acc[detail::key_of(rule, m, b, den)];
              if (!plan.feasible) {
                a.feasible = false;
                return;
              }
              const KVConfig cfg = detail::kv_config(m, b, o, W);
              const index_t C = plan.capacity;
              const LayerInfo layer = m == Method::pyramidkv ? LayerInfo{o.pyramid_layer, o.pyramid_layers} : LayerInfo{};
              Selection sel;
              if (N <= C) {
                sel = detail::all_positions(shape.kv_heads, N);
              } else if (m == Method::streamingllm) {
                sel = cfg.selector().select(keys, queries, C, layer);
              } else if (m == Method::h2o) {
                sel = qpkv::detail::top_k_plus_window(h2o, C - W, N, W);
              } else if (m == Method::snapkv) {
                sel = qpkv::detail::top_k_plus_window(snap, C - W, N, W);
              } else {
                const PyramidKV pk{W, o.kernel, Pooling::avg, o.beta};
                sel = qpkv::detail::top_k_plus_window(snap, pk.layer_budget(N, C, layer), N, W);
              }
              const index_t layer_idx = m == Method::pyramidkv ? o.pyramid_layer : 0;
              const index_t kept = plan.kept[static_cast<std::size_t>(layer_idx)];
              double needle_kept = 0;
              for (index_t h = 0; h < shape.kv_heads; ++h) {
                const auto& k = sel.kept[static_cast<std::size_t>(h)];
                detail::require(static_cast<index_t>(k.size()) == kept, "study: kept tokens", kept, k.size());
                needle_kept += std::binary_search(k.begin(), k.end(), c.needle) ? 1.0 : 0.0;
              }
              KVConfig store = cfg;
              store.method = Method::keep_all;
              AnyCompressedKV cache(shape, store);
              cache.compress(keys, values, std::move(sel));
              const std::int64_t bytes = static_cast<std::int64_t>(cache.bytes());
              detail::require(bytes == plan.bytes[static_cast<std::size_t>(layer_idx)], "study: cache bytes",
                              detail::concat("the planned footprint ", plan.bytes[static_cast<std::size_t>(layer_idx)]), bytes);
              if (rule == Rule::exact)
                detail::require(plan.mean_bytes() <= static_cast<double>(plan.budget), "study: bytes",
                                detail::concat("<= the budget ", plan.budget), plan.mean_bytes());
              cache.append(c.decode_k.data(), c.decode_v.data());
              cache.attend(c.decode_q.data(), out.data());
              const double rate = retrieval_rate(c, out), err = relative_l2(out, full);
              needle_kept /= static_cast<double>(shape.kv_heads);
              r.cells.push_back(Cell{rule, m, b, den, N, depth, rate, needle_kept, err});
              a.n += 1;
              a.capacity += static_cast<double>(C);
              a.tokens += plan.mean_tokens();
              a.bytes += plan.mean_bytes();
              a.budget += static_cast<double>(plan.budget);
              a.a += rate;
              a.b += needle_kept;
              a.c += err;
      });
      ++cell_index;
      log << "study: retrieval " << cell_index << "/" << cells_total << "  N " << N << " depth " << depth << "  ("
          << std::fixed << std::setprecision(1) << detail::seconds_since(tc) << " s)" << std::defaultfloat << std::endl;
    }
  }
  detail::for_each_variant(o, [&](Rule rule, Method m, int b, int den) {
          const detail::Acc& a = acc[detail::key_of(rule, m, b, den)];
          Row row = detail::variant_row("retrieval", rule, m, b, den);
          row.feasible = a.feasible && a.n > 0;
          if (row.feasible) {
            row.capacity = a.capacity / a.n;
            row.tokens = a.tokens / a.n;
            row.bytes = a.bytes / a.n;
            row.budget_bytes = a.budget / a.n;
            row.bits_per_element = row.bytes * 8.0 / (2.0 * static_cast<double>(shape.kv_heads * shape.head_dim) * row.tokens);
            row.retrieval = a.a / a.n;
            row.needle_kept = a.b / a.n;
            row.error = a.c / a.n;
          }
          r.rows.push_back(row);
  });
  r.retrieval_seconds = detail::seconds_since(t0);
}

/// Token ids of text `i` under `dir` ("NN.tokens": whitespace-separated ids).
inline std::vector<int> load_text(const std::string& dir, index_t i) {
  char name[32];
  std::snprintf(name, sizeof name, "%02d.tokens", static_cast<int>(i));
  const std::string path = (std::filesystem::path(dir) / name).string();
  std::ifstream f(path);
  if (!f) throw Error(detail::concat("qpkv: study: cannot open the text '", path, "' (run from the repository root or set texts_dir)"));
  std::vector<int> t;
  int x = 0;
  while (f >> x) t.push_back(x);
  return t;
}

/// Writes `count` texts of `length` tokens, sampled by the model from BOS at temperature 1 with
/// seeds seed + i, as dir/NN.tokens (ids) and dir/NN.txt (decoded). Returns the paths written.
inline std::vector<std::string> generate_texts(const model::Llama& m, const model::Tokenizer& tok, const std::string& dir,
                                               index_t count, index_t length, std::uint64_t seed = 1000) {
  std::filesystem::create_directories(dir);
  std::vector<std::string> paths;
  for (index_t i = 0; i < count; ++i) {
    const std::vector<int> prompt{1};  // BOS
    model::Sampling s;
    s.temperature = 1.0f;
    s.seed = seed + static_cast<std::uint64_t>(i);
    std::vector<int> t = prompt;
    const std::vector<int> gen = model::generate(m, prompt, length - 1, model::CacheConfig{}, s);
    t.insert(t.end(), gen.begin(), gen.end());
    char name[32];
    std::snprintf(name, sizeof name, "%02d", static_cast<int>(i));
    const auto base = std::filesystem::path(dir) / name;
    std::ofstream ids(base.string() + ".tokens");
    for (std::size_t k = 0; k < t.size(); ++k) ids << t[k] << ((k + 1) % 32 == 0 || k + 1 == t.size() ? '\n' : ' ');
    std::ofstream txt(base.string() + ".txt");
    txt << tok.decode(t) << "\n";
    paths.push_back(base.string() + ".tokens");
  }
  return paths;
}

/// Log-softmax of one logits row in double.
inline std::vector<double> log_softmax(std::span<const float> x) {
  double m = -std::numeric_limits<double>::infinity();
  for (float v : x) m = std::max(m, static_cast<double>(v));
  double s = 0;
  for (float v : x) s += std::exp(static_cast<double>(v) - m);
  const double lse = m + std::log(s);
  std::vector<double> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = static_cast<double>(x[i]) - lse;
  return out;
}

/// The long-range copy positions of a text: rows t (predicting token t + 1) in [from, T - 1) whose
/// next token occurs in tokens[0, t + 1 - gap) but not in the `gap` tokens before it (t + 1 - gap, t].
inline std::vector<index_t> copy_positions(std::span<const int> tokens, index_t from, index_t gap) {
  std::vector<index_t> rows;
  const index_t T = static_cast<index_t>(tokens.size());
  for (index_t t = from; t + 1 < T; ++t) {
    const int next = tokens[static_cast<std::size_t>(t + 1)];
    const index_t recent = std::max<index_t>(0, t + 1 - gap);
    bool in_recent = false, earlier = false;
    for (index_t i = recent; i <= t; ++i) in_recent |= tokens[static_cast<std::size_t>(i)] == next;
    for (index_t i = 0; i < recent; ++i) earlier |= tokens[static_cast<std::size_t>(i)] == next;
    if (earlier && !in_recent) rows.push_back(t);
  }
  return rows;
}

namespace detail {
inline index_t argmax(std::span<const float> x) {
  return static_cast<index_t>(std::max_element(x.begin(), x.end()) - x.begin());
}
}  // namespace detail

/// Runs the stories260K half of the study, appending rows to `r`.
inline void run_model(const StudyOptions& o, StudyResults& r, std::ostream& log) {
  const auto t0 = std::chrono::steady_clock::now();
  const model::Llama m = model::Llama::load(o.model_path);
  const model::LlamaConfig& mc = m.config();
  const Shape shape = mc.shape();
  const index_t V = mc.vocab, P = o.prefix;
  struct Text {
    std::vector<int> tokens;
    std::vector<float> full;
    std::vector<index_t> copy;
  };
  std::vector<Text> texts;
  double full_copy_hits = 0, full_truth_hits = 0, truth_n = 0;
  index_t copy_n = 0;
  for (index_t i = 0; i < o.texts; ++i) {
    Text t;
    t.tokens = load_text(o.texts_dir, i);
    detail::require(static_cast<index_t>(t.tokens.size()) > P + 1 && static_cast<index_t>(t.tokens.size()) <= mc.seq_len,
                    "study: text length", detail::concat("in (prefix + 1, seq_len]"), t.tokens.size());
    t.full = model::score(m, t.tokens, P).logits;
    t.copy = copy_positions(t.tokens, P, o.copy_gap);
    const index_t T = static_cast<index_t>(t.tokens.size());
    for (index_t row = P; row + 1 < T; ++row) {
      const std::span<const float> lf(t.full.data() + row * V, static_cast<std::size_t>(V));
      full_truth_hits += detail::argmax(lf) == t.tokens[static_cast<std::size_t>(row + 1)] ? 1 : 0;
      truth_n += 1;
    }
    for (index_t row : t.copy) {
      const std::span<const float> lf(t.full.data() + row * V, static_cast<std::size_t>(V));
      full_copy_hits += detail::argmax(lf) == t.tokens[static_cast<std::size_t>(row + 1)] ? 1 : 0;
    }
    copy_n += static_cast<index_t>(t.copy.size());
    texts.push_back(std::move(t));
  }
  r.full_copy = copy_n ? full_copy_hits / static_cast<double>(copy_n) : NAN;
  r.full_top1_truth = truth_n ? full_truth_hits / truth_n : NAN;
  r.copy_positions = copy_n;
  const std::size_t total = o.rules.size() * o.methods.size() * o.bits.size() * o.budgets.size();
  std::size_t done = 0;
  detail::for_each_variant(o, [&](Rule rule, Method meth, int b, int den) {
          Row row = detail::variant_row("stories260K", rule, meth, b, den);
          const KVConfig kv = detail::kv_config(meth, b, o, o.model_window);
          const detail::Plan plan = detail::plan_variant(shape, P, mc.layers, kv, den, rule, o.group);
          ++done;
          row.feasible = plan.feasible;
          if (!plan.feasible) {
            r.rows.push_back(row);
            return;
          }
          model::CacheConfig cfg;
          cfg.kv = kv;
          cfg.budget.kind = model::CacheBudget::Kind::capacity;
          cfg.budget.capacity = plan.capacity;
          // texts in parallel (each thread its own Session); per-text sums are added in text order
          const index_t nt = static_cast<index_t>(texts.size());
          std::vector<double> t_kl(static_cast<std::size_t>(nt)), t_agree(t_kl.size()), t_n(t_kl.size()), t_copy(t_kl.size());
          std::vector<std::string> t_err(t_kl.size());
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic)
#endif
          for (index_t ti = 0; ti < nt; ++ti) {
            const std::size_t i = static_cast<std::size_t>(ti);
            try {
              const Text& t = texts[i];
              const model::ScoreResult s = model::score(m, t.tokens, P, cfg);
              for (index_t l = 0; l < mc.layers; ++l)
                detail::require(static_cast<std::int64_t>(s.prefill_bytes[static_cast<std::size_t>(l)]) ==
                                    plan.bytes[static_cast<std::size_t>(l)],
                                "study: layer bytes", detail::concat("the planned footprint ", plan.bytes[static_cast<std::size_t>(l)]),
                                s.prefill_bytes[static_cast<std::size_t>(l)]);
              const index_t T = static_cast<index_t>(t.tokens.size());
              for (index_t rr = P; rr + 1 < T; ++rr) {
                const std::span<const float> lf(t.full.data() + rr * V, static_cast<std::size_t>(V));
                const std::span<const float> lc(s.logits.data() + rr * V, static_cast<std::size_t>(V));
                const std::vector<double> pf = log_softmax(lf), pc = log_softmax(lc);
                double k = 0;
                for (std::size_t v = 0; v < pf.size(); ++v) k += std::exp(pf[v]) * (pf[v] - pc[v]);
                t_kl[i] += std::max(0.0, k);
                t_agree[i] += detail::argmax(lf) == detail::argmax(lc) ? 1 : 0;
                t_n[i] += 1;
              }
              for (index_t rr : t.copy) {
                const std::span<const float> lc(s.logits.data() + rr * V, static_cast<std::size_t>(V));
                t_copy[i] += detail::argmax(lc) == t.tokens[static_cast<std::size_t>(rr + 1)] ? 1 : 0;
              }
            } catch (const std::exception& e) {
              t_err[i] = e.what();
            }
          }
          double kl = 0, agree = 0, n = 0, copy_hits = 0;
          for (std::size_t i = 0; i < t_kl.size(); ++i) {
            if (!t_err[i].empty()) throw Error(t_err[i]);
            kl += t_kl[i];
            agree += t_agree[i];
            n += t_n[i];
            copy_hits += t_copy[i];
          }
          if (rule == Rule::exact)
            detail::require(plan.mean_bytes() <= static_cast<double>(plan.budget), "study: bytes",
                            detail::concat("<= the budget ", plan.budget), plan.mean_bytes());
          row.capacity = static_cast<double>(plan.capacity);
          row.tokens = plan.mean_tokens();
          row.bytes = plan.mean_bytes();
          row.budget_bytes = static_cast<double>(plan.budget);
          row.bits_per_element = row.bytes * 8.0 / (2.0 * static_cast<double>(shape.kv_heads * shape.head_dim) * row.tokens);
          row.kl = kl / n;
          row.top1 = agree / n;
          row.copy = copy_n ? copy_hits / static_cast<double>(copy_n) : NAN;
          r.rows.push_back(row);
          if (done % 16 == 0 || done == total)
            log << "study: stories260K " << done << "/" << total << " variants (" << std::fixed << std::setprecision(1)
                << detail::seconds_since(t0) << " s)" << std::defaultfloat << std::endl;
  });
  r.model_seconds = detail::seconds_since(t0);
}

/// The whole study (see the header comment). Progress lines go to `log`.
inline StudyResults run(const StudyOptions& options, std::ostream& log) {
  StudyResults r;
  r.options = options.resolved();
  const StudyOptions& o = r.options;
  detail::require(!o.bits.empty() && !o.budgets.empty() && !o.methods.empty() && !o.rules.empty(), "study options",
                  "non-empty bits, budgets, methods and rules", "an empty list");
  for (int b : o.bits) detail::require(b == 16 || b == 8 || b == 4 || b == 2 || b == 3 || b == 1, "study bits", "1, 2, 3, 4, 8 or 16", b);
  if (o.model) run_model(o, r, log);
  if (o.retrieval) run_retrieval(o, r, log);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Writers

namespace detail {
inline std::string fmt(double x, int prec) {
  if (std::isnan(x)) return "—";
  std::ostringstream s;
  s << std::fixed << std::setprecision(prec) << x;
  return s.str();
}
inline const Row* find_row(const StudyResults& r, const std::string& bench, Rule rule, Method m, int bits, int den) {
  for (const Row& x : r.rows)
    if (x.bench == bench && x.rule == rule && x.method == m && x.bits == bits && x.budget == den) return &x;
  return nullptr;
}
}  // namespace detail

/// Paper-style tables: per benchmark, metric, rule and budget, rows = selector, columns = bits.
inline void write_markdown(const StudyResults& r, std::ostream& os) {
  const StudyOptions& o = r.options;
  struct Metric {
    const char* bench;
    const char* name;
    double Row::*field;
    int prec;
  };
  const Metric metrics[] = {
      {"retrieval", "retrieval rate (%)", &Row::retrieval, 1},
      {"retrieval", "needle kept (%)", &Row::needle_kept, 1},
      {"retrieval", "attention-output relative error", &Row::error, 3},
      {"stories260K", "KL(full || compressed), nats/token", &Row::kl, 4},
      {"stories260K", "top-1 agreement with the full cache (%)", &Row::top1, 1},
      {"stories260K", "long-range copy accuracy (%)", &Row::copy, 1},
  };
  for (const Metric& mt : metrics) {
    bool any = false;
    for (const Row& x : r.rows) any |= x.bench == mt.bench;
    if (!any) continue;
    const bool pct = std::string(mt.name).find("(%)") != std::string::npos;
    for (Rule rule : o.rules) {
      os << "\n### " << mt.bench << ": " << mt.name << " — " << rule_name(rule) << " accounting\n\n";
      os << "| budget | selector |";
      for (int b : o.bits) os << " " << b << "-bit |";
      os << "\n|---|---|";
      for (std::size_t i = 0; i < o.bits.size(); ++i) os << "---|";
      os << "\n";
      for (int den : o.budgets)
        for (Method m : o.methods) {
          os << "| 1/" << den << " | " << detail::method_label(m) << " |";
          for (int b : o.bits) {
            const Row* x = detail::find_row(r, mt.bench, rule, m, b, den);
            if (!x || !x->feasible) {
              os << " — |";
              continue;
            }
            const double v = x->*mt.field;
            os << " " << detail::fmt(pct ? 100.0 * v : v, mt.prec) << " (" << detail::fmt(x->tokens, 0) << ") |";
          }
          os << "\n";
        }
    }
  }
  os << "\nCells: metric (tokens kept per KV head; PyramidKV: the model mean). — = the budget cannot hold the selector's window.\n";
  if (!std::isnan(r.full_copy))
    os << "stories260K full cache: long-range copy accuracy " << detail::fmt(100 * r.full_copy, 1) << " % over "
       << r.copy_positions << " positions; next-token accuracy " << detail::fmt(100 * r.full_top1_truth, 1) << " %.\n";
  os << "Run time: stories260K " << detail::fmt(r.model_seconds, 1) << " s, retrieval " << detail::fmt(r.retrieval_seconds, 1)
     << " s.\n";
}

/// One line per Row.
inline void write_csv(const StudyResults& r, std::ostream& os) {
  os << "bench,rule,method,bits,budget,feasible,capacity,tokens,bytes,budget_bytes,bits_per_element,retrieval,needle_kept,"
        "error,kl,top1,copy\n";
  auto num = [](double x) { return std::isnan(x) ? std::string() : detail::concat(std::setprecision(8), x); };
  for (const Row& x : r.rows)
    os << x.bench << "," << rule_name(x.rule) << "," << method_name(x.method) << "," << x.bits << ",1/" << x.budget << ","
       << (x.feasible ? 1 : 0) << "," << num(x.capacity) << "," << num(x.tokens) << "," << num(x.bytes) << ","
       << num(x.budget_bytes) << "," << num(x.bits_per_element) << "," << num(x.retrieval) << "," << num(x.needle_kept)
       << "," << num(x.error) << "," << num(x.kl) << "," << num(x.top1) << "," << num(x.copy) << "\n";
}

/// One line per retrieval grid cell and variant.
inline void write_cells_csv(const StudyResults& r, std::ostream& os) {
  os << "rule,method,bits,budget,tokens,depth,retrieval,needle_kept,error\n";
  for (const Cell& c : r.cells)
    os << rule_name(c.rule) << "," << method_name(c.method) << "," << c.bits << ",1/" << c.budget << "," << c.tokens << ","
       << c.depth << "," << c.retrieval << "," << c.needle_kept << "," << c.error << "\n";
}

/// The rows, the options that matter and the timings as JSON.
inline void write_json(const StudyResults& r, std::ostream& os) {
  auto num = [](double x) { return std::isnan(x) ? std::string("null") : detail::concat(std::setprecision(8), x); };
  const StudyOptions& o = r.options;
  os << "{\n  \"quick\": " << (o.quick ? "true" : "false") << ",\n  \"lengths\": [";
  for (std::size_t i = 0; i < o.lengths.size(); ++i) os << (i ? ", " : "") << o.lengths[i];
  os << "],\n  \"depths\": [";
  for (std::size_t i = 0; i < o.depths.size(); ++i) os << (i ? ", " : "") << o.depths[i];
  os << "],\n  \"texts\": " << o.texts << ",\n  \"prefix\": " << o.prefix << ",\n  \"full_copy\": " << num(r.full_copy)
     << ",\n  \"full_top1_truth\": " << num(r.full_top1_truth) << ",\n  \"copy_positions\": " << r.copy_positions
     << ",\n  \"retrieval_seconds\": " << num(r.retrieval_seconds) << ",\n  \"model_seconds\": " << num(r.model_seconds)
     << ",\n  \"rows\": [\n";
  for (std::size_t i = 0; i < r.rows.size(); ++i) {
    const Row& x = r.rows[i];
    os << "    {\"bench\": \"" << x.bench << "\", \"rule\": \"" << rule_name(x.rule) << "\", \"method\": \""
       << method_name(x.method) << "\", \"bits\": " << x.bits << ", \"budget\": " << x.budget
       << ", \"feasible\": " << (x.feasible ? "true" : "false") << ", \"capacity\": " << num(x.capacity)
       << ", \"tokens\": " << num(x.tokens) << ", \"bytes\": " << num(x.bytes) << ", \"budget_bytes\": " << num(x.budget_bytes)
       << ", \"bits_per_element\": " << num(x.bits_per_element) << ", \"retrieval\": " << num(x.retrieval)
       << ", \"needle_kept\": " << num(x.needle_kept) << ", \"error\": " << num(x.error) << ", \"kl\": " << num(x.kl)
       << ", \"top1\": " << num(x.top1) << ", \"copy\": " << num(x.copy) << "}" << (i + 1 < r.rows.size() ? "," : "") << "\n";
  }
  os << "  ]\n}\n";
}

/// A gnuplot script drawing the paper-style figures from study.csv: x = budget (log scale), y =
/// metric, one line per precision, one panel per selector (exact accounting).
inline void write_gnuplot(const StudyResults& r, std::ostream& os) {
  const StudyOptions& o = r.options;
  os << "# gnuplot study.gp  (reads study.csv; writes study_<bench>.png)\nset datafile separator ','\nset terminal pngcairo size 1400,900\n"
        "set logscale x 2\nset xlabel 'budget (fraction of the fp16 cache)'\nset key bottom right\nset grid\n";
  struct Fig {
    const char* bench;
    int column;
    const char* label;
  };
  const Fig figs[] = {{"retrieval", 12, "retrieval rate"}, {"stories260K", 15, "KL(full || compressed)"}};
  for (const Fig& f : figs) {
    bool any = false;
    for (const Row& x : r.rows) any |= x.bench == f.bench;
    if (!any) continue;
    os << "set output 'study_" << f.bench << ".png'\nset multiplot layout 2,2 title '" << f.bench
       << " — exact byte accounting'\nset ylabel '" << f.label << "'\n";
    for (Method m : o.methods) {
      os << "set title '" << detail::method_label(m) << "'\nplot ";
      for (std::size_t i = 0; i < o.bits.size(); ++i)
        os << (i ? ", " : "") << "'study.csv' using ( (strcol(1) eq '" << f.bench << "' && strcol(2) eq 'exact' && strcol(3) eq '"
           << method_name(m) << "' && $4 == " << o.bits[i] << " && $6 == 1) ? 1.0/real(substr(strcol(5),3,10)) : 1/0 ):"
           << f.column << " with linespoints title '" << o.bits[i] << "-bit'";
      os << "\n";
    }
    os << "unset multiplot\n";
  }
}

/// Writes study.md, study.csv, retrieval_cells.csv, study.json and study.gp into `dir` (created),
/// and runs gnuplot there when options.gnuplot and gnuplot is found. Returns the files written.
inline std::vector<std::string> write_outputs(const StudyResults& r, const std::string& dir) {
  namespace fs = std::filesystem;
  fs::create_directories(dir);
  std::vector<std::string> files;
  auto put = [&](const char* name, auto&& writer) {
    const std::string p = (fs::path(dir) / name).string();
    std::ofstream f(p);
    if (!f) throw Error(detail::concat("qpkv: study: cannot write '", p, "'"));
    writer(r, f);
    files.push_back(p);
  };
  put("study.md", [](const StudyResults& x, std::ostream& s) { write_markdown(x, s); });
  put("study.csv", [](const StudyResults& x, std::ostream& s) { write_csv(x, s); });
  put("retrieval_cells.csv", [](const StudyResults& x, std::ostream& s) { write_cells_csv(x, s); });
  put("study.json", [](const StudyResults& x, std::ostream& s) { write_json(x, s); });
  put("study.gp", [](const StudyResults& x, std::ostream& s) { write_gnuplot(x, s); });
  if (r.options.gnuplot && std::system("command -v gnuplot >/dev/null 2>&1") == 0) {
    const std::string cmd = "cd '" + dir + "' && gnuplot study.gp";
    if (std::system(cmd.c_str()) == 0)
      for (const char* png : {"study_retrieval.png", "study_stories260K.png"})
        if (fs::exists(fs::path(dir) / png)) files.push_back((fs::path(dir) / png).string());
  }
  return files;
}

}  // namespace qpkv::study
