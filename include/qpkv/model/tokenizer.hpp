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

#include <algorithm>
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

  /// The id of the concatenation of pieces a and b, or -1.
  [[nodiscard]] int merged_id(int a, int b) const {
    return find(pieces_[static_cast<std::size_t>(a)] + pieces_[static_cast<std::size_t>(b)]);
  }

  /// Greedy BPE: merge the best-scoring adjacent pair (leftmost on ties) until none merges — the
  /// same merges in the same order as run.c's rescan-everything loop, in O(n log n): the symbols
  /// form a linked list and candidate pairs wait in a heap ordered by (score desc, position asc);
  /// a candidate whose symbols changed since it was pushed is skipped when popped.
  void merge(std::vector<int>& t) const {
    const std::size_t n = t.size();
    if (n < 2) return;
    struct Candidate {
      float score;
      std::size_t left, right;  ///< symbol slots (a symbol keeps the slot of its first piece)
      int left_id, right_id, merged;
    };
    const auto worse = [](const Candidate& a, const Candidate& b) {
      return a.score < b.score || (a.score == b.score && a.left > b.left);
    };
    std::vector<Candidate> heap;
    std::vector<std::size_t> next(n), prev(n);
    std::vector<bool> alive(n, true);
    for (std::size_t i = 0; i < n; ++i) {
      next[i] = i + 1;
      prev[i] = i - 1;  // wraps for i = 0; never read there
    }
    const auto push = [&](std::size_t l, std::size_t r) {
      const int id = merged_id(t[l], t[r]);
      const float sc = id >= 0 ? scores_[static_cast<std::size_t>(id)] : 0.0f;
      if (id < 0 || !(sc > -1e10f)) return;  // run.c's floor: a pair scoring <= -1e10 never merges
      heap.push_back({sc, l, r, t[l], t[r], id});
      std::push_heap(heap.begin(), heap.end(), worse);
    };
    for (std::size_t i = 0; i + 1 < n; ++i) push(i, i + 1);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), worse);
      const Candidate c = heap.back();
      heap.pop_back();
      if (!alive[c.left] || !alive[c.right] || next[c.left] != c.right || t[c.left] != c.left_id ||
          t[c.right] != c.right_id)
        continue;  // stale
      t[c.left] = c.merged;
      alive[c.right] = false;
      next[c.left] = next[c.right];
      if (next[c.left] < n) prev[next[c.left]] = c.left;
      if (c.left > 0) push(prev[c.left], c.left);
      if (next[c.left] < n) push(c.left, next[c.left]);
    }
    std::size_t w = 0;
    for (std::size_t i = 0; i < n; i = next[i]) t[w++] = t[i];
    t.resize(w);
  }

  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> ids_;
  index_t max_token_length_ = 0;
};

}  // namespace qpkv::model
