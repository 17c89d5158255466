// tools/cmd_select.cpp - `qpkv select`: run one token selector on your keys and queries and write
// the kept positions, int64 (H, kept), ascending per KV head.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "qpkv/select/any_selector.hpp"

namespace qpkv::cli {

namespace {

struct SelectOptions {
  std::string keys, queries, method, pooling = "avg", h2o_mask = "causal", out;
  index_t capacity = 0, window = 32, kernel = 5, layer = 0, layers = 1, beta = 20, sinks = 4;
  bool streaming_reference = false;
};

/// The options that parameterise a method; given for another method they are an error.
struct Applies {
  CLI::Option* opt;
  std::vector<Method> methods;
  bool streaming_reference = false;  ///< for streamingllm: only with (true) / without (false) --streaming-reference
  bool streaming_any = true;
};

Method method_of(const std::string& name) {
  for (Method m : kMethods)
    if (method_name(m) == name) return m;
  throw UsageError("--method: unknown method " + name);
}

std::string method_list(const std::vector<Method>& ms) {
  std::string s;
  for (Method m : ms) {
    if (!s.empty()) s += ", ";
    s += method_name(m);
  }
  return s;
}

}  // namespace

Command add_select(CLI::App& app) {
  auto o = std::make_shared<SelectOptions>();
  CLI::App* sub = app.add_subcommand(
      "select",
      "Run a token selector on one layer's keys (and queries) and write the kept positions per KV head.\n"
      "K is (1,H,N,D) or (H,N,D); Q is (1,Hq,N,D) or (Hq,N,D) with Hq a multiple of H (GQA scores are summed\n"
      "over each group); SnapKV/PyramidKV read only Q's last W rows, H2O all N. SEL is int64 (H, kept), ascending.");
  sub->add_option("--keys", o->keys, "keys K: .npy or FILE.safetensors:NAME")->required();
  CLI::Option* queries = sub->add_option("--queries", o->queries, "queries Q (snapkv, h2o, pyramidkv; others ignore it)");
  sub->add_option("--method", o->method, "selector")
      ->required()
      ->check(CLI::IsMember({"keep_all", "streamingllm", "snapkv", "h2o", "pyramidkv"}));
  CLI::Option* capacity = sub->add_option("--capacity", o->capacity, "tokens kept per KV head (PyramidKV: the model average)");
  CLI::Option* window = sub->add_option("--window", o->window,
                                        "observation window W, always kept (streamingllm: with --streaming-reference)")
                            ->capture_default_str();
  CLI::Option* kernel = sub->add_option("--kernel", o->kernel, "pooling kernel, odd (snapkv, pyramidkv)")->capture_default_str();
  CLI::Option* pooling = sub->add_option("--pooling", o->pooling, "pooling (snapkv, pyramidkv)")
                             ->check(CLI::IsMember({"avg", "max"}))
                             ->capture_default_str();
  CLI::Option* layer = sub->add_option("--layer", o->layer, "0-based layer index (pyramidkv)")->capture_default_str();
  CLI::Option* layers = sub->add_option("--layers", o->layers, "layers in the model (pyramidkv)")->capture_default_str();
  CLI::Option* beta = sub->add_option("--beta", o->beta, "pyramid steepness: min budget = (C - W) / beta (pyramidkv)")
                          ->capture_default_str();
  CLI::Option* mask = sub->add_option("--h2o-mask", o->h2o_mask,
                                      "h2o: causal (what the model computes) or reference (the seed code's mask)")
                          ->check(CLI::IsMember({"causal", "reference"}))
                          ->capture_default_str();
  CLI::Option* sinks = sub->add_option("--sinks", o->sinks, "streamingllm: attention sinks kept at the start")
                           ->capture_default_str();
  CLI::Option* reference = sub->add_flag("--streaming-reference", o->streaming_reference,
                                         "streamingllm as the seed code: first C - W tokens + the last W");
  reference->excludes(sinks);
  sub->add_option("--out", o->out, "output SEL.npy: int64 (H, kept)")->required();

  const std::vector<Applies> applies = {
      {window, {Method::snapkv, Method::h2o, Method::pyramidkv, Method::streamingllm}, true, false},
      {kernel, {Method::snapkv, Method::pyramidkv}},
      {pooling, {Method::snapkv, Method::pyramidkv}},
      {layer, {Method::pyramidkv}},
      {layers, {Method::pyramidkv}},
      {beta, {Method::pyramidkv}},
      {mask, {Method::h2o}},
      {sinks, {Method::streamingllm}, false, false},
      {reference, {Method::streamingllm}},
  };

  return {sub, [o, applies, queries, capacity] {
            const Method m = method_of(o->method);
            for (const Applies& a : applies) {
              if (a.opt->count() == 0) continue;
              bool ok = false;
              for (Method x : a.methods) ok = ok || x == m;
              if (ok && m == Method::streamingllm && !a.streaming_any)
                ok = a.streaming_reference == o->streaming_reference;
              if (!ok)
                throw UsageError(a.opt->get_name() + ": does not apply to --method " + o->method +
                                 (m == Method::streamingllm ? (o->streaming_reference ? " --streaming-reference" : " (sinks mode)")
                                                            : std::string()) +
                                 " (it applies to " + method_list(a.methods) +
                                 (a.streaming_any ? "" : a.streaming_reference ? " with --streaming-reference" : " without --streaming-reference") +
                                 ")");
            }
            if (m != Method::keep_all && capacity->count() == 0)
              throw UsageError("--capacity: required for --method " + o->method);

            AnySelector selector;
            switch (m) {
              case Method::keep_all: selector = KeepAll{}; break;
              case Method::streamingllm:
                selector = StreamingLLM{o->sinks, o->window,
                                        o->streaming_reference ? StreamingLLM::Mode::reference : StreamingLLM::Mode::sinks};
                break;
              case Method::snapkv:
                selector = SnapKV{o->window, o->kernel, o->pooling == "max" ? Pooling::max : Pooling::avg};
                break;
              case Method::h2o:
                selector = H2O{o->window, o->h2o_mask == "reference" ? H2OMask::window_block : H2OMask::causal};
                break;
              case Method::pyramidkv:
                selector = PyramidKV{o->window, o->kernel, o->pooling == "max" ? Pooling::max : Pooling::avg, o->beta};
                break;
            }
            const LayerInfo li{o->layer, o->layers};
            try {
              selector.validate(o->capacity, li);
            } catch (const Error& e) {  // the selector's field names -> this command's options
              std::string m = strip_prefix(e.what());
              for (const auto& [field, option] : {std::pair{"layer.layers", "--layers"}, {"layer.layer", "--layer"},
                                                  {"capacity", "--capacity"}, {"window", "--window"},
                                                  {"kernel", "--kernel"}, {"beta", "--beta"}, {"sinks", "--sinks"}})
                if (m.starts_with(std::string(field) + ":")) {
                  m = option + m.substr(std::string(field).size());
                  break;
                }
              throw Error(m);
            }

            const HeadTensor k = load_heads(o->keys, "--keys", "H,N,D");
            HeadTensor q;
            TensorView<float> qv{};
            const index_t needed = selector.queries_needed(k.tokens);
            if (needed > 0) {
              if (queries->count() == 0) throw UsageError("--queries: required for --method " + o->method);
              q = load_heads(o->queries, "--queries", "Hq,N,D");
              detail::require(q.dim == k.dim, "--queries", detail::concat("head_dim ", k.dim, " (that of --keys)"),
                              detail::concat(q.dim, " in shape ", shape_text(q.shape)));
              detail::require(q.heads % k.heads == 0, "--queries",
                              detail::concat("a multiple of the ", k.heads, " KV heads of --keys as query heads"),
                              detail::concat(q.heads, " in shape ", shape_text(q.shape)));
              detail::require(q.tokens <= k.tokens, "--queries",
                              detail::concat("at most N = ", k.tokens, " rows (the prompt of --keys)"),
                              detail::concat(q.tokens, " in shape ", shape_text(q.shape)));
              detail::require(q.tokens >= needed, "--queries",
                              detail::concat(">= ", needed, " rows (", o->method,
                                             needed == k.tokens ? " reads every prompt query)" : " reads the last W)"),
                              detail::concat(q.tokens, " in shape ", shape_text(q.shape)));
              qv = q.view();
            }
            const Selection sel = selector.select(k.view(), qv, o->capacity, li);
            const index_t kept = sel.max_count();
            std::vector<std::int64_t> out;
            out.reserve(static_cast<std::size_t>(k.heads * kept));
            for (index_t h = 0; h < sel.heads(); ++h) {
              detail::require(sel.count(h) == kept, "selection", "the same count for every KV head", sel.count(h));
              out.insert(out.end(), sel.kept[static_cast<std::size_t>(h)].begin(), sel.kept[static_cast<std::size_t>(h)].end());
            }
            save_output(o->out, out, {k.heads, kept}, "--out");
            std::printf("%s: kept %lld of %lld tokens per KV head (%lld KV heads", o->method.c_str(),
                        static_cast<long long>(kept), static_cast<long long>(k.tokens), static_cast<long long>(k.heads));
            if (needed > 0) std::printf(", %lld query heads", static_cast<long long>(q.heads));
            std::printf(")\nwrote %s: int64 (%lld, %lld)\n", o->out.c_str(), static_cast<long long>(k.heads),
                        static_cast<long long>(kept));
          }};
}

}  // namespace qpkv::cli
