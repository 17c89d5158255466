#!/usr/bin/env python3
"""Draws the figures of docs/results.md from the output of `qpkv study --out DIR`.

    python3 docs/plot_results.py DIR [docs/img]

Reads DIR/study.csv (one row per variant) and DIR/retrieval_cells.csv (one row per retrieval grid
cell and variant) and writes PNGs:
  study_retrieval.png     retrieval rate vs budget (log x), one line per precision, a panel per selector
  study_error.png         attention-output relative error vs budget
  study_kl.png            stories260K KL(full || compressed) vs budget
  study_copy.png          stories260K long-range copy accuracy vs budget
  heatmap_<method>.png    NIAH-style depth x length retrieval maps at one budget, one panel per precision
  *_nominal.png           the same line plots under the paper's nominal token rule
Needs matplotlib (pip install matplotlib).
"""
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ["streamingllm", "h2o", "snapkv", "pyramidkv"]
LABEL = {"streamingllm": "StreamingLLM", "h2o": "H2O", "snapkv": "SnapKV", "pyramidkv": "PyramidKV"}
COLORS = {16: "black", 8: "tab:blue", 4: "tab:green", 2: "tab:red", 3: "tab:orange", 1: "tab:purple"}


def frac(b):  # "1/16" -> 1/16
    n, d = b.split("/")
    return float(n) / float(d)


def num(x):
    return float(x) if x not in ("", None) else None


def line_plot(rows, bench, field, ylabel, rule, out, percent=False, log_y=False):
    sel = [r for r in rows if r["bench"] == bench and r["rule"] == rule and r["feasible"] == "1"]
    if not sel:
        return None
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), sharey=True)
    bits_all = sorted({int(r["bits"]) for r in sel}, reverse=True)
    for ax, m in zip(axes, METHODS):
        for b in bits_all:
            pts = sorted((frac(r["budget"]), num(r[field])) for r in sel if r["method"] == m and int(r["bits"]) == b)
            pts = [(x, y) for x, y in pts if y is not None]
            if not pts:
                continue
            xs, ys = zip(*pts)
            if percent:
                ys = [100 * y for y in ys]
            ax.plot(xs, ys, marker="o", color=COLORS.get(b), label=f"{b}-bit")
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_title(LABEL[m])
        ax.set_xlabel("budget (fraction of fp16 cache)")
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(loc="best", fontsize=8)
    fig.suptitle(f"{bench}: {ylabel} ({rule} byte accounting)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def heatmaps(cells, method, budget, rule, out):
    sel = [c for c in cells if c["method"] == method and c["budget"] == budget and c["rule"] == rule]
    if not sel:
        return None
    bits_all = sorted({int(c["bits"]) for c in sel}, reverse=True)
    lengths = sorted({int(c["tokens"]) for c in sel})
    depths = sorted({float(c["depth"]) for c in sel})
    fig, axes = plt.subplots(1, len(bits_all), figsize=(3.6 * len(bits_all), 3.6), squeeze=False)
    for k, (ax, b) in enumerate(zip(axes[0], bits_all)):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for c in sel:
            if int(c["bits"]) == b:
                grid[depths.index(float(c["depth"]))][lengths.index(int(c["tokens"]))] = 100 * float(c["retrieval"])
        im = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=100, aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [f"{n // 1024}K" for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{int(round(100 * d))}%" for d in depths] if k == 0 else [])
        ax.set_xlabel("context length")
        ax.set_title(f"{b}-bit")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=7)
    axes[0][0].set_ylabel("needle depth")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="retrieval %")
    fig.suptitle(f"{LABEL[method]}, budget {budget} of the fp16 cache ({rule} accounting)")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main():
    if len(sys.argv) < 2:
        print(__doc__)
        sys.exit(2)
    src = sys.argv[1]
    dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "img")
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "study.csv")) as f:
        rows = list(csv.DictReader(f))
    cells = []
    cells_path = os.path.join(src, "retrieval_cells.csv")
    if os.path.exists(cells_path):
        with open(cells_path) as f:
            cells = list(csv.DictReader(f))
    written = []
    for rule in ("exact", "nominal"):
        sfx = "" if rule == "exact" else "_nominal"
        written.append(line_plot(rows, "retrieval", "retrieval", "retrieval rate (%)", rule,
                                 os.path.join(dst, f"study_retrieval{sfx}.png"), percent=True))
        written.append(line_plot(rows, "retrieval", "error", "attention-output rel. error", rule,
                                 os.path.join(dst, f"study_error{sfx}.png"), log_y=True))
        written.append(line_plot(rows, "stories260K", "kl", "KL(full || compressed), nats", rule,
                                 os.path.join(dst, f"study_kl{sfx}.png"), log_y=True))
        written.append(line_plot(rows, "stories260K", "copy", "long-range copy accuracy (%)", rule,
                                 os.path.join(dst, f"study_copy{sfx}.png"), percent=True))
    budgets = sorted({c["budget"] for c in cells}, key=frac)
    if budgets:
        # the smallest budget of the grid where the maps are most informative, plus 1/16 if present
        for budget in dict.fromkeys([b for b in ("1/16", "1/64") if b in budgets] or [budgets[0]]):
            for m in METHODS:
                written.append(heatmaps(cells, m, budget, "exact",
                                        os.path.join(dst, f"heatmap_{m}_{budget.replace('/', 'of')}.png")))
    for w in written:
        if w:
            print(w)


if __name__ == "__main__":
    main()
