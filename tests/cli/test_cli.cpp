// The `qpkv` command-line tool, run as a user runs it (std::system on the built binary): its
// outputs on the shared case-a conformance data equal the reference code's selections and KIVI's /
// HQQ's quantization, every subcommand has --help, and bad input gives a non-zero exit code and a
// message naming the argument.
#include <doctest/doctest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "cli_util.hpp"
#include "qpkv/io/npy.hpp"
#include "qpkv/io/safetensors.hpp"

using namespace qpkv;

namespace {

const std::string kData = QPKV_TEST_DATA;
const std::string kConf = kData + "/conformance/";
const std::string kKeys = kConf + "inputs_a_key_states.npy";
const std::string kQueries = kConf + "inputs_a_query_states.npy";
const std::string kValues = kConf + "inputs_a_value_states.npy";

using cli_test::qpkv_run;
using cli_test::Run;
using cli_test::slurp;
using cli_test::work;

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

struct Table {
  std::vector<std::int64_t> shape;
  std::vector<std::int64_t> i;
  std::vector<float> f;
};
Table load(const std::string& path) {
  const io::NpyArray a = io::load_npy(path);
  Table t{a.shape, {}, {}};
  if (a.dtype == "i8") t.i = a.as<std::int64_t>();
  else t.f = a.as<float>();
  return t;
}

/// The conformance README's tie-aware rule on one head: every prefix token scoring above the k-th
/// score is kept, and exactly k - #(above) of those equal to it. `ambiguous`: tied tokens straddle the cut.
struct TieCheck {
  bool valid = false, ambiguous = false;
};
TieCheck tie_aware(const float* scores, std::int64_t prefix, const std::vector<std::int64_t>& kept_prefix) {
  const auto k = static_cast<std::int64_t>(kept_prefix.size());
  if (k == 0) return {true, false};
  std::vector<float> sorted(scores, scores + prefix);
  std::sort(sorted.begin(), sorted.end(), std::greater<>());
  const float kth = sorted[static_cast<std::size_t>(k - 1)];
  const auto above = std::count_if(sorted.begin(), sorted.end(), [&](float s) { return s > kth; });
  const auto equal = std::count(sorted.begin(), sorted.end(), kth);
  std::int64_t kept_above = 0, kept_equal = 0;
  for (std::int64_t t : kept_prefix) {
    if (scores[t] > kth) ++kept_above;
    else if (scores[t] == kth) ++kept_equal;
  }
  return {kept_above == above && kept_equal == k - above, equal > k - above};
}

}  // namespace

TEST_CASE("every subcommand has --help and exits 0") {
  for (const char* sub : {"plan", "select", "quantize", "score", "generate", "study", "save", "inspect"}) {
    CAPTURE(sub);
    const Run r = qpkv_run(std::string(sub) + " --help");
    CHECK(r.rc == 0);
    CHECK(contains(r.out, std::string("Usage: qpkv ") + sub));
  }
  const Run top = qpkv_run("--help");
  CHECK(top.rc == 0);
  for (const char* sub : {"plan", "select", "quantize", "score", "generate", "study", "save", "inspect"}) CHECK(contains(top.out, sub));
  CHECK(qpkv_run("").rc == 2);  // a subcommand is required
  CHECK(qpkv_run("no-such-command").rc == 2);
}

TEST_CASE("plan: exact accounting vs the paper's nominal rule (8 KV heads, head_dim 128, 32K tokens, 1/8)") {
  const Run r = qpkv_run("plan --tokens 32768 --kv-heads 8 --head-dim 128 --budget 1/8 --bits 16,8,4,2");
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(contains(r.out, "budget: 16777216 bytes"));
  // the README's table (format_plan), one line per bit width
  CHECK(contains(r.out, "  16 |       4096     16777216    16.000 |       4096     16777216    16.000   yes"));
  CHECK(contains(r.out, "   8 |       7274     16777216     9.010 |       8192     18874368     9.000    NO"));
  CHECK(contains(r.out, "   4 |      13094     16777216     5.005 |      16384     20971520     5.000    NO"));
  CHECK(contains(r.out, "   2 |      21828     16777216     3.002 |      32768     25165824     3.000    NO"));
  // the same budget in bytes gives the same table
  const Run bytes = qpkv_run("plan --tokens 32768 --kv-heads 8 --head-dim 128 --budget 16777216 --bits 16,8,4,2");
  REQUIRE(bytes.rc == 0);
  CHECK(contains(bytes.out, "   4 |      13094     16777216     5.005 |"));
}

TEST_CASE("plan: bad budgets and sizes are errors naming the option") {
  const struct {
    const char* args;
    int rc;
    const char* message;
  } cases[] = {
      {"--tokens 4096 --kv-heads 8 --head-dim 128 --budget 1/0", 1, "--budget: expected a positive fraction"},
      {"--tokens 4096 --kv-heads 8 --head-dim 128 --budget half", 1, "--budget: expected a fraction NUM/DEN"},
      {"--tokens 4096 --kv-heads 8 --head-dim 128 --budget 10", 1, "budget: expected >= "},
      {"--tokens 0 --kv-heads 8 --head-dim 128 --budget 1/8", 1, "--tokens: expected > 0, got 0"},
      {"--tokens 4096 --kv-heads 8 --head-dim 128 --budget 1/8 --bits 5", 1, "--bits: expected each of 1, 2, 3, 4, 8, 16, got 5"},
      {"--tokens 4096 --kv-heads 8 --head-dim 128", 2, "--budget is required"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    const Run r = qpkv_run(std::string("plan ") + c.args);
    CAPTURE(r.err);
    CHECK(r.rc == c.rc);
    CHECK(contains(r.err, c.message));
  }
}

TEST_CASE("select reproduces the reference code's selections on case a (tie-aware, as the conformance README)") {
  const struct {
    std::string stem;    // after "sel_a_"
    std::string scores;  // after "scores_a_"; empty for StreamingLLM
    std::int64_t window;
    std::string args;
  } configs[] = {
      {"snapkv_cap128_w32_k5_avg", "snap_w32_k5_avg", 32, "--method snapkv --capacity 128 --window 32 --kernel 5 --pooling avg"},
      {"snapkv_cap128_w32_k5_max", "snap_w32_k5_max", 32, "--method snapkv --capacity 128 --window 32 --kernel 5 --pooling max"},
      {"snapkv_cap256_w32_k5_avg", "snap_w32_k5_avg", 32, "--method snapkv --capacity 256 --window 32 --kernel 5 --pooling avg"},
      {"snapkv_cap256_w32_k5_max", "snap_w32_k5_max", 32, "--method snapkv --capacity 256 --window 32 --kernel 5 --pooling max"},
      {"h2o_cap128_w32", "h2o_w32", 32, "--method h2o --capacity 128 --window 32 --h2o-mask reference"},
      {"streamingllm_cap128_w32", "", 32, "--method streamingllm --capacity 128 --window 32 --streaming-reference"},
      {"pyramidkv_cap128_w32_k5_avg_L0of32", "snap_w32_k5_avg", 32, "--method pyramidkv --capacity 128 --window 32 --kernel 5 --pooling avg --layer 0 --layers 32 --beta 20"},
      {"pyramidkv_cap128_w32_k5_avg_L15of32", "snap_w32_k5_avg", 32, "--method pyramidkv --capacity 128 --window 32 --kernel 5 --pooling avg --layer 15 --layers 32 --beta 20"},
      {"pyramidkv_cap128_w32_k5_avg_L31of32", "snap_w32_k5_avg", 32, "--method pyramidkv --capacity 128 --window 32 --kernel 5 --pooling avg --layer 31 --layers 32 --beta 20"},
      {"snapkv_cap128_w8_k7_max", "snap_w8_k7_max", 8, "--method snapkv --capacity 128 --window 8 --kernel 7 --pooling max"},
      {"h2o_cap128_w8", "h2o_w8", 8, "--method h2o --capacity 128 --window 8 --h2o-mask reference"},
      {"streamingllm_cap128_w124", "", 124, "--method streamingllm --capacity 128 --window 124 --streaming-reference"},
      {"pyramidkv_cap128_w8_k7_max_L0of32", "snap_w8_k7_max", 8, "--method pyramidkv --capacity 128 --window 8 --kernel 7 --pooling max --layer 0 --layers 32"},
      {"pyramidkv_cap128_w8_k7_max_L15of32", "snap_w8_k7_max", 8, "--method pyramidkv --capacity 128 --window 8 --kernel 7 --pooling max --layer 15 --layers 32"},
      {"pyramidkv_cap128_w8_k7_max_L31of32", "snap_w8_k7_max", 8, "--method pyramidkv --capacity 128 --window 8 --kernel 7 --pooling max --layer 31 --layers 32"},
  };
  int exact = 0;
  for (const auto& c : configs) {
    CAPTURE(c.stem);
    const std::string out = work("sel_" + c.stem + ".npy");
    const Run r = qpkv_run("select --keys " + kKeys + " --queries " + kQueries + " " + c.args + " --out " + out);
    CAPTURE(r.err);
    REQUIRE(r.rc == 0);
    const Table got = load(out), want = load(kConf + "selection/sel_a_" + c.stem + ".npy");
    REQUIRE(got.shape == want.shape);
    REQUIRE(!got.i.empty());
    const std::int64_t heads = want.shape[0], kept = want.shape[1], prefix = 512 - c.window;
    bool same = true;
    for (std::int64_t h = 0; h < heads; ++h) {
      CAPTURE(h);
      const std::vector<std::int64_t> row(got.i.begin() + h * kept, got.i.begin() + (h + 1) * kept);
      const std::vector<std::int64_t> want_row(want.i.begin() + h * kept, want.i.begin() + (h + 1) * kept);
      CHECK(std::is_sorted(row.begin(), row.end()));
      CHECK(std::equal(row.end() - c.window, row.end(), want_row.end() - c.window));  // the window
      same = same && row == want_row;
      if (c.scores.empty()) {
        CHECK(row == want_row);
        continue;
      }
      const Table scores = load(kConf + "selection/scores_a_" + c.scores + ".npy");
      const TieCheck t = tie_aware(scores.f.data() + h * prefix, prefix, {row.begin(), row.end() - c.window});
      CHECK(t.valid);
      if (!t.ambiguous) CHECK(row == want_row);  // a unique top-k must match exactly
    }
    exact += same;
  }
  MESSAGE(exact << " of 15 configurations identical to the seed; the rest differ only among tied scores");
  CHECK(exact >= 11);
}

TEST_CASE("select reads FILE.safetensors:NAME and float16 inputs (exact in fp16) with the same result") {
  const io::NpyArray k = io::load_npy(kKeys), q = io::load_npy(kQueries);
  // the case-a inputs lie on the fp16 grid, so a float16 copy holds the same numbers
  auto to_f16 = [](const io::NpyArray& a) {
    io::NpyArray h;
    h.dtype = "f2";
    h.shape = {a.shape[1], a.shape[2], a.shape[3]};  // (H, N, D): the 3-D form
    const std::vector<float> f = a.as<float>();
    h.bytes.resize(f.size() * 2);
    for (std::size_t i = 0; i < f.size(); ++i) {
      const half x = to_half(f[i]);
      std::memcpy(h.bytes.data() + 2 * i, &x.bits, 2);
    }
    return h;
  };
  const std::string st = work("case_a.safetensors");
  io::save_safetensors(st, {{"model.layers.0.k", k}, {"model.layers.0.q", q}, {"k16", to_f16(k)}, {"q16", to_f16(q)}});
  const std::string args = " --method snapkv --capacity 128 --window 32";
  const std::string a = work("sel_npy.npy"), b = work("sel_st.npy"), c = work("sel_f16.npy");
  REQUIRE(qpkv_run("select --keys " + kKeys + " --queries " + kQueries + args + " --out " + a).rc == 0);
  const Run r1 = qpkv_run("select --keys " + st + ":model.layers.0.k --queries " + st + ":model.layers.0.q" + args + " --out " + b);
  CAPTURE(r1.err);
  REQUIRE(r1.rc == 0);
  const Run r2 = qpkv_run("select --keys " + st + ":k16 --queries " + st + ":q16" + args + " --out " + c);
  CAPTURE(r2.err);
  REQUIRE(r2.rc == 0);
  CHECK(load(a).i == load(b).i);
  CHECK(load(a).i == load(c).i);
  CHECK(load(a).i == load(kConf + "selection/sel_a_snapkv_cap128_w32_k5_avg.npy").i);
  // a missing name lists what the file has
  const Run missing = qpkv_run("select --keys " + st + ":nope --method keep_all --out " + c);
  CHECK(missing.rc == 1);
  CHECK(contains(missing.err, "--keys: "));
  CHECK(contains(missing.err, "no tensor 'nope' (the file has: model.layers.0.k, model.layers.0.q, k16, q16)"));
}

TEST_CASE("select: keep_all and streamingllm need no queries; sinks mode keeps sinks + recent tokens") {
  const std::string out = work("sel_sinks.npy");
  const Run r = qpkv_run("select --keys " + kKeys + " --method streamingllm --capacity 10 --sinks 4 --out " + out);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  const Table t = load(out);
  CHECK(t.shape == std::vector<std::int64_t>{4, 10});
  CHECK(std::vector<std::int64_t>(t.i.begin(), t.i.begin() + 10) ==
        std::vector<std::int64_t>{0, 1, 2, 3, 506, 507, 508, 509, 510, 511});
  REQUIRE(qpkv_run("select --keys " + kKeys + " --method keep_all --out " + out).rc == 0);
  CHECK(load(out).shape == std::vector<std::int64_t>{4, 512});
}

TEST_CASE("select: bad input gives a non-zero exit code and names the argument") {
  const std::string out = work("sel_bad.npy");
  const std::string kq = " --keys " + kKeys + " --queries " + kQueries;
  const std::string sel = kConf + "selection/sel_a_h2o_cap128_w8.npy";  // int64 (4, 128)
  const struct {
    std::string args;
    int rc;
    const char* message;
  } cases[] = {
      {"--keys " + sel + " --method keep_all", 1, "--keys: expected shape (1,H,N,D) or (H,N,D), got (4, 128)"},
      {"--keys " + kKeys + " --queries " + sel + " --method snapkv --capacity 128", 1, "--queries: expected shape (1,Hq,N,D) or (Hq,N,D), got (4, 128)"},
      {"--keys " + kKeys + " --queries " + kValues.substr(0, kValues.size() - 4) + "_missing.npy --method snapkv --capacity 128", 1, "--queries: cannot open"},
      {"--keys " + kKeys + " --method snapkv --capacity 128", 2, "--queries: required for --method snapkv"},
      {kq + " --method snapkv", 2, "--capacity: required for --method snapkv"},
      {kq + " --method snapkv --capacity 16", 1, "--capacity: expected >= window (32), got 16"},
      {kq + " --method snapkv --capacity 128 --kernel 4", 1, "--kernel: expected an odd size >= 1, got 4"},
      {kq + " --method h2o --capacity 128 --kernel 5", 2, "--kernel: does not apply to --method h2o (it applies to snapkv, pyramidkv)"},
      {kq + " --method streamingllm --capacity 128 --window 32", 2, "--window: does not apply to --method streamingllm"},
      {kq + " --method pyramidkv --capacity 128 --layer 32 --layers 32", 1, "--layer: expected in [0, 32), got 32"},
      {kq + " --method snapkv --capacity 128 --pooling median", 2, "--pooling"},
      {kq + " --method magic --capacity 128", 2, "--method"},
      {kq + " --method streamingllm --capacity 128 --sinks 4 --streaming-reference", 2, "excludes"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    const Run r = qpkv_run("select " + c.args + " --out " + out);
    CAPTURE(r.err);
    CHECK(r.rc == c.rc);
    CHECK(contains(r.err, c.message));
  }
  // queries that do not fit the keys
  const io::NpyArray q = io::load_npy(kQueries);
  io::NpyArray q3 = q;
  q3.shape = {3, 512, 64};  // 3 query heads for 4 KV heads
  q3.bytes.resize(3 * 512 * 64 * 4);
  io::NpyArray qshort = q;
  qshort.shape = {4, 16, 64};  // fewer rows than the window
  qshort.bytes.resize(4 * 16 * 64 * 4);
  const std::string st = work("bad_queries.safetensors");
  io::save_safetensors(st, {{"q3", q3}, {"qshort", qshort}});
  const Run heads = qpkv_run("select --keys " + kKeys + " --queries " + st + ":q3 --method snapkv --capacity 128 --out " + out);
  CHECK(heads.rc == 1);
  CHECK(contains(heads.err, "--queries: expected a multiple of the 4 KV heads of --keys as query heads, got 3"));
  const Run rows = qpkv_run("select --keys " + kKeys + " --queries " + st + ":qshort --method snapkv --capacity 128 --out " + out);
  CHECK(rows.rc == 1);
  CHECK(contains(rows.err, "--queries: expected >= 32 rows"));
  const Run h2o = qpkv_run("select --keys " + kKeys + " --queries " + st + ":qshort --method h2o --capacity 128 --out " + out);
  CHECK(h2o.rc == 1);
  CHECK(contains(h2o.err, "--queries: expected >= 512 rows (h2o reads every prompt query)"));
}

namespace {

/// Element (h, t, c) of the stored quant_ref slice (heads 0-1, tokens 0-255) in a (1, 4, 512, 64)
/// array; for the parameters, rows/full_rows are the (group-)row counts of the slice / the full tensor.
std::int64_t full_index(std::int64_t i, std::int64_t rows, std::int64_t full_rows, std::int64_t cols) {
  const std::int64_t h = i / (rows * cols), r = (i / cols) % rows, c = i % cols;
  return (h * full_rows + r) * cols + c;
}

struct QuantOut {
  Table codes, scale, zero, deq;
};

QuantOut quantize(const std::string& input, const std::string& args) {
  const std::string c = work("q_codes.npy"), s = work("q_scale.npy"), z = work("q_zero.npy"), d = work("q_deq.npy");
  const Run r = qpkv_run("quantize --input " + input + " " + args + " --codes " + c + " --scale " + s + " --zero " + z +
                         " --deq " + d);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  return {load(c), load(s), load(z), load(d)};
}

}  // namespace

TEST_CASE("quantize --zero-point minmax equals KIVI's quant_and_pack bit for bit (codes, scale, mn, deq)") {
  const struct {
    char tensor;
    int bits;
    int group;
  } cases[] = {{'K', 4, 32}, {'K', 2, 64}, {'V', 4, 32}, {'V', 8, 64}};
  for (const auto& c : cases) {
    const std::string stem = std::string("kivi_") + c.tensor + "_b" + std::to_string(c.bits) + "_g" + std::to_string(c.group);
    CAPTURE(stem);
    const bool key = c.tensor == 'K';
    const QuantOut q = quantize(key ? kKeys : kValues, std::string("--axis ") + (key ? "channel" : "token") + " --bits " +
                                                            std::to_string(c.bits) + " --group " + std::to_string(c.group) +
                                                            " --zero-point minmax");
    CHECK(q.codes.shape == std::vector<std::int64_t>{1, 4, 512, 64});
    CHECK(q.scale.shape == (key ? std::vector<std::int64_t>{1, 4, 512 / c.group, 64} : std::vector<std::int64_t>{1, 4, 512, 64 / c.group}));
    const std::string ref = kData + "/quant_ref/" + stem + "_";
    const Table codes = load(ref + "codes.npy"), deq = load(ref + "deq.npy"), scale = load(ref + "scale.npy"),
                mn = load(ref + "mn.npy");
    std::size_t code_diff = 0, deq_diff = 0, param_diff = 0;
    for (std::int64_t i = 0; i < 2 * 256 * 64; ++i) {
      const std::int64_t j = full_index(i, 256, 512, 64);
      code_diff += static_cast<std::int64_t>(q.codes.f[static_cast<std::size_t>(j)]) != static_cast<std::int64_t>(codes.f[static_cast<std::size_t>(i)]);
      deq_diff += q.deq.f[static_cast<std::size_t>(j)] != deq.f[static_cast<std::size_t>(i)];
    }
    const std::int64_t rows = key ? 256 / c.group : 256, full_rows = key ? 512 / c.group : 512, cols = key ? 64 : 64 / c.group;
    for (std::int64_t i = 0; i < 2 * rows * cols; ++i) {
      const auto j = static_cast<std::size_t>(full_index(i, rows, full_rows, cols));
      param_diff += q.scale.f[j] != scale.f[static_cast<std::size_t>(i)] || q.zero.f[j] != mn.f[static_cast<std::size_t>(i)];
    }
    CHECK(code_diff == 0);
    CHECK(deq_diff == 0);
    CHECK(param_diff == 0);
  }
}

TEST_CASE("quantize --zero-point hqq equals hqq: optimize=False bit for bit in codes, the solver within tolerance") {
  for (const bool optimize : {false, true})
    for (const char tensor : {'K', 'V'}) {
      const std::string stem = std::string(optimize ? "hqqopt_" : "hqqmm_") + tensor + "_b4_g32";
      CAPTURE(stem);
      const bool key = tensor == 'K';
      const QuantOut q = quantize(key ? kKeys : kValues, std::string("--axis ") + (key ? "channel" : "token") +
                                                             " --bits 4 --group 32 --zero-point hqq" +
                                                             (optimize ? "" : " --hqq-iters 0"));
      const std::string ref = kData + "/quant_ref/" + stem + "_";
      const Table codes = load(ref + "codes.npy"), deq = load(ref + "deq.npy"), scale = load(ref + "scale.npy"),
                  zero = load(ref + "zero.npy");
      std::size_t code_diff = 0;
      double worst_deq = 0, worst_zero = 0, worst_scale = 0;
      for (std::int64_t i = 0; i < 2 * 256 * 64; ++i) {
        const auto j = static_cast<std::size_t>(full_index(i, 256, 512, 64));
        code_diff += q.codes.f[j] != codes.f[static_cast<std::size_t>(i)];
        worst_deq = std::max(worst_deq, std::abs(double(q.deq.f[j]) - deq.f[static_cast<std::size_t>(i)]));
      }
      const std::int64_t rows = key ? 8 : 256, full_rows = key ? 16 : 512, cols = key ? 64 : 2;
      for (std::int64_t i = 0; i < 2 * rows * cols; ++i) {
        const auto j = static_cast<std::size_t>(full_index(i, rows, full_rows, cols));
        worst_scale = std::max(worst_scale, std::abs(double(q.scale.f[j]) - scale.f[static_cast<std::size_t>(i)]));
        worst_zero = std::max(worst_zero, std::abs(double(q.zero.f[j]) - zero.f[static_cast<std::size_t>(i)]));
      }
      CAPTURE(code_diff);
      CAPTURE(worst_deq);
      CAPTURE(worst_zero);
      if (!optimize) CHECK(code_diff == 0);
      else CHECK(double(code_diff) <= 1e-3 * 2 * 256 * 64);  // the README's tolerance for the solver
      CHECK(worst_scale == 0.0);        // the solver never changes the scale
      CHECK(worst_zero < 1e-4);         // zero = -min / scale, recovered from float32 storage
      CHECK(worst_deq < 1e-5);          // code * scale + min vs (code - zero) * scale: rounding only
    }
}

TEST_CASE("quantize: 2-D input, groups that do not divide D, and errors naming the argument") {
  // 2-D (tokens, channels) through safetensors
  io::NpyArray x;
  x.dtype = "f4";
  x.shape = {64, 10};
  std::vector<float> v(640);
  for (std::size_t i = 0; i < v.size(); ++i) v[i] = static_cast<float>((i * 37) % 101) / 7.0f - 5.0f;
  x.bytes.resize(v.size() * 4);
  std::memcpy(x.bytes.data(), v.data(), x.bytes.size());
  const std::string st = work("x2d.safetensors");
  io::save_safetensors(st, {{"x", x}});
  const std::string s = work("q2_scale.npy"), d = work("q2_deq.npy");
  Run r = qpkv_run("quantize --input " + st + " --axis token --bits 8 --group 4 --scale " + s + " --deq " + d);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(load(s).shape == std::vector<std::int64_t>{64, 3});  // groups of 4, 4, 2 channels
  CHECK(load(d).shape == std::vector<std::int64_t>{64, 10});
  r = qpkv_run("quantize --input " + st + ":x --axis channel --bits 2 --group 16 --scale " + s);
  REQUIRE(r.rc == 0);
  CHECK(load(s).shape == std::vector<std::int64_t>{4, 10});

  const struct {
    std::string args;
    int rc;
    std::string message;
  } cases[] = {
      {"--input " + kKeys + " --axis channel --bits 4 --group 48 --deq " + d, 1, "--group: expected a divisor of the 512 tokens of --input"},
      {"--input " + kKeys + " --axis token --bits 4 --group 128 --deq " + d, 1, "--group: expected <= the 64 channels"},
      {"--input " + kKeys + " --axis channel --bits 5 --group 32 --deq " + d, 2, "--bits"},
      {"--input " + kKeys + " --axis diagonal --bits 4 --group 32 --deq " + d, 2, "--axis"},
      {"--input " + kKeys + " --axis channel --bits 4 --group 32", 2, "expected at least one output"},
      {"--input " + kKeys + " --axis channel --bits 4 --group 32 --hqq-iters 3 --deq " + d, 2, "--hqq-iters"},
      {"--input " + kConf + "selection/sel_a_h2o_cap128_w8.npy --axis token --bits 4 --group 32 --deq " + d, 1,
       "--input: expected float32 or float16 elements, got dtype i8"},
      {"--input " + st + ":y --axis token --bits 4 --group 2 --deq " + d, 1, "--input: " + st + ": no tensor 'y'"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    const Run e = qpkv_run("quantize " + c.args);
    CAPTURE(e.err);
    CHECK(e.rc == c.rc);
    CHECK(contains(e.err, c.message));
  }
}
