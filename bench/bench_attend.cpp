// Decode attention (one query per head, 32 query heads over 8 KV heads, head_dim 128) on packed
// caches, and the machine's read bandwidth in the same binary.
//   attend/fp16/n<tokens>/t<threads>
//   attend/kivi<bits>/g<group>/n<tokens>/t<threads>        default (exact) precision
//   attend/kivi<bits>/g<group>/n<tokens>/t<threads>/fast   AttendPrecision::fast (VNNI q.k)
//   membw/read/t<threads>                                  sum over a 1 GiB buffer
// Counters: bytes (the cache's packed bytes, all read once per call) and GB/s = bytes / time.
// scripts/bench turns one run's JSON into the ratios (vs fp16, vs membw).
#include <benchmark/benchmark.h>

#include <map>
#include <memory>
#include <string>

#include "bench_common.hpp"
#include "qpkv/backend/cpu/simd.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/select/keep_all.hpp"

namespace {

using namespace qpkv;
using bench::Layer;

/// A built cache and its attend(), type-erased so all variants share one map.
struct AnyAttend {
  virtual ~AnyAttend() = default;
  virtual void attend(const float* q, float* out) const = 0;
  virtual std::size_t bytes() const = 0;
};

template <class Scheme>
struct Built : AnyAttend {
  CompressedKV<KeepAll, Scheme> cache;
  Built(const Layer& l, AttendPrecision p)
      : cache(Shape{Layer::kv_heads, Layer::q_heads, Layer::dim}, KeepAll{}, Scheme{}, Scheme{}, CacheOptions{0, 0.0f, p}) {
    cache.compress(view(l.keys.data(), Layer::kv_heads, l.tokens, Layer::dim),
                   view(l.values.data(), Layer::kv_heads, l.tokens, Layer::dim), l.tokens);
  }
  void attend(const float* q, float* out) const override { cache.attend(q, out); }
  std::size_t bytes() const override { return cache.bytes(); }
};

/// Caches are built once per (kind, tokens) and kept for the whole run (the largest layer's
/// float inputs are dropped as soon as its caches exist).
const AnyAttend& get(const std::string& kind, long n) {
  static std::map<std::string, std::unique_ptr<AnyAttend>> built;
  static std::map<long, std::unique_ptr<Layer>> layers;
  const std::string key = kind + "/" + std::to_string(n);
  auto it = built.find(key);
  if (it != built.end()) return *it->second;
  auto& layer = layers[n];
  if (!layer) layer = std::make_unique<Layer>(n);
  bench::set_threads(2);
  std::unique_ptr<AnyAttend> c;
  const AttendPrecision p = kind.ends_with("/fast") ? AttendPrecision::fast : AttendPrecision::exact;
  const std::string base = kind.substr(0, kind.find("/fast"));
  if (base == "fp16") c = std::make_unique<Built<Fp16>>(*layer, p);
  else if (base == "kivi8/g32") c = std::make_unique<Built<Kivi<8, 8, 32>>>(*layer, p);
  else if (base == "kivi8/g64") c = std::make_unique<Built<Kivi<8, 8, 64>>>(*layer, p);
  else if (base == "kivi4/g32") c = std::make_unique<Built<Kivi<4, 4, 32>>>(*layer, p);
  else if (base == "kivi4/g64") c = std::make_unique<Built<Kivi<4, 4, 64>>>(*layer, p);
  else if (base == "kivi2/g32") c = std::make_unique<Built<Kivi<2, 2, 32>>>(*layer, p);
  else c = std::make_unique<Built<Kivi<2, 2, 64>>>(*layer, p);
  return *(built[key] = std::move(c));
}

void attend_bench(benchmark::State& state, const std::string& kind, long n, int threads) {
  const AnyAttend& c = get(kind, n);
  bench::set_threads(threads);
  std::vector<float> q(static_cast<std::size_t>(Layer::q_heads * Layer::dim)), out(q.size());
  bench::fill(q, 7);
  for (auto _ : state) {
    c.attend(q.data(), out.data());
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["bytes"] = static_cast<double>(c.bytes());
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(c.bytes()) * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.SetLabel(cpu::simd_name());
}

/// Read bandwidth: sum of 64-bit words over 1 GiB, split across threads.
void membw_bench(benchmark::State& state, int threads) {
  static std::vector<std::uint64_t> buf;
  const std::size_t n = (std::size_t{1} << 30) / sizeof(std::uint64_t);
  if (buf.empty()) {
    buf.resize(n);
    bench::set_threads(2);
#if defined(_OPENMP)
#pragma omp parallel for schedule(static)
#endif
    for (std::size_t i = 0; i < n; ++i) buf[i] = i;  // first touch in parallel
  }
  bench::set_threads(threads);
  for (auto _ : state) {
    std::uint64_t total = 0;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) reduction(+ : total)
#endif
    for (std::size_t i = 0; i < n; ++i) total += buf[i];
    benchmark::DoNotOptimize(total);
  }
  state.counters["bytes"] = static_cast<double>(n * sizeof(std::uint64_t));
  state.counters["GB/s"] = benchmark::Counter(static_cast<double>(n * sizeof(std::uint64_t)) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

const bool registered = [] {
  for (int t : {1, 2})
    benchmark::RegisterBenchmark(("membw/read/t" + std::to_string(t)).c_str(), membw_bench, t)
        ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.5);
  const char* kinds[] = {"fp16", "kivi8/g32", "kivi8/g64", "kivi4/g32", "kivi4/g64", "kivi2/g32", "kivi2/g64"};
  for (long n : {4096L, 16384L, 32768L, 131072L})
    for (int t : {1, 2})
      for (const char* k : kinds)
        for (bool fast : {false, true}) {
          if (fast && std::string(k) == "fp16") continue;
          const std::string kind = std::string(k) + (fast ? "/fast" : "");
          const std::string name = "attend/" + std::string(k) + "/n" + std::to_string(n) + "/t" + std::to_string(t) + (fast ? "/fast" : "");
          benchmark::RegisterBenchmark(name.c_str(), attend_bench, kind, n, t)
              ->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(0.2);
        }
  return true;
}();

}  // namespace
