// tools/qpkv.cpp - the `qpkv` command-line tool: every library operation on your own tensors, the
// tiny real model, and the token/precision study. See docs/cli.md.
//
// Exit codes: 0 success; 1 an error in the inputs or one the library reports (message on stderr,
// naming the option); 2 a usage error (unknown option, missing required option, bad choice).
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "cli.hpp"

int main(int argc, char** argv) {
  CLI::App app{
      "qpkv - quantized pruning of LLM KV caches: more tokens at lower precision under a fixed memory budget.\n"
      "Tensor inputs are .npy (float32/float16/int64, C order) or FILE.safetensors:NAME.",
      "qpkv"};
  app.require_subcommand(1);
  app.set_version_flag("--version", std::string("qpkv 0.1.0"));
  std::vector<qpkv::cli::Command> commands;
  for (auto add : {&qpkv::cli::add_plan, &qpkv::cli::add_select, &qpkv::cli::add_quantize, &qpkv::cli::add_score,
                   &qpkv::cli::add_generate, &qpkv::cli::add_study, &qpkv::cli::add_save, &qpkv::cli::add_inspect})
    commands.push_back(add(app));

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  for (const qpkv::cli::Command& c : commands) {
    if (!c.app->parsed()) continue;
    const std::string name = c.app->get_name();
    try {
      c.run();
      return 0;
    } catch (const qpkv::cli::UsageError& e) {
      std::fprintf(stderr, "qpkv %s: error: %s\nRun 'qpkv %s --help' for the options.\n", name.c_str(),
                   qpkv::cli::strip_prefix(e.what()).c_str(), name.c_str());
      return 2;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "qpkv %s: error: %s\n", name.c_str(), qpkv::cli::strip_prefix(e.what()).c_str());
      return 1;
    }
  }
  return 2;  // unreachable: require_subcommand(1)
}
