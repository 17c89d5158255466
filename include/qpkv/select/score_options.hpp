// qpkv/select/score_options.hpp - the options of the attention scores (select/scoring.hpp), in a
// header without Eigen so that the CUDA backend (backend/cuda/) can name them.
#pragma once

namespace qpkv {

/// The 1-D smoothing SnapKV and PyramidKV apply to the summed window attention.
enum class Pooling {
  avg,  ///< mean over the kernel, zero padding counted (PyTorch avg_pool1d, count_include_pad=True)
  max,  ///< max over the kernel, -inf padding (PyTorch max_pool1d)
};

/// Which keys each prompt query sees when H2O sums attention over all queries.
enum class H2OMask {
  causal,        ///< query t sees keys [0, t]: the attention the model actually computed
  window_block,  ///< the seed code: only the last W×W block is causal; earlier queries see all N keys
};

}  // namespace qpkv
