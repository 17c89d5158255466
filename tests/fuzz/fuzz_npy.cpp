// libFuzzer target: the .npy reader (qpkv/io/npy.hpp) on arbitrary bytes. Malformed input must be
// a qpkv::Error; an accepted array must convert without reading past its bytes.
#include <cstddef>
#include <cstdint>

#include "qpkv/io/npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const qpkv::io::NpyArray a = qpkv::io::parse_npy(data, size, "fuzz");
    if (a.size() <= (1 << 20)) (void)a.as<float>();
  } catch (const qpkv::Error&) {
  }
  return 0;
}
