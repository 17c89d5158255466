// tools/cmd_model.cpp - `qpkv score` and `qpkv generate` (placeholder until model/session.hpp lands).
#include "cli.hpp"

namespace qpkv::cli {
Command add_score(CLI::App& app) {
  CLI::App* sub = app.add_subcommand("score", "Teacher-forced next-token logits of the tiny real model.");
  return {sub, [] { throw Error("score: not built yet"); }};
}
Command add_generate(CLI::App& app) {
  CLI::App* sub = app.add_subcommand("generate", "Generate text with the tiny real model.");
  return {sub, [] { throw Error("generate: not built yet"); }};
}
Command add_study(CLI::App& app) {
  CLI::App* sub = app.add_subcommand("study", "The token/precision study.");
  return {sub, [] { throw Error("study: not built yet"); }};
}
}  // namespace qpkv::cli
