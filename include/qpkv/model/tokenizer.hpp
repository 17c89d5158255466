// qpkv/model/tokenizer.hpp - the llama2.c tokenizer (sentencepiece BPE pieces with merge scores).
//
// File format (tok512.bin and llama2.c's tokenizer.bin, little-endian): int32 max_token_length, then
// for every token id in order: float32 merge score, int32 byte length, the piece's bytes. The file
// does not store the vocabulary size: parse() reads records to the end, and a record cut short is an
// error. Ids 0 / 1 / 2 are <unk> / BOS / EOS; ids 3..258 must be the byte-fallback pieces
// "<0x00>".."<0xFF>" (encode() relies on id = byte + 3, so parse() checks them).
//
// encode(text) (llama2.c's run.c, bit for bit):
//   1. BOS (optional); then, for non-empty text, the piece " " (sentencepiece's dummy prefix);
//   2. one piece per UTF-8 character (a lead byte plus up to 3 continuation bytes); a character
//      that is not a piece becomes its byte pieces (id = byte + 3);
//   3. repeatedly merge the adjacent pair whose concatenation is a piece with the highest score
//      (the leftmost pair on ties; scores <= -1e10 never merge) until no pair merges;
//   4. EOS (optional).
// decode_piece(prev, token) is the text of one token in a stream: byte pieces are their byte, and
// a leading space is dropped right after BOS. decode(tokens) concatenates them, skipping BOS/EOS.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "qpkv/core/error.hpp"
#include "qpkv/model/llama.hpp"

namespace qpkv::model {

class Tokenizer {
 public:
  static constexpr int unk_id = 0;
  static constexpr int bos_id = 1;
  static constexpr int eos_id = 2;
  static constexpr int byte_base = 3;  ///< id of the piece "<0x00>"

  /// Reads and validates a tokenizer file (see the header comment); qpkv::Error on any problem.
  static Tokenizer load(const std::string& path) { return parse(detail::read_file(path, "tokenizer"), path); }

  /// Validates and copies a tokenizer image; `name` only labels error messages.
  static Tokenizer parse(std::span<const std::uint8_t> image, std::string_view name = "tokenizer") {
    const std::string what = detail::concat("tokenizer '", name, "'");
    detail::require(image.size() >= 4, what, ">= 4 bytes (max_token_length)", detail::concat(image.size(), " bytes"));
    Tokenizer t;
    const std::int32_t max_len = detail::read_i32(image.data());
    detail::require(max_len > 0, what + " max_token_length", "> 0", max_len);
    t.max_token_length_ = max_len;
    std::size_t off = 4;
    while (off < image.size()) {
      const std::size_t id = t.pieces_.size();
      const auto rec = [&](const char* f) { return detail::concat(what, " token ", id, " ", f); };
      detail::require(image.size() - off >= 8, rec("record"), "a float32 score and an int32 length (8 bytes)",
                      detail::concat(image.size() - off, " bytes left in the file"));
      float score;
      std::memcpy(&score, image.data() + off, sizeof score);
      const std::int32_t len = detail::read_i32(image.data() + off + 4);
      off += 8;
      detail::require(std::isfinite(score), rec("score"), "a finite number", score);
      detail::require(len >= 0 && len <= max_len, rec("length"), detail::concat("in [0, max_token_length = ", max_len, "]"),
                      len);
      detail::require(image.size() - off >= static_cast<std::size_t>(len), rec("bytes"),
                      detail::concat(len, " bytes"), detail::concat(image.size() - off, " bytes left in the file"));
      t.pieces_.emplace_back(reinterpret_cast<const char*>(image.data() + off), static_cast<std::size_t>(len));
      t.scores_.push_back(score);
      off += static_cast<std::size_t>(len);
    }
    detail::require(t.pieces_.size() >= byte_base + 256, what + " vocabulary",
                    detail::concat(">= ", byte_base + 256, " tokens (<unk>, BOS, EOS and 256 byte pieces)"),
                    detail::concat(t.pieces_.size(), " tokens"));
    for (int b = 0; b < 256; ++b) {
      char expect[8];
      std::snprintf(expect, sizeof expect, "<0x%02X>", b);
      detail::require(t.pieces_[static_cast<std::size_t>(byte_base + b)] == expect,
                      detail::concat(what, " token ", byte_base + b), detail::concat("the byte piece '", expect, "'"),
                      detail::concat("'", t.pieces_[static_cast<std::size_t>(byte_base + b)], "'"));
    }
    // the first id wins if a piece appears twice (llama2.c's binary search would pick either)
    for (std::size_t i = 0; i < t.pieces_.size(); ++i)
      if (!t.pieces_[i].empty()) t.ids_.emplace(t.pieces_[i], static_cast<int>(i));
    return t;
  }

  [[nodiscard]] index_t vocab_size() const { return static_cast<index_t>(pieces_.size()); }
  [[nodiscard]] index_t max_token_length() const { return max_token_length_; }
  /// The raw piece of `token` (byte pieces as "<0xNN>", BOS as "\n<s>\n").
  [[nodiscard]] std::string_view piece(int token) const {
    check(token);
    return pieces_[static_cast<std::size_t>(token)];
  }
  [[nodiscard]] float score(int token) const {
    check(token);
    return scores_[static_cast<std::size_t>(token)];
  }
  /// The id of `piece`, or -1.
  [[nodiscard]] int find(std::string_view piece) const {
    const auto it = ids_.find(std::string(piece));
    return it == ids_.end() ? -1 : it->second;
  }

  /// Token ids of `text` (see the header comment).
  [[nodiscard]] std::vector<int> encode(std::string_view text, bool bos = true, bool eos = false) const {
    std::vector<int> out;
    if (bos) out.push_back(bos_id);
    std::vector<int> t;
    if (!text.empty()) push_piece(" ", t);
    for (std::size_t i = 0; i < text.size();) {
      std::size_t n = 1;  // a lead byte and up to 3 continuation bytes (run.c's rule, valid UTF-8 or not)
      while (n < 4 && i + n < text.size() && (static_cast<unsigned char>(text[i + n]) & 0xC0) == 0x80) ++n;
      push_piece(text.substr(i, n), t);
      i += n;
    }
    merge(t);
    out.insert(out.end(), t.begin(), t.end());
    if (eos) out.push_back(eos_id);
    return out;
  }

  /// The text of `token` following `prev` in a stream (prev = -1 at the start).
  [[nodiscard]] std::string decode_piece(int prev, int token) const {
    check(token);
    if (token >= byte_base && token < byte_base + 256) return std::string(1, static_cast<char>(token - byte_base));
    std::string_view p = pieces_[static_cast<std::size_t>(token)];
    if (prev == bos_id && !p.empty() && p.front() == ' ') p.remove_prefix(1);
    return std::string(p);
  }

  /// The text of a token sequence: decode_piece over it, BOS and EOS left out.
  [[nodiscard]] std::string decode(std::span<const int> tokens) const {
    std::string s;
    int prev = -1;
    for (const int tok : tokens) {
      check(tok);
      if (tok != bos_id && tok != eos_id) s += decode_piece(prev, tok);
      prev = tok;
    }
    return s;
  }

 private:
  void check(int token) const {
    detail::require(token >= 0 && static_cast<std::size_t>(token) < pieces_.size(), "token",
                    detail::concat("a token id in [0, ", pieces_.size(), ")"), token);
  }

  /// Appends the id of `s`, or its byte pieces when it is not a piece.
  void push_piece(std::string_view s, std::vector<int>& out) const {
    const int id = find(s);
    if (id >= 0) {
      out.push_back(id);
      return;
    }
    for (const char c : s) out.push_back(byte_base + static_cast<unsigned char>(c));
  }

  /// Score of merging t[i] and t[i+1], or -inf when their concatenation is not a piece.
  [[nodiscard]] float pair_score(const std::vector<int>& t, std::size_t i, int* merged) const {
    const std::string s = pieces_[static_cast<std::size_t>(t[i])] + pieces_[static_cast<std::size_t>(t[i + 1])];
    const int id = find(s);
    *merged = id;
    return id >= 0 ? scores_[static_cast<std::size_t>(id)] : -std::numeric_limits<float>::infinity();
  }

  /// Greedy BPE: merge the best-scoring pair (leftmost on ties) until none merges. Pair scores are
  /// cached and only the two pairs next to a merge are recomputed.
  void merge(std::vector<int>& t) const {
    if (t.size() < 2) return;
    std::vector<float> score(t.size() - 1);
    std::vector<int> id(t.size() - 1);
    for (std::size_t i = 0; i + 1 < t.size(); ++i) score[i] = pair_score(t, i, &id[i]);
    for (;;) {
      std::size_t best = score.size();
      float best_score = -1e10f;  // run.c's floor: a pair scoring <= -1e10 never merges
      for (std::size_t i = 0; i < score.size(); ++i)
        if (id[i] >= 0 && score[i] > best_score) {
          best = i;
          best_score = score[i];
        }
      if (best == score.size()) return;
      t[best] = id[best];
      t.erase(t.begin() + static_cast<std::ptrdiff_t>(best) + 1);
      score.erase(score.begin() + static_cast<std::ptrdiff_t>(best));
      id.erase(id.begin() + static_cast<std::ptrdiff_t>(best));
      if (best > 0) score[best - 1] = pair_score(t, best - 1, &id[best - 1]);
      if (best < score.size()) score[best] = pair_score(t, best, &id[best]);
    }
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
  index_t max_token_length_ = 0;
};

}  // namespace qpkv::model
