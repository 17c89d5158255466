// qpkv/quant/kivi.hpp - KIVI (Liu et al. 2024; jy-yuan/KIVI): keys per channel over token groups,
// values per token over channel groups, both asymmetric min-max, with the most recent tokens kept
// in full precision (the residual) until a whole key group can be formed.
#pragma once

#include "qpkv/quant/affine_quantizer.hpp"
#include "qpkv/quant/fp16.hpp"

namespace qpkv {

/// Quantizer for `Bits` bits: Affine<Bits> for 1..8, Fp16 for 16.
template <int Bits, ScaleStorage ScaleT = half>
using QuantizerFor = std::conditional_t<Bits == 16, Fp16, Affine<(Bits == 16 ? 8 : Bits), ScaleT>>;

/// A KV quantization scheme: the key and value quantizers and the residual length. Pass it as the
/// key (and value) quantizer of a CompressedKV; the cache takes `key` from the key argument's
/// scheme and `value` from the value argument's scheme.
///   KBits, VBits: code widths (1, 2, 3, 4, 8 or 16); Group: elements per group (KIVI: 32);
///   Residual: recent tokens kept in fp16 (rounded up to a multiple of Group; KIVI uses 32..128).
template <int KBits, int VBits = KBits, index_t Group = 32, index_t Residual = 0, ScaleStorage ScaleT = half>
struct Kivi {
  static_assert(Group > 0, "qpkv::Kivi: Group must be positive");
  static_assert(Residual >= 0, "qpkv::Kivi: Residual must be >= 0");
  using key_type = QuantizerFor<KBits, ScaleT>;
  using value_type = QuantizerFor<VBits, ScaleT>;

  key_type key = make(Axis::channel);
  value_type value = make_value();
  index_t residual = Residual;

 private:
  static key_type make(Axis a) {
    key_type q{};
    q.axis = a;
    if constexpr (KBits != 16) q.group = Group;
    return q;
  }
  static value_type make_value() {
    value_type q{};
    q.axis = Axis::token;
    if constexpr (VBits != 16) q.group = Group;
    return q;
  }
};

/// True for KV schemes (types with `key`, `value` and `residual` members), such as Kivi.
template <class S>
concept KVScheme = requires(const S& s) {
  s.key;
  s.value;
  { s.residual } -> std::convertible_to<index_t>;
};

}  // namespace qpkv
