// qpkv/backend/cuda/error.cuh - every CUDA error becomes a qpkv::Error naming the call.
//
// QPKV_CUDA_CHECK(cudaMalloc(&p, n)) throws
//   qpkv::Error("qpkv: cuda: cudaMalloc(&p, n) failed: out of memory (cudaErrorMemoryAllocation)
//                at qpkv/backend/cuda/buffer.cuh:42")
// and clears the (non-sticky) error so the next call does not report it again. Kernels are checked
// with QPKV_CUDA_CHECK(cudaGetLastError()) right after the launch.
#pragma once

#include <cuda_runtime.h>

#include <string>
#include <string_view>

#include "qpkv/core/error.hpp"

namespace qpkv::cuda {

namespace detail {
[[noreturn]] inline void throw_cuda(cudaError_t e, const char* call, const char* file, int line) {
  (void)cudaGetLastError();  // a non-sticky error must not resurface at the next check
  throw Error(qpkv::detail::concat("qpkv: cuda: ", call, " failed: ", cudaGetErrorString(e), " (",
                                   cudaGetErrorName(e), ") at ", file, ":", line));
}
}  // namespace detail

#define QPKV_CUDA_CHECK(call)                                                         \
  do {                                                                                \
    const cudaError_t qpkv_cuda_status_ = (call);                                     \
    if (qpkv_cuda_status_ != cudaSuccess)                                             \
      ::qpkv::cuda::detail::throw_cuda(qpkv_cuda_status_, #call, __FILE__, __LINE__); \
  } while (0)

/// Number of CUDA devices; 0 when there is none or no driver (never throws).
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

/// Throws qpkv::Error unless p is device (or managed) memory: kernels cannot read plain host
/// memory, and a host pointer passed by mistake would otherwise be an illegal-address fault that
/// poisons the whole CUDA context.
inline void require_device_pointer(const void* p, std::string_view name) {
  if (p == nullptr) throw Error(qpkv::detail::concat("qpkv: ", name, ": expected a device pointer, got nullptr"));
  cudaPointerAttributes a{};
  QPKV_CUDA_CHECK(cudaPointerGetAttributes(&a, p));
  if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged)
    throw Error(qpkv::detail::concat("qpkv: ", name, ": expected a device (or managed) pointer, got ",
                                     a.type == cudaMemoryTypeHost ? "pinned host memory" : "unregistered host memory",
                                     " at ", p));
}

}  // namespace qpkv::cuda
