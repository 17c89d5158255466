// qpkv/model/session.hpp - running a Llama over qpkv caches: Session, score() and generate().
//
// A session is one sequence: one cache per layer. Its life has the paper's two phases:
//
//   prefill(tokens)   positions 0 .. P-1, densely: every layer computes the K, V and Q of all P
//                     tokens exactly (float32) with full causal attention among them, then its cache
//                     compresses that prompt KV: the selector keeps `capacity` tokens per KV head,
//                     scoring with the prompt's queries (all P are passed; window-based selectors
//                     read the last W) and LayerInfo{layer, layers} (PyramidKV); the quantizers
//                     store what is kept. Returns the logits of the last or of every prompt position.
//   step(token)       the next position: per layer, k and v are appended to the cache (fp16
//                     residual, quantized in whole groups) and the query attends over the cache's
//                     packed content. Returns that position's logits.
//
// RoPE positions are absolute, whatever the caches dropped. Every position must be below the
// model's seq_len (qpkv::Error otherwise); a session prefills once, at position 0.
//
//   Session(model, CacheConfig)            AnyCompressedKV caches; prefill() plans the capacity
//                                          from the config's budget (plan_cache, plan()). The
//                                          default config, keep_all + fp16, is the full-precision
//                                          model: decode steps read K and V rounded to half, as an
//                                          fp16 model's cache holds them. step() without prefill()
//                                          starts from empty caches (configs without a budget only)
//   BasicSession<Cache>(model, caches)     the same over any per-layer cache type (LayerCache:
//                                          compress, append, attend, bytes), e.g. a compile-time
//                                          CompressedKV<SnapKV, Kivi<4>> or one with your own
//                                          policies; prefill(tokens, capacity)
//
//   score(model, tokens, prefix, config)   teacher forcing: logits (T x vocab) for every position of
//                                          `tokens`, the first `prefix` prefilled (and compressed),
//                                          the rest decoded one at a time via step(); with the plan
//                                          and every layer's bytes() after prefill and at the end
//   score(session, tokens, prefix, capacity)  the same on a fresh BasicSession
//   generate(model, prompt, steps, config, sampling, on_token)
//                                          prefill the prompt, then `steps` new tokens, each passed
//                                          to on_token as it is chosen (return false to stop); greedy
//                                          at temperature 0 (sampler.hpp); returns them
//   reference_score(model, tokens, rounding)  the uncompressed model: dense float32 attention over
//                                          K and V kept as float32 (KVRounding::none; equal to
//                                          score() with prefix = T) or rounded to half
//                                          (KVRounding::fp16), no qpkv cache
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <limits>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "qpkv/cache/any_cache.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/model/cache_config.hpp"
#include "qpkv/model/llama.hpp"
#include "qpkv/model/sampler.hpp"

namespace qpkv::model {

/// How the dense reference path stores K and V before attending over them.
enum class KVRounding {
  none,  ///< float32, as computed
  fp16,  ///< rounded to IEEE half, as an fp16 model's cache (and qpkv's Fp16 storage) holds them
};

/// One layer's prompt tensors from the dense forward pass, [head][token][dim] float32.
struct DenseLayerKV {
  index_t kv_heads = 0, heads = 0, tokens = 0, head_dim = 0;
  std::vector<float> k, v, q;  ///< k, v: (kv_heads, tokens, head_dim); q: (heads, tokens, head_dim)
  [[nodiscard]] TensorView<float> keys() const { return view(k.data(), kv_heads, tokens, head_dim); }
  [[nodiscard]] TensorView<float> values() const { return view(v.data(), kv_heads, tokens, head_dim); }
  [[nodiscard]] TensorView<float> queries() const { return view(q.data(), heads, tokens, head_dim); }
};

namespace detail {

/// The dense forward pass over `tokens` (positions 0 .. T-1): per layer, the K, V, Q of every
/// token, exact causal float32 attention among them (over K and V rounded as `rounding` says), then
/// on_layer(l, kv) with the layer's (unrounded) tensors. Returns the final residual stream (T x dim).
template <class OnLayer>
std::vector<float> dense_forward(const Llama& model, std::span<const int> tokens, KVRounding rounding, OnLayer&& on_layer) {
  const LlamaConfig& c = model.config();
  const index_t P = static_cast<index_t>(tokens.size());
  const index_t D = c.dim, H = c.heads, KH = c.kv_heads, hd = c.head_dim(), G = H / KH;
  std::vector<float> x(static_cast<std::size_t>(P * D));
  for (index_t t = 0; t < P; ++t) model.embed(tokens[static_cast<std::size_t>(t)], &x[static_cast<std::size_t>(t * D)]);
  DenseLayerKV kv{KH, H, P, hd, std::vector<float>(static_cast<std::size_t>(KH * P * hd)),
                  std::vector<float>(static_cast<std::size_t>(KH * P * hd)), std::vector<float>(static_cast<std::size_t>(H * P * hd))};
  std::vector<float> qt(static_cast<std::size_t>(D)), kt(static_cast<std::size_t>(KH * hd)), vt(kt.size()),
      attn(static_cast<std::size_t>(D)), p(static_cast<std::size_t>(P)), kr, vr;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  const auto at = [&](index_t head, index_t t) { return static_cast<std::size_t>((head * P + t) * hd); };
  for (index_t l = 0; l < c.layers; ++l) {
    for (index_t t = 0; t < P; ++t) {
      model.qkv(l, &x[static_cast<std::size_t>(t * D)], t, qt.data(), kt.data(), vt.data());
      for (index_t h = 0; h < H; ++h) std::copy_n(&qt[static_cast<std::size_t>(h * hd)], hd, &kv.q[at(h, t)]);
      for (index_t h = 0; h < KH; ++h) {
        std::copy_n(&kt[static_cast<std::size_t>(h * hd)], hd, &kv.k[at(h, t)]);
        std::copy_n(&vt[static_cast<std::size_t>(h * hd)], hd, &kv.v[at(h, t)]);
      }
    }
    const float* ks = kv.k.data();
    const float* vs = kv.v.data();
    if (rounding == KVRounding::fp16) {
      kr.resize(kv.k.size());
      vr.resize(kv.v.size());
      for (std::size_t i = 0; i < kr.size(); ++i) {
        kr[i] = round_through<half>(kv.k[i]);
        vr[i] = round_through<half>(kv.v[i]);
      }
      ks = kr.data();
      vs = vr.data();
    }
    for (index_t t = 0; t < P; ++t) {  // exact causal attention among the tokens
      for (index_t h = 0; h < H; ++h) {
        const float* qr = &kv.q[at(h, t)];
        const float* kh = ks + at(h / G, 0);
        const float* vh = vs + at(h / G, 0);
        float m = -std::numeric_limits<float>::infinity();
        for (index_t s = 0; s <= t; ++s) {
          float d = 0.0f;
          for (index_t i = 0; i < hd; ++i) d += qr[i] * kh[s * hd + i];
          p[static_cast<std::size_t>(s)] = d * scale;
          m = std::max(m, p[static_cast<std::size_t>(s)]);
        }
        float sum = 0.0f;
        for (index_t s = 0; s <= t; ++s) sum += p[static_cast<std::size_t>(s)] = std::exp(p[static_cast<std::size_t>(s)] - m);
        float* o = &attn[static_cast<std::size_t>(h * hd)];
        std::fill_n(o, hd, 0.0f);
        for (index_t s = 0; s <= t; ++s) {
          const float w = p[static_cast<std::size_t>(s)] / sum;
          for (index_t i = 0; i < hd; ++i) o[i] += w * vh[s * hd + i];
        }
      }
      model.finish_layer(l, attn.data(), &x[static_cast<std::size_t>(t * D)]);
    }
    on_layer(l, static_cast<const DenseLayerKV&>(kv));
  }
  return x;
}

/// Logits of rows [first, T) of a residual stream (T x dim), (T - first) x vocab.
inline std::vector<float> logits_of(const Llama& model, const std::vector<float>& x, index_t first) {
  const index_t D = model.config().dim, V = model.config().vocab, T = static_cast<index_t>(x.size()) / D;
  std::vector<float> out(static_cast<std::size_t>((T - first) * V));
  for (index_t t = first; t < T; ++t)
    model.logits(&x[static_cast<std::size_t>(t * D)], &out[static_cast<std::size_t>((t - first) * V)]);
  return out;
}

}  // namespace detail

/// Which prompt positions prefill() returns logits for.
enum class PrefillLogits { none, last, all };

/// What BasicSession needs of a per-layer cache: CompressedKV<...> and AnyCompressedKV qualify.
template <class C>
concept LayerCache = requires(C& c, const C& cc, const TensorView<float>& v, const float* p, float* out, index_t n,
                              LayerInfo layer) {
  c.compress(v, v, v, n, layer);
  c.append(p, p);
  cc.attend(p, out);
  { cc.bytes() } -> std::convertible_to<std::size_t>;
};

/// One sequence of a Llama over caller-built per-layer caches (see the header comment). Use it
/// with a compile-time cache, e.g. BasicSession<CompressedKV<SnapKV, Kivi<4>>>, or through
/// Session, which builds AnyCompressedKV caches and their capacity from a CacheConfig. The model
/// must outlive the session.
template <LayerCache Cache>
class BasicSession {
 public:
  using cache_type = Cache;

  /// `caches`: one per layer, for the model's shape (config().shape()), empty.
  BasicSession(const Llama& model, std::vector<Cache> caches) : model_(&model), caches_(std::move(caches)) {
    qpkv::detail::require(static_cast<index_t>(caches_.size()) == model.config().layers, "caches.size()",
                          qpkv::detail::concat(model.config().layers, " (one per layer)"), caches_.size());
  }

  /// Prefills positions [0, P) with `tokens`; every layer's cache then compresses its prompt KV
  /// with `capacity` tokens per KV head (see the header comment). Returns logits: none, the last
  /// row (vocab), or all rows (P x vocab, row-major).
  std::vector<float> prefill(std::span<const int> tokens, index_t capacity, PrefillLogits rows = PrefillLogits::last) {
    const LlamaConfig& c = model_->config();
    const index_t P = static_cast<index_t>(tokens.size());
    check_prefill(tokens);
    std::vector<float> x = detail::dense_forward(*model_, tokens, KVRounding::none, [&](index_t l, const DenseLayerKV& kv) {
      caches_[static_cast<std::size_t>(l)].compress(kv.keys(), kv.values(), kv.queries(), capacity, LayerInfo{l, c.layers});
    });
    position_ = P;
    last_token_ = tokens.back();
    if (rows == PrefillLogits::none) return {};
    return detail::logits_of(*model_, x, rows == PrefillLogits::all ? 0 : P - 1);
  }

  /// Decodes `token` at position(), writing its logits (vocab) to `logits`.
  void step(int token, std::span<float> logits) {
    const LlamaConfig& c = model_->config();
    qpkv::detail::require(static_cast<index_t>(logits.size()) == c.vocab, "logits.size()", c.vocab, logits.size());
    model_->check_token(token);
    qpkv::detail::require(position_ < c.seq_len, "position", qpkv::detail::concat("< seq_len (", c.seq_len, ")"), position_);
    const index_t D = c.dim, KV = c.kv_dim();
    std::vector<float> x(static_cast<std::size_t>(D)), q(static_cast<std::size_t>(D)), k(static_cast<std::size_t>(KV)),
        v(k.size()), attn(static_cast<std::size_t>(D));
    model_->embed(token, x.data());
    for (index_t l = 0; l < c.layers; ++l) {
      model_->qkv(l, x.data(), position_, q.data(), k.data(), v.data());
      Cache& cache = caches_[static_cast<std::size_t>(l)];
      cache.append(k.data(), v.data());  // the new token attends to itself
      cache.attend(q.data(), attn.data());
      model_->finish_layer(l, attn.data(), x.data());
    }
    model_->logits(x.data(), logits.data());
    ++position_;
    last_token_ = token;
  }

  /// step() returning the logits.
  std::vector<float> step(int token) {
    std::vector<float> logits(static_cast<std::size_t>(model_->config().vocab));
    step(token, logits);
    return logits;
  }

  /// The next position to decode (= tokens seen so far).
  [[nodiscard]] index_t position() const { return position_; }
  /// The last token fed (by prefill or step), -1 before any.
  [[nodiscard]] int last_token() const { return last_token_; }
  [[nodiscard]] const Llama& model() const { return *model_; }
  [[nodiscard]] index_t layers() const { return static_cast<index_t>(caches_.size()); }
  [[nodiscard]] const Cache& cache(index_t layer) const {
    qpkv::detail::require(layer >= 0 && layer < layers(), "layer", qpkv::detail::concat("in [0, ", layers(), ")"), layer);
    return caches_[static_cast<std::size_t>(layer)];
  }
  /// bytes() of every layer's cache, summed: the KV memory this sequence holds now.
  [[nodiscard]] std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& c : caches_) n += static_cast<std::size_t>(c.bytes());
    return n;
  }

 protected:
  void check_prefill(std::span<const int> tokens) const {
    const LlamaConfig& c = model_->config();
    const index_t P = static_cast<index_t>(tokens.size());
    qpkv::detail::require(position_ == 0, "prefill", "a fresh session (position 0)", qpkv::detail::concat("position ", position_));
    qpkv::detail::require(P >= 1, "tokens", "at least one token to prefill", "none");
    qpkv::detail::require(P <= c.seq_len, "tokens", qpkv::detail::concat("at most seq_len = ", c.seq_len, " tokens"), P);
    for (index_t t = 0; t < P; ++t) model_->check_token(tokens[static_cast<std::size_t>(t)], "tokens[i]");
  }

 private:
  const Llama* model_;
  std::vector<Cache> caches_;
  index_t position_ = 0;
  int last_token_ = -1;
};

namespace detail {
inline std::vector<AnyCompressedKV> make_caches(const Llama& model, const CacheConfig& config) {
  config.validate();
  std::vector<AnyCompressedKV> caches;
  caches.reserve(static_cast<std::size_t>(model.config().layers));
  for (index_t l = 0; l < model.config().layers; ++l) caches.emplace_back(model.config().shape(), config.kv);
  return caches;
}
}  // namespace detail

/// A BasicSession over AnyCompressedKV caches built from a CacheConfig, which also sets their
/// capacity (plan_cache() at prefill).
class Session : public BasicSession<AnyCompressedKV> {
 public:
  explicit Session(const Llama& model, CacheConfig config = {})
      : BasicSession(model, detail::make_caches(model, config)), config_(std::move(config)) {}

  /// Plans the caches for this prompt (plan()), then BasicSession::prefill with plan().capacity.
  std::vector<float> prefill(std::span<const int> tokens, PrefillLogits rows = PrefillLogits::last) {
    check_prefill(tokens);
    const LlamaConfig& c = model().config();
    plan_ = plan_cache(c.shape(), c.layers, static_cast<index_t>(tokens.size()), config_);  // config errors first
    return BasicSession::prefill(tokens, plan_.capacity, rows);
  }

  /// BasicSession::step; without a prefill first, only configs without a budget are allowed.
  void step(int token, std::span<float> logits) {
    if (position() == 0) plan_ = plan_cache(model().config().shape(), layers(), 0, config_);
    BasicSession::step(token, logits);
  }
  std::vector<float> step(int token) {
    std::vector<float> logits(static_cast<std::size_t>(model().config().vocab));
    step(token, logits);
    return logits;
  }

  [[nodiscard]] const CacheConfig& config() const { return config_; }
  /// The capacity and planned bytes of every layer after prefill (empty before it).
  [[nodiscard]] const CachePlan& plan() const { return plan_; }

 private:
  CacheConfig config_;
  CachePlan plan_{};
};

/// The result of score().
struct ScoreResult {
  index_t tokens = 0;  ///< T
  index_t vocab = 0;
  std::vector<float> logits;  ///< (T, vocab) row-major: row t predicts token t + 1
  CachePlan plan;             ///< capacity and planned bytes per layer after the prefill
  std::vector<std::size_t> prefill_bytes;  ///< each layer's bytes() right after prefill (= plan bytes)
  std::vector<std::size_t> final_bytes;    ///< each layer's bytes() after the last token
  [[nodiscard]] std::span<const float> row(index_t t) const {
    qpkv::detail::require(t >= 0 && t < tokens, "row", qpkv::detail::concat("in [0, ", tokens, ")"), t);
    return std::span<const float>(logits).subspan(static_cast<std::size_t>(t * vocab), static_cast<std::size_t>(vocab));
  }
};

/// Teacher forcing on a fresh session: positions [0, prefix) prefilled with `capacity` tokens per
/// KV head kept, the rest decoded one at a time. Fills everything of ScoreResult but the plan.
template <LayerCache Cache>
ScoreResult score(BasicSession<Cache>& session, std::span<const int> tokens, index_t prefix, index_t capacity) {
  const LlamaConfig& c = session.model().config();
  const index_t T = static_cast<index_t>(tokens.size());
  qpkv::detail::require(T >= 1 && T <= c.seq_len, "tokens", qpkv::detail::concat("1 .. seq_len = ", c.seq_len, " tokens"), T);
  qpkv::detail::require(prefix >= 0 && prefix <= T, "prefix", qpkv::detail::concat("in [0, ", T, "]"), prefix);
  qpkv::detail::require(session.position() == 0, "session", "a fresh session (position 0)",
                        qpkv::detail::concat("position ", session.position()));
  ScoreResult r;
  r.tokens = T;
  r.vocab = c.vocab;
  r.logits.resize(static_cast<std::size_t>(T * c.vocab));
  if (prefix > 0) {
    const std::vector<float> head =
        session.prefill(tokens.first(static_cast<std::size_t>(prefix)), capacity, PrefillLogits::all);
    std::copy(head.begin(), head.end(), r.logits.begin());
  }
  for (index_t l = 0; l < session.layers(); ++l) r.prefill_bytes.push_back(session.cache(l).bytes());
  const std::span<float> out(r.logits);
  for (index_t t = prefix; t < T; ++t)
    session.step(tokens[static_cast<std::size_t>(t)],
                 out.subspan(static_cast<std::size_t>(t * c.vocab), static_cast<std::size_t>(c.vocab)));
  for (index_t l = 0; l < session.layers(); ++l) r.final_bytes.push_back(session.cache(l).bytes());
  return r;
}

/// Teacher-forced next-token logits of `tokens` (see the header comment): positions [0, prefix)
/// prefilled and compressed with `config`, the rest decoded one at a time. 0 <= prefix <= T <= seq_len.
inline ScoreResult score(const Llama& model, std::span<const int> tokens, index_t prefix, const CacheConfig& config = {}) {
  const LlamaConfig& c = model.config();
  qpkv::detail::require(prefix >= 0 && prefix <= static_cast<index_t>(tokens.size()), "prefix",
                        qpkv::detail::concat("in [0, ", tokens.size(), "]"), prefix);
  const CachePlan plan = plan_cache(c.shape(), c.layers, prefix, config);  // config errors before any work
  Session s(model, config);
  ScoreResult r = score(static_cast<BasicSession<AnyCompressedKV>&>(s), tokens, prefix, plan.capacity);
  r.plan = plan;
  return r;
}

/// The uncompressed model, for reference: teacher-forced logits (T x vocab) with dense float32
/// attention over every earlier token's K and V, stored as `rounding` says — no qpkv cache, no
/// selection. KVRounding::none is the float32 model (score() with prefix = T computes exactly the
/// same numbers); KVRounding::fp16 is an fp16-KV model, which score() with the default keep_all +
/// fp16 config and prefix 0 reproduces up to the order of float32 operations in attention.
inline std::vector<float> reference_score(const Llama& model, std::span<const int> tokens,
                                          KVRounding rounding = KVRounding::none) {
  const LlamaConfig& c = model.config();
  const index_t T = static_cast<index_t>(tokens.size());
  qpkv::detail::require(T >= 1 && T <= c.seq_len, "tokens", qpkv::detail::concat("1 .. seq_len = ", c.seq_len, " tokens"), T);
  for (index_t t = 0; t < T; ++t) model.check_token(tokens[static_cast<std::size_t>(t)], "tokens[i]");
  return detail::logits_of(model, detail::dense_forward(model, tokens, rounding, [](index_t, const DenseLayerKV&) {}), 0);
}

namespace detail {
/// generate()'s default on_token: ignores the tokens.
struct NoCallback {
  void operator()(int) const {}
};
}  // namespace detail

/// Prefills `prompt` (compressed with `config`), then generates `steps` tokens, passing each to
/// on_token as it is chosen (return false from on_token to stop early). Greedy at temperature 0.
/// Needs prompt.size() + steps - 1 <= seq_len. Returns the generated tokens (not the prompt).
template <class OnToken = detail::NoCallback>
std::vector<int> generate(const Llama& model, std::span<const int> prompt, index_t steps, const CacheConfig& config = {},
                          const Sampling& sampling = {}, OnToken&& on_token = {}) {
  static_assert(std::is_invocable_v<OnToken&, int>, "qpkv::model::generate: on_token must be callable with an int token");
  const LlamaConfig& c = model.config();
  const index_t P = static_cast<index_t>(prompt.size());
  qpkv::detail::require(P >= 1, "prompt", "at least one token (e.g. BOS)", "none");
  qpkv::detail::require(steps >= 0, "steps", ">= 0", steps);
  qpkv::detail::require(P + steps - 1 <= c.seq_len, "steps",
                        qpkv::detail::concat("<= seq_len - prompt + 1 = ", c.seq_len - P + 1, " (positions stop at seq_len = ",
                                             c.seq_len, ")"),
                        steps);
  Sampler sampler(sampling);
  Session s(model, config);
  std::vector<float> logits = s.prefill(prompt, PrefillLogits::last);
  std::vector<int> out;
  out.reserve(static_cast<std::size_t>(steps));
  for (index_t i = 0; i < steps; ++i) {
    const int token = sampler.sample(logits);
    out.push_back(token);
    if constexpr (std::is_same_v<std::invoke_result_t<OnToken&, int>, bool>) {
      if (!on_token(token)) break;
    } else {
      on_token(token);
    }
    if (i + 1 < steps) s.step(token, logits);
  }
  return out;
}

}  // namespace qpkv::model
