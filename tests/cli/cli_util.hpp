// Helpers shared by the CLI test suites: run the built `qpkv` binary and capture its output.
#pragma once

#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace qpkv::cli_test {

/// A path in the tests' scratch directory (created on first use).
inline std::string work(const std::string& name) {
  std::filesystem::create_directories(QPKV_CLI_WORK);
  return std::string(QPKV_CLI_WORK) + "/" + name;
}

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::ostringstream s;
  s << f.rdbuf();
  return s.str();
}

struct Run {
  int rc = -1;
  std::string out, err;
};

/// Runs `qpkv <args>` with stdout and stderr captured in <capture>stdout.txt / <capture>stderr.txt
/// (suites running in parallel use different prefixes).
inline Run qpkv_run(const std::string& args, const std::string& capture = "") {
  const std::string out = work(capture + "stdout.txt"), err = work(capture + "stderr.txt");
  const std::string cmd = std::string("\"") + QPKV_CLI + "\" " + args + " >\"" + out + "\" 2>\"" + err + "\"";
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, slurp(out), slurp(err)};
}

}  // namespace qpkv::cli_test
