// tools/cmd_plan.cpp - `qpkv plan`: tokens per bit width under one memory budget, with exact byte
// accounting (codes + fp16 scales and mins + residual) and under the paper's nominal rule.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "qpkv/cache/budget.hpp"

namespace qpkv::cli {

Command add_plan(CLI::App& app) {
  struct Options {
    index_t tokens = 0, kv_heads = 0, head_dim = 0, group = 32, residual = 0;
    std::string budget;
    std::vector<int> bits{16, 8, 4, 3, 2, 1};
  };
  auto o = std::make_shared<Options>();
  CLI::App* sub = app.add_subcommand(
      "plan",
      "Tokens kept per bit width under one memory budget (one layer): exact accounting (codes + fp16\n"
      "scales and mins + fp16 residual) next to the paper's nominal rule (fp16 tokens x 16 / bits).");
  sub->add_option("--tokens", o->tokens, "prompt length N (no selector keeps more)")->required();
  sub->add_option("--kv-heads", o->kv_heads, "KV heads per layer")->required();
  sub->add_option("--head-dim", o->head_dim, "head dimension D")->required();
  sub->add_option("--budget", o->budget,
                  "bytes per layer: a fraction of the full fp16 cache of N tokens (1/16) or a byte count")
      ->required();
  sub->add_option("--group", o->group, "KIVI group: elements per fp16 scale and min")->capture_default_str();
  sub->add_option("--residual", o->residual, "recent tokens kept in fp16 (rounded up to whole key groups)")
      ->capture_default_str();
  sub->add_option("--bits", o->bits, "bit widths to list (1, 2, 3, 4, 8, 16)")->delimiter(',')->capture_default_str();

  return {sub, [o] {
            const Shape shape{o->kv_heads, o->kv_heads, o->head_dim};
            detail::require(o->tokens > 0, "--tokens", "> 0", o->tokens);
            detail::require(o->kv_heads > 0, "--kv-heads", "> 0", o->kv_heads);
            detail::require(o->head_dim > 0, "--head-dim", "> 0", o->head_dim);
            detail::require(o->group > 0, "--group", "> 0", o->group);
            detail::require(o->residual >= 0, "--residual", ">= 0", o->residual);
            for (int b : o->bits)
              detail::require(b == 1 || b == 2 || b == 3 || b == 4 || b == 8 || b == 16, "--bits",
                              "each of 1, 2, 3, 4, 8, 16", b);
            const BudgetText bt = parse_budget(o->budget, "--budget");
            const std::int64_t full = fp16_bytes(shape, o->tokens);
            const Budget budget = bt.resolve(o->tokens, shape);
            const auto rows = plan_table(shape, o->tokens, budget, o->group, o->residual, o->bits);
            std::printf("layer: %lld KV heads x head_dim %lld, N = %lld tokens; full fp16 K+V = %lld bytes\n",
                        static_cast<long long>(o->kv_heads), static_cast<long long>(o->head_dim),
                        static_cast<long long>(o->tokens), static_cast<long long>(full));
            std::printf("budget: %lld bytes (%s, %.4f of full); KIVI group %lld, residual %lld, fp16 scales and mins\n\n",
                        static_cast<long long>(budget.bytes),
                        bt.fraction() ? (bt.text() + " of the fp16 cache").c_str() : "given in bytes",
                        static_cast<double>(budget.bytes) / static_cast<double>(full),
                        static_cast<long long>(o->group), static_cast<long long>(o->residual));
            std::printf("%s", format_plan(rows).c_str());
            std::printf("\ntokens/bytes/bits/el: exact (capped at N); nominal: the paper's rule, its true bytes, "
                        "and whether they fit\n");
          }};
}

}  // namespace qpkv::cli
