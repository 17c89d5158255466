// qpkv/model/llama.hpp - a llama2.c checkpoint (Llama architecture, float32) and its per-token math.
//
// Llama holds the weights of a llama2.c "legacy" checkpoint and computes, for one token at a time,
// the pieces of the forward pass; model/session.hpp strings them together around per-layer qpkv
// caches. The architecture (as llama2.c's run.c and models/stories260K/README.md state it):
//
//   x = embedding[token]
//   per layer:  h = RMSNorm(x)                       (eps 1e-5; x / sqrt(mean(x^2) + eps) * weight)
//               q = Wq h, k = Wk h, v = Wv h         (q: heads x head_dim, k, v: kv_heads x head_dim)
//               RoPE on q and k: adjacent pairs (2i, 2i+1) of each head rotate by pos * 10000^(-2i/head_dim)
//               a = attention of q over the layer's cache (query head h reads KV head h / group)
//               x += Wo a
//               h = RMSNorm(x);  x += W2 (silu(W1 h) * W3 h)
//   logits = classifier RMSNorm(x)                  (classifier = embedding when shared)
//
// Storage and arithmetic are float32 (dot products in eight float32 partial sums); the RoPE
// angles are computed in double and rounded once, so a position's rotation does not depend on how
// it is reached.
//
// Checkpoint format (little-endian): 7 x int32 header {dim, hidden_dim, n_layers, n_heads,
// n_kv_heads, vocab_size, seq_len}; vocab_size < 0 means an unshared classifier follows. Then float32
// tensors, matrices (out, in) row-major: token embedding (vocab, dim); attention RMSNorm (layers,
// dim); Wq (layers, dim, dim); Wk, Wv (layers, kv_dim, dim); Wo (layers, dim, dim); FFN RMSNorm
// (layers, dim); W1 (layers, hidden, dim); W2 (layers, dim, hidden); W3 (layers, hidden, dim); final
// RMSNorm (dim); two legacy RoPE tables (seq_len x head_dim / 2 each; skipped, RoPE is computed);
// the classifier (vocab, dim) only when unshared. parse() checks every header field, that the file
// is exactly 28 + 4 x (number of floats) bytes and that every weight is finite, and throws
// qpkv::Error naming the field otherwise; nothing is read past the end of the image. The newer
// llama2.c export formats (magic "ak42") are recognised and rejected with a message.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"

namespace qpkv::model {

/// The hyper-parameters of a llama2.c checkpoint (its header) and the fixed constants of run.c.
struct LlamaConfig {
  index_t dim = 0;         ///< model width
  index_t hidden_dim = 0;  ///< FFN width
  index_t layers = 0;
  index_t heads = 0;     ///< query heads
  index_t kv_heads = 0;  ///< key/value heads (GQA group = heads / kv_heads)
  index_t vocab = 0;
  index_t seq_len = 0;   ///< the longest sequence the model was trained on; positions must stay below it
  bool shared_classifier = true;  ///< the classifier is the token embedding
  float norm_eps = 1e-5f;
  double rope_theta = 10000.0;

  [[nodiscard]] index_t head_dim() const { return dim / heads; }
  [[nodiscard]] index_t kv_dim() const { return kv_heads * head_dim(); }
  /// The attention geometry of every layer, as the qpkv caches take it.
  [[nodiscard]] Shape shape() const { return Shape{kv_heads, heads, head_dim()}; }
};

/// The weights of one transformer layer (pointers into Llama's storage; matrices (out, in) row-major).
struct LlamaLayer {
  const float* attn_norm = nullptr;  ///< (dim)
  const float* wq = nullptr;         ///< (dim, dim)
  const float* wk = nullptr;         ///< (kv_dim, dim)
  const float* wv = nullptr;         ///< (kv_dim, dim)
  const float* wo = nullptr;         ///< (dim, dim)
  const float* ffn_norm = nullptr;   ///< (dim)
  const float* w1 = nullptr;         ///< (hidden, dim)
  const float* w2 = nullptr;         ///< (dim, hidden)
  const float* w3 = nullptr;         ///< (hidden, dim)
};

namespace detail {
using namespace qpkv::detail;  // require, concat, fail

/// y = W x for W (rows, cols) row-major, float32. Eight interleaved partial sums (lane j takes
/// columns j, j + 8, ...; combined pairwise, then the tail) let the compiler vectorise without
/// reassociating anything, so the result is the same at every optimisation level and ISA.
inline void matvec(const float* w, const float* x, index_t rows, index_t cols, float* y) {
  for (index_t r = 0; r < rows; ++r) {
    const float* wr = w + r * cols;
    float acc[8] = {};
    index_t c = 0;
    for (; c + 8 <= cols; c += 8)
      for (index_t j = 0; j < 8; ++j) acc[j] += wr[c + j] * x[c + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; c < cols; ++c) s += wr[c] * x[c];
    y[r] = s;
  }
}

/// out = x / sqrt(mean(x^2) + eps) * weight (out may alias x).
inline void rmsnorm(const float* x, const float* weight, index_t n, float eps, float* out) {
  float ss = 0.0f;
  for (index_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (index_t i = 0; i < n; ++i) out[i] = weight[i] * (inv * x[i]);
}

inline std::int32_t read_i32(const std::uint8_t* p) {
  std::int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

/// a * b for non-negative sizes, or an Error naming `what` if it would pass 2^62.
inline std::int64_t size_mul(std::int64_t a, std::int64_t b, std::string_view what) {
  constexpr std::int64_t limit = std::int64_t{1} << 62;
  require(a >= 0 && b >= 0 && (a == 0 || b <= limit / a), what, "a size below 2^62", concat(a, " x ", b));
  return a * b;
}

inline std::vector<std::uint8_t> read_file(const std::string& path, std::string_view what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error(concat("qpkv: ", what, ": cannot open '", path, "'"));
  f.seekg(0, std::ios::end);
  const std::streamoff size = f.tellg();
  if (size < 0) throw Error(concat("qpkv: ", what, ": cannot read the size of '", path, "'"));
  f.seekg(0, std::ios::beg);
  std::vector<std::uint8_t> bytes(static_cast<std::size_t>(size));
  if (size > 0 && !f.read(reinterpret_cast<char*>(bytes.data()), size))
    throw Error(concat("qpkv: ", what, ": short read from '", path, "'"));
  return bytes;
}

}  // namespace detail

/// A llama2.c checkpoint in memory, with the per-token pieces of the forward pass.
class Llama {
 public:
  static constexpr std::size_t header_bytes = 7 * sizeof(std::int32_t);

  /// Reads and validates a checkpoint file (see the header comment); qpkv::Error on any problem.
  static Llama load(const std::string& path) {
    // the header and the file size are checked before the file is read, so a wrong or huge file
    // is refused without loading it
    std::ifstream f(path, std::ios::binary);
    if (!f) throw Error(detail::concat("qpkv: checkpoint: cannot open '", path, "'"));
    f.seekg(0, std::ios::end);
    const std::streamoff size = f.tellg();
    if (size < 0) throw Error(detail::concat("qpkv: checkpoint: cannot read the size of '", path, "'"));
    f.seekg(0, std::ios::beg);
    std::uint8_t head[header_bytes] = {};
    const std::size_t n = static_cast<std::size_t>(std::min<std::streamoff>(size, header_bytes));
    if (!f.read(reinterpret_cast<char*>(head), static_cast<std::streamsize>(n)))
      throw Error(detail::concat("qpkv: checkpoint: short read from '", path, "'"));
    (void)read_layout(std::span<const std::uint8_t>(head, n), static_cast<std::uint64_t>(size), path);
    return parse(detail::read_file(path, "checkpoint"), path);
  }

  /// Validates and copies a checkpoint image; `name` only labels error messages.
  static Llama parse(std::span<const std::uint8_t> image, std::string_view name = "checkpoint") {
    const Layout layout = read_layout(image.first(std::min(image.size(), header_bytes)), image.size(), name);
    const LlamaConfig& c = layout.config;
    const std::string what = detail::concat("checkpoint '", name, "'");
    const std::int64_t floats = layout.floats;
    const auto& sizes = layout.sizes;
    Llama m;
    m.config_ = c;
    m.weights_.resize(static_cast<std::size_t>(floats));
    std::memcpy(m.weights_.data(), image.data() + header_bytes, static_cast<std::size_t>(floats) * sizeof(float));
    static constexpr const char* names[] = {"token_embedding", "rms_att_weight", "wq", "wk", "wv", "wo",
                                            "rms_ffn_weight", "w1", "w2", "w3", "rms_final_weight",
                                            "freq_cis (legacy RoPE tables)", "wcls"};
    std::int64_t offset = 0;
    for (std::size_t t = 0; t < std::size(sizes); ++t) {
      m.offsets_[t] = offset;
      for (std::int64_t i = 0; i < sizes[t]; ++i)
        if (!std::isfinite(m.weights_[static_cast<std::size_t>(offset + i)]))
          throw Error(detail::concat("qpkv: ", what, " tensor ", names[t], ": expected finite values, got ",
                                     m.weights_[static_cast<std::size_t>(offset + i)], " at element ", i));
      offset += sizes[t];
    }
    return m;
  }

  [[nodiscard]] const LlamaConfig& config() const { return config_; }
  /// Bytes of the weights held (float32).
  [[nodiscard]] std::size_t weight_bytes() const { return weights_.size() * sizeof(float); }

  [[nodiscard]] LlamaLayer layer(index_t l) const {
    detail::require(l >= 0 && l < config_.layers, "layer", detail::concat("in [0, ", config_.layers, ")"), l);
    const index_t D = config_.dim, KV = config_.kv_dim(), Hd = config_.hidden_dim;
    LlamaLayer w;
    w.attn_norm = at(kAttnNorm) + l * D;
    w.wq = at(kWq) + l * D * D;
    w.wk = at(kWk) + l * KV * D;
    w.wv = at(kWv) + l * KV * D;
    w.wo = at(kWo) + l * D * D;
    w.ffn_norm = at(kFfnNorm) + l * D;
    w.w1 = at(kW1) + l * Hd * D;
    w.w2 = at(kW2) + l * D * Hd;
    w.w3 = at(kW3) + l * Hd * D;
    return w;
  }
  [[nodiscard]] const float* embedding() const { return at(kEmbedding); }
  [[nodiscard]] const float* final_norm() const { return at(kFinalNorm); }
  [[nodiscard]] const float* classifier() const { return config_.shared_classifier ? at(kEmbedding) : at(kClassifier); }

  /// Throws unless 0 <= token < vocab.
  void check_token(index_t token, std::string_view what = "token") const {
    detail::require(token >= 0 && token < config_.vocab, what, detail::concat("a token id in [0, ", config_.vocab, ")"),
                    token);
  }

  // ---- the per-token pieces of the forward pass (model/session.hpp composes them) ----

  /// x (dim) = the token's embedding.
  void embed(index_t token, float* x) const {
    check_token(token);
    std::memcpy(x, embedding() + token * config_.dim, static_cast<std::size_t>(config_.dim) * sizeof(float));
  }

  /// The attention inputs of layer `l` for the residual stream x (dim) at position `pos`:
  /// q (heads x head_dim), k and v (kv_heads x head_dim), RoPE applied to q and k.
  void qkv(index_t l, const float* x, index_t pos, float* q, float* k, float* v) const {
    const LlamaLayer w = layer(l);
    const index_t D = config_.dim, KV = config_.kv_dim();
    std::vector<float> h(static_cast<std::size_t>(D));
    detail::rmsnorm(x, w.attn_norm, D, config_.norm_eps, h.data());
    detail::matvec(w.wq, h.data(), D, D, q);
    detail::matvec(w.wk, h.data(), KV, D, k);
    detail::matvec(w.wv, h.data(), KV, D, v);
    rope(q, config_.heads, pos);
    rope(k, config_.kv_heads, pos);
  }

  /// The rest of layer `l` after attention: x += Wo attn; x += W2 (silu(W1 h) * W3 h), h = RMSNorm(x).
  /// attn is the attention output (heads x head_dim).
  void finish_layer(index_t l, const float* attn, float* x) const {
    const LlamaLayer w = layer(l);
    const index_t D = config_.dim, Hd = config_.hidden_dim;
    std::vector<float> t(static_cast<std::size_t>(std::max(D, Hd))), a(static_cast<std::size_t>(Hd)),
        b(static_cast<std::size_t>(Hd));
    detail::matvec(w.wo, attn, D, D, t.data());
    for (index_t i = 0; i < D; ++i) x[i] += t[i];
    detail::rmsnorm(x, w.ffn_norm, D, config_.norm_eps, t.data());
    detail::matvec(w.w1, t.data(), Hd, D, a.data());
    detail::matvec(w.w3, t.data(), Hd, D, b.data());
    for (index_t i = 0; i < Hd; ++i) a[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
    detail::matvec(w.w2, a.data(), D, Hd, t.data());
    for (index_t i = 0; i < D; ++i) x[i] += t[i];
  }

  /// logits (vocab) = classifier RMSNorm(x).
  void logits(const float* x, float* out) const {
    const index_t D = config_.dim;
    std::vector<float> h(static_cast<std::size_t>(D));
    detail::rmsnorm(x, final_norm(), D, config_.norm_eps, h.data());
    detail::matvec(classifier(), h.data(), config_.vocab, D, out);
  }

  /// Rotates adjacent pairs (2i, 2i+1) of each of `heads` heads of `x` by pos * theta^(-2i/head_dim).
  void rope(float* x, index_t heads, index_t pos) const {
    const index_t hd = config_.head_dim();
    for (index_t i = 0; i < hd / 2; ++i) {
      const double angle = static_cast<double>(pos) * std::pow(config_.rope_theta, -static_cast<double>(2 * i) /
                                                                                        static_cast<double>(hd));
      const float c = static_cast<float>(std::cos(angle)), s = static_cast<float>(std::sin(angle));
      for (index_t h = 0; h < heads; ++h) {
        float* p = x + h * hd + 2 * i;
        const float a = p[0], b = p[1];
        p[0] = a * c - b * s;
        p[1] = a * s + b * c;
      }
    }
  }

 private:
  enum Tensor { kEmbedding, kAttnNorm, kWq, kWk, kWv, kWo, kFfnNorm, kW1, kW2, kW3, kFinalNorm, kRope, kClassifier, kTensors };

  /// The header's config and the size of every tensor, checked against the image's total size.
  struct Layout {
    LlamaConfig config;
    std::int64_t sizes[kTensors] = {};  ///< floats per tensor, in file order (Tensor)
    std::int64_t floats = 0;
  };
  static Layout read_layout(std::span<const std::uint8_t> head, std::uint64_t file_size, std::string_view name) {
    const std::string what = detail::concat("checkpoint '", name, "'");
    detail::require(head.size() >= header_bytes, what, detail::concat(">= ", header_bytes, " bytes (the header)"),
                    detail::concat(file_size, " bytes"));
    std::int32_t h[7];
    for (int i = 0; i < 7; ++i) h[i] = detail::read_i32(head.data() + 4 * i);
    if (h[0] == 0x616b3432)  // "ak42": llama2.c's export.py version 1/2
      throw Error(concat_what(what, "format: expected the llama2.c legacy layout (version 0), got a version-",
                              detail::read_i32(head.data() + 4),
                              " export (magic \"ak42\"); re-export with --version 0"));
    LlamaConfig c;
    c.dim = h[0];
    c.hidden_dim = h[1];
    c.layers = h[2];
    c.heads = h[3];
    c.kv_heads = h[4];
    c.shared_classifier = h[5] > 0;
    c.vocab = h[5] < 0 ? -static_cast<index_t>(h[5]) : h[5];
    c.seq_len = h[6];
    const auto field = [&](const char* f) { return detail::concat(what, " header.", f); };
    detail::require(c.dim > 0, field("dim"), "> 0", c.dim);
    detail::require(c.hidden_dim > 0, field("hidden_dim"), "> 0", c.hidden_dim);
    detail::require(c.layers > 0, field("n_layers"), "> 0", c.layers);
    detail::require(c.heads > 0, field("n_heads"), "> 0", c.heads);
    detail::require(c.dim % c.heads == 0, field("n_heads"), detail::concat("a divisor of dim (", c.dim, ")"), c.heads);
    detail::require(c.head_dim() % 2 == 0, field("n_heads"),
                    detail::concat("a count that makes head_dim = dim / n_heads even (RoPE rotates pairs); dim = ", c.dim),
                    c.heads);
    detail::require(c.kv_heads > 0 && c.kv_heads <= c.heads && c.heads % c.kv_heads == 0, field("n_kv_heads"),
                    detail::concat("a divisor of n_heads (", c.heads, ")"), c.kv_heads);
    detail::require(c.vocab > 0, field("vocab_size"), "!= 0", h[5]);
    detail::require(c.seq_len > 0, field("seq_len"), "> 0", c.seq_len);

    // the tensors in file order (the RoPE tables are counted, then skipped)
    const std::int64_t D = c.dim, L = c.layers, Hd = c.hidden_dim, KV = c.kv_dim();
    const auto mul = [&](std::int64_t a, std::int64_t b) { return detail::size_mul(a, b, what + " size"); };
    Layout out;
    out.config = c;
    const std::int64_t sizes[kTensors] = {
        mul(c.vocab, D),          // embedding
        mul(L, D),                // attn_norm
        mul(L, mul(D, D)),        // wq
        mul(L, mul(KV, D)),       // wk
        mul(L, mul(KV, D)),       // wv
        mul(L, mul(D, D)),        // wo
        mul(L, D),                // ffn_norm
        mul(L, mul(Hd, D)),       // w1
        mul(L, mul(D, Hd)),       // w2
        mul(L, mul(Hd, D)),       // w3
        D,                        // final norm
        mul(c.seq_len, c.head_dim()),  // two legacy RoPE tables of seq_len x head_dim / 2
        c.shared_classifier ? 0 : mul(c.vocab, D),
    };
    std::int64_t floats = 0;
    for (std::int64_t s : sizes) {
      detail::require(floats <= (std::int64_t{1} << 62) - s, what + " size", "a size below 2^62", "more");
      floats += s;
    }
    const std::int64_t expected = mul(floats, 4) + static_cast<std::int64_t>(header_bytes);
    detail::require(file_size == static_cast<std::uint64_t>(expected), what + " size",
                    detail::concat(expected, " bytes for dim=", c.dim, " hidden_dim=", c.hidden_dim, " n_layers=",
                                   c.layers, " n_heads=", c.heads, " n_kv_heads=", c.kv_heads, " vocab_size=", h[5],
                                   " seq_len=", c.seq_len),
                    detail::concat(file_size, " bytes"));
    std::copy(std::begin(sizes), std::end(sizes), std::begin(out.sizes));
    out.floats = floats;
    return out;
  }

  template <class... Parts>
  static std::string concat_what(const std::string& what, const Parts&... parts) {
    return detail::concat("qpkv: ", what, " ", parts...);
  }
  [[nodiscard]] const float* at(Tensor t) const { return weights_.data() + offsets_[t]; }

  LlamaConfig config_;
  std::vector<float> weights_;
  std::int64_t offsets_[kTensors] = {};
};

}  // namespace qpkv::model
