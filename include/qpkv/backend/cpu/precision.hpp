// qpkv/backend/cpu/precision.hpp - how exactly decode attention computes q.k on a packed cache.
#pragma once

namespace qpkv {

/// Precision of the query-key products in attend().
///  - exact (default): float32 throughout; within 1e-5 relative of float64 attention over the
///    dequantized cache (tests/test_cache.cpp).
///  - fast: with AVX-512 VNNI compiled in (-march with avx512vnni), the KIVI kernel computes both
///    products with integer dot products. q.k: the scale-folded query of each key group is rounded
///    to 16-bit integers (two signed 8-bit parts hi * 256 + lo, so an outlier channel does not
///    flatten the rest) and multiplied with the unsigned codes by vpdpbusd. p.v: each token's
///    softmax weight times its value-group scale is rounded to a 15-bit integer per block and
///    group, and two tokens' codes share a dword for vpdpwssd; the min term stays float. Within
///    5e-4 relative of the same float64 reference (the accuracy target of the CPU performance
///    issue; measured 0.7e-4 .. 3.2e-4 in tests/test_attend_fast.cpp); softmax and the fp16 residual
///    stay float32. The AVX2 kernels (CPUs without AVX-512) do the same with vpmaddwd: the folded
///    query rounded to one int16 per channel (no hi/lo split), the value weights to int16 per
///    block and group; measured 1.4e-4 .. 2.5e-4 at head_dim 128. On AVX-512 CPUs without VNNI,
///    in the portable kernels and for caches the integer kernels do not cover, fast is exact.
enum class AttendPrecision { exact, fast };

}  // namespace qpkv
