// tools/cli.cpp - shared helpers of the qpkv command-line tool (see cli.hpp).
#include "cli.hpp"

#include <charconv>
#include <filesystem>
#include <system_error>

#include "qpkv/core/dtype.hpp"
#include "qpkv/io/safetensors.hpp"

namespace qpkv::cli {

std::string shape_text(const std::vector<std::int64_t>& shape) {
  std::string s = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::string data_path(const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (path.empty() || fs::exists(path, ec) || fs::path(path).is_absolute()) return path;
#ifdef QPKV_SOURCE_DIR
  const fs::path in_source = fs::path(QPKV_SOURCE_DIR) / path;
  if (fs::exists(in_source, ec)) return in_source.string();
#endif
  return path;
}

std::string strip_prefix(std::string_view m) {
  for (std::string_view p : {"qpkv::io: ", "qpkv: "})
    if (m.starts_with(p)) return std::string(m.substr(p.size()));
  return std::string(m);
}

io::NpyArray load_tensor(const std::string& spec, std::string_view option) {
  const std::string opt(option);
  try {
    static constexpr std::string_view ext = ".safetensors";
    const std::size_t at = spec.rfind(ext);
    if (at != std::string::npos && (at + ext.size() == spec.size() || spec[at + ext.size()] == ':')) {
      const std::string path = spec.substr(0, at + ext.size());
      const io::Safetensors st = io::Safetensors::load(path);
      if (at + ext.size() == spec.size()) {
        if (st.tensors().size() != 1)
          throw UsageError(detail::concat(opt, ": ", path, " holds ", st.tensors().size(),
                                          " tensors: name one as FILE.safetensors:NAME"));
        return st.tensor(st.tensors().front().name);
      }
      return st.tensor(spec.substr(at + ext.size() + 1));
    }
    return io::load_npy(spec);
  } catch (const UsageError&) {
    throw;
  } catch (const Error& e) {
    throw Error(opt + ": " + strip_prefix(e.what()));
  }
}

std::vector<float> float_data(const io::NpyArray& a, std::string_view option) {
  if (a.dtype != "f4" && a.dtype != "f2")
    throw Error(detail::concat(option, ": expected float32 or float16 elements, got dtype ", a.dtype));
  return a.as<float>();
}

HeadTensor load_heads(const std::string& spec, std::string_view option, std::string_view letters, bool allow_2d) {
  const io::NpyArray a = load_tensor(spec, option);
  HeadTensor t;
  t.shape = a.shape;
  const auto& s = a.shape;
  if (s.size() == 4 && s[0] == 1) {
    t.heads = s[1], t.tokens = s[2], t.dim = s[3];
  } else if (s.size() == 3) {
    t.heads = s[0], t.tokens = s[1], t.dim = s[2];
  } else if (allow_2d && s.size() == 2) {
    t.heads = 1, t.tokens = s[0], t.dim = s[1];
  } else {
    throw Error(detail::concat(option, ": expected shape (1,", letters, ") or (", letters, ")",
                               allow_2d ? " or (tokens,channels)" : "", ", got ", shape_text(s)));
  }
  if (t.heads <= 0 || t.tokens <= 0 || t.dim <= 0)
    throw Error(detail::concat(option, ": expected non-empty axes, got shape ", shape_text(s)));
  t.data = float_data(a, option);
  detail::check_finite(t.view(), option);
  return t;
}

std::int64_t parse_int(std::string_view text, std::string_view option, std::string_view what) {
  std::int64_t x = 0;
  const char* end = text.data() + text.size();
  const auto r = std::from_chars(text.data(), end, x);
  if (text.empty() || r.ec != std::errc{} || r.ptr != end)
    throw Error(detail::concat(option, ": expected ", what, ", got '", text, "'"));
  return x;
}

BudgetText parse_budget(std::string_view text, std::string_view option) {
  BudgetText b;
  const std::string what = "a fraction NUM/DEN of the fp16 cache (e.g. 1/16) or a byte count";
  const std::size_t slash = text.find('/');
  if (slash != std::string_view::npos) {
    b.num = parse_int(text.substr(0, slash), option, what);
    b.den = parse_int(text.substr(slash + 1), option, what);
    if (b.num <= 0 || b.den <= 0)
      throw Error(detail::concat(option, ": expected a positive fraction NUM/DEN, got '", text, "'"));
  } else {
    b.bytes = parse_int(text, option, what);
    if (b.bytes <= 0) throw Error(detail::concat(option, ": expected > 0 bytes, got '", text, "'"));
  }
  return b;
}

Budget BudgetText::resolve(index_t tokens, const Shape& shape) const {
  Budget b = fraction() ? Budget::fraction(num, den, tokens, shape) : Budget{bytes};
  b.validate();
  return b;
}

std::string BudgetText::text() const {
  return fraction() ? detail::concat(num, "/", den) : detail::concat(bytes);
}

}  // namespace qpkv::cli
