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
// Kernels: where the AVX-512 kernels are usable (compiled for the target, or chosen at run time
// on a CPU that has AVX-512 + VNNI: simd.hpp), KIVI-layout caches (per-channel Affine keys,
// per-token Affine values, fp16 scales, no outliers; 2/4/8 bits) and Fp16 caches run the kernels
// of attend_avx512.hpp; where those do not run (no AVX-512, QPKV_CPU=avx2, shapes they do not
// cover) the same layouts run the AVX2 kernels of attend_avx2.hpp where the CPU has AVX2 + FMA;
// everything else runs the portable C++ kernels of attend_portable.inl, which compilers vectorize
// for the build's target (and, in x86-64 dispatch builds, a second copy for AVX2 chosen at run
// time). AttendPrecision::fast selects the VNNI integer products (precision.hpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "qpkv/backend/cpu/attend_avx2.hpp"
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

}  // namespace qpkv::cpu

// The portable kernels: compiled for the build's target (detail), and on x86-64 dispatch builds
// whose target lacks AVX2 once more for AVX2 + FMA + F16C (detail_avx2), which attend() runs on
// CPUs that have AVX2 but not AVX-512 (simd.hpp). Nothing is #included inside the target region.
#define QPKV_PORTABLE_NS detail
#include "qpkv/backend/cpu/attend_portable.inl"
#undef QPKV_PORTABLE_NS
#if defined(QPKV_CPU_AVX2_COPY)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define QPKV_PORTABLE_NS detail_avx2
#include "qpkv/backend/cpu/attend_portable.inl"
#undef QPKV_PORTABLE_NS
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif

namespace qpkv::cpu {

/// Tokens per split-K work item (rounded to whole blocks). Fixed, so results do not depend on the
/// thread count; 2048 gives 8 heads x 16 items at 32K tokens, enough to keep two cores balanced.
inline constexpr index_t kChunkTokens = 2048;

namespace detail {

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
  enum class Kernel { portable, kivi, fp16, kivi_avx2, fp16_avx2 };
  Kernel kernel = Kernel::portable;
  [[maybe_unused]] AffineLayout kl{}, vl{};
#if defined(QPKV_CPU_AVX512_KERNELS)
  // run-time dispatch on a CPU without AVX-512 (simd.hpp): asked before anything else, so that no
  // AVX-512 code runs there
  if (avx512_usable()) {
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
  }
#endif
#if defined(QPKV_CPU_AVX2_KERNELS)
  // no AVX-512 kernel for this call (no AVX-512, QPKV_CPU=avx2, or a shape only the 8-lane
  // kernels cover, e.g. key groups of 8): the AVX2 kernels where they apply
  if (kernel == Kernel::portable && avx2_kernels_usable() && (st.residual == 0 || avx2::fp16_supported(D))) {
    if constexpr (detail::affine_half<KQ>::value && detail::affine_half<VQ>::value) {
      kl = kq.layout(B, D);
      vl = vq.layout(B, D);
      if (kq.axis == Axis::channel && vq.axis == Axis::token && kl.slots == 0 && vl.slots == 0 &&
          avx2::kivi_supported<KQ::bits, VQ::bits>(B, D, kq.group, vq.group))
        kernel = Kernel::kivi_avx2;
    } else if constexpr (std::is_same_v<KQ, Fp16> && std::is_same_v<VQ, Fp16>) {
      if (avx2::fp16_supported(D) && L.key_part == static_cast<std::size_t>(D) * 2) kernel = Kernel::fp16_avx2;
    }
  }
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
#if defined(QPKV_CPU_AVX512_KERNELS)
    const Partial p{m, l, acc};
    if constexpr (detail::affine_half<KQ>::value && detail::affine_half<VQ>::value) {
      if (kernel == Kernel::kivi) {
        const avx512::ValuePlan<VQ::bits> plan(D, vq.group, st.layout.block_tokens);
        avx512::kivi_item<KQ::bits, VQ::bits>(st, kl, vl, kq.group, plan, h, b0, b1, with_residual, qh, p,
                                              precision == AttendPrecision::fast && avx512_vnni_usable());
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
#if defined(QPKV_CPU_AVX2_KERNELS)
    if constexpr (detail::affine_half<KQ>::value && detail::affine_half<VQ>::value) {
      if (kernel == Kernel::kivi_avx2) {
        const avx2::ValuePlan<VQ::bits> plan(D, vq.group);
        avx2::kivi_item<KQ::bits, VQ::bits>(st, kl, vl, kq.group, plan, h, b0, b1, with_residual, qh, Partial{m, l, acc},
                                            precision == AttendPrecision::fast);
        return;
      }
    } else if constexpr (std::is_same_v<KQ, Fp16> && std::is_same_v<VQ, Fp16>) {
      if (kernel == Kernel::fp16_avx2) {
        const std::uint8_t* first = st.data + L.block_offset(h, b0);
        avx2::fp16_tokens(first, L.block_bytes(), first + L.key_part, L.block_bytes(), b1 - b0, D, qh, g, Partial{m, l, acc});
        if (with_residual && st.residual > 0)
          avx2::fp16_tokens(st.data + L.residual_key_offset(h, 0), static_cast<std::size_t>(D) * 2,
                            st.data + L.residual_value_offset(h, 0), static_cast<std::size_t>(D) * 2, st.residual, D,
                            qh, g, Partial{m, l, acc});
        return;
      }
    }
#endif
#if defined(QPKV_CPU_AVX2_COPY)
    if (avx2_usable()) {
      detail_avx2::item_portable(kq, vq, st, h, b0, b1, with_residual, qh, m, l, acc);
      return;
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
