// qpkv/io/npy.hpp - minimal .npy (NumPy format 1.0/2.0/3.0) reader and writer.
//
// Reads little-endian, C-order arrays of float32, float64, float16, int32, int64 and uint8 into an
// owning NpyArray; writes the same. Used by tests, examples and tools; the library core never
// touches files. Malformed files raise qpkv::Error, never UB.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "qpkv/core/dtype.hpp"
#include "qpkv/core/error.hpp"

namespace qpkv::io {

struct NpyArray {
  std::string dtype;             ///< numpy descr without byte order: "f4", "f8", "f2", "i4", "i8", "u1"
  std::vector<std::int64_t> shape;
  std::vector<unsigned char> bytes;  ///< raw little-endian data, C order

  [[nodiscard]] std::int64_t size() const {
    return std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
  }

  /// Copies the data out as T, converting from any numeric dtype above.
  template <class T>
  [[nodiscard]] std::vector<T> as() const {
    const std::int64_t n = size();
    std::vector<T> out(static_cast<std::size_t>(n));
    auto load = [&](auto tag) {
      using S = decltype(tag);
      for (std::int64_t i = 0; i < n; ++i) {
        S s;
        std::memcpy(&s, bytes.data() + i * sizeof(S), sizeof(S));
        if constexpr (std::is_same_v<S, half>) out[i] = static_cast<T>(to_float(s));
        else out[i] = static_cast<T>(s);
      }
    };
    if (dtype == "f4") load(float{});
    else if (dtype == "f8") load(double{});
    else if (dtype == "f2") load(half{});
    else if (dtype == "i4") load(std::int32_t{});
    else if (dtype == "i8") load(std::int64_t{});
    else if (dtype == "u1") load(std::uint8_t{});
    else throw Error("qpkv::io: npy dtype: expected one of f4,f8,f2,i4,i8,u1, got " + dtype);
    return out;
  }
};

namespace detail {
inline std::size_t npy_itemsize(const std::string& d) {
  if (d == "f4" || d == "i4") return 4;
  if (d == "f8" || d == "i8") return 8;
  if (d == "f2") return 2;
  if (d == "u1" || d == "i1" || d == "b1") return 1;
  throw Error("qpkv::io: npy dtype: expected one of f4,f8,f2,i4,i8,u1, got " + d);
}

inline std::string header_value(const std::string& h, const std::string& key, const std::string& path) {
  const auto k = h.find("'" + key + "'");
  if (k == std::string::npos) throw Error("qpkv::io: " + path + ": npy header lacks '" + key + "'");
  auto colon = h.find(':', k);
  if (colon == std::string::npos) throw Error("qpkv::io: " + path + ": malformed npy header");
  return h.substr(colon + 1);
}
}  // namespace detail

template <class T>
constexpr const char* npy_descr() {
  if constexpr (std::is_same_v<T, float>) return "<f4";
  else if constexpr (std::is_same_v<T, double>) return "<f8";
  else if constexpr (std::is_same_v<T, half>) return "<f2";
  else if constexpr (std::is_same_v<T, std::int32_t>) return "<i4";
  else if constexpr (std::is_same_v<T, std::int64_t>) return "<i8";
  else if constexpr (std::is_same_v<T, std::uint8_t>) return "|u1";
  else static_assert(sizeof(T) == 0, "npy_descr: unsupported element type");
}

/// Parses a .npy image held in memory (`path` only names it in error messages).
inline NpyArray parse_npy(const unsigned char* data, std::size_t size, const std::string& path = "npy") {
  const auto bad = [&](const std::string& what) { return Error("qpkv::io: " + path + ": " + what); };
  if (size < 10 || std::memcmp(data, "\x93NUMPY", 6) != 0) throw bad("not a .npy file (bad magic)");
  const unsigned major = data[6];
  std::size_t header_len, offset;
  if (major == 1) {
    header_len = data[8] | (std::size_t{data[9]} << 8);
    offset = 10;
  } else if (major == 2 || major == 3) {
    if (size < 12) throw bad("truncated header");
    header_len = data[8] | (std::size_t{data[9]} << 8) | (std::size_t{data[10]} << 16) |
                 (std::size_t{data[11]} << 24);
    offset = 12;
  } else {
    throw bad("unsupported npy version " + std::to_string(major));
  }
  if (header_len > size - offset) throw bad("truncated header");
  const std::string h(reinterpret_cast<const char*>(data + offset), header_len);
  NpyArray a;
  // descr
  std::string d = detail::header_value(h, "descr", path);
  auto q1 = d.find('\'');
  auto q2 = q1 == std::string::npos ? q1 : d.find('\'', q1 + 1);
  if (q2 == std::string::npos) throw bad("malformed descr");
  d = d.substr(q1 + 1, q2 - q1 - 1);
  if (d.size() < 2) throw bad("malformed descr");
  if (d[0] == '>') throw bad("big-endian arrays are not supported");
  if (d[0] == '<' || d[0] == '|' || d[0] == '=') d = d.substr(1);
  a.dtype = d;
  // fortran_order
  const std::string fo = detail::header_value(h, "fortran_order", path);
  if (fo.find("True") < fo.find(',')) throw bad("Fortran-order arrays are not supported");
  // shape
  std::string s = detail::header_value(h, "shape", path);
  auto p1 = s.find('('), p2 = s.find(')');
  if (p1 == std::string::npos || p2 == std::string::npos || p2 < p1) throw bad("malformed shape");
  s = s.substr(p1 + 1, p2 - p1 - 1);
  std::size_t pos = 0;
  while (pos < s.size()) {
    while (pos < s.size() && (s[pos] == ' ' || s[pos] == ',')) ++pos;
    if (pos >= s.size()) break;
    std::size_t end = pos;
    while (end < s.size() && s[end] >= '0' && s[end] <= '9') ++end;
    if (end == pos || end - pos > 15) throw bad("malformed shape");
    a.shape.push_back(std::stoll(s.substr(pos, end - pos)));
    pos = end;
  }
  const std::size_t item = detail::npy_itemsize(a.dtype);
  const std::size_t avail = size - offset - header_len;
  std::size_t count = 1;
  for (auto dim : a.shape) {
    if (dim != 0 && count > avail / static_cast<std::size_t>(dim)) throw bad("data shorter than shape");
    count *= static_cast<std::size_t>(dim);
  }
  if (count > avail / item) throw bad("data shorter than shape");
  a.bytes.assign(data + offset + header_len, data + offset + header_len + count * item);
  return a;
}

inline NpyArray load_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("qpkv::io: cannot open " + path);
  std::vector<unsigned char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return parse_npy(buf.data(), buf.size(), path);
}

/// Writes `data` (C order) with the given shape as a version-1.0 .npy file.
template <class T>
void save_npy(const std::string& path, const T* data, const std::vector<std::int64_t>& shape) {
  std::string shp = "(";
  std::int64_t n = 1;
  for (auto d : shape) {
    shp += std::to_string(d) + ", ";
    n *= d;
  }
  // "(3, 4, " -> "(3, 4)"; a 1-d shape keeps its comma: "(3,)".
  if (shape.size() > 1) shp.resize(shp.size() - 2);
  else if (shape.size() == 1) shp.resize(shp.size() - 1);
  shp += ")";
  std::string header = std::string("{'descr': '") + npy_descr<T>() + "', 'fortran_order': False, 'shape': " + shp + ", }";
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  if (!f) throw Error("qpkv::io: cannot write " + path);
  f.write("\x93NUMPY\x01\x00", 8);
  const std::uint16_t hl = static_cast<std::uint16_t>(header.size());
  const unsigned char hlb[2] = {static_cast<unsigned char>(hl & 0xff), static_cast<unsigned char>(hl >> 8)};
  f.write(reinterpret_cast<const char*>(hlb), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(n * sizeof(T)));
  if (!f) throw Error("qpkv::io: short write to " + path);
}

}  // namespace qpkv::io
