// cuda_quickstart.cu - the CPU quickstart's cache on the GPU: SnapKV + KIVI-4 over device memory.
#include <cstdio>
#include <vector>

#include "qpkv/backend/cuda/cuda.cuh"
#include "qpkv/qpkv.hpp"

int main() try {
  if (qpkv::cuda::device_count() == 0) return std::puts("no CUDA device: nothing to run"), 0;
  const qpkv::index_t kv_heads = 8, q_heads = 32, dim = 128, n = 4096;  // a Llama-3-8B layer, 4K prompt
  std::vector<float> host(static_cast<std::size_t>(q_heads * n * dim));
  for (std::size_t i = 0; i < host.size(); ++i) host[i] = static_cast<float>((i * 7919) % 1000) / 500.0f - 1.0f;
  // prompt keys, values and queries in device memory, [head][token][dim] (your model's tensors)
  qpkv::cuda::DeviceBuffer k(kv_heads * n * dim * 4), v(k.size()), q(host.size() * 4), qd(q_heads * dim * 4), out(qd.size());
  for (auto* b : {&k, &v, &q, &qd}) qpkv::cuda::upload(b->as<float>(), host.data(), b->size() / 4);
  qpkv::CompressedKV<qpkv::SnapKV, qpkv::Kivi<4>, qpkv::Kivi<4>, qpkv::backend::Cuda> cache({kv_heads, q_heads, dim});
  cache.compress(qpkv::view(k.as<float>(), kv_heads, n, dim), qpkv::view(v.as<float>(), kv_heads, n, dim),
                 qpkv::view(q.as<float>(), q_heads, n, dim), /*capacity=*/1024);
  cache.append(k.as<float>(), v.as<float>());  // one decode step: a new (kv_heads, dim) key and value
  cache.attend(qd.as<float>(), out.as<float>());  // (q_heads, dim) query -> (q_heads, dim) output
  std::printf("kept %lld of %lld tokens per KV head in %zu bytes (fp16: %lld)\n", static_cast<long long>(cache.tokens()),
              static_cast<long long>(n + 1), cache.bytes(), static_cast<long long>(2 * kv_heads * (n + 1) * dim * 2));
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
