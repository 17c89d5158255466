// tools/cmd_model.cpp - `qpkv score` and `qpkv generate`: the llama2.c model runner
// (qpkv/model/session.hpp) with every layer's KV cache in a qpkv cache built from --kv CONFIG
// (qpkv/model/cache_config.hpp: the KVConfig grammar plus budget=, capacity=, accounting=).
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "cli.hpp"
#include "qpkv/model/cache_config.hpp"
#include "qpkv/model/llama.hpp"
#include "qpkv/model/sampler.hpp"
#include "qpkv/model/session.hpp"
#include "qpkv/model/tokenizer.hpp"

namespace qpkv::cli {

namespace {

constexpr const char* kDefaultModel = "models/stories260K/stories260K.bin";
constexpr const char* kDefaultTokenizer = "models/stories260K/tok512.bin";

struct ModelOptions {
  std::string model = kDefaultModel, tokenizer = kDefaultTokenizer, kv = "keep_all,fp16";
};

void add_model_options(CLI::App* sub, ModelOptions& o) {
  sub->add_option("--model", o.model, "llama2.c checkpoint (legacy format); found in the source tree if relative")
      ->capture_default_str();
  sub->add_option("--tokenizer", o.tokenizer, "llama2.c tokenizer")->capture_default_str();
  sub->add_option("--kv", o.kv,
                  "cache CONFIG of every layer: KVConfig text plus budget=NUM/DEN|BYTES, capacity=N, "
                  "accounting=exact|nominal (docs/cli.md), e.g. snapkv,kivi4,budget=1/8")
      ->capture_default_str();
}

model::CacheConfig parse_kv(const std::string& text) {
  try {
    return model::CacheConfig::parse(text);
  } catch (const Error& e) {
    throw Error("--kv: " + strip_prefix(e.what()));
  }
}

model::Llama load_model(const std::string& path) {
  try {
    return model::Llama::load(data_path(path));
  } catch (const Error& e) {
    throw Error("--model: " + strip_prefix(e.what()));
  }
}

model::Tokenizer load_tokenizer(const std::string& path) {
  try {
    return model::Tokenizer::load(data_path(path));
  } catch (const Error& e) {
    throw Error("--tokenizer: " + strip_prefix(e.what()));
  }
}

std::string read_text(const std::string& path, std::string_view option) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(detail::concat(option, ": cannot open ", path));
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

/// One line about the caches after prefill: capacity, tokens and bytes per layer vs the fp16 cache.
void print_plan(std::FILE* out, const model::CacheConfig& config, const model::CachePlan& plan) {
  std::fprintf(out, "cache: %s\n", config.to_string().c_str());
  if (plan.prefix == 0) return;
  std::fprintf(out, "after prefill of %lld tokens: capacity %lld", static_cast<long long>(plan.prefix),
               static_cast<long long>(plan.capacity));
  if (plan.budget_bytes > 0) std::fprintf(out, ", budget %lld bytes per layer", static_cast<long long>(plan.budget_bytes));
  std::fprintf(out, "; tokens per layer");
  for (const auto& l : plan.layers) std::fprintf(out, " %lld", static_cast<long long>(l.tokens));
  std::fprintf(out, "; %zu bytes in all = %.4f of the fp16 cache (%lld bytes)%s\n", plan.total_bytes,
               plan.full_fp16_bytes > 0 ? static_cast<double>(plan.total_bytes) / static_cast<double>(plan.full_fp16_bytes) : 0.0,
               static_cast<long long>(plan.full_fp16_bytes), plan.within_budget() ? "" : " (over the budget)");
}

/// Mean -log p(tokens[t + 1] | row t) over rows [from, to).
double mean_nll(const model::ScoreResult& r, const std::vector<int>& tokens, index_t from, index_t to) {
  double sum = 0.0;
  for (index_t t = from; t < to; ++t) {
    const auto row = r.row(t);
    double m = row[0];
    for (float x : row) m = std::max(m, static_cast<double>(x));
    double z = 0.0;
    for (float x : row) z += std::exp(static_cast<double>(x) - m);
    sum += m + std::log(z) - static_cast<double>(row[static_cast<std::size_t>(tokens[static_cast<std::size_t>(t + 1)])]);
  }
  return to > from ? sum / static_cast<double>(to - from) : NAN;
}

}  // namespace

Command add_score(CLI::App& app) {
  struct Options : ModelOptions {
    std::string text, tokens, out;
    index_t prefix = -1;
  };
  auto o = std::make_shared<Options>();
  CLI::App* sub = app.add_subcommand(
      "score",
      "Teacher-forced next-token logits: the first P tokens are prefilled (exact attention among them) and\n"
      "every layer's cache is compressed with --kv; the rest are decoded one at a time through the cache\n"
      "(append, then attention on the packed cache). Writes float32 (T, vocab); row t predicts token t+1.");
  add_model_options(sub, *o);
  CLI::Option* text = sub->add_option("--text", o->text, "text file, tokenized with BOS first");
  CLI::Option* tokens = sub->add_option("--tokens", o->tokens, "token ids: int32/int64 (T,) or (1, T), .npy or FILE.safetensors:NAME");
  text->excludes(tokens);
  sub->add_option("--prefix", o->prefix, "tokens prefilled and compressed (default: T/2; 0 decodes every token)");
  sub->add_option("--out", o->out, "output LOGITS.npy: float32 (T, vocab)")->required();

  return {sub, [o, text, tokens] {
            if (text->count() == 0 && tokens->count() == 0) throw UsageError("expected --text FILE or --tokens T.npy");
            const model::CacheConfig config = parse_kv(o->kv);
            const model::Llama m = load_model(o->model);
            std::vector<int> ids;
            if (text->count()) {
              ids = load_tokenizer(o->tokenizer).encode(read_text(o->text, "--text"));
            } else {
              const io::NpyArray a = load_tensor(o->tokens, "--tokens");
              if (a.dtype != "i4" && a.dtype != "i8")
                throw Error(detail::concat("--tokens: expected int32 or int64 token ids, got dtype ", a.dtype));
              if (!(a.shape.size() == 1 || (a.shape.size() == 2 && a.shape[0] == 1)))
                throw Error(detail::concat("--tokens: expected shape (T,) or (1, T), got ", shape_text(a.shape)));
              for (const std::int64_t t : a.as<std::int64_t>()) {
                detail::require(t >= 0 && t < m.config().vocab, "--tokens",
                                detail::concat("token ids in [0, ", m.config().vocab, ")"), t);
                ids.push_back(static_cast<int>(t));
              }
            }
            const auto T = static_cast<index_t>(ids.size());
            detail::require(T >= 1 && T <= m.config().seq_len, "--text/--tokens",
                            detail::concat("1 .. ", m.config().seq_len, " tokens (the model's seq_len)"), T);
            const index_t P = o->prefix < 0 ? T / 2 : o->prefix;
            detail::require(P <= T, "--prefix", detail::concat("<= the ", T, " tokens"), P);
            model::ScoreResult r;
            try {
              r = model::score(m, ids, P, config);
            } catch (const Error& e) {
              throw Error("--kv: " + strip_prefix(e.what()));
            }
            save_output(o->out, r.logits, {r.tokens, r.vocab}, "--out");
            std::printf("score: %lld tokens; %lld prefilled and compressed, %lld decoded through the cache\n",
                        static_cast<long long>(T), static_cast<long long>(P), static_cast<long long>(T - P));
            print_plan(stdout, config, r.plan);
            std::size_t final_bytes = 0;
            for (std::size_t b : r.final_bytes) final_bytes += b;
            std::printf("cache bytes at the end: %zu (all layers)\n", final_bytes);
            const double all = mean_nll(r, ids, 0, T - 1), decoded = mean_nll(r, ids, std::max<index_t>(P, 0), T - 1);
            std::printf("next-token NLL: %.4f over all %lld predictions (perplexity %.3f)", all,
                        static_cast<long long>(T - 1), std::exp(all));
            if (T - 1 > P) std::printf("; %.4f over the %lld after the prefix (perplexity %.3f)", decoded,
                                       static_cast<long long>(T - 1 - P), std::exp(decoded));
            std::printf("\nwrote %s: float32 (%lld, %lld)\n", o->out.c_str(), static_cast<long long>(r.tokens),
                        static_cast<long long>(r.vocab));
          }};
}

Command add_generate(CLI::App& app) {
  struct Options : ModelOptions {
    std::string prompt;
    index_t steps = 0;
    float temperature = 0.0f, top_p = 1.0f;
    std::uint64_t seed = 0;
    bool stats = false;
  };
  auto o = std::make_shared<Options>();
  CLI::App* sub = app.add_subcommand(
      "generate",
      "Generate text: the prompt (BOS first) is prefilled and every layer's cache compressed with --kv, then\n"
      "--steps tokens are sampled one at a time through the cache and streamed to stdout (the prompt first).\n"
      "Greedy at temperature 0. Stops early when the model emits BOS or EOS, as llama2.c's run.c does.");
  add_model_options(sub, *o);
  sub->add_option("--prompt", o->prompt, "prompt text (may be empty: BOS alone)")->required();
  sub->add_option("--steps", o->steps, "tokens to generate")->required();
  sub->add_option("--temperature", o->temperature, "0 = greedy; > 0 samples from softmax(logits / t)")->capture_default_str();
  sub->add_option("--top-p", o->top_p, "nucleus sampling mass in (0, 1]")->capture_default_str();
  sub->add_option("--seed", o->seed, "random stream of the sampler")->capture_default_str();
  sub->add_flag("--stats", o->stats, "print the cache plan and speed on stderr");

  return {sub, [o] {
            const model::CacheConfig config = parse_kv(o->kv);
            detail::require(o->steps >= 0, "--steps", ">= 0", o->steps);
            detail::require(o->temperature >= 0.0f && std::isfinite(o->temperature), "--temperature", ">= 0", o->temperature);
            detail::require(o->top_p > 0.0f && o->top_p <= 1.0f, "--top-p", "in (0, 1]", o->top_p);
            const model::Llama m = load_model(o->model);
            const model::Tokenizer tok = load_tokenizer(o->tokenizer);
            const std::vector<int> prompt = tok.encode(o->prompt);
            const auto P = static_cast<index_t>(prompt.size());
            detail::require(P + o->steps - 1 <= m.config().seq_len, "--steps",
                            detail::concat("<= ", m.config().seq_len - P + 1, " for this ", P,
                                           "-token prompt (positions stop at seq_len = ", m.config().seq_len, ")"),
                            o->steps);
            // validate the config against this prompt before printing anything
            const model::CachePlan plan = [&] {
              try {
                return model::plan_cache(m.config().shape(), m.config().layers, P, config);
              } catch (const Error& e) {
                throw Error("--kv: " + strip_prefix(e.what()));
              }
            }();
            int prev = -1;
            for (int t : prompt) {
              if (t != model::Tokenizer::bos_id) std::fputs(tok.decode_piece(prev, t).c_str(), stdout);
              prev = t;
            }
            std::fflush(stdout);
            model::Sampling sampling;
            sampling.temperature = o->temperature;
            sampling.top_p = o->top_p;
            sampling.seed = o->seed;
            index_t generated = 0;
            const auto t0 = std::chrono::steady_clock::now();
            model::generate(m, prompt, o->steps, config, sampling, [&](int t) {
              if (t == model::Tokenizer::bos_id || t == model::Tokenizer::eos_id) return false;
              std::fputs(tok.decode_piece(prev, t).c_str(), stdout);
              std::fflush(stdout);
              prev = t;
              ++generated;
              return true;
            });
            const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            std::fputc('\n', stdout);
            if (o->stats) {
              print_plan(stderr, config, plan);
              std::fprintf(stderr, "generated %lld tokens in %.3f s (%.1f tokens/s)\n", static_cast<long long>(generated),
                           seconds, seconds > 0 ? static_cast<double>(generated) / seconds : 0.0);
            }
          }};
}

}  // namespace qpkv::cli
