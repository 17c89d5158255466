// qpkv/backend/cpu/attend_avx512.hpp - AVX-512 kernels of the CPU decode attention (compiled when
// simd.hpp sees AVX-512F/BW/VL/DQ, F16C and FMA; VNNI adds the integer q.k of AttendPrecision::fast).
//
// One call handles a work item of attend.hpp: KV head h, blocks [b0, b1) and optionally the fp16
// residual, for the g query heads of the head's GQA group, leaving an online-softmax partial
// (running max m, sum l, unnormalised output acc in natural channel order). What makes it fast,
// in the order it mattered (issue 4):
//  - KIVI blocks in passes of kPassTokens tokens: the keys of the pass's blocks, one softmax step
//    over all their logits, then their values; software prefetch into L2 spread over the pass
//    (one line per key-tile column and value row pair) one pass ahead, plus one demand load per
//    block past that window for the page translation (Prefetch); fp16 rows: prefetcht1 of the
//    key row 64 tokens ahead and the value row 32 tokens ahead (-30% time at 32K and 128K tokens);
//  - keys (KIVI per-channel groups): 16 tokens at a time, their packed code rows transposed as
//    16x16 dwords so each vector lane is one token; a channel's codes are then one shift + mask
//    away, and q.k accumulates with tokens in lanes (no horizontal sums). Per key group the
//    per-channel scales are folded into the query once: q.k = sum_c (q_c s_c) code_c +
//    sum_c q_c m_c. Exact: float FMAs on centred codes (code - 2^(b-1), exact in float,
//    so the two sums do not cancel). Fast: vpdpbusd of the unsigned codes with the folded query
//    rounded to 16 bits in two signed 8-bit parts (hi * 256 + lo);
//  - values (KIVI per-token groups): each 16-byte slice of a code row is widened once to 16
//    dwords; shifting gives the 8/b vectors of codes (lane j of vector k = channel (8/b) j + k),
//    dequantized with the token's scale and min per lane and accumulated for all g queries;
//    accumulators stay in registers for a whole block and are permuted to and from natural
//    channel order at the block boundary only. Where each slice lies in one value group
//    (value_block_folded, ninth session) the scale goes into the weight instead (w = p s per
//    token, a broadcast), the codes are centred floats by one and-or and one subtraction, the
//    min is one constant per block and group, and the accumulators stay in slice order for the
//    whole work item. Fast (VNNI): the weights p_t s_tg rounded to
//    15-bit integers per pass, two tokens per vpdpwssd (ValueFast);
//  - GCC 12 code generation: token loops kept to one basic block and the dot products written
//    as in-place instructions (dpwssd, dpbusd), the value stages out of line (QPKV_NOINLINE):
//    otherwise accumulators were copied around every dot product and loop constants spilled;
//  - softmax with a vectorised exp (Cephes expf polynomial, about 1 ulp).
#pragma once

#include "qpkv/backend/cpu/simd.hpp"

#if defined(QPKV_CPU_AVX512_KERNELS)

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "qpkv/cache/layout.hpp"
#include "qpkv/core/dtype.hpp"
#include "qpkv/quant/affine_quantizer.hpp"

QPKV_INTRINSICS_WARNINGS_OFF  // simd.hpp

namespace qpkv::cpu::avx512 {

/// e^x for x <= 0 (Cephes expf: range reduction by ln 2, degree-5 polynomial, scalef); x below
/// -87.3 gives 0.
QPKV_INLINE __m512 exp_ps(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_max_ps(x, lo);
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(exp_poly::log2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(exp_poly::ln2_hi), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(exp_poly::ln2_lo), x);
  __m512 y = _mm512_set1_ps(exp_poly::p0);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(exp_poly::p1));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(exp_poly::p2));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(exp_poly::p3));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(exp_poly::p4));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(exp_poly::p5));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_scalef_ps(y, fx));
}

// Partial and Prefetch: simd.hpp.

/// Tokens per pass of kivi_item()'s fast path (whole blocks, at least one): the keys of a pass's
/// blocks, one softmax step over all their logits, then their values (the value weights rounded
/// and the integer sums flushed once per pass). 32K tokens, 2 threads: 3.79 -> 3.35 ms against
/// one block per pass. The exact path keeps one block per pass: passes made it faster when
/// cache-resident (2K: 0.58 -> 0.56 ms) but slower at 32K (4.87 -> 5.27 ms).
inline constexpr index_t kPassTokens = 128;

// for_query_tiles: simd.hpp.

/// Online-softmax update for n logits per query (row i at logits + i * stride, already scaled):
/// rescales acc[i] and l[i] by e^(m_old - m_new) and turns the logits into weights in place.
/// Lanes past n keep the running max (read as 0 they made the max 0 when every logit was below
/// about -87, so every weight underflowed and attend() reported non-finite logits).
inline QPKV_TARGET void softmax_step(float* logits, index_t n, index_t stride, index_t g, index_t D, const Partial& p) {
  for (index_t i = 0; i < g; ++i) {
    float* x = logits + i * stride;
    __m512 vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (index_t t = 0; t < n; t += 16) vm = _mm512_max_ps(vm, _mm512_mask_loadu_ps(vm, tail_mask(n - t), x + t));
    const float bm = std::max(_mm512_reduce_max_ps(vm), -std::numeric_limits<float>::max());
    const float mold = p.m[i], mnew = std::max(mold, bm);
    if (mnew > mold) {
      const float alpha = mold == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(mold - mnew);
      p.l[i] *= alpha;
      const __m512 va = _mm512_set1_ps(alpha);
      float* a = p.acc + i * D;
      for (index_t c = 0; c < D; c += 16) {
        const __mmask16 mk = tail_mask(D - c);
        _mm512_mask_storeu_ps(a + c, mk, _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, a + c), va));
      }
      p.m[i] = mnew;
    }
    const __m512 vmn = _mm512_set1_ps(mnew);
    __m512 sum = _mm512_setzero_ps();
    for (index_t t = 0; t < n; t += 16) {
      const __mmask16 mk = tail_mask(n - t);
      const __m512 e = _mm512_maskz_mov_ps(mk, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, x + t), vmn)));
      _mm512_mask_storeu_ps(x + t, mk, e);
      sum = _mm512_add_ps(sum, e);
    }
    p.l[i] += _mm512_reduce_add_ps(sum);
  }
}

/// The sums (hsum4) or maxima (hmax4) of four vectors, in lanes 0..3 (a, b, c, d): one shuffle
/// tree, Op combining the halves at each level.
template <class Op>
QPKV_INLINE __m128 hreduce4(__m512 a, __m512 b, __m512 c, __m512 d, Op op) {
  const __m512 ab = op(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = op(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 x = op(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  x = op(x, _mm512_permute_ps(x, 0x4E));  // swap 64-bit halves of each 128-bit lane
  x = op(x, _mm512_permute_ps(x, 0xB1));  // swap neighbours
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), x));
}
struct AddPs {
  QPKV_INLINE __m512 operator()(__m512 x, __m512 y) const { return _mm512_add_ps(x, y); }
};
struct MaxPs {
  QPKV_INLINE __m512 operator()(__m512 x, __m512 y) const { return _mm512_max_ps(x, y); }
};
QPKV_INLINE __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) { return hreduce4(a, b, c, d, AddPs{}); }
QPKV_INLINE __m128 hmax4(__m512 a, __m512 b, __m512 c, __m512 d) { return hreduce4(a, b, c, d, MaxPs{}); }

/// v rotated by sh lanes: lane l takes lane (l + sh) % 16. Combined with v for sh = n, 2n, ..
/// < 16 (n a power of two), lane g < n ends up with the reduction of the lanes n apart from it.
QPKV_INLINE __m512 rotate_lanes(__m512 v, index_t sh) {
  const __m512i r = _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                     _mm512_set1_epi32(static_cast<int>(sh)));
  return _mm512_permutexvar_ps(_mm512_and_si512(r, _mm512_set1_epi32(15)), v);
}

/// In-register transpose of 16 x 16 dwords: afterwards r[c] lane t = old r[t] lane c.
QPKV_INLINE void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  QPKV_UNROLL
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  QPKV_UNROLL
  for (int i = 0; i < 4; ++i) {  // rows 4i..4i+3; u[4i + k] lane L = rows 4i..4i+3 of column 4L + k
    u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  QPKV_UNROLL
  for (int k = 0; k < 4; ++k) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88), w0 = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
    const __m512i v1 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88), w1 = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
    r[k] = _mm512_shuffle_i32x4(v0, v1, 0x88);
    r[8 + k] = _mm512_shuffle_i32x4(v0, v1, 0xDD);
    r[4 + k] = _mm512_shuffle_i32x4(w0, w1, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(w0, w1, 0xDD);
  }
}

// ------------------------------------------------------------------------------------------------
// fp16 rows (Fp16 caches and every cache's residual)

/// Software prefetch distances of the fp16 kernel, in tokens (prefetcht1, into L2). Measured on
/// an idle machine, 32K tokens, 2 threads: 8 / 0 into L1 (the previous setting) 7.45 ms; into L2
/// 16 / 8 5.33 ms, 64 / 32 5.23 ms, 128 / 64 5.32 ms (128K tokens: 28.6 -> 21.4-22.1 ms). A
/// prefetch past the end of the rows is harmless (prefetches do not fault).
inline constexpr index_t kKeyAhead = 64, kValueAhead = 32;
/// ... and, once per 4 KiB of key rows, one demand load of the key row kTouchAhead tokens ahead
/// (value unused): it fetches that page's translation before the prefetches reach it (the KIVI
/// kernel's Prefetch explains why). 32K tokens: 1 thread 9.16 -> 7.76 ms, 2 threads 5.05 -> 4.69 ms.
inline constexpr index_t kTouchAhead = 96;

/// Attention over n fp16 tokens: key row t at kb + t * kstride, value row t at vb + t * vstride
/// (bytes). q: g x D pre-scaled queries. Updates the partial.
inline QPKV_TARGET void fp16_tokens(const std::uint8_t* kb, std::size_t kstride, const std::uint8_t* vb, std::size_t vstride,
                        index_t n, index_t D, const float* q, index_t g, const Partial& p) {
  constexpr index_t kTile = 32;
  float logits[8 * kTile];
  const index_t gt = std::min<index_t>(g, 8);  // query heads per pass (logits scratch)
  const index_t touch_every = std::max<index_t>(1, static_cast<index_t>(4096 / kstride));
  for (index_t t0 = 0; t0 < n; t0 += kTile) {
    const index_t nt = std::min(kTile, n - t0);
    for (index_t qi = 0; qi < g; qi += gt) {
      const index_t nq = std::min(gt, g - qi);
      // logits
      for (index_t t = 0; t < nt; ++t) {
        const auto* kr = reinterpret_cast<const __m256i*>(kb + (t0 + t) * kstride);
        if (qi == 0) {  // into L2: the key row 64 tokens ahead, the value row 32 tokens ahead
          const std::size_t rb = static_cast<std::size_t>(D) * 2;
          for (std::size_t o = 0; o < rb; o += 64) {
            _mm_prefetch(reinterpret_cast<const char*>(kb + (t0 + t + kKeyAhead) * kstride + o), _MM_HINT_T1);
            _mm_prefetch(reinterpret_cast<const char*>(vb + (t0 + t + kValueAhead) * vstride + o), _MM_HINT_T1);
          }
          if ((t0 + t) % touch_every == 0 && t0 + t + kTouchAhead < n)
            (void)*reinterpret_cast<const volatile std::uint8_t*>(kb + (t0 + t + kTouchAhead) * kstride);
        }
        index_t i = 0;
        for (; i + 4 <= nq; i += 4) {
          __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
          const float* qq = q + (qi + i) * D;
          for (index_t c = 0; c < D; c += 16) {
            const __m512 k = _mm512_cvtph_ps(_mm256_loadu_si256(kr + c / 16));
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qq + c), k, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qq + D + c), k, a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(qq + 2 * D + c), k, a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(qq + 3 * D + c), k, a3);
          }
          alignas(16) float s[4];
          _mm_store_ps(s, hsum4(a0, a1, a2, a3));
          QPKV_UNROLL
          for (int j = 0; j < 4; ++j) logits[(i + j) * kTile + t] = s[j];
        }
        for (; i < nq; ++i) {
          __m512 a0 = _mm512_setzero_ps();
          const float* qq = q + (qi + i) * D;
          for (index_t c = 0; c < D; c += 16)
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qq + c), _mm512_cvtph_ps(_mm256_loadu_si256(kr + c / 16)), a0);
          logits[i * kTile + t] = _mm512_reduce_add_ps(a0);
        }
      }
      const Partial pq{p.m + qi, p.l + qi, p.acc + qi * D};
      softmax_step(logits, nt, kTile, nq, D, pq);
      // values: 64 channels x up to 4 queries of accumulators in registers, tokens inner
      for (index_t i = 0; i < nq; i += 4) {
        const index_t mq = std::min<index_t>(4, nq - i);
        for (index_t c0 = 0; c0 < D; c0 += 64) {
          const index_t nv = std::min<index_t>(4, (D - c0) / 16);
          if (mq == 4 && nv == 4) {  // the common case with every loop bound known at compile time
            float* ab = pq.acc + i * D + c0;
            __m512 acc[4][4];
            QPKV_UNROLL
            for (int j = 0; j < 4; ++j)
              QPKV_UNROLL
              for (int v = 0; v < 4; ++v) acc[j][v] = _mm512_loadu_ps(ab + j * D + 16 * v);
            for (index_t t = 0; t < nt; ++t) {
              const auto* vr = reinterpret_cast<const __m256i*>(vb + (t0 + t) * vstride) + c0 / 16;
              __m512 vv[4];
              QPKV_UNROLL
              for (int v = 0; v < 4; ++v) vv[v] = _mm512_cvtph_ps(_mm256_loadu_si256(vr + v));
              QPKV_UNROLL
              for (int j = 0; j < 4; ++j) {
                const __m512 w = _mm512_set1_ps(logits[(i + j) * kTile + t]);
                QPKV_UNROLL
                for (int v = 0; v < 4; ++v) acc[j][v] = _mm512_fmadd_ps(w, vv[v], acc[j][v]);
              }
            }
            QPKV_UNROLL
            for (int j = 0; j < 4; ++j)
              QPKV_UNROLL
              for (int v = 0; v < 4; ++v) _mm512_storeu_ps(ab + j * D + 16 * v, acc[j][v]);
            continue;
          }
          __m512 acc[4][4];
          for (index_t j = 0; j < mq; ++j)
            for (index_t v = 0; v < nv; ++v) acc[j][v] = _mm512_loadu_ps(pq.acc + (i + j) * D + c0 + 16 * v);
          for (index_t t = 0; t < nt; ++t) {
            const auto* vr = reinterpret_cast<const __m256i*>(vb + (t0 + t) * vstride);
            __m512 vv[4];
            for (index_t v = 0; v < nv; ++v) vv[v] = _mm512_cvtph_ps(_mm256_loadu_si256(vr + c0 / 16 + v));
            for (index_t j = 0; j < mq; ++j) {
              const __m512 w = _mm512_set1_ps(logits[(i + j) * kTile + t]);
              for (index_t v = 0; v < nv; ++v) acc[j][v] = _mm512_fmadd_ps(w, vv[v], acc[j][v]);
            }
          }
          for (index_t j = 0; j < mq; ++j)
            for (index_t v = 0; v < nv; ++v) _mm512_storeu_ps(pq.acc + (i + j) * D + c0 + 16 * v, acc[j][v]);
        }
      }
    }
  }
}

/// The fp16 kernel covers head_dim multiples of 16.
/// Shape checks: plain functions (no AVX-512 target), asked only after avx512_usable().
inline bool fp16_supported(index_t D) { return D % 16 == 0; }

// ------------------------------------------------------------------------------------------------
// KIVI: keys per channel (Affine<KB, half>, Axis::channel), values per token (Affine<VB, half>,
// Axis::token), no outlier slots.

/// Is the SIMD kernel defined for these parts? (Otherwise attend.hpp uses the portable one.)
template <int KB, int VB>
bool kivi_supported(index_t B, index_t D, index_t key_group, index_t value_group) {
  constexpr int vper = 8 / VB;
  const bool key_ok = D % 16 == 0 && (D * KB) % 32 == 0 && key_group % 16 == 0 && B % key_group == 0;
  const bool value_ok = (D * VB) % 128 == 0 && value_group % vper == 0;
  return key_ok && value_ok;
}

#if defined(QPKV_CPU_AVX512VNNI)
/// acc + the vpdpwssd / vpdpbusd products, written as one instruction that updates acc in place.
/// With the intrinsics GCC 12 kept each accumulator of a token loop in one register and copied
/// it into another and back around every dot product (two vmovdqa per vpdpwssd; 2K tokens,
/// cache-resident, 1 thread: 0.390 -> 0.368 ms together with the value kernel's single-block loop).
/// Other compilers (and the emulated AVX-512 of the tests, simd.hpp) get the intrinsics.
QPKV_INLINE_VNNI __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
#if defined(__GNUC__) && !defined(__clang__) && !defined(QPKV_EMULATE_AVX512)
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
#else
  return _mm512_dpwssd_epi32(acc, a, b);
#endif
}
/// a: unsigned bytes, b: signed bytes.
QPKV_INLINE_VNNI __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
#if defined(__GNUC__) && !defined(__clang__) && !defined(QPKV_EMULATE_AVX512)
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
#else
  return _mm512_dpbusd_epi32(acc, a, b);
#endif
}
#endif

/// Per-call constants of the value kernel: for each 16-byte slice u of a code row, the lane ->
/// group index (relative to the slice's first group) and the natural <-> slice-order permutations.
template <int VB>
struct ValuePlan {
  static constexpr int per = 8 / VB;    // codes per byte = vectors per slice
  static constexpr int U = 16 * per;    // channels per slice
  index_t D = 0, G = 0, per_row = 0;
  std::vector<std::int32_t> grp_idx;    // [slice][16]
  std::vector<index_t> grp0;            // [slice] first group of the slice
  bool folded = false;                  // value_block_folded() applies (every slice in one value group)
  __m512i vtok{};                       // lane -> token of a vector of 16 (token, group) scales (value_block_folded, ValueFast)

  /// b: block tokens.
  QPKV_TARGET ValuePlan(index_t d, index_t g, index_t b) : D(d), G(g), per_row((d + g - 1) / g) {
    const index_t slices = D / U;
    grp_idx.resize(static_cast<std::size_t>(slices * 16));
    grp0.resize(static_cast<std::size_t>(slices));
    bool uniform = true;
    for (index_t u = 0; u < slices; ++u) {
      grp0[u] = (u * U) / G;
      for (index_t j = 0; j < 16; ++j) {
        grp_idx[u * 16 + j] = static_cast<std::int32_t>((u * U + per * j) / G - grp0[u]);
        const bool same = (u * U + per * j + per - 1) / G - grp0[u] == grp_idx[u * 16 + j];  // all per channels of lane j
        uniform = uniform && same && grp_idx[u * 16 + j] == 0;
      }
    }
    folded = uniform && D % U == 0 && D % G == 0 && 16 % per_row == 0 && (b * per_row) % 16 == 0;
    alignas(64) std::int32_t tok[16];
    QPKV_UNROLL
    for (int l = 0; l < 16; ++l) tok[l] = static_cast<std::int32_t>(l / per_row);
    vtok = _mm512_load_si512(tok);
  }
};

/// Natural channel order (per vectors of 16 consecutive channels) -> slice order (vector k lane j =
/// channel per*j + k), and back.
template <int Per>
inline QPKV_TARGET void to_slice_order(__m512* v) {
  if constexpr (Per == 2) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512 a = _mm512_permutex2var_ps(v[0], ie, v[1]), b = _mm512_permutex2var_ps(v[0], io, v[1]);
    v[0] = a;
    v[1] = b;
  } else if constexpr (Per == 4) {
    __m512 out[4];
    QPKV_UNROLL
    for (int k = 0; k < 4; ++k) {
      // lane j takes channel 4j + k: j < 8 from v0/v1, j >= 8 from v2/v3 (index mod 32)
      alignas(64) std::int32_t idx[16];
      QPKV_UNROLL
      for (int j = 0; j < 16; ++j) idx[j] = (4 * j + k) % 32;
      const __m512i vi = _mm512_load_si512(idx);
      out[k] = _mm512_mask_blend_ps(0xFF00, _mm512_permutex2var_ps(v[0], vi, v[1]), _mm512_permutex2var_ps(v[2], vi, v[3]));
    }
    QPKV_UNROLL
    for (int k = 0; k < 4; ++k) v[k] = out[k];
  }
}

template <int Per>
inline QPKV_TARGET void to_natural_order(__m512* v) {
  if constexpr (Per == 2) {
    const __m512i i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512 a = _mm512_permutex2var_ps(v[0], i0, v[1]), b = _mm512_permutex2var_ps(v[0], i1, v[1]);
    v[0] = a;
    v[1] = b;
  } else if constexpr (Per == 4) {
    __m512 out[4];
    QPKV_UNROLL
    for (int n = 0; n < 4; ++n) {
      // natural lane c is channel ch = 16n + c, found in slice vector ch % 4, lane ch / 4
      alignas(64) std::int32_t idx[16];
      __mmask16 hi = 0;
      QPKV_UNROLL
      for (int c = 0; c < 16; ++c) {
        const int ch = 16 * n + c, k = ch % 4, j = ch / 4;
        idx[c] = (k % 2) * 16 + j;
        if (k >= 2) hi = static_cast<__mmask16>(hi | (1u << c));
      }
      const __m512i vi = _mm512_load_si512(idx);
      out[n] = _mm512_mask_blend_ps(hi, _mm512_permutex2var_ps(v[0], vi, v[1]), _mm512_permutex2var_ps(v[2], vi, v[3]));
    }
    QPKV_UNROLL
    for (int k = 0; k < 4; ++k) v[k] = out[k];
  }
}

/// The np fp16 scales and mins of a per-token value part as float (sf, mf): once per block, for
/// every query and both value kernels.
inline QPKV_TARGET void value_params(const std::uint8_t* part, const AffineLayout& l, index_t np, float* sf, float* mf) {
  const auto* sc = reinterpret_cast<const std::uint16_t*>(part + l.scales);
  const auto* mn = reinterpret_cast<const std::uint16_t*>(part + l.mins);
  index_t e = 0;
  for (; e + 16 <= np; e += 16) {
    _mm512_storeu_ps(sf + e, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + e))));
    _mm512_storeu_ps(mf + e, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + e))));
  }
  if (e < np) {
    const __mmask16 mk = tail_mask(np - e);
    _mm512_mask_storeu_ps(sf + e, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, sc + e)));
    _mm512_mask_storeu_ps(mf + e, mk, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, mn + e)));
  }
}

/// acc[i] += sum_t p[i][t] * v_t for the B tokens of a per-token value part, NQ queries at once;
/// sf, mf: the part's scales and mins from value_params().
template <int VB, int NQ>
QPKV_NOINLINE QPKV_TARGET void value_block(const std::uint8_t* part, const AffineLayout& l, index_t B, const ValuePlan<VB>& plan,
                 const float* p, index_t pstride, float* acc, const float* sf, const float* mf, Prefetch& pf) {
  constexpr int per = ValuePlan<VB>::per, U = ValuePlan<VB>::U;
  const index_t D = plan.D, per_row = plan.per_row;
  const std::uint8_t* codes = part + l.codes;
  const std::size_t row = l.row_bytes;
  const __m512i mask = _mm512_set1_epi32((1 << VB) - 1);
  for (index_t u = 0; u < D / U; ++u) {
    const __m512i gi = _mm512_loadu_si512(plan.grp_idx.data() + u * 16);
    const index_t g0 = plan.grp0[u];
    __m512 a[NQ][per];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) a[i][k] = _mm512_loadu_ps(acc + i * D + u * U + 16 * k);
      to_slice_order<per>(a[i]);
    }
    for (index_t t = 0; t < B; ++t) {
      pf.step();
      const __m512 S = _mm512_permutexvar_ps(gi, _mm512_loadu_ps(sf + t * per_row + g0));
      const __m512 M = _mm512_permutexvar_ps(gi, _mm512_loadu_ps(mf + t * per_row + g0));
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + t * row + u * 16)));
      __m512 w[NQ];
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) w[i] = _mm512_set1_ps(p[i * pstride + t]);
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) {
        const __m512i c = VB == 8 ? d : _mm512_and_si512(_mm512_srli_epi32(d, k * VB), mask);
        const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(c), S, M);
        QPKV_UNROLL
        for (int i = 0; i < NQ; ++i) a[i][k] = _mm512_fmadd_ps(w[i], v, a[i][k]);
      }
    }
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      to_natural_order<per>(a[i]);
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) _mm512_storeu_ps(acc + i * D + u * U + 16 * k, a[i][k]);
    }
  }
}

/// value_block() with the token's value scale folded into its softmax weight (ValuePlan::folded:
/// every 16-byte slice of a code row lies in one value group). v = s (c - centre) + (m + centre s)
/// with centre = 2^(VB-1), so sum_t p_t v_t = sum_t (p_t s_t) (c_t - centre) + sum_t p_t (m_t +
/// centre s_t). Per token and slice, code vector k is a float by one or-and-mask (2^23 | the
/// code's bits left where they are, i.e. 2^23 + 2^(VB k) c) and one subtraction, which leaves
/// 2^(VB k) (c - centre) exactly: no shift, and accumulator k holds 2^(VB k) times its sum (an
/// exact power-of-two scale, undone in slice_to_natural()). Each query adds w_t (c - centre) with
/// a broadcast weight; the second sum is one constant per (query, group), added once per block.
/// Centred codes keep the two sums from cancelling (the values' mean is in the constant). The
/// accumulators stay in slice order for the whole work item. wb: scratch of NQ x B x per_row.
/// KIVI-4 g32 exact, 32K tokens, 2 threads: 4.61 -> 4.34 ms; KIVI-8 g32 4.96 -> 4.51 ms (scripts/bench --compare).
template <int VB>
constexpr float fold_scale(int k) {
  return static_cast<float>(1u << (VB * k));  // k < 8 / VB
}

template <int VB, int NQ>
QPKV_NOINLINE QPKV_TARGET void value_block_folded(const std::uint8_t* part, const AffineLayout& l, index_t B,
                                                  const ValuePlan<VB>& plan, const float* p, index_t pstride, float* acc,
                                                  const float* sf, const float* mf, float* wb, Prefetch& pfr) {
  constexpr int per = ValuePlan<VB>::per, U = ValuePlan<VB>::U;
  constexpr float centre = static_cast<float>(1 << (VB - 1));
  Prefetch pf = pfr;  // in registers for the loops
  const index_t D = plan.D, per_row = plan.per_row, nv = B * per_row / 16, tz = 16 / per_row;
  const std::size_t wrow = static_cast<std::size_t>(B * per_row);
  // the weights w = p s per (query, token, group) and the constants sum_t p (m + centre s); lane l
  // of a vector of 16 scales is token l / per_row, group l % per_row
  const __mmask16 tm = tail_mask(tz);
  const __m512i tok = plan.vtok;
  __m512 dc[NQ];
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i) dc[i] = _mm512_setzero_ps();
  for (index_t v = 0; v < nv; ++v) {
    const __m512 S = _mm512_loadu_ps(sf + v * 16);
    const __m512 M = _mm512_fmadd_ps(_mm512_set1_ps(centre), S, _mm512_loadu_ps(mf + v * 16));
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      const __m512 P = _mm512_permutexvar_ps(tok, _mm512_maskz_loadu_ps(tm, p + i * pstride + v * tz));
      _mm512_storeu_ps(wb + i * wrow + v * 16, _mm512_mul_ps(P, S));
      dc[i] = _mm512_fmadd_ps(P, M, dc[i]);
    }
  }
  alignas(64) float dcs[NQ][16];  // [i][g], g < per_row: the constant of group g
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i) {
    for (index_t sh = per_row; sh < 16; sh *= 2)  // lanes of one group are per_row apart
      dc[i] = _mm512_add_ps(dc[i], rotate_lanes(dc[i], sh));
    _mm512_store_ps(dcs[i], dc[i]);
  }
  const std::uint8_t* codes = part + l.codes;
  const std::size_t row = l.row_bytes;
  const __m512i magic = _mm512_set1_epi32(0x4B000000);  // 2^23 | x is the float 2^23 + x (x < 2^23)
  for (index_t u = 0; u < D / U; ++u) {
    const index_t g0 = plan.grp0[u];
    __m512 a[NQ][per];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k)
        a[i][k] = _mm512_add_ps(_mm512_loadu_ps(acc + i * D + u * U + 16 * k), _mm512_set1_ps(dcs[i][g0] * fold_scale<VB>(k)));
    const float* w = wb + g0;
    for (index_t t = 0; t < B; ++t, w += per_row) {
      pf.step();
      const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + t * row + u * 16)));
      __m512 x[per];  // 2^(VB k) (code - centre)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k)
        x[k] = _mm512_sub_ps(
            _mm512_castsi512_ps(_mm512_ternarylogic_epi32(d, _mm512_set1_epi32(((1 << VB) - 1) << (VB * k)), magic, 0xEA)),
            _mm512_set1_ps(8388608.0f + centre * fold_scale<VB>(k)));
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m512 wi = _mm512_set1_ps(w[i * wrow]);
        QPKV_UNROLL
        for (int k = 0; k < per; ++k) a[i][k] = _mm512_fmadd_ps(wi, x[k], a[i][k]);
      }
    }
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) _mm512_storeu_ps(acc + i * D + u * U + 16 * k, a[i][k]);
  }
  pfr = pf;
}

/// value_block_folded()'s accumulators (slice order, vector k scaled by 2^(VB k)) -> natural channel
/// order, in place, for g rows of D.
template <int VB>
QPKV_TARGET void slice_to_natural(float* acc, index_t g, index_t D) {
  constexpr int per = ValuePlan<VB>::per, U = ValuePlan<VB>::U;
  for (index_t i = 0; i < g; ++i)
    for (index_t u = 0; u < D / U; ++u) {
      float* a = acc + i * D + u * U;
      __m512 v[per];
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) v[k] = _mm512_mul_ps(_mm512_loadu_ps(a + 16 * k), _mm512_set1_ps(1.0f / fold_scale<VB>(k)));
      to_natural_order<per>(v);
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) _mm512_storeu_ps(a + 16 * k, v[k]);
    }
}

#if defined(QPKV_CPU_AVX512VNNI)
/// The VNNI value kernel of AttendPrecision::fast (KIVI per-token values). Per pass (kivi_item:
/// kPassTokens tokens, whole blocks) and query, the token's group scale is folded into its
/// softmax weight, w_tg = p_t s_tg, and the weights of
/// each group are rounded to 15-bit integers W = round(w / step), step = max_t w_tg / 32767; the
/// min term sum_t p_t m_tg is a per-group constant. Two tokens' codes share a dword (16-bit words,
/// token t low), so one vpdpwssd adds W_t code_t + W_t+1 code_t+1 for 16 channels. Channels are
/// processed in slabs of 16 packed bytes (16 * 8/VB channels): code vector k of a slab holds
/// channel 8/VB * lane + k, and the float accumulators stay in that slab order for the whole work
/// item (natural_order() restores channel order at the end). The int32 sums are flushed to float
/// per pass: out += step * sum + mterm.
template <int VB>
struct ValueFast {
  static constexpr int per = 8 / VB;  // codes per byte = code vectors per slab
  static constexpr int U = 16 * per;  // channels per slab
  index_t D = 0, G = 0, per_row = 0, B = 0, N = 0, tpz = 0;  // B: block tokens, N: most tokens per pass,
                                                              // tpz: tokens per 16 scales
  bool ok = false;
  std::vector<std::int32_t> lane_grp;  // [slab][16]: group of lane p, relative to slab_g0
  std::vector<index_t> slab_g0;
  std::vector<char> uniform;           // [slab]: all 16 lanes in group slab_g0
  std::vector<std::int32_t> wq;        // [i][N / 2][per_row] + 16: pair dwords of 15-bit weights
  std::vector<float> step, mterm;      // [i][per_row] + 16
  std::vector<float> tmp;              // scratch: one row of D for natural_order()
  __m512i vtok{}, vwords2{};           // weights(): lane -> token of a 16-scale vector; word order of two
  __m256i vwords{};                    //   vectors after packs, and of one vector

  /// plan: head_dim, value group and lane -> token table of the call; b: block tokens, n: most
  /// tokens per pass (a multiple of b), nq: queries.
  QPKV_TARGET ValueFast(const ValuePlan<VB>& plan, index_t b, index_t n, index_t nq)
      : D(plan.D), G(plan.G), per_row(plan.per_row), B(b), N(n), vtok(plan.vtok) {
    // 2 tokens x 32767 x (2^VB - 1) per dword lane per pair, N / 2 pairs: stay inside int32
    const double worst = static_cast<double>(n) * 32767.0 * ((1 << VB) - 1);
    ok = D % U == 0 && D % G == 0 && G % per == 0 && per_row <= 8 && 16 % per_row == 0 && B % 2 == 0 &&
         (B * per_row) % 16 == 0 && worst < 2147483647.0;
    if (!ok) return;
    tpz = 16 / per_row;
    const index_t slabs = D / U;
    lane_grp.resize(static_cast<std::size_t>(slabs * 16));
    slab_g0.resize(static_cast<std::size_t>(slabs));
    uniform.resize(static_cast<std::size_t>(slabs));
    for (index_t u = 0; u < slabs; ++u) {
      slab_g0[u] = (u * U) / G;
      bool same = true;
      for (index_t j = 0; j < 16; ++j) {
        lane_grp[u * 16 + j] = static_cast<std::int32_t>((u * U + per * j) / G - slab_g0[u]);
        same = same && lane_grp[u * 16 + j] == 0;
      }
      uniform[u] = same;
    }
    alignas(64) std::int32_t words[16];
    alignas(64) std::int16_t words2[32];
    // word (pair, group, parity) of one 16-scale vector <- lane (2 pair + parity) * per_row + group
    QPKV_UNROLL
    for (int o = 0; o < 16; ++o) {
      const int pr = o / (2 * static_cast<int>(per_row)), gr = (o / 2) % static_cast<int>(per_row), par = o % 2;
      words[o] = (2 * pr + par) * static_cast<int>(per_row) + gr;
    }
    // the same for two vectors a, b after packs(a, b): lane l of a is word 8 (l / 4) + l % 4, of b 4 more
    for (int o = 0; o < 32; ++o) {
      const int l = words[o % 16];
      words2[o] = static_cast<std::int16_t>(8 * (l / 4) + 4 * (o / 16) + l % 4);
    }
    vwords = _mm512_cvtepi32_epi16(_mm512_load_si512(words));
    vwords2 = _mm512_load_si512(words2);
    wq.resize(static_cast<std::size_t>(nq * (N / 2) * per_row + 16));
    step.resize(static_cast<std::size_t>(nq * per_row + 16));
    mterm.resize(step.size());
    tmp.resize(static_cast<std::size_t>(D));
  }

  /// Folds, rounds and pairs the weights of nq queries (p[i * pstride + t]) for the n tokens of a
  /// pass (whole blocks); S, M: their scales and mins from value_params().
  QPKV_NOINLINE QPKV_TARGET void weights(const float* S, const float* M, const float* p, index_t pstride, index_t nq, index_t n) {
    for_query_tiles(
        nq, [&](index_t i) { weights_tile<4>(S, M, p, pstride, i, n); },
        [&](index_t i) { weights_tile<2>(S, M, p, pstride, i, n); }, [&](index_t i) { weights_tile<1>(S, M, p, pstride, i, n); });
  }

  /// weights() for queries i0 .. i0 + NQ - 1. The scales and mins are loaded once for the NQ
  /// queries and the folded weights p_t s_tg are recomputed in the rounding loop instead of being
  /// stored and reloaded (one query at a time with a scratch row of folded weights before: 2K
  /// tokens, 1 thread, 0.353 -> 0.348 ms; this stage is ~10% of the fast kernel).
  template <int NQ>
  QPKV_TARGET void weights_tile(const float* S, const float* M, const float* p, index_t pstride, index_t i0, index_t n) {
    const index_t nv = n * per_row / 16, tz = tpz;  // locals: the stores below may alias *this
    const __mmask16 tm = tail_mask(tz);
    const __m512i tok = vtok;
    const float* pq[NQ];
    __m512 mx[NQ], mt[NQ], inv[NQ];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      pq[i] = p + (i0 + i) * pstride;
      mx[i] = mt[i] = _mm512_setzero_ps();
    }
    for (index_t v = 0; v < nv; ++v) {
      const __m512 s = _mm512_loadu_ps(S + v * 16), m = _mm512_loadu_ps(M + v * 16);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m512 P = _mm512_permutexvar_ps(tok, _mm512_maskz_loadu_ps(tm, pq[i] + v * tz));
        mx[i] = _mm512_max_ps(mx[i], _mm512_mul_ps(P, s));
        mt[i] = _mm512_fmadd_ps(P, m, mt[i]);
      }
    }
    const __mmask16 gm = tail_mask(per_row);
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      for (index_t sh = per_row; sh < 16; sh *= 2) {  // lanes of one group are per_row apart
        mx[i] = _mm512_max_ps(mx[i], rotate_lanes(mx[i], sh));
        mt[i] = _mm512_add_ps(mt[i], rotate_lanes(mt[i], sh));
      }
      _mm512_mask_storeu_ps(step.data() + (i0 + i) * per_row, gm, _mm512_mul_ps(mx[i], _mm512_set1_ps(1.0f / 32767.0f)));
      _mm512_mask_storeu_ps(mterm.data() + (i0 + i) * per_row, gm, mt[i]);
      // inverse step per lane (lane l is group l % per_row); 0 where a group's weights are all 0.
      // W * inv <= 32767 up to float rounding; packs saturates to int16 in any case.
      inv[i] = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(mx[i], _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(32767.0f), mx[i]);
    }
    std::int32_t* out[NQ];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) out[i] = wq.data() + (i0 + i) * (N / 2) * per_row;
    const __m512i w2 = vwords2;
    index_t v = 0;
    for (; v + 2 <= nv; v += 2) {  // two vectors: one saturating pack, one word permutation
      const __m512 s0 = _mm512_loadu_ps(S + v * 16), s1 = _mm512_loadu_ps(S + v * 16 + 16);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m512 P0 = _mm512_permutexvar_ps(tok, _mm512_maskz_loadu_ps(tm, pq[i] + v * tz));
        const __m512 P1 = _mm512_permutexvar_ps(tok, _mm512_maskz_loadu_ps(tm, pq[i] + (v + 1) * tz));
        const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(P0, s0), inv[i]));
        const __m512i b = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(P1, s1), inv[i]));
        _mm512_storeu_si512(out[i] + v * 8, _mm512_permutexvar_epi16(w2, _mm512_packs_epi32(a, b)));
      }
    }
    if (v < nv) {
      const __m512 s0 = _mm512_loadu_ps(S + v * 16);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m512 P0 = _mm512_permutexvar_ps(tok, _mm512_maskz_loadu_ps(tm, pq[i] + v * tz));
        const __m512i a = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(P0, s0), inv[i]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i] + v * 8), _mm256_permutexvar_epi16(vwords, _mm512_cvtsepi32_epi16(a)));
      }
    }
  }

  /// acc[i] (slab order) += the pass's p.v for NQ queries; weights() was called for this pass.
  /// codes: the first block's value codes, the next block's bstride bytes further; n tokens.
  template <int NQ>
  QPKV_TARGET_VNNI void accumulate(const std::uint8_t* codes, std::size_t row, std::size_t bstride, index_t n, index_t qi,
                                   float* acc, Prefetch& pf) const {
    for (index_t u = 0; u < D / U; ++u) {
      if (uniform[u] != 0) slab<NQ, true>(codes, row, bstride, n, qi, u, acc, pf);
      else slab<NQ, false>(codes, row, bstride, n, qi, u, acc, pf);
    }
  }

  /// accumulate() for slab u; Uni: all its lanes in one group (one broadcast weight per query).
  /// Uni is a template parameter so that the token loop is one basic block: with the choice made
  /// inside the loop GCC 12 copied every accumulator in and out of a spare register around each
  /// vpdpwssd (two moves per dot product).
  template <int NQ, bool Uni>
  QPKV_NOINLINE QPKV_TARGET_VNNI void slab(const std::uint8_t* codes, std::size_t row, std::size_t bstride, index_t n,
                                           index_t qi, index_t u, float* acc, Prefetch& pfr) const {
    Prefetch pf = pfr;  // in registers for the loop
    const __m512i mask = _mm512_set1_epi32(((1 << VB) - 1) | (((1 << VB) - 1) << 16));
    const std::size_t pair_dw = static_cast<std::size_t>(per_row);
    const std::size_t qstride = static_cast<std::size_t>(N / 2) * pair_dw;
    const index_t g0 = slab_g0[u];
    const __m512i lg = _mm512_loadu_si512(lane_grp.data() + u * 16);
    __m512i a[NQ][per];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i)
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) a[i][k] = _mm512_setzero_si512();
    const std::int32_t* wt = wq.data() + static_cast<std::size_t>(qi) * qstride + g0;
    for (index_t b0 = 0; b0 < n; b0 += B, codes += bstride) {
      const std::uint8_t* r0 = codes + u * 16;
      for (index_t t = 0; t < B; t += 2, r0 += 2 * row, wt += pair_dw) {
        pf.step_branchless();
        const __m512i x = _mm512_or_si512(
            _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0))),
            _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + row))), 16));
        __m512i c[per];
        QPKV_UNROLL
        for (int k = 0; k < per; ++k) c[k] = VB == 8 ? x : _mm512_and_si512(k == 0 ? x : _mm512_srli_epi32(x, k * VB), mask);
        QPKV_UNROLL
        for (int i = 0; i < NQ; ++i) {
          const std::int32_t* wi = wt + static_cast<std::size_t>(i) * qstride;
          __m512i w;
          if constexpr (Uni) w = _mm512_set1_epi32(*wi);
          else w = _mm512_permutexvar_epi32(lg, _mm512_loadu_si512(wi));
          QPKV_UNROLL
          for (int k = 0; k < per; ++k) a[i][k] = dpwssd(a[i][k], c[k], w);
        }
      }
    }
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) {
      const float* st = step.data() + (qi + i) * per_row + g0;
      const float* mt = mterm.data() + (qi + i) * per_row + g0;
      __m512 sv, mv;
      if constexpr (Uni) {
        sv = _mm512_set1_ps(*st);
        mv = _mm512_set1_ps(*mt);
      } else {
        sv = _mm512_permutexvar_ps(lg, _mm512_loadu_ps(st));
        mv = _mm512_permutexvar_ps(lg, _mm512_loadu_ps(mt));
      }
      float* o = acc + (qi + i) * D + u * U;
      QPKV_UNROLL
      for (int k = 0; k < per; ++k)
        _mm512_storeu_ps(o + 16 * k, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a[i][k]), sv,
                                                     _mm512_add_ps(_mm512_loadu_ps(o + 16 * k), mv)));
    }
    pfr = pf;
  }

  /// Slab order -> natural channel order, in place, for g rows of D.
  QPKV_TARGET void natural_order(float* acc, index_t g) {
    for (index_t i = 0; i < g; ++i) {
      float* a = acc + i * D;
      for (index_t u = 0; u < D / U; ++u)
        for (int k = 0; k < per; ++k)
          for (int j = 0; j < 16; ++j) tmp[u * U + per * j + k] = a[u * U + 16 * k + j];
      std::copy(tmp.begin(), tmp.end(), a);
    }
  }
};
#endif

/// Per key group: the query with the group's per-channel scales folded in, in the layout the key
/// kernel reads, and the constant term sum_c q_c (m_c + centre * s_c), centre = 2^(b-1). The g
/// queries are folded four at a time with their chains interleaved (one query at a time, the
/// reductions and divisions made this a latency-bound ~15% of the kernel). In the fast path the
/// query is kept in the byte order of qhi / qlo (permuted once per work item) and each group's
/// scales and mins are permuted the same way, so the integer query needs no permutation per query
/// and group, and four vectors of it become bytes with three saturating packs.
template <int KB>
struct KeyFold {
  static constexpr int cpd = 32 / KB;                       // channels per dword
  static constexpr int per = 8 / KB;
  static constexpr float centre = static_cast<float>(1 << (KB - 1));  // integer, so code - centre is exact
  index_t g = 0, D = 0;
  bool fast = false;
  std::vector<float> qs;            // [i][c]: exact: natural channel order; fast: qhi's byte order
  std::vector<float> qp;            // fast: the queries in qhi's byte order
  const float* q = nullptr;         // the g x D pre-scaled queries
  std::vector<std::int32_t> qhi;    // fast: [i][dword][k] packed 4 x int8 (byte j = channel dword*cpd + j*per + k)
  std::vector<std::int32_t> qlo;
  std::vector<float> step;          // fast: [i] value of one integer unit
  std::vector<float> bias;          // [i]
  std::vector<float> sf, mf;        // scratch: the group's scales and mins as float (fast: permuted)
  __m512i vorder{};                 // lane order of 16 channels in qhi / qlo
  __m512i vpack{};                  // dword order after packing four vectors to bytes

  /// q: the g x D pre-scaled queries of the work item.
  QPKV_TARGET KeyFold(index_t g_, index_t D_, bool fast_, const float* q_) : g(g_), D(D_), fast(fast_), q(q_) {
    sf.resize(static_cast<std::size_t>(D));
    mf.resize(static_cast<std::size_t>(D));
    qs.resize(static_cast<std::size_t>(g * D));
    bias.resize(static_cast<std::size_t>(g) + 4);
    step.resize(static_cast<std::size_t>(g) + 4);
    qhi.resize(static_cast<std::size_t>(g * (D / cpd) * per));
    qlo.resize(qhi.size());
    alignas(64) std::int32_t order[16], pk[16];
    QPKV_UNROLL
    for (int o = 0; o < 16; ++o) {
      const int w = o / (4 * per), k = (o / 4) % per, j = o % 4;
      order[o] = w * cpd + j * per + k;
      // packs_epi16(packs_epi32(v0, v1), packs_epi32(v2, v3)) puts lanes 4L..4L+3 of vector n in
      // dword 4L + n; output dword o is lanes 4 (o % 4).. of vector o / 4
      pk[o] = 4 * (o % 4) + o / 4;
    }
    vorder = _mm512_load_si512(order);
    vpack = _mm512_load_si512(pk);
    if (fast && per > 1) {  // the queries in qhi's byte order, once per work item
      qp.resize(qs.size());
      for (index_t e = 0; e < g * D; e += 16)
        _mm512_storeu_ps(qp.data() + e, _mm512_permutexvar_ps(vorder, _mm512_loadu_ps(q + e)));
    }
  }

  /// Out of line: inlined into kivi_item (once fold_tile took its loops), the 32K-token fast
  /// KIVI-4 kernel was 8-9% slower (qpkv_bench --compare, 10 rounds, 1 and 2 threads).
  QPKV_NOINLINE QPKV_TARGET void fold(const std::uint16_t* sc, const std::uint16_t* mn) {
    float* __restrict s_f = sf.data();
    float* __restrict m_f = mf.data();
    const bool permute = fast && per > 1;
    const __m512 vc = _mm512_set1_ps(fast ? 0.0f : centre);
    const __m512i vo = vorder;
    for (index_t c = 0, Dn = D; c < Dn; c += 16) {
      __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sc + c)));
      // m + centre * s: the code is stored uncentred in the fast path, centred (exactly) in the exact one
      __m512 m = _mm512_fmadd_ps(vc, s, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mn + c))));
      if (permute) {
        s = _mm512_permutexvar_ps(vo, s);
        m = _mm512_permutexvar_ps(vo, m);
      }
      _mm512_storeu_ps(s_f + c, s);
      _mm512_storeu_ps(m_f + c, m);
    }
    for_query_tiles(
        g, [&](index_t i) { fold_tile<4>(i); }, [&](index_t i) { fold_tile<2>(i); }, [&](index_t i) { fold_tile<1>(i); });
  }

  /// fold() for queries i0 .. i0 + NQ - 1, the group's scales and mins already in sf / mf. NQ is a
  /// compile-time constant and the members are read into locals once: with a run-time query count
  /// and member reads inside the loops (the stores may alias them) GCC 12 kept the maxima and sums
  /// on the stack and re-read D in every iteration (2.2x slower, 390 cycles per group of 4 queries).
  template <int NQ>
  QPKV_TARGET void fold_tile(index_t i0) {
    const index_t Dn = D, dwords = D / cpd;
    const float* __restrict s_f = sf.data();
    const float* __restrict m_f = mf.data();
    float* __restrict q_s = qs.data() + i0 * Dn;
    const float* __restrict qq = (fast && per > 1 ? qp.data() : q) + i0 * Dn;
    __m512 b[4], mx[4];
    QPKV_UNROLL
    for (int i = 0; i < 4; ++i) b[i] = mx[i] = _mm512_setzero_ps();
    for (index_t c = 0; c < Dn; c += 16) {
      const __m512 sv = _mm512_loadu_ps(s_f + c), mv = _mm512_loadu_ps(m_f + c);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m512 qv = _mm512_loadu_ps(qq + i * Dn + c);
        const __m512 x = _mm512_mul_ps(qv, sv);
        if (!fast) _mm512_storeu_ps(q_s + i * Dn + c, x);  // the fast path recomputes x below
        mx[i] = _mm512_range_ps(mx[i], x, 0x0B);  // max(|mx|, |x|) with the sign cleared
        b[i] = _mm512_fmadd_ps(qv, mv, b[i]);
      }
    }
    alignas(16) float bs[4];
    _mm_store_ps(bs, hsum4(b[0], b[1], b[2], b[3]));
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) bias[i0 + i] = bs[i];
    if (!fast) return;
    // integer query: Q = round(qs / step) in [-32639, 32639] = 256 hi + lo, hi = (Q + 128) >> 8
    // in [-127, 127], lo = Q - 256 hi in [-128, 127]; qs is already in qhi / qlo's byte order
    const __m128 m4 = hmax4(mx[0], mx[1], mx[2], mx[3]);
    const __m128 pos = _mm_cmpgt_ps(m4, _mm_setzero_ps());
    const __m128 st = _mm_blendv_ps(_mm_set1_ps(1.0f), _mm_mul_ps(m4, _mm_set1_ps(1.0f / 32639.0f)), pos);
    alignas(16) float st4[4], inv4[4];
    _mm_store_ps(st4, st);
    _mm_store_ps(inv4, _mm_div_ps(_mm_set1_ps(1.0f), st));
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) step[i0 + i] = st4[i];
    const __m512i k128 = _mm512_set1_epi32(128), k128w = _mm512_set1_epi16(128), vpk = vpack;
    __m512 inv[NQ];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) inv[i] = _mm512_set1_ps(inv4[i]);
    const std::size_t qrow = static_cast<std::size_t>(dwords * per) * 4;  // bytes of one query's qhi
    auto* dh = reinterpret_cast<std::uint8_t*>(qhi.data()) + static_cast<std::size_t>(i0) * qrow;
    auto* dl = reinterpret_cast<std::uint8_t*>(qlo.data()) + static_cast<std::size_t>(i0) * qrow;
    // (q s) / step recomputed per 64 channels (the same floats as storing q s in the first loop
    // and reading it back, and no slower), the scales loaded once for the NQ queries
    index_t c = 0;
    for (; c + 64 <= Dn; c += 64) {
      __m512 sv[4];
      QPKV_UNROLL
      for (int v = 0; v < 4; ++v) sv[v] = _mm512_loadu_ps(s_f + c + 16 * v);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        // |Q| <= 32639 fits int16: split after the first pack, on half as many vectors
        __m512i Q[4], H[2], Lo[2];
        QPKV_UNROLL
        for (int v = 0; v < 4; ++v)
          Q[v] = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(qq + i * Dn + c + 16 * v), sv[v]), inv[i]));
        QPKV_UNROLL
        for (int v = 0; v < 2; ++v) {
          const __m512i W = _mm512_packs_epi32(Q[2 * v], Q[2 * v + 1]);
          H[v] = _mm512_srai_epi16(_mm512_add_epi16(W, k128w), 8);
          Lo[v] = _mm512_sub_epi16(W, _mm512_slli_epi16(H[v], 8));
        }
        _mm512_storeu_si512(dh + i * qrow + c, _mm512_permutexvar_epi32(vpk, _mm512_packs_epi16(H[0], H[1])));
        _mm512_storeu_si512(dl + i * qrow + c, _mm512_permutexvar_epi32(vpk, _mm512_packs_epi16(Lo[0], Lo[1])));
      }
    }
    for (; c < Dn; c += 16) {
      const __m512 sv = _mm512_loadu_ps(s_f + c);
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) {
        const __m512i Q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(qq + i * Dn + c), sv), inv[i]));
        const __m512i H = _mm512_srai_epi32(_mm512_add_epi32(Q, k128), 8);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dh + i * qrow + c), _mm512_cvtepi32_epi8(H));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dl + i * qrow + c),
                         _mm512_cvtepi32_epi8(_mm512_sub_epi32(Q, _mm512_slli_epi32(H, 8))));
      }
    }
  }
};

/// Logits of 16 tokens (code rows at `codes`, `row` bytes apart) for NQ queries starting at qi:
/// logits[(qi + i) * lstride + t]. Exact float path.
template <int KB, int NQ>
QPKV_TARGET void key_tile_exact(const std::uint8_t* codes, std::size_t row, index_t D, const KeyFold<KB>& f, index_t qi,
                    float* logits, index_t lstride, Prefetch& pf) {
  constexpr int cpd = 32 / KB;
  const index_t dwords = D / cpd;
  const __m512i mask = _mm512_set1_epi32((1 << KB) - 1);
  const __m512i magic = _mm512_set1_epi32(0x4B000000);  // 2^23 | code is the float 2^23 + code
  const __m512 off = _mm512_set1_ps(8388608.0f + KeyFold<KB>::centre);
  __m512 acc[NQ];
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i) acc[i] = _mm512_setzero_ps();
  const float* qs = f.qs.data() + qi * D;
  for (index_t w0 = 0; w0 < dwords; w0 += 16) {
    const index_t nw = std::min<index_t>(16, dwords - w0);
    const __mmask16 mk = tail_mask(nw);
    __m512i r[16];
    QPKV_UNROLL
    for (int t = 0; t < 16; ++t) r[t] = _mm512_maskz_loadu_epi32(mk, codes + t * row + w0 * 4);
    transpose16(r);
    // one pointer per query: with qs[(w0 + w) * cpd + i * D + e] GCC 12 kept an index register per
    // (query, channel) and spilled them (2K-4K tokens, 1 thread: 2-4% slower)
    const float* qr[NQ];
    QPKV_UNROLL
    for (int i = 0; i < NQ; ++i) qr[i] = qs + i * D + w0 * cpd;
    for (index_t w = 0; w < nw; ++w) {
      pf.step();
      const __m512i col = r[w];
      QPKV_UNROLL
      for (int e = 0; e < cpd; ++e) {
        const __m512i c = _mm512_ternarylogic_epi32(_mm512_srli_epi32(col, e * KB), mask, magic, 0xEA);
        const __m512 x = _mm512_sub_ps(_mm512_castsi512_ps(c), off);
        QPKV_UNROLL
        for (int i = 0; i < NQ; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(qr[i][e]), x, acc[i]);
      }
      QPKV_UNROLL
      for (int i = 0; i < NQ; ++i) qr[i] += cpd;
    }
  }
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i)
    _mm512_storeu_ps(logits + (qi + i) * lstride, _mm512_add_ps(acc[i], _mm512_set1_ps(f.bias[qi + i])));
}

#if defined(QPKV_CPU_AVX512VNNI)
/// As key_tile_exact, with vpdpbusd on the integer query (AttendPrecision::fast).
template <int KB, int NQ>
QPKV_TARGET_VNNI void key_tile_fast(const std::uint8_t* codes, std::size_t row, index_t D, const KeyFold<KB>& f, index_t qi,
                   float* logits, index_t lstride, Prefetch& pf) {
  constexpr int cpd = 32 / KB, per = 8 / KB;
  const index_t dwords = D / cpd;
  const __m512i bmask = _mm512_set1_epi8(static_cast<char>((1 << KB) - 1));
  __m512i hi[NQ], lo[NQ];
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i) hi[i] = lo[i] = _mm512_setzero_si512();
  for (index_t w0 = 0; w0 < dwords; w0 += 16) {
    const index_t nw = std::min<index_t>(16, dwords - w0);
    const __mmask16 mk = tail_mask(nw);
    __m512i r[16];
    QPKV_UNROLL
    for (int t = 0; t < 16; ++t) r[t] = _mm512_maskz_loadu_epi32(mk, codes + t * row + w0 * 4);
    transpose16(r);
    for (index_t w = 0; w < nw; ++w) {
      pf.step_branchless();
      const __m512i col = r[w];
      QPKV_UNROLL
      for (int k = 0; k < per; ++k) {
        const __m512i c = KB == 8 ? col : _mm512_and_si512(_mm512_srli_epi32(col, k * KB), bmask);
        QPKV_UNROLL
        for (int i = 0; i < NQ; ++i) {
          const std::size_t at = static_cast<std::size_t>(((qi + i) * dwords + w0 + w) * per + k);
          hi[i] = dpbusd(hi[i], c, _mm512_set1_epi32(f.qhi[at]));
          lo[i] = dpbusd(lo[i], c, _mm512_set1_epi32(f.qlo[at]));
        }
      }
    }
  }
  QPKV_UNROLL
  for (int i = 0; i < NQ; ++i) {
    const __m512 x = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi[i]), _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(lo[i]));
    _mm512_storeu_ps(logits + (qi + i) * lstride,
                     _mm512_fmadd_ps(x, _mm512_set1_ps(f.step[qi + i]), _mm512_set1_ps(f.bias[qi + i])));
  }
}
#endif

/// One work item over a KIVI cache: blocks [b0, b1) of head h, then the residual if asked.
template <int KB, int VB>
QPKV_TARGET void kivi_item(const CacheState& st, const AffineLayout& kl, const AffineLayout& vl, index_t key_group,
               const ValuePlan<VB>& plan, index_t h, index_t b0, index_t b1, bool residual, const float* q,
               const Partial& p, bool fast) {
  const CacheLayout& L = st.layout;
  const index_t D = L.head_dim, B = L.block_tokens, g = L.q_heads / L.kv_heads;
#if !defined(QPKV_CPU_AVX512VNNI)
  fast = false;
#endif
  const index_t C = fast ? std::max<index_t>(1, kPassTokens / B) : 1;  // blocks per pass
  const index_t NB = C * B;                                            // logits row stride
  std::vector<float> logits(static_cast<std::size_t>(g * NB));
  std::vector<float> sf(static_cast<std::size_t>(NB * plan.per_row + 16)), mf(sf.size());
  KeyFold<KB> fold(g, D, fast, q);
#if defined(QPKV_CPU_AVX512VNNI)
  ValueFast<VB> vf(plan, B, NB, g);
  const bool fast_values = fast && vf.ok;
  const bool folded_values = plan.folded && !fast_values;
#else
  const bool folded_values = plan.folded;
#endif
  std::vector<float> wb(folded_values ? static_cast<std::size_t>(4 * B * plan.per_row) : 0);  // value_block_folded()
  const std::size_t bb = L.block_bytes();
  Prefetch pf;
  pf.next = st.data + L.block_offset(h, b0);
  for (index_t pb = b0; pb < b1; pb += C) {
    const index_t nb = std::min(C, b1 - pb), n = nb * B;
    const std::uint8_t* first = st.data + L.block_offset(h, pb);
    // prefetch window: the next pass, up to the item's end
    pf.stop = first + std::min<index_t>(nb + C, b1 - pb) * bb;
    pf.next = std::max(pf.next, first + nb * bb);
    // keys
    for (index_t j = 0; j < nb; ++j) {
      const std::uint8_t* block = first + j * bb;
      // the translation of the page of block j + C + 1 (one past the prefetch window), fetched by
      // a demand load (its value is not used)
      if (pb + j + C + 1 < b1) (void)*reinterpret_cast<const volatile std::uint8_t*>(block + (C + 1) * bb);
      const auto* sc = reinterpret_cast<const std::uint16_t*>(block + kl.scales);
      const auto* mn = reinterpret_cast<const std::uint16_t*>(block + kl.mins);
      for (index_t gt = 0; gt < B / key_group; ++gt) {
        fold.fold(sc + gt * D, mn + gt * D);
        for (index_t t0 = gt * key_group; t0 < (gt + 1) * key_group; t0 += 16) {
          const std::uint8_t* codes = block + kl.codes + static_cast<std::size_t>(t0) * kl.row_bytes;
          float* lg = logits.data() + j * B + t0;
#if defined(QPKV_CPU_AVX512VNNI)
          if (fast) {
            for_query_tiles(
                g, [&](index_t i) { key_tile_fast<KB, 4>(codes, kl.row_bytes, D, fold, i, lg, NB, pf); },
                [&](index_t i) { key_tile_fast<KB, 2>(codes, kl.row_bytes, D, fold, i, lg, NB, pf); },
                [&](index_t i) { key_tile_fast<KB, 1>(codes, kl.row_bytes, D, fold, i, lg, NB, pf); });
            continue;
          }
#endif
          for_query_tiles(
              g, [&](index_t i) { key_tile_exact<KB, 4>(codes, kl.row_bytes, D, fold, i, lg, NB, pf); },
              [&](index_t i) { key_tile_exact<KB, 2>(codes, kl.row_bytes, D, fold, i, lg, NB, pf); },
              [&](index_t i) { key_tile_exact<KB, 1>(codes, kl.row_bytes, D, fold, i, lg, NB, pf); });
        }
      }
    }
    softmax_step(logits.data(), n, NB, g, D, p);
    // values
    for (index_t j = 0; j < nb; ++j)
      value_params(first + j * bb + L.key_part, vl, B * plan.per_row, sf.data() + j * B * plan.per_row,
                   mf.data() + j * B * plan.per_row);
#if defined(QPKV_CPU_AVX512VNNI)
    if (fast_values) {
      vf.weights(sf.data(), mf.data(), logits.data(), NB, g, n);
      const std::uint8_t* vc = first + L.key_part + vl.codes;
      for_query_tiles(
          g, [&](index_t i) { vf.template accumulate<4>(vc, vl.row_bytes, bb, n, i, p.acc, pf); },
          [&](index_t i) { vf.template accumulate<2>(vc, vl.row_bytes, bb, n, i, p.acc, pf); },
          [&](index_t i) { vf.template accumulate<1>(vc, vl.row_bytes, bb, n, i, p.acc, pf); });
      continue;
    }
#endif
    for (index_t j = 0; j < nb; ++j) {
      const std::uint8_t* vpart = first + j * bb + L.key_part;
      const float* lj = logits.data() + j * B;
      const float* sj = sf.data() + j * B * plan.per_row;
      const float* mj = mf.data() + j * B * plan.per_row;
      if (folded_values) {
        for_query_tiles(
            g, [&](index_t i) { value_block_folded<VB, 4>(vpart, vl, B, plan, lj + i * NB, NB, p.acc + i * D, sj, mj, wb.data(), pf); },
            [&](index_t i) { value_block_folded<VB, 2>(vpart, vl, B, plan, lj + i * NB, NB, p.acc + i * D, sj, mj, wb.data(), pf); },
            [&](index_t i) { value_block_folded<VB, 1>(vpart, vl, B, plan, lj + i * NB, NB, p.acc + i * D, sj, mj, wb.data(), pf); });
        continue;
      }
      for_query_tiles(
          g, [&](index_t i) { value_block<VB, 4>(vpart, vl, B, plan, lj + i * NB, NB, p.acc + i * D, sj, mj, pf); },
          [&](index_t i) { value_block<VB, 2>(vpart, vl, B, plan, lj + i * NB, NB, p.acc + i * D, sj, mj, pf); },
          [&](index_t i) { value_block<VB, 1>(vpart, vl, B, plan, lj + i * NB, NB, p.acc + i * D, sj, mj, pf); });
    }
  }
#if defined(QPKV_CPU_AVX512VNNI)
  if (fast_values) vf.natural_order(p.acc, g);
#endif
  if (folded_values) slice_to_natural<VB>(p.acc, g, D);
  if (residual && st.residual > 0) {
    const std::uint8_t* rk = st.data + L.residual_key_offset(h, 0);
    const std::uint8_t* rv = st.data + L.residual_value_offset(h, 0);
    fp16_tokens(rk, static_cast<std::size_t>(D) * 2, rv, static_cast<std::size_t>(D) * 2, st.residual, D, q, g, p);
  }
}

}  // namespace qpkv::cpu::avx512

QPKV_INTRINSICS_WARNINGS_ON

#endif  // QPKV_CPU_AVX512_KERNELS
