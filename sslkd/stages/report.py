"""``sslkd report``: results/summary.json, results/summary.md, results/paired_differences.json and a plot
of accuracy against label fraction, from every method's evaluation.

summary.json maps each method and each paired difference ("mkdt - random", "mkdt - high_loss",
"mkdt - no_pretrain", "full_data - random", "full_data - no_pretrain", "mkdt - krr_st", "mkdt - mtt_ssl":
the method's run at an evaluation seed minus the baseline's run at that seed, for every distilled set) to
``{label_fraction: {"mean", "std", "n"}}``, at the headline (first) pre-training horizon; by_horizon.json
holds the same for every horizon, and summary.md shows them all with the teacher's own probe.

Fine-tuning (evaluate.protocols with 'fine_tune') gives results/fine_tune.json in the same shape, and
transfer (``sslkd transfer``) results/transfer.json: {downstream: {method or paired difference:
{label_fraction: {"mean", "std", "n"}}}} of the linear probe, results/transfer_fine_tune.json the same of
fine-tuning ({} where nothing was evaluated); summary.md shows them beside the in-domain tables and
results/transfer.png plots the probe's accuracy on each downstream set (docs/transfer.md).
"""

from __future__ import annotations

import json
import logging

from sslkd import config
from sslkd.evaluation.plots import pyplot
from sslkd.evaluation.report import markdown_table, paired_differences, protocol_runs, summarise
from sslkd.infra import tracking
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import atomic_write, load_json_artifact, sidecar_path, write_json_atomic, write_text_atomic
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)


def plot_accuracy(summary: dict, path) -> None:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    draw_accuracy(axis, summary)
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def plot_transfer(transfer: dict, path) -> None:
    """One panel per downstream set: the methods' linear-probe accuracy against the label fraction."""
    plt = pyplot()
    panels = max(1, len(transfer))
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    for axis, (name, table) in zip(axes[0], transfer.items()):
        draw_accuracy(axis, {method: rows for method, rows in table.items() if " - " not in method})
        axis.set_title(f"transfer to {name}")
    if not transfer:
        axes[0][0].text(0.5, 0.5, "no downstream sets in this setting", ha="center", va="center")
        axes[0][0].axis("off")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png", dpi=120))
    plt.close(figure)


def draw_accuracy(axis, summary: dict) -> None:
    """Accuracy (mean ± std) against the label fraction, one line per method of ``summary``."""
    for method, rows in summary.items():
        fractions = sorted(rows, key=float)
        axis.errorbar(
            [float(f) * 100 for f in fractions],
            [rows[f]["mean"] for f in fractions],
            yerr=[rows[f]["std"] for f in fractions],
            marker="o",
            capsize=3,
            label=method,
        )
    axis.set_xscale("log")
    axis.set_xlabel("labelled training images (%)")
    axis.set_ylabel("linear-probe top-1 accuracy (%)")
    axis.legend()
    axis.grid(alpha=0.3)


PAIRS = (
    ("mkdt", "random"),
    ("mkdt", "high_loss"),
    ("mkdt", "no_pretrain"),
    ("full_data", "random"),
    ("full_data", "no_pretrain"),
    ("mkdt", "krr_st"),
    ("mkdt", "mtt_ssl"),
)


def runs_by_horizon(runs: dict[str, list[dict]], horizons: list[str]) -> dict[str, dict[str, list[dict]]]:
    """{horizon: {method: runs}}; runs that predate horizons count as the headline (first) horizon's."""
    return {
        horizon: {
            method: [run for run in method_runs if run.get("horizon", horizons[0]) == horizon]
            for method, method_runs in runs.items()
        }
        for horizon in horizons
    }


def paired_table(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """The paired differences of PAIRS whose two methods were evaluated, by name ("mkdt - random")."""
    return {
        f"{method} - {baseline}": paired_differences(runs, method, baseline)
        for method, baseline in PAIRS
        if method in runs and baseline in runs
    }


def protocol_table(runs: dict[str, list[dict]], protocol: str) -> dict[str, dict]:
    """{method or paired difference: {label_fraction: {"mean", "std", "n"}}} of one protocol's accuracies
    ('linear_probe' or 'fine_tune'), methods with no such runs left out."""
    chosen = {method: protocol_runs(method_runs, protocol) for method, method_runs in runs.items()}
    chosen = {method: method_runs for method, method_runs in chosen.items() if method_runs}
    return {**summarise(chosen), **paired_table(chosen)}


def transfer_tables(transfers: dict[str, dict], protocol: str) -> dict[str, dict]:
    """{downstream: protocol_table} from every method's transfer artifact (its "downstream" entry)."""
    names = list(dict.fromkeys(name for transfer in transfers.values() for name in transfer["downstream"]))
    tables = {
        name: protocol_table(
            {
                method: transfer["downstream"][name]["runs"]
                for method, transfer in transfers.items()
                if name in transfer["downstream"]
            },
            protocol,
        )
        for name in names
    }
    return {name: table for name, table in tables.items() if table}


def split_table(table: dict[str, dict]) -> str:
    """markdown_table of a {method or "a - b": rows} table."""
    return markdown_table(
        {name: rows for name, rows in table.items() if " - " not in name},
        {name: rows for name, rows in table.items() if " - " in name},
    )


def transfer_section(transfers: dict[str, dict], probe: dict[str, dict], fine_tuned: dict[str, dict]) -> str:
    """summary.md's transfer tables: per downstream set, the probe's (and fine-tuning's) accuracy."""
    if not probe:
        return ""
    lines = ["## Transfer: downstream sets", ""]
    for name, table in probe.items():
        entry = next(t["downstream"][name] for t in transfers.values() if name in t["downstream"])
        lines += [
            f"### {name} ({entry['dataset']}: {entry['classes']} classes, {entry['train_images']} training images "
            f"for the labels, {entry['test_images']} test images)",
            "",
            "Linear probe:",
            "",
            split_table(table),
        ]
        if name in fine_tuned:
            lines += ["Fine-tuning:", "", split_table(fine_tuned[name])]
    return "\n".join(lines)


def teacher_section(metadata: dict) -> str:
    """The teacher's own probe against the same encoder untrained, and how the gain grew during training."""
    probe = metadata.get("probe")
    if not probe:
        return ""
    keys = sorted(probe["gain"], key=float)
    header = "| teacher features | " + " | ".join(f"{float(k) * 100:g}% labels" for k in keys) + " |"
    lines = [
        "## The teacher's own features",
        "",
        f"Linear probe of the teacher's {metadata.get('representation_dim')}-d features (trained on "
        f"{metadata.get('trained_on_images')} images), against the same encoder untrained; mean ± std over "
        "label draws:",
        "",
        header,
        "|---|" + "---|" * len(keys),
    ]
    for name in ("trained", "untrained", "gain"):
        sign = "+" if name == "gain" else ""
        lines.append(
            f"| {name} | "
            + " | ".join(f"{probe[name][k]['mean']:{sign}.1f} ± {probe[name][k]['std']:.1f}" for k in keys)
            + " |"
        )
    history = metadata.get("probe_history") or []
    if len(history) > 1:
        lines += [
            "",
            "Gain over the untrained encoder as training went on (points):",
            "",
            "| epochs | SGD steps | " + " | ".join(f"{float(k) * 100:g}% labels" for k in keys) + " |",
            "|---|---|" + "---|" * len(keys),
        ]
        for entry in history:
            lines.append(
                f"| {entry['epoch']} | {entry['steps']} | "
                + " | ".join(f"{entry['probe']['gain'][k]['mean']:+.1f}" for k in keys)
                + " |"
            )
    return "\n".join(lines) + "\n"


def matching_section(runs: list[dict]) -> str:
    """Whether MTT-SSL's matching loss fell below 1 (the variance study's test, docs/variance.md), per
    distilled set, from the evaluation's runs (empty without such runs)."""
    finals = {run["distill_seed"]: run["matching_loss_final"] for run in runs if "matching_loss_final" in run}
    if not finals:
        return ""
    lines = [
        "## MTT-SSL's matching loss",
        "",
        "Trajectory matching on SSL experts: the matching loss (mean over the last tenth of the iterations) "
        "and whether it fell below 1, i.e. whether the synthetic steps got closer to the expert's end point "
        "than its start was (docs/variance.md).",
        "",
        "| distill seed | final matching loss | below 1 |",
        "|---|---|---|",
    ]
    lines += [f"| {seed} | {loss:.4f} | {'yes' if loss < 1 else 'no'} |" for seed, loss in sorted(finals.items())]
    return "\n".join(lines) + "\n"


RESULT_FILES = (  # what the report writes under results/ (dvc.yaml's outputs), each also a tracking artifact
    "summary.json",
    "summary.md",
    "paired_differences.json",
    "by_horizon.json",
    "accuracy_vs_labels.png",
    "fine_tune.json",
    "transfer.json",
    "transfer_fine_tune.json",
    "transfer.png",
)


def main(workspace: Workspace, options: StageOptions) -> None:
    report_config = config.build("report")
    evaluations = {
        method: load_json_artifact(
            workspace.evaluation(method), "evaluation", produced_by=f"evaluate --method {method}"
        )
        for method in report_config.methods
    }
    transfers = {  # read before anything is written: a missing input leaves no results half-written
        method: load_json_artifact(workspace.transfer(method), "transfer", produced_by=f"transfer --method {method}")
        for method in report_config.methods
    }
    horizons = next((e["horizons"] for e in evaluations.values() if e.get("horizons")), ["equal_steps"])
    by_horizon = runs_by_horizon({method: e["runs"] for method, e in evaluations.items()}, horizons)
    headline = horizons[0]
    summary = summarise(by_horizon[headline])
    paired = paired_table(by_horizon[headline])
    results = workspace.results
    # summary.json: every method, then each paired difference under its name ("mkdt - random"), same schema,
    # at the headline horizon; by_horizon.json: the same for every horizon
    write_json_atomic(results / "summary.json", {**summary, **paired})
    write_json_atomic(results / "paired_differences.json", paired)
    write_json_atomic(
        results / "by_horizon.json",
        {horizon: {**summarise(runs), **paired_table(runs)} for horizon, runs in by_horizon.items()},
    )
    sections = [
        f"# sslkd results: linear-probe accuracy (%)\n\nPre-training horizon **{headline}** "
        f"(the headline one, as in summary.json).\n\n" + markdown_table(summary, paired)
    ]
    for horizon in horizons[1:]:
        sections.append(
            f"## Pre-training horizon {horizon}\n\n"
            + markdown_table(summarise(by_horizon[horizon]), paired_table(by_horizon[horizon]))
        )
    if "mtt_ssl" in evaluations:
        sections.append(matching_section(evaluations["mtt_ssl"]["runs"]))
    fine_tuned = protocol_table(by_horizon[headline], "fine_tune")
    write_json_atomic(results / "fine_tune.json", fine_tuned)
    if fine_tuned:
        sections.append("## Fine-tuning (in-domain)\n\n" + split_table(fine_tuned))
    transfer = transfer_tables(transfers, "linear_probe")
    transfer_fine_tuned = transfer_tables(transfers, "fine_tune")
    write_json_atomic(results / "transfer.json", transfer)
    write_json_atomic(results / "transfer_fine_tune.json", transfer_fine_tuned)
    sections.append(transfer_section(transfers, transfer, transfer_fine_tuned))
    if workspace.teacher.is_file() and sidecar_path(workspace.teacher).is_file():
        sections.append(teacher_section(json.loads(sidecar_path(workspace.teacher).read_text())))
    table = "\n".join(section for section in sections if section)
    write_text_atomic(results / "summary.md", table)
    plot_accuracy(summary, results / "accuracy_vs_labels.png")
    plot_transfer(transfer, results / "transfer.png")
    for name in RESULT_FILES:
        tracking.log_artifact(results / name)
    log.info("summary:\n%s", table)
