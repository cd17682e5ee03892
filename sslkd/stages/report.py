"""``sslkd report``: results/summary.json, results/summary.md, results/paired_differences.json and a plot
of accuracy against label fraction, from every method's evaluation.

summary.json maps each method and each paired difference ("mkdt - random", "mkdt - high_loss",
"mkdt - no_pretrain": MKDT's run at an evaluation seed minus the baseline's run at that seed, for every
distilled set) to ``{label_fraction: {"mean", "std", "n"}}``.
"""

from __future__ import annotations

import logging

from sslkd import config
from sslkd.artifacts import atomic_write, load_json_artifact, write_json_atomic, write_text_atomic
from sslkd.infra import tracking
from sslkd.plots import pyplot
from sslkd.report import markdown_table, paired_differences, summarise
from sslkd.stages.options import StageOptions
from sslkd.workspace import Workspace

log = logging.getLogger(__name__)


def plot_accuracy(summary: dict, path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for method, rows in summary.items():
        fractions = sorted(rows, key=float)
        axis.errorbar([float(f) * 100 for f in fractions], [rows[f]["mean"] for f in fractions],
                      yerr=[rows[f]["std"] for f in fractions], marker="o", capsize=3, label=method)
    axis.set_xscale("log")
    axis.set_xlabel("labelled training images (%)")
    axis.set_ylabel("linear-probe top-1 accuracy (%)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def main(workspace: Workspace, options: StageOptions) -> None:
    report_config = config.build("report")
    runs = {
        method: load_json_artifact(workspace.evaluation(method), "evaluation", produced_by=f"evaluate --method {method}")["runs"]
        for method in report_config.methods
    }
    summary = summarise(runs)
    paired = {
        f"mkdt - {baseline}": paired_differences(runs, "mkdt", baseline)
        for baseline in ("random", "high_loss", "no_pretrain") if "mkdt" in runs and baseline in runs
    }
    results = workspace.results
    # summary.json: every method, then each paired difference under its name ("mkdt - random"), same schema
    write_json_atomic(results / "summary.json", {**summary, **paired})
    write_json_atomic(results / "paired_differences.json", paired)
    table = markdown_table(summary, paired)
    write_text_atomic(results / "summary.md", "# sslkd results: linear-probe accuracy (%)\n\n" + table)
    plot_accuracy(summary, results / "accuracy_vs_labels.png")
    for name in ("summary.json", "summary.md", "paired_differences.json", "accuracy_vs_labels.png"):
        tracking.log_artifact(results / name)
    log.info("summary:\n%s", table)
