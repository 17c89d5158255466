// qpkv/backend/cpu/attend_portable.inl - the portable kernels of the CPU decode attention, in
// namespace QPKV_PORTABLE_NS. attend.hpp includes this file twice where it can (no include guard on
// purpose): as qpkv::cpu::detail for the build's own target, and, on x86-64 builds without AVX2
// that have run-time dispatch, as qpkv::cpu::detail_avx2 under an AVX2 + FMA + F16C target pragma,
// so that a CPU with AVX2 but without AVX-512 runs these loops vectorized for AVX2.
// Not for direct inclusion.

#if !defined(QPKV_PORTABLE_NS)
#error "qpkv/backend/cpu/attend_portable.inl is included by qpkv/backend/cpu/attend.hpp only"
#endif

namespace qpkv::cpu::QPKV_PORTABLE_NS {

// The portable kernels are plain C++ written so that compilers vectorize them for whatever the
// build targets (SSE2 by default on x86-64, AVX2 with -mavx2 -mfma, NEON on Arm): every float
// reduction runs over a fixed number of partial sums (a plain `acc += a[c] * b[c]` loop may not be
// reordered, so it stays scalar without -ffast-math), codes are widened to floats one row at a
// time, and exp is a branch-free polynomial. The summation order is fixed, so results still do
// not depend on the thread count.

inline constexpr index_t kLanes = 16;  ///< partial sums per reduction

/// Folds W partial sums in a fixed pairwise order.
template <index_t W = kLanes>
float fold_lanes(float* lane) {
  for (index_t w = W / 2; w > 0; w /= 2)
    for (index_t j = 0; j < w; ++j) lane[j] += lane[j + w];
  return lane[0];
}

/// sum_c a[c] * b[c].
inline float dot(const float* QPKV_RESTRICT a, const float* QPKV_RESTRICT b, index_t n) {
  float lane[kLanes] = {};
  index_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    QPKV_SIMD
    for (index_t j = 0; j < kLanes; ++j) lane[j] += a[c + j] * b[c + j];
  float tail = 0.0f;
  for (; c < n; ++c) tail += a[c] * b[c];
  return fold_lanes(lane) + tail;
}

/// out[i] = sum_c a[i * lda + c] * b[c] for four rows of a (each load of b serves four rows).
inline void dot4(const float* QPKV_RESTRICT a, index_t lda, const float* QPKV_RESTRICT b, index_t n, float* out) {
  constexpr index_t W = 8;
  float lane[4][W] = {};
  index_t c = 0;
  for (; c + W <= n; c += W)
    QPKV_UNROLL
    for (int i = 0; i < 4; ++i)
      QPKV_SIMD
      for (index_t j = 0; j < W; ++j) lane[i][j] += a[i * lda + c + j] * b[c + j];
  for (int i = 0; i < 4; ++i) {
    float tail = 0.0f;
    for (index_t k = c; k < n; ++k) tail += a[i * lda + k] * b[k];
    out[i] = fold_lanes<W>(lane[i]) + tail;
  }
}

/// acc[i * D + c] += sum_t p[i * pstride + t] * v[t * D + c] for n rows and four queries, in
/// slices of kSlice channels whose accumulators stay in registers across the rows.
inline constexpr index_t kSlice = 32;
inline void gemv4(const float* QPKV_RESTRICT p, index_t pstride, const float* QPKV_RESTRICT v, index_t n, index_t D,
                  float* QPKV_RESTRICT acc) {
  index_t c0 = 0;
  for (; c0 + kSlice <= D; c0 += kSlice) {
    float a[4][kSlice];
    for (int i = 0; i < 4; ++i)
      for (index_t j = 0; j < kSlice; ++j) a[i][j] = acc[i * D + c0 + j];
    for (index_t t = 0; t < n; ++t) {
      const float* vt = v + t * D + c0;
      QPKV_UNROLL
      for (int i = 0; i < 4; ++i) {
        const float w = p[i * pstride + t];
        QPKV_SIMD
        for (index_t j = 0; j < kSlice; ++j) a[i][j] += w * vt[j];
      }
    }
    for (int i = 0; i < 4; ++i)
      for (index_t j = 0; j < kSlice; ++j) acc[i * D + c0 + j] = a[i][j];
  }
  for (index_t t = 0; t < n; ++t)
    for (int i = 0; i < 4; ++i)
      for (index_t c = c0; c < D; ++c) acc[i * D + c] += p[i * pstride + t] * v[t * D + c];
}

/// sum_t x[t] and max_t x[t].
inline float sum(const float* x, index_t n) {
  float lane[kLanes] = {};
  index_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    QPKV_SIMD
    for (index_t j = 0; j < kLanes; ++j) lane[j] += x[t + j];
  float tail = 0.0f;
  for (; t < n; ++t) tail += x[t];
  return fold_lanes(lane) + tail;
}
inline float max(const float* x, index_t n) {
  float lane[kLanes];
  for (index_t j = 0; j < kLanes; ++j) lane[j] = -std::numeric_limits<float>::infinity();
  index_t t = 0;
  for (; t + kLanes <= n; t += kLanes)
    QPKV_SIMD
    for (index_t j = 0; j < kLanes; ++j) lane[j] = lane[j] < x[t + j] ? x[t + j] : lane[j];
  float m = -std::numeric_limits<float>::infinity();
  for (index_t j = 0; j < kLanes; ++j) m = m < lane[j] ? lane[j] : m;
  for (; t < n; ++t) m = m < x[t] ? x[t] : m;
  return m;
}

/// e^x for x <= 0, branch-free (the Cephes expf polynomial, simd.hpp's exp_poly, about 1 ulp);
/// below -87.3 it gives 0, NaN stays NaN. The argument of the int conversion is always in range
/// (NaN and anything above 88 are clamped first: converting them would be undefined).
inline float exp_neg(float x) {
  const float xc = x >= -87.3f ? (x <= 88.0f ? x : 88.0f) : -87.3f;  // NaN -> -87.3
  const float fx = (xc * exp_poly::log2e + 12582912.0f) - 12582912.0f;  // round to nearest
  float r = xc - fx * exp_poly::ln2_hi;
  r = r - fx * exp_poly::ln2_lo;
  float y = exp_poly::p0;
  y = y * r + exp_poly::p1;
  y = y * r + exp_poly::p2;
  y = y * r + exp_poly::p3;
  y = y * r + exp_poly::p4;
  y = y * r + exp_poly::p5;
  y = y * (r * r) + (r + 1.0f);
  const float scale = bits_float(static_cast<std::uint32_t>(static_cast<std::int32_t>(fx) + 127) << 23);
  return x >= -87.3f ? y * scale : (x < -87.3f ? 0.0f : x);
}

/// Centred codes of one packed row as floats: code - centre (exact).
template <int Bits>
void codes_to_float(const std::uint8_t* QPKV_RESTRICT row, index_t n, float centre, float* QPKV_RESTRICT out) {
  if constexpr (8 % Bits == 0) {
    constexpr int per = 8 / Bits;
    constexpr unsigned mask = (1u << Bits) - 1u;
    const index_t full = n / per;
    QPKV_SIMD
    for (index_t j = 0; j < full; ++j)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k)
        out[j * per + k] = static_cast<float>((static_cast<unsigned>(row[j]) >> (k * Bits)) & mask) - centre;
    for (index_t i = full * per; i < n; ++i)
      out[i] = static_cast<float>(quant::unpack_one<Bits>(row, static_cast<std::size_t>(i))) - centre;
  } else {
    for (index_t i = 0; i < n; ++i)
      out[i] = static_cast<float>(quant::unpack_one<Bits>(row, static_cast<std::size_t>(i))) - centre;
  }
}

/// acc[c] += w * x[c].
inline void axpy(float w, const float* QPKV_RESTRICT x, index_t n, float* QPKV_RESTRICT acc) {
  QPKV_SIMD
  for (index_t c = 0; c < n; ++c) acc[c] += w * x[c];
}

/// acc[i * D + c] += sum_t p[i * pstride + t] * v[t * D + c] for n rows and g queries.
inline void rows_times_weights(const float* p, index_t pstride, const float* v, index_t n, index_t D, index_t g, float* acc) {
  index_t i = 0;
  for (; i + 4 <= g; i += 4) gemv4(p + i * pstride, pstride, v, n, D, acc + i * D);
  for (; i < g; ++i)
    for (index_t t = 0; t < n; ++t) axpy(p[i * pstride + t], v + t * D, D, acc + i * D);
}

/// logits[i * n + t] = q_i . k_t for n dense key rows and g queries.
inline void dense_logits(const float* q, index_t g, const float* k, index_t n, index_t D, float* logits) {
  index_t i = 0;
  for (; i + 4 <= g; i += 4)
    for (index_t t = 0; t < n; ++t) {
      float o[4];
      dot4(q + i * D, D, k + t * D, D, o);
      for (int j = 0; j < 4; ++j) logits[(i + j) * n + t] = o[j];
    }
  for (; i < g; ++i)
    for (index_t t = 0; t < n; ++t) logits[i * n + t] = dot(q + i * D, k + t * D, D);
}

/// Tokens attended at once when blocks are shorter (see item_portable).
inline constexpr index_t kTile = 32;

struct Scratch {
  std::vector<float> dec;   // B x D: centred codes, dequantized values or decoded rows
  std::vector<float> qs;    // g x D: queries with the group's scales folded in
  std::vector<float> sf;    // D: scales of a key group
  std::vector<float> mf;    // D: mins + centre x scales of a key group
  std::vector<float> tmp;   // g x D: biases, per-group query sums or per-channel partial sums
};

/// Centred float codes of the B rows of an Affine part (once per block, for all queries).
template <int Bits>
void widen_rows(const std::uint8_t* part, const AffineLayout& l, index_t B, index_t D, float* out) {
  constexpr float centre = static_cast<float>(1 << (Bits - 1));
  for (index_t t = 0; t < B; ++t)
    codes_to_float<Bits>(part + l.codes + static_cast<std::size_t>(t) * l.row_bytes, D, centre, out + t * D);
}

/// logits[i * B + t] = q_i . k_t for the B tokens of a key part (unscaled).
template <class KQ>
void key_logits(const KQ& kq, const std::uint8_t* part, index_t B, index_t D, const float* q, index_t g,
                float* logits, Scratch& s) {
  if constexpr (is_affine<KQ>::value) {
    const AffineLayout l = kq.layout(B, D);
    if (l.slots == 0) {
      using ST = typename KQ::scale_type;
      constexpr float centre = static_cast<float>(1 << (KQ::bits - 1));
      const auto* sc = reinterpret_cast<const ST*>(part + l.scales);
      const auto* mn = reinterpret_cast<const ST*>(part + l.mins);
      widen_rows<KQ::bits>(part, l, B, D, s.dec.data());
      if (kq.axis == Axis::channel) {
        // q.k_t = sum_c (q_c s_c)(code_tc - centre) + sum_c q_c (m_c + centre s_c)
        const index_t G = kq.group;
        for (index_t gt = 0; gt < B / G; ++gt) {
          for (index_t c = 0; c < D; ++c) {
            s.sf[c] = to_float(sc[gt * D + c]);
            s.mf[c] = to_float(mn[gt * D + c]) + centre * s.sf[c];
          }
          for (index_t i = 0; i < g; ++i) {
            const float* qi = q + i * D;
            QPKV_SIMD
            for (index_t c = 0; c < D; ++c) s.qs[i * D + c] = qi[c] * s.sf[c];
            s.tmp[i] = dot(qi, s.mf.data(), D);  // bias
          }
          index_t i = 0;
          for (; i + 4 <= g; i += 4)
            for (index_t t = gt * G; t < (gt + 1) * G; ++t) {
              float o[4];
              dot4(s.qs.data() + i * D, D, s.dec.data() + t * D, D, o);
              for (int k = 0; k < 4; ++k) logits[(i + k) * B + t] = o[k] + s.tmp[i + k];
            }
          for (; i < g; ++i)
            for (index_t t = gt * G; t < (gt + 1) * G; ++t)
              logits[i * B + t] = dot(s.qs.data() + i * D, s.dec.data() + t * D, D) + s.tmp[i];
        }
      } else {
        // q.k_t = sum_groups [ s_tg sum_{c in g} q_c (code_tc - centre) + (m_tg + centre s_tg) sum_{c in g} q_c ]
        const index_t G = kq.group, per_row = (D + G - 1) / G;
        for (index_t i = 0; i < g; ++i)
          for (index_t gc = 0; gc < per_row; ++gc) s.tmp[i * per_row + gc] = sum(q + i * D + gc * G, std::min(D, (gc + 1) * G) - gc * G);
        for (index_t t = 0; t < B; ++t) {
          const float* code = s.dec.data() + t * D;
          for (index_t i = 0; i < g; ++i) {
            const float* qi = q + i * D;
            float acc = 0.0f;
            for (index_t gc = 0; gc < per_row; ++gc) {
              const index_t c0 = gc * G, n = std::min(D, c0 + G) - c0;
              const float st = to_float(sc[t * per_row + gc]);
              acc += st * dot(qi + c0, code + c0, n) + (to_float(mn[t * per_row + gc]) + centre * st) * s.tmp[i * per_row + gc];
            }
            logits[i * B + t] = acc;
          }
        }
      }
      return;
    }
  }
  kq.decode(part, B, D, s.dec.data());
  dense_logits(q, g, s.dec.data(), B, D, logits);
}

/// acc[i * D + c] += sum_t p[i * B + t] * v_tc over the B tokens of a value part.
template <class VQ>
void accumulate_values(const VQ& vq, const std::uint8_t* part, index_t B, index_t D, const float* p, index_t g,
                       float* acc, Scratch& s) {
  if constexpr (is_affine<VQ>::value) {
    const AffineLayout l = vq.layout(B, D);
    if (l.slots == 0) {
      using ST = typename VQ::scale_type;
      constexpr float centre = static_cast<float>(1 << (VQ::bits - 1));
      const auto* sc = reinterpret_cast<const ST*>(part + l.scales);
      const auto* mn = reinterpret_cast<const ST*>(part + l.mins);
      widen_rows<VQ::bits>(part, l, B, D, s.dec.data());
      const index_t G = vq.group;
      if (vq.axis == Axis::token) {
        // dequantize each row once (s_tg (code - centre) + m_tg + centre s_tg), then one axpy per query
        const index_t per_row = (D + G - 1) / G;
        for (index_t t = 0; t < B; ++t) {
          float* v = s.dec.data() + t * D;
          for (index_t gc = 0; gc < per_row; ++gc) {
            const float st = to_float(sc[t * per_row + gc]), mt = to_float(mn[t * per_row + gc]) + centre * st;
            const index_t c1 = std::min(D, (gc + 1) * G);
            QPKV_SIMD
            for (index_t c = gc * G; c < c1; ++c) v[c] = st * v[c] + mt;
          }
        }
        rows_times_weights(p, B, s.dec.data(), B, D, g, acc);
      } else {
        // sum_t p_t v_tc = s_c sum_t p_t (code_tc - centre) + (m_c + centre s_c) sum_t p_t, per token group
        for (index_t gt = 0; gt < B / G; ++gt)
          for (index_t i = 0; i < g; ++i) {
            std::fill(s.tmp.begin(), s.tmp.begin() + D, 0.0f);
            for (index_t t = gt * G; t < (gt + 1) * G; ++t) axpy(p[i * B + t], s.dec.data() + t * D, D, s.tmp.data());
            const float psum = sum(p + i * B + gt * G, G);
            float* a = acc + i * D;
            for (index_t c = 0; c < D; ++c) {
              const float sv = to_float(sc[gt * D + c]);
              a[c] += sv * s.tmp[c] + (to_float(mn[gt * D + c]) + centre * sv) * psum;
            }
          }
      }
      return;
    }
  }
  vq.decode(part, B, D, s.dec.data());
  rows_times_weights(p, B, s.dec.data(), B, D, g, acc);
}

/// Online-softmax update for one chunk of n logits per query (already scaled): rescales acc and
/// l, turns the logits into weights in place.
inline void softmax_step(float* logits, index_t n, index_t stride, index_t g, index_t D, float* m, float* l,
                         float* acc) {
  for (index_t i = 0; i < g; ++i) {
    float* x = logits + i * stride;
    const float mnew = std::max(m[i], max(x, n));
    const float alpha = m[i] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(m[i] - mnew);
    QPKV_SIMD
    for (index_t t = 0; t < n; ++t) x[t] = exp_neg(x[t] - mnew);
    l[i] = l[i] * alpha + sum(x, n);
    if (alpha != 1.0f)
      for (index_t c = 0; c < D; ++c) acc[i * D + c] *= alpha;
    m[i] = mnew;
  }
}

/// Portable kernel for one work item: blocks [b0, b1) of head h, then the residual if asked.
/// m, l, acc: the item's online-softmax state (g, g, g x D). q: pre-scaled queries of the group.
template <class KQ, class VQ>
void item_portable(const KQ& kq, const VQ& vq, const CacheState& st, index_t h, index_t b0, index_t b1,
                   bool with_residual, const float* qh, float* m, float* l, float* acc) {
  const CacheLayout& L = st.layout;
  const index_t D = L.head_dim, B = L.block_tokens, g = L.q_heads / L.kv_heads;
  const index_t R = with_residual ? st.residual : 0;
  // Blocks shorter than kTile tokens (Fp16: 1 token; per-token quantizers) are decoded kTile
  // tokens at a time and attended densely, so that the per-block work (softmax bookkeeping, the
  // accumulator round trip) is not paid per token.
  const index_t per_tile = B < kTile ? kTile / B : 1, T = per_tile * B;
  Scratch s;
  s.dec.resize(static_cast<std::size_t>(std::max({B, R, T}) * D));
  s.qs.resize(static_cast<std::size_t>(g * D));
  s.sf.resize(static_cast<std::size_t>(D));
  s.mf.resize(static_cast<std::size_t>(D));
  s.tmp.resize(static_cast<std::size_t>(g * D));  // g biases, g x per_row query sums, or D sums
  std::vector<float> logits(static_cast<std::size_t>(g * std::max<index_t>({B, R, T, 1})));
  if (per_tile > 1) {
    for (index_t b = b0; b < b1; b += per_tile) {
      const index_t nb = std::min(per_tile, b1 - b), n = nb * B;
      for (index_t k = 0; k < nb; ++k) kq.decode(st.data + L.block_offset(h, b + k), B, D, s.dec.data() + k * B * D);
      dense_logits(qh, g, s.dec.data(), n, D, logits.data());
      softmax_step(logits.data(), n, n, g, D, m, l, acc);
      for (index_t k = 0; k < nb; ++k)
        vq.decode(st.data + L.block_offset(h, b + k) + L.key_part, B, D, s.dec.data() + k * B * D);
      rows_times_weights(logits.data(), n, s.dec.data(), n, D, g, acc);
    }
  } else {
    for (index_t b = b0; b < b1; ++b) {
      const std::uint8_t* block = st.data + L.block_offset(h, b);
      key_logits(kq, block, B, D, qh, g, logits.data(), s);
      softmax_step(logits.data(), B, B, g, D, m, l, acc);
      accumulate_values(vq, block + L.key_part, B, D, logits.data(), g, acc, s);
    }
  }
  if (R > 0) {
    const auto n = static_cast<std::size_t>(R * D);
    to_float(reinterpret_cast<const half*>(st.data + L.residual_key_offset(h, 0)), n, s.dec.data());
    dense_logits(qh, g, s.dec.data(), R, D, logits.data());
    softmax_step(logits.data(), R, R, g, D, m, l, acc);
    to_float(reinterpret_cast<const half*>(st.data + L.residual_value_offset(h, 0)), n, s.dec.data());
    rows_times_weights(logits.data(), R, s.dec.data(), R, D, g, acc);
  }
}

}  // namespace qpkv::cpu::QPKV_PORTABLE_NS
