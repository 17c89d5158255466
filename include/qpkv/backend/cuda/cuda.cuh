// qpkv/backend/cuda/cuda.cuh - the CUDA backend (nvcc only): include this from a .cu file, after
// (or instead of) qpkv/qpkv.hpp, and use CompressedKV<Selector, KeyQ, ValueQ, qpkv::backend::Cuda>
// on device memory. docs/cuda.md describes the kernels.
//
//   error.cuh          QPKV_CUDA_CHECK: every CUDA error -> qpkv::Error naming the call
//   buffer.cuh         backend::Cuda, DeviceBuffer (RAII), ErrorFlag (device-side validation)
//   quantize.cuh       quantize + pack parts along either axis; PartReader (device decode)
//   scores.cuh         SnapKV/PyramidKV window scores + pooling, H2O column sums
//   select.cuh         per-head top-k (CUB segmented sort), cuda::select for any selector
//   attend.cuh         split-K decode attention over packed keys and values, batched
//   compressed_kv.cuh  the CompressedKV specialization
#pragma once

#if !defined(__CUDACC__)
#error "qpkv/backend/cuda/*.cuh need a CUDA compiler (nvcc); CPU-only code includes qpkv/qpkv.hpp"
#endif

#include "qpkv/backend/cuda/attend.cuh"
#include "qpkv/backend/cuda/buffer.cuh"
#include "qpkv/backend/cuda/compressed_kv.cuh"
#include "qpkv/backend/cuda/error.cuh"
#include "qpkv/backend/cuda/quantize.cuh"
#include "qpkv/backend/cuda/scores.cuh"
#include "qpkv/backend/cuda/select.cuh"
