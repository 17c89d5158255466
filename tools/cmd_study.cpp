// tools/cmd_study.cpp - `qpkv study`: the token/precision study of qpkv/study/study.hpp. Paper-style
// tables on stdout, progress on stderr (progress.hpp), CSV/JSON/markdown and the gnuplot figures in --out.
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "cli.hpp"
#include "progress.hpp"
#include "qpkv/study/study.hpp"

namespace qpkv::cli {

Command add_study(CLI::App& app) {
  struct Options {
    bool quick = false, skip_model = false, skip_retrieval = false, no_plot = false;
    std::string out;
    std::string model = study::StudyOptions{}.model_path, texts = study::StudyOptions{}.texts_dir;
    std::vector<int> bits, budgets;
  };
  auto o = std::make_shared<Options>();
  CLI::App* sub = app.add_subcommand(
      "study",
      "The token/precision study (docs/results.md): under budgets 1/2 .. 1/64 of the fp16 cache, StreamingLLM,\n"
      "H2O, SnapKV and PyramidKV at 16, 8, 4 and 2 bits with token counts set by exact bytes and by the paper's\n"
      "nominal rule, on stories260K (KL, top-1, long-range copy) and the long-context retrieval benchmark.\n"
      "Prints the tables; writes study.md, study.csv, retrieval_cells.csv, study.json, study.gp and the PNG\n"
      "figures (gnuplot) into --out.");
  sub->add_flag("--quick", o->quick, "CI size: fewer lengths, depths and texts (a few minutes on 2 cores)");
  sub->add_option("--out", o->out, "output directory (default: docs/results, or docs/results/quick with --quick)");
  sub->add_option("--bits", o->bits, "bit widths (default 16,8,4,2)")->delimiter(',');
  sub->add_option("--budgets", o->budgets, "budget denominators: 1/d of the fp16 cache (default 2,4,8,16,32,64)")->delimiter(',');
  sub->add_option("--model", o->model, "stories260K checkpoint")->capture_default_str();
  sub->add_option("--texts", o->texts, "directory of the stories260K texts (NN.tokens)")->capture_default_str();
  sub->add_flag("--skip-model", o->skip_model, "leave out the stories260K benchmark");
  sub->add_flag("--skip-retrieval", o->skip_retrieval, "leave out the retrieval benchmark");
  sub->add_flag("--no-plot", o->no_plot, "do not run gnuplot");

  return {sub, [o] {
            if (o->skip_model && o->skip_retrieval) throw UsageError("--skip-model and --skip-retrieval leave nothing to run");
            study::StudyOptions opt;
            opt.quick = o->quick;
            opt.model = !o->skip_model;
            opt.retrieval = !o->skip_retrieval;
            opt.gnuplot = !o->no_plot;
            opt.model_path = data_path(o->model);
            opt.texts_dir = data_path(o->texts);
            if (!o->bits.empty()) opt.bits = o->bits;
            for (int d : o->budgets) detail::require(d >= 1, "--budgets", "denominators >= 1", d);
            if (!o->budgets.empty()) opt.budgets = o->budgets;
            const std::string out = !o->out.empty() ? o->out : o->quick ? "docs/results/quick" : "docs/results";
            ProgressStream progress;  // a bar on a terminal, plain lines otherwise
            const study::StudyResults r = study::run(opt, progress);
            progress.finish();
            study::write_markdown(r, std::cout);
            const std::vector<std::string> files = study::write_outputs(r, out);
            std::cout << "\nwrote:\n";
            for (const std::string& f : files) std::cout << "  " << f << "\n";
          }};
}

}  // namespace qpkv::cli
