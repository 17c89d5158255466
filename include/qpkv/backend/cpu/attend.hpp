// qpkv/backend/cpu/attend.hpp - decode attention computed directly on the packed cache (CPU).
//
// For each KV head, one pass over its blocks serves every query head of its GQA group: a block's
// codes are read once, then used by all g queries. Softmax is online (running max and sum,
// float32), block by block, then the fp16 residual. For Affine quantizers the scales are folded in
// algebraically instead of dequantizing (DESIGN.md):
//   keys per channel:   q.k_t = sum_c (q_c s_c) code_tc + sum_c q_c m_c       (per token group)
//   keys per token:     q.k_t = sum_groups [ s_tg sum_{c in g} q_c code_tc + m_tg sum_{c in g} q_c ]
//   values per token:   sum_t p_t v_t = sum_t (p_t s_tg) code_t + (p_t m_tg)
//   values per channel: sum_t p_t v_tc = s_c sum_t p_t code_tc + m_c sum_t p_t  (per token group)
// Parts with outliers, and quantizers qpkv does not know, are decoded one block at a time into a
// small scratch buffer instead.
//
// Split-K: each head's blocks are cut into chunks of kChunkTokens tokens (the residual goes with
// the last chunk). A (head, chunk) work item leaves an online-softmax partial (max, sum, output);
// partials are merged per head in chunk order with the log-sum-exp rule. Chunk boundaries depend
// only on the token count, and OpenMP threads only decide who computes an item, so the result is
// the same for every thread count, bit for bit; both cores work on one sequence.
//
// Kernels: with AVX-512 compiled in (simd.hpp), KIVI-layout caches (per-channel Affine keys,
// per-token Affine values, fp16 scales, no outliers; 2/4/8 bits) and Fp16 caches run the kernels
// of attend_avx512.hpp; everything else, and every build without -march, runs the portable C++
// kernels below. AttendPrecision::fast selects the VNNI integer q.k (precision.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "qpkv/backend/cpu/attend_avx512.hpp"
#include "qpkv/backend/cpu/precision.hpp"
#include "qpkv/backend/cpu/simd.hpp"
#include "qpkv/cache/layout.hpp"
#include "qpkv/quant/affine_quantizer.hpp"
#include "qpkv/quant/fp16.hpp"

namespace qpkv::cpu {

template <class Q>
struct is_affine : std::false_type {};
template <int B, class S>
struct is_affine<Affine<B, S>> : std::true_type {};

namespace detail {

struct Scratch {
  std::vector<std::uint8_t> codes;  // B x D unpacked codes
  std::vector<float> dec;           // B x D decoded values
  std::vector<float> qs;            // D pre-scaled query
  std::vector<float> tmp;           // g x D per-group partial sums
};

/// Unpacks the B code rows of an Affine part into B x D bytes (once per block, for all queries).
template <int Bits>
void unpack_rows(const std::uint8_t* part, const AffineLayout& l, index_t B, index_t D, std::uint8_t* codes) {
  for (index_t t = 0; t < B; ++t)
    quant::unpack<Bits>(part + l.codes + static_cast<std::size_t>(t) * l.row_bytes, static_cast<std::size_t>(D), codes + t * D);
}

/// logits[i * B + t] = q_i . k_t for the B tokens of a key part (unscaled).
template <class KQ>
void key_logits(const KQ& kq, const std::uint8_t* part, index_t B, index_t D, const float* q, index_t g,
                float* logits, Scratch& s) {
  if constexpr (is_affine<KQ>::value) {
    const AffineLayout l = kq.layout(B, D);
    if (l.slots == 0) {
      using ST = typename KQ::scale_type;
      const auto* sc = reinterpret_cast<const ST*>(part + l.scales);
      const auto* mn = reinterpret_cast<const ST*>(part + l.mins);
      unpack_rows<KQ::bits>(part, l, B, D, s.codes.data());
      if (kq.axis == Axis::channel) {
        const index_t G = kq.group;
        for (index_t gt = 0; gt < B / G; ++gt)
          for (index_t i = 0; i < g; ++i) {
            const float* qi = q + i * D;
            float bias = 0.0f;
            for (index_t c = 0; c < D; ++c) {
              s.qs[c] = qi[c] * to_float(sc[gt * D + c]);
              bias += qi[c] * to_float(mn[gt * D + c]);
            }
            for (index_t t = gt * G; t < (gt + 1) * G; ++t) {
              const std::uint8_t* code = s.codes.data() + t * D;
              float acc = 0.0f;
              for (index_t c = 0; c < D; ++c) acc += s.qs[c] * static_cast<float>(code[c]);
              logits[i * B + t] = acc + bias;
            }
          }
      } else {
        const index_t G = kq.group, per_row = (D + G - 1) / G;
        for (index_t t = 0; t < B; ++t) {
          const std::uint8_t* code = s.codes.data() + t * D;
          for (index_t i = 0; i < g; ++i) {
            const float* qi = q + i * D;
            float acc = 0.0f;
            for (index_t gc = 0; gc < per_row; ++gc) {
              float dot = 0.0f, qsum = 0.0f;
              for (index_t c = gc * G; c < std::min(D, (gc + 1) * G); ++c) {
                dot += qi[c] * static_cast<float>(code[c]);
                qsum += qi[c];
              }
              acc += to_float(sc[t * per_row + gc]) * dot + to_float(mn[t * per_row + gc]) * qsum;
            }
            logits[i * B + t] = acc;
          }
        }
      }
      return;
    }
  }
  kq.decode(part, B, D, s.dec.data());
  for (index_t i = 0; i < g; ++i)
    for (index_t t = 0; t < B; ++t) {
      float acc = 0.0f;
      for (index_t c = 0; c < D; ++c) acc += q[i * D + c] * s.dec[t * D + c];
      logits[i * B + t] = acc;
    }
}

/// acc[i * D + c] += sum_t p[i * B + t] * v_tc over the B tokens of a value part.
template <class VQ>
void accumulate_values(const VQ& vq, const std::uint8_t* part, index_t B, index_t D, const float* p, index_t g,
                       float* acc, Scratch& s) {
  if constexpr (is_affine<VQ>::value) {
    const AffineLayout l = vq.layout(B, D);
    if (l.slots == 0) {
      using ST = typename VQ::scale_type;
      const auto* sc = reinterpret_cast<const ST*>(part + l.scales);
      const auto* mn = reinterpret_cast<const ST*>(part + l.mins);
      unpack_rows<VQ::bits>(part, l, B, D, s.codes.data());
      const index_t G = vq.group;
      if (vq.axis == Axis::token) {
        const index_t per_row = (D + G - 1) / G;
        for (index_t t = 0; t < B; ++t) {
          const std::uint8_t* code = s.codes.data() + t * D;
          for (index_t gc = 0; gc < per_row; ++gc) {
            const float st = to_float(sc[t * per_row + gc]), mt = to_float(mn[t * per_row + gc]);
            for (index_t i = 0; i < g; ++i) {
              const float ws = p[i * B + t] * st, wm = p[i * B + t] * mt;
              float* a = acc + i * D;
              for (index_t c = gc * G; c < std::min(D, (gc + 1) * G); ++c) a[c] += ws * static_cast<float>(code[c]) + wm;
            }
          }
        }
      } else {
        for (index_t gt = 0; gt < B / G; ++gt)
          for (index_t i = 0; i < g; ++i) {
            std::fill(s.tmp.begin(), s.tmp.begin() + D, 0.0f);
            float psum = 0.0f;
            for (index_t t = gt * G; t < (gt + 1) * G; ++t) {
              const float w = p[i * B + t];
              psum += w;
              const std::uint8_t* code = s.codes.data() + t * D;
              for (index_t c = 0; c < D; ++c) s.tmp[c] += w * static_cast<float>(code[c]);
            }
            float* a = acc + i * D;
            for (index_t c = 0; c < D; ++c)
              a[c] += to_float(sc[gt * D + c]) * s.tmp[c] + to_float(mn[gt * D + c]) * psum;
          }
      }
      return;
    }
  }
  vq.decode(part, B, D, s.dec.data());
  for (index_t i = 0; i < g; ++i)
    for (index_t t = 0; t < B; ++t) {
      const float w = p[i * B + t];
      for (index_t c = 0; c < D; ++c) acc[i * D + c] += w * s.dec[t * D + c];
    }
}

/// Online-softmax update for one chunk of n logits per query (already scaled): rescales acc and
/// l, turns the logits into weights in place.
inline void softmax_step(float* logits, index_t n, index_t stride, index_t g, index_t D, float* m, float* l,
                         float* acc) {
  for (index_t i = 0; i < g; ++i) {
    float* x = logits + i * stride;
    float bm = -std::numeric_limits<float>::infinity();
    for (index_t t = 0; t < n; ++t) bm = std::max(bm, x[t]);
    const float mnew = std::max(m[i], bm);
    const float alpha = m[i] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m[i] - mnew);
    float sum = 0.0f;
    for (index_t t = 0; t < n; ++t) {
      x[t] = std::exp(x[t] - mnew);
      sum += x[t];
    }
    l[i] = l[i] * alpha + sum;
    for (index_t c = 0; c < D; ++c) acc[i * D + c] *= alpha;
    m[i] = mnew;
  }
}

}  // namespace detail

/// Tokens per split-K work item (rounded to whole blocks). Fixed, so results do not depend on the
/// thread count; 2048 gives 8 heads x 16 items at 32K tokens, enough to keep two cores balanced.
inline constexpr index_t kChunkTokens = 2048;

namespace detail {

/// Portable kernel for one work item: blocks [b0, b1) of head h, then the residual if asked.
/// m, l, acc: the item's online-softmax state (g, g, g x D). q: pre-scaled queries of the group.
template <class KQ, class VQ>
void item_portable(const KQ& kq, const VQ& vq, const CacheState& st, index_t h, index_t b0, index_t b1,
                   bool with_residual, const float* qh, float* m, float* l, float* acc) {
  const CacheLayout& L = st.layout;
  const index_t D = L.head_dim, B = L.block_tokens, g = L.q_heads / L.kv_heads;
  Scratch s;
  s.codes.resize(static_cast<std::size_t>(B * D));
  s.dec.resize(static_cast<std::size_t>(B * D));
  s.qs.resize(static_cast<std::size_t>(D));
  s.tmp.resize(static_cast<std::size_t>(D));
  const index_t R = with_residual ? st.residual : 0;
  std::vector<float> logits(static_cast<std::size_t>(g * std::max<index_t>(std::max(B, R), 1)));
  for (index_t b = b0; b < b1; ++b) {
    const std::uint8_t* block = st.data + L.block_offset(h, b);
    key_logits(kq, block, B, D, qh, g, logits.data(), s);
    softmax_step(logits.data(), B, B, g, D, m, l, acc);
    accumulate_values(vq, block + L.key_part, B, D, logits.data(), g, acc, s);
  }
  if (R > 0) {
    const auto* rk = reinterpret_cast<const half*>(st.data + L.residual_key_offset(h, 0));
    const auto* rv = reinterpret_cast<const half*>(st.data + L.residual_value_offset(h, 0));
    for (index_t i = 0; i < g; ++i)
      for (index_t t = 0; t < R; ++t) {
        float dot = 0.0f;
        for (index_t c = 0; c < D; ++c) dot += qh[i * D + c] * to_float(rk[t * D + c]);
        logits[i * R + t] = dot;
      }
    softmax_step(logits.data(), R, R, g, D, m, l, acc);
    for (index_t i = 0; i < g; ++i)
      for (index_t t = 0; t < R; ++t) {
        const float w = logits[i * R + t];
        for (index_t c = 0; c < D; ++c) acc[i * D + c] += w * to_float(rv[t * D + c]);
      }
  }
}

template <class Q>
struct affine_half : std::false_type {};
template <int B>
struct affine_half<Affine<B, half>> : std::bool_constant<B == 2 || B == 4 || B == 8> {};

}  // namespace detail

/// out[qh * D + c] = softmax_t(scale * q_qh . k_t) . v over every cached token of KV head
/// qh / (q_heads / kv_heads). q and out are (q_heads, D) row-major.
template <class KQ, class VQ>
void attend(const KQ& kq, const VQ& vq, const CacheState& st, const float* q, float* out, float scale,
            AttendPrecision precision = AttendPrecision::exact) {
  const CacheLayout& L = st.layout;
  const index_t H = L.kv_heads, D = L.head_dim, B = L.block_tokens, g = L.q_heads / L.kv_heads;
  // queries pre-scaled by the softmax scale: logits come out scaled
  std::vector<float> qs(static_cast<std::size_t>(L.q_heads * D));
  for (std::size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;

  // which kernel: decided once per call from the types and the layout
  enum class Kernel { portable, kivi, fp16 };
  Kernel kernel = Kernel::portable;
  [[maybe_unused]] AffineLayout kl{}, vl{};
#if defined(QPKV_CPU_AVX512)
  if constexpr (detail::affine_half<KQ>::value && detail::affine_half<VQ>::value) {
    kl = kq.layout(B, D);
    vl = vq.layout(B, D);
    if (kq.axis == Axis::channel && vq.axis == Axis::token && kl.slots == 0 && vl.slots == 0 &&
        avx512::kivi_supported<KQ::bits, VQ::bits>(B, D, kq.group, vq.group))
      kernel = Kernel::kivi;
  } else if constexpr (std::is_same_v<KQ, Fp16> && std::is_same_v<VQ, Fp16>) {
    if (avx512::fp16_supported(D) && L.key_part == static_cast<std::size_t>(D) * 2) kernel = Kernel::fp16;
  }
  if (st.residual > 0 && !avx512::fp16_supported(D)) kernel = Kernel::portable;
#endif
  (void)precision;
  (void)kernel;

  const index_t chunk_blocks = std::max<index_t>(1, kChunkTokens / B);
  const index_t chunks = std::max<index_t>(1, (st.blocks + chunk_blocks - 1) / chunk_blocks);
  const index_t items = H * chunks;
  const std::size_t stride = static_cast<std::size_t>(2 * g + g * D);
  std::vector<float> part(static_cast<std::size_t>(items) * stride);

  const auto run_item = [&](index_t item) {
    const index_t h = item / chunks, c = item % chunks;
    const index_t b0 = c * chunk_blocks, b1 = std::min(st.blocks, b0 + chunk_blocks);
    const bool with_residual = c == chunks - 1;
    float* m = part.data() + static_cast<std::size_t>(item) * stride;
    float* l = m + g;
    float* acc = l + g;
    std::fill(m, m + g, -std::numeric_limits<float>::infinity());
    std::fill(l, l + g + g * D, 0.0f);
    const float* qh = qs.data() + h * g * D;
#if defined(QPKV_CPU_AVX512)
    const avx512::Partial p{m, l, acc};
    if constexpr (detail::affine_half<KQ>::value && detail::affine_half<VQ>::value) {
      if (kernel == Kernel::kivi) {
        const avx512::ValuePlan<VQ::bits> plan(D, vq.group);
        avx512::kivi_item<KQ::bits, VQ::bits>(st, kl, vl, kq.group, plan, h, b0, b1, with_residual, qh, p,
                                              precision == AttendPrecision::fast);
        return;
      }
    } else if constexpr (std::is_same_v<KQ, Fp16> && std::is_same_v<VQ, Fp16>) {
      if (kernel == Kernel::fp16) {
        const std::uint8_t* first = st.data + L.block_offset(h, b0);
        avx512::fp16_tokens(first, L.block_bytes(), first + L.key_part, L.block_bytes(), b1 - b0, D, qh, g, p);
        if (with_residual && st.residual > 0)
          avx512::fp16_tokens(st.data + L.residual_key_offset(h, 0), static_cast<std::size_t>(D) * 2,
                              st.data + L.residual_value_offset(h, 0), static_cast<std::size_t>(D) * 2, st.residual, D,
                              qh, g, p);
        return;
      }
    }
#endif
    detail::item_portable(kq, vq, st, h, b0, b1, with_residual, qh, m, l, acc);
  };

  const bool parallel = H * chunks > 1 && st.tokens() * D * L.q_heads > 65536;
  (void)parallel;
#if defined(_OPENMP)
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (index_t item = 0; item < items; ++item) run_item(item);

  // log-sum-exp merge of each head's chunks, in chunk order
  for (index_t h = 0; h < H; ++h)
    for (index_t i = 0; i < g; ++i) {
      float mm = -std::numeric_limits<float>::infinity();
      for (index_t c = 0; c < chunks; ++c) mm = std::max(mm, part[static_cast<std::size_t>(h * chunks + c) * stride + i]);
      float* o = out + (h * g + i) * D;
      std::fill(o, o + D, 0.0f);
      float lsum = 0.0f;
      for (index_t c = 0; c < chunks; ++c) {
        const float* pm = part.data() + static_cast<std::size_t>(h * chunks + c) * stride;
        if (pm[i] == -std::numeric_limits<float>::infinity()) continue;  // an item without tokens
        const float w = chunks == 1 ? 1.0f : std::exp(pm[i] - mm);
        lsum += w * pm[g + i];
        const float* a = pm + 2 * g + i * D;
        for (index_t d = 0; d < D; ++d) o[d] += w * a[d];
      }
      // |q.k| x scale beyond float32 (inf/NaN logits) or values whose weighted sum overflows are an
      // error, never a silently wrong output (tests/test_hostile.cpp)
      if (!(lsum > 0.0f) || !std::isfinite(lsum) || !std::isfinite(mm))
        throw Error(qpkv::detail::concat("qpkv: attend: expected finite attention logits for query head ", h * g + i,
                                         ", got a maximum of ", mm, " (|q.k| x scale overflows float32)"));
      const float inv = 1.0f / lsum;
      for (index_t d = 0; d < D; ++d) {
        o[d] *= inv;
        if (!std::isfinite(o[d]))
          throw Error(qpkv::detail::concat("qpkv: attend: expected a finite output for query head ", h * g + i,
                                           ", got ", o[d], " (the weighted values overflow float32)"));
      }
    }
}

}  // namespace qpkv::cpu
