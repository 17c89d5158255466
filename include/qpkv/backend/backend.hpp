// qpkv/backend/backend.hpp - backend tags. A CompressedKV's Backend parameter says where its bytes
// live and which kernels run on them; policies (selectors, quantizers) never depend on it.
#pragma once

namespace qpkv::backend {

/// Host memory; Eigen for GEMM-shaped work, plain C++ loops for packed attention, OpenMP across
/// KV heads when compiled with it. Results do not depend on the thread count.
struct Cpu {
  static constexpr const char* name = "cpu";
};

}  // namespace qpkv::backend
