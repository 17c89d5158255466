// `qpkv score`, `qpkv generate` and `qpkv study` on the shipped stories260K model: golden logits and
// greedy text of the independent reference (tests/data/tinyllm), KeepAll + fp16 through the CLI equal
// to the uncompressed model, --kv CONFIG errors, and a small study run whose outputs are well-formed.
#include <doctest/doctest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "cli_util.hpp"
#include "qpkv/io/npy.hpp"
#include "qpkv/model/llama.hpp"
#include "qpkv/model/session.hpp"

using namespace qpkv;

namespace {

const std::string kTiny = std::string(QPKV_TEST_DATA) + "/tinyllm/";
const std::string kModel = std::string(QPKV_SOURCE_DIR) + "/models/stories260K/stories260K.bin";

using cli_test::Run;
using cli_test::slurp;
using cli_test::work;

Run qpkv_run(const std::string& args) { return cli_test::qpkv_run(args, "model_"); }

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double m = 0;
  for (std::size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(double(a[i]) - b[i]));
  return m;
}

}  // namespace

TEST_CASE("score: golden logits of stories260K within 1e-3; KeepAll + fp16 equals the uncompressed model exactly") {
  const std::string tokens = kTiny + "story1.tokens.npy";
  const std::vector<float> golden = io::load_npy(kTiny + "story1.logits.npy").as<float>();
  const std::vector<int> ids = io::load_npy(tokens).as<int>();
  const model::Llama m = model::Llama::load(kModel);

  // every token prefilled: the float32 model; bit for bit what the library's uncompressed reference computes
  const std::string full = work("logits_full.npy");
  Run r = qpkv_run("score --tokens " + tokens + " --prefix 512 --kv keep_all,fp16 --out " + full);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  const io::NpyArray a = io::load_npy(full);
  CHECK(a.dtype == "f4");
  CHECK(a.shape == std::vector<std::int64_t>{512, 512});
  const std::vector<float> logits = a.as<float>();
  CHECK(max_abs_diff(logits, golden) < 1e-3);
  CHECK(logits == model::reference_score(m, ids, model::KVRounding::none));

  // every token decoded through the KeepAll + fp16 cache: the fp16-KV model, up to float32 summation order
  const std::string decoded = work("logits_decoded.npy");
  r = qpkv_run("score --tokens " + tokens + " --prefix 0 --out " + decoded);  // keep_all,fp16 is the default
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(contains(r.out, "cache: keep_all,fp16"));
  const std::vector<float> dec = io::load_npy(decoded).as<float>();
  // K and V rounded to half: |k| reaches 27 where a half step is 2^-6, so logits move by a few 1e-2
  // (tests/test_model.cpp measures max 0.049); the predicted tokens stay the same
  CHECK(max_abs_diff(dec, golden) < 0.06);
  int same = 0;
  for (std::size_t t = 0; t < 512; ++t) {
    const auto a = dec.begin() + static_cast<std::ptrdiff_t>(t * 512), b = golden.begin() + static_cast<std::ptrdiff_t>(t * 512);
    same += std::max_element(a, a + 512) - a == std::max_element(b, b + 512) - b;
  }
  CHECK(same >= 505);
}

TEST_CASE("score: a compressed prefix changes only the decoded rows; the plan is printed") {
  const std::string tokens = kTiny + "story1.tokens.npy";
  const std::string full = work("logits_full2.npy"), comp = work("logits_snap4.npy");
  REQUIRE(qpkv_run("score --tokens " + tokens + " --prefix 384 --out " + full).rc == 0);
  const Run r = qpkv_run("score --tokens " + tokens + " --prefix 384 --kv snapkv,kivi4,budget=1/4,window=8 --out " + comp);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(contains(r.out, "budget 12288 bytes per layer"));
  CHECK(contains(r.out, "= 0.2500 of the fp16 cache"));
  const std::vector<float> a = io::load_npy(full).as<float>(), b = io::load_npy(comp).as<float>();
  CHECK(std::equal(a.begin(), a.begin() + 384 * 512, b.begin()));       // prefill rows: exact attention
  CHECK(!std::equal(a.begin() + 384 * 512, a.end(), b.begin() + 384 * 512));  // decoded rows see the compressed cache
}

TEST_CASE("generate: greedy from BOS reproduces the reference text exactly; the prompt is echoed") {
  Run r = qpkv_run("generate --prompt \"\" --steps 200");
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(r.out == slurp(kTiny + "greedy_bos_200.txt") + "\n");
  r = qpkv_run("generate --prompt \"Once upon a time\" --steps 20 --kv snapkv,kivi4,capacity=8,window=8 --stats");
  REQUIRE(r.rc == 0);
  CHECK(r.out.starts_with("Once upon a time"));
  CHECK(contains(r.err, "cache: snapkv,kivi4"));
  CHECK(contains(r.err, "generated 20 tokens"));
  // sampling is reproducible by seed
  const Run s1 = qpkv_run("generate --prompt \"The dog\" --steps 30 --temperature 1 --seed 7");
  const Run s2 = qpkv_run("generate --prompt \"The dog\" --steps 30 --temperature 1 --seed 7");
  REQUIRE(s1.rc == 0);
  CHECK(s1.out == s2.out);
}

TEST_CASE("score/generate: bad --kv configs and inputs are errors naming the argument") {
  const std::string tokens = kTiny + "story1.tokens.npy", out = work("bad_logits.npy");
  const struct {
    std::string args;
    int rc;
    std::string message;
  } cases[] = {
      {"score --tokens " + tokens + " --kv snapkv,kivi4,budget=1/8,colour=red --out " + out, 1,
       "--kv: CacheConfig key: expected one of group, residual, zero, outliers, outlier_threshold, window, kernel, "
       "pooling, beta, mask, streaming, sinks, precision, budget, capacity, accounting, got 'colour'"},
      {"score --tokens " + tokens + " --kv snapkv,kivi5,budget=1/8 --out " + out, 1, "--kv: KVConfig token 2"},
      {"score --tokens " + tokens + " --kv snapkv,kivi4 --out " + out, 1, "--kv: CacheConfig.budget: expected budget= or capacity="},
      {"score --tokens " + tokens + " --kv magic,kivi4 --out " + out, 1, "--kv: KVConfig.method: expected one of keep_all"},
      {"score --tokens " + tokens + " --kv snapkv,kivi4,budget=10 --prefix 256 --out " + out, 1, "--kv: "},
      {"score --tokens " + kTiny + "story1.logits.npy --out " + out, 1, "--tokens: expected int32 or int64 token ids, got dtype f4"},
      {"score --tokens " + kTiny + "story1.keys.npy --out " + out, 1, "--tokens: expected int32 or int64"},
      {"score --text " + kTiny + "story1.txt --out " + out, 1, "--text/--tokens: expected 1 .. 512 tokens"},
      {"score --tokens " + tokens + " --prefix 600 --out " + out, 1, "--prefix: expected <= the 512 tokens, got 600"},
      {"score --tokens " + tokens + " --model " + tokens + " --out " + out, 1, "--model: checkpoint"},
      {"score --out " + out, 2, "expected --text FILE or --tokens T.npy"},
      {"score --text a.txt --tokens " + tokens + " --out " + out, 2, "excludes"},
      {"generate --prompt x --steps 600", 1, "--steps: expected <= "},
      {"generate --prompt x --steps 5 --kv h2o,k4v2,window=0,capacity=8", 1, "--kv: KVConfig.window: expected >= 1, got 0"},
      {"generate --prompt x --steps 5 --top-p 0", 1, "--top-p: expected in (0, 1]"},
      {"generate --steps 5", 2, "--prompt is required"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.args);
    const Run r = qpkv_run(c.args);
    CAPTURE(r.err);
    CHECK(r.rc == c.rc);
    CHECK(contains(r.err, c.message));
  }
}

TEST_CASE("study: a small run through the CLI writes well-formed tables, CSV and JSON") {
  const std::string dir = work("study");
  std::filesystem::remove_all(dir);
  const Run r = qpkv_run("study --quick --skip-retrieval --no-plot --bits 16,4 --budgets 4 --out " + dir);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(contains(r.out, "wrote:"));
  for (const char* f : {"study.md", "study.csv", "retrieval_cells.csv", "study.json", "study.gp"}) {
    CAPTURE(f);
    CHECK(std::filesystem::exists(dir + "/" + f));
  }
  // the CSV has a header and one row per variant, every row with the header's column count
  std::istringstream csv(slurp(dir + "/study.csv"));
  std::string line;
  REQUIRE(std::getline(csv, line));
  const auto columns = std::count(line.begin(), line.end(), ',');
  int rows = 0;
  while (std::getline(csv, line)) {
    if (line.empty()) continue;
    CHECK(std::count(line.begin(), line.end(), ',') == columns);
    ++rows;
  }
  CHECK(rows >= 4 * 2);  // 4 selectors x 2 bit widths (x rules)
  const std::string json = slurp(dir + "/study.json");
  CHECK(json.starts_with("{"));
  CHECK(json.find_last_not_of(" \n") == json.rfind('}'));
}

TEST_CASE("save writes a cache file that inspect verifies and reads back: positions as select, bytes as plan") {
  const std::string conf = std::string(QPKV_TEST_DATA) + "/conformance/";
  const std::string k = conf + "inputs_a_key_states.npy", v = conf + "inputs_a_value_states.npy",
                    q = conf + "inputs_a_query_states.npy";
  const std::string file = work("case_a.qpkv"), pos = work("case_a_pos.npy"), dk = work("case_a_k.npy"),
                    dv = work("case_a_v.npy"), sel = work("case_a_sel.npy");
  Run r = qpkv_run("save --keys " + k + " --values " + v + " --queries " + q +
                   " --kv snapkv,kivi4,capacity=128,window=32 --out " + file);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(contains(r.out, "kept 128 of 512 tokens per KV head"));
  r = qpkv_run("inspect " + file + " --positions " + pos + " --keys " + dk + " --values " + dv);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(contains(r.out, "kvconfig    snapkv,kivi4"));
  CHECK(contains(r.out, "tokens      128 per KV head"));
  CHECK(contains(r.out, "section     DATA"));
  // the kept positions are select's
  REQUIRE(qpkv_run("select --keys " + k + " --queries " + q + " --method snapkv --capacity 128 --window 32 --out " + sel).rc == 0);
  CHECK(io::load_npy(pos).as<std::int64_t>() == io::load_npy(sel).as<std::int64_t>());
  // the dequantized keys are within a 4-bit step of the kept input rows
  const io::NpyArray deq = io::load_npy(dk);
  CHECK(deq.shape == std::vector<std::int64_t>{4, 128, 64});
  CHECK(io::load_npy(dv).shape == std::vector<std::int64_t>{4, 128, 64});
  const std::vector<float> in = io::load_npy(k).as<float>(), out = deq.as<float>();
  const std::vector<std::int64_t> p = io::load_npy(pos).as<std::int64_t>();
  double err = 0, norm = 0;
  for (std::int64_t h = 0; h < 4; ++h)
    for (std::int64_t i = 0; i < 128; ++i)
      for (std::int64_t c = 0; c < 64; ++c) {
        const double x = in[static_cast<std::size_t>((h * 512 + p[static_cast<std::size_t>(h * 128 + i)]) * 64 + c)];
        const double y = out[static_cast<std::size_t>((h * 128 + i) * 64 + c)];
        err += (x - y) * (x - y);
        norm += x * x;
      }
  CHECK(std::sqrt(err / norm) < 0.1);

  // a budget: the cache fits it; a flipped byte is caught by inspect
  r = qpkv_run("save --keys " + k + " --values " + v + " --queries " + q + " --kv h2o,k4v2,budget=1/8 --out " + file);
  CAPTURE(r.err);
  REQUIRE(r.rc == 0);
  CHECK(contains(r.out, "budget 65536 bytes"));
  std::string bytes = slurp(file);
  bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x10);
  const std::string bad = work("case_a_bad.qpkv");
  std::ofstream(bad, std::ios::binary) << bytes;
  r = qpkv_run("inspect " + bad);
  CHECK(r.rc == 1);
  CHECK(contains(r.err, "qpkv inspect: error: cache file"));
  // errors name the argument
  const std::vector<float> zeros(4 * 256 * 64, 0.0f);
  io::save_npy(work("v_short.npy"), zeros.data(), {4, 256, 64});
  r = qpkv_run("save --keys " + k + " --values " + work("v_short.npy") + " --kv keep_all,kivi8 --out " + file);
  CHECK(r.rc == 1);
  CHECK(contains(r.err, "--values: expected the shape of --keys (1, 4, 512, 64), got (4, 256, 64)"));
  r = qpkv_run("save --keys " + k + " --values " + v + " --kv snapkv,kivi4,budget=1/8 --out " + file);
  CHECK(r.rc == 2);
  CHECK(contains(r.err, "--queries: required for --kv snapkv"));
  r = qpkv_run("inspect " + work("no-such-file.qpkv"));
  CHECK(r.rc == 1);
}
