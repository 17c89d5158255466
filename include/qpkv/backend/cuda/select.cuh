// qpkv/backend/cuda/select.cuh - per-head top-k with CUB, and the selectors on the device.
//
// top_k_plus_window: per KV head, a stable segmented sort (cub::DeviceSegmentedSort) of (score,
// position) pairs by descending score - stable on ascending positions, so among equal scores the
// lower position comes first: exactly the CPU's tie rule (select/scoring.hpp, top_k_positions) -
// then the first k positions of each head sorted ascending, then the window [n - W, n).
// The whole selection stays on the device ([kv_head][kept] int64, what the gather reads); one copy
// goes to the host for positions(head).
//
// select(selector, keys, queries, capacity, layer): SnapKV, PyramidKV and H2O score on the device
// (scores.cuh); KeepAll keeps everything; any other selector runs its own select() on the host over a
// host copy of the inputs (correct for any policy, at the price of the copy).
#pragma once

#include <cuda_runtime.h>

#include <cub/device/device_segmented_sort.cuh>

#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "qpkv/backend/cuda/buffer.cuh"
#include "qpkv/backend/cuda/error.cuh"
#include "qpkv/backend/cuda/quantize.cuh"
#include "qpkv/backend/cuda/scores.cuh"
#include "qpkv/core/tensor.hpp"
#include "qpkv/select/keep_all.hpp"
#include "qpkv/select/selection.hpp"

namespace qpkv {
struct SnapKV;
struct PyramidKV;
struct H2O;
}  // namespace qpkv

namespace qpkv::cuda {

/// A selection in device memory: positions[h * count + i], ascending per head, plus its host copy.
struct DeviceSelection {
  DeviceBuffer positions;  ///< int64 [heads][count]
  index_t heads = 0;
  index_t count = 0;
  Selection host;

  [[nodiscard]] const index_t* data() const { return positions.as<index_t>(); }
};

namespace kernels {

// a template so that every TU including this header shares one definition
template <int = 0>
__global__ void iota_segments(int* pos, index_t heads, index_t n) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id < static_cast<long long>(heads) * n) pos[id] = static_cast<int>(id % n);
}

// a template so that every TU including this header shares one definition
template <int = 0>
__global__ void take_first(const int* sorted, index_t n, index_t k, index_t heads, int* out) {
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id < static_cast<long long>(heads) * k) out[id] = sorted[(id / k) * n + id % k];
}

// a template so that every TU including this header shares one definition
template <int = 0>
__global__ void with_window(const int* kept, index_t k, index_t heads, index_t n, index_t window, index_t* out) {
  const index_t c = k + window;
  const long long id = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (id >= static_cast<long long>(heads) * c) return;
  const index_t h = id / c, i = id % c;
  out[id] = i < k ? static_cast<index_t>(kept[h * k + i]) : n - window + (i - k);
}

}  // namespace kernels

namespace detail {

/// The shape checks of select/scoring.hpp's check_scoring_inputs (the finiteness check runs on the
/// device).
template <Element T>
void check_scoring_shapes(const TensorView<T>& keys, const TensorView<T>& queries, index_t window, index_t needed) {
  using qpkv::detail::concat;
  using qpkv::detail::require;
  require(window >= 1, "window", ">= 1", window);
  qpkv::detail::check_view(queries, "queries");
  require(queries.dim == keys.dim, "queries.dim", concat("keys.dim (", keys.dim, ")"), queries.dim);
  require(queries.heads % keys.heads == 0, "queries.heads", concat("a multiple of keys.heads (", keys.heads, ")"), queries.heads);
  require(queries.tokens >= needed, "queries.tokens", concat(">= ", needed, " (the trailing prompt queries this selector reads)"),
          queries.tokens);
}

inline DeviceBuffer segment_offsets(index_t heads, index_t len, cudaStream_t stream) {
  std::vector<int> off(static_cast<std::size_t>(heads + 1));
  for (index_t h = 0; h <= heads; ++h) off[static_cast<std::size_t>(h)] = static_cast<int>(h * len);
  DeviceBuffer d = make_device<int>(off.size());
  upload(d.as<int>(), off.data(), off.size(), stream);
  QPKV_CUDA_CHECK(cudaStreamSynchronize(stream));  // the host vector dies here
  return d;
}

inline void fill_host(DeviceSelection& s, cudaStream_t stream) {
  std::vector<index_t> flat(static_cast<std::size_t>(s.heads * s.count));
  download(flat.data(), s.data(), flat.size(), stream);
  s.host.kept.assign(static_cast<std::size_t>(s.heads), {});
  for (index_t h = 0; h < s.heads; ++h)
    s.host.kept[static_cast<std::size_t>(h)].assign(flat.begin() + h * s.count, flat.begin() + (h + 1) * s.count);
}

inline DeviceSelection from_host(Selection sel, cudaStream_t stream) {
  DeviceSelection s;
  s.heads = sel.heads();
  s.count = s.heads ? sel.count(0) : 0;
  std::vector<index_t> flat;
  flat.reserve(static_cast<std::size_t>(s.heads * s.count));
  for (const auto& row : sel.kept) {
    qpkv::detail::require(static_cast<index_t>(row.size()) == s.count, "selection", "the same count for every head", row.size());
    flat.insert(flat.end(), row.begin(), row.end());
  }
  s.positions = make_device<index_t>(flat.size());
  upload(s.positions.as<index_t>(), flat.data(), flat.size(), stream);
  QPKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  s.host = std::move(sel);
  return s;
}

}  // namespace detail

/// Per head: the k best prefix positions of `scores` (higher score first, then lower position),
/// ascending, followed by the window [n - window, n). Scores must not be NaN (callers check).
inline DeviceSelection top_k_plus_window(const DeviceScores& scores, index_t k, index_t n, index_t window,
                                         cudaStream_t stream = 0) {
  const index_t H = scores.heads, P = scores.prefix;
  qpkv::detail::require(k >= 0 && k <= P, "k", qpkv::detail::concat("in [0, ", P, "]"), k);
  qpkv::detail::require(H * P <= std::numeric_limits<int>::max(), "kv_heads x prefix tokens", "< 2^31 on the CUDA backend (int positions)", H * P);
  DeviceSelection sel;
  sel.heads = H;
  sel.count = k + window;
  sel.positions = make_device<index_t>(static_cast<std::size_t>(H * sel.count));
  DeviceBuffer kept = make_device<int>(static_cast<std::size_t>(H * k));
  if (H * k > 0) {
    DeviceBuffer pos = make_device<int>(static_cast<std::size_t>(H * P));
    DeviceBuffer pos_sorted = make_device<int>(static_cast<std::size_t>(H * P));
    DeviceBuffer keys_sorted = make_device<float>(static_cast<std::size_t>(H * P));
    kernels::iota_segments<><<<kernels::blocks_for(H * P), kernels::kThreads, 0, stream>>>(pos.as<int>(), H, P);
    QPKV_CUDA_CHECK(cudaGetLastError());
    const DeviceBuffer off = detail::segment_offsets(H, P, stream);
    std::size_t temp_bytes = 0;
    QPKV_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairsDescending(
        nullptr, temp_bytes, scores.data(), keys_sorted.as<float>(), pos.as<int>(), pos_sorted.as<int>(), H * P, H,
        off.as<int>(), off.as<int>() + 1, stream));
    DeviceBuffer temp(temp_bytes);
    QPKV_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairsDescending(
        temp.data(), temp_bytes, scores.data(), keys_sorted.as<float>(), pos.as<int>(), pos_sorted.as<int>(), H * P, H,
        off.as<int>(), off.as<int>() + 1, stream));
    DeviceBuffer top = make_device<int>(static_cast<std::size_t>(H * k));
    kernels::take_first<><<<kernels::blocks_for(H * k), kernels::kThreads, 0, stream>>>(pos_sorted.as<int>(), P, k, H, top.as<int>());
    QPKV_CUDA_CHECK(cudaGetLastError());
    const DeviceBuffer off_k = detail::segment_offsets(H, k, stream);
    std::size_t temp2 = 0;
    QPKV_CUDA_CHECK(cub::DeviceSegmentedSort::SortKeys(nullptr, temp2, top.as<int>(), kept.as<int>(), H * k, H,
                                                       off_k.as<int>(), off_k.as<int>() + 1, stream));
    DeviceBuffer temp_b(temp2);
    QPKV_CUDA_CHECK(cub::DeviceSegmentedSort::SortKeys(temp_b.data(), temp2, top.as<int>(), kept.as<int>(), H * k, H,
                                                       off_k.as<int>(), off_k.as<int>() + 1, stream));
  }
  if (H * sel.count > 0) {
    kernels::with_window<><<<kernels::blocks_for(H * sel.count), kernels::kThreads, 0, stream>>>(
        kept.as<int>(), k, H, n, window, sel.positions.as<index_t>());
    QPKV_CUDA_CHECK(cudaGetLastError());
  }
  detail::fill_host(sel, stream);  // synchronizes: the temporaries above may be freed
  return sel;
}

namespace detail {

/// Host copy of a device view (dense [head][token][dim]).
template <Element T>
std::vector<T> host_copy(const TensorView<T>& v, cudaStream_t stream) {
  std::vector<T> h(static_cast<std::size_t>(v.heads * v.tokens * v.dim));
  for (index_t i = 0; i < v.heads; ++i)
    QPKV_CUDA_CHECK(cudaMemcpy2DAsync(h.data() + i * v.tokens * v.dim, static_cast<std::size_t>(v.dim) * sizeof(T),
                                      v.data + i * v.head_stride, static_cast<std::size_t>(v.token_stride) * sizeof(T),
                                      static_cast<std::size_t>(v.dim) * sizeof(T), static_cast<std::size_t>(v.tokens),
                                      cudaMemcpyDeviceToHost, stream));
  QPKV_CUDA_CHECK(cudaStreamSynchronize(stream));
  return h;
}

inline void throw_flags(unsigned bits, const char* where) {
  if (bits & kNonFiniteInput) throw Error(qpkv::detail::concat("qpkv: ", where, ": expected finite values, got inf or NaN"));
  if (bits & kHalfOverflow)
    throw Error(qpkv::detail::concat("qpkv: ", where, ": expected |x| <= 65504 for fp16 storage, got a larger finite value"));
  if (bits & kScaleNotStorable)
    throw Error(qpkv::detail::concat("qpkv: ", where, ": expected every group's scale and min to be representable in the "
                                     "quantizer's scale storage type, got an overflow (use float scale storage for such magnitudes)"));
  if (bits & kNonFiniteScore)
    throw Error(qpkv::detail::concat("qpkv: scores: non-finite attention (finite inputs whose logits overflow float32)"));
  if (bits & kNonFiniteAttention)
    throw Error(qpkv::detail::concat("qpkv: attend: expected finite attention logits and output, got a non-finite value "
                                     "(|q.k| x scale or the weighted values overflow float32)"));
}

}  // namespace detail

/// The selection `selector` makes on device inputs (keys (kv_heads, N, D), queries (q_heads, M, D)).
/// Validates like the CPU selectors; device-side errors are reported as qpkv::Error.
template <class Selector, Element T>
DeviceSelection select(const Selector& selector, const TensorView<T>& keys, const TensorView<T>& queries,
                       index_t capacity, LayerInfo layer = {}, cudaStream_t stream = 0) {
  qpkv::detail::check_view(keys, "keys");
  require_device_pointer(keys.data, "keys.data");
  const index_t n = keys.tokens;
  constexpr bool scored = std::is_same_v<Selector, SnapKV> || std::is_same_v<Selector, PyramidKV> || std::is_same_v<Selector, H2O>;
  if constexpr (std::is_same_v<Selector, KeepAll>) {
    return detail::from_host(selector.select(keys, queries, capacity, layer), stream);  // reads no data
  } else if constexpr (scored) {
    selector.validate(capacity, layer);
    const index_t needed = selector.queries_needed(n);
    detail::check_scoring_shapes(keys, queries, selector.window, needed);
    require_device_pointer(queries.data, "queries.data");
    ErrorFlag flag(stream);
    check_finite(keys, 0, n, flag.device(), stream);
    check_finite(queries, queries.tokens - needed, needed, flag.device(), stream);
    detail::throw_flags(flag.read(stream), "keys/queries");
    if (n <= capacity) return detail::from_host(qpkv::detail::all_positions(keys.heads, n), stream);
    DeviceScores scores;
    index_t k = capacity - selector.window;
    if constexpr (std::is_same_v<Selector, H2O>) {
      scores = h2o_scores(keys, queries, selector.window, selector.mask, flag.device(), stream);
    } else {
      scores = snapkv_scores(keys, queries, selector.window, selector.kernel, selector.pooling, flag.device(), stream);
      if constexpr (std::is_same_v<Selector, PyramidKV>) k = selector.layer_budget(n, capacity, layer);
    }
    detail::throw_flags(flag.read(stream), "scores");
    return top_k_plus_window(scores, k, n, selector.window, stream);
  } else {
    // no device kernel for this policy: run it on a host copy of what it reads
    const std::vector<T> hk = detail::host_copy(keys, stream);
    const index_t needed = selector.queries_needed(n);
    std::vector<T> hq;
    TensorView<T> qv{nullptr, queries.heads, 0, keys.dim, 0, keys.dim};
    if (needed > 0) {
      require_device_pointer(queries.data, "queries.data");
      hq = detail::host_copy(queries, stream);
      qv = view(hq.data(), queries.heads, queries.tokens, queries.dim);
    }
    return detail::from_host(selector.select(view(hk.data(), keys.heads, n, keys.dim), qv, capacity, layer), stream);
  }
}

}  // namespace qpkv::cuda
