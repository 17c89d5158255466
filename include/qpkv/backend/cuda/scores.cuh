// qpkv/backend/cuda/scores.cuh - the attention scores SnapKV, PyramidKV and H2O rank tokens by.
//
// The same quantities as select/scoring.hpp (see its comment for the reference code): observing
// rows r (the last W queries for SnapKV/PyramidKV, all N for H2O) take a float32 softmax of
// q.k / sqrt(D) over their visible keys; a key's score is the sum of its probabilities over the rows
// and over the query heads of its GQA group (each head summed first, then added, as the CPU does);
// SnapKV/PyramidKV then pool along the tokens with the CPU's exact loop (pool_scores).
//
// Visible keys of row r: r < full_rows ? N : base + r + 1 (SnapKV: base = N - W; H2O causal:
// base = 0; H2O window_block: full_rows = N - W).
//
// Two passes, so that no row x key matrix is ever stored (H2O's is N x N):
//   row_stats    block = (query head, 8 rows, key split), one warp per row, keys streamed through
//                shared memory in tiles of 32 (lane = key): online max and sum of exp; with few rows
//                (SnapKV's W) the keys are split across blocks and merge_row_stats combines the
//                splits -> m[r], l[r].
//   column_sums  block = (KV head, 32 keys), the key tile stays in shared memory while the group's
//                query rows stream past 8 at a time (warp = row, lane = key): p = exp(x - m) / l, the
//                8 rows summed per key in row order. Row chunks that cannot see the tile are skipped.
// q.k is recomputed in the second pass: it is cheaper than writing and reading the probabilities.
// Summation order differs from the CPU's Eigen GEMM, so scores agree to float32 rounding (the
// tests use 1e-4 relative), not bit for bit; pooling of the same scores is bit-identical.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "qpkv/backend/cuda/buffer.cuh"
#include "qpkv/backend/cuda/error.cuh"
#include "qpkv/core/dtype.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/select/score_options.hpp"

namespace qpkv::cuda {

/// Largest head_dim the score and attention kernels take (shared-memory tiles are sized by it).
inline constexpr index_t kMaxHeadDim = 256;

/// Device scores, [kv_head][prefix] floats.
struct DeviceScores {
  DeviceBuffer buffer;
  index_t heads = 0;
  index_t prefix = 0;

  [[nodiscard]] const float* data() const { return buffer.as<float>(); }
  [[nodiscard]] float* data() { return buffer.as<float>(); }
  /// Host copy, [kv_head][prefix] row-major.
  [[nodiscard]] std::vector<float> to_host(cudaStream_t stream = 0) const {
    std::vector<float> h(static_cast<std::size_t>(heads * prefix));
    download(h.data(), data(), h.size(), stream);
    return h;
  }
};

/// Which rows observe and what each sees.
struct ObservingRows {
  index_t q0 = 0;         ///< query token of observing row 0
  index_t rows = 0;       ///< M
  index_t base = 0;       ///< visible(r) = base + r + 1 ...
  index_t full_rows = 0;  ///< ... except rows r < full_rows, which see all N keys

  __host__ __device__ index_t visible(index_t r, index_t n) const { return r < full_rows ? n : base + r + 1; }
};

namespace kernels {

inline constexpr int kTile = 32;  // keys per tile (= lanes)
inline constexpr int kRows = 8;   // query rows per block (= warps)

/// Loads keys [t0, t0 + 32) of KV head h as floats into s[32][D + 1] (zeros past N).
template <Element T>
__device__ void load_key_tile(const TensorView<T>& keys, index_t h, index_t t0, float* s) {
  const index_t D = keys.dim;
  for (index_t i = threadIdx.x; i < kTile * D; i += blockDim.x) {
    const index_t j = i / D, c = i % D, t = t0 + j;
    s[j * (D + 1) + c] = t < keys.tokens ? to_float(keys.data[h * keys.head_stride + t * keys.token_stride + c]) : 0.0f;
  }
}

template <Element T>
__device__ void load_query_rows(const TensorView<T>& q, index_t h, index_t row0, index_t rows, float* s) {
  const index_t D = q.dim;
  for (index_t i = threadIdx.x; i < kRows * D; i += blockDim.x) {
    const index_t r = i / D, c = i % D;
    s[r * D + c] = row0 + r < rows ? to_float(q.data[h * q.head_stride + (row0 + r) * q.token_stride + c]) : 0.0f;
  }
}

__device__ inline float dot_rows(const float* q, const float* k, index_t D) {
  float s = 0.0f;
  for (index_t c = 0; c < D; ++c) s = fmaf(q[c], k[c], s);
  return s;
}

template <Element T>
__global__ void row_stats(TensorView<T> keys, TensorView<T> queries, ObservingRows obs, index_t split_keys, float* m_out,
                          float* l_out) {
  extern __shared__ float smem[];
  const index_t D = keys.dim, N = keys.tokens, group = queries.heads / keys.heads;
  float* ks = smem;                        // [32][D + 1]
  float* qs = smem + kTile * (D + 1);      // [8][D]
  const index_t h = blockIdx.y, kvh = h / group, r0 = static_cast<index_t>(blockIdx.x) * kRows;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const index_t r = r0 + warp;
  TensorView<T> qv = queries;
  qv.data = queries.data + obs.q0 * queries.token_stride;
  load_query_rows(qv, h, r0, obs.rows, qs);
  const float scale = sqrtf(static_cast<float>(D));
  const index_t vis = r < obs.rows ? obs.visible(r, N) : 0;
  index_t max_vis = 0;
  for (index_t i = 0; i < kRows && r0 + i < obs.rows; ++i) max_vis = max(max_vis, obs.visible(r0 + i, N));
  float m = -INFINITY, l = 0.0f;
  const index_t k_begin = static_cast<index_t>(blockIdx.z) * split_keys;
  const index_t k_end = min(max_vis, k_begin + split_keys);
  for (index_t t0 = k_begin; t0 < k_end; t0 += kTile) {
    __syncthreads();
    load_key_tile(keys, kvh, t0, ks);
    __syncthreads();
    const index_t t = t0 + lane;
    if (t < vis) {
      const float x = dot_rows(qs + warp * D, ks + lane * (D + 1), D) / scale;
      const float mn = fmaxf(m, x);
      l = (m == -INFINITY ? 0.0f : l * expf(m - mn)) + expf(x - mn);
      m = mn;
    }
  }
  // merge the 32 lanes' (m, l)
  for (int o = 16; o > 0; o /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
    const float mn = fmaxf(m, m2);
    if (mn != -INFINITY) {
      l = (m == -INFINITY ? 0.0f : l * expf(m - mn)) + (m2 == -INFINITY ? 0.0f : l2 * expf(m2 - mn));
      m = mn;
    }
  }
  if (lane == 0 && r < obs.rows) {
    const std::size_t o = (static_cast<std::size_t>(h) * obs.rows + r) * gridDim.z + blockIdx.z;
    m_out[o] = m;
    l_out[o] = l;
  }
}

/// Combines the key splits of row_stats, in split order: (m, l) per (query head, row).
template <int = 0>
__global__ void merge_row_stats(const float* m_part, const float* l_part, index_t n, index_t splits, float* m_out,
                                float* l_out) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= n) return;
  float m = -INFINITY;
  for (index_t s = 0; s < splits; ++s) m = fmaxf(m, m_part[id * splits + s]);
  float l = 0.0f;
  for (index_t s = 0; s < splits; ++s) {
    const float ms = m_part[id * splits + s];
    if (ms != -INFINITY) l += l_part[id * splits + s] * expf(ms - m);
  }
  m_out[id] = m;
  l_out[id] = l;
}

template <Element T>
__global__ void column_sums(TensorView<T> keys, TensorView<T> queries, ObservingRows obs, index_t prefix,
                            const float* m_in, const float* l_in, float* scores, unsigned* err) {
  extern __shared__ float smem[];
  const index_t D = keys.dim, N = keys.tokens, group = queries.heads / keys.heads;
  float* ks = smem;                     // [32][D + 1]
  float* qs = ks + kTile * (D + 1);     // [8][D]
  float* ps = qs + kRows * D;           // [8][32]
  const index_t kvh = blockIdx.y, t0 = static_cast<index_t>(blockIdx.x) * kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  load_key_tile(keys, kvh, t0, ks);
  TensorView<T> qv = queries;
  qv.data = queries.data + obs.q0 * queries.token_stride;
  const float scale = sqrtf(static_cast<float>(D));
  float acc = 0.0f;
  for (index_t h = kvh * group; h < (kvh + 1) * group; ++h) {
    float head_acc = 0.0f;
    for (index_t r0 = 0; r0 < obs.rows; r0 += kRows) {
      const index_t rl = min(r0 + kRows, obs.rows) - 1;
      const index_t max_vis = r0 < obs.full_rows ? N : obs.base + rl + 1;
      if (max_vis <= t0) continue;  // no row of this chunk sees the tile (block-uniform)
      __syncthreads();
      load_query_rows(qv, h, r0, obs.rows, qs);
      __syncthreads();
      const index_t r = r0 + warp, t = t0 + lane;
      float p = 0.0f;
      if (r < obs.rows && t < obs.visible(r, N)) {
        const float x = dot_rows(qs + warp * D, ks + lane * (D + 1), D) / scale;
        p = expf(x - m_in[h * obs.rows + r]) / l_in[h * obs.rows + r];
      }
      ps[warp * kTile + lane] = p;
      __syncthreads();
      if (threadIdx.x < kTile)
        for (int w = 0; w < kRows; ++w) head_acc += ps[w * kTile + threadIdx.x];
    }
    acc += head_acc;
  }
  const index_t t = t0 + threadIdx.x;
  if (threadIdx.x < kTile && t < prefix) {
    if (!isfinite(acc)) atomicOr(err, kNonFiniteScore);
    scores[kvh * prefix + t] = acc;
  }
}

/// The CPU's pool_scores loop, element for element (same order of additions).
// a template so that every TU including this header shares one definition
template <int = 0>
__global__ void pool(const float* in, float* out, index_t heads, index_t n, index_t kernel, bool avg) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(heads) * n) return;
  const index_t i = id % n, h = id / n, pad = kernel / 2;
  const index_t lo = i - pad > 0 ? i - pad : 0, hi = i + pad + 1 < n ? i + pad + 1 : n;
  const float* x = in + h * n;
  if (avg) {
    float sum = 0.0f;
    for (index_t j = lo; j < hi; ++j) sum += x[j];
    out[id] = sum / static_cast<float>(kernel);
  } else {
    float m = -INFINITY;
    for (index_t j = lo; j < hi; ++j) m = fmaxf(m, x[j]);
    out[id] = m;
  }
}

}  // namespace kernels

namespace detail {

/// Unpooled attention sums over the observing rows; inputs are device views, validated by the caller.
template <Element T>
DeviceScores attention_sums(const TensorView<T>& keys, const TensorView<T>& queries, ObservingRows obs, index_t prefix,
                            unsigned* err, cudaStream_t stream) {
  const index_t D = keys.dim;
  qpkv::detail::require(D <= kMaxHeadDim, "keys.dim", qpkv::detail::concat("<= ", kMaxHeadDim, " on the CUDA backend"), D);
  DeviceScores s{make_device<float>(static_cast<std::size_t>(keys.heads * prefix)), keys.heads, prefix};
  if (prefix == 0) return s;
  // Split the keys of pass 1 when there are few observing rows (SnapKV: W), so that a long prompt
  // still gives the device enough blocks: about 2048 blocks, at least 2048 keys per split.
  const index_t row_blocks = (obs.rows + kernels::kRows - 1) / kernels::kRows * queries.heads;
  const index_t max_splits = std::max<index_t>(1, (keys.tokens + 2047) / 2048);
  const index_t splits = std::min<index_t>(max_splits, std::max<index_t>(1, 2048 / row_blocks));
  const index_t split_keys = (keys.tokens + splits - 1) / splits;
  const std::size_t stats = static_cast<std::size_t>(queries.heads * obs.rows);
  DeviceBuffer m = make_device<float>(stats), l = make_device<float>(stats);
  DeviceBuffer mp, lp;
  if (splits > 1) {
    mp = make_device<float>(stats * static_cast<std::size_t>(splits));
    lp = make_device<float>(stats * static_cast<std::size_t>(splits));
  }
  const std::size_t stats_smem = static_cast<std::size_t>(kernels::kTile * (D + 1) + kernels::kRows * D) * sizeof(float);
  const dim3 g1(static_cast<unsigned>((obs.rows + kernels::kRows - 1) / kernels::kRows), static_cast<unsigned>(queries.heads),
                static_cast<unsigned>(splits));
  kernels::row_stats<T><<<g1, kernels::kRows * 32, stats_smem, stream>>>(
      keys, queries, obs, split_keys, splits > 1 ? mp.as<float>() : m.as<float>(), splits > 1 ? lp.as<float>() : l.as<float>());
  QPKV_CUDA_CHECK(cudaGetLastError());
  if (splits > 1) {
    kernels::merge_row_stats<><<<kernels::blocks_for(static_cast<long long>(stats)), kernels::kThreads, 0, stream>>>(
        mp.as<float>(), lp.as<float>(), static_cast<index_t>(stats), splits, m.as<float>(), l.as<float>());
    QPKV_CUDA_CHECK(cudaGetLastError());
  }
  const std::size_t sums_smem = stats_smem + static_cast<std::size_t>(kernels::kRows * kernels::kTile) * sizeof(float);
  const dim3 g2(static_cast<unsigned>((prefix + kernels::kTile - 1) / kernels::kTile), static_cast<unsigned>(keys.heads));
  kernels::column_sums<T><<<g2, kernels::kRows * 32, sums_smem, stream>>>(keys, queries, obs, prefix, m.as<float>(),
                                                                           l.as<float>(), s.data(), err);
  QPKV_CUDA_CHECK(cudaGetLastError());
  return s;
}

inline DeviceScores pooled(const DeviceScores& in, index_t kernel, Pooling pooling, cudaStream_t stream) {
  DeviceScores out{make_device<float>(static_cast<std::size_t>(in.heads * in.prefix)), in.heads, in.prefix};
  if (in.heads * in.prefix == 0) return out;
  kernels::pool<><<<kernels::blocks_for(in.heads * in.prefix), kernels::kThreads, 0, stream>>>(
      in.data(), out.data(), in.heads, in.prefix, kernel, pooling == Pooling::avg);
  QPKV_CUDA_CHECK(cudaGetLastError());
  return out;
}

}  // namespace detail

/// SnapKV / PyramidKV scores (device views; window < keys.tokens): window attention sums, pooled.
/// err: device error word (kNonFiniteScore).
template <Element T>
DeviceScores snapkv_scores(const TensorView<T>& keys, const TensorView<T>& queries, index_t window, index_t kernel,
                           Pooling pooling, unsigned* err, cudaStream_t stream = 0) {
  const index_t n = keys.tokens, prefix = n - window;
  const ObservingRows obs{queries.tokens - window, window, prefix, 0};
  const DeviceScores sums = detail::attention_sums(keys, queries, obs, prefix, err, stream);
  return detail::pooled(sums, kernel, pooling, stream);
}

/// SnapKV's unpooled window attention sums (the CPU's window_attention_sums).
template <Element T>
DeviceScores window_attention_sums(const TensorView<T>& keys, const TensorView<T>& queries, index_t window,
                                   unsigned* err, cudaStream_t stream = 0) {
  const index_t n = keys.tokens, prefix = n - window;
  return detail::attention_sums(keys, queries, ObservingRows{queries.tokens - window, window, prefix, 0}, prefix, err, stream);
}

/// H2O scores: column sums of the attention of all N prompt queries.
template <Element T>
DeviceScores h2o_scores(const TensorView<T>& keys, const TensorView<T>& queries, index_t window, H2OMask mask,
                        unsigned* err, cudaStream_t stream = 0) {
  const index_t n = keys.tokens, prefix = n - window;
  const ObservingRows obs{queries.tokens - n, n, 0, mask == H2OMask::window_block ? prefix : 0};
  return detail::attention_sums(keys, queries, obs, prefix, err, stream);
}

}  // namespace qpkv::cuda
