// qpkv/study/retrieval.hpp - a needle-in-a-haystack benchmark at the attention level: one synthetic
// LLM-like layer of N = 4K ... 32K tokens, a needle planted at a chosen depth, and a decode query
// that must read the needle's answer out of the (compressed) cache.
//
//   make_retrieval_case(params, N, depth, seed)   the layer: prompt K, V, all N prompt queries, the
//                                                 decode token's k, v, q, the needle and its answer
//   full_attention(c, out)                        float64 attention of the decode query over the
//                                                 full cache (prompt + decode token)
//   read_answer(codebook, answers, dim, out_head) argmax_m <out_head, a_m>: the answer a head reads
//   retrieval_rate(c, out)                        fraction of query heads that read the needle's answer
//
// Everything below is fixed and was written down (here and in docs/results.md) BEFORE any
// compressed cache was evaluated on it; RetrievalParams holds the values as its defaults.
//
// THE LAYER (per KV head; heads are independent draws, they share only the token positions of
// the needle and the distractors and the answer codebook). It follows the synthetic generator of
// the shared conformance README (section 1), with RoPE and a needle added. D = head_dim (64),
// RoPE is Llama's half-split form: channel pair (i, i + D/2) rotates by pos * base^(-2i/D),
// base 500000 (Llama 3). The "band" is the `band_pairs` = 4 lowest-frequency pairs (8 channels);
// over 32K positions they rotate by < 0.5 rad, so content placed there matches at any distance.
// Models use the low frequencies this way (Barbero et al. 2024, "Round and round we go! What makes
// rotary positional encodings useful?"); the sink direction and the needle signature live there.
//  1. Local topics: 32 key topics and 32 value topics, N(0,1)^D. The sequence (N prompt tokens +
//     the decode token) is cut into segments of uniform random length 8..64, each with a random
//     topic. Base key k~_t = 0.6 topic + 0.8 N(0,1).
//  2. Needle and distractors. Random unit vectors in the band: the needle signature n in the two
//     lowest-frequency pairs; the common query direction u and one direction m_d per distractor
//     (u, m_d orthonormal) in the other two pairs. RoPE mixes channels only within a pair, so
//     R(x) m_d stays orthogonal to n at every distance x. Needle position p = 1 + round(depth
//     (N - W - 2)): depth 0 = right after the sink, depth 1 = right before the question (the last
//     W prompt tokens). The needle's band channels are set to s n (s = 12); three distractors
//     ("near-miss sentences") at distinct random positions in [1, N - W - 1] \ {p} get band
//     channels s (0.8 n + 0.6 m_d), so whatever query looks for n scores a distractor at exactly
//     0.8 x the needle (up to the rotation between their positions). They are what a pruned or
//     noisy cache confuses the needle with.
//  3. Keys: k~ with 4 outlier channels (random, outside the band) set to +-8 (1 + 0.3 N(0,1)) with
//     a per-channel sign (~10x the other channels), then rotated: k_t = R(t) k~_t. Attention sink:
//     k_0 = 1.5 sqrt(D) u + N(0, 0.05^2) before the outlier channels are set (R(0) = I).
//  4. Queries (every prompt position n, and the decode position N), built before rotation:
//     q~_n = (9/sqrt D) R(t(n) - n) k~_t(n) + (5/sqrt D) R(-1) k~_{n-1} + mu sqrt(D) u + 0.4 N(0,1),
//     mu = 8 / (1.5 sqrt D); outlier channels of q~ ~ N(0, 0.1^2); q_n = R(n) q~_n. So q_n . k_m
//     sees the heavy hitter t(n) and the previous token at their real positions, and the sink with
//     a logit of about +8. t(n) is drawn from max(8, N/64) heavy-hitter positions (uniform in [1, N),
//     never the needle or a distractor) below n with Zipf weights 1/(rank + 1); n = 0 has no such terms.
//  5. The question. The last W = 32 prompt queries and the decode query also look for the needle:
//     q_n += g_n R(n) n. g_n >= 0 is solved per query (bisection, float64) so that, over the full
//     cache that query sees (causal: keys 0..n), the needle gets softmax probability exactly 0.1 for
//     a question query and 0.3 for the decode query; the decode query's g is raised further if
//     needed until the needle's logit exceeds every distractor's by >= 1 nat (decode_margin).
//  6. Values: (0.8 value topic + 0.6 N(0,1)) times a per-channel scale log-uniform in [0.5, 2];
//     token 0's value x 0.1 (a small sink value). The answer codebook is M = 16 orthonormal vectors
//     a_1..a_M (random, shared by the heads); every value is projected onto their orthogonal
//     complement, then the needle's value gets + beta a_{j*} and distractor d's + beta a_{j_d}
//     (beta = 8; j* and the j_d distinct and random per KV head). Only needles carry answers.
//  7. Keys, values and queries are rounded to fp16 (the full fp16 cache holds them exactly); the
//     calibration of step 5 runs on the rounded keys. The decode token (position N) is an ordinary
//     haystack token of the last segment.
// Random numbers: xoshiro256** seeded by splitmix64(seed), normals by Box-Muller, so a seed gives
// the same bytes on every platform (std:: distributions are implementation-defined).
//
// THE METRIC. The decode query attends over the cache after compress(prompt) and append(decode
// token): out_h for each query head h. Head h reads answer argmax_m <out_h, a_m> (ties: lower m);
// it retrieves iff that is its KV head's needle answer j*. Retrieval rate of a case = fraction of
// the q_heads query heads (8: 4 KV heads x GQA 2) that retrieve. The full cache retrieves in every
// head by construction: the haystack values are orthogonal to the codebook, so <out_h, a_m> =
// beta x (attention on the token carrying a_m) up to fp16 rounding of the values, and step 5 puts
// the needle >= 1 nat above each distractor; make_retrieval_case verifies it (float64) and throws
// qpkv::Error otherwise. Attention-output error = relative_l2(out, out_full) over all query heads,
// out_full = the KeepAll fp16 cache. needle_kept (diagnostic) = fraction of KV heads whose
// selection kept the needle: it separates pruning failures from quantization failures.
//
// Defaults: 4 KV heads, 8 query heads, head_dim 64 (a Llama-like GQA layer small enough that H2O's
// N x N prefill scores stay affordable at 32K on a CPU).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "qpkv/core/dtype.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"

namespace qpkv::study {

namespace detail {
using namespace ::qpkv::detail;
}  // namespace detail

/// Deterministic random numbers: xoshiro256** seeded through splitmix64; Box-Muller normals.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) {
    for (auto& s : s_) s = splitmix(seed);
  }
  std::uint64_t next() {
    const std::uint64_t r = rotl(s_[1] * 5, 7) * 9, t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return r;
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }
  /// Uniform integer in [0, n).
  index_t below(index_t n) { return static_cast<index_t>(uniform() * static_cast<double>(n)); }
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform(), r = std::sqrt(-2.0 * std::log(u1)), a = 6.283185307179586 * u2;
    spare_ = r * std::sin(a);
    has_spare_ = true;
    return r * std::cos(a);
  }

 private:
  static std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static std::uint64_t splitmix(std::uint64_t& x) {
    std::uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  std::uint64_t s_[4]{};
  double spare_ = 0.0;
  bool has_spare_ = false;
};

/// The generator's parameters; the defaults are the benchmark (see the header comment).
struct RetrievalParams {
  Shape shape{4, 8, 64};
  index_t window = 32;              ///< W: question queries (also the selectors' observation window)
  double rope_base = 500000.0;
  index_t band_pairs = 4;           ///< lowest-frequency RoPE pairs holding sink direction and signatures
  index_t topics = 32;
  index_t segment_min = 8;
  index_t segment_max = 64;
  index_t outlier_channels = 4;
  double outlier_scale = 8.0;
  index_t distractors = 3;
  double distractor_similarity = 0.8;  ///< cosine of a distractor's signature with the needle's
  double signature = 12.0;             ///< s: norm of the needle signature added to its key
  index_t answers = 16;                ///< M: answer codebook size
  double answer_scale = 8.0;           ///< beta
  double question_prob = 0.1;          ///< needle probability of each question query (full cache)
  double decode_prob = 0.3;            ///< needle probability of the decode query (at least)
  double decode_margin = 1.0;          ///< decode logit of the needle minus any distractor's (nats, at least)

  void validate() const {
    shape.validate();
    detail::require(shape.head_dim % 2 == 0, "params.shape.head_dim", "even (RoPE pairs)", shape.head_dim);
    detail::require(window >= 1, "params.window", ">= 1", window);
    detail::require(band_pairs >= 3 && 2 * (band_pairs - 2) >= 1 + distractors && band_pairs <= shape.head_dim / 2,
                    "params.band_pairs", "2 pairs for the needle + room for u and one direction per distractor", band_pairs);
    detail::require(shape.head_dim - 2 * band_pairs >= outlier_channels, "params.outlier_channels",
                    "<= channels outside the band", outlier_channels);
    detail::require(topics >= 1, "params.topics", ">= 1", topics);
    detail::require(segment_min >= 1 && segment_max >= segment_min, "params.segment_max", ">= segment_min >= 1",
                    segment_max);
    detail::require(answers >= distractors + 1 && answers <= shape.head_dim, "params.answers",
                    "in [distractors + 1, head_dim]", answers);
    detail::require(question_prob > 0 && question_prob < 1, "params.question_prob", "in (0, 1)", question_prob);
    detail::require(decode_prob > 0 && decode_prob < 1, "params.decode_prob", "in (0, 1)", decode_prob);
    detail::require(distractor_similarity >= 0 && distractor_similarity < 1, "params.distractor_similarity",
                    "in [0, 1)", distractor_similarity);
  }
};

/// One generated layer. Keys and values are stored (kv_heads, N + 1, D) and queries (q_heads, N + 1,
/// D): rows 0..N-1 are the prompt, row N the decode token; the *_view() accessors give the prompt.
struct RetrievalCase {
  RetrievalParams params;
  index_t tokens = 0;  ///< N, the prompt length
  double depth = 0;
  index_t needle = 0;  ///< the needle's position
  std::vector<index_t> distractor_positions;
  std::vector<index_t> answer;                 ///< per KV head: the needle's answer j*
  std::vector<index_t> distractor_answers;     ///< (kv_heads, distractors)
  std::vector<float> codebook;                 ///< (answers, D), orthonormal rows
  std::vector<float> keys, values, queries;    ///< see above
  std::vector<float> decode_k, decode_v;       ///< (kv_heads, D): row N of keys / values
  std::vector<float> decode_q;                 ///< (q_heads, D): row N of queries
  std::vector<double> full_needle_prob;        ///< per query head: decode attention on the needle (full cache)
  std::vector<double> full_margin;             ///< per query head: needle logit minus the best distractor's

  [[nodiscard]] const Shape& shape() const { return params.shape; }
  [[nodiscard]] TensorView<float> key_view() const { return prompt(keys, params.shape.kv_heads); }
  [[nodiscard]] TensorView<float> value_view() const { return prompt(values, params.shape.kv_heads); }
  [[nodiscard]] TensorView<float> query_view() const { return prompt(queries, params.shape.q_heads); }
  /// Keys / values including the decode token (N + 1 tokens): what the full cache holds when it attends.
  [[nodiscard]] TensorView<float> all_keys() const { return view(keys.data(), params.shape.kv_heads, tokens + 1, params.shape.head_dim); }
  [[nodiscard]] TensorView<float> all_values() const { return view(values.data(), params.shape.kv_heads, tokens + 1, params.shape.head_dim); }

 private:
  [[nodiscard]] TensorView<float> prompt(const std::vector<float>& x, index_t heads) const {
    const index_t D = params.shape.head_dim;
    return TensorView<float>{x.data(), heads, tokens, D, (tokens + 1) * D, D};
  }
};

/// The answer index a head reads from its attention output: argmax_m <out_head, a_m> (ties: lower m).
inline index_t read_answer(std::span<const float> codebook, index_t answers, index_t dim, const float* out_head) {
  detail::require(static_cast<index_t>(codebook.size()) == answers * dim, "codebook.size()",
                  detail::concat(answers, " x ", dim), codebook.size());
  index_t best = 0;
  double best_score = -std::numeric_limits<double>::infinity();
  for (index_t m = 0; m < answers; ++m) {
    double s = 0.0;
    for (index_t c = 0; c < dim; ++c) s += static_cast<double>(codebook[static_cast<std::size_t>(m * dim + c)]) * out_head[c];
    if (s > best_score) {
      best_score = s;
      best = m;
    }
  }
  return best;
}

/// Fraction of query heads whose output `out` (q_heads, D) reads their KV head's needle answer.
inline double retrieval_rate(const RetrievalCase& c, std::span<const float> out) {
  const Shape& s = c.shape();
  detail::require(static_cast<index_t>(out.size()) == s.q_heads * s.head_dim, "out.size()",
                  detail::concat("q_heads x head_dim = ", s.q_heads * s.head_dim), out.size());
  index_t hits = 0;
  for (index_t h = 0; h < s.q_heads; ++h) {
    const index_t got = read_answer(c.codebook, c.params.answers, s.head_dim, out.data() + h * s.head_dim);
    hits += got == c.answer[static_cast<std::size_t>(h / s.group_size())] ? 1 : 0;
  }
  return static_cast<double>(hits) / static_cast<double>(s.q_heads);
}

namespace detail {
using namespace ::qpkv::detail;

/// Rotates x (D floats) in place by RoPE at position pos (half-split pairs (i, i + D/2)).
inline void rope_rotate(double* x, index_t dim, double pos, double base) {
  const index_t half_dim = dim / 2;
  for (index_t i = 0; i < half_dim; ++i) {
    const double theta = pos * std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(dim));
    const double c = std::cos(theta), s = std::sin(theta);
    const double a = x[i], b = x[i + half_dim];
    x[i] = a * c - b * s;
    x[i + half_dim] = a * s + b * c;
  }
}

/// Orthonormalises rows[k] against rows[0..k) (Gram-Schmidt, twice for stability); false if degenerate.
inline bool orthonormalize(std::vector<std::vector<double>>& rows, std::size_t k) {
  for (int pass = 0; pass < 2; ++pass)
    for (std::size_t j = 0; j < k; ++j) {
      double d = 0.0;
      for (std::size_t c = 0; c < rows[k].size(); ++c) d += rows[k][c] * rows[j][c];
      for (std::size_t c = 0; c < rows[k].size(); ++c) rows[k][c] -= d * rows[j][c];
    }
  double n = 0.0;
  for (double v : rows[k]) n += v * v;
  n = std::sqrt(n);
  if (n < 1e-6) return false;
  for (double& v : rows[k]) v /= n;
  return true;
}

/// Softmax probability of token `target` for logits l0 + g a (float64, over all entries).
inline double prob_at(std::span<const double> l0, std::span<const double> a, double g, std::size_t target) {
  double m = -std::numeric_limits<double>::infinity();
  for (std::size_t i = 0; i < l0.size(); ++i) m = std::max(m, l0[i] + g * a[i]);
  double sum = 0.0;
  for (std::size_t i = 0; i < l0.size(); ++i) sum += std::exp(l0[i] + g * a[i] - m);
  return std::exp(l0[target] + g * a[target] - m) / sum;
}

/// The least g >= 0 (to ~1e-9 relative, by bracketing and bisection) with prob_at(g) >= target.
inline double solve_gain(std::span<const double> l0, std::span<const double> a, std::size_t target, double want) {
  if (prob_at(l0, a, 0.0, target) >= want) return 0.0;
  double lo = 0.0, hi = 1.0;
  while (prob_at(l0, a, hi, target) < want) {
    lo = hi;
    hi *= 2.0;
    if (hi > 1e6) fail("retrieval generator", "the needle cannot reach the requested attention probability");
  }
  for (int it = 0; it < 40; ++it) {
    const double mid = 0.5 * (lo + hi);
    (prob_at(l0, a, mid, target) >= want ? hi : lo) = mid;
  }
  return hi;
}

inline float round_half(double x) { return to_float(to_half(static_cast<float>(x))); }

}  // namespace detail

/// Builds the benchmark layer for an N-token prompt with the needle at `depth` in [0, 1] (see the
/// header comment). Deterministic in (params, tokens, depth, seed). Throws qpkv::Error if the full
/// cache would not retrieve the needle in every query head (it always does for the defaults).
inline RetrievalCase make_retrieval_case(const RetrievalParams& params, index_t tokens, double depth,
                                         std::uint64_t seed) {
  params.validate();
  const index_t W = params.window;
  detail::require(tokens >= W + 8 + params.distractors, "tokens", detail::concat(">= window + 8 + distractors (", W + 8 + params.distractors, ")"), tokens);
  detail::require(depth >= 0.0 && depth <= 1.0, "depth", "in [0, 1]", depth);
  const Shape& shape = params.shape;
  const index_t H = shape.kv_heads, Hq = shape.q_heads, D = shape.head_dim, N = tokens, T = N + 1;
  const index_t group = shape.group_size();
  const double sqrtD = std::sqrt(static_cast<double>(D));
  const auto sz = [](index_t x) { return static_cast<std::size_t>(x); };

  RetrievalCase c;
  c.params = params;
  c.tokens = N;
  c.depth = depth;
  Rng rng(seed);

  // Shared: needle and distractor positions, the answer codebook.
  c.needle = 1 + static_cast<index_t>(std::llround(depth * static_cast<double>(N - W - 2)));
  while (static_cast<index_t>(c.distractor_positions.size()) < params.distractors) {
    const index_t p = 1 + rng.below(N - W - 1);
    if (p != c.needle && std::find(c.distractor_positions.begin(), c.distractor_positions.end(), p) ==
                             c.distractor_positions.end())
      c.distractor_positions.push_back(p);
  }
  const index_t M = params.answers;
  {
    std::vector<std::vector<double>> A;
    while (static_cast<index_t>(A.size()) < M) {
      A.emplace_back(sz(D));
      for (double& v : A.back()) v = rng.normal();
      if (!detail::orthonormalize(A, A.size() - 1)) A.pop_back();
    }
    c.codebook.resize(sz(M * D));
    for (index_t m = 0; m < M; ++m)
      for (index_t d = 0; d < D; ++d) c.codebook[sz(m * D + d)] = static_cast<float>(A[sz(m)][sz(d)]);
  }
  // The projection uses the float codebook, so orthogonality holds for the stored vectors.
  auto project_out = [&](std::vector<double>& v) {
    for (index_t m = 0; m < M; ++m) {
      double d = 0.0;
      for (index_t k = 0; k < D; ++k) d += v[sz(k)] * c.codebook[sz(m * D + k)];
      for (index_t k = 0; k < D; ++k) v[sz(k)] -= d * c.codebook[sz(m * D + k)];
    }
  };

  c.keys.assign(sz(H * T * D), 0.0f);
  c.values.assign(sz(H * T * D), 0.0f);
  c.queries.assign(sz(Hq * T * D), 0.0f);
  c.answer.resize(sz(H));
  c.distractor_answers.resize(sz(H * params.distractors));
  c.full_needle_prob.assign(sz(Hq), 0.0);
  c.full_margin.assign(sz(Hq), 0.0);

  // the band: needle signature in its two lowest-frequency pairs, u and distractor directions in the rest
  std::vector<index_t> band, sig_band, other_band;
  for (index_t i = D / 2 - params.band_pairs; i < D / 2; ++i) {
    auto& part = i >= D / 2 - 2 ? sig_band : other_band;
    for (index_t ch : {i, i + D / 2}) {
      band.push_back(ch);
      part.push_back(ch);
    }
  }
  auto in_band = [&](index_t ch) { return std::find(band.begin(), band.end(), ch) != band.end(); };

  for (index_t h = 0; h < H; ++h) {
    // answers: j* and distinct distractor answers
    std::vector<index_t> perm(sz(M));
    std::iota(perm.begin(), perm.end(), index_t{0});
    for (index_t i = M - 1; i > 0; --i) std::swap(perm[sz(i)], perm[sz(rng.below(i + 1))]);
    c.answer[sz(h)] = perm[0];
    for (index_t d = 0; d < params.distractors; ++d) c.distractor_answers[sz(h * params.distractors + d)] = perm[sz(1 + d)];

    // band directions: n in the two lowest-frequency pairs; u and the m_d (orthonormal) in the
    // other band pairs. RoPE only mixes channels within a pair, so R(x) m_d and R(x) u stay
    // orthogonal to n at every distance x: a distractor's match is exactly rho x the needle's.
    auto random_unit_in = [&](const std::vector<index_t>& channels, std::vector<std::vector<double>>& set) {
      for (;;) {
        set.emplace_back(sz(D), 0.0);
        for (index_t ch : channels) set.back()[sz(ch)] = rng.normal();
        if (detail::orthonormalize(set, set.size() - 1)) return;
        set.pop_back();
      }
    };
    std::vector<std::vector<double>> sig_set, dirs;
    random_unit_in(sig_band, sig_set);
    for (index_t i = 0; i < 1 + params.distractors; ++i) random_unit_in(other_band, dirs);
    const std::vector<double>& u = dirs[0];
    const std::vector<double>& sig = sig_set[0];

    // topics and segments
    std::vector<double> key_topic(sz(params.topics * D)), value_topic(sz(params.topics * D));
    for (double& x : key_topic) x = rng.normal();
    for (double& x : value_topic) x = rng.normal();
    std::vector<index_t> topic(sz(T));
    for (index_t t = 0; t < T;) {
      const index_t len = params.segment_min + rng.below(params.segment_max - params.segment_min + 1);
      const index_t tp = rng.below(params.topics);
      for (index_t i = t; i < std::min(T, t + len); ++i) topic[sz(i)] = tp;
      t += len;
    }
    std::vector<double> chan_scale(sz(D));
    for (double& x : chan_scale) x = std::exp(std::log(0.5) + rng.uniform() * (std::log(2.0) - std::log(0.5)));

    // outlier channels outside the band, with a fixed sign each
    std::vector<index_t> outliers;
    std::vector<double> outlier_sign;
    while (static_cast<index_t>(outliers.size()) < params.outlier_channels) {
      const index_t ch = rng.below(D);
      if (!in_band(ch) && std::find(outliers.begin(), outliers.end(), ch) == outliers.end()) {
        outliers.push_back(ch);
        outlier_sign.push_back(rng.uniform() < 0.5 ? -1.0 : 1.0);
      }
    }

    // 1-2. base keys (pre-RoPE) with the needle and distractor signatures
    std::vector<double> base(sz(T * D));
    for (index_t t = 0; t < T; ++t)
      for (index_t d = 0; d < D; ++d)
        base[sz(t * D + d)] = 0.6 * key_topic[sz(topic[sz(t)] * D + d)] + 0.8 * rng.normal();
    for (index_t ch : band) base[sz(c.needle * D + ch)] = params.signature * sig[sz(ch)];
    const double rho = params.distractor_similarity, rho_perp = std::sqrt(1.0 - rho * rho);
    for (index_t i = 0; i < params.distractors; ++i) {
      const index_t p = c.distractor_positions[sz(i)];
      for (index_t ch : band)
        base[sz(p * D + ch)] = params.signature * (rho * sig[sz(ch)] + rho_perp * dirs[sz(1 + i)][sz(ch)]);
    }

    // 3. keys: outliers, sink, RoPE, fp16
    std::vector<double> row(sz(D));
    for (index_t t = 0; t < T; ++t) {
      for (index_t d = 0; d < D; ++d) row[sz(d)] = base[sz(t * D + d)];
      if (t == 0)
        for (index_t d = 0; d < D; ++d) row[sz(d)] = 1.5 * sqrtD * u[sz(d)] + 0.05 * rng.normal();
      for (std::size_t o = 0; o < outliers.size(); ++o)
        row[sz(outliers[o])] = outlier_sign[o] * params.outlier_scale * (1.0 + 0.3 * rng.normal());
      detail::rope_rotate(row.data(), D, static_cast<double>(t), params.rope_base);
      for (index_t d = 0; d < D; ++d) c.keys[sz((h * T + t) * D + d)] = detail::round_half(row[sz(d)]);
    }

    // 6. values
    for (index_t t = 0; t < T; ++t) {
      for (index_t d = 0; d < D; ++d)
        row[sz(d)] = (0.8 * value_topic[sz(topic[sz(t)] * D + d)] + 0.6 * rng.normal()) * chan_scale[sz(d)] *
                     (t == 0 ? 0.1 : 1.0);
      project_out(row);
      auto add_answer = [&](index_t m) {
        for (index_t d = 0; d < D; ++d) row[sz(d)] += params.answer_scale * c.codebook[sz(m * D + d)];
      };
      if (t == c.needle) add_answer(c.answer[sz(h)]);
      for (index_t i = 0; i < params.distractors; ++i)
        if (t == c.distractor_positions[sz(i)]) add_answer(c.distractor_answers[sz(h * params.distractors + i)]);
      for (index_t d = 0; d < D; ++d) c.values[sz((h * T + t) * D + d)] = detail::round_half(row[sz(d)]);
    }

    // 4. heavy-hitter positions with Zipf weights (never the needle or a distractor)
    const index_t n_hh = std::max<index_t>(8, N / 64);
    std::vector<index_t> hh;
    while (static_cast<index_t>(hh.size()) < n_hh) {
      const index_t p = 1 + rng.below(N - 1);
      if (p != c.needle && std::find(c.distractor_positions.begin(), c.distractor_positions.end(), p) ==
                               c.distractor_positions.end())
        hh.push_back(p);
    }

    const double mu = 8.0 / (1.5 * sqrtD);
    std::vector<double> qrow(sz(D)), tmp(sz(D)), dir(sz(D)), l0, a;
    for (index_t qh = h * group; qh < (h + 1) * group; ++qh) {
      for (index_t n = 0; n < T; ++n) {
        std::fill(qrow.begin(), qrow.end(), 0.0);
        if (n > 0) {
          // heavy hitter among those below n, Zipf weight 1 / (rank + 1)
          double total = 0.0;
          for (std::size_t r = 0; r < hh.size(); ++r)
            if (hh[r] < n) total += 1.0 / static_cast<double>(r + 1);
          index_t t_hh = n - 1;
          if (total > 0.0) {
            double x = rng.uniform() * total;
            for (std::size_t r = 0; r < hh.size(); ++r)
              if (hh[r] < n) {
                t_hh = hh[r];
                x -= 1.0 / static_cast<double>(r + 1);
                if (x < 0.0) break;
              }
          }
          for (index_t d = 0; d < D; ++d) tmp[sz(d)] = base[sz(t_hh * D + d)];
          detail::rope_rotate(tmp.data(), D, static_cast<double>(t_hh - n), params.rope_base);
          for (index_t d = 0; d < D; ++d) qrow[sz(d)] += 9.0 / sqrtD * tmp[sz(d)];
          for (index_t d = 0; d < D; ++d) tmp[sz(d)] = base[sz((n - 1) * D + d)];
          detail::rope_rotate(tmp.data(), D, -1.0, params.rope_base);
          for (index_t d = 0; d < D; ++d) qrow[sz(d)] += 5.0 / sqrtD * tmp[sz(d)];
        }
        for (index_t d = 0; d < D; ++d) qrow[sz(d)] += mu * sqrtD * u[sz(d)] + 0.4 * rng.normal();
        for (index_t o : outliers) qrow[sz(o)] = 0.1 * rng.normal();
        detail::rope_rotate(qrow.data(), D, static_cast<double>(n), params.rope_base);

        // 5. the question: the last W prompt queries and the decode query look for the needle
        if (n >= N - W) {
          dir = sig;
          detail::rope_rotate(dir.data(), D, static_cast<double>(n), params.rope_base);
          l0.assign(sz(n + 1), 0.0);
          a.assign(sz(n + 1), 0.0);
          for (index_t m = 0; m <= n; ++m) {
            const float* k = &c.keys[sz((h * T + m) * D)];
            double s0 = 0.0, s1 = 0.0;
            for (index_t d = 0; d < D; ++d) {
              s0 += qrow[sz(d)] * k[d];
              s1 += dir[sz(d)] * k[d];
            }
            l0[sz(m)] = s0 / sqrtD;
            a[sz(m)] = s1 / sqrtD;
          }
          const std::size_t p = sz(c.needle);
          double g = detail::solve_gain(l0, a, p, n == N ? params.decode_prob : params.question_prob);
          if (n == N)
            for (index_t dd : c.distractor_positions) {
              const double slope = a[p] - a[sz(dd)];
              if (slope <= 0.0) detail::fail("retrieval generator", "a distractor matches the question better than the needle");
              g = std::max(g, (params.decode_margin - (l0[p] - l0[sz(dd)])) / slope);
            }
          for (index_t d = 0; d < D; ++d) qrow[sz(d)] += g * dir[sz(d)];
        }
        for (index_t d = 0; d < D; ++d) c.queries[sz((qh * T + n) * D + d)] = detail::round_half(qrow[sz(d)]);
      }
    }
  }

  // decode token rows as contiguous (heads, D) arrays
  c.decode_k.resize(sz(H * D));
  c.decode_v.resize(sz(H * D));
  c.decode_q.resize(sz(Hq * D));
  for (index_t h = 0; h < H; ++h)
    for (index_t d = 0; d < D; ++d) {
      c.decode_k[sz(h * D + d)] = c.keys[sz((h * T + N) * D + d)];
      c.decode_v[sz(h * D + d)] = c.values[sz((h * T + N) * D + d)];
    }
  for (index_t qh = 0; qh < Hq; ++qh)
    for (index_t d = 0; d < D; ++d) c.decode_q[sz(qh * D + d)] = c.queries[sz((qh * T + N) * D + d)];

  // Verify the construction on the stored (rounded) numbers: float64 attention of the decode query.
  for (index_t qh = 0; qh < Hq; ++qh) {
    const index_t h = qh / group;
    std::vector<double> logit(sz(T));
    double m = -std::numeric_limits<double>::infinity();
    for (index_t t = 0; t < T; ++t) {
      double s = 0.0;
      for (index_t d = 0; d < D; ++d)
        s += static_cast<double>(c.decode_q[sz(qh * D + d)]) * c.keys[sz((h * T + t) * D + d)];
      logit[sz(t)] = s / sqrtD;
      m = std::max(m, logit[sz(t)]);
    }
    double sum = 0.0;
    for (double l : logit) sum += std::exp(l - m);
    std::vector<double> out(sz(D), 0.0);
    for (index_t t = 0; t < T; ++t) {
      const double p = std::exp(logit[sz(t)] - m) / sum;
      for (index_t d = 0; d < D; ++d) out[sz(d)] += p * c.values[sz((h * T + t) * D + d)];
    }
    c.full_needle_prob[sz(qh)] = std::exp(logit[sz(c.needle)] - m) / sum;
    double margin = std::numeric_limits<double>::infinity();
    for (index_t dd : c.distractor_positions) margin = std::min(margin, logit[sz(c.needle)] - logit[sz(dd)]);
    c.full_margin[sz(qh)] = margin;
    std::vector<float> outf(out.begin(), out.end());
    if (read_answer(c.codebook, M, D, outf.data()) != c.answer[sz(h)])
      detail::fail("retrieval generator", detail::concat("the full cache misreads the needle in query head ", qh,
                                                         " (seed ", seed, ", N ", N, ", depth ", depth, ")"));
  }
  return c;
}

/// Float64 attention of the decode query over the full cache (prompt + decode token): out (q_heads, D).
inline void full_attention(const RetrievalCase& c, std::span<float> out) {
  const Shape& s = c.shape();
  detail::require(static_cast<index_t>(out.size()) == s.q_heads * s.head_dim, "out.size()",
                  s.q_heads * s.head_dim, out.size());
  const index_t T = c.tokens + 1, D = s.head_dim, g = s.group_size();
  const double sqrtD = std::sqrt(static_cast<double>(D));
  for (index_t qh = 0; qh < s.q_heads; ++qh) {
    const index_t h = qh / g;
    std::vector<double> logit(static_cast<std::size_t>(T));
    double m = -std::numeric_limits<double>::infinity();
    for (index_t t = 0; t < T; ++t) {
      double x = 0.0;
      for (index_t d = 0; d < D; ++d)
        x += static_cast<double>(c.decode_q[static_cast<std::size_t>(qh * D + d)]) *
             c.keys[static_cast<std::size_t>((h * T + t) * D + d)];
      logit[static_cast<std::size_t>(t)] = x / sqrtD;
      m = std::max(m, x / sqrtD);
    }
    double sum = 0.0;
    for (double& l : logit) sum += (l = std::exp(l - m));
    for (index_t d = 0; d < D; ++d) {
      double o = 0.0;
      for (index_t t = 0; t < T; ++t)
        o += logit[static_cast<std::size_t>(t)] * c.values[static_cast<std::size_t>((h * T + t) * D + d)];
      out[static_cast<std::size_t>(qh * D + d)] = static_cast<float>(o / sum);
    }
  }
}

}  // namespace qpkv::study
