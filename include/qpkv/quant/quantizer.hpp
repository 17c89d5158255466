// qpkv/quant/quantizer.hpp - the Quantizer concept and the vocabulary shared by quantizer policies.
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>

#include "qpkv/core/tensor.hpp"

namespace qpkv {

/// Which elements share a scale.
///  - channel: one group = `group` consecutive tokens of one channel (KIVI keys, "per-channel").
///  - token:   one group = `group` consecutive channels of one token (KIVI values, "per-token").
///  - automatic: the cache decides by role: channel for keys, token for values (KIVI's choice).
enum class Axis { automatic, channel, token };

constexpr const char* axis_name(Axis a) {
  return a == Axis::channel ? "channel" : a == Axis::token ? "token" : "automatic";
}

/// A quantizer stores a slab of `tokens` x `dim` floats (one head's tokens of one block) as a
/// fixed-size byte "part". The cache owns the bytes; the quantizer defines what they mean.
///  - `bits`: compile-time code width (16 = unquantized fp16 storage).
///  - `axis`: member; Axis::automatic is resolved by the cache before any other call.
///  - `group_tokens()`: tokens one group spans along the token axis (group for Axis::channel,
///    1 for Axis::token). A cache block holds a multiple of it; the rest waits in the residual.
///  - `part_bytes(tokens, dim)`: exact size of one part (a multiple of 4).
///  - `encode(src, parts, tokens, dim, dst, dst_stride)`: quantizes `parts` consecutive slabs of
///    src (parts x tokens x dim floats, C order) into dst + i * dst_stride. One call may share
///    state across parts (HQQ's optimizer stops on the error of the whole call).
///  - `decode(part, tokens, dim, out)`: writes the tokens x dim floats the part represents; called
///    concurrently for different parts (CompressedKV::dequantize decodes blocks in parallel).
///  - `validate(dim, role)`: throws qpkv::Error if the parameters cannot serve this head_dim.
template <class Q>
concept Quantizer = requires(Q q, const Q& cq, const float* src, std::uint8_t* dst, const std::uint8_t* part,
                             float* out, index_t n, std::size_t stride) {
  { Q::bits } -> std::convertible_to<int>;
  { q.axis } -> std::convertible_to<Axis>;
  { cq.group_tokens() } -> std::convertible_to<index_t>;
  { cq.part_bytes(n, n) } -> std::convertible_to<std::size_t>;
  cq.encode(src, n, n, n, dst, stride);
  cq.decode(part, n, n, out);
  cq.validate(n, "key_quantizer");
};

/// Rounds a byte count up to a multiple of 4 (parts stay 4-byte aligned inside a block).
constexpr std::size_t align4(std::size_t n) { return (n + 3u) & ~std::size_t{3}; }

}  // namespace qpkv
