// qpkv/backend/cpu/attend_avx2.hpp - AVX2 kernels of the CPU decode attention, for CPUs with AVX2,
// FMA and F16C but without AVX-512 (most x86 laptops and desktops, and servers before AVX-512).
// Compiled when simd.hpp defines QPKV_CPU_AVX2_KERNELS: for the build's target when it has AVX2
// (an AVX-512 target too, where QPKV_CPU=avx2 runs them), else with a target attribute in
// run-time dispatch builds.
//
// The same algorithms as the exact AVX-512 kernels (attend_avx512.hpp), on 8-lane vectors:
//  - KIVI keys (per-channel groups): 8 tokens at a time (16, two halves sharing each query
//    broadcast, where the key group allows and the keys have at most 4 bits), their packed code
//    rows transposed as 8x8 dwords so each lane is one token; per key group the channel scales
//    are folded into the query once (q.k = sum_c (q_c s_c)(code_c - 2^(b-1)) + sum_c q_c (m_c + 2^(b-1) s_c)), the centred
//    codes made floats exactly with the 2^23 trick, read in place within 16-bit spans of a dword
//    (the span's power of two carried by the query, exactly), float FMAs with tokens in lanes;
//  - KIVI values (per-token groups): each 8-byte slice of a code row widened once to 8 dwords,
//    shifted into the 8/b code vectors (lane j of vector k = channel (8/b) j + k), dequantized
//    with the token's scale and min (broadcast where the slice lies in one group, else permuted
//    per lane) and accumulated for a tile of queries; where every slice lies in one value group
//    (value_block_folded) the token's scale goes into its softmax weight instead and the centred
//    codes are read in place, as in the AVX-512 kernel. The accumulators stay in that slice
//    order for the whole work item (the online-softmax rescaling is per element) and are put
//    back in channel order once, at its end;
//  - fp16 rows (Fp16 caches, every cache's residual): F16C conversion, 4 queries per key row;
//  - software prefetch as in the AVX-512 kernels (spread prefetcht1 one block ahead plus one
//    demand load per block; fp16: rows 64 / 32 tokens ahead).
// AttendPrecision::fast (KIVI): integer dot products with vpmaddwd (16 products into 8 int32 per
// instruction, twice the multiplies of an FMA): the per-group folded query rounded to int16
// (KeyFold::fold_fast, key_tile_int, 16-token tiles where the key group allows) and the value
// weights p_t s_t rounded to int16 per block and group (ValueFast). AVX-VNNI (vpdpwssd on ymm,
// Alder Lake and later) would fuse the multiply and the add; it is not used (untestable here).
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

/// The maxima of four vectors in lanes 0..3.
QPKV_INLINE_AVX2 __m128 hmax4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_max_ps(_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));  // a02 b02 a13 b13 | ..
  const __m256 cd = _mm256_max_ps(_mm256_unpacklo_ps(c, d), _mm256_unpackhi_ps(c, d));
  const __m256 x = _mm256_max_ps(_mm256_shuffle_ps(ab, cd, 0x44), _mm256_shuffle_ps(ab, cd, 0xEE));  // a b c d | a b c d
  return _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
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
  QPKV_UNROLL
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  QPKV_UNROLL
  for (int i = 0; i < 2; ++i) {  // u[4i + k]: rows 4i..4i+3 of columns k (low half) and 4 + k (high half)
    u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  QPKV_UNROLL
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
          QPKV_UNROLL
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
            QPKV_UNROLL
            for (int j = 0; j < 4; ++j)
              QPKV_UNROLL
              for (int v = 0; v < 2; ++v) acc[j][v] = _mm256_loadu_ps(ab + j * D + 8 * v);
            for (index_t t = 0; t < nt; ++t) {
              const std::uint8_t* vr = vb + (t0 + t) * vstride;
              const __m256 v0 = row8(vr, c0), v1 = row8(vr, c0 + 8);
              QPKV_UNROLL
              for (int j = 0; j < 4; ++j) {
                const __m256 w = _mm256_broadcast_ss(logits + (i + j) * kTile + t);
                acc[j][0] = _mm256_fmadd_ps(w, v0, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(w, v1, acc[j][1]);
              }
            }
            QPKV_UNROLL
            for (int j = 0; j < 4; ++j)
              QPKV_UNROLL
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

/// Lane l of a vector of [token][group] values (per_row groups per token, per_row dividing 8) is
/// token l / per_row: the permutation that spreads one value per token over its groups' lanes.
QPKV_INLINE_AVX2 __m256i token_lanes(index_t per_row) {
  alignas(32) std::int32_t tok[8];
  QPKV_UNROLL
  for (int l = 0; l < 8; ++l) tok[l] = static_cast<std::int32_t>(l / per_row);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(tok));
}

/// v with lane l taking lane (l + sh) % 8. Combining v with its rotations by per_row, 2 per_row,
/// .. < 8 reduces each group of a [token][group] vector (its lanes are per_row apart) into every
/// one of its lanes.
QPKV_INLINE_AVX2 __m256 rotate8(__m256 v, index_t sh) {
  const __m256i r = _mm256_and_si256(
      _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(sh))),
      _mm256_set1_epi32(7));
  return _mm256_permutevar8x32_ps(v, r);
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
  bool all_uniform = true;            // every slice in one group

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
      all_uniform = all_uniform && same;
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
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i)
    QPKV_UNROLL
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
    QPKV_UNROLL
    for (int k = 0; k < per; ++k) {
      const __m256i c = VB == 8 ? d : _mm256_and_si256(_mm256_srli_epi32(d, k * VB), mask);
      const __m256 v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), S, M);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) a[i][k] = _mm256_fmadd_ps(_mm256_broadcast_ss(p + i * pstride + t), v, a[i][k]);
    }
  }
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i)
    QPKV_UNROLL
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

/// 2^(VB k): value_block_folded()'s accumulator k holds this times its sum.
template <int VB>
constexpr float fold_scale(int k) {
  return static_cast<float>(1u << (VB * k));  // k < 8 / VB
}

/// Does value_block_folded() apply to blocks of B tokens? Every slice in one value group, whole
/// groups per row, and the [token][group] scales fill whole vectors with each group's lanes
/// per_row apart.
template <int VB>
bool value_folded_ok(const ValuePlan<VB>& plan, index_t B) {
  return plan.all_uniform && plan.D % plan.G == 0 && 8 % plan.per_row == 0 && (B * plan.per_row) % 8 == 0;
}

/// value_block() with the token's value scale folded into its softmax weight, as the AVX-512
/// kernel's value_block_folded() (there the derivation): v = s (c - centre) + (m + centre s), so
/// sum_t p_t v_t = sum_t (p_t s_t)(c_t - centre) + sum_t p_t (m_t + centre s_t), the second sum one
/// constant per (query, group), added once per block. Code vector k of a slice is a float by one
/// and, one or (2^23 | the code's bits where they are) and one subtraction, which leaves 2^(VB k)
/// (c - centre) exactly; accumulator k holds 2^(VB k) times its sum (undone by
/// folded_unscale() at the end of the work item). Per token, slice and query: one FMA per code
/// vector, against value_slice()'s shift, conversion and dequantizing FMA per vector and broadcast
/// scale and min per token. wb: scratch of NQ x B x per_row floats.
template <int VB, int NQ>
QPKV_NOINLINE QPKV_TARGET_AVX2 void value_block_folded(const std::uint8_t* part, const AffineLayout& l, index_t B,
                                                       const ValuePlan<VB>& plan, const float* p, index_t pstride,
                                                       float* acc, const float* sf, const float* mf, float* wb,
                                                       Prefetch& pf) {
  constexpr int per = ValuePlan<VB>::per, U = ValuePlan<VB>::U;
  constexpr float centre = static_cast<float>(1 << (VB - 1));
  const index_t D = plan.D, per_row = plan.per_row, nv = B * per_row / 8, tz = 8 / per_row;
  const std::size_t wrow = static_cast<std::size_t>(B * per_row);
  // the weights w = p s per (query, token, group) and the constants sum_t p (m + centre s); lane
  // l of a vector of 8 scales is token l / per_row, group l % per_row
  const __m256i tok = token_lanes(per_row);
  __m256 dc[NQ];
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i) dc[i] = _mm256_setzero_ps();
  for (index_t v = 0; v < nv; ++v) {
    const __m256 S = _mm256_loadu_ps(sf + v * 8);
    const __m256 M = _mm256_fmadd_ps(_mm256_set1_ps(centre), S, _mm256_loadu_ps(mf + v * 8));
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      const __m256 P = _mm256_permutevar8x32_ps(_mm256_loadu_ps(p + i * pstride + v * tz), tok);
      _mm256_storeu_ps(wb + i * wrow + v * 8, _mm256_mul_ps(P, S));
      dc[i] = _mm256_fmadd_ps(P, M, dc[i]);
    }
  }
  alignas(32) float dcs[NQ][8];  // [i][g], g < per_row: the constant of group g
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i) {
    for (index_t sh = per_row; sh < 8; sh *= 2) dc[i] = _mm256_add_ps(dc[i], rotate8(dc[i], sh));
    _mm256_store_ps(dcs[i], dc[i]);
  }
  const std::uint8_t* codes = part + l.codes;
  const std::size_t row = l.row_bytes;
  const __m256i magic = _mm256_set1_epi32(0x4B000000);  // 2^23 | x is the float 2^23 + x (x < 2^23)
  for (index_t u = 0; u < D / U; ++u) {
    const index_t g0 = plan.grp0[u];
    __m256 a[NQ][per];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k)
        a[i][k] = _mm256_add_ps(_mm256_loadu_ps(acc + i * D + u * U + 8 * k), _mm256_set1_ps(dcs[i][g0] * fold_scale<VB>(k)));
    const float* w = wb + g0;
    const std::uint8_t* r = codes + u * 8;
    for (index_t t = 0; t < B; ++t, w += per_row, r += row) {
      pf.step();
      const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r)));
      __m256 x[per];  // 2^(VB k) (code - centre)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k)
        x[k] = _mm256_sub_ps(
            _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(d, _mm256_set1_epi32(((1 << VB) - 1) << (VB * k))), magic)),
            _mm256_set1_ps(8388608.0f + centre * fold_scale<VB>(k)));
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m256 wi = _mm256_broadcast_ss(w + i * wrow);
        QPKV_UNROLL
        for (int k = 0; k < per; ++k) a[i][k] = _mm256_fmadd_ps(wi, x[k], a[i][k]);
      }
    }
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) _mm256_storeu_ps(acc + i * D + u * U + 8 * k, a[i][k]);
  }
}

/// value_block_folded()'s accumulators (slice order, vector k scaled by 2^(VB k)): the scales
/// undone, in place, for g rows of D (slice order stays).
template <int VB>
QPKV_TARGET_AVX2 void folded_unscale(float* acc, index_t g, index_t D) {
  constexpr int per = ValuePlan<VB>::per, U = ValuePlan<VB>::U;
  for (index_t i = 0; i < g; ++i)
    for (index_t u = 0; u < D / U; ++u)
      QPKV_UNROLL
      for (int k = 1; k < per; ++k) {
        float* a = acc + i * D + u * U + 8 * k;
        _mm256_storeu_ps(a, _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_set1_ps(1.0f / fold_scale<VB>(k))));
      }
}

/// acc + vpmaddwd(a, b), the sum kept in order: the empty asm stops GCC from reassociating the
/// adds of a loop body into a tree over all its products, which needed more than the 16 ymm
/// registers and kept accumulators on the stack (a store and a reload per add).
QPKV_INLINE_AVX2 __m256i madd_acc(__m256i acc, __m256i a, __m256i b) {
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
#if defined(__GNUC__)
  asm("" : "+x"(acc));
#endif
  return acc;
}

/// AttendPrecision::fast, values: p.v of a block with integer dot products (vpmaddwd), the
/// AVX-512 VNNI path's scheme on 8 lanes. Per query and value group, each token's weight times its
/// group scale, W_t = p_t s_t, is rounded to an int16 with step = max_t W_t / 32767 (per block),
/// two tokens' codes of a channel share a dword, and sum_t W_t code_t is an exact int32 sum; the
/// min term sum_t p_t m_t stays float. Both are added to the float accumulators (slice order, as
/// value_slice) once per block. Per token and query this is half a vpmaddwd and half a vpaddd per
/// 8 channels, against one FMA per 8 channels (and the dequantizing FMA the queries share) in
/// value_slice.
template <int VB>
struct ValueFast {
  static constexpr int per = ValuePlan<VB>::per, U = ValuePlan<VB>::U;
  index_t D = 0, per_row = 0, B = 0, tpv = 0;  // tpv: tokens per vector of [token][group] weights
  bool ok = false, raw_pack = false;
  std::vector<std::int32_t> wq;     // [i][B / 2][per_row] (+ 8): int16 weights of tokens 2j, 2j + 1
  std::vector<float> step, mterm;   // [i][per_row] (+ 8)
  __m256i vtok{}, vshuf{};          // lane -> token of a weight vector; word order after the pack

  /// Off (ok false) unless fast and the block's weights fill whole pairs of vectors with every
  /// group's lanes per_row apart (per_row = D / G in 1, 2, 4, 8), and B (2^b - 1) 32767 fits int32.
  QPKV_TARGET_AVX2 ValueFast(const ValuePlan<VB>& plan, index_t b, index_t nq, bool fast)
      : D(plan.D), per_row(plan.per_row), B(b) {
    ok = fast && plan.D % plan.G == 0 && 8 % per_row == 0 && B % 2 == 0 && (B * per_row) % 16 == 0 &&
         static_cast<double>(B) * 32767.0 * ((1 << VB) - 1) < 2147483647.0;
    if (!ok) return;
    tpv = 8 / per_row;
    raw_pack = per_row == 8;
    vtok = token_lanes(per_row);
    // the pack of two weight vectors a, b (elements e = 0..15 in [token][group] order) puts e at
    // word src(e): packs_epi32 interleaves them by 128-bit lane, and for per_row <= 4 the 0xD8
    // permutation restores e's order. Word T(e) = 2 (pair per_row + group) + parity of the output
    // holds it; the shuffle stays within 128-bit lanes (src and T share a lane: asserted here)
    alignas(32) std::uint8_t ctrl[32];
    QPKV_UNROLL
    for (int e = 0; e < 16; ++e) {
      const int src = raw_pack ? 8 * ((e % 8) / 4) + 4 * (e / 8) + e % 4 : e;
      const int t = e / static_cast<int>(per_row), gr = e % static_cast<int>(per_row);
      const int T = 2 * ((t / 2) * static_cast<int>(per_row) + gr) + t % 2;
      if (T / 8 != src / 8) {
        ok = false;
        return;
      }
      ctrl[2 * T] = static_cast<std::uint8_t>(2 * (src % 8));
      ctrl[2 * T + 1] = static_cast<std::uint8_t>(2 * (src % 8) + 1);
    }
    vshuf = _mm256_load_si256(reinterpret_cast<const __m256i*>(ctrl));
    wq.resize(static_cast<std::size_t>(nq * (B / 2) * per_row + 8));
    step.resize(static_cast<std::size_t>(nq * per_row + 8));
    mterm.resize(step.size());
  }

  /// Folds, rounds and pairs the block's weights for g queries (p[i * pstride + t], readable 8
  /// floats past each row); S, M: the block's scales and mins from value_params().
  QPKV_NOINLINE QPKV_TARGET_AVX2 void weights(const float* S, const float* M, const float* p, index_t pstride, index_t g) {
    for_query_tiles<4>(
        g, [&](index_t i) { weights_tile<4>(S, M, p, pstride, i); }, [&](index_t i) { weights_tile<2>(S, M, p, pstride, i); },
        [&](index_t i) { weights_tile<1>(S, M, p, pstride, i); });
  }

  template <int NQ>
  QPKV_TARGET_AVX2 void weights_tile(const float* S, const float* M, const float* p, index_t pstride, index_t i0) {
    const index_t nv = B * per_row / 8, tz = tpv, pr = per_row;  // locals: the stores below may alias *this
    const __m256i tok = vtok, shuf = vshuf;
    const bool raw = raw_pack;
    const float* pq[NQ];
    __m256 mx[NQ], mt[NQ], inv[NQ];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      pq[i] = p + (i0 + i) * pstride;
      mx[i] = mt[i] = _mm256_setzero_ps();
    }
    for (index_t v = 0; v < nv; ++v) {
      const __m256 s = _mm256_loadu_ps(S + v * 8), m = _mm256_loadu_ps(M + v * 8);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m256 P = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pq[i] + v * tz), tok);
        mx[i] = _mm256_max_ps(mx[i], _mm256_mul_ps(P, s));  // p, s >= 0
        mt[i] = _mm256_fmadd_ps(P, m, mt[i]);
      }
    }
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      for (index_t sh = pr; sh < 8; sh *= 2) {  // lanes of one group are per_row apart
        mx[i] = _mm256_max_ps(mx[i], rotate8(mx[i], sh));
        mt[i] = _mm256_add_ps(mt[i], rotate8(mt[i], sh));
      }
      alignas(32) float st8[8], mt8[8];
      _mm256_store_ps(st8, _mm256_mul_ps(mx[i], _mm256_set1_ps(1.0f / 32767.0f)));
      _mm256_store_ps(mt8, mt[i]);
      std::copy(st8, st8 + pr, step.data() + (i0 + i) * pr);
      std::copy(mt8, mt8 + pr, mterm.data() + (i0 + i) * pr);
      // lane l is group l % per_row; 0 where a group's weights are all 0. W * inv <= 32767 up to
      // float rounding; packs saturates to int16 in any case.
      const __m256 pos = _mm256_cmp_ps(mx[i], _mm256_setzero_ps(), _CMP_GT_OQ);
      inv[i] = _mm256_and_ps(pos, _mm256_div_ps(_mm256_set1_ps(32767.0f), mx[i]));
    }
    std::int32_t* out[NQ];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) out[i] = wq.data() + (i0 + i) * (B / 2) * pr;
    for (index_t v = 0; v < nv; v += 2) {
      const __m256 s0 = _mm256_loadu_ps(S + v * 8), s1 = _mm256_loadu_ps(S + v * 8 + 8);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m256 P0 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pq[i] + v * tz), tok);
        const __m256 P1 = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pq[i] + (v + 1) * tz), tok);
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(P0, s0), inv[i]));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(P1, s1), inv[i]));
        __m256i w = _mm256_packs_epi32(a, b);
        if (!raw) w = _mm256_permute4x64_epi64(w, 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i] + v * 4), _mm256_shuffle_epi8(w, shuf));
      }
    }
  }

  /// acc[i] (slice order) += the block's p.v for NQ queries from qi; weights() was called for it.
  template <int NQ>
  QPKV_TARGET_AVX2 void accumulate(const std::uint8_t* codes, std::size_t row, const ValuePlan<VB>& plan, index_t qi,
                                   float* acc, Prefetch& pf) const {
    for (index_t u = 0; u < D / U; ++u) {
      if (plan.uniform[u] != 0) slice<NQ, true>(codes, row, plan, u, qi, acc, pf);
      else slice<NQ, false>(codes, row, plan, u, qi, acc, pf);
    }
  }

  /// accumulate() for slice u; Uni: its lanes in one group (one broadcast weight per query).
  template <int NQ, bool Uni>
  QPKV_NOINLINE QPKV_TARGET_AVX2 void slice(const std::uint8_t* codes, std::size_t row, const ValuePlan<VB>& plan,
                                            index_t u, index_t qi, float* acc, Prefetch& pf) const {
    const __m256i mask = _mm256_set1_epi32(((1 << VB) - 1) * 0x10001);
    const std::size_t pr = static_cast<std::size_t>(per_row), qstride = static_cast<std::size_t>(B / 2) * pr;
    const index_t g0 = plan.grp0[u], Bn = B;
    [[maybe_unused]] const __m256i gi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(plan.grp_idx.data() + u * 8));
    __m256i a[NQ][per];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) a[i][k] = _mm256_setzero_si256();
    const std::int32_t* wt = wq.data() + static_cast<std::size_t>(qi) * qstride + g0;
    const std::uint8_t* r0 = codes + u * 8;
    for (index_t t = 0; t < Bn; t += 2, r0 += 2 * row, wt += pr) {
      pf.step();
      const __m256i x = _mm256_or_si256(
          _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0))),
          _mm256_slli_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(r0 + row))), 16));
      __m256i c[per];
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) c[k] = VB == 8 ? x : _mm256_and_si256(k == 0 ? x : _mm256_srli_epi32(x, k * VB), mask);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        __m256i w;
        if constexpr (Uni) w = _mm256_set1_epi32(wt[i * qstride]);
        else w = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + i * qstride)), gi);
        QPKV_UNROLL
        for (int k = 0; k < per; ++k) a[i][k] = madd_acc(a[i][k], c[k], w);
      }
    }
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      const float* st = step.data() + (qi + i) * per_row + g0;
      const float* mt = mterm.data() + (qi + i) * per_row + g0;
      __m256 sv, mv;
      if constexpr (Uni) {
        sv = _mm256_set1_ps(*st);
        mv = _mm256_set1_ps(*mt);
      } else {
        sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(st), gi);
        mv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(mt), gi);
      }
      float* o = acc + (qi + i) * D + u * U;
      QPKV_UNROLL
      for (int k = 0; k < per; ++k)
        _mm256_storeu_ps(o + 8 * k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[i][k]), sv, _mm256_add_ps(_mm256_loadu_ps(o + 8 * k), mv)));
    }
  }
};

/// Per key group: the queries with the group's per-channel scales folded in (qs, natural channel
/// order) and the constant terms bias_i = sum_c q_ic (m_c + centre s_c), centre = 2^(b-1).
/// key_tile() reads code e' of each span of a dword in place, i.e. times 2^(b e'), to save a
/// shift per code (see there); qs carries the inverse power of two, q_c (s_c 2^-(b e')), which
/// is exact, so the products, and the logits, are the same floats as with shifted codes.
///
/// fast (AttendPrecision::fast, head_dim a multiple of 16): the folded query of each group rounded
/// to 16-bit integers for vpmaddwd instead (key_tile_int): Q_ic = round(q_ic s_c / step_i), step_i
/// = max_c |q_ic s_c| / qmax, stored as int16 pairs in the codes' pair order (pair_order), and
/// bias_i = sum_c q_ic (m_c + centre s_c) - step_i centre sum_c Q_ic: the integer sums take the
/// codes as stored and the bias centres them after the fact, so the rounding error of Q multiplies
/// code - centre instead of code (KIVI-4 at head_dim 128: 2.2e-4 -> 1.2e-4 relative output error).
/// qmax = 32767, less where D (2^b - 1) qmax could overflow an int32 sum.
template <int KB>
struct KeyFold {
  static constexpr float centre = static_cast<float>(1 << (KB - 1));  // integer, so code - centre is exact
  static constexpr int span = KB == 2 ? 2 : 16;  // bits read in place: 16 (2-bit codes: each code
                                                 // shifted down, as spans made KIVI-2 slower)
  static constexpr int half = span / KB;  // codes per span; e' = channel % half (groups of 8
                                          // channels start at a multiple of half)
  index_t g = 0, D = 0;
  bool fast = false;
  float qmax = 32767.0f;
  const float* q = nullptr;  // the g x D pre-scaled queries
  std::vector<float> qs, bias, sf, mf;
  std::vector<float> qp, step;   // fast: the queries in pair order (once per work item); [i] one integer unit
  std::vector<std::int32_t> q16; // fast: [i][D / 2] int16 pairs

  QPKV_TARGET_AVX2 KeyFold(index_t g_, index_t D_, const float* q_, bool fast_ = false)
      : g(g_), D(D_), fast(fast_ && D_ % 16 == 0), q(q_) {
    bias.resize(static_cast<std::size_t>(g) + 4);
    sf.resize(static_cast<std::size_t>(D));
    mf.resize(static_cast<std::size_t>(D));
    if (!fast) {
      qs.resize(static_cast<std::size_t>(g * D));
      return;
    }
    // |sum_c Q_c code_c| <= D (2^b - 1) qmax must fit an int32 (one unit of margin for rounding)
    const double lim = 2147483647.0 / (static_cast<double>(D) * ((1 << KB) - 1)) - 1.0;
    qmax = static_cast<float>(std::min(32767.0, std::floor(lim)));
    step.resize(static_cast<std::size_t>(g) + 4);
    q16.resize(static_cast<std::size_t>(g * D / 2));
    qp.resize(static_cast<std::size_t>(g * D));
    for (index_t e = 0; e < g * D; e += 16) {
      __m256 v[2] = {_mm256_loadu_ps(q + e), _mm256_loadu_ps(q + e + 8)};
      pair_order(v);
      _mm256_storeu_ps(qp.data() + e, v[0]);
      _mm256_storeu_ps(qp.data() + e + 8, v[1]);
    }
  }

  /// 16 channels (two vectors, natural order) into the fast path's pair order: within each code
  /// dword of cpd = 32 / b channels, key_tile_int's (d >> b k) & (2^b - 1) 0x10001 puts channels
  /// k and k + cpd / 2 in a dword's low and high 16 bits, so position 2k + j holds channel
  /// k + j cpd / 2.
  static QPKV_INLINE_AVX2 void pair_order(__m256* v) {
    if constexpr (KB == 2) {  // one dword = 16 channels: interleave the two vectors
      const __m256 lo = _mm256_unpacklo_ps(v[0], v[1]), hi = _mm256_unpackhi_ps(v[0], v[1]);
      v[0] = _mm256_permute2f128_ps(lo, hi, 0x20);
      v[1] = _mm256_permute2f128_ps(lo, hi, 0x31);
    } else {
      const __m256i idx = KB == 4 ? _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7) : _mm256_setr_epi32(0, 2, 1, 3, 4, 6, 5, 7);
      v[0] = _mm256_permutevar8x32_ps(v[0], idx);
      v[1] = _mm256_permutevar8x32_ps(v[1], idx);
    }
  }

  QPKV_NOINLINE QPKV_TARGET_AVX2 void fold(const std::uint16_t* sc, const std::uint16_t* mn) {
    if (fast) {
      fold_fast(sc, mn);
      return;
    }
    const index_t Dn = D, gn = g;  // locals: the stores below may alias *this
    float* __restrict s_f = sf.data();
    float* __restrict m_f = mf.data();
    const __m256 vc = _mm256_set1_ps(centre);
    alignas(32) float f[8];  // 2^-(b e') of the lanes
    QPKV_UNROLL
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
      QPKV_UNROLL
      for (int j = 0; j < 4; ++j) b[j] = _mm256_setzero_ps();
      for (index_t c = 0; c < Dn; c += 8) {
        const __m256 sv = _mm256_loadu_ps(s_f + c), mv = _mm256_loadu_ps(m_f + c);
        QPKV_UNROLL
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

  /// fold() of the fast path: the group's scales and mins as floats in pair order, then the
  /// integer queries a tile of queries at a time.
  QPKV_TARGET_AVX2 void fold_fast(const std::uint16_t* sc, const std::uint16_t* mn) {
    float* __restrict s_f = sf.data();
    float* __restrict m_f = mf.data();
    for (index_t c = 0, Dn = D; c < Dn; c += 16) {
      __m256 s[2], m[2];
      QPKV_UNROLL
      for (int v = 0; v < 2; ++v) {
        s[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc + c + 8 * v)));
        m[v] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mn + c + 8 * v)));
      }
      QPKV_UNROLL
      for (int v = 0; v < 2; ++v) m[v] = _mm256_fmadd_ps(_mm256_set1_ps(centre), s[v], m[v]);
      pair_order(s);
      pair_order(m);
      QPKV_UNROLL
      for (int v = 0; v < 2; ++v) {
        _mm256_storeu_ps(s_f + c + 8 * v, s[v]);
        _mm256_storeu_ps(m_f + c + 8 * v, m[v]);
      }
    }
    for_query_tiles<4>(
        g, [&](index_t i) { fold_tile<4>(i); }, [&](index_t i) { fold_tile<2>(i); }, [&](index_t i) { fold_tile<1>(i); });
  }

  /// The integer queries i0 .. i0 + NQ - 1 (members read into locals: the stores may alias them).
  template <int NQ>
  QPKV_TARGET_AVX2 void fold_tile(index_t i0) {
    const index_t Dn = D;
    const float* __restrict s_f = sf.data();
    const float* __restrict m_f = mf.data();
    const float* __restrict qq = qp.data() + i0 * Dn;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 b[4], mx[4];
    QPKV_UNROLL
    for (int i = 0; i < 4; ++i) b[i] = mx[i] = _mm256_setzero_ps();
    for (index_t c = 0; c < Dn; c += 8) {
      const __m256 sv = _mm256_loadu_ps(s_f + c), mv = _mm256_loadu_ps(m_f + c);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m256 qv = _mm256_loadu_ps(qq + i * Dn + c);
        mx[i] = _mm256_max_ps(mx[i], _mm256_and_ps(_mm256_mul_ps(qv, sv), absmask));
        b[i] = _mm256_fmadd_ps(qv, mv, b[i]);
      }
    }
    alignas(16) float bs[4], st4[4], inv4[4];
    _mm_store_ps(bs, hsum4(b[0], b[1], b[2], b[3]));
    const __m128 m4 = hmax4(mx[0], mx[1], mx[2], mx[3]);
    const __m128 st = _mm_blendv_ps(_mm_set1_ps(1.0f), _mm_div_ps(m4, _mm_set1_ps(qmax)), _mm_cmpgt_ps(m4, _mm_setzero_ps()));
    _mm_store_ps(st4, st);
    _mm_store_ps(inv4, _mm_div_ps(_mm_set1_ps(1.0f), st));
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      bias[i0 + i] = bs[i];
      step[i0 + i] = st4[i];
    }
    __m256 inv[NQ];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) inv[i] = _mm256_set1_ps(inv4[i]);
    auto* out = reinterpret_cast<std::int16_t*>(q16.data()) + i0 * Dn;
    __m256i qsum[4];
    QPKV_UNROLL
    for (int i = 0; i < 4; ++i) qsum[i] = _mm256_setzero_si256();
    for (index_t c = 0; c < Dn; c += 16) {
      const __m256 s0 = _mm256_loadu_ps(s_f + c), s1 = _mm256_loadu_ps(s_f + c + 8);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        // the same products as above, rounded to nearest; the pack keeps the order (0xD8 undoes its lane split)
        const __m256i Q0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(qq + i * Dn + c), s0), inv[i]));
        const __m256i Q1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(qq + i * Dn + c + 8), s1), inv[i]));
        qsum[i] = _mm256_add_epi32(qsum[i], _mm256_add_epi32(Q0, Q1));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i * Dn + c),
                            _mm256_permute4x64_epi64(_mm256_packs_epi32(Q0, Q1), 0xD8));
      }
    }
    // the codes centred after the fact: bias_i - step_i centre sum_c Q_ic (|sum| <= D qmax: exact as a float up to D = 512)
    alignas(16) float qs4[4];
    _mm_store_ps(qs4, hsum4(_mm256_cvtepi32_ps(qsum[0]), _mm256_cvtepi32_ps(qsum[1]), _mm256_cvtepi32_ps(qsum[2]),
                            _mm256_cvtepi32_ps(qsum[3])));
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) bias[i0 + i] -= st4[i] * centre * qs4[i];
  }
};

/// Code dwords w0 .. w0 + nw - 1 (nw <= 8; the rest zero) of the 8 H code rows at codes (row bytes
/// apart), transposed per half of 8 rows: afterwards lane t of r[h][w] is dword w0 + w of row
/// 8 h + t (the key tiles' columns, one token per lane).
template <int H>
QPKV_INLINE_AVX2 void code_columns(const std::uint8_t* codes, std::size_t row, index_t w0, index_t nw, __m256i (&r)[H][8]) {
  QPKV_UNROLL
  for (int h = 0; h < H; ++h) {
    const std::uint8_t* c0 = codes + static_cast<std::size_t>(8 * h) * row + w0 * 4;
    if (nw == 8) {
      QPKV_UNROLL
      for (int t = 0; t < 8; ++t) r[h][t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + t * row));
    } else {
      const __m256i mk = tail8(nw);
      QPKV_UNROLL
      for (int t = 0; t < 8; ++t) r[h][t] = _mm256_maskload_epi32(reinterpret_cast<const int*>(c0 + t * row), mk);
    }
    transpose8(r[h]);
  }
}

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
/// H halves of 8 tokens (rows 8 h ..) share each query broadcast; the code loop needs its
/// QPKV_UNROLL even at -O3 (without it GCC 12 left the loop rolled for H = 2, with a store of an
/// accumulator after every FMA).
template <int KB, int NQ, int H = 1>
QPKV_TARGET_AVX2 void key_tile(const std::uint8_t* codes, std::size_t row, index_t D, const KeyFold<KB>& f, index_t qi,
                               float* logits, index_t lstride, Prefetch& pf) {
  constexpr int cpd = 32 / KB, half = KeyFold<KB>::half, span = KeyFold<KB>::span;
  const index_t dwords = D / cpd;
  const __m256i magic = _mm256_set1_epi32(0x4B000000);  // 2^23 | x is the float 2^23 + x for x < 2^23
  __m256i mask[half];
  __m256 off[half];
  QPKV_UNROLL
  for (int e = 0; e < half; ++e) {
    mask[e] = _mm256_set1_epi32(((1 << KB) - 1) << (KB * e));
    off[e] = _mm256_set1_ps(8388608.0f + KeyFold<KB>::centre * static_cast<float>(1 << (KB * e)));
  }
  __m256 acc[H][NQ];
  QPKV_UNROLL
  for (int h = 0; h < H; ++h)
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) acc[h][i] = _mm256_setzero_ps();
  const float* qs = f.qs.data() + qi * D;
  for (index_t w0 = 0; w0 < dwords; w0 += 8) {
    const index_t nw = std::min<index_t>(8, dwords - w0);
    __m256i r[H][8];
    code_columns<H>(codes, row, w0, nw, r);
    for (index_t w = 0; w < nw; ++w) {
      pf.step();
      const float* qw = qs + (w0 + w) * cpd;
      QPKV_UNROLL
      for (int e = 0; e < cpd; ++e) {
        __m256 x[H];
        QPKV_UNROLL
        for (int h = 0; h < H; ++h) {
          // the span's shift, where it has one (the compiler shares it between the span's codes)
          const __m256i src = e < half ? r[h][w] : _mm256_srli_epi32(r[h][w], span * (e / half));
          const __m256i c = _mm256_or_si256(_mm256_and_si256(src, mask[e % half]), magic);
          x[h] = _mm256_sub_ps(_mm256_castsi256_ps(c), off[e % half]);
        }
        QPKV_UNROLL
        for (int i = 0; i < NQ; ++i) {
          const __m256 qv = _mm256_broadcast_ss(qw + i * D + e);
          QPKV_UNROLL
          for (int h = 0; h < H; ++h) acc[h][i] = _mm256_fmadd_ps(qv, x[h], acc[h][i]);
        }
      }
    }
  }
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i)
    QPKV_UNROLL
    for (int h = 0; h < H; ++h)
      _mm256_storeu_ps(logits + (qi + i) * lstride + 8 * h, _mm256_add_ps(acc[h][i], _mm256_set1_ps(f.bias[qi + i])));
}

/// key_tile() of the fast path: the logits of 8 H tokens (H = 1 or 2 halves of 8) from integer
/// dot products. Each code dword (lane t: token t of a half, after its 8x8 transpose) gives cpd / 2
/// pairs (d >> b k) & (2^b - 1) 0x10001, channels k and k + cpd / 2 in its two 16-bit halves;
/// vpmaddwd multiplies them with the int16 query pair in the same order (KeyFold::pair_order) and
/// adds the two products into int32, exact. logit = step (sum_c Q_c code_c) + bias. Per token and
/// query: cpd / 2 vpmaddwd + vpaddd per code dword, against cpd FMAs and the float conversions of
/// key_tile(). Two halves share each query broadcast (the loads, two 256-bit per cycle, bound
/// the 8-token tile as much as the multiplies).
template <int KB, int NQ, int H>
QPKV_TARGET_AVX2 void key_tile_int(const std::uint8_t* codes, std::size_t row, index_t D, const KeyFold<KB>& f,
                                   index_t qi, float* logits, index_t lstride, Prefetch& pfr) {
  Prefetch pf = pfr;  // in registers for the loop
  constexpr int cpd = 32 / KB, pairs = cpd / 2;
  const index_t dwords = D / cpd, qrow = D / 2;
  const __m256i mask = _mm256_set1_epi32(((1 << KB) - 1) * 0x10001);
  __m256i acc[H][NQ];
  QPKV_UNROLL
  for (int h = 0; h < H; ++h)
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) acc[h][i] = _mm256_setzero_si256();
  const std::int32_t* qd = f.q16.data() + qi * qrow;
  for (index_t w0 = 0; w0 < dwords; w0 += 8) {
    const index_t nw = std::min<index_t>(8, dwords - w0);
    __m256i r[H][8];
    code_columns<H>(codes, row, w0, nw, r);
    for (index_t w = 0; w < nw; ++w) {
      pf.step();
      const std::int32_t* qw = qd + (w0 + w) * pairs;
      QPKV_UNROLL
      for (int k = 0; k < pairs; ++k) {
        __m256i c[H];
        QPKV_UNROLL
        for (int h = 0; h < H; ++h) c[h] = _mm256_and_si256(k == 0 ? r[h][w] : _mm256_srli_epi32(r[h][w], KB * k), mask);
        QPKV_UNROLL
        for (int i = 0; i < NQ; ++i) {
          const __m256i q2 = _mm256_set1_epi32(qw[i * qrow + k]);
          QPKV_UNROLL
          for (int h = 0; h < H; ++h) acc[h][i] = madd_acc(acc[h][i], c[h], q2);
        }
      }
    }
  }
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i) {
    const __m256 st = _mm256_set1_ps(f.step[qi + i]), bs = _mm256_set1_ps(f.bias[qi + i]);
    QPKV_UNROLL
    for (int h = 0; h < H; ++h)
      _mm256_storeu_ps(logits + (qi + i) * lstride + 8 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][i]), st, bs));
  }
  pfr = pf;
}

/// One work item over a KIVI cache: blocks [b0, b1) of head h, then the residual if asked.
template <int KB, int VB>
QPKV_TARGET_AVX2 void kivi_item(const CacheState& st, const AffineLayout& kl, const AffineLayout& vl, index_t key_group,
                                const ValuePlan<VB>& plan, index_t h, index_t b0, index_t b1, bool residual, const float* q,
                                const Partial& p, bool fast = false) {
  const CacheLayout& L = st.layout;
  const index_t D = L.head_dim, B = L.block_tokens, g = L.q_heads / L.kv_heads;
  constexpr int kValueTile = VB == 2 ? 2 : 4;  // 2-bit: 4 code vectors x the tile's accumulators in 16 registers
  std::vector<float> logits(static_cast<std::size_t>(g * B + 8));  // + 8: ValueFast reads whole vectors
  ValueFast<VB> vf(plan, B, g, fast);
  const bool folded = !vf.ok && value_folded_ok(plan, B);
  std::vector<float> wb(folded ? static_cast<std::size_t>(kValueTile * B * plan.per_row) : 0);  // value_block_folded()
  std::vector<float> sf(static_cast<std::size_t>(B * plan.per_row + 8)), mf(sf.size());
  KeyFold<KB> fold(g, D, q, fast);
  // tokens per key tile: 16 where the key group allows, except exact 8-bit keys (their 16-token
  // tile kept accumulators on the stack as GCC 12 compiled it)
  const index_t tile = key_group % 16 == 0 && (fold.fast || KB <= 4) ? 16 : 8;
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
      for (index_t t0 = gt * key_group; t0 < (gt + 1) * key_group; t0 += tile) {
        const std::uint8_t* codes = block + kl.codes + static_cast<std::size_t>(t0) * kl.row_bytes;
        float* lg = logits.data() + t0;
        if (tile == 16 && fold.fast) {
          for_query_tiles<4>(
              g, [&](index_t i) { key_tile_int<KB, 4, 2>(codes, kl.row_bytes, D, fold, i, lg, B, pf); },
              [&](index_t i) { key_tile_int<KB, 2, 2>(codes, kl.row_bytes, D, fold, i, lg, B, pf); },
              [&](index_t i) { key_tile_int<KB, 1, 2>(codes, kl.row_bytes, D, fold, i, lg, B, pf); });
        } else if (fold.fast)
          for_query_tiles<4>(
              g, [&](index_t i) { key_tile_int<KB, 4, 1>(codes, kl.row_bytes, D, fold, i, lg, B, pf); },
              [&](index_t i) { key_tile_int<KB, 2, 1>(codes, kl.row_bytes, D, fold, i, lg, B, pf); },
              [&](index_t i) { key_tile_int<KB, 1, 1>(codes, kl.row_bytes, D, fold, i, lg, B, pf); });
        else if (tile == 16)
          for_query_tiles<4>(
              g, [&](index_t i) { key_tile<KB, 4, 2>(codes, kl.row_bytes, D, fold, i, lg, B, pf); },
              [&](index_t i) { key_tile<KB, 2, 2>(codes, kl.row_bytes, D, fold, i, lg, B, pf); },
              [&](index_t i) { key_tile<KB, 1, 2>(codes, kl.row_bytes, D, fold, i, lg, B, pf); });
        else
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
    if (vf.ok) {
      vf.weights(sf.data(), mf.data(), logits.data(), B, g);
      const std::uint8_t* vc = vpart + vl.codes;
      for_query_tiles<kValueTile>(
          g, [&](index_t i) { vf.template accumulate<4>(vc, vl.row_bytes, plan, i, p.acc, pf); },
          [&](index_t i) { vf.template accumulate<2>(vc, vl.row_bytes, plan, i, p.acc, pf); },
          [&](index_t i) { vf.template accumulate<1>(vc, vl.row_bytes, plan, i, p.acc, pf); });
      continue;
    }
    if (folded) {
      for_query_tiles<kValueTile>(
          g,
          [&](index_t i) {
            value_block_folded<VB, 4>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), wb.data(), pf);
          },
          [&](index_t i) {
            value_block_folded<VB, 2>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), wb.data(), pf);
          },
          [&](index_t i) {
            value_block_folded<VB, 1>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), wb.data(), pf);
          });
      continue;
    }
    for_query_tiles<kValueTile>(
        g, [&](index_t i) { value_block<VB, 4>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), pf); },
        [&](index_t i) { value_block<VB, 2>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), pf); },
        [&](index_t i) { value_block<VB, 1>(vpart, vl, B, plan, logits.data() + i * B, B, p.acc + i * D, sf.data(), mf.data(), pf); });
  }
  std::vector<float> tmp(static_cast<std::size_t>(D));
  if (folded) folded_unscale<VB>(p.acc, g, D);
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
