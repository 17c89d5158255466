// bench/precision_floor.cpp - qpkv_precision_floor: how many bits the integer decode-attention
// kernels need on each side of their dot products, and what the CPU's dot-product instructions
// cost together. The evidence behind docs/performance.md "The floor of the integer kernels".
//
// Part 1 (any CPU): the benchmark's layer (bench_common.hpp: 8 KV heads, 32 query heads, head_dim
// 128, an outlier key channel) quantized with KIVI (per-channel keys, per-token values, group 32)
// through the library's Affine quantizer. Attention over it is computed in double twice per side:
//  - query side: per key group and query the folded query x_c = q_c s_c is rounded to a signed
//    integer of B bits (step = max_c |x_c| / (2^(B-1) - 1)) against centred codes, values exact;
//  - weight side: per 128-token pass, value group and query the weights p_t s_tg (>= 0) are rounded
//    to an unsigned integer of B bits (step = max / (2^B - 1)), logits exact;
// and compared (relative L2, worst query head) with the exact attention over the same dequantized
// cache, i.e. the error measure of issue 4's 5e-4 target. vpdpbusd multiplies 8-bit by 8-bit
// (7 or 8 bits of one side per product), vpdpwssd 16 by 16 (15 bits signed), so the bits a side
// needs say how many products per instruction the kernels can have.
//
// Part 2 (AVX-512 VNNI builds): throughput of zmm dot-product instructions alone and in pairs,
// register operands only, 8 independent accumulators; whether vpmaddwd, vpmaddubsw, vpsadbw, an
// FMA or vpermb run beside vpdpbusd or take its place.
//
// Usage: qpkv_precision_floor [tokens (default 32768)] [key/value bits: 4 or 2 (default 4)]
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench_common.hpp"
#include "qpkv/quant/affine_quantizer.hpp"
#include "qpkv/quant/pack.hpp"

namespace {

using qpkv::index_t;

/// One KIVI part decoded to codes and float parameters.
struct Part {
  std::vector<std::uint8_t> codes;  // [t][c]
  std::vector<double> scale, min;   // keys: [t / group][c]; values: [t][c / group]
};

template <int Bits>
Part quantize(const float* x, index_t tokens, index_t dim, qpkv::Axis axis, index_t group) {
  qpkv::Affine<Bits> q;
  q.axis = axis;
  q.group = group;
  const qpkv::AffineLayout l = q.layout(tokens, dim);
  std::vector<std::uint8_t> buf(l.bytes);
  q.encode(x, 1, tokens, dim, buf.data(), l.bytes);
  Part p;
  p.codes.resize(static_cast<std::size_t>(tokens * dim));
  for (index_t t = 0; t < tokens; ++t)
    qpkv::quant::unpack<Bits>(buf.data() + l.codes + static_cast<std::size_t>(t) * l.row_bytes,
                              static_cast<std::size_t>(dim), p.codes.data() + t * dim);
  const auto* sc = reinterpret_cast<const qpkv::half*>(buf.data() + l.scales);
  const auto* mn = reinterpret_cast<const qpkv::half*>(buf.data() + l.mins);
  for (std::size_t i = 0; i < l.params; ++i) {
    p.scale.push_back(static_cast<double>(qpkv::to_float(sc[i])));
    p.min.push_back(static_cast<double>(qpkv::to_float(mn[i])));
  }
  return p;
}

double rel_l2(const std::vector<double>& a, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / den);
}

/// Rounds x / step to the nearest integer in [-qmax, qmax].
double round_to(double x, double step, double qmax) {
  if (step <= 0) return 0;
  return std::max(-qmax, std::min(qmax, std::nearbyint(x / step)));
}

struct Side {
  int qbits = 0, wbits = 0;  // 0: exact
};

/// Attention of one query head over one KV head with the given rounding.
std::vector<double> attend(const Part& K, const Part& V, const float* q, index_t N, index_t D, index_t G, int bits,
                           Side side) {
  const double centre = ((1 << bits) - 1) / 2.0, scale = 1.0 / std::sqrt(static_cast<double>(D));
  const index_t per_row = D / G, pass = 128;
  std::vector<double> logit(static_cast<std::size_t>(N)), x(static_cast<std::size_t>(D));
  for (index_t g0 = 0; g0 < N; g0 += G) {
    const double* s = K.scale.data() + (g0 / G) * D;
    const double* m = K.min.data() + (g0 / G) * D;
    double bias = 0, mx = 0;
    for (index_t c = 0; c < D; ++c) {
      x[c] = scale * q[c] * s[c];
      bias += scale * q[c] * (m[c] + centre * s[c]);
      mx = std::max(mx, std::fabs(x[c]));
    }
    double step = 1;
    if (side.qbits > 0) {
      const double qmax = std::ldexp(1.0, side.qbits - 1) - 1;
      step = mx / qmax;
      for (index_t c = 0; c < D; ++c) x[c] = round_to(x[c], step, qmax);
    }
    for (index_t t = g0; t < g0 + G; ++t) {
      double acc = 0;
      for (index_t c = 0; c < D; ++c) acc += x[c] * (K.codes[t * D + c] - centre);
      logit[t] = step * acc + bias;
    }
  }
  double lmax = -1e300;
  for (double l : logit) lmax = std::max(lmax, l);
  double sum = 0;
  for (auto& l : logit) sum += (l = std::exp(l - lmax));
  std::vector<double> out(static_cast<std::size_t>(D), 0.0), w(static_cast<std::size_t>(pass * per_row));
  for (index_t p0 = 0; p0 < N; p0 += pass) {
    const index_t n = std::min(pass, N - p0);
    for (index_t gc = 0; gc < per_row; ++gc) {
      double wmax = 0;
      for (index_t t = 0; t < n; ++t) {
        w[t * per_row + gc] = logit[p0 + t] * V.scale[(p0 + t) * per_row + gc];
        wmax = std::max(wmax, w[t * per_row + gc]);
      }
      if (side.wbits > 0) {
        const double qmax = std::ldexp(1.0, side.wbits) - 1, step = wmax / qmax;
        for (index_t t = 0; t < n; ++t) w[t * per_row + gc] = step * round_to(w[t * per_row + gc], step, qmax);
      }
    }
    for (index_t t = 0; t < n; ++t) {
      const index_t tt = p0 + t;
      for (index_t c = 0; c < D; ++c) {
        const index_t gc = c / G;
        out[c] += w[t * per_row + gc] * V.codes[tt * D + c] + logit[tt] * V.min[tt * per_row + gc];
      }
    }
  }
  for (auto& o : out) o /= sum;
  return out;
}

template <int Bits>
void precision_table(index_t N) {
  using qpkv::bench::Layer;
  const Layer layer(N);
  const index_t D = Layer::dim, H = Layer::kv_heads, g = Layer::q_heads / Layer::kv_heads, G = 32;
  std::vector<float> q(static_cast<std::size_t>(Layer::q_heads * D));
  qpkv::bench::fill(q, 7);
  std::vector<Part> K, V;
  for (index_t h = 0; h < H; ++h) {
    K.push_back(quantize<Bits>(layer.keys.data() + h * N * D, N, D, qpkv::Axis::channel, G));
    V.push_back(quantize<Bits>(layer.values.data() + h * N * D, N, D, qpkv::Axis::token, G));
  }
  std::vector<std::vector<double>> ref;
  for (index_t i = 0; i < Layer::q_heads; ++i)
    ref.push_back(attend(K[i / g], V[i / g], q.data() + i * D, N, D, G, Bits, Side{}));
  std::printf("KIVI-%d, group 32, %ld tokens, head_dim 128, 32 query heads over 8 KV heads\n", Bits,
              static_cast<long>(N));
  std::printf("relative L2 error against the exact attention over the same cache (worst query head)\n");
  std::printf("| bits | query side (signed, per key group) | weight side (unsigned, per 128-token pass) |\n");
  std::printf("|---|---|---|\n");
  for (int b : {7, 8, 10, 12, 14, 15, 16}) {
    double eq = 0, ew = 0;
    for (index_t i = 0; i < Layer::q_heads; ++i) {
      eq = std::max(eq, rel_l2(attend(K[i / g], V[i / g], q.data() + i * D, N, D, G, Bits, Side{b, 0}), ref[i]));
      ew = std::max(ew, rel_l2(attend(K[i / g], V[i / g], q.data() + i * D, N, D, G, Bits, Side{0, b}), ref[i]));
    }
    std::printf("| %d | %.2e | %.2e |\n", b, eq, ew);
  }
}

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
// Each asm block issues 8 instructions of a kind, or 8 vpdpbusd interleaved with 8 (or 16) of a
// kind, on registers (zmm29..31 are inputs) or a memory operand at %0; no result is read again.
alignas(64) std::int32_t g_mem[64] = {1};
#define QPKV_R(op) #op " %%zmm30, %%zmm31, %%zmm"
#define QPKV_DP(d) QPKV_R(vpdpbusd) #d "\n"
#define QPKV_DPWSSD(d) QPKV_R(vpdpwssd) #d "\n"
#define QPKV_MADDWD(d) QPKV_R(vpmaddwd) #d "\n"
#define QPKV_MADDUBSW(d) QPKV_R(vpmaddubsw) #d "\n"
#define QPKV_PSADBW(d) QPKV_R(vpsadbw) #d "\n"
#define QPKV_FMA(d) QPKV_R(vfmadd231ps) #d "\n"
#define QPKV_PANDD(d) QPKV_R(vpandd) #d "\n"
#define QPKV_PACKSSDW(d) QPKV_R(vpackssdw) #d "\n"
#define QPKV_PERMB(d) QPKV_R(vpermb) #d "\n"
#define QPKV_PERMT2B(d) "vpermt2b %%zmm30, %%zmm29, %%zmm" #d "\n"
#define QPKV_PSRLD(d) "vpsrld $4, %%zmm30, %%zmm" #d "\n"
#define QPKV_CVTPS2DQ(d) "vcvtps2dq %%zmm30, %%zmm" #d "\n"
#define QPKV_BCAST(d) "vpbroadcastd 4(%0), %%zmm" #d "\n"
#define QPKV_LOAD(d) "vmovdqu64 64(%0), %%zmm" #d "\n"
#define QPKV_ZXBD(d) "vpmovzxbd 16(%0), %%zmm" #d "\n"
#define QPKV_CVTPH(d) "vcvtph2ps 32(%0), %%zmm" #d "\n"
#define QPKV_CLOB                                                                                               \
  "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", \
      "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23"
#define QPKV_ALONE(X)                                                                               \
  [](long n) {                                                                                      \
    for (long i = 0; i < n; ++i)                                                                    \
      asm volatile(X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)::"r"(g_mem) : "memory", QPKV_CLOB); \
  }
#define QPKV_WITH(X)                                                                                                 \
  [](long n) {                                                                                                       \
    for (long i = 0; i < n; ++i)                                                                                     \
      asm volatile(QPKV_DP(0) X(8) QPKV_DP(1) X(9) QPKV_DP(2) X(10) QPKV_DP(3) X(11) QPKV_DP(4) X(12) QPKV_DP(5) X(13) \
                       QPKV_DP(6) X(14) QPKV_DP(7) X(15)::"r"(g_mem)                                                 \
                   : "memory", QPKV_CLOB);                                                                           \
  }
#define QPKV_WITH2(X)                                                                                               \
  [](long n) {                                                                                                      \
    for (long i = 0; i < n; ++i)                                                                                    \
      asm volatile(QPKV_DP(0) X(8) X(16) QPKV_DP(1) X(9) X(17) QPKV_DP(2) X(10) X(18) QPKV_DP(3) X(11) X(19)        \
                       QPKV_DP(4) X(12) X(20) QPKV_DP(5) X(13) X(21) QPKV_DP(6) X(14) X(22) QPKV_DP(7) X(15) X(23):: \
                           "r"(g_mem)                                                                               \
                   : "memory", QPKV_CLOB);                                                                          \
  }

/// Median over 5 runs of ns per 8 instructions (or per 8 vpdpbusd with their companions).
double ns_per8(void (*f)(long)) {
  const long n = 10'000'000;
  std::vector<double> r;
  for (int k = 0; k < 5; ++k) {
    const auto t0 = std::chrono::steady_clock::now();
    f(n);
    const auto t1 = std::chrono::steady_clock::now();
    r.push_back(std::chrono::duration<double, std::nano>(t1 - t0).count() / static_cast<double>(n) / 8);
  }
  std::sort(r.begin(), r.end());
  return r[2];
}

void instruction_table() {
  const double base = ns_per8(QPKV_ALONE(QPKV_DP));
  std::printf("\nzmm instruction throughput, 8 independent destinations, medians of 5\n");
  std::printf("one vpdpbusd alone: %.3f ns (= 1 unit below)\n", base);
  std::printf("| instruction X | 8 X alone, units per X | 8 vpdpbusd + 8 X, units per pair | 8 vpdpbusd + 16 X |\n");
  std::printf("|---|---|---|---|\n");
  const struct {
    const char* name;
    void (*alone)(long);
    void (*with)(long);
    void (*with2)(long);
  } rows[] = {
      {"vpdpwssd", QPKV_ALONE(QPKV_DPWSSD), QPKV_WITH(QPKV_DPWSSD), nullptr},
      {"vpmaddwd", QPKV_ALONE(QPKV_MADDWD), QPKV_WITH(QPKV_MADDWD), nullptr},
      {"vpmaddubsw", QPKV_ALONE(QPKV_MADDUBSW), QPKV_WITH(QPKV_MADDUBSW), nullptr},
      {"vpsadbw", QPKV_ALONE(QPKV_PSADBW), QPKV_WITH(QPKV_PSADBW), nullptr},
      {"vfmadd231ps", QPKV_ALONE(QPKV_FMA), QPKV_WITH(QPKV_FMA), nullptr},
      {"vpandd", QPKV_ALONE(QPKV_PANDD), QPKV_WITH(QPKV_PANDD), QPKV_WITH2(QPKV_PANDD)},
      {"vpsrld (immediate)", QPKV_ALONE(QPKV_PSRLD), QPKV_WITH(QPKV_PSRLD), QPKV_WITH2(QPKV_PSRLD)},
      {"vpackssdw", QPKV_ALONE(QPKV_PACKSSDW), QPKV_WITH(QPKV_PACKSSDW), nullptr},
      {"vcvtps2dq", QPKV_ALONE(QPKV_CVTPS2DQ), QPKV_WITH(QPKV_CVTPS2DQ), nullptr},
      {"vpermb", QPKV_ALONE(QPKV_PERMB), QPKV_WITH(QPKV_PERMB), nullptr},
      {"vpermt2b", QPKV_ALONE(QPKV_PERMT2B), QPKV_WITH(QPKV_PERMT2B), nullptr},
      {"vpbroadcastd from memory", QPKV_ALONE(QPKV_BCAST), QPKV_WITH(QPKV_BCAST), QPKV_WITH2(QPKV_BCAST)},
      {"vmovdqu64 load", QPKV_ALONE(QPKV_LOAD), QPKV_WITH(QPKV_LOAD), nullptr},
      {"vpmovzxbd from memory", QPKV_ALONE(QPKV_ZXBD), QPKV_WITH(QPKV_ZXBD), nullptr},
      {"vcvtph2ps from memory", QPKV_ALONE(QPKV_CVTPH), QPKV_WITH(QPKV_CVTPH), nullptr},
  };
  for (const auto& r : rows) {
    std::printf("| %s | %.2f | %.2f |", r.name, ns_per8(r.alone) / base, ns_per8(r.with) / base);
    if (r.with2 != nullptr) std::printf(" %.2f |\n", ns_per8(r.with2) / base);
    else std::printf(" |\n");
  }
}
#endif

}  // namespace

int main(int argc, char** argv) {
  const long n = argc > 1 ? std::atol(argv[1]) : 32768;
  const int bits = argc > 2 ? std::atoi(argv[2]) : 4;
  if (n < 128 || n % 128 != 0 || (bits != 4 && bits != 2)) {
    std::fprintf(stderr, "usage: qpkv_precision_floor [tokens: a multiple of 128] [bits: 4 or 2]\n");
    return 2;
  }
  if (bits == 4) precision_table<4>(n);
  else precision_table<2>(n);
#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
  instruction_table();
#else
  std::printf("\n(instruction table: needs a build with AVX-512 VNNI and VBMI, e.g. -march=native on such a CPU)\n");
#endif
  return 0;
}
