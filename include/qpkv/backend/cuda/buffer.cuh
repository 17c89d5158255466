// qpkv/backend/cuda/buffer.cuh - owning device memory (RAII) and the backend tag.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "qpkv/backend/backend.hpp"
#include "qpkv/backend/cuda/error.cuh"

namespace qpkv::backend {

/// Device memory of the current CUDA device; kernels from qpkv/backend/cuda/. Every call takes a
/// cudaStream_t (default: the legacy default stream 0) and is ordered on it.
struct Cuda {
  static constexpr const char* name = "cuda";
};

}  // namespace qpkv::backend

namespace qpkv::cuda {

/// An owning device allocation of `size()` bytes (cudaMalloc / cudaFree). Movable, not copyable:
/// copying device memory is an explicit, stream-ordered operation (copy_from).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t bytes) : size_(bytes) {
    if (bytes) QPKV_CUDA_CHECK(cudaMalloc(&data_, bytes));
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      reset();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { reset(); }

  /// Frees the memory (cudaFree synchronizes with outstanding work on the device).
  void reset() noexcept {
    if (data_) (void)cudaFree(data_);
    data_ = nullptr;
    size_ = 0;
  }

  [[nodiscard]] std::uint8_t* data() { return static_cast<std::uint8_t*>(data_); }
  [[nodiscard]] const std::uint8_t* data() const { return static_cast<const std::uint8_t*>(data_); }
  template <class T>
  [[nodiscard]] T* as() { return static_cast<T*>(data_); }
  template <class T>
  [[nodiscard]] const T* as() const { return static_cast<const T*>(data_); }
  [[nodiscard]] std::size_t size() const { return size_; }

 private:
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

/// A device buffer holding n elements of T.
template <class T>
DeviceBuffer make_device(std::size_t n) {
  return DeviceBuffer(n * sizeof(T));
}

/// Host -> device copy of n elements, ordered on `stream`.
template <class T>
void upload(T* dst, const T* src, std::size_t n, cudaStream_t stream = 0) {
  if (n) QPKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyHostToDevice, stream));
}

/// Device -> host copy of n elements; returns when the data is on the host.
template <class T>
void download(T* dst, const T* src, std::size_t n, cudaStream_t stream = 0) {
  if (n) QPKV_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(T), cudaMemcpyDeviceToHost, stream));
  QPKV_CUDA_CHECK(cudaStreamSynchronize(stream));
}

/// A device-side error word: kernels OR bits into it, the host reads it after the work is done.
/// Lets device-side validation (non-finite inputs, fp16 overflow) report as qpkv::Error.
class ErrorFlag {
 public:
  explicit ErrorFlag(cudaStream_t stream) : buf_(sizeof(unsigned)) {
    QPKV_CUDA_CHECK(cudaMemsetAsync(buf_.data(), 0, sizeof(unsigned), stream));
  }
  [[nodiscard]] unsigned* device() { return buf_.as<unsigned>(); }
  /// Waits for the stream and returns the bits set.
  [[nodiscard]] unsigned read(cudaStream_t stream) const {
    unsigned v = 0;
    download(&v, buf_.as<unsigned>(), 1, stream);
    return v;
  }

 private:
  DeviceBuffer buf_;
};

/// Error bits kernels set in an ErrorFlag.
enum ErrorBit : unsigned {
  kNonFiniteInput = 1u << 0,    ///< a key, value or query element is inf or NaN
  kHalfOverflow = 1u << 1,      ///< a finite value above 65504 went to fp16 storage
  kScaleNotStorable = 1u << 2,  ///< a group's scale or min is not representable in its storage type
  kNonFiniteScore = 1u << 3,    ///< selection scores overflowed float32
  kNonFiniteAttention = 1u << 4,  ///< attention logits or output overflowed float32
};

}  // namespace qpkv::cuda
