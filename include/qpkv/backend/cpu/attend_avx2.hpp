// qpkv/backend/cpu/attend_avx2.hpp - AVX2 kernels of the CPU decode attention, for CPUs with AVX2,
// FMA and F16C but without AVX-512 (most x86 laptops and desktops, and servers before AVX-512).
// Compiled when simd.hpp defines QPKV_CPU_AVX2_KERNELS: for the build's target when it has AVX2
// (an AVX-512 target too, where QPKV_CPU=avx2 runs them), else with a target attribute in
// run-time dispatch builds.
//
// The same algorithms as the exact AVX-512 kernels (attend_avx512.hpp), on 8-lane vectors:
//  - KIVI keys (per-channel groups): 8 tokens at a time, their packed code rows transposed as 8x8
//    dwords so each lane is one token; per key group the channel scales are folded into the query
//    once (q.k = sum_c (q_c s_c)(code_c - 2^(b-1)) + sum_c q_c (m_c + 2^(b-1) s_c)), the centred
//    codes made floats exactly with the 2^23 trick, read in place within 16-bit spans of a dword
//    (the span's power of two carried by the query, exactly), float FMAs with tokens in lanes;
//  - KIVI values (per-token groups): each 8-byte slice of a code row widened once to 8 dwords,
//    shifted into the 8/b code vectors (lane j of vector k = channel (8/b) j + k), dequantized
//    with the token's scale and min (broadcast where the slice lies in one group, else permuted
//    per lane) and accumulated for a tile of queries. The
//    accumulators stay in that slice order for the whole work item (the online-softmax rescaling
//    is per element) and are put back in channel order once, at its end;
//  - fp16 rows (Fp16 caches, every cache's residual): F16C conversion, 4 queries per key row;
//  - software prefetch as in the AVX-512 kernels (spread prefetcht1 one block ahead plus one
//    demand load per block; fp16: rows 64 / 32 tokens ahead).
// There is no integer path: AttendPrecision::fast runs these exact kernels (AVX-VNNI is not used).
#pragma once

#include "qpkv/backend/cpu/simd.hpp"

#if defined(QPKV_CPU_AVX2_KERNELS)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "qpkv/cache/layout.hpp"
#include "qpkv/core/dtype.hpp"
#include "qpkv/quant/affine_quantizer.hpp"

QPKV_INTRINSICS_WARNINGS_OFF  // simd.hpp

namespace qpkv::cpu::avx2 {

/// Lanes [0, min(n, 8)) set: the mask of a row's tail for maskload / maskstore / blendv.
QPKV_INLINE_AVX2 __m256i tail8(index_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::min<index_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

/// e^x for x <= 0 (the Cephes expf polynomial, simd.hpp's exp_poly, about 1 ulp); x below
/// -87.3 gives 0.
QPKV_INLINE_AVX2 __m256 exp_ps(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(exp_poly::log2e)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(exp_poly::ln2_hi), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(exp_poly::ln2_lo), x);
  __m256 y = _mm256_set1_ps(exp_poly::p0);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(exp_poly::p1));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(exp_poly::p2));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(exp_poly::p3));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(exp_poly::p4));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(exp_poly::p5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  // 2^fx with fx in [-126, 0] (x >= -87.3): a normal float, so y * 2^fx rounds once, as scalef does
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/// Horizontal sum of one vector, and the sums of four vectors in lanes 0..3.
QPKV_INLINE_AVX2 float hsum(__m256 a) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
QPKV_INLINE_AVX2 __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // a03 b03 c03 d03 | a47 ..
  return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}

/// Online-softmax update for n logits per query (row i at logits + i * stride, already scaled):
/// rescales acc[i] and l[i] by e^(m_old - m_new) and turns the logits into weights in place.
/// Lanes past n keep the running max and give weight 0 (see the AVX-512 softmax_step).
QPKV_TARGET_AVX2 inline void softmax_step(float* logits, index_t n, index_t stride, index_t g, index_t D, const Partial& p) {
  for (index_t i = 0; i < g; ++i) {
    float* x = logits + i * stride;
    // whole vectors with plain loads and stores (AMD's vmaskmov stores are slow), the tail masked
    const index_t nf = n / 8 * 8;
    __m256 vm = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    for (index_t t = 0; t < nf; t += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + t));
    if (nf < n) {
      const __m256i mk = tail8(n - nf);
      vm = _mm256_max_ps(vm, _mm256_blendv_ps(vm, _mm256_maskload_ps(x + nf, mk), _mm256_castsi256_ps(mk)));
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vm), _mm256_extractf128_ps(vm, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float bm = std::max(_mm_cvtss_f32(m4), -std::numeric_limits<float>::max());
    const float mold = p.m[i], mnew = std::max(mold, bm);
    if (mnew > mold) {
      const float alpha = mold == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(mold - mnew);
      p.l[i] *= alpha;
      const __m256 va = _mm256_set1_ps(alpha);
      float* a = p.acc + i * D;
      for (index_t c = 0; c < D; c += 8) _mm256_storeu_ps(a + c, _mm256_mul_ps(_mm256_loadu_ps(a + c), va));
      p.m[i] = mnew;
    }
    const __m256 vmn = _mm256_set1_ps(mnew);
    __m256 sum = _mm256_setzero_ps();
    for (index_t t = 0; t < nf; t += 8) {
      const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(x + t), vmn));
      _mm256_storeu_ps(x + t, e);
      sum = _mm256_add_ps(sum, e);
    }
    if (nf < n) {
      const __m256i mk = tail8(n - nf);
      const __m256 e = _mm256_and_ps(_mm256_castsi256_ps(mk), exp_ps(_mm256_sub_ps(_mm256_maskload_ps(x + nf, mk), vmn)));
      _mm256_maskstore_ps(x + nf, mk, e);
      sum = _mm256_add_ps(sum, e);
    }
    p.l[i] += hsum(sum);
  }
}

/// In-register transpose of 8 x 8 dwords: afterwards r[c] lane t = old r[t] lane c.
QPKV_INLINE_AVX2 void transpose8(__m256i* r) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {  // u[4i + k]: rows 4i..4i+3 of columns k (low half) and 4 + k (high half)
    u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x20);
    r[4 + k] = _mm256_permute2x128_si256(u[k], u[4 + k], 0x31);
  }
}

// ------------------------------------------------------------------------------------------------
// fp16 rows (Fp16 caches and every cache's residual)

/// Channels c .. c + 7 of an fp16 row as floats.
QPKV_INLINE_AVX2 __m256 row8(const std::uint8_t* r, index_t c) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r + 2 * c)));
}

/// The fp16 kernel covers head_dim multiples of 8.
inline bool fp16_supported(index_t D) { return D % 8 == 0; }

/// Attention over n fp16 tokens: key row t at kb + t * kstride, value row t at vb + t * vstride
/// (bytes). q: g x D pre-scaled queries. Updates the partial (natural channel order).
QPKV_TARGET_AVX2 inline void fp16_tokens(const std::uint8_t* kb, std::size_t kstride, const std::uint8_t* vb,
                                         std::size_t vstride, index_t n, index_t D, const float* q, index_t g,
                                         const Partial& p) {
  constexpr index_t kTile = 32, kKeyAhead = 64, kValueAhead = 32, kTouchAhead = 96;  // as the AVX-512 kernel
  float logits[8 * kTile];
  const index_t gt = std::min<index_t>(g, 8);  // query heads per pass (logits scratch)
  const index_t touch_every = std::max<index_t>(1, static_cast<index_t>(4096 / kstride));
  for (index_t t0 = 0; t0 < n; t0 += kTile) {
    const index_t nt = std::min(kTile, n - t0);
    for (index_t qi = 0; qi < g; qi += gt) {
      const index_t nq = std::min(gt, g - qi);
      for (index_t t = 0; t < nt; ++t) {
        const std::uint8_t* kr = kb + (t0 + t) * kstride;
        if (qi == 0) {  // into L2: the key row 64 tokens ahead, the value row 32 tokens ahead
          for (std::size_t o = 0; o < static_cast<std::size_t>(D) * 2; o += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(kb + (t0 + t + kKeyAhead) * kstride + o), _MM_HINT_T1);
            _mm_prefetch(reinterpret_cast<const char*>(vb + (t0 + t + kValueAhead) * vstride + o), _MM_HINT_T1);
          }
          if ((t0 + t) % touch_every == 0 && t0 + t + kTouchAhead < n)
            (void)*reinterpret_cast<const volatile std::uint8_t*>(kb + (t0 + t + kTouchAhead) * kstride);
        }
        index_t i = 0;
        for (; i + 4 <= nq; i += 4) {
          __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          const float* qq = q + (qi + i) * D;
          for (index_t c = 0; c < D; c += 8) {
            const __m256 k = row8(kr, c);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qq + c), k, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qq + D + c), k, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(qq + 2 * D + c), k, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(qq + 3 * D + c), k, a3);
          }
          alignas(16) float s[4];
          _mm_store_ps(s, hsum4(a0, a1, a2, a3));
          for (int j = 0; j < 4; ++j) logits[(i + j) * kTile + t] = s[j];
        }
        for (; i < nq; ++i) {
          __m256 a0 = _mm256_setzero_ps();
          const float* qq = q + (qi + i) * D;
          for (index_t c = 0; c < D; c += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qq + c), row8(kr, c), a0);
          logits[i * kTile + t] = hsum(a0);
        }
      }
      const Partial pq{p.m + qi, p.l + qi, p.acc + qi * D};
      softmax_step(logits, nt, kTile, nq, D, pq);
      // values: 16 channels x up to 4 queries of accumulators in registers, tokens inner
      for (index_t i = 0; i < nq; i += 4) {
        const index_t mq = std::min<index_t>(4, nq - i);
        for (index_t c0 = 0; c0 < D; c0 += 16) {
          const index_t nv = std::min<index_t>(2, (D - c0) / 8);
          float* ab = pq.acc + i * D + c0;
          if (mq == 4 && nv == 2) {  // the common case with every loop bound known at compile time
            __m256 acc[4][2];
            for (int j = 0; j < 4; ++j)
              for (int v = 0; v < 2; ++v) acc[j][v] = _mm256_loadu_ps(ab + j * D + 8 * v);
            for (index_t t = 0; t < nt; ++t) {
              const std::uint8_t* vr = vb + (t0 + t) * vstride;
              const __m256 v0 = row8(vr, c0), v1 = row8(vr, c0 + 8);
              for (int j = 0; j < 4; ++j) {
                const __m256 w = _mm256_broadcast_ss(logits + (i + j) * kTile + t);
                acc[j][0] = _mm256_fmadd_ps(w, v0, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(w, v1, acc[j][1]);
              }
            }
            for (int j = 0; j < 4; ++j)
              for (int v = 0; v < 2; ++v) _mm256_storeu_ps(ab + j * D + 8 * v, acc[j][v]);
            continue;
          }
          __m256 acc[4][2];
          for (index_t j = 0; j < mq; ++j)
            for (index_t v = 0; v < nv; ++v) acc[j][v] = _mm256_loadu_ps(ab + j * D + 8 * v);
          for (index_t t = 0; t < nt; ++t) {
            const std::uint8_t* vr = vb + (t0 + t) * vstride;
            __m256 vv[2];
            for (index_t v = 0; v < nv; ++v) vv[v] = row8(vr, c0 + 8 * v);
            for (index_t j = 0; j < mq; ++j) {
              const __m256 w = _mm256_broadcast_ss(logits + (i + j) * kTile + t);
              for (index_t v = 0; v < nv; ++v) acc[j][v] = _mm256_fmadd_ps(w, vv[v], acc[j][v]);
            }
          }
          for (index_t j = 0; j < mq; ++j)
            for (index_t v = 0; v < nv; ++v) _mm256_storeu_ps(ab + j * D + 8 * v, acc[j][v]);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// KIVI: keys per channel (Affine<KB, half>, Axis::channel), values per token (Affine<VB, half>,
// Axis::token), no outlier slots.

/// Is the AVX2 kernel defined for these parts? (Otherwise attend.hpp uses the portable one.)
template <int KB, int VB>
bool kivi_supported(index_t B, index_t D, index_t key_group, index_t value_group) {
  constexpr int vper = 8 / VB;
  const bool key_ok = D % 8 == 0 && (D * KB) % 32 == 0 && key_group % 8 == 0 && B % key_group == 0;
  const bool value_ok = (D * VB) % 64 == 0 && value_group % vper == 0;
  return key_ok && value_ok;
}

/// Per-call constants of the value kernel: for each 8-byte slice u of a code row (8 * 8/VB
/// channels), lane j's group relative to the slice's first group (at most 8 groups: a group
/// holds a multiple of 8/VB channels).
template <int VB>
struct ValuePlan {
  static constexpr int per = 8 / VB;  // codes per byte = vectors per slice
  static constexpr int U = 8 * per;   // channels per slice
  index_t D = 0, G = 0, per_row = 0;
  std::vector<std::int32_t> grp_idx;  // [slice][8]
  std::vector<index_t> grp0;          // [slice] first group of the slice
  std::vector<char> uniform;          // [slice]: all 8 lanes in group grp0

  ValuePlan(index_t d, index_t g) : D(d), G(g), per_row((d + g - 1) / g) {
    const index_t slices = D / U;
    grp_idx.resize(static_cast<std::size_t>(slices * 8));
    grp0.resize(static_cast<std::size_t>(slices));
    uniform.resize(static_cast<std::size_t>(slices));
    for (index_t u = 0; u < slices; ++u) {
      grp0[u] = (u * U) / G;
      bool same = true;
      for (index_t j = 0; j < 8; ++j) {
        grp_idx[u * 8 + j] = static_cast<std::int32_t>((u * U + per * j) / G - grp0[u]);
        same = same && grp_idx[u * 8 + j] == 0;
      }
      uniform[u] = same;
    }
  }

  /// Slice order (vector k lane j of slice u = channel u U + per j + k) -> natural order, in
  /// place, for g rows of D; tmp: D floats.
  void natural_order(float* acc, index_t g, float* tmp) const {
    for (index_t i = 0; i < g; ++i) {
      float* a = acc + i * D;
      for (index_t u = 0; u < D / U; ++u)
        for (int k = 0; k < per; ++k)
          for (int j = 0; j < 8; ++j) tmp[u * U + per * j + k] = a[u * U + 8 * k + j];
      std::copy(tmp, tmp + D, a);
    }
  }
};

/// The np fp16 scales and mins of a per-token value part as float (sf, mf): once per block.
QPKV_TARGET_AVX2 inline void value_params(const std::uint8_t* part, const AffineLayout& l, index_t np, float* sf, float* mf) {
  const auto* sc = reinterpret_cast<const std::uint16_t*>(part + l.scales);
  const auto* mn = reinterpret_cast<const std::uint16_t*>(part + l.mins);
  index_t e = 0;
  for (; e + 8 <= np; e += 8) {
    _mm256_storeu_ps(sf + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + e))));
    _mm256_storeu_ps(mf + e, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + e))));
  }
  for (; e < np; ++e) {
    sf[e] = to_float(half{sc[e]});
    mf[e] = to_float(half{mn[e]});
  }
}

/// value_block() for slice u; Uni: the slice's channels lie in one value group (one broadcast
/// scale and min per token instead of a per-lane permutation).
template <int VB, int NQ, bool Uni>
QPKV_TARGET_AVX2 void value_slice(const std::uint8_t* part, const AffineLayout& l, index_t B, const ValuePlan<VB>& plan,
                                  index_t u, const float* p, index_t pstride, float* acc, const float* sf, const float* mf,
                                  Prefetch& pf) {
  constexpr int per = ValuePlan<VB>::per, U = ValuePlan<VB>::U;
  const index_t D = plan.D, per_row = plan.per_row;
  const std::uint8_t* codes = part + l.codes;
  const std::size_t row = l.row_bytes;
  const __m256i mask = _mm256_set1_epi32((1 << VB) - 1);
  [[maybe_unused]] const __m256i gi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plan.grp_idx.data() + u * 8));
  const index_t g0 = plan.grp0[u];
  __m256 a[NQ][per];
  for (int i = 0; i < NQ; ++i)
    for (int k = 0; k < per; ++k) a[i][k] = _mm256_loadu_ps(acc + i * D + u * U + 8 * k);
  for (index_t t = 0; t < B; ++t) {
    pf.step();
    __m256 S, M;
    if constexpr (Uni) {
      S = _mm256_broadcast_ss(sf + t * per_row + g0);
      M = _mm256_broadcast_ss(mf + t * per_row + g0);
    } else {
      S = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sf + t * per_row + g0), gi);
      M = _mm256_permutevar8x32_ps(_mm256_loadu_ps(mf + t * per_row + g0), gi);
    }
    const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + t * row + u * 8)));
    for (int k = 0; k < per; ++k) {
      const __m256i c = VB == 8 ? d : _mm256_and_si256(_mm256_srli_epi32(d, k * VB), mask);
      const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), S, M);
      for (int i = 0; i < NQ; ++i) a[i][k] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i * pstride + t), v, a[i][k]);
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int k = 0; k < per; ++k) _mm256_storeu_ps(acc + i * D + u * U + 8 * k, a[i][k]);
}

/// acc[i] (slice order) += sum_t p[i][t] * v_t for the B tokens of a per-token value part, NQ
/// queries at once; sf, mf: the part's scales and mins from value_params().
template <int VB, int NQ>
QPKV_NOINLINE QPKV_TARGET_AVX2 void value_block(const std::uint8_t* part, const AffineLayout& l, index_t B,
                                                const ValuePlan<VB>& plan, const float* p, index_t pstride, float* acc,
                                                const float* sf, const float* mf, Prefetch& pf) {
  for (index_t u = 0; u < plan.D / ValuePlan<VB>::U; ++u) {
    if (plan.uniform[u] != 0) value_slice<VB, NQ, true>(part, l, B, plan, u, p, pstride, acc, sf, mf, pf);
    else value_slice<VB, NQ, false>(part, l, B, plan, u, p, pstride, acc, sf, mf, pf);
  }
}

/// Per key group: the queries with the group's per-channel scales folded in (qs, natural channel
/// order) and the constant terms bias_i = sum_c q_ic (m_c + centre s_c), centre = 2^(b-1).
/// key_tile() reads code e' of each span of a dword in place, i.e. times 2^(b e'), to save a
/// shift per code (see there); qs carries the inverse power of two, q_c (s_c 2^-(b e')), which
/// is exact, so the products, and the logits, are the same floats as with shifted codes.
template <int KB>
struct KeyFold {
  static constexpr float centre = static_cast<float>(1 << (KB - 1));  // integer, so code - centre is exact
  static constexpr int span = KB == 2 ? 2 : 16;  // bits read in place: 16 (2-bit codes: each code
                                                 // shifted down, as spans made KIVI-2 slower)
  static constexpr int half = span / KB;  // codes per span; e' = channel % half (groups of 8
                                          // channels start at a multiple of half)
  index_t g = 0, D = 0;
  const float* q = nullptr;  // the g x D pre-scaled queries
  std::vector<float> qs, bias, sf, mf;

  KeyFold(index_t g_, index_t D_, const float* q_) : g(g_), D(D_), q(q_) {
    qs.resize(static_cast<std::size_t>(g * D));
    bias.resize(static_cast<std::size_t>(g));
    sf.resize(static_cast<std::size_t>(D));
    mf.resize(static_cast<std::size_t>(D));
  }

  QPKV_NOINLINE QPKV_TARGET_AVX2 void fold(const std::uint16_t* sc, const std::uint16_t* mn) {
    const index_t Dn = D, gn = g;  // locals: the stores below may alias *this
    float* __restrict s_f = sf.data();
    float* __restrict m_f = mf.data();
    const __m256 vc = _mm256_set1_ps(centre);
    alignas(32) float f[8];  // 2^-(b e') of the lanes
    for (int j = 0; j < 8; ++j) f[j] = 1.0f / static_cast<float>(1 << (KB * (j % half)));
    const __m256 vf = _mm256_load_ps(f);
    for (index_t c = 0; c < Dn; c += 8) {
      const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + c)));
      _mm256_storeu_ps(s_f + c, _mm256_mul_ps(s, vf));  // exact: a power of two, no underflow (s >= 2^-24)
      _mm256_storeu_ps(m_f + c, _mm256_fmadd_ps(vc, s, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + c)))));
    }
    float* __restrict q_s = qs.data();
    float* __restrict bs = bias.data();
    index_t i = 0;
    for (; i + 4 <= gn; i += 4) {
      __m256 b[4];
      for (int j = 0; j < 4; ++j) b[j] = _mm256_setzero_ps();
      for (index_t c = 0; c < Dn; c += 8) {
        const __m256 sv = _mm256_loadu_ps(s_f + c), mv = _mm256_loadu_ps(m_f + c);
        for (int j = 0; j < 4; ++j) {
          const __m256 qv = _mm256_loadu_ps(q + (i + j) * Dn + c);
          _mm256_storeu_ps(q_s + (i + j) * Dn + c, _mm256_mul_ps(qv, sv));
          b[j] = _mm256_fmadd_ps(qv, mv, b[j]);
        }
      }
      _mm_storeu_ps(bs + i, hsum4(b[0], b[1], b[2], b[3]));
    }
    for (; i < gn; ++i) {
      __m256 b = _mm256_setzero_ps();
      for (index_t c = 0; c < Dn; c += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i * Dn + c);
        _mm256_storeu_ps(q_s + i * Dn + c, _mm256_mul_ps(qv, _mm256_loadu_ps(s_f + c)));
        b = _mm256_fmadd_ps(qv, _mm256_loadu_ps(m_f + c), b);
      }
      bs[i] = hsum(b);
    }
  }
};

/// Logits of 8 tokens (code rows at `codes`, `row` bytes apart) for NQ queries starting at qi:
/// logits[(qi + i) * lstride + t]. Code e' of a 16-bit span of a dword (2-bit codes: spans of
/// one code; the lowest span as is, the others shifted down once) is masked in place and or-ed into the
/// float 2^23, giving the float 2^23 + code 2^(b e') exactly (it stays in the 23 mantissa bits);
/// subtracting 2^23 + centre 2^(b e') leaves (code - centre) 2^(b e'), which the query's
/// 2^-(b e') undoes. One shift per span instead of one per code. 4K tokens, 1 thread, -mavx2
/// build: KIVI-8 / KIVI-4 8-10% faster (with the unmasked softmax and the broadcast value
/// scales); for 2-bit codes spans of 8 bits made KIVI-2 7% slower than one shift per code, so
/// they keep that (span = b). (An array of the span vectors computed before the code loop cost
/// another 6-10%: the shift is written at its use and the compiler shares it.)
template <int KB, int NQ>
QPKV_TARGET_AVX2 void key_tile(const std::uint8_t* codes, std::size_t row, index_t D, const KeyFold<KB>& f, index_t qi,
                               float* logits, index_t lstride, Prefetch& pf) {
  constexpr int cpd = 32 / KB, half = KeyFold<KB>::half, span = KeyFold<KB>::span;
  const index_t dwords = D / cpd;
  const __m256i magic = _mm256_set1_epi32(0x4B000000);  // 2^23 | x is the float 2^23 + x for x < 2^23
  __m256i mask[half];
  __m256 off[half];
  for (int e = 0; e < half; ++e) {
    mask[e] = _mm256_set1_epi32(((1 << KB) - 1) << (KB * e));
    off[e] = _mm256_set1_ps(8388608.0f + KeyFold<KB>::centre * static_cast<float>(1 << (KB * e)));
  }
  __m256 acc[NQ];
  for (int i = 0; i < NQ; ++i) acc[i] = _mm256_setzero_ps();
  const float* qs = f.qs.data() + qi * D;
  for (index_t w0 = 0; w0 < dwords; w0 += 8) {
    const index_t nw = std::min<index_t>(8, dwords - w0);
    __m256i r[8];
    if (nw == 8) {
      for (int t = 0; t < 8; ++t) r[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + t * row + w0 * 4));
    } else {
      const __m256i mk = tail8(nw);
      for (int t = 0; t < 8; ++t) r[t] = _mm256_maskload_epi32(reinterpret_cast<const int*>(codes + t * row + w0 * 4), mk);
    }
    transpose8(r);
    for (index_t w = 0; w < nw; ++w) {
      pf.step();
      const __m256i col = r[w];
      const float* qw = qs + (w0 + w) * cpd;
      for (int e = 0; e < cpd; ++e) {
        // the span's shift, where it has one (the compiler shares it between the span's codes)
        const __m256i src = e < half ? col : _mm256_srli_epi32(col, span * (e / half));
        const __m256i c = _mm256_or_si256(_mm256_and_si256(src, mask[e % half]), magic);
        const __m256 x = _mm256_sub_ps(_mm256_castsi256_ps(c), off[e % half]);
        for (int i = 0; i < NQ; ++i) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(qw + i * D + e), x, acc[i]);
      }
    }
  }
  for (int i = 0; i < NQ; ++i)
    _mm256_storeu_ps(logits + (qi + i) * lstride, _mm256_add_ps(acc[i], _mm256_set1_ps(f.bias[qi + i])));
}

/// One work item over a KIVI cache: blocks [b0, b1) of head h, then the residual if asked.
template <int KB, int VB>
QPKV_TARGET_AVX2 void kivi_item(const CacheState& st, const AffineLayout& kl, const AffineLayout& vl, index_t key_group,
                                const ValuePlan<VB>& plan, index_t h, index_t b0, index_t b1, bool residual, const float* q,
                                const Partial& p) {
  const CacheLayout& L = st.layout;
  const index_t D = L.head_dim, B = L.block_tokens, g = L.q_heads / L.kv_heads;
  constexpr int kValueTile = VB == 2 ? 2 : 4;  // 2-bit: 4 code vectors x the tile's accumulators in 16 registers
  std::vector<float> logits(static_cast<std::size_t>(g * B));
  std::vector<float> sf(static_cast<std::size_t>(B * plan.per_row + 8)), mf(sf.size());
  KeyFold<KB> fold(g, D, q);
  const std::size_t bb = L.block_bytes();
  Prefetch pf;
  pf.next = st.data + L.block_offset(h, b0);
  for (index_t b = b0; b < b1; ++b) {
    const std::uint8_t* block = st.data + L.block_offset(h, b);
    // prefetch window: the next block; the page of the block after it by a demand load
    pf.stop = block + std::min<index_t>(2, b1 - b) * bb;
    pf.next = std::max(pf.next, block + bb);
    if (b + 2 < b1) (void)*reinterpret_cast<const volatile std::uint8_t*>(block + 2 * bb);
    // keys
    const auto* sc = reinterpret_cast<const std::uint16_t*>(block + kl.scales);
    const auto* mn = reinterpret_cast<const std::uint16_t*>(block + kl.mins);
    for (index_t gt = 0; gt < B / key_group; ++gt) {
      fold.fold(sc + gt * D, mn + gt * D);
      for (index_t t0 = gt * key_group; t0 < (gt + 1) * key_group; t0 += 8) {
        const std::uint8_t* codes = block + kl.codes + static_cast<std::size_t>(t0) * kl.row_bytes;
        float* lg = logits.data() + t0;
        for_query_tiles<4>(
            g, [&](index_t i) { key_tile<KB, 4>(codes, kl.row_bytes, D, fold, i, lg, B, pf); },
            [&](index_t i) { key_tile<KB, 2>(codes, kl.row_bytes, D, fold, i, lg, B, pf); },
            [&](index_t i) { key_tile<KB, 1>(codes, kl.row_bytes, D, fold, i, lg, B, pf); });
      }
    }
    softmax_step(logits.data(), B, B, g, D, p);
    // values (accumulators in slice order until the end of the item)
    const std::uint8_t* vpart = block + L.key_part;
    value_params(vpart, vl, B * plan.per_row, sf.data(), mf.data());
    for_query_tiles<kValueTile>(
        g, [&](index_t i) { value_block<VB, 4>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), pf); },
        [&](index_t i) { value_block<VB, 2>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), pf); },
        [&](index_t i) { value_block<VB, 1>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), pf); });
  }
  std::vector<float> tmp(static_cast<std::size_t>(D));
  plan.natural_order(p.acc, g, tmp.data());
  if (residual && st.residual > 0) {
    const std::uint8_t* rk = st.data + L.residual_key_offset(h, 0);
    const std::uint8_t* rv = st.data + L.residual_value_offset(h, 0);
    fp16_tokens(rk, static_cast<std::size_t>(D) * 2, rv, static_cast<std::size_t>(D) * 2, st.residual, D, q, g, p);
  }
}

}  // namespace qpkv::cpu::avx2

QPKV_INTRINSICS_WARNINGS_ON

#endif  // QPKV_CPU_AVX2_KERNELS
