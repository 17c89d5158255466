// qpkv/backend/cuda/attend.cuh - fused split-K decode attention on the packed cache (flash-decoding).
//
// Grid (chunk, KV head, sequence). A block owns one chunk of one KV head's tokens and serves the
// whole GQA group: every key and value element is read and dequantized once for all g query heads.
// Inside the block each warp takes units of 32 tokens in turn:
//   keys    lane = token: the lane dequantizes its token's row (PartReader::at, the CPU's decode rule)
//           and accumulates q_i . k for the g pre-scaled queries held in shared memory;
//   softmax per query, online: warp max, rescale the running sum and output by exp(m_old - m_new);
//   values  lane = channels [lane * D/32, ...): for each of the unit's tokens (warp-uniform loop)
//           acc[i][c] += p_i(token) * v(token, c), p broadcast with a shuffle.
// The fp16 residual is simply the tokens after the blocks. The block's warps are merged with the
// log-sum-exp rule in shared memory and leave one partial (m, l, acc) per (sequence, head, chunk);
// merge_chunks combines the chunks of each query head the same way and divides by the sum.
// Everything is float32. Chunks are sized so that the grid has about two blocks per SM; chunk
// boundaries depend only on the token count and the device's SM count, so results are reproducible
// on one device. Non-finite queries, logits or outputs set the error word (qpkv::Error on the host).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <vector>

#include "qpkv/backend/cuda/buffer.cuh"
#include "qpkv/backend/cuda/error.cuh"
#include "qpkv/backend/cuda/quantize.cuh"
#include "qpkv/backend/cuda/scores.cuh"
#include "qpkv/cache/layout.hpp"
#include "qpkv/core/dtype.hpp"

namespace qpkv::cuda {

/// One sequence's cache and its query/output (device pointers), as the attention kernel reads them.
template <Element T>
struct AttendJob {
  const std::uint8_t* data = nullptr;  ///< the cache allocation (CacheLayout with the capacities below)
  index_t blocks = 0;                  ///< filled blocks per head
  index_t residual = 0;                ///< filled residual slots per head
  index_t capacity_blocks = 0;
  index_t residual_capacity = 0;
  const T* q = nullptr;  ///< (q_heads, D)
  float* out = nullptr;  ///< (q_heads, D)
};

/// Geometry shared by all jobs of one call.
struct AttendGeometry {
  index_t kv_heads = 0, q_heads = 0, head_dim = 0, block_tokens = 1;
  std::size_t key_part = 0, value_part = 0;
};

/// Scratch memory of attend calls (partials, job table), reused across calls.
class AttendWorkspace {
 public:
  /// Makes sure `bytes` of partials and `jobs` job slots exist; returns the partials.
  float* partials(std::size_t floats) {
    if (partials_.size() < floats * sizeof(float)) partials_ = DeviceBuffer(floats * sizeof(float));
    return partials_.as<float>();
  }
  template <class Job>
  Job* jobs(std::size_t n) {
    if (jobs_.size() < n * sizeof(Job)) jobs_ = DeviceBuffer(n * sizeof(Job));
    return jobs_.as<Job>();
  }
  int sm_count() {
    if (sms_ == 0) {
      int dev = 0;
      QPKV_CUDA_CHECK(cudaGetDevice(&dev));
      QPKV_CUDA_CHECK(cudaDeviceGetAttribute(&sms_, cudaDevAttrMultiProcessorCount, dev));
    }
    return sms_;
  }

 private:
  DeviceBuffer partials_, jobs_;
  int sms_ = 0;
};

namespace kernels {

inline constexpr int kAttendWarps = 4;
inline constexpr int kMaxChannelsPerLane = static_cast<int>(kMaxHeadDim / 32);

__device__ inline float warp_max(float x) {
  for (int o = 16; o > 0; o /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ inline float warp_sum(float x) {
  for (int o = 16; o > 0; o /= 2) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <class KR, class VR, Element T, int MaxG>
__global__ void __launch_bounds__(kAttendWarps * 32)
    attend_chunks(KR kr, VR vr, AttendGeometry geo, const AttendJob<T>* jobs, index_t chunk_tokens, index_t chunks,
                  float scale, float* partials, unsigned* err) {
  __shared__ float qs[MaxG * kMaxHeadDim];
  __shared__ float buf[MaxG * kMaxHeadDim];
  __shared__ float wm[kAttendWarps][MaxG], wl[kAttendWarps][MaxG];
  const AttendJob<T> job = jobs[blockIdx.z];
  const index_t H = geo.kv_heads, D = geo.head_dim, B = geo.block_tokens, g = geo.q_heads / geo.kv_heads;
  const index_t h = blockIdx.y, chunk = blockIdx.x;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const std::size_t block_bytes = geo.key_part + geo.value_part;

  for (index_t i = threadIdx.x; i < g * D; i += blockDim.x) {
    const float x = to_float(job.q[h * g * D + i]);
    if (!isfinite(x)) atomicOr(err, kNonFiniteInput);
    qs[i] = x * scale;
  }
  __syncthreads();

  const index_t quantized = job.blocks * B, N = quantized + job.residual;
  const index_t t_begin = chunk * chunk_tokens, t_end = min(N, t_begin + chunk_tokens);
  const half* rk = reinterpret_cast<const half*>(job.data + static_cast<std::size_t>(H * job.capacity_blocks) * block_bytes);
  const half* rv = rk + H * job.residual_capacity * D;
  const index_t cpl = (D + 31) / 32;

  float m[MaxG], l[MaxG], acc[MaxG][kMaxChannelsPerLane];
#pragma unroll
  for (int i = 0; i < MaxG; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.0f;
#pragma unroll
    for (int k = 0; k < kMaxChannelsPerLane; ++k) acc[i][k] = 0.0f;
  }

  for (index_t u0 = t_begin + warp * 32; u0 < t_end; u0 += kAttendWarps * 32) {
    const index_t t = u0 + lane;
    const bool valid = t < t_end;
    float s[MaxG];
#pragma unroll
    for (int i = 0; i < MaxG; ++i) s[i] = 0.0f;
    if (valid) {
      if (t < quantized) {
        const std::uint8_t* kp = job.data + static_cast<std::size_t>(h * job.capacity_blocks + t / B) * block_bytes;
        const index_t tt = t % B;
        for (index_t c = 0; c < D; ++c) {
          const float kv = kr.at(kp, tt, c);
#pragma unroll
          for (int i = 0; i < MaxG; ++i)
            if (i < g) s[i] = fmaf(qs[i * D + c], kv, s[i]);
        }
      } else {
        const half* row = rk + (h * job.residual_capacity + (t - quantized)) * D;
        for (index_t c = 0; c < D; ++c) {
          const float kv = to_float(row[c]);
#pragma unroll
          for (int i = 0; i < MaxG; ++i)
            if (i < g) s[i] = fmaf(qs[i * D + c], kv, s[i]);
        }
      }
    }
    float p[MaxG];
#pragma unroll
    for (int i = 0; i < MaxG; ++i) {
      if (i >= g) break;
      const float x = valid ? s[i] : -INFINITY;
      const float mn = fmaxf(m[i], warp_max(x));
      const float alpha = m[i] == -INFINITY ? 0.0f : expf(m[i] - mn);
      p[i] = valid ? expf(x - mn) : 0.0f;
      l[i] = l[i] * alpha + warp_sum(p[i]);
#pragma unroll
      for (int k = 0; k < kMaxChannelsPerLane; ++k) acc[i][k] *= alpha;
      m[i] = mn;
    }
    const index_t n = t_end - u0 < 32 ? t_end - u0 : 32;
    for (index_t j = 0; j < n; ++j) {  // warp-uniform
      const index_t tj = u0 + j;
      float w[MaxG];
#pragma unroll
      for (int i = 0; i < MaxG; ++i) w[i] = i < g ? __shfl_sync(0xffffffffu, p[i], static_cast<int>(j)) : 0.0f;
      if (tj < quantized) {
        const std::uint8_t* vp =
            job.data + static_cast<std::size_t>(h * job.capacity_blocks + tj / B) * block_bytes + geo.key_part;
        const index_t tt = tj % B;
#pragma unroll
        for (int k = 0; k < kMaxChannelsPerLane; ++k) {
          const index_t c = lane * cpl + k;
          if (k < cpl && c < D) {
            const float v = vr.at(vp, tt, c);
#pragma unroll
            for (int i = 0; i < MaxG; ++i) acc[i][k] = fmaf(w[i], v, acc[i][k]);
          }
        }
      } else {
        const half* row = rv + (h * job.residual_capacity + (tj - quantized)) * D;
#pragma unroll
        for (int k = 0; k < kMaxChannelsPerLane; ++k) {
          const index_t c = lane * cpl + k;
          if (k < cpl && c < D) {
            const float v = to_float(row[c]);
#pragma unroll
            for (int i = 0; i < MaxG; ++i) acc[i][k] = fmaf(w[i], v, acc[i][k]);
          }
        }
      }
    }
  }

  // merge the warps (log-sum-exp), then write this chunk's partial
  if (lane == 0)
    for (int i = 0; i < MaxG; ++i) {
      wm[warp][i] = m[i];
      wl[warp][i] = l[i];
    }
  for (index_t i = threadIdx.x; i < g * D; i += blockDim.x) buf[i] = 0.0f;
  __syncthreads();
  float f[MaxG];
#pragma unroll
  for (int i = 0; i < MaxG; ++i) {
    float mm = -INFINITY;
    for (int w = 0; w < kAttendWarps; ++w) mm = fmaxf(mm, wm[w][i]);
    f[i] = m[i] == -INFINITY ? 0.0f : expf(m[i] - mm);
  }
  for (int w = 0; w < kAttendWarps; ++w) {
    if (warp == w) {
#pragma unroll
      for (int i = 0; i < MaxG; ++i) {
        if (i >= g) break;
#pragma unroll
        for (int k = 0; k < kMaxChannelsPerLane; ++k) {
          const index_t c = lane * cpl + k;
          if (k < cpl && c < D) buf[i * D + c] += f[i] * acc[i][k];
        }
      }
    }
    __syncthreads();
  }
  const std::size_t item = (static_cast<std::size_t>(blockIdx.z) * H + h) * chunks + chunk;
  float* pm = partials + item * static_cast<std::size_t>(g * (2 + D));
  if (threadIdx.x < g) {
    const int i = threadIdx.x;
    float mm = -INFINITY, ll = 0.0f;
    for (int w = 0; w < kAttendWarps; ++w) mm = fmaxf(mm, wm[w][i]);
    for (int w = 0; w < kAttendWarps; ++w)
      if (wm[w][i] != -INFINITY) ll += wl[w][i] * expf(wm[w][i] - mm);
    pm[i] = mm;
    pm[g + i] = ll;
  }
  for (index_t i = threadIdx.x; i < g * D; i += blockDim.x) pm[2 * g + i] = buf[i];
}

template <Element T>
__global__ void merge_chunks(AttendGeometry geo, const AttendJob<T>* jobs, index_t chunks, const float* partials,
                             unsigned* err) {
  const index_t H = geo.kv_heads, D = geo.head_dim, g = geo.q_heads / geo.kv_heads;
  const index_t qh = blockIdx.x, h = qh / g, i = qh % g;
  const AttendJob<T> job = jobs[blockIdx.y];
  const std::size_t stride = static_cast<std::size_t>(g * (2 + D));
  const float* base = partials + (static_cast<std::size_t>(blockIdx.y) * H + h) * chunks * stride;
  float mm = -INFINITY;
  for (index_t c = 0; c < chunks; ++c) mm = fmaxf(mm, base[c * stride + i]);
  float lsum = 0.0f;
  for (index_t c = 0; c < chunks; ++c) {
    const float mc = base[c * stride + i];
    if (mc != -INFINITY) lsum += expf(mc - mm) * base[c * stride + g + i];
  }
  if (threadIdx.x == 0 && (!(lsum > 0.0f) || !isfinite(lsum) || !isfinite(mm))) atomicOr(err, kNonFiniteAttention);
  const float inv = 1.0f / lsum;
  for (index_t d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.0f;
    for (index_t c = 0; c < chunks; ++c) {
      const float mc = base[c * stride + i];
      if (mc != -INFINITY) o += expf(mc - mm) * base[c * stride + 2 * g + i * D + d];
    }
    o *= inv;
    if (!isfinite(o)) atomicOr(err, kNonFiniteAttention);
    job.out[qh * D + d] = o;
  }
}

}  // namespace kernels

/// Enqueues attention for every job on `stream` and returns without waiting; device-side errors go
/// to `err` (read it with ErrorFlag::read, or ignore it in a benchmark loop). All jobs share `geo`.
template <class KQ, class VQ, Element T>
void attend_async(const KQ& kq, const VQ& vq, const AttendGeometry& geo, std::span<const AttendJob<T>> jobs,
                  float scale, AttendWorkspace& ws, unsigned* err, cudaStream_t stream = 0) {
  using qpkv::detail::concat;
  using qpkv::detail::require;
  const index_t H = geo.kv_heads, D = geo.head_dim, g = geo.q_heads / geo.kv_heads;
  require(D <= kMaxHeadDim, "head_dim", concat("<= ", kMaxHeadDim, " on the CUDA backend"), D);
  require(g >= 1 && g <= 16, "q_heads / kv_heads", "in [1, 16] on the CUDA backend", g);
  if (jobs.empty()) return;
  index_t max_n = 0;
  for (const auto& j : jobs) {
    require(j.blocks * geo.block_tokens + j.residual > 0, "cache", "at least one token (call compress first)", "an empty cache");
    max_n = std::max(max_n, j.blocks * geo.block_tokens + j.residual);
  }
  const index_t batch = static_cast<index_t>(jobs.size());
  const index_t target = 2 * ws.sm_count();
  index_t chunks = std::max<index_t>(1, (target + H * batch - 1) / (H * batch));
  constexpr index_t unit = kernels::kAttendWarps * 32;
  index_t chunk_tokens = (max_n + chunks - 1) / chunks;
  chunk_tokens = std::max<index_t>(unit, (chunk_tokens + unit - 1) / unit * unit);
  chunks = (max_n + chunk_tokens - 1) / chunk_tokens;
  float* partials = ws.partials(static_cast<std::size_t>(batch * H * chunks * g * (2 + D)));
  AttendJob<T>* dj = ws.jobs<AttendJob<T>>(jobs.size());
  QPKV_CUDA_CHECK(cudaMemcpyAsync(dj, jobs.data(), jobs.size() * sizeof(AttendJob<T>), cudaMemcpyHostToDevice, stream));
  const PartReader<KQ> kr(kq, geo.block_tokens, D);
  const PartReader<VQ> vr(vq, geo.block_tokens, D);
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(H), static_cast<unsigned>(batch));
  const auto launch = [&](auto max_g) {
    constexpr int MaxG = decltype(max_g)::value;
    kernels::attend_chunks<PartReader<KQ>, PartReader<VQ>, T, MaxG>
        <<<grid, kernels::kAttendWarps * 32, 0, stream>>>(kr, vr, geo, dj, chunk_tokens, chunks, scale, partials, err);
  };
  if (g <= 4) launch(std::integral_constant<int, 4>{});
  else if (g <= 8) launch(std::integral_constant<int, 8>{});
  else launch(std::integral_constant<int, 16>{});
  QPKV_CUDA_CHECK(cudaGetLastError());
  kernels::merge_chunks<T><<<dim3(static_cast<unsigned>(geo.q_heads), static_cast<unsigned>(batch)), 128, 0, stream>>>(
      geo, dj, chunks, partials, err);
  QPKV_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qpkv::cuda
