// qpkv/core/error.hpp - the one exception type and the argument checks that build its messages.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

namespace qpkv {

/// Every failure of a public entry point (bad shape, capacity, budget, non-finite input, ...)
/// is reported as qpkv::Error. The message names the argument, what was expected and what was
/// given, e.g. "qpkv: capacity: expected <= tokens (512), got 600".
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Parts>
[[nodiscard]] std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

/// Throws Error("qpkv: <arg>: expected <expected>, got <actual>") unless `ok`.
template <class Expected, class Actual>
void require(bool ok, std::string_view arg, const Expected& expected, const Actual& actual) {
  if (!ok) throw Error(concat("qpkv: ", arg, ": expected ", expected, ", got ", actual));
}

[[noreturn]] inline void fail(std::string_view arg, std::string_view what) {
  throw Error(concat("qpkv: ", arg, ": ", what));
}

}  // namespace detail
}  // namespace qpkv
