// qpkv/quant/affine_quantizer.hpp - Affine<Bits>: asymmetric min-max group quantization (KIVI's
// rule), optionally with HQQ's zero-point refinement and dense-and-sparse outliers.
//
// A group shares one (scale, min) pair: x' = code * scale + min. Along Axis::channel a group is
// `group` consecutive tokens of one channel (KIVI keys); along Axis::token it is `group` consecutive
// channels of one token (KIVI values; the last group of a row is shorter when head_dim is not a
// multiple of `group`). Scales and mins are stored as ScaleT (fp16 by default).
//
// Part layout (tokens T, head_dim D, P = number of groups; all offsets little-endian):
//   [ scales: P x ScaleT ][ mins: P x ScaleT ] pad4 [ codes: T rows x ceil(D*Bits/8) bytes ] pad4
//   [ outlier index: S x uint32 ][ outlier value: S x float32 ] pad4
// with P = (T/group) x D ordered [token-group][channel] for Axis::channel, and T x ceil(D/group)
// ordered [token][channel-group] for Axis::token. Codes are packed per token row by pack.hpp.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "qpkv/core/dtype.hpp"
#include "qpkv/quant/affine.hpp"
#include "qpkv/quant/affine_fast.hpp"
#include "qpkv/quant/hqq.hpp"
#include "qpkv/quant/outliers.hpp"
#include "qpkv/quant/pack.hpp"
#include "qpkv/quant/quantizer.hpp"

namespace qpkv {

/// How a group's zero point is chosen.
enum class ZeroPoint {
  minmax,  ///< min = group minimum (KIVI; also HQQ with optimize=False)
  hqq,     ///< HQQ's proximal solver refines the zero point (HQQ with optimize=True)
};

/// Byte offsets inside one part; see the layout in the header comment.
struct AffineLayout {
  std::size_t params = 0;       ///< number of (scale, min) pairs
  std::size_t scales = 0;       ///< offset of scales
  std::size_t mins = 0;         ///< offset of mins
  std::size_t codes = 0;        ///< offset of the first code row
  std::size_t row_bytes = 0;    ///< bytes of one packed token row
  std::size_t outlier_idx = 0;  ///< offset of outlier indices
  std::size_t outlier_val = 0;  ///< offset of outlier values
  std::size_t slots = 0;        ///< outlier slots
  std::size_t bytes = 0;        ///< total, a multiple of 4
};

template <int Bits, ScaleStorage ScaleT = half>
struct Affine {
  static_assert(Bits == 1 || Bits == 2 || Bits == 3 || Bits == 4 || Bits == 8,
                "qpkv::Affine<Bits>: Bits must be one of 1, 2, 3, 4, 8 (use qpkv::Fp16 for 16-bit storage)");
  static constexpr int bits = Bits;
  using scale_type = ScaleT;

  Axis axis = Axis::automatic;  ///< resolved by the cache: channel for keys, token for values
  index_t group = 32;           ///< elements per group along the axis (KIVI: 32; paper's runs: 64)
  ZeroPoint zero_point = ZeroPoint::minmax;
  HqqParams hqq{};              ///< used when zero_point == ZeroPoint::hqq
  OutlierRule outliers{};       ///< dense-and-sparse outliers (off by default)

  static constexpr std::uint32_t maxc = quant::max_code(Bits);

  [[nodiscard]] index_t group_tokens() const { return axis == Axis::channel ? group : 1; }

  [[nodiscard]] AffineLayout layout(index_t tokens, index_t dim) const {
    AffineLayout l;
    l.params = axis == Axis::channel ? static_cast<std::size_t>((tokens / group) * dim)
                                     : static_cast<std::size_t>(tokens * ((dim + group - 1) / group));
    l.scales = 0;
    l.mins = l.params * sizeof(ScaleT);
    l.codes = align4(2 * l.params * sizeof(ScaleT));
    l.row_bytes = quant::packed_bytes(static_cast<std::size_t>(dim), Bits);
    l.slots = outliers.slots(tokens, dim);
    l.outlier_idx = align4(l.codes + static_cast<std::size_t>(tokens) * l.row_bytes);
    l.outlier_val = l.outlier_idx + l.slots * sizeof(std::uint32_t);
    l.bytes = l.outlier_val + l.slots * sizeof(float);
    return l;
  }
  [[nodiscard]] std::size_t part_bytes(index_t tokens, index_t dim) const { return layout(tokens, dim).bytes; }

  void validate(index_t dim, std::string_view role) const {
    const std::string r(role);
    detail::require(axis != Axis::automatic, r + ".axis", "channel or token (resolved)", axis_name(axis));
    detail::require(group > 0, r + ".group", "> 0", group);
    if (axis == Axis::channel)
      detail::require(group <= 4096, r + ".group", "<= 4096 tokens", group);
    (void)dim;
    outliers.validate(r);
    detail::require(hqq.iters >= 0, r + ".hqq.iters", ">= 0", hqq.iters);
  }

  /// Calls fn(element_offset) for every element of group `g` of a T x D part, in memory order.
  template <class Fn>
  void for_group(std::size_t g, index_t tokens, index_t dim, Fn&& fn) const {
    (void)tokens;
    if (axis == Axis::channel) {
      const index_t gt = static_cast<index_t>(g) / dim, c = static_cast<index_t>(g) % dim;
      for (index_t t = gt * group; t < (gt + 1) * group; ++t) fn(t * dim + c);
    } else {
      const index_t per_row = (dim + group - 1) / group;
      const index_t t = static_cast<index_t>(g) / per_row, gc = static_cast<index_t>(g) % per_row;
      const index_t end = std::min(dim, (gc + 1) * group);
      for (index_t c = gc * group; c < end; ++c) fn(t * dim + c);
    }
  }
  /// Index of the group holding element (t, c).
  [[nodiscard]] std::size_t group_of(index_t t, index_t c, index_t dim) const {
    if (axis == Axis::channel) return static_cast<std::size_t>((t / group) * dim + c);
    return static_cast<std::size_t>(t * ((dim + group - 1) / group) + c / group);
  }

  void encode(const float* src, index_t parts, index_t tokens, index_t dim, std::uint8_t* dst,
              std::size_t dst_stride) const {
    const AffineLayout l = layout(tokens, dim);
    // KIVI's common case (min-max, no outliers) has an allocation-free, vectorised, OpenMP path
    // with the same bytes (affine_fast.hpp); if a group is not storable it falls through to the
    // generic path below, which throws the error.
    if (zero_point == ZeroPoint::minmax && l.slots == 0 && dim > 0 && dim <= quant::fast::max_dim && group > 0 &&
        (axis == Axis::token || (axis == Axis::channel && tokens % group == 0)) &&
        quant::fast::encode<Bits, ScaleT>(src, parts, tokens, dim, group, axis == Axis::channel, dst, dst_stride,
                                          l.params, l.codes, l.row_bytes, l.bytes))
      return;
    const std::size_t n = static_cast<std::size_t>(tokens * dim);
    // 1. outliers per part, and a mask of them
    std::vector<std::uint8_t> is_outlier(l.slots ? n * static_cast<std::size_t>(parts) : 0, 0);
    std::vector<std::uint32_t> scratch, picked(l.slots);
    std::vector<std::size_t> picked_count(static_cast<std::size_t>(parts), 0);
    std::vector<std::uint32_t> all_picked(l.slots * static_cast<std::size_t>(parts));
    for (index_t p = 0; p < parts && l.slots; ++p) {
      const float* x = src + p * tokens * dim;
      const std::size_t k = outliers.pick(x, n, l.slots, scratch, all_picked.data() + p * l.slots);
      picked_count[p] = k;
      for (std::size_t i = 0; i < k; ++i) is_outlier[p * n + all_picked[p * l.slots + i]] = 1;
    }
    // 2. group ranges over the non-outliers
    const std::size_t P = l.params;
    std::vector<float> lo(P * parts), hi(P * parts);
    for (index_t p = 0; p < parts; ++p) {
      const float* x = src + p * tokens * dim;
      for (std::size_t g = 0; g < P; ++g) {
        float a = std::numeric_limits<float>::infinity(), b = -a;
        for_group(g, tokens, dim, [&](index_t e) {
          if (l.slots && is_outlier[p * n + e]) return;
          a = std::min(a, x[e]);
          b = std::max(b, x[e]);
        });
        if (a > b) a = b = 0.0f;  // every element is an outlier
        lo[p * P + g] = a;
        hi[p * P + g] = b;
      }
    }
    // 3. parameters and codes
    std::vector<std::uint8_t> codes(n);
    if (zero_point == ZeroPoint::minmax) {
      for (index_t p = 0; p < parts; ++p) {
        std::uint8_t* part = dst + p * dst_stride;
        std::vector<quant::GroupParams> gp(P);
        for (std::size_t g = 0; g < P; ++g) {
          gp[g] = quant::minmax_params<ScaleT>(lo[p * P + g], hi[p * P + g], maxc);
          check_storable(gp[g], lo[p * P + g], hi[p * P + g]);
        }
        const float* x = src + p * tokens * dim;
        for (std::size_t g = 0; g < P; ++g)
          for_group(g, tokens, dim, [&](index_t e) {
            codes[e] = static_cast<std::uint8_t>(quant::encode(x[e], gp[g].min, gp[g].scale, maxc));
          });
        write_part(part, l, gp, codes, tokens, dim, x, all_picked.data() + p * l.slots, picked_count[p]);
      }
    } else {
      std::vector<quant::HqqGroup> hg(P * parts);
      for (std::size_t i = 0; i < hg.size(); ++i) hg[i] = quant::hqq_init(lo[i], hi[i], maxc);
      auto each = [&](std::size_t gi, auto&& fn) {
        const std::size_t p = gi / P, g = gi % P;
        const float* x = src + static_cast<index_t>(p) * tokens * dim;
        for_group(g, tokens, dim, [&](index_t e) {
          if (l.slots && is_outlier[p * n + e]) return;
          fn(x[e]);
        });
      };
      quant::hqq_optimize(hg, each, maxc, hqq);
      for (index_t p = 0; p < parts; ++p) {
        std::vector<quant::GroupParams> gp(P);
        const float* x = src + p * tokens * dim;
        for (std::size_t g = 0; g < P; ++g) {
          const quant::HqqGroup& h = hg[p * P + g];
          const float scale = 1.0f / h.inv;
          gp[g].scale = round_through<ScaleT>(scale);
          gp[g].min = round_through<ScaleT>(-h.zero * scale);
          check_storable(gp[g], lo[p * P + g], hi[p * P + g]);
          for_group(g, tokens, dim, [&](index_t e) { codes[e] = static_cast<std::uint8_t>(quant::hqq_encode(x[e], h, maxc)); });
        }
        write_part(dst + p * dst_stride, l, gp, codes, tokens, dim, x, all_picked.data() + p * l.slots, picked_count[p]);
      }
    }
  }

  void decode(const std::uint8_t* part, index_t tokens, index_t dim, float* out) const {
    const AffineLayout l = layout(tokens, dim);
    // AVX-512 unpack + multiply + add, the same floats (affine_fast.hpp); else the loop below
    if (quant::fast::decode<Bits, ScaleT>(part, tokens, dim, group, axis == Axis::channel, l.mins, l.codes, l.row_bytes,
                                          out)) {
      apply_outliers(part, l, out);
      return;
    }
    const auto* sc = reinterpret_cast<const ScaleT*>(part + l.scales);
    const auto* mn = reinterpret_cast<const ScaleT*>(part + l.mins);
    // Row by row: unpack the row once, convert each group's parameters once (per channel for a
    // whole token group, or per group of the row), then the element rule of quant::decode.
    std::vector<std::uint8_t> codes(static_cast<std::size_t>(dim));
    std::vector<float> mf, sf;
    const index_t per_row = (dim + group - 1) / group;
    for (index_t t = 0; t < tokens; ++t) {
      quant::unpack<Bits>(part + l.codes + static_cast<std::size_t>(t) * l.row_bytes, static_cast<std::size_t>(dim),
                          codes.data());
      float* o = out + t * dim;
      if (axis == Axis::channel) {
        if (t % group == 0 || mf.empty()) {
          const std::size_t base = group_of(t, 0, dim);
          mf.resize(static_cast<std::size_t>(dim));
          sf.resize(static_cast<std::size_t>(dim));
          for (index_t c = 0; c < dim; ++c) {
            mf[c] = to_float(mn[base + c]);
            sf[c] = to_float(sc[base + c]);
          }
        }
        for (index_t c = 0; c < dim; ++c) o[c] = quant::decode(codes[c], mf[c], sf[c]);
      } else {
        for (index_t gc = 0; gc < per_row; ++gc) {
          const std::size_t g = static_cast<std::size_t>(t * per_row + gc);
          const float m = to_float(mn[g]), sv = to_float(sc[g]);
          const index_t end = std::min(dim, (gc + 1) * group);
          for (index_t c = gc * group; c < end; ++c) o[c] = quant::decode(codes[c], m, sv);
        }
      }
    }
    apply_outliers(part, l, out);
  }

  /// Overwrites the outlier entries of a decoded T x D slab with their exact values.
  static void apply_outliers(const std::uint8_t* part, const AffineLayout& l, float* out) {
    for (std::size_t s = 0; s < l.slots; ++s) {
      std::uint32_t idx;
      std::memcpy(&idx, part + l.outlier_idx + s * sizeof(std::uint32_t), sizeof idx);
      if (idx == OutlierRule::unused) break;
      std::memcpy(&out[idx], part + l.outlier_val + s * sizeof(float), sizeof(float));
    }
  }

 private:
  static void check_storable(const quant::GroupParams& g, float lo, float hi) {
    if (!std::isfinite(g.scale) || !std::isfinite(g.min))
      throw Error(detail::concat("qpkv: quantizer scale storage: expected group range [", lo, ", ", hi,
                                 "] to be representable as ", dtype_name<ScaleT>(),
                                 " scale and min, got scale ", g.scale, " min ", g.min,
                                 " (use float scale storage for such magnitudes)"));
  }

  void write_part(std::uint8_t* part, const AffineLayout& l, const std::vector<quant::GroupParams>& gp,
                  const std::vector<std::uint8_t>& codes, index_t tokens, index_t dim, const float* x,
                  const std::uint32_t* picked, std::size_t npicked) const {
    std::memset(part, 0, l.bytes);
    auto* sc = reinterpret_cast<ScaleT*>(part + l.scales);
    auto* mn = reinterpret_cast<ScaleT*>(part + l.mins);
    for (std::size_t g = 0; g < l.params; ++g) {
      sc[g] = from_float<ScaleT>(gp[g].scale);
      mn[g] = from_float<ScaleT>(gp[g].min);
    }
    for (index_t t = 0; t < tokens; ++t)
      quant::pack<Bits>(codes.data() + t * dim, static_cast<std::size_t>(dim),
                        part + l.codes + static_cast<std::size_t>(t) * l.row_bytes);
    for (std::size_t s = 0; s < l.slots; ++s) {
      const std::uint32_t idx = s < npicked ? picked[s] : OutlierRule::unused;
      const float v = s < npicked ? x[idx] : 0.0f;
      std::memcpy(part + l.outlier_idx + s * sizeof(std::uint32_t), &idx, sizeof idx);
      std::memcpy(part + l.outlier_val + s * sizeof(float), &v, sizeof v);
    }
  }
};

}  // namespace qpkv
