// qpkv/backend/cuda/quantize.cuh - quantize + pack cache parts on the device, and read them back.
//
// The bytes are the CPU's (docs/format.md): the per-element rules are the QPKV_HD functions of
// quant/affine.hpp (minmax_params, encode, decode) and quant/pack.hpp (pack, unpack_one), compiled
// here for the device, so a device cache copied to the host equals the CPU cache byte for byte.
//
// Kernels (one thread per 8 channels, because 8 codes of b bits fill exactly b whole bytes: each
// thread owns its bytes and no two threads write the same byte):
//   Axis::channel  thread = (head, block, token group, 8 channels): min/max over the group's tokens
//                  for its 8 channels, writes their 8 (scale, min) pairs, then packs 8 codes per token.
//   Axis::token    thread = (head, block, token, 8 channels): parameters of the channel groups its 8
//                  channels touch (recomputed by each thread that touches a group - a group is a
//                  few cache lines - and written by the thread owning the group's first channel).
//   Fp16           thread = one element, round to nearest even.
// The allocation is zeroed first (cudaMemsetAsync), so padding bytes are 0 as on the CPU.
// Supported: Affine<Bits, ScaleT> with ZeroPoint::minmax and no outliers, and Fp16. HQQ zero
// points and dense-and-sparse outliers run on the CPU only (validated: qpkv::Error).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "qpkv/backend/cuda/buffer.cuh"
#include "qpkv/backend/cuda/error.cuh"
#include "qpkv/core/dtype.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/quant/affine.hpp"
#include "qpkv/quant/affine_quantizer.hpp"
#include "qpkv/quant/fp16.hpp"
#include "qpkv/quant/pack.hpp"

namespace qpkv::cuda {

template <class Q>
struct is_affine : std::false_type {};
template <int B, class S>
struct is_affine<Affine<B, S>> : std::true_type {};

/// Throws qpkv::Error unless the CUDA backend has kernels for quantizer q (role: "key_quantizer").
template <class Q>
void require_supported(const Q& q, const char* role) {
  if constexpr (is_affine<Q>::value) {
    if (q.zero_point != ZeroPoint::minmax)
      throw Error(qpkv::detail::concat("qpkv: ", role, ".zero_point: expected minmax on the CUDA backend, got hqq (HQQ runs on the CPU backend only)"));
    if (q.outliers.fraction > 0.0)
      throw Error(qpkv::detail::concat("qpkv: ", role, ".outliers.fraction: expected 0 on the CUDA backend, got ", q.outliers.fraction,
                                       " (dense-and-sparse outliers run on the CPU backend only)"));
  } else {
    static_assert(std::is_same_v<Q, Fp16>, "qpkv::cuda: the CUDA backend supports qpkv::Affine<Bits, ScaleT> and qpkv::Fp16 quantizers");
  }
}

/// Rows of one tensor as kernels read them: row i of head h is
///   data + h * head_stride + (index ? index[h * index_stride + i] : i) * token_stride.
/// `index` (device memory) gathers the kept tokens of a selection without a copy.
template <Element T>
struct Rows {
  const T* data = nullptr;
  index_t head_stride = 0;
  index_t token_stride = 0;
  const index_t* index = nullptr;
  index_t index_stride = 0;
  index_t first = 0;  ///< added to i (rows of a later block)

  __device__ const T* row(index_t h, index_t i) const {
    const index_t t = index ? index[h * index_stride + first + i] : first + i;
    return data + h * head_stride + t * token_stride;
  }
};

/// Where parts go: part (h, b) is at base + (h * capacity_blocks + first + b) * block_bytes + offset.
struct PartTarget {
  std::uint8_t* base = nullptr;
  std::size_t block_bytes = 0;
  index_t capacity_blocks = 0;
  index_t first = 0;
  std::size_t offset = 0;

  __device__ std::uint8_t* part(index_t h, index_t b) const {
    return base + static_cast<std::size_t>(h * capacity_blocks + first + b) * block_bytes + offset;
  }
};

/// Device-side reader of one quantizer's parts: at(part, t, c) is the value the part stores for
/// token t, channel c - the CPU's decode() element for element.
template <class Q>
struct PartReader;

template <int Bits, class ScaleT>
struct PartReader<Affine<Bits, ScaleT>> {
  // 32-bit index math: 64-bit division is a long instruction sequence on the device
  std::uint32_t scales = 0, mins = 0, codes = 0, row_bytes = 0;
  int group = 1, per_row = 1, dim = 0;
  bool channel = true;

  PartReader() = default;
  PartReader(const Affine<Bits, ScaleT>& q, index_t tokens, index_t dim_) {
    const AffineLayout l = q.layout(tokens, dim_);
    qpkv::detail::require(l.bytes < (std::size_t{1} << 31), "part bytes", "< 2^31 on the CUDA backend", l.bytes);
    scales = static_cast<std::uint32_t>(l.scales);
    mins = static_cast<std::uint32_t>(l.mins);
    codes = static_cast<std::uint32_t>(l.codes);
    row_bytes = static_cast<std::uint32_t>(l.row_bytes);
    group = static_cast<int>(q.group);
    dim = static_cast<int>(dim_);
    per_row = static_cast<int>((dim_ + q.group - 1) / q.group);
    channel = q.axis == Axis::channel;
  }
  /// t < tokens of the part, c < dim.
  __device__ float at(const std::uint8_t* part, index_t t64, index_t c64) const {
    const int t = static_cast<int>(t64), c = static_cast<int>(c64);
    const int g = channel ? (t / group) * dim + c : t * per_row + c / group;
    const auto* sc = reinterpret_cast<const ScaleT*>(part + scales);
    const auto* mn = reinterpret_cast<const ScaleT*>(part + mins);
    const std::uint32_t code = quant::unpack_one<Bits>(part + codes + static_cast<std::uint32_t>(t) * row_bytes,
                                                       static_cast<std::uint32_t>(c));
    return quant::decode(code, to_float(mn[g]), to_float(sc[g]));
  }
};

template <>
struct PartReader<Fp16> {
  int dim = 0;
  PartReader() = default;
  PartReader(const Fp16&, index_t, index_t dim_) : dim(static_cast<int>(dim_)) {}
  __device__ float at(const std::uint8_t* part, index_t t, index_t c) const {
    return to_float(reinterpret_cast<const half*>(part)[static_cast<int>(t) * dim + static_cast<int>(c)]);
  }
};

namespace kernels {

inline constexpr int kThreads = 256;

inline unsigned blocks_for(long long n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

template <int Bits, class ScaleT, Element T>
__global__ void encode_channel(Rows<T> src, PartTarget dst, index_t heads, index_t nb, index_t B, index_t D,
                               index_t group, std::size_t mins_off, std::size_t codes_off, std::size_t row_bytes,
                               unsigned* err) {
  constexpr std::uint32_t maxc = quant::max_code(Bits);
  const index_t chunks = (D + 7) / 8, groups = B / group;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(heads) * nb * groups * chunks) return;
  const index_t k = id % chunks, gt = (id / chunks) % groups, b = (id / chunks / groups) % nb,
                h = id / chunks / groups / nb;
  const index_t c0 = k * 8;
  const int n = static_cast<int>(D - c0 < 8 ? D - c0 : 8);
  float lo[8], hi[8];
  for (int j = 0; j < 8; ++j) lo[j] = INFINITY, hi[j] = -INFINITY;
  for (index_t t = gt * group; t < (gt + 1) * group; ++t) {
    const T* r = src.row(h, b * B + t) + c0;
    for (int j = 0; j < n; ++j) {
      const float x = to_float(r[j]);
      lo[j] = fminf(lo[j], x);
      hi[j] = fmaxf(hi[j], x);
    }
  }
  std::uint8_t* part = dst.part(h, b);
  quant::GroupParams p[8];
  for (int j = 0; j < n; ++j) {
    p[j] = quant::minmax_params<ScaleT>(lo[j], hi[j], maxc);
    if (!isfinite(p[j].scale) || !isfinite(p[j].min)) atomicOr(err, kScaleNotStorable);
    const std::size_t g = static_cast<std::size_t>(gt * D + c0 + j);
    reinterpret_cast<ScaleT*>(part)[g] = from_float<ScaleT>(p[j].scale);
    reinterpret_cast<ScaleT*>(part + mins_off)[g] = from_float<ScaleT>(p[j].min);
  }
  std::uint8_t codes[8];
  for (index_t t = gt * group; t < (gt + 1) * group; ++t) {
    const T* r = src.row(h, b * B + t) + c0;
    for (int j = 0; j < n; ++j) codes[j] = static_cast<std::uint8_t>(quant::encode(to_float(r[j]), p[j].min, p[j].scale, maxc));
    quant::pack<Bits>(codes, static_cast<std::size_t>(n), part + codes_off + static_cast<std::size_t>(t) * row_bytes + k * Bits);
  }
}

template <int Bits, class ScaleT, Element T>
__global__ void encode_token(Rows<T> src, PartTarget dst, index_t heads, index_t nb, index_t B, index_t D,
                             index_t group, std::size_t mins_off, std::size_t codes_off, std::size_t row_bytes,
                             unsigned* err) {
  constexpr std::uint32_t maxc = quant::max_code(Bits);
  const index_t chunks = (D + 7) / 8, per_row = (D + group - 1) / group;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(heads) * nb * B * chunks) return;
  const index_t k = id % chunks, t = (id / chunks) % B, b = (id / chunks / B) % nb, h = id / chunks / B / nb;
  const index_t c0 = k * 8;
  const int n = static_cast<int>(D - c0 < 8 ? D - c0 : 8);
  const T* r = src.row(h, b * B + t);
  std::uint8_t* part = dst.part(h, b);
  std::uint8_t codes[8];
  index_t cur = -1;
  quant::GroupParams p;
  for (int j = 0; j < n; ++j) {
    const index_t c = c0 + j, gc = c / group;
    if (gc != cur) {
      cur = gc;
      const index_t end = (gc + 1) * group < D ? (gc + 1) * group : D;
      float lo = INFINITY, hi = -INFINITY;
      for (index_t e = gc * group; e < end; ++e) {
        const float x = to_float(r[e]);
        lo = fminf(lo, x);
        hi = fmaxf(hi, x);
      }
      p = quant::minmax_params<ScaleT>(lo, hi, maxc);
      if (c == gc * group) {  // this thread owns the group's first channel: it stores the parameters
        if (!isfinite(p.scale) || !isfinite(p.min)) atomicOr(err, kScaleNotStorable);
        const std::size_t g = static_cast<std::size_t>(t * per_row + gc);
        reinterpret_cast<ScaleT*>(part)[g] = from_float<ScaleT>(p.scale);
        reinterpret_cast<ScaleT*>(part + mins_off)[g] = from_float<ScaleT>(p.min);
      }
    }
    codes[j] = static_cast<std::uint8_t>(quant::encode(to_float(r[c]), p.min, p.scale, maxc));
  }
  quant::pack<Bits>(codes, static_cast<std::size_t>(n), part + codes_off + static_cast<std::size_t>(t) * row_bytes + k * Bits);
}

template <Element T>
__global__ void encode_fp16(Rows<T> src, PartTarget dst, index_t heads, index_t nb, index_t B, index_t D, unsigned* err) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(heads) * nb * B * D) return;
  const index_t c = id % D, t = (id / D) % B, b = (id / D / B) % nb, h = id / D / B / nb;
  const half v = to_half(to_float(src.row(h, b * B + t)[c]));
  if ((v.bits & 0x7c00u) == 0x7c00u) atomicOr(err, kHalfOverflow);
  reinterpret_cast<half*>(dst.part(h, b))[t * D + c] = v;
}

/// Rows [0, n) of src (per head) -> fp16 slots [slot0, slot0 + n) of a [head][slot][D] array.
template <Element T>
__global__ void store_half(Rows<T> src, half* dst, index_t heads, index_t n, index_t D, index_t slots, index_t slot0,
                           unsigned* err) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(heads) * n * D) return;
  const index_t c = id % D, i = (id / D) % n, h = id / D / n;
  const float x = to_float(src.row(h, i)[c]);
  const half v = to_half(x);
  if (!isfinite(x)) atomicOr(err, kNonFiniteInput);
  else if ((v.bits & 0x7c00u) == 0x7c00u) atomicOr(err, kHalfOverflow);
  dst[(h * slots + slot0 + i) * D + c] = v;
}

/// err |= kNonFiniteInput if any of rows [0, n) of any head has an inf or NaN.
template <Element T>
__global__ void check_finite(Rows<T> src, index_t heads, index_t n, index_t D, unsigned* err) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(heads) * n * D) return;
  const index_t c = id % D, i = (id / D) % n, h = id / D / n;
  if (!isfinite(to_float(src.row(h, i)[c]))) atomicOr(err, kNonFiniteInput);
}

/// Dense [head][token][dim] floats of parts (blocks) then fp16 residual slots.
template <class KR, class VR>
__global__ void decode_all(KR kr, VR vr, const std::uint8_t* data, std::size_t block_bytes, std::size_t key_part,
                           index_t capacity_blocks, index_t blocks, index_t B, const half* rk, const half* rv,
                           index_t residual_capacity, index_t residual, index_t heads, index_t D, float* keys,
                           float* values) {
  const index_t N = blocks * B + residual;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(heads) * N * D) return;
  const index_t c = id % D, t = (id / D) % N, h = id / D / N;
  if (t < blocks * B) {
    const std::uint8_t* blk = data + static_cast<std::size_t>(h * capacity_blocks + t / B) * block_bytes;
    keys[id] = kr.at(blk, t % B, c);
    values[id] = vr.at(blk + key_part, t % B, c);
  } else {
    const index_t s = t - blocks * B;
    keys[id] = to_float(rk[(h * residual_capacity + s) * D + c]);
    values[id] = to_float(rv[(h * residual_capacity + s) * D + c]);
  }
}

}  // namespace kernels

/// Encodes `nb` blocks per head of `src` rows (block b = rows [b*B, (b+1)*B)) with quantizer q into
/// dst. Errors are ORed into err (device); the caller reads them.
template <class Q, Element T>
void encode_parts(const Q& q, const Rows<T>& src, const PartTarget& dst, index_t heads, index_t nb, index_t B,
                  index_t D, unsigned* err, cudaStream_t stream) {
  if (heads * nb == 0) return;
  if constexpr (is_affine<Q>::value) {
    using ST = typename Q::scale_type;
    const AffineLayout l = q.layout(B, D);
    const index_t chunks = (D + 7) / 8;
    if (q.axis == Axis::channel) {
      kernels::encode_channel<Q::bits, ST, T><<<kernels::blocks_for(heads * nb * (B / q.group) * chunks), kernels::kThreads, 0, stream>>>(
          src, dst, heads, nb, B, D, q.group, l.mins, l.codes, l.row_bytes, err);
    } else {
      kernels::encode_token<Q::bits, ST, T><<<kernels::blocks_for(heads * nb * B * chunks), kernels::kThreads, 0, stream>>>(
          src, dst, heads, nb, B, D, q.group, l.mins, l.codes, l.row_bytes, err);
    }
  } else {
    kernels::encode_fp16<T><<<kernels::blocks_for(heads * nb * B * D), kernels::kThreads, 0, stream>>>(src, dst, heads, nb, B, D, err);
  }
  QPKV_CUDA_CHECK(cudaGetLastError());
}

/// err |= kNonFiniteInput when rows [first, first + n) of any head of v (device memory) hold inf/NaN.
template <Element T>
void check_finite(const TensorView<T>& v, index_t first, index_t n, unsigned* err, cudaStream_t stream) {
  if (v.heads * n * v.dim == 0) return;
  const Rows<T> rows{v.data, v.head_stride, v.token_stride, nullptr, 0, first};
  kernels::check_finite<T><<<kernels::blocks_for(v.heads * n * v.dim), kernels::kThreads, 0, stream>>>(rows, v.heads, n, v.dim, err);
  QPKV_CUDA_CHECK(cudaGetLastError());
}

}  // namespace qpkv::cuda
