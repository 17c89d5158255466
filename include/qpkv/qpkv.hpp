// qpkv/qpkv.hpp - umbrella header: everything that needs no CUDA compiler.
//
//   selectors   KeepAll, StreamingLLM, SnapKV, H2O, PyramidKV          (qpkv/select/)
//   quantizers  Affine<Bits>, Fp16, Kivi<K, V, Group, Residual>        (qpkv/quant/)
//   cache       CompressedKV<Selector, KeyQ, ValueQ, Backend>, budget planner (qpkv/cache/)
//   runtime     AnyCompressedKV + KVConfig ("snapkv,kivi4,group=64")   (qpkv/cache/any_cache.hpp)
//   reference   dense_attention                                        (qpkv/attention/)
#pragma once

#include "qpkv/attention/dense.hpp"
#include "qpkv/cache/any_cache.hpp"
#include "qpkv/cache/budget.hpp"
#include "qpkv/cache/compressed_kv.hpp"
#include "qpkv/core/dtype.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/quant/affine_quantizer.hpp"
#include "qpkv/quant/fp16.hpp"
#include "qpkv/quant/kivi.hpp"
#include "qpkv/select/select.hpp"
