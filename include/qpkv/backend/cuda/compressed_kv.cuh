// qpkv/backend/cuda/compressed_kv.cuh - CompressedKV<Selector, KeyQ, ValueQ, backend::Cuda>: the
// same cache over device memory.
//
// Same members and semantics as the CPU cache (cache/compressed_kv.hpp): compress, append, attend,
// dequantize, positions, tokens, bytes, state, reserve. Differences, all about where memory lives:
//   - tensors given to compress/append/attend are views of / pointers to device memory (checked:
//     a host pointer is a qpkv::Error); `out` of attend is device memory;
//   - every call takes a cudaStream_t last (default: stream 0) and is ordered on it;
//   - device-side validation (non-finite inputs, fp16 overflow, unstorable scales, non-finite
//     attention) is read back once per call, so each call synchronizes its stream once before it
//     returns; attend_async() skips that read-back for decode loops that check elsewhere;
//   - positions(head) are kept on the host (bookkeeping; attention never reads them);
//   - dequantize() returns a host DenseKV (decoded on the device); bytes_on_host() copies the
//     allocation, which equals the CPU cache's allocation byte for byte (docs/format.md).
// Quantizers: Affine<Bits, ScaleT> (min-max zero point, no outliers) and Fp16; others are rejected at
// construction. AttendPrecision is ignored (the device path is float32 throughout).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "qpkv/backend/cuda/attend.cuh"
#include "qpkv/backend/cuda/buffer.cuh"
#include "qpkv/backend/cuda/error.cuh"
#include "qpkv/backend/cuda/quantize.cuh"
#include "qpkv/backend/cuda/select.cuh"
#include "qpkv/cache/compressed_kv.hpp"

namespace qpkv {

template <TokenSelector Selector, class KeyQ, class ValueQ>
class CompressedKV<Selector, KeyQ, ValueQ, backend::Cuda> {
 public:
  using selector_type = Selector;
  using key_quantizer = typename detail::key_of<KeyQ>::type;
  using value_quantizer = typename detail::value_of<ValueQ>::type;
  using backend_type = backend::Cuda;
  static_assert(Quantizer<key_quantizer>, "qpkv::CompressedKV: KeyQ must satisfy qpkv::Quantizer (or be a KV scheme such as qpkv::Kivi)");
  static_assert(Quantizer<value_quantizer>, "qpkv::CompressedKV: ValueQ must satisfy qpkv::Quantizer (or be a KV scheme such as qpkv::Kivi)");

  explicit CompressedKV(Shape shape, Selector selector = {}, KeyQ key_q = {}, ValueQ value_q = {}, CacheOptions options = {})
      : shape_(shape), selector_(std::move(selector)), kq_(detail::key_quantizer_of(key_q)),
        vq_(detail::value_quantizer_of(value_q)), options_(options) {
    shape_.validate();
    kq_.validate(shape_.head_dim, "key_quantizer");
    vq_.validate(shape_.head_dim, "value_quantizer");
    cuda::require_supported(kq_, "key_quantizer");
    cuda::require_supported(vq_, "value_quantizer");
    detail::require(shape_.head_dim <= cuda::kMaxHeadDim, "shape.head_dim",
                    detail::concat("<= ", cuda::kMaxHeadDim, " on the CUDA backend"), shape_.head_dim);
    detail::require(shape_.group_size() <= 16, "shape.q_heads / shape.kv_heads", "<= 16 on the CUDA backend", shape_.group_size());
    detail::require(options_.residual >= 0, "options.residual", ">= 0", options_.residual);
    detail::require(options_.scale >= 0.0f && std::isfinite(options_.scale), "options.scale", ">= 0 and finite", options_.scale);
    residual_length_ = detail::residual_length_of(key_q, value_q, options_);
    layout_ = plan_layout(shape_, kq_, vq_, residual_length_, 0);
    positions_.resize(static_cast<std::size_t>(shape_.kv_heads));
  }

  /// Prefill from device tensors: keys/values (kv_heads, N, D), queries (q_heads, M, D).
  template <Element T>
  void compress(const TensorView<T>& keys, const TensorView<T>& values, const TensorView<T>& queries, index_t capacity,
                LayerInfo layer = {}, cudaStream_t stream = 0) {
    check_kv(keys, values, stream);
    if (selector_.queries_needed(keys.tokens) > 0) {
      detail::check_view(queries, "queries");
      detail::require(queries.heads == shape_.q_heads, "queries.heads", shape_.q_heads, queries.heads);
      detail::require(queries.dim == shape_.head_dim, "queries.dim", shape_.head_dim, queries.dim);
    }
    cuda::DeviceSelection sel = cuda::select(selector_, keys, queries, capacity, layer, stream);
    store(keys, values, std::move(sel), stream);
  }

  /// Prefill for selectors that read no queries.
  template <Element T>
  void compress(const TensorView<T>& keys, const TensorView<T>& values, index_t capacity, LayerInfo layer = {},
                cudaStream_t stream = 0) {
    detail::require(selector_.queries_needed(keys.tokens) == 0, "queries",
                    detail::concat("the last ", selector_.queries_needed(keys.tokens), " prompt queries (this selector scores with them)"),
                    "none");
    compress(keys, values, TensorView<T>{nullptr, shape_.q_heads, 0, shape_.head_dim, 0, shape_.head_dim}, capacity, layer, stream);
  }

  /// Prefill with a selection made elsewhere (host lists of ascending positions per KV head).
  template <Element T>
  void compress(const TensorView<T>& keys, const TensorView<T>& values, Selection selection, cudaStream_t stream = 0) {
    check_kv(keys, values, stream);
    check_selection(selection, keys.tokens);
    store(keys, values, cuda::detail::from_host(std::move(selection), stream), stream);
  }

  /// Decode: appends one token; k and v are device arrays (kv_heads, D).
  template <Element T>
  void append(const T* k, const T* v, cudaStream_t stream = 0) {
    cuda::require_device_pointer(k, "k");
    cuda::require_device_pointer(v, "v");
    detail::check_aligned(k, "k");
    detail::check_aligned(v, "v");
    const index_t H = shape_.kv_heads, D = shape_.head_dim;
    const cuda::Rows<T> kr{k, D, D, nullptr, 0, 0}, vr{v, D, D, nullptr, 0, 0};
    cuda::ErrorFlag flag(stream);
    if (layout_.residual_limit == 0) {  // B = 1: every token is a block of its own
      cuda::check_finite(view(k, H, 1, D), 0, 1, flag.device(), stream);
      cuda::check_finite(view(v, H, 1, D), 0, 1, flag.device(), stream);
      cuda::detail::throw_flags(flag.read(stream), "k/v");
      grow(blocks_ + 1, 0, stream);
      encode_blocks(kr, vr, 1, blocks_, flag.device(), stream);
      cuda::detail::throw_flags(flag.read(stream), "append");
      ++blocks_;
    } else {
      if (residual_ == layout_.residual_capacity) grow(blocks_, layout_.residual_limit, stream);
      store_residual(kr, vr, 1, residual_, flag.device(), stream);
      cuda::detail::throw_flags(flag.read(stream), "k/v");
      ++residual_;
      if (residual_ == layout_.residual_limit) {
        try {
          flush_residual(stream);
        } catch (...) {
          --residual_;  // a block that cannot be encoded: the token is not appended
          throw;
        }
      }
    }
    for (auto& p : positions_) p.push_back(next_position_);
    ++next_position_;
  }

  /// out = softmax(scale * q K^T) V for every query head; q and out are device arrays (q_heads, D).
  template <Element T>
  void attend(const T* q, float* out, cudaStream_t stream = 0) const {
    cuda::require_device_pointer(q, "q");
    cuda::require_device_pointer(out, "out");
    cuda::ErrorFlag flag(stream);
    attend_async(q, out, flag.device(), stream);
    cuda::detail::throw_flags(flag.read(stream), "q");
  }

  /// attend() without validation read-back: enqueues the kernels and returns; errors go to `err`.
  template <Element T>
  void attend_async(const T* q, float* out, unsigned* err, cudaStream_t stream = 0) const {
    detail::check_aligned(q, "q");
    detail::check_aligned(out, "out");
    detail::require(tokens() > 0, "cache", "at least one token (call compress first)", "an empty cache");
    const cuda::AttendJob<T> job = attend_job(q, out);
    cuda::attend_async(kq_, vq_, geometry(), std::span<const cuda::AttendJob<T>>(&job, 1), softmax_scale(), workspace_, err, stream);
  }

  /// This cache as one job of a batched cuda::attend_async call (q, out: device arrays).
  template <Element T>
  [[nodiscard]] cuda::AttendJob<T> attend_job(const T* q, float* out) const {
    return cuda::AttendJob<T>{data_.data(), blocks_, residual_, layout_.capacity_blocks, layout_.residual_capacity, q, out};
  }
  [[nodiscard]] cuda::AttendGeometry geometry() const {
    return cuda::AttendGeometry{shape_.kv_heads, shape_.q_heads, shape_.head_dim, layout_.block_tokens, layout_.key_part,
                                layout_.value_part};
  }

  /// Dense float copy (on the host) of what the cache stores, in positional order.
  [[nodiscard]] DenseKV dequantize(cudaStream_t stream = 0) const {
    const index_t H = shape_.kv_heads, D = shape_.head_dim, B = layout_.block_tokens, N = tokens();
    DenseKV d{H, N, D, std::vector<float>(static_cast<std::size_t>(H * N * D)), std::vector<float>(static_cast<std::size_t>(H * N * D))};
    if (H * N * D == 0) return d;
    cuda::DeviceBuffer k = cuda::make_device<float>(d.keys.size()), v = cuda::make_device<float>(d.values.size());
    const auto* rk = reinterpret_cast<const half*>(data_.data() + layout_.residual_key_offset(0, 0));
    const auto* rv = reinterpret_cast<const half*>(data_.data() + layout_.residual_value_offset(0, 0));
    cuda::kernels::decode_all<<<cuda::kernels::blocks_for(H * N * D), cuda::kernels::kThreads, 0, stream>>>(
        cuda::PartReader<key_quantizer>(kq_, B, D), cuda::PartReader<value_quantizer>(vq_, B, D), data_.data(),
        layout_.block_bytes(), layout_.key_part, layout_.capacity_blocks, blocks_, B, rk, rv, layout_.residual_capacity,
        residual_, H, D, k.as<float>(), v.as<float>());
    QPKV_CUDA_CHECK(cudaGetLastError());
    cuda::download(d.keys.data(), k.as<float>(), d.keys.size(), stream);
    cuda::download(d.values.data(), v.as<float>(), d.values.size(), stream);
    return d;
  }

  /// Host copy of the allocation (bytes() bytes), laid out as docs/format.md describes.
  [[nodiscard]] std::vector<std::uint8_t> bytes_on_host(cudaStream_t stream = 0) const {
    std::vector<std::uint8_t> h(data_.size());
    cuda::download(h.data(), data_.data(), h.size(), stream);
    return h;
  }

  [[nodiscard]] std::span<const index_t> positions(index_t head) const {
    detail::require(head >= 0 && head < shape_.kv_heads, "head", detail::concat("in [0, ", shape_.kv_heads, ")"), head);
    return std::span<const index_t>(positions_[static_cast<std::size_t>(head)]);
  }
  [[nodiscard]] index_t tokens() const { return blocks_ * layout_.block_tokens + residual_; }
  [[nodiscard]] std::size_t bytes() const { return data_.size(); }
  [[nodiscard]] std::size_t metadata_bytes() const {
    std::size_t n = 0;
    for (const auto& p : positions_) n += p.capacity() * sizeof(index_t);
    return n;
  }
  [[nodiscard]] const Shape& shape() const { return shape_; }
  [[nodiscard]] const CacheLayout& layout() const { return layout_; }
  /// Snapshot whose `data` is a device pointer.
  [[nodiscard]] CacheState state() const { return CacheState{layout_, data_.data(), blocks_, residual_}; }
  [[nodiscard]] const key_quantizer& keys_quantizer() const { return kq_; }
  [[nodiscard]] const value_quantizer& values_quantizer() const { return vq_; }
  [[nodiscard]] const Selector& selector() const { return selector_; }
  [[nodiscard]] index_t residual_length() const { return residual_length_; }
  [[nodiscard]] float softmax_scale() const {
    return options_.scale > 0.0f ? options_.scale : 1.0f / std::sqrt(static_cast<float>(shape_.head_dim));
  }
  void reserve(index_t tokens, cudaStream_t stream = 0) {
    detail::require(tokens >= 0, "tokens", ">= 0", tokens);
    grow((tokens + layout_.block_tokens - 1) / layout_.block_tokens, layout_.residual_limit, stream);
  }

 private:
  template <Element T>
  void check_kv(const TensorView<T>& keys, const TensorView<T>& values, cudaStream_t stream) const {
    detail::check_view(keys, "keys");
    detail::check_view(values, "values");
    cuda::require_device_pointer(keys.data, "keys.data");
    cuda::require_device_pointer(values.data, "values.data");
    detail::require(keys.heads == shape_.kv_heads, "keys.heads", shape_.kv_heads, keys.heads);
    detail::require(keys.dim == shape_.head_dim, "keys.dim", shape_.head_dim, keys.dim);
    detail::require(values.heads == keys.heads, "values.heads", keys.heads, values.heads);
    detail::require(values.tokens == keys.tokens, "values.tokens", keys.tokens, values.tokens);
    detail::require(values.dim == keys.dim, "values.dim", keys.dim, values.dim);
    cuda::ErrorFlag flag(stream);
    cuda::check_finite(keys, 0, keys.tokens, flag.device(), stream);
    cuda::detail::throw_flags(flag.read(stream), "keys");
    cuda::check_finite(values, 0, values.tokens, flag.device(), stream);
    cuda::detail::throw_flags(flag.read(stream), "values");
  }

  void check_selection(const Selection& sel, index_t N) const {
    const index_t H = shape_.kv_heads;
    detail::require(sel.heads() == H, "selection.heads", H, sel.heads());
    const index_t C = sel.count(0);
    for (index_t h = 0; h < H; ++h) {
      detail::require(sel.count(h) == C, "selection.kept[" + std::to_string(h) + "].size()",
                      detail::concat(C, " (the same count for every head)"), sel.count(h));
      for (index_t i = 0; i < C; ++i) {
        const index_t p = sel.kept[h][i];
        detail::require(p >= 0 && p < N, "selection position", detail::concat("in [0, ", N, ")"), p);
        if (i) detail::require(p > sel.kept[h][i - 1], "selection order", "strictly ascending positions", p);
      }
    }
  }

  template <Element T>
  void store(const TensorView<T>& keys, const TensorView<T>& values, cuda::DeviceSelection sel, cudaStream_t stream) {
    const index_t H = shape_.kv_heads, C = sel.count;
    index_t res = 0;
    blocks_ = residual_ = 0;  // empty until the new content is complete (as the CPU cache)
    for (auto& p : positions_) p.clear();
    layout_ = plan_layout(shape_, kq_, vq_, residual_length_, C, &res);
    data_ = cuda::DeviceBuffer(layout_.total_bytes());
    if (data_.size()) QPKV_CUDA_CHECK(cudaMemsetAsync(data_.data(), 0, data_.size(), stream));
    const index_t nb = layout_.capacity_blocks, B = layout_.block_tokens;
    const cuda::Rows<T> kr{keys.data, keys.head_stride, keys.token_stride, sel.data(), C, 0};
    const cuda::Rows<T> vr{values.data, values.head_stride, values.token_stride, sel.data(), C, 0};
    cuda::ErrorFlag flag(stream);
    encode_blocks(kr, vr, nb, 0, flag.device(), stream);
    if (res > 0) {
      cuda::Rows<T> krr = kr, vrr = vr;
      krr.first = vrr.first = nb * B;
      store_residual(krr, vrr, res, 0, flag.device(), stream);
    }
    const unsigned bits = flag.read(stream);
    if (bits) {
      data_.reset();
      layout_ = plan_layout(shape_, kq_, vq_, residual_length_, 0);
      cuda::detail::throw_flags(bits, "keys/values");
    }
    (void)H;
    blocks_ = nb;
    residual_ = res;
    positions_ = std::move(sel.host.kept);
    next_position_ = keys.tokens;
  }

  template <Element T>
  void encode_blocks(const cuda::Rows<T>& k, const cuda::Rows<T>& v, index_t n, index_t first, unsigned* err,
                     cudaStream_t stream) {
    const index_t H = shape_.kv_heads, B = layout_.block_tokens, D = shape_.head_dim;
    const cuda::PartTarget kt{data_.data(), layout_.block_bytes(), layout_.capacity_blocks, first, 0};
    cuda::PartTarget vt = kt;
    vt.offset = layout_.key_part;
    cuda::encode_parts(kq_, k, kt, H, n, B, D, err, stream);
    cuda::encode_parts(vq_, v, vt, H, n, B, D, err, stream);
  }

  template <Element T>
  void store_residual(const cuda::Rows<T>& k, const cuda::Rows<T>& v, index_t n, index_t slot0, unsigned* err,
                      cudaStream_t stream) {
    const index_t H = shape_.kv_heads, D = shape_.head_dim;
    auto* rk = reinterpret_cast<half*>(data_.data() + layout_.residual_key_offset(0, 0));
    auto* rv = reinterpret_cast<half*>(data_.data() + layout_.residual_value_offset(0, 0));
    const unsigned grid = cuda::kernels::blocks_for(H * n * D);
    cuda::kernels::store_half<T><<<grid, cuda::kernels::kThreads, 0, stream>>>(k, rk, H, n, D, layout_.residual_capacity, slot0, err);
    cuda::kernels::store_half<T><<<grid, cuda::kernels::kThreads, 0, stream>>>(v, rv, H, n, D, layout_.residual_capacity, slot0, err);
    QPKV_CUDA_CHECK(cudaGetLastError());
  }

  void flush_residual(cudaStream_t stream) {
    const index_t D = shape_.head_dim, R = layout_.residual_limit;
    const index_t n = R / layout_.block_tokens;
    grow(blocks_ + n, layout_.residual_capacity, stream);
    const auto* rk = reinterpret_cast<const half*>(data_.data() + layout_.residual_key_offset(0, 0));
    const auto* rv = reinterpret_cast<const half*>(data_.data() + layout_.residual_value_offset(0, 0));
    const index_t hs = layout_.residual_capacity * D;
    cuda::ErrorFlag flag(stream);
    encode_blocks(cuda::Rows<half>{rk, hs, D, nullptr, 0, 0}, cuda::Rows<half>{rv, hs, D, nullptr, 0, 0}, n, blocks_,
                  flag.device(), stream);
    const unsigned bits = flag.read(stream);
    if (bits) cuda::detail::throw_flags(bits, "append");
    blocks_ += n;
    residual_ = 0;
  }

  /// Room for need_blocks blocks and need_residual residual slots per head (blocks grow x1.5).
  void grow(index_t need_blocks, index_t need_residual, cudaStream_t stream) {
    if (need_blocks <= layout_.capacity_blocks && need_residual <= layout_.residual_capacity) return;
    CacheLayout nl = layout_;
    if (need_blocks > layout_.capacity_blocks)
      nl.capacity_blocks = std::max(need_blocks, layout_.capacity_blocks + layout_.capacity_blocks / 2);
    nl.residual_capacity = std::max(need_residual, layout_.residual_capacity);
    cuda::DeviceBuffer nd(nl.total_bytes());
    QPKV_CUDA_CHECK(cudaMemsetAsync(nd.data(), 0, nd.size(), stream));
    const std::size_t res_bytes = static_cast<std::size_t>(residual_ * shape_.head_dim) * sizeof(half);
    const auto copy = [&](std::size_t to, std::size_t from, std::size_t n) {
      if (n) QPKV_CUDA_CHECK(cudaMemcpyAsync(nd.data() + to, data_.data() + from, n, cudaMemcpyDeviceToDevice, stream));
    };
    for (index_t h = 0; h < shape_.kv_heads && data_.size() > 0; ++h) {
      copy(nl.block_offset(h, 0), layout_.block_offset(h, 0), static_cast<std::size_t>(blocks_) * layout_.block_bytes());
      copy(nl.residual_key_offset(h, 0), layout_.residual_key_offset(h, 0), res_bytes);
      copy(nl.residual_value_offset(h, 0), layout_.residual_value_offset(h, 0), res_bytes);
    }
    QPKV_CUDA_CHECK(cudaStreamSynchronize(stream));  // the old buffer is freed below
    layout_ = nl;
    data_ = std::move(nd);
  }

  Shape shape_;
  Selector selector_;
  key_quantizer kq_;
  value_quantizer vq_;
  CacheOptions options_;
  index_t residual_length_ = 0;
  index_t residual_ = 0;
  CacheLayout layout_;
  cuda::DeviceBuffer data_;
  index_t blocks_ = 0;
  std::vector<std::vector<index_t>> positions_;
  index_t next_position_ = 0;
  mutable cuda::AttendWorkspace workspace_;
};

}  // namespace qpkv
