// qpkv/cache/layout.hpp - where a CompressedKV keeps its bytes; read by every backend's kernels.
//
// One allocation holds, in order:
//   blocks:   [kv_head][block < capacity_blocks] x block_bytes, each block = B tokens of one head:
//             [ key part: KeyQ::part_bytes(B, D) ][ value part: ValueQ::part_bytes(B, D) ]
//   residual: [kv_head][slot < residual_capacity][D] half keys, then the same for values.
// B (block_tokens) is the least common multiple of the key and value quantizers' group_tokens()
// (KIVI: the key group, 32). Tokens of a head are stored in positional order: blocks first, then
// the residual. docs/format.md shows one block byte by byte. Right after compress() the allocation
// holds exactly the blocks and the residual tokens in use (no spare slots), so the planner's bytes
// for C tokens are the bytes of a cache holding C tokens; append() grows it.
#pragma once

#include <cstddef>
#include <cstdint>

#include "qpkv/core/dtype.hpp"
#include "qpkv/core/tensor.hpp"

namespace qpkv {

struct CacheLayout {
  index_t kv_heads = 0;
  index_t q_heads = 0;
  index_t head_dim = 0;
  index_t block_tokens = 1;       ///< B
  std::size_t key_part = 0;       ///< bytes of a block's key part
  std::size_t value_part = 0;     ///< bytes of a block's value part
  index_t capacity_blocks = 0;    ///< allocated blocks per head
  index_t residual_limit = 0;     ///< R: the residual is quantized when it holds R tokens (0: no residual)
  index_t residual_capacity = 0;  ///< allocated fp16 residual slots per head (<= R; grows to R on append)

  [[nodiscard]] std::size_t block_bytes() const { return key_part + value_part; }
  [[nodiscard]] std::size_t blocks_bytes() const {
    return static_cast<std::size_t>(kv_heads * capacity_blocks) * block_bytes();
  }
  [[nodiscard]] std::size_t residual_bytes() const {
    return 2 * static_cast<std::size_t>(kv_heads * residual_capacity * head_dim) * sizeof(half);
  }
  [[nodiscard]] std::size_t total_bytes() const { return blocks_bytes() + residual_bytes(); }

  [[nodiscard]] std::size_t block_offset(index_t head, index_t block) const {
    return static_cast<std::size_t>(head * capacity_blocks + block) * block_bytes();
  }
  [[nodiscard]] std::size_t residual_key_offset(index_t head, index_t slot) const {
    return blocks_bytes() + static_cast<std::size_t>((head * residual_capacity + slot) * head_dim) * sizeof(half);
  }
  [[nodiscard]] std::size_t residual_value_offset(index_t head, index_t slot) const {
    return residual_key_offset(head, slot) + residual_bytes() / 2;
  }
};

/// A read-only snapshot of a cache's state, as kernels see it.
struct CacheState {
  CacheLayout layout;
  const std::uint8_t* data = nullptr;
  index_t blocks = 0;    ///< filled blocks per head
  index_t residual = 0;  ///< filled residual slots per head

  [[nodiscard]] index_t tokens() const { return blocks * layout.block_tokens + residual; }
};

}  // namespace qpkv
