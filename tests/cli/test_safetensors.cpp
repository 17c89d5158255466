// The tensor file readers the CLI takes its inputs through: .safetensors (qpkv/io/safetensors.hpp)
// and .npy (qpkv/io/npy.hpp). Round trips of every input dtype, and clear errors for malformed files.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "qpkv/core/dtype.hpp"
#include "qpkv/io/npy.hpp"
#include "qpkv/io/safetensors.hpp"

using namespace qpkv;

namespace {

std::string tmp(const std::string& name) {
  const auto dir = std::filesystem::temp_directory_path() / "qpkv_test_safetensors";
  std::filesystem::create_directories(dir);
  return (dir / name).string();
}

template <class T>
io::NpyArray array(const std::string& dtype, std::vector<std::int64_t> shape, const std::vector<T>& v) {
  io::NpyArray a;
  a.dtype = dtype;
  a.shape = std::move(shape);
  a.bytes.resize(v.size() * sizeof(T));
  if (!v.empty()) std::memcpy(a.bytes.data(), v.data(), a.bytes.size());  // memcpy(nullptr, ..., 0) is UB
  return a;
}

/// A safetensors image with the given header text and `data` bytes after it.
std::vector<unsigned char> image(const std::string& header, std::size_t data, std::uint64_t claimed = 0) {
  std::vector<unsigned char> b(8 + header.size() + data, 0);
  const std::uint64_t n = claimed ? claimed : header.size();
  for (std::size_t i = 0; i < 8; ++i) b[i] = static_cast<unsigned char>((n >> (8 * i)) & 0xff);
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}

std::string parse_error(const std::vector<unsigned char>& img) {
  try {
    (void)io::Safetensors::parse(img.data(), img.size(), "t.safetensors");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::string npy_error(const std::string& bytes) {
  try {
    (void)io::parse_npy(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size(), "t.npy");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

/// A version-1.0 .npy image with the given header dict and `data` zero bytes.
std::string npy(const std::string& dict, std::size_t data) {
  const std::size_t pad = (64 - (10 + dict.size() + 1) % 64) % 64, hlen = dict.size() + pad + 1;
  std::string s(10 + hlen + data, '\0');
  std::memcpy(s.data(), "\x93NUMPY\x01\x00", 8);
  s[8] = static_cast<char>(hlen & 0xff);
  s[9] = static_cast<char>(hlen >> 8);
  std::memcpy(s.data() + 10, dict.data(), dict.size());
  std::memset(s.data() + 10 + dict.size(), ' ', pad);
  s[10 + hlen - 1] = '\n';
  return s;
}

}  // namespace

TEST_CASE("safetensors round trip: float32, float16 and int64 tensors and metadata, byte for byte") {
  const std::vector<float> f = {1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, 7.0f};
  const std::vector<half> h = {to_half(1.0f), to_half(-0.5f), to_half(65504.0f)};
  const std::vector<std::int64_t> i = {0, 1, -7, std::int64_t{1} << 40};
  const std::vector<std::pair<std::string, io::NpyArray>> tensors = {
      {"keys", array("f4", {1, 2, 3}, f)}, {"h", array("f2", {3}, h)}, {"tokens \"quoted\"", array("i8", {2, 2}, i)},
      {"empty", array("f4", {0, 4}, std::vector<float>{})}};
  const std::string path = tmp("round.safetensors");
  io::save_safetensors(path, tensors, {{"format", "pt"}, {"note", "a\\b\n"}});
  const io::Safetensors st = io::Safetensors::load(path);
  REQUIRE(st.tensors().size() == tensors.size());
  for (const auto& [name, a] : tensors) {
    CAPTURE(name);
    const io::NpyArray b = st.tensor(name);
    CHECK(b.dtype == a.dtype);
    CHECK(b.shape == a.shape);
    CHECK(b.bytes == a.bytes);
  }
  CHECK(st.metadata().at("format") == "pt");
  CHECK(st.metadata().at("note") == "a\\b\n");
  CHECK(st.tensor("h").as<float>() == std::vector<float>{1.0f, -0.5f, 65504.0f});
  CHECK(st.tensor("tokens \"quoted\"").as<std::int64_t>() == i);
  // the header is padded to a multiple of 8 bytes, so the data buffer is aligned
  std::ifstream in(path, std::ios::binary);
  unsigned char len[8];
  in.read(reinterpret_cast<char*>(len), 8);
  CHECK(len[0] % 8 == 0);
}

TEST_CASE("safetensors reader accepts the reference writer's layout (header order != data order, escapes)") {
  // {"b": bytes [4, 8), "a": bytes [0, 4)}, a unicode escape in a metadata value, whitespace
  const std::string header =
      "{ \"__metadata__\" : {\"k\": \"caf\\u00e9 \\ud83d\\ude00\"},\n \"b\": {\"dtype\":\"F32\",\"shape\":[1],"
      "\"data_offsets\":[4,8]}, \"a\":{\"dtype\":\"I32\",\"shape\":[],\"data_offsets\":[0,4]} }";
  const auto img = image(header, 8);
  const io::Safetensors st = io::Safetensors::parse(img.data(), img.size());
  CHECK(st.names() == std::vector<std::string>{"b", "a"});
  CHECK(st.metadata().at("k") == "caf\xc3\xa9 \xf0\x9f\x98\x80");
  CHECK(st.tensor("a").shape.empty());  // a scalar
  CHECK(st.tensor("a").size() == 1);
}

TEST_CASE("safetensors reader rejects malformed files with an error naming the problem") {
  const std::string ok = R"({"x":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}})";
  REQUIRE(parse_error(image(ok, 16)).empty());
  const struct {
    const char* what;
    std::vector<unsigned char> img;
    const char* message;
  } cases[] = {
      {"shorter than the length field", {1, 2, 3}, "truncated"},
      {"header length beyond the file", image(ok, 16, 1000), "truncated"},
      {"absurd header length", image(ok, 16, std::uint64_t{1} << 60), "header length"},
      {"data truncated", image(ok, 12), "data_offsets[1]"},
      {"trailing bytes", image(ok, 20), "trailing bytes"},
      {"not JSON", image("{\"x\":", 16), "malformed header JSON"},
      {"not an object", image("[1,2]", 0), "JSON object"},
      {"trailing garbage", image(ok + "x", 16), "trailing characters"},
      {"deep nesting", image("{\"__metadata__\":" + std::string(100, '[') + std::string(100, ']') + "}", 0), "nested deeper"},
      {"duplicate name", image(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "duplicate key"},
      {"unknown dtype", image(R"({"x":{"dtype":"F31","shape":[2,2],"data_offsets":[0,16]}})", 16), "dtype: expected one of"},
      {"negative dim", image(R"({"x":{"dtype":"F32","shape":[-2,2],"data_offsets":[0,16]}})", 16), "shape[0]: expected a non-negative integer"},
      {"fractional dim", image(R"({"x":{"dtype":"F32","shape":[2.0,2],"data_offsets":[0,16]}})", 16), "shape[0]"},
      {"absurd dim", image(R"({"x":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,16]}})", 16), "more than the file holds"},
      {"shape does not match bytes", image(R"({"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}})", 16), "needs 24"},
      {"dtype does not match bytes", image(R"({"x":{"dtype":"F64","shape":[2,2],"data_offsets":[0,16]}})", 16), "needs 32"},
      {"offsets reversed", image(R"({"x":{"dtype":"F32","shape":[0],"data_offsets":[16,0]}})", 16), "begin <= end"},
      {"overlap", image(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", 12), "overlap"},
      {"hole", image(R"({"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", 8), "belong to no tensor"},
      {"missing key", image(R"({"x":{"dtype":"F32","shape":[4]}})", 16), "data_offsets"},
      {"unexpected key", image(R"({"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"y":1}})", 16), "unexpected key"},
      {"metadata not strings", image(R"({"__metadata__":{"a":1}})", 0), "__metadata__.a"},
      {"bad escape", image(R"({"__metadata__":{"a":"\q"}})", 0), "unknown escape"},
      {"lone surrogate", image(R"({"__metadata__":{"a":"\udc00"}})", 0), "surrogate"},
  };
  for (const auto& c : cases) {
    CAPTURE(c.what);
    const std::string m = parse_error(c.img);
    CAPTURE(m);
    CHECK(m.find("t.safetensors") != std::string::npos);
    CHECK(m.find(c.message) != std::string::npos);
  }
}

TEST_CASE("safetensors: a missing name lists the tensors; unconverted dtypes say so") {
  const auto img = image(R"({"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[1],"data_offsets":[4,5]}})", 5);
  const io::Safetensors st = io::Safetensors::parse(img.data(), img.size(), "t.safetensors");
  CHECK_THROWS_WITH_AS((void)st.tensor("c"), doctest::Contains("no tensor 'c' (the file has: a, b)"), Error);
  CHECK_THROWS_WITH_AS((void)st.tensor("a"), doctest::Contains("dtype BF16 is not supported"), Error);
  CHECK(st.tensor("b").dtype == "u1");
  CHECK_THROWS_WITH_AS(io::Safetensors::load(tmp("does-not-exist.safetensors")), doctest::Contains("cannot open"), Error);
}

TEST_CASE("npy round trip: float32, float16 and int64") {
  const std::vector<float> f = {1.0f, 2.5f, -3.0f, 4.0f, 5.0f, 6.0f};
  const std::vector<half> h = {to_half(0.5f), to_half(-1.0f)};
  const std::vector<std::int64_t> i = {3, -1, std::int64_t{1} << 50};
  io::save_npy(tmp("f.npy"), f.data(), {2, 3});
  io::save_npy(tmp("h.npy"), h.data(), {2});
  io::save_npy(tmp("i.npy"), i.data(), {1, 3});
  const auto a = io::load_npy(tmp("f.npy")), b = io::load_npy(tmp("h.npy")), c = io::load_npy(tmp("i.npy"));
  CHECK(a.dtype == "f4");
  CHECK(a.shape == std::vector<std::int64_t>{2, 3});
  CHECK(a.as<float>() == f);
  CHECK(b.dtype == "f2");
  CHECK(b.shape == std::vector<std::int64_t>{2});
  CHECK(b.as<float>() == std::vector<float>{0.5f, -1.0f});
  CHECK(c.dtype == "i8");
  CHECK(c.as<std::int64_t>() == i);
}

TEST_CASE("npy reader rejects truncated files, Fortran order, unknown dtypes and bad shapes") {
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }";
  REQUIRE(npy_error(npy(dict, 24)).empty());
  CHECK(npy_error(npy(dict, 20)).find("data shorter than shape") != std::string::npos);
  CHECK(npy_error(npy(dict, 24).substr(0, 9)).find("bad magic") != std::string::npos);
  CHECK(npy_error(npy(dict, 24).substr(0, 40)).find("truncated header") != std::string::npos);
  CHECK(npy_error(npy("{'descr': '<f4', 'fortran_order': True, 'shape': (2, 3), }", 24)).find("Fortran") != std::string::npos);
  CHECK(npy_error(npy("{'descr': '<c8', 'fortran_order': False, 'shape': (2, 3), }", 48)).find("dtype") != std::string::npos);
  CHECK(npy_error(npy("{'descr': '>f4', 'fortran_order': False, 'shape': (2, 3), }", 24)).find("big-endian") != std::string::npos);
  CHECK(npy_error(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (2, -3), }", 24)).find("malformed shape") != std::string::npos);
  CHECK(npy_error(npy("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999, 99999999999), }", 24)).find("data shorter") != std::string::npos);
  CHECK(npy_error(npy("{'descr': '<f4', 'fortran_order': False}", 24)).find("'shape'") != std::string::npos);
}
