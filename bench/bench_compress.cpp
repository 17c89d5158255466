// Compression side: quantize + pack and dequantize throughput per bit width, append per token,
// compress (select + quantize) of a 32K-token layer per selector and bit width, and the yardstick
// of the SnapKV target: one dense fp32 attention of the 32 window queries over the layer.
//   quantize/kivi<bits>/g32/<keys|values>/t<threads>   GB/s of fp32 input (counter GB/s)
//   dequantize/kivi<bits>/g32/t<threads>               GB/s of fp32 output
//   append/kivi<bits>/g32                              time per appended token (8 KV heads)
//   compress/<selector>/<fp16|kivi<bits>>/n32768/t<threads>
//   dense/window32/n32768/t<threads>
#include <benchmark/benchmark.h>

#include <Eigen/Core>
#include <string>

#include "bench_common.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/pyramidkv.hpp"
#include "qpkv/select/snapkv.hpp"
#include "qpkv/select/streaming_llm.hpp"

namespace {

using namespace qpkv;
using bench::Layer;

const Layer& layer32k() {
  static const Layer l(32768);
  return l;
}
const std::vector<float>& queries32k() {  // the last 32 prompt queries of 32 query heads
  static const std::vector<float> q = [] {
    std::vector<float> x(static_cast<std::size_t>(Layer::q_heads * 32 * Layer::dim));
    bench::fill(x, 3);
    return x;
  }();
  return q;
}

template <int Bits>
void quantize_bench(benchmark::State& state, Axis axis, int threads) {
  const Layer& l = layer32k();
  const long N = 4096;  // 8 heads x 4096 tokens x 128 = 16 MiB of fp32 per call
  Affine<Bits> q;
  q.axis = axis;
  const std::size_t part = q.part_bytes(32, Layer::dim);
  const long parts = Layer::kv_heads * N / 32;
  std::vector<std::uint8_t> dst(static_cast<std::size_t>(parts) * part);
  bench::set_threads(threads);
  for (auto _ : state) {
    q.encode(l.keys.data(), parts, 32, Layer::dim, dst.data(), part);
    benchmark::ClobberMemory();
  }
  const double in = static_cast<double>(parts) * 32 * Layer::dim * sizeof(float);
  state.counters["GB/s"] = benchmark::Counter(in * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

template <int Bits>
void dequantize_bench(benchmark::State& state, int threads) {
  const Layer& l = layer32k();
  Affine<Bits> q;
  q.axis = Axis::channel;
  const std::size_t part = q.part_bytes(32, Layer::dim);
  const long parts = 1024;
  std::vector<std::uint8_t> dst(static_cast<std::size_t>(parts) * part);
  q.encode(l.keys.data(), parts, 32, Layer::dim, dst.data(), part);
  std::vector<float> out(static_cast<std::size_t>(parts * 32 * Layer::dim));
  bench::set_threads(threads);
  for (auto _ : state) {
    // parts split over the threads, as CompressedKV::dequantize splits its blocks
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (long p = 0; p < parts; ++p) q.decode(dst.data() + p * part, 32, Layer::dim, out.data() + p * 32 * Layer::dim);
    benchmark::DoNotOptimize(out.data());
  }
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(out.size() * sizeof(float)) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

template <int Bits>
void append_bench(benchmark::State& state) {
  const Shape s{Layer::kv_heads, Layer::q_heads, Layer::dim};
  std::vector<float> k(static_cast<std::size_t>(Layer::kv_heads * Layer::dim)), v(k.size());
  bench::fill(k, 5);
  bench::fill(v, 6);
  CompressedKV<KeepAll, Kivi<Bits>> cache(s);
  cache.reserve(1 << 20);
  long n = 0;
  for (auto _ : state) {
    cache.append(k.data(), v.data());
    if (++n == (1 << 20) - 64) {
      state.PauseTiming();
      cache = CompressedKV<KeepAll, Kivi<Bits>>(s);
      cache.reserve(1 << 20);
      n = 0;
      state.ResumeTiming();
    }
  }
}

template <class Selector, class Scheme>
void compress_bench(benchmark::State& state, int threads) {
  const Layer& l = layer32k();
  const auto& q = queries32k();
  const Shape s{Layer::kv_heads, Layer::q_heads, Layer::dim};
  bench::set_threads(threads);
  for (auto _ : state) {
    CompressedKV<Selector, Scheme> cache(s);
    cache.compress(view(l.keys.data(), Layer::kv_heads, l.tokens, Layer::dim),
                   view(l.values.data(), Layer::kv_heads, l.tokens, Layer::dim),
                   view(q.data(), Layer::q_heads, 32, Layer::dim), 4096, LayerInfo{0, 32});
    benchmark::DoNotOptimize(cache.bytes());
  }
}

/// softmax(Q K^T / sqrt(D)) V for the 32 window queries of each query head, fp32 Eigen GEMMs.
void dense_window_bench(benchmark::State& state, int threads) {
  using M = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Layer& l = layer32k();
  const auto& q = queries32k();
  const long N = l.tokens, D = Layer::dim, g = Layer::q_heads / Layer::kv_heads;
  bench::set_threads(threads);
  for (auto _ : state) {
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (int h = 0; h < Layer::q_heads; ++h) {
      Eigen::Map<const M> K(l.keys.data() + (h / g) * N * D, N, D), V(l.values.data() + (h / g) * N * D, N, D);
      Eigen::Map<const M> Q(q.data() + h * 32 * D, 32, D);
      M S = (Q * K.transpose()) / std::sqrt(static_cast<float>(D));
      for (int i = 0; i < 32; ++i) {
        auto r = S.row(i).array();
        r = (r - r.maxCoeff()).exp();
        r /= r.sum();
      }
      M O = S * V;
      benchmark::DoNotOptimize(O.data());
    }
  }
}

const bool registered = [] {
  using benchmark::RegisterBenchmark;
  for (int t : {1, 2}) {
    const std::string ts = "/t" + std::to_string(t);
    for (auto [axis, an] : {std::pair{Axis::channel, "keys"}, std::pair{Axis::token, "values"}}) {
      const std::string sfx = std::string("/g32/") + an + ts;
      RegisterBenchmark(("quantize/kivi8" + sfx).c_str(), quantize_bench<8>, axis, t)->Unit(benchmark::kMillisecond)->UseRealTime();
      RegisterBenchmark(("quantize/kivi4" + sfx).c_str(), quantize_bench<4>, axis, t)->Unit(benchmark::kMillisecond)->UseRealTime();
      RegisterBenchmark(("quantize/kivi2" + sfx).c_str(), quantize_bench<2>, axis, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    }
    RegisterBenchmark(("dequantize/kivi8/g32" + ts).c_str(), dequantize_bench<8>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    RegisterBenchmark(("dequantize/kivi4/g32" + ts).c_str(), dequantize_bench<4>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    RegisterBenchmark(("dequantize/kivi2/g32" + ts).c_str(), dequantize_bench<2>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  RegisterBenchmark("append/kivi8/g32", append_bench<8>)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("append/kivi4/g32", append_bench<4>)->Unit(benchmark::kMicrosecond);
  RegisterBenchmark("append/kivi2/g32", append_bench<2>)->Unit(benchmark::kMicrosecond);
  for (int t : {1, 2}) {
    const std::string ts = "/n32768/t" + std::to_string(t);
    RegisterBenchmark(("dense/window32" + ts).c_str(), dense_window_bench, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    RegisterBenchmark(("compress/snapkv/fp16" + ts).c_str(), compress_bench<SnapKV, Fp16>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    RegisterBenchmark(("compress/snapkv/kivi8" + ts).c_str(), compress_bench<SnapKV, Kivi<8>>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    RegisterBenchmark(("compress/snapkv/kivi4" + ts).c_str(), compress_bench<SnapKV, Kivi<4>>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    RegisterBenchmark(("compress/snapkv/kivi2" + ts).c_str(), compress_bench<SnapKV, Kivi<2>>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    RegisterBenchmark(("compress/pyramidkv/kivi4" + ts).c_str(), compress_bench<PyramidKV, Kivi<4>>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
    RegisterBenchmark(("compress/streamingllm/kivi4" + ts).c_str(), compress_bench<StreamingLLM, Kivi<4>>, t)->Unit(benchmark::kMillisecond)->UseRealTime();
  }
  return true;
}();

}  // namespace
