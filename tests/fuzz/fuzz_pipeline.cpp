// libFuzzer target: quantize, select and attend driven by fuzzer bytes. The first bytes choose a
// shape (GQA ratio, head_dim), a prompt length, a selection method, key/value bit widths, group,
// residual, outliers, a capacity and the attention precision (exact or fast); the rest are the
// keys, values and queries -- either raw float bit patterns (NaN, Inf, denormals, 1e38) or small
// integers times a power-of-two scale.
// Oracles: every failure is a qpkv::Error; a cache that accepted its input attends to finite values
// within 1e-3 of the float64 reference over its own dequantized contents (plus 1e-5 of the largest
// value term's magnitude, for outputs where values cancel, and float32 logit rounding; fast: plus
// the integer kernels' rounding bound), and dequantizes to finite values; appending a token and
// attending again keeps those properties.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "qpkv/attention/dense.hpp"
#include "qpkv/cache/any_cache.hpp"
#include "fuzz_bytes.hpp"

namespace {

using qpkv_fuzz::Bytes;

// What the kernels add up is not the dequantized value s c + m but its terms (s c and m, or, centred,
// s (c - 2^(b-1)) and m + 2^(b-1) s), so their float rounding is relative to the terms: a value
// that dequantizes to 0 from s = -m = 6e-8 (fp16's smallest) over inputs of 1e-10 is 0 exactly in
// the reference and 1e-17 in a kernel (found by this fuzzer on AVX2). term(x, bits) bounds |m| +
// s (2^b - 1) from the input that was quantized: |m| <= max|x|, s (2^b - 1) <= 2 max|x|, each up
// to fp16 rounding (2^-11 relative, 2^-24 absolute).
double term(double xmax, int bits) { return bits >= 16 ? xmax : 3.01 * xmax + std::ldexp(1.0, bits - 23); }

struct Inputs {
  std::vector<double> kin;  // [kv head][channel]: max |k| over the prompt's tokens
  double vin = 0;           // max |v|
  int kb = 16, vb = 16;
};

void check_attention(const qpkv::AnyCompressedKV& c, const std::vector<float>& q, bool fast, const Inputs& in) {
  const qpkv::Shape s = c.shape();
  std::vector<float> out(q.size()), ref(q.size());
  c.attend(q.data(), out.data());
  const qpkv::DenseKV d = c.dequantize();
  for (float x : d.keys)
    if (!std::isfinite(x)) std::abort();
  for (float x : d.values)
    if (!std::isfinite(x)) std::abort();
  qpkv::dense_attention(d.key_view(), d.value_view(), q.data(), s.q_heads, ref.data(), c.softmax_scale());
  double num = 0, den = 0, vmax = 0;
  for (float x : d.values) vmax = std::max(vmax, std::fabs(double(x)));
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (!std::isfinite(out[i])) std::abort();
    num += (double(out[i]) - ref[i]) * (double(out[i]) - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  // Relative to the output, plus float32 rounding relative to the values (found by this fuzzer):
  //  - the output is a convex combination of values, so when they cancel (e.g. -0.25 x 3 and 0.75
  //    with equal weights) the reference's 3e-18 against qpkv's exact 0 is rounding, not an error;
  //  - a float32 logit is off by up to D eps32 sum_c |q_c k_c| scale, which moves the output by up
  //    to twice that times the largest value: with 2-channel keys and queries ~1000, logits ~1e6
  //    are off by ~0.1 and the output by 0.5% (452 vs 454), however exact the kernel.
  double l1 = 0;
  const qpkv::index_t D = s.head_dim, g = s.q_heads / s.kv_heads;
  for (qpkv::index_t h = 0; h < s.q_heads; ++h)
    for (qpkv::index_t t = 0; t < d.tokens; ++t) {
      double a = 0;
      for (qpkv::index_t ch = 0; ch < D; ++ch) {
        const double k = std::fabs(d.keys[((h / g) * d.tokens + t) * D + ch]);
        a += std::fabs(double(q[h * D + ch])) * std::max(k, term(in.kin[(h / g) * D + ch], in.kb));
      }
      l1 = std::max(l1, a * c.softmax_scale());
    }
  double logit_err = 2.0 * double(D) * 6e-8 * l1;
  double value_err = 1e-5;
  if (fast) {
    // precision=fast (integer kernels where the CPU has them): the folded query q_c s_c is rounded
    // to 1 / 32639 of its group's largest |q_c s_c| <= max|q| 2 max|k| (s (2^b - 1) is a channel's
    // range), times a code <= 2^b - 1 over D channels: |d logit| <= D max|q| max|k| scale / 16319;
    // the value weights p_t s_t are rounded to 1 / 32767 of their block's largest, so the output
    // moves by at most tokens 2 vmax / 65534
    double qmax = 0, kmax = 0;
    for (float x : q) qmax = std::max(qmax, std::fabs(double(x)));
    for (float x : d.keys) kmax = std::max(kmax, std::fabs(double(x)));
    for (double x : in.kin) kmax = std::max(kmax, term(x, in.kb));
    logit_err += double(D) * qmax * kmax * c.softmax_scale() / 16319.0;
    value_err += double(d.tokens) * 2.0 / 65534.0;
  }
  logit_err = std::min(1.0, logit_err);
  const double vterm = std::max(vmax, term(in.vin, in.vb));  // value_err is relative to the terms
  const double allowed =
      1e-3 * std::sqrt(den) + (value_err * vterm + 2.0 * logit_err * vmax) * std::sqrt(double(out.size())) + 1e-30;
  if (std::isfinite(den) && std::sqrt(num) > allowed) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Bytes b{data, size};
  static constexpr int kBits[] = {1, 2, 3, 4, 8, 16};
  static constexpr const char* kMethods[] = {"keep_all", "streamingllm", "snapkv", "h2o", "pyramidkv"};
  const qpkv::index_t kv = 1 + b.byte() % 3, ratio = 1 + b.byte() % 4, dim = 1 + b.byte() % 48;
  const qpkv::index_t N = 1 + b.byte() % 96;
  const qpkv::Shape shape{kv, kv * ratio, dim};
  const int method = b.byte() % 5;
  const int kb = kBits[b.byte() % 6], vb = kBits[b.byte() % 6];
  const qpkv::index_t group = 1 + b.byte() % 40, residual = b.byte() % 40, window = 1 + b.byte() % 16;
  const bool outliers = b.byte() % 4 == 0;
  const qpkv::index_t capacity = b.byte() % 100;
  const std::uint8_t mode = b.byte();
  const bool raw = mode % 4 == 0;
  const float scale = std::ldexp(1.0f, static_cast<int>(mode % 64) - 40);  // 2^-40 .. 2^23

  std::string text = std::string(kMethods[method]) + ",k" + std::to_string(kb) + "v" + std::to_string(vb) +
                     ",residual=" + std::to_string(residual);
  if (kb < 16 || vb < 16) {
    text += ",group=" + std::to_string(group);
    if (outliers) text += ",outliers=0.05";
  }
  if (method >= 2) text += ",window=" + std::to_string(window);
  const bool fast = (kb < 16 || vb < 16) && (mode & 64) != 0;  // bit 6 of mode: not otherwise used
  if (fast) text += ",precision=fast";
  qpkv::KVConfig config;
  try {
    config = qpkv::KVConfig::parse(text);
  } catch (const qpkv::Error&) {
    return 0;  // a bit pair without an instantiation
  }

  std::vector<float> k(static_cast<std::size_t>(kv * N * dim)), v(k.size()), q(static_cast<std::size_t>(kv * ratio * N * dim));
  for (auto& x : k) x = (raw ? b.raw_float() : b.small(scale));
  for (auto& x : v) x = (raw ? b.raw_float() : b.small(scale));
  for (auto& x : q) x = (raw ? b.raw_float() : b.small(scale));
  try {
    qpkv::AnyCompressedKV c(shape, config);
    c.compress(qpkv::view(k.data(), kv, N, dim), qpkv::view(v.data(), kv, N, dim), qpkv::view(q.data(), kv * ratio, N, dim),
               capacity);
    if (c.tokens() == 0) return 0;
    const std::vector<float> q1(q.end() - kv * ratio * dim, q.end());
    Inputs in;
    in.kb = kb;
    in.vb = vb;
    in.kin.assign(static_cast<std::size_t>(kv * dim), 0.0);
    for (qpkv::index_t h = 0; h < kv; ++h)
      for (qpkv::index_t t = 0; t < N; ++t)
        for (qpkv::index_t ch = 0; ch < dim; ++ch) {
          const std::size_t i = static_cast<std::size_t>((h * N + t) * dim + ch);
          in.kin[h * dim + ch] = std::max(in.kin[h * dim + ch], std::fabs(double(k[i])));
          in.vin = std::max(in.vin, std::fabs(double(v[i])));
        }
    check_attention(c, q1, fast, in);
    c.append(k.data(), v.data());  // the first token again (one of the prompt's: the bounds hold)
    check_attention(c, q1, fast, in);
  } catch (const qpkv::Error&) {
  }
  return 0;
}
