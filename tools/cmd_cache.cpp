// tools/cmd_cache.cpp - `qpkv save` and `qpkv inspect`: compress one layer's K and V into an
// AnyCompressedKV and write it as a cache file (qpkv/cache/serialize.hpp); read a cache file back,
// verify it, print what it holds and optionally write its positions and dequantized content.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "qpkv/cache/any_cache.hpp"
#include "qpkv/cache/serialize.hpp"
#include "qpkv/model/cache_config.hpp"

namespace qpkv::cli {

Command add_save(CLI::App& app) {
  struct Options {
    std::string keys, values, queries, kv, out;
    index_t layer = 0, layers = 1;
  };
  auto o = std::make_shared<Options>();
  CLI::App* sub = app.add_subcommand(
      "save",
      "Compress one layer's K and V with --kv CONFIG (as `score --kv`: budget= is a fraction of this layer's\n"
      "fp16 cache of N tokens, or bytes) and write the cache file (docs/format.md). K and V are (1,H,N,D) or\n"
      "(H,N,D); Q (1,Hq,N,D) or (Hq,N,D) is needed by snapkv, h2o and pyramidkv.");
  sub->add_option("--keys", o->keys, "keys K: .npy or FILE.safetensors:NAME")->required();
  sub->add_option("--values", o->values, "values V, K's shape")->required();
  CLI::Option* queries = sub->add_option("--queries", o->queries, "queries Q (snapkv, h2o, pyramidkv)");
  sub->add_option("--kv", o->kv, "cache CONFIG, e.g. snapkv,kivi4,budget=1/8 or keep_all,kivi8")->required();
  sub->add_option("--layer", o->layer, "0-based layer index (pyramidkv)")->capture_default_str();
  sub->add_option("--layers", o->layers, "layers in the model (pyramidkv)")->capture_default_str();
  sub->add_option("--out", o->out, "output cache file")->required();

  return {sub, [o, queries] {
            model::CacheConfig config;
            try {
              config = model::CacheConfig::parse(o->kv);
            } catch (const Error& e) {
              throw Error("--kv: " + strip_prefix(e.what()));
            }
            const HeadTensor k = load_heads(o->keys, "--keys", "H,N,D");
            const HeadTensor v = load_heads(o->values, "--values", "H,N,D");
            if (v.heads != k.heads || v.tokens != k.tokens || v.dim != k.dim)
              throw Error(detail::concat("--values: expected the shape of --keys ", shape_text(k.shape), ", got ",
                                         shape_text(v.shape)));
            HeadTensor q;
            Shape shape{k.heads, k.heads, k.dim};
            const bool scores = config.kv.method == Method::snapkv || config.kv.method == Method::h2o ||
                                config.kv.method == Method::pyramidkv;
            if (scores) {
              if (queries->count() == 0)
                throw UsageError(detail::concat("--queries: required for --kv ", method_name(config.kv.method)));
              q = load_heads(o->queries, "--queries", "Hq,N,D");
              detail::require(q.dim == k.dim && q.heads % k.heads == 0 && q.tokens <= k.tokens, "--queries",
                              detail::concat("(Hq, M, ", k.dim, ") with Hq a multiple of ", k.heads, " and M <= ", k.tokens),
                              shape_text(q.shape));
              shape.q_heads = q.heads;
            }
            const LayerInfo li{o->layer, o->layers};
            model::CachePlan plan;
            AnyCompressedKV cache(shape, config.kv);
            try {
              plan = model::plan_cache(shape, o->layers, k.tokens, config);
              detail::require(o->layer >= 0 && o->layer < o->layers, "--layer", detail::concat("in [0, ", o->layers, ")"), o->layer);
              if (scores) cache.compress(k.view(), v.view(), q.view(), plan.capacity, li);
              else cache.compress(k.view(), v.view(), TensorView<float>{}, plan.capacity, li);  // reads no queries
            } catch (const Error& e) {
              const std::string m = strip_prefix(e.what());
              throw Error(m.starts_with("--") ? m : "--kv: " + m);
            }
            save(o->out, cache);
            const std::int64_t full = fp16_bytes(shape, k.tokens);
            std::printf("%s: kept %lld of %lld tokens per KV head (capacity %lld%s); %zu bytes = %.4f of the fp16 cache (%lld bytes)\n",
                        config.to_string().c_str(), static_cast<long long>(cache.tokens()), static_cast<long long>(k.tokens),
                        static_cast<long long>(plan.capacity),
                        plan.budget_bytes > 0 ? detail::concat(", budget ", plan.budget_bytes, " bytes").c_str() : "",
                        cache.bytes(), static_cast<double>(cache.bytes()) / static_cast<double>(full),
                        static_cast<long long>(full));
            std::printf("wrote %s: %llu bytes\n", o->out.c_str(),
                        static_cast<unsigned long long>(inspect(std::filesystem::path(o->out)).file_bytes));
          }};
}

Command add_inspect(CLI::App& app) {
  struct Options {
    std::string file, positions, keys, values;
  };
  auto o = std::make_shared<Options>();
  CLI::App* sub = app.add_subcommand(
      "inspect",
      "Read a cache file, verify its checksums and contents, and print its configuration, shape and sections.\n"
      "Optionally write the kept positions and the dequantized keys and values.");
  sub->add_option("file", o->file, "cache file written by `qpkv save` (or qpkv::save)")->required();
  sub->add_option("--positions", o->positions, "output P.npy: int64 (H, tokens), the kept positions per KV head");
  sub->add_option("--keys", o->keys, "output K.npy: float32 (H, tokens, D), dequantized keys");
  sub->add_option("--values", o->values, "output V.npy: float32 (H, tokens, D), dequantized values");

  return {sub, [o] {
            const std::filesystem::path path(o->file);
            const CacheFileInfo info = inspect(path);
            std::printf("%s", to_string(info).c_str());
            if (o->positions.empty() && o->keys.empty() && o->values.empty()) return;
            if (info.kind != CacheFileKind::any)
              throw Error(o->file + ": written from a compile-time CompressedKV; only AnyCompressedKV files "
                          "(qpkv save) can be read back without the program's types");
            const AnyCompressedKV cache = load_any(path);  // every content check, as a loading server would
            const index_t H = cache.shape().kv_heads, T = cache.tokens(), D = cache.shape().head_dim;
            if (!o->positions.empty()) {
              std::vector<std::int64_t> p;
              for (index_t h = 0; h < H; ++h) {
                const auto s = cache.positions(h);
                p.insert(p.end(), s.begin(), s.end());
              }
              save_output(o->positions, p, {H, T}, "--positions");
            }
            if (!o->keys.empty() || !o->values.empty()) {
              const DenseKV d = cache.dequantize();
              if (!o->keys.empty()) save_output(o->keys, d.keys, {d.heads, d.tokens, d.dim}, "--keys");
              if (!o->values.empty()) save_output(o->values, d.values, {d.heads, d.tokens, d.dim}, "--values");
            }
            std::printf("loaded: %lld tokens x %lld KV heads x head_dim %lld%s%s%s\n", static_cast<long long>(T),
                        static_cast<long long>(H), static_cast<long long>(D),
                        o->positions.empty() ? "" : ("; wrote " + o->positions).c_str(),
                        o->keys.empty() ? "" : ("; wrote " + o->keys).c_str(),
                        o->values.empty() ? "" : ("; wrote " + o->values).c_str());
          }};
}

}  // namespace qpkv::cli
