// CUDA backend benchmarks (qpkv_bench_cuda): decode attention and compress on the device, timed
// with CUDA events (manual time), for a Llama-3-8B-like layer (8 KV heads, 32 query heads, D 128).
//
//   BM_CudaAttend<Scheme>/N/batch   N in {32K, 128K} tokens, batch 1 or 16 sequences (one batched
//                                   launch), 16/8/4/2-bit. Counters: GB/s = cache bytes read per
//                                   second; pct_peak = that over the device's theoretical bandwidth
//                                   (memory clock x 2 (DDR) x bus width / 8, from
//                                   cudaDeviceGetAttribute; CUDA 13 dropped cudaDeviceProp::memoryClockRate).
//   BM_CudaCompress<Selector>/N     one layer of N fp16 tokens -> KIVI-4 at capacity 4096, the whole
//                                   compress() call (selection, top-k, gather, quantize and the
//                                   validation read-backs). H2O is O(N^2): its 128K case runs once.
// Without a device every benchmark reports "no CUDA device" and does nothing.
#include <benchmark/benchmark.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "qpkv/backend/cuda/cuda.cuh"
#include "qpkv/qpkv.hpp"

namespace {

using qpkv::index_t;
namespace cu = qpkv::cuda;

constexpr index_t kKvHeads = 8, kQHeads = 32, kDim = 128;

bool have_device(benchmark::State& state) {
  if (cu::device_count() > 0) return true;
  state.SkipWithError("no CUDA device");
  return false;
}

/// Theoretical DRAM bandwidth of the current device in bytes/s.
double peak_bandwidth() {
  int dev = 0, clock_khz = 0, bus_bits = 0;
  QPKV_CUDA_CHECK(cudaGetDevice(&dev));
  QPKV_CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, dev));
  QPKV_CUDA_CHECK(cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, dev));
  return static_cast<double>(clock_khz) * 1e3 * 2.0 * bus_bits / 8.0;
}

/// Deterministic values in about [-1.7, 1.7] (a hash; the distribution does not matter for speed).
template <class T>
__global__ void fill(T* x, std::size_t n, std::uint32_t seed) {
  const std::size_t i = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  std::uint32_t h = static_cast<std::uint32_t>(i) * 2654435761u ^ seed * 0x9E3779B9u;
  h ^= h >> 15;
  h *= 0x2c1b3c6du;
  h ^= h >> 12;
  const float a = static_cast<float>(h & 0xffffu) / 65536.0f, b = static_cast<float>(h >> 16) / 65536.0f;
  x[i] = qpkv::from_float<T>(1.7f * (a + b - 1.0f));
}

template <class T>
cu::DeviceBuffer random_device(std::size_t n, std::uint32_t seed) {
  cu::DeviceBuffer b = cu::make_device<T>(n);
  fill<T><<<static_cast<unsigned>((n + 255) / 256), 256>>>(b.as<T>(), n, seed);
  QPKV_CUDA_CHECK(cudaGetLastError());
  return b;
}

/// Elapsed milliseconds of fn() on stream 0, by CUDA events.
template <class Fn>
double time_ms(Fn&& fn) {
  cudaEvent_t start, stop;
  QPKV_CUDA_CHECK(cudaEventCreate(&start));
  QPKV_CUDA_CHECK(cudaEventCreate(&stop));
  QPKV_CUDA_CHECK(cudaEventRecord(start));
  fn();
  QPKV_CUDA_CHECK(cudaEventRecord(stop));
  QPKV_CUDA_CHECK(cudaEventSynchronize(stop));
  float ms = 0;
  QPKV_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
  QPKV_CUDA_CHECK(cudaEventDestroy(start));
  QPKV_CUDA_CHECK(cudaEventDestroy(stop));
  return ms;
}

template <class Scheme>
void BM_CudaAttend(benchmark::State& state) {
  if (!have_device(state)) return;
  using Cache = qpkv::CompressedKV<qpkv::KeepAll, Scheme, Scheme, qpkv::backend::Cuda>;
  const index_t n = state.range(0), batch = state.range(1);
  const qpkv::Shape shape{kKvHeads, kQHeads, kDim};
  std::vector<std::unique_ptr<Cache>> caches;
  {
    const std::size_t elems = static_cast<std::size_t>(kKvHeads * n * kDim);
    const cu::DeviceBuffer k = random_device<qpkv::half>(elems, 1), v = random_device<qpkv::half>(elems, 2);
    for (index_t b = 0; b < batch; ++b) {
      caches.push_back(std::make_unique<Cache>(shape));
      caches.back()->compress(qpkv::view(k.as<qpkv::half>(), kKvHeads, n, kDim), qpkv::view(v.as<qpkv::half>(), kKvHeads, n, kDim), 0);
    }
  }
  const cu::DeviceBuffer q = random_device<float>(static_cast<std::size_t>(batch * kQHeads * kDim), 3);
  cu::DeviceBuffer out = cu::make_device<float>(static_cast<std::size_t>(batch * kQHeads * kDim));
  std::vector<cu::AttendJob<float>> jobs;
  double bytes = 0;
  for (index_t b = 0; b < batch; ++b) {
    jobs.push_back(caches[b]->attend_job(q.as<float>() + b * kQHeads * kDim, out.as<float>() + b * kQHeads * kDim));
    bytes += static_cast<double>(caches[b]->bytes());
  }
  cu::AttendWorkspace ws;
  cu::ErrorFlag flag(0);
  const Cache& c0 = *caches[0];
  const auto run = [&] {
    cu::attend_async(c0.keys_quantizer(), c0.values_quantizer(), c0.geometry(), std::span<const cu::AttendJob<float>>(jobs),
                     c0.softmax_scale(), ws, flag.device());
  };
  run();  // warm-up (allocates the workspace)
  qpkv::cuda::detail::throw_flags(flag.read(0), "bench attend");
  double total_ms = 0;
  for (auto _ : state) {
    const double ms = time_ms(run);
    total_ms += ms;
    state.SetIterationTime(ms * 1e-3);
  }
  const double seconds = total_ms * 1e-3 / static_cast<double>(state.iterations());
  state.counters["cache_MB"] = bytes * 1e-6;
  state.counters["GB/s"] = bytes / seconds * 1e-9;
  state.counters["pct_peak"] = 100.0 * bytes / seconds / peak_bandwidth();
}

template <class Selector>
void BM_CudaCompress(benchmark::State& state) {
  if (!have_device(state)) return;
  using Cache = qpkv::CompressedKV<Selector, qpkv::Kivi<4>, qpkv::Kivi<4>, qpkv::backend::Cuda>;
  const index_t n = state.range(0), capacity = 4096;
  const std::size_t kv = static_cast<std::size_t>(kKvHeads * n * kDim), qn = static_cast<std::size_t>(kQHeads * n * kDim);
  const cu::DeviceBuffer k = random_device<qpkv::half>(kv, 1), v = random_device<qpkv::half>(kv, 2), q = random_device<qpkv::half>(qn, 3);
  const auto kview = qpkv::view(k.as<qpkv::half>(), kKvHeads, n, kDim), vview = qpkv::view(v.as<qpkv::half>(), kKvHeads, n, kDim);
  const auto qview = qpkv::view(q.as<qpkv::half>(), kQHeads, n, kDim);
  Cache cache(qpkv::Shape{kKvHeads, kQHeads, kDim});
  const qpkv::LayerInfo layer{15, 32};
  for (auto _ : state) state.SetIterationTime(time_ms([&] { cache.compress(kview, vview, qview, capacity, layer); }) * 1e-3);
  state.counters["tokens_kept"] = static_cast<double>(cache.tokens());
  state.counters["cache_MB"] = static_cast<double>(cache.bytes()) * 1e-6;
}

void attend_args(benchmark::internal::Benchmark* b) {
  for (long n : {32768L, 131072L})
    for (long batch : {1L, 16L}) b->Args({n, batch});
  b->ArgNames({"N", "batch"})->UseManualTime()->Unit(benchmark::kMicrosecond);
}

BENCHMARK_TEMPLATE(BM_CudaAttend, qpkv::Kivi<16>)->Apply(attend_args);
BENCHMARK_TEMPLATE(BM_CudaAttend, qpkv::Kivi<8>)->Apply(attend_args);
BENCHMARK_TEMPLATE(BM_CudaAttend, qpkv::Kivi<4>)->Apply(attend_args);
BENCHMARK_TEMPLATE(BM_CudaAttend, qpkv::Kivi<2>)->Apply(attend_args);

BENCHMARK_TEMPLATE(BM_CudaCompress, qpkv::SnapKV)->Arg(131072)->ArgName("N")->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_CudaCompress, qpkv::PyramidKV)->Arg(131072)->ArgName("N")->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_CudaCompress, qpkv::StreamingLLM)->Arg(131072)->ArgName("N")->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_CudaCompress, qpkv::H2O)->Arg(32768)->ArgName("N")->UseManualTime()->Unit(benchmark::kMillisecond);
BENCHMARK_TEMPLATE(BM_CudaCompress, qpkv::H2O)->Arg(131072)->ArgName("N")->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);

}  // namespace
