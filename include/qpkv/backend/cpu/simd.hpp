// qpkv/backend/cpu/simd.hpp - which SIMD kernels this translation unit compiles, and how they are
// chosen.
//
//  - Built with AVX-512 enabled (-march=native on an AVX-512 machine, or -mavx512f -mavx512bw
//    -mavx512vl -mavx512dq -mf16c -mfma [-mavx512vnni]): the AVX-512 kernels are compiled for the
//    target and always used (QPKV_CPU_AVX512).
//  - Otherwise, with GCC or Clang on x86-64: the same kernels are compiled with target attributes
//    (AVX-512 F/BW/VL/DQ, F16C, FMA; + VNNI for the integer products of AttendPrecision::fast) and
//    attend() uses them when the CPU it runs on has those features, checked once at run time
//    (QPKV_CPU_DISPATCH; without VNNI, fast runs the exact kernels); elsewhere it runs the portable
//    C++ kernels, which the compiler vectorizes for the build's target (SSE2, AVX2, NEON ...).
//    With dispatch and a build target below AVX2 (the x86-64 default), the portable kernels are
//    compiled twice: for the target, and for AVX2 + FMA + F16C (QPKV_CPU_AVX2_COPY), which runs
//    on CPUs that have AVX2 but not AVX-512.
//  - Define QPKV_NO_SIMD to force the portable kernels, QPKV_NO_DISPATCH to compile only what the
//    build targets (no run-time check).
//  - AVX2 kernels (attend_avx2.hpp, KIVI and fp16 caches, exact arithmetic) for CPUs with AVX2 +
//    FMA + F16C but no AVX-512: compiled for the target where it has AVX2 (QPKV_CPU_AVX2_KERNELS),
//    else with a target attribute in dispatch builds and chosen at run time
//    (QPKV_CPU_AVX2_DISPATCH). What they do not cover runs the portable kernels.
//  - At run time, the environment variable QPKV_CPU caps the kernels a process uses: `portable`
//    (the build target's portable kernels), `avx2` (the AVX2 kernels, and the AVX2 copy of the
//    portable kernels where compiled), `avx512` (no VNNI: AttendPrecision::fast runs the exact
//    kernels) or `avx512-vnni` (no cap); any other value is an error. Benchmarks and tests use it
//    to compare kernels in one binary.
// Every kernel gives the same results up to float rounding (tests compare them with float64).
#pragma once

#if defined(QPKV_EMULATE_AVX512)
// Test builds only (tests/CMakeLists.txt: qpkv_tests_native on an AVX2-only machine): the AVX-512 kernels compiled as if
// the target had AVX-512 + VNNI, against an emulation of the intrinsics on AVX2
// (tests/avx512_emulation.hpp: SIMDe plus what SIMDe lacks), so that a CPU without AVX-512 runs them.
#if defined(QPKV_NO_SIMD) || !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__) || defined(__AVX512F__)
#error "QPKV_EMULATE_AVX512: build for an AVX2 + FMA + F16C target without AVX-512 (-march=haswell or newer)"
#endif
#define QPKV_CPU_AVX512 1
#define QPKV_CPU_AVX512_KERNELS 1
#define QPKV_CPU_AVX512VNNI 1
#elif !defined(QPKV_NO_SIMD) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__F16C__) && defined(__FMA__)
#define QPKV_CPU_AVX512 1
#define QPKV_CPU_AVX512_KERNELS 1
#if defined(__AVX512VNNI__)
#define QPKV_CPU_AVX512VNNI 1
#endif
#elif !defined(QPKV_NO_SIMD) && !defined(QPKV_NO_DISPATCH) && defined(__x86_64__) && !defined(__CUDACC__) && \
    (defined(__clang__) ? __clang_major__ >= 14 : (defined(__GNUC__) && __GNUC__ >= 11))
#define QPKV_CPU_DISPATCH 1
#define QPKV_CPU_AVX512_KERNELS 1
#define QPKV_CPU_AVX512VNNI 1
#if !defined(__AVX2__)
#define QPKV_CPU_AVX2_COPY 1
#endif
#endif

// The AVX2 kernels (attend_avx2.hpp): compiled for the target where it has AVX2 + FMA + F16C (an
// AVX-512 target too, so that QPKV_CPU=avx2 can run them there), else with a target attribute in
// dispatch builds and chosen at run time on CPUs with AVX2 but without AVX-512.
#if !defined(QPKV_NO_SIMD) && defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QPKV_CPU_AVX2_KERNELS 1
#elif defined(QPKV_CPU_DISPATCH)
#define QPKV_CPU_AVX2_KERNELS 1
#define QPKV_CPU_AVX2_DISPATCH 1
#endif

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"

#if defined(QPKV_CPU_AVX512_KERNELS) || defined(QPKV_CPU_AVX2_KERNELS)
#include <immintrin.h>
#endif
#if defined(QPKV_EMULATE_AVX512)
#include "avx512_emulation.hpp"
#endif

/// The target attributes of the AVX-512 kernel functions (empty when the build targets AVX-512):
/// QPKV_TARGET for all of them, QPKV_TARGET_VNNI for the two that use VNNI (the integer products
/// of AttendPrecision::fast), so that an AVX-512 CPU without VNNI runs the rest.
#if defined(QPKV_CPU_DISPATCH)
#define QPKV_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define QPKV_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#else
#define QPKV_TARGET
#define QPKV_TARGET_VNNI
#endif

/// Forces inlining of small SIMD helpers whose arguments are register arrays: out of line, GCC
/// passes them through memory (a 16-register transpose became 32 stores and loads plus a call).
/// QPKV_NOINLINE keeps a kernel stage out of its caller: inlined into the whole work item, GCC 12
/// ran out of registers and reloaded loop constants and pointers from the stack inside the stage's
/// loops.
/// QPKV_TARGET_AVX2: the target attribute of the AVX2 kernels (empty when the build targets AVX2).
#if defined(QPKV_CPU_AVX2_DISPATCH)
#define QPKV_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define QPKV_TARGET_AVX2
#endif
#if defined(__GNUC__) || defined(__clang__)
#define QPKV_ALWAYS_INLINE inline __attribute__((always_inline))
#define QPKV_NOINLINE __attribute__((noinline))
#else
#define QPKV_ALWAYS_INLINE inline
#define QPKV_NOINLINE
#endif
#define QPKV_INLINE QPKV_ALWAYS_INLINE QPKV_TARGET
#define QPKV_INLINE_VNNI QPKV_ALWAYS_INLINE QPKV_TARGET_VNNI
#define QPKV_INLINE_AVX2 QPKV_ALWAYS_INLINE QPKV_TARGET_AVX2

/// GCC 12 reports -Wmaybe-uninitialized inside its own AVX-512 intrinsics (their
/// "__m512 __Y = __Y;" placeholders) once they are inlined into a kernel; the warning is spurious.
/// QPKV_INTRINSICS_WARNINGS_OFF / _ON bracket the kernel code.
#if defined(__GNUC__) && !defined(__clang__)
#define QPKV_INTRINSICS_WARNINGS_OFF                                  \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"") \
      _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")
#define QPKV_INTRINSICS_WARNINGS_ON _Pragma("GCC diagnostic pop")
#else
#define QPKV_INTRINSICS_WARNINGS_OFF
#define QPKV_INTRINSICS_WARNINGS_ON
#endif

namespace qpkv::cpu {

#if defined(QPKV_CPU_AVX512_KERNELS)
/// The first min(n, 16) lanes of a 16-lane vector (a row's tail in the AVX-512 kernels).
QPKV_INLINE __mmask16 tail_mask(index_t n) { return n >= 16 ? __mmask16(0xffff) : static_cast<__mmask16>((1u << n) - 1u); }
#endif

/// Query tiles of 4 (when Max >= 4), 2 and 1 over the g queries of a GQA group: f4(i), f2(i) or
/// f1(i) for the tile starting at query i. Every kernel family uses it; it has no target
/// attribute (it only calls the kernels' lambdas), so that each family's kernels inline it.
template <int Max = 4, class Fn4, class Fn2, class Fn1>
inline void for_query_tiles(index_t g, Fn4&& f4, Fn2&& f2, Fn1&& f1) {
  index_t i = 0;
  if constexpr (Max >= 4)
    for (; i + 4 <= g; i += 4) f4(i);
  for (; i + 2 <= g; i += 2) f2(i);
  for (; i < g; ++i) f1(i);
}

/// The Cephes expf constants of every kernel family's e^x (x <= 0): n = round(x log2e),
/// r = x - n ln2_hi - n ln2_lo, e^r = 1 + r + r^2 (((((p0 r + p1) r + p2) r + p3) r + p4) r + p5),
/// about 1 ulp; one set, so that the families agree.
namespace exp_poly {
inline constexpr float log2e = 1.44269504088896341f, ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
inline constexpr float p0 = 1.9875691500e-4f, p1 = 1.3981999507e-3f, p2 = 8.3334519073e-3f, p3 = 4.1665795894e-2f,
                       p4 = 1.6666665459e-1f, p5 = 5.0000001201e-1f;
}  // namespace exp_poly

/// One work item's online-softmax state in the SIMD kernels: m[g], l[g], acc[g * D] (natural
/// channel order on return).
struct Partial {
  float* m;
  float* l;
  float* acc;
};

#if defined(QPKV_CPU_AVX512_KERNELS) || defined(QPKV_CPU_AVX2_KERNELS)
/// Software prefetch of a work item's KIVI blocks, one cache line per step(), into L2
/// (prefetcht1; SSE, so no target attribute is needed). The kernels call step() once per
/// key-tile column and once per value row (pair), more often than a pass has lines; kivi_item()
/// keeps the cursor within the next pass (the next block where a pass is one block). Why this
/// shape, measured at 32K tokens (docs/performance.md): a burst of a whole block's prefetches at
/// the block start filled the miss buffers (slower); prefetches spread like this alone changed
/// nothing, because on this CPU they do not get past a page whose translation is not cached;
/// together with one demand load per block just past the window (kivi_item), which brings each
/// new page's translation in early, they cut the time by 4-5%.
struct Prefetch {
  const std::uint8_t* next = nullptr;
  const std::uint8_t* stop = nullptr;
  QPKV_ALWAYS_INLINE void step() {
    if (next < stop) {
      _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T1);
      next += 64;
    }
  }
  /// step() without a branch (at the window's end it prefetches the last line again), for the
  /// VNNI token loops: a branch there split them into several blocks and GCC 12 then copied the
  /// vpdpwssd accumulators in and out of spare registers around every dot product. (In the
  /// exact kernels the branch is cheaper: 2K tokens, 0.579 -> 0.567 ms.)
  QPKV_ALWAYS_INLINE void step_branchless() {
    _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T1);
    next += next + 64 < stop ? 64 : 0;
  }
};
#endif

/// Levels of the QPKV_CPU cap.
inline constexpr int kCapPortable = 0, kCapAvx2 = 1, kCapAvx512 = 2, kCapAvx512Vnni = 3;

/// The QPKV_CPU cap, read once (kCapAvx512Vnni, no cap, when unset).
inline int cpu_cap() {
  static const int cap = [] {
    const char* e = std::getenv("QPKV_CPU");
    if (e == nullptr || *e == '\0') return kCapAvx512Vnni;
    const std::string_view v(e);
    if (v == "portable") return kCapPortable;
    if (v == "avx2") return kCapAvx2;
    if (v == "avx512") return kCapAvx512;
    if (v == "avx512-vnni") return kCapAvx512Vnni;
    throw Error(qpkv::detail::concat("qpkv: QPKV_CPU: expected portable, avx2, avx512 or avx512-vnni, got '", v, "'"));
  }();
  return cap;
}

/// Can this process run the AVX2 kernels (attend_avx2.hpp)? They run where the AVX-512 ones do
/// not (no AVX-512, or QPKV_CPU=avx2).
inline bool avx2_kernels_usable() {
#if defined(QPKV_CPU_AVX2_DISPATCH)
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_cap() >= kCapAvx2 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // F16C comes with AVX2 CPUs
  }();
  return ok;
#elif defined(QPKV_CPU_AVX2_KERNELS)
  return cpu_cap() >= kCapAvx2;
#else
  return false;
#endif
}

/// Does this process run the AVX2 copy of the portable kernels (for what the AVX-512 and AVX2
/// kernels do not cover)? Only dispatch builds below AVX2 have that copy; they also have the AVX2
/// kernels with a target attribute, under the same run-time check.
inline bool avx2_usable() {
#if defined(QPKV_CPU_AVX2_COPY)
  return avx2_kernels_usable();
#else
  return false;
#endif
}

/// Can this process run the AVX-512 kernels? (Always, when the build targets AVX-512; with
/// run-time dispatch, when the CPU has every feature of QPKV_TARGET.)
inline bool avx512_usable() {
#if defined(QPKV_CPU_DISPATCH)
  static const bool ok = [] {
    __builtin_cpu_init();
    return cpu_cap() >= kCapAvx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");  // F16C comes with AVX2 CPUs
  }();
  return ok;
#elif defined(QPKV_CPU_AVX512_KERNELS)
  return cpu_cap() >= kCapAvx512;
#else
  return false;
#endif
}

/// ... and their VNNI parts (AttendPrecision::fast; without them fast runs the exact kernels)?
inline bool avx512_vnni_usable() {
#if defined(QPKV_CPU_DISPATCH)
  static const bool ok = cpu_cap() >= kCapAvx512Vnni && avx512_usable() && __builtin_cpu_supports("avx512vnni");
  return ok;
#elif defined(QPKV_CPU_AVX512VNNI)
  return cpu_cap() >= kCapAvx512Vnni;
#else
  return false;
#endif
}

/// The kernel family attend() runs for KIVI and fp16 caches in this process: "avx512-vnni",
/// "avx512", "avx2" (compiled for the target), "avx512-vnni (dispatch)", "avx512 (dispatch)",
/// "avx2 (dispatch)" (chosen at run time) or "portable".
inline const char* simd_name() {
#if defined(QPKV_CPU_DISPATCH)
  return avx512_vnni_usable() ? "avx512-vnni (dispatch)"
         : avx512_usable()    ? "avx512 (dispatch)"
         : avx2_kernels_usable() ? "avx2 (dispatch)"
                                 : "portable";
#else
  return avx512_vnni_usable() ? "avx512-vnni" : avx512_usable() ? "avx512" : avx2_kernels_usable() ? "avx2" : "portable";
#endif
}

}  // namespace qpkv::cpu
