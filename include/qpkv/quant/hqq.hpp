// qpkv/quant/hqq.hpp - HQQ's proximal zero-point refinement (mobiusml/hqq, hqq/core/optimize.py,
// optimize_weights_proximal_legacy, the path Quantizer.quantize(optimize=True) takes).
//
// Starting from min-max (inv = (2^b-1)/(max-min), zero = -min*inv; HQQ's "scale" is our 1/scale),
// each iteration computes, for every element of every group,
//   W_q = clamp(round(W*inv + zero), 0, 2^b-1),   W_r = (W_q - zero) / inv,
//   W_e = shrink_p(W - W_r) = sign(e) * relu(|e| - |e + 1e-8|^(p-1) / beta)   (p = 0.7, beta = 10)
//   zero <- mean over the group of (W_q - (W - W_e) * inv)
// and the error mean|W - W_r| over ALL groups of the call; it stops at the first iteration whose
// error is not below the best so far, keeping the zero that iteration computed (as hqq does), after
// at most `iters` iterations. inv never changes. Everything is float32 (hqq's CPU path).
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "qpkv/quant/affine.hpp"

namespace qpkv {

/// Parameters of the proximal solver, with the hqq library's defaults.
struct HqqParams {
  float lp_norm = 0.7f;
  float beta = 10.0f;
  int iters = 20;
};

namespace quant {

/// HQQ's starting point for a group with range [lo, hi]: inv = (2^b-1) / (hi - lo), set to 1 for
/// near-constant groups (|hi - lo| <= 1e-4, hqq >= 0.2.7) and clamped to <= 2e4; zero = -lo * inv.
/// hqq writes `max_v / denom` with a Python int numerator, which torch evaluates as
/// reciprocal(denom) * max_v (Tensor.__rtruediv__): two float32 roundings, reproduced here.
struct HqqGroup {
  float inv = 1.0f;
  float zero = 0.0f;
};

inline HqqGroup hqq_init(float lo, float hi, std::uint32_t maxc) {
  HqqGroup g;
  const float range = hi - lo;
  g.inv = std::fabs(range) <= 1e-4f ? 1.0f : (1.0f / range) * static_cast<float>(maxc);
  g.inv = g.inv > 2e4f ? 2e4f : g.inv;
  g.zero = -lo * g.inv;
  return g;
}

QPKV_HD std::uint32_t hqq_encode(float x, const HqqGroup& g, std::uint32_t maxc) {
  float v = std::nearbyint(mul_rn(x, g.inv) + g.zero);  // torch: two roundings (affine.hpp)
  v = v > 0.0f ? v : 0.0f;  // NaN -> 0, as quant::encode
  const float hi = static_cast<float>(maxc);
  return static_cast<std::uint32_t>(v > hi ? hi : v);
}

/// Runs the solver in place over `groups`; `for_each(g, fn)` calls fn(float x) for each element
/// of group g. Sums are taken in double (torch reduces float32 pairwise, near exact). Returns the
/// number of iterations run.
template <class ForEach>
int hqq_optimize(std::vector<HqqGroup>& groups, ForEach&& for_each, std::uint32_t maxc, const HqqParams& p) {
  float best = 1e4f;
  int it = 0;
  for (; it < p.iters; ++it) {
    double err_sum = 0.0;
    std::int64_t count = 0;
    for (std::size_t gi = 0; gi < groups.size(); ++gi) {
      HqqGroup& g = groups[gi];
      double zsum = 0.0;
      std::int64_t n = 0;
      for_each(gi, [&](float w) {
        const float wq = static_cast<float>(hqq_encode(w, g, maxc));
        const float wr = (wq - g.zero) / g.inv;
        const float e = w - wr;
        const float ae = std::fabs(e);
        const float shrunk = ae - mul_rn(1.0f / p.beta, std::pow(ae + 1e-8f, p.lp_norm - 1.0f));
        const float we = shrunk > 0.0f ? std::copysign(shrunk, e) : 0.0f;
        zsum += wq - mul_rn(w - we, g.inv);
        err_sum += std::fabs(e);
        ++n;
        ++count;
      });
      g.zero = n ? static_cast<float>(zsum / static_cast<double>(n)) : g.zero;
    }
    const float err = count ? static_cast<float>(err_sum / static_cast<double>(count)) : 0.0f;
    if (err < best) best = err;
    else {
      ++it;
      break;
    }
  }
  return it;
}

}  // namespace quant
}  // namespace qpkv
