// Writes the seed corpus of the fuzz targets: make_seeds DIR creates DIR/{npy,safetensors,
// cache_load,pipeline,quant}/ with a few small valid inputs each (committed as tests/fuzz/corpus/).
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "qpkv/cache/serialize.hpp"
#include "qpkv/io/npy.hpp"
#include "qpkv/io/safetensors.hpp"

namespace fs = std::filesystem;

namespace {
std::vector<float> wave(std::size_t n, float f) {
  std::vector<float> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = std::sin(static_cast<float>(i) * f) * 2.0f;
  return x;
}
void write(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary) << bytes;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  const fs::path dir = argv[1];
  for (const char* sub : {"npy", "safetensors", "cache_load", "pipeline", "quant"}) fs::create_directories(dir / sub);

  const auto x = wave(24, 0.7f);
  qpkv::io::save_npy((dir / "npy" / "f4_2x3x4.npy").string(), x.data(), {2, 3, 4});
  std::vector<qpkv::half> h(6);
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = qpkv::to_half(x[i]);
  qpkv::io::save_npy((dir / "npy" / "f2_6.npy").string(), h.data(), {6});
  const std::vector<std::int64_t> ints = {1, -2, 3};
  qpkv::io::save_npy((dir / "npy" / "i8_3.npy").string(), ints.data(), {3});
  const float scalar = 1.5f;
  qpkv::io::save_npy((dir / "npy" / "f4_scalar.npy").string(), &scalar, {});

  qpkv::io::NpyArray a = qpkv::io::parse_npy(
      [&] {
        std::ifstream f(dir / "npy" / "f4_2x3x4.npy", std::ios::binary);
        return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
      }().data(),
      static_cast<std::size_t>(fs::file_size(dir / "npy" / "f4_2x3x4.npy")));
  qpkv::io::NpyArray b;
  b.dtype = "i8";
  b.shape = {3};
  b.bytes.assign(reinterpret_cast<const unsigned char*>(ints.data()), reinterpret_cast<const unsigned char*>(ints.data() + 3));
  qpkv::io::save_safetensors((dir / "safetensors" / "two.safetensors").string(), {{"keys", a}, {"pos", b}},
                             {{"format", "pt"}});
  qpkv::io::save_safetensors((dir / "safetensors" / "one.safetensors").string(), {{"x", b}});

  // cache files of the types fuzz_cache_load.cpp loads into, and an AnyCompressedKV
  const auto k = wave(2 * 37 * 8, 0.37f), v = wave(k.size(), 0.11f);
  qpkv::Affine<4> q4;
  q4.group = 16;
  qpkv::CompressedKV<qpkv::KeepAll, qpkv::Affine<4>> c1(qpkv::Shape{2, 4, 8}, {}, q4, q4);
  c1.compress(qpkv::view(k.data(), 2, 37, 8), qpkv::view(v.data(), 2, 37, 8), 37);
  qpkv::save(dir / "cache_load" / "kivi4_g16.qpkv", c1);
  qpkv::Affine<3> q3;
  q3.group = 8;
  q3.outliers = qpkv::OutlierRule{std::numeric_limits<float>::infinity(), 0.05};
  qpkv::CompressedKV<qpkv::KeepAll, qpkv::Affine<3>, qpkv::Fp16> c2(qpkv::Shape{1, 2, 8}, {}, q3);
  c2.compress(qpkv::view(k.data(), 1, 20, 8), qpkv::view(v.data(), 1, 20, 8), 20);
  qpkv::save(dir / "cache_load" / "affine3_outliers_fp16.qpkv", c2);
  qpkv::AnyCompressedKV c3(qpkv::Shape{2, 4, 8}, qpkv::KVConfig::parse("snapkv,k4v2,group=8,residual=8,window=4"));
  const auto q = wave(4 * 37 * 8, 0.23f);
  c3.compress(qpkv::view(k.data(), 2, 37, 8), qpkv::view(v.data(), 2, 37, 8), qpkv::view(q.data(), 4, 37, 8), 24);
  qpkv::save(dir / "cache_load" / "any_snapkv_k4v2.qpkv", c3);

  // pipeline: header bytes (see fuzz_pipeline.cpp) followed by data bytes
  for (int seed = 0; seed < 4; ++seed) {
    std::string s;
    const unsigned char head[] = {static_cast<unsigned char>(seed), static_cast<unsigned char>(seed), 15, 40,
                                  static_cast<unsigned char>(seed + 1), 3, static_cast<unsigned char>(seed), 31, 8, 3,
                                  static_cast<unsigned char>(seed), 24, static_cast<unsigned char>(40 + seed * 5)};
    s.assign(reinterpret_cast<const char*>(head), sizeof head);
    for (int i = 0; i < 4000; ++i) s += static_cast<char>((i * 37 + seed * 11) % 251);
    write(dir / "pipeline" / ("seed" + std::to_string(seed)), s);
  }

  // quant: bits, scale type, axis, head_dim, group, tokens, parts, value mode (see fuzz_quant.cpp),
  // then data bytes: 4-bit half values of head_dim 128 in groups of 32, 2-bit bfloat16 values in
  // groups of 64, 8-bit float keys of head_dim 96, 4-bit half keys with specials, 4-bit values of 0..7, 3-bit values with
  // specials (the generic path; NaN reached its float->int conversion before the twelfth session)
  // (mode byte: mode % 4, 2^(mode / 4 % 64 - 40); the last seed: 0..7 with zeros of both signs)
  const unsigned char quant_heads[][8] = {{3, 0, 0, 5, 2, 31, 1, 161}, {1, 2, 0, 5, 3, 12, 2, 161},
                                          {4, 1, 1, 4, 2, 1, 1, 160}, {3, 0, 1, 5, 2, 0, 1, 162},
                                          {3, 0, 0, 5, 2, 20, 1, 163}, {2, 0, 0, 5, 2, 10, 1, 162}};
  for (int seed = 0; seed < 6; ++seed) {
    std::string s(reinterpret_cast<const char*>(quant_heads[seed]), 8);
    for (int i = 0; i < 12000; ++i)  // the last seed: NaN (byte 242) among finite values only
      s += static_cast<char>(seed == 5 ? (i % 17 == 3 ? 242 : (i * 53) % 200) : (i * 53 + seed * 7) % 253);
    write(dir / "quant" / ("seed" + std::to_string(seed)), s);
  }
  return 0;
}
