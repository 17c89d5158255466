// libFuzzer target: the .safetensors reader (qpkv/io/safetensors.hpp) on arbitrary bytes.
// Malformed input must be a qpkv::Error; every tensor of an accepted file must be readable.
#include <cstddef>
#include <cstdint>

#include "qpkv/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    const auto st = qpkv::io::Safetensors::parse(data, size, "fuzz");
    for (const auto& t : st.tensors()) {
      try {
        const qpkv::io::NpyArray a = st.tensor(t.name);
        if (a.size() <= (1 << 20)) (void)a.as<float>();
      } catch (const qpkv::Error&) {  // a dtype that is validated but not converted
      }
    }
  } catch (const qpkv::Error&) {
  }
  return 0;
}
