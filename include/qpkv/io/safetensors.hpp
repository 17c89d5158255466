// qpkv/io/safetensors.hpp - .safetensors reader and writer (no third-party JSON library).
//
// Format (huggingface/safetensors): an 8-byte little-endian header length n, n bytes of UTF-8 JSON,
// then the data buffer. The JSON is one object: "__metadata__" (optional; an object of string
// values) and, per tensor, {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]} with
// offsets relative to the data buffer, end - begin = product(shape) x itemsize.
//
// parse_safetensors() validates everything before it touches tensor data, and every failure is a
// qpkv::Error naming the file (and tensor): header length larger than the file or than 100 MB (the
// reference implementation's limit), malformed or deeply nested JSON, duplicate names, unknown
// dtypes, negative / fractional / absurd shape entries, a byte count that does not match the shape,
// offsets beyond the data buffer, overlapping tensors or bytes no tensor covers (the format allows
// neither). Tensors are returned as NpyArray (qpkv/io/npy.hpp) so callers handle .npy and
// .safetensors inputs alike; F32, F64, F16, I32, I64 and U8 convert, the other dtypes of the format
// (BF16, I8, I16, U16, U32, U64, BOOL, F8_*) are recognised and validated but not converted.
// Like npy.hpp this is for tools, tests and examples; the library core never touches files.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "qpkv/core/error.hpp"
#include "qpkv/io/npy.hpp"

namespace qpkv::io {

/// One tensor's entry in a safetensors header.
struct SafetensorsInfo {
  std::string name;
  std::string dtype;                 ///< the format's name: "F32", "F16", "I64", ...
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0;           ///< byte offsets into the data buffer
  std::uint64_t end = 0;
};

namespace st_detail {

/// The format's dtypes: name, item size, the NpyArray dtype it converts to ("" = not converted).
struct DtypeInfo {
  std::string_view name;
  std::size_t itemsize;
  std::string_view npy;
};
inline constexpr std::array<DtypeInfo, 16> kDtypes = {{
    {"F64", 8, "f8"}, {"F32", 4, "f4"}, {"F16", 2, "f2"}, {"BF16", 2, ""},
    {"I64", 8, "i8"}, {"I32", 4, "i4"}, {"I16", 2, ""},   {"I8", 1, ""},
    {"U64", 8, ""},   {"U32", 4, ""},   {"U16", 2, ""},   {"U8", 1, "u1"},
    {"BOOL", 1, ""},  {"F8_E4M3", 1, ""}, {"F8_E5M2", 1, ""}, {"F8_E8M0", 1, ""},
}};

inline const DtypeInfo* find_dtype(std::string_view name) {
  for (const DtypeInfo& d : kDtypes)
    if (d.name == name) return &d;
  return nullptr;
}

inline std::string dtype_list() {
  std::string s;
  for (const DtypeInfo& d : kDtypes) {
    if (!s.empty()) s += ", ";
    s += d.name;
  }
  return s;
}

/// A JSON value, just enough of it for safetensors headers.
struct Json {
  Json() {}  // user-provided: clang + libstdc++ otherwise recurse through pair<string, Json> (incomplete)
  enum class Kind { null, boolean, number, string, array, object } kind = Kind::null;
  bool boolean = false;
  std::string text;  ///< a string's value, or a number's literal text
  std::vector<Json> items;
  std::vector<std::pair<std::string, Json>> members;  ///< in file order
};

/// Recursive-descent JSON parser (RFC 8259) with a nesting limit; throws via `bad`.
class JsonParser {
 public:
  static constexpr int max_depth = 32;

  JsonParser(std::string_view text, std::string where) : s_(text), where_(std::move(where)) {}

  Json parse_document() {
    Json v = value(0);
    skip_ws();
    if (i_ != s_.size()) fail("trailing characters after the JSON object");
    return v;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    throw Error(qpkv::detail::concat("qpkv::io: ", where_, ": malformed header JSON at byte ", i_, ": ", what));
  }
  void skip_ws() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  char peek() {
    skip_ws();
    if (i_ >= s_.size()) fail("unexpected end");
    return s_[i_];
  }
  void expect(char c) {
    if (peek() != c) fail(qpkv::detail::concat("expected '", c, "'"));
    ++i_;
  }
  bool literal(std::string_view word) {
    if (s_.substr(i_, word.size()) != word) return false;
    i_ += word.size();
    return true;
  }

  Json value(int depth) {
    if (depth > max_depth) fail(qpkv::detail::concat("nested deeper than ", max_depth, " levels"));
    const char c = peek();
    Json v;
    if (c == '{') {
      v.kind = Json::Kind::object;
      ++i_;
      if (peek() == '}') {
        ++i_;
        return v;
      }
      for (;;) {
        if (peek() != '"') fail("expected a string key");
        std::string key = string();
        for (const auto& m : v.members)
          if (m.first == key) fail("duplicate key \"" + key + "\"");
        expect(':');
        v.members.emplace_back(std::move(key), value(depth + 1));
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect('}');
        return v;
      }
    }
    if (c == '[') {
      v.kind = Json::Kind::array;
      ++i_;
      if (peek() == ']') {
        ++i_;
        return v;
      }
      for (;;) {
        v.items.push_back(value(depth + 1));
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect(']');
        return v;
      }
    }
    if (c == '"') {
      v.kind = Json::Kind::string;
      v.text = string();
      return v;
    }
    if (literal("true")) {
      v.kind = Json::Kind::boolean;
      v.boolean = true;
      return v;
    }
    if (literal("false")) {
      v.kind = Json::Kind::boolean;
      return v;
    }
    if (literal("null")) return v;
    if (c == '-' || (c >= '0' && c <= '9')) {
      v.kind = Json::Kind::number;
      v.text = number();
      return v;
    }
    fail(qpkv::detail::concat("unexpected character '", c, "'"));
  }

  std::string number() {
    const std::size_t start = i_;
    auto digits = [&] {
      const std::size_t d = i_;
      while (i_ < s_.size() && s_[i_] >= '0' && s_[i_] <= '9') ++i_;
      if (i_ == d) fail("malformed number");
    };
    if (s_[i_] == '-') ++i_;
    if (i_ < s_.size() && s_[i_] == '0') ++i_;
    else digits();
    if (i_ < s_.size() && s_[i_] == '.') {
      ++i_;
      digits();
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      digits();
    }
    return std::string(s_.substr(start, i_ - start));
  }

  unsigned hex4() {
    if (s_.size() - i_ < 4) fail("truncated \\u escape");
    unsigned u = 0;
    for (int k = 0; k < 4; ++k) {
      const char h = s_[i_++];
      u <<= 4;
      if (h >= '0' && h <= '9') u |= static_cast<unsigned>(h - '0');
      else if (h >= 'a' && h <= 'f') u |= static_cast<unsigned>(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') u |= static_cast<unsigned>(h - 'A' + 10);
      else fail("bad hex digit in \\u escape");
    }
    return u;
  }

  static void put_utf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xc0 | (cp >> 6));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xe0 | (cp >> 12));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      out += static_cast<char>(0xf0 | (cp >> 18));
      out += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      out += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }

  std::string string() {
    ++i_;  // opening quote (checked by the caller)
    std::string out;
    for (;;) {
      if (i_ >= s_.size()) fail("unterminated string");
      const char c = s_[i_++];
      if (c == '"') return out;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        out += c;
        continue;
      }
      if (i_ >= s_.size()) fail("unterminated escape");
      switch (s_[i_++]) {
        case '"': out += '"'; break;
        case '\\': out += '\\'; break;
        case '/': out += '/'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'n': out += '\n'; break;
        case 'r': out += '\r'; break;
        case 't': out += '\t'; break;
        case 'u': {
          unsigned cp = hex4();
          if (cp >= 0xd800 && cp <= 0xdbff) {  // high surrogate: a low one must follow
            if (!literal("\\u")) fail("unpaired surrogate in \\u escape");
            const unsigned lo = hex4();
            if (lo < 0xdc00 || lo > 0xdfff) fail("unpaired surrogate in \\u escape");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          } else if (cp >= 0xdc00 && cp <= 0xdfff) {
            fail("unpaired surrogate in \\u escape");
          }
          put_utf8(out, cp);
          break;
        }
        default: fail("unknown escape");
      }
    }
  }

  std::string_view s_;
  std::string where_;
  std::size_t i_ = 0;
};

/// A JSON number that must be a non-negative integer <= limit (no sign, fraction or exponent).
inline std::uint64_t to_count(const Json& v, std::uint64_t limit, const std::string& what) {
  if (v.kind != Json::Kind::number || v.text.find_first_not_of("0123456789") != std::string::npos)
    throw Error(what + ": expected a non-negative integer, got " + (v.kind == Json::Kind::number ? v.text : "a non-number"));
  if (v.text.size() > 19) throw Error(what + ": expected <= " + std::to_string(limit) + ", got " + v.text);
  const std::uint64_t x = std::stoull(v.text);
  if (x > limit) throw Error(what + ": expected <= " + std::to_string(limit) + ", got " + v.text);
  return x;
}

inline std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + ")";
}

inline std::uint64_t read_le64(const unsigned char* p) {
  std::uint64_t x = 0;
  for (int i = 7; i >= 0; --i) x = (x << 8) | p[i];
  return x;
}

inline std::string json_escape(std::string_view s) {
  std::string out;
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (u < 0x20) {
      static constexpr char hex[] = "0123456789abcdef";
      out += "\\u00";
      out += hex[u >> 4];
      out += hex[u & 15];
    } else {
      out += c;
    }
  }
  return out;
}

}  // namespace st_detail

/// A parsed .safetensors image: the validated index and the raw data buffer.
class Safetensors {
 public:
  /// The largest header the reader accepts (the reference implementation's limit).
  static constexpr std::uint64_t max_header_bytes = 100'000'000;

  /// Parses a .safetensors image held in memory (`path` only names it in error messages).
  static Safetensors parse(const unsigned char* data, std::size_t size, const std::string& path = "safetensors");
  /// Reads and parses a file.
  static Safetensors load(const std::string& path);

  [[nodiscard]] const std::vector<SafetensorsInfo>& tensors() const { return tensors_; }
  [[nodiscard]] const std::map<std::string, std::string>& metadata() const { return metadata_; }
  [[nodiscard]] const std::string& path() const { return path_; }
  /// The entry called `name`, or nullptr.
  [[nodiscard]] const SafetensorsInfo* find(std::string_view name) const {
    for (const SafetensorsInfo& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }
  /// The names, in the header's order.
  [[nodiscard]] std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (const SafetensorsInfo& t : tensors_) n.push_back(t.name);
    return n;
  }
  /// The tensor called `name` as an NpyArray (F32, F64, F16, I32, I64, U8); an Error names the
  /// available tensors when there is none of that name.
  [[nodiscard]] NpyArray tensor(std::string_view name) const;

 private:
  std::string path_;
  std::vector<SafetensorsInfo> tensors_;
  std::map<std::string, std::string> metadata_;
  std::vector<unsigned char> data_;  ///< the data buffer (after the header)
};

inline Safetensors Safetensors::parse(const unsigned char* data, std::size_t size, const std::string& path) {
  using st_detail::Json;
  const auto bad = [&](const std::string& what) { return Error("qpkv::io: " + path + ": " + what); };
  if (size < 8) throw bad(qpkv::detail::concat("truncated: expected at least 8 bytes (the header length), got ", size));
  const std::uint64_t n = st_detail::read_le64(data);
  if (n > max_header_bytes)
    throw bad(qpkv::detail::concat("header length: expected <= ", max_header_bytes, " bytes, got ", n));
  if (n > size - 8)
    throw bad(qpkv::detail::concat("truncated: the header length says ", n, " bytes but only ", size - 8, " follow"));
  if (n < 2) throw bad(qpkv::detail::concat("header length: expected >= 2 bytes (a JSON object), got ", n));
  const std::string_view text(reinterpret_cast<const char*>(data + 8), static_cast<std::size_t>(n));
  if (text.front() != '{') throw bad("header: expected a JSON object starting with '{'");
  const Json root = st_detail::JsonParser(text, path).parse_document();
  if (root.kind != Json::Kind::object) throw bad("header: expected a JSON object");

  Safetensors st;
  st.path_ = path;
  const std::uint64_t avail = size - 8 - n;  // bytes of the data buffer
  for (const auto& [name, v] : root.members) {
    if (name == "__metadata__") {
      if (v.kind != Json::Kind::object) throw bad("__metadata__: expected an object of strings");
      for (const auto& [k, s] : v.members) {
        if (s.kind != Json::Kind::string) throw bad("__metadata__." + k + ": expected a string");
        st.metadata_[k] = s.text;
      }
      continue;
    }
    const std::string where = "tensor '" + name + "'";
    if (v.kind != Json::Kind::object) throw bad(where + ": expected an object with dtype, shape, data_offsets");
    const Json *dtype = nullptr, *shape = nullptr, *offsets = nullptr;
    for (const auto& [k, f] : v.members) {
      if (k == "dtype") dtype = &f;
      else if (k == "shape") shape = &f;
      else if (k == "data_offsets") offsets = &f;
      else throw bad(where + ": unexpected key \"" + k + "\" (expected dtype, shape, data_offsets)");
    }
    if (!dtype || !shape || !offsets) throw bad(where + ": expected the keys dtype, shape and data_offsets");
    SafetensorsInfo t;
    t.name = name;
    if (dtype->kind != Json::Kind::string) throw bad(where + ".dtype: expected a string");
    const st_detail::DtypeInfo* d = st_detail::find_dtype(dtype->text);
    if (!d) throw bad(where + ".dtype: expected one of " + st_detail::dtype_list() + ", got " + dtype->text);
    t.dtype = dtype->text;
    if (shape->kind != Json::Kind::array) throw bad(where + ".shape: expected an array of integers");
    if (shape->items.size() > 16) throw bad(qpkv::detail::concat(where, ".shape: expected at most 16 dimensions, got ", shape->items.size()));
    // The element count must fit the data buffer, so no product below can overflow.
    std::uint64_t count = 1;
    for (std::size_t i = 0; i < shape->items.size(); ++i) {
      const std::uint64_t dim = st_detail::to_count(shape->items[i], std::uint64_t{1} << 62,
                                                    qpkv::detail::concat("qpkv::io: ", path, ": ", where, ".shape[", i, "]"));
      t.shape.push_back(static_cast<std::int64_t>(dim));
      if (dim != 0 && count > avail / dim) count = avail + 1;  // larger than the buffer: reported below
      else count *= dim;
    }
    if (offsets->kind != Json::Kind::array || offsets->items.size() != 2)
      throw bad(where + ".data_offsets: expected [begin, end]");
    t.begin = st_detail::to_count(offsets->items[0], avail, "qpkv::io: " + path + ": " + where + ".data_offsets[0] (data buffer bytes)");
    t.end = st_detail::to_count(offsets->items[1], avail, "qpkv::io: " + path + ": " + where + ".data_offsets[1] (data buffer bytes)");
    if (t.end < t.begin)
      throw bad(qpkv::detail::concat(where, ".data_offsets: expected begin <= end, got [", t.begin, ", ", t.end, "]"));
    if (count > avail || count * d->itemsize != t.end - t.begin)
      throw bad(qpkv::detail::concat(where, ": data_offsets span ", t.end - t.begin, " bytes, but shape ",
                               st_detail::shape_text(t.shape), " of ", t.dtype, " needs ",
                               count > avail ? "more than the file holds" : std::to_string(count * d->itemsize)));
    st.tensors_.push_back(std::move(t));
  }
  // The data buffer must be covered exactly once (no overlaps, no holes), as the format requires.
  std::vector<const SafetensorsInfo*> order;
  for (const SafetensorsInfo& t : st.tensors_) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
  std::uint64_t at = 0;
  for (const SafetensorsInfo* t : order) {
    if (t->begin < at) throw bad("tensor '" + t->name + "': data_offsets overlap another tensor");
    if (t->begin > at) throw bad(qpkv::detail::concat("data buffer: bytes [", at, ", ", t->begin, ") belong to no tensor"));
    at = t->end;
  }
  if (at != avail)
    throw bad(qpkv::detail::concat("data buffer: expected ", at, " bytes (the tensors' extent), got ", avail,
                             at < avail ? " (trailing bytes)" : ""));
  st.data_.assign(data + 8 + n, data + size);
  return st;
}

inline Safetensors Safetensors::load(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw Error("qpkv::io: cannot open " + path);
  std::vector<unsigned char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return parse(buf.data(), buf.size(), path);
}

inline NpyArray Safetensors::tensor(std::string_view name) const {
  const SafetensorsInfo* t = find(name);
  if (!t) {
    std::string all;
    for (const SafetensorsInfo& e : tensors_) {
      if (!all.empty()) all += ", ";
      all += e.name;
    }
    throw Error(qpkv::detail::concat("qpkv::io: ", path_, ": no tensor '", name, "' (the file has: ",
                               all.empty() ? "none" : all, ")"));
  }
  const st_detail::DtypeInfo* d = st_detail::find_dtype(t->dtype);
  if (d->npy.empty())
    throw Error(qpkv::detail::concat("qpkv::io: ", path_, ": tensor '", name, "': dtype ", t->dtype,
                               " is not supported (expected F32, F64, F16, I32, I64 or U8)"));
  NpyArray a;
  a.dtype = std::string(d->npy);
  a.shape = t->shape;
  a.bytes.assign(data_.begin() + static_cast<std::ptrdiff_t>(t->begin), data_.begin() + static_cast<std::ptrdiff_t>(t->end));
  return a;
}

/// Loads one tensor: shorthand for Safetensors::load(path).tensor(name).
inline NpyArray load_safetensors_tensor(const std::string& path, std::string_view name) {
  return Safetensors::load(path).tensor(name);
}

/// Writes `tensors` (name, NpyArray of dtype f4, f8, f2, i4, i8 or u1) in the given order, with
/// optional string metadata; the header is padded with spaces to a multiple of 8 bytes.
inline void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, NpyArray>>& tensors,
                             const std::map<std::string, std::string>& metadata = {}) {
  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      header += first ? "\"" : ",\"";
      header += st_detail::json_escape(k);
      header += "\":\"";
      header += st_detail::json_escape(v);
      header += "\"";
      first = false;
    }
    header += "}";
  }
  std::uint64_t offset = 0;
  for (const auto& [name, a] : tensors) {
    if (name == "__metadata__") throw Error("qpkv::io: " + path + ": a tensor may not be called __metadata__");
    const st_detail::DtypeInfo* d = nullptr;
    for (const st_detail::DtypeInfo& x : st_detail::kDtypes)
      if (!x.npy.empty() && x.npy == a.dtype) d = &x;
    if (!d) throw Error("qpkv::io: " + path + ": tensor '" + name + "': dtype: expected one of f4, f8, f2, i4, i8, u1, got " + a.dtype);
    const auto bytes = static_cast<std::uint64_t>(a.size()) * d->itemsize;
    if (bytes != a.bytes.size())
      throw Error(qpkv::detail::concat("qpkv::io: ", path, ": tensor '", name, "': expected ", bytes,
                                 " bytes for its shape, got ", a.bytes.size()));
    header += header.size() > 1 ? ",\"" : "\"";
    header += st_detail::json_escape(name);
    header += "\":{\"dtype\":\"";
    header += d->name;
    header += "\",\"shape\":[";
    for (std::size_t i = 0; i < a.shape.size(); ++i) {
      if (i) header += ",";
      header += std::to_string(a.shape[i]);
    }
    header += "],\"data_offsets\":[";
    header += std::to_string(offset);
    header += ",";
    header += std::to_string(offset + bytes);
    header += "]}";
    offset += bytes;
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  std::ofstream f(path, std::ios::binary);
  if (!f) throw Error("qpkv::io: cannot write " + path);
  unsigned char len[8];
  std::uint64_t n = header.size();
  for (unsigned char& b : len) {
    b = static_cast<unsigned char>(n & 0xff);
    n >>= 8;
  }
  f.write(reinterpret_cast<const char*>(len), 8);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  for (const auto& [name, a] : tensors)
    f.write(reinterpret_cast<const char*>(a.bytes.data()), static_cast<std::streamsize>(a.bytes.size()));
  if (!f) throw Error("qpkv::io: short write to " + path);
}

}  // namespace qpkv::io
