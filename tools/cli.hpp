// tools/cli.hpp - what every `qpkv` subcommand shares: tensor arguments (.npy or
// FILE.safetensors:NAME), shape checks that name the argument, budgets, output files, errors.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include <CLI/CLI.hpp>

#include "qpkv/cache/budget.hpp"
#include "qpkv/core/error.hpp"
#include "qpkv/core/tensor.hpp"
#include "qpkv/io/npy.hpp"

namespace qpkv::cli {

/// A command-line mistake (missing or conflicting options): exit code 2, like CLI11's own errors.
/// Everything else (bad files, shapes, values the library rejects) is a qpkv::Error: exit code 1.
class UsageError : public Error {
 public:
  using Error::Error;
};

/// Each subcommand registers itself on the app; `run` is set to its action.
struct Command {
  CLI::App* app = nullptr;
  std::function<void()> run;
};

Command add_plan(CLI::App& app);
Command add_select(CLI::App& app);
Command add_quantize(CLI::App& app);
Command add_score(CLI::App& app);
Command add_generate(CLI::App& app);
Command add_study(CLI::App& app);
Command add_save(CLI::App& app);
Command add_inspect(CLI::App& app);

/// "(1, 4, 512, 64)".
std::string shape_text(const std::vector<std::int64_t>& shape);

/// Loads a tensor argument: "PATH.npy" or "PATH.safetensors:NAME" (or "PATH.safetensors" holding
/// exactly one tensor). Errors name the option, e.g. "--keys: x.npy: not a .npy file (bad magic)".
io::NpyArray load_tensor(const std::string& spec, std::string_view option);

/// The tensor's elements as float; accepts float32 and float16 (exactly converted).
std::vector<float> float_data(const io::NpyArray& a, std::string_view option);

/// A (heads, tokens, dim) float tensor read from (1, H, N, D) or (H, N, D).
struct HeadTensor {
  std::vector<std::int64_t> shape;  ///< the shape as given
  index_t heads = 0, tokens = 0, dim = 0;
  std::vector<float> data;          ///< row-major [head][token][dim]
  [[nodiscard]] TensorView<float> view() const { return qpkv::view(data.data(), heads, tokens, dim); }
};

/// Reads a float tensor of shape (1, H, N, D) or (H, N, D); with `allow_2d`, (N, D) as H = 1.
/// `letters` names the axes in messages ("H,N,D" or "Hq,N,D").
HeadTensor load_heads(const std::string& spec, std::string_view option, std::string_view letters, bool allow_2d = false);

/// A budget as written on the command line: "1/16" (a fraction of the full fp16 cache) or "BYTES".
struct BudgetText {
  std::int64_t num = 0, den = 0;  ///< a fraction when den > 0
  std::int64_t bytes = 0;         ///< else absolute bytes
  [[nodiscard]] bool fraction() const { return den > 0; }
  /// The per-layer budget for a prompt of `tokens` tokens and the given shape.
  [[nodiscard]] Budget resolve(index_t tokens, const Shape& shape) const;
  [[nodiscard]] std::string text() const;
};
BudgetText parse_budget(std::string_view text, std::string_view option);

/// Parses all of `text` as an integer or throws "<option>: expected <what>, got '<text>'".
std::int64_t parse_int(std::string_view text, std::string_view option, std::string_view what);

/// Writes a .npy file; errors name the option.
template <class T>
void save_output(const std::string& path, const std::vector<T>& data, const std::vector<std::int64_t>& shape,
                 std::string_view option) {
  try {
    io::save_npy(path, data.data(), shape);
  } catch (const Error& e) {
    throw Error(std::string(option) + ": " + e.what());
  }
}

/// `path` if it exists; else, for a relative path, the same path under the source tree this tool
/// was built from (so the shipped model and texts are found from any directory); else `path`.
std::string data_path(const std::string& path);

/// "qpkv: capacity: ..." -> "capacity: ..."; "qpkv::io: f.npy: ..." -> "f.npy: ...".
std::string strip_prefix(std::string_view message);

}  // namespace qpkv::cli
