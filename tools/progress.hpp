// tools/progress.hpp - progress on stderr: a bar redrawn in place on a terminal, plain lines otherwise.
//
// Library code reports progress as text lines on a std::ostream ("study: retrieval 12/40 ...").
// ProgressStream is such a stream over stderr. When stderr is not a terminal (a log file, CI) every
// line passes through unchanged. On a terminal each line replaces the previous one, prefixed by a
// bar drawn from the first "a/b" count in the line; lines without a count are printed as they are.
#pragma once

#include <unistd.h>

#include <cstdio>
#include <ostream>
#include <streambuf>
#include <string>

namespace qpkv::cli {

class ProgressBuf : public std::streambuf {
 public:
  explicit ProgressBuf(std::FILE* out) : out_(out), tty_(isatty(fileno(out)) != 0) {}
  ~ProgressBuf() override { finish(); }

  /// Ends a bar line left open on the terminal.
  void finish() {
    flush_line();
    if (open_) std::fputc('\n', out_);
    open_ = false;
    std::fflush(out_);
  }

 protected:
  int_type overflow(int_type ch) override {
    if (ch == traits_type::eof()) return traits_type::not_eof(ch);
    if (ch == '\n') emit();
    else line_ += static_cast<char>(ch);
    return ch;
  }
  int sync() override {
    std::fflush(out_);
    return 0;
  }

 private:
  /// The first "a/b" with 0 <= a <= b, b > 0, as a fraction; -1 if none.
  static double fraction(const std::string& s) {
    for (std::size_t i = 0; i < s.size(); ++i) {
      if (s[i] != '/' || i == 0 || i + 1 >= s.size()) continue;
      std::size_t a = i, b = i + 1;
      while (a > 0 && s[a - 1] >= '0' && s[a - 1] <= '9') --a;
      while (b < s.size() && s[b] >= '0' && s[b] <= '9') ++b;
      if (a == i || b == i + 1 || i - a > 15 || b - i - 1 > 15) continue;
      const double num = std::stod(s.substr(a, i - a)), den = std::stod(s.substr(i + 1, b - i - 1));
      if (den > 0 && num <= den) return num / den;
    }
    return -1.0;
  }

  void emit() {
    const double f = tty_ ? fraction(line_) : -1.0;
    if (f < 0) {
      if (open_) std::fputc('\n', out_);
      std::fprintf(out_, "%s\n", line_.c_str());
      open_ = false;
    } else {
      constexpr int width = 30;
      const int filled = static_cast<int>(f * width + 0.5);
      std::string bar(static_cast<std::size_t>(filled), '#');
      bar.append(static_cast<std::size_t>(width - filled), '-');
      std::fprintf(out_, "\r[%s] %3d%% %s\x1b[K", bar.c_str(), static_cast<int>(f * 100 + 0.5), line_.c_str());
      open_ = true;
    }
    std::fflush(out_);
    line_.clear();
  }
  void flush_line() {
    if (!line_.empty()) emit();
  }

  std::FILE* out_;
  bool tty_;
  bool open_ = false;  ///< a bar line is on the terminal without its newline
  std::string line_;
};

/// std::ostream over a ProgressBuf on stderr.
class ProgressStream : public std::ostream {
 public:
  ProgressStream() : std::ostream(nullptr), buf_(stderr) { rdbuf(&buf_); }
  void finish() { buf_.finish(); }

 private:
  ProgressBuf buf_;
};

}  // namespace qpkv::cli
