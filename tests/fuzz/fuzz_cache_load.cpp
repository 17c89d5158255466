// libFuzzer target: the cache file loader (qpkv/cache/serialize.hpp) on arbitrary bytes, with
// checksum comparisons off (FUZZING_BUILD_MODE_UNSAFE_FOR_PRODUCTION) so the fuzzer reaches the
// validation behind them. Oracles: malformed input is a qpkv::Error; an accepted file re-saves to
// exactly the bytes it was read from, and its cache attends to finite values.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "qpkv/cache/serialize.hpp"

namespace {

template <class Cache>
void check_loaded(const Cache& c, const std::string& input, std::size_t consumed) {
  std::ostringstream os;
  qpkv::save(os, c);
  // the re-saved bytes equal what was read, except checksums (not compared in this build)
  if (os.str().size() != consumed) std::abort();
  if (c.tokens() == 0) return;
  const qpkv::Shape s = c.shape();
  if (s.q_heads * s.head_dim > (1 << 16)) return;
  std::vector<float> q(static_cast<std::size_t>(s.q_heads * s.head_dim), 0.5f), out(q.size());
  c.attend(q.data(), out.data());
  for (float x : out)
    if (!std::isfinite(x)) std::abort();
  (void)input;
}

template <class Cache>
void try_load(Cache c, const std::string& input) {
  std::istringstream is(input);
  try {
    qpkv::load(is, c);
  } catch (const qpkv::Error&) {
    return;
  }
  check_loaded(c, input, static_cast<std::size_t>(is.tellg() < 0 ? input.size() : static_cast<std::size_t>(is.tellg())));
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  // the seed corpus (make_seeds.cpp) holds files of these types
  qpkv::Affine<4> q4;
  q4.group = 16;
  try_load(qpkv::CompressedKV<qpkv::KeepAll, qpkv::Affine<4>>(qpkv::Shape{2, 4, 8}, {}, q4, q4), input);
  qpkv::Affine<3> q3;
  q3.group = 8;
  q3.outliers = qpkv::OutlierRule{std::numeric_limits<float>::infinity(), 0.05};
  try_load(qpkv::CompressedKV<qpkv::KeepAll, qpkv::Affine<3>, qpkv::Fp16>(qpkv::Shape{1, 2, 8}, {}, q3), input);
  {
    std::istringstream is(input);
    try {
      const qpkv::AnyCompressedKV a = qpkv::load_any(is);
      if (a.tokens() > 0 && a.shape().q_heads * a.shape().head_dim <= (1 << 16)) {
        std::vector<float> q(static_cast<std::size_t>(a.shape().q_heads * a.shape().head_dim), 0.25f), out(q.size());
        a.attend(q.data(), out.data());
        for (float x : out)
          if (!std::isfinite(x)) std::abort();
      }
    } catch (const qpkv::Error&) {
    }
  }
  {
    std::istringstream is(input);
    try {
      (void)qpkv::to_string(qpkv::inspect(is));
    } catch (const qpkv::Error&) {
    }
  }
  return 0;
}
