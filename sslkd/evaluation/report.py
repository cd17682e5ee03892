"""Aggregation of evaluation runs: per-method mean ± std, paired differences with their standard error,
the Markdown table."""

from __future__ import annotations

import math
import statistics
from typing import Any

from sslkd.evaluation.probe import summary_stats

Runs = list[dict[str, Any]]


def protocol_runs(runs: Runs, protocol: str) -> Runs:
    """The runs with ``protocol``'s accuracies as their "accuracy" ('linear_probe': as they are;
    'fine_tune': each run's "fine_tune" record, runs without one left out), for :func:`summarise` and
    :func:`paired_differences`."""
    if protocol == "linear_probe":
        return runs
    return [{**run, "accuracy": run[protocol]} for run in runs if run.get(protocol)]


def summarise(runs_by_method: dict[str, Runs]) -> dict[str, dict[str, dict[str, float | int]]]:
    """{method: {label_fraction: {"mean", "std" (sample std over runs), "n"}}} from each method's runs."""
    summary = {}
    for method, runs in runs_by_method.items():
        fractions = sorted({key for run in runs for key in run["accuracy"]}, key=float)
        summary[method] = {key: summary_stats([run["accuracy"][key] for run in runs]) for key in fractions}
    return summary


def paired_differences(runs_by_method: dict[str, Runs], method: str, baseline: str) -> dict[str, dict]:
    """method − baseline accuracy per label fraction, each ``method`` run paired with the ``baseline`` run
    of the same evaluation seed (same encoder init, same labels) and, when the baseline is a distilled set
    too (krr_st, mtt_ssl), of the same distillation seed; mean, std and n of the differences, and "sem", their standard error.

    The standard error is that of the mean over evaluation seeds: the differences of one evaluation seed
    (one per distillation seed) share its encoder init, labels and, for a real baseline, its run, so they
    are averaged first and the s.e.m. is the std of those means / √(evaluation seeds); with one
    distillation seed it is std / √n. 0 for a single evaluation seed."""
    by_distill_seed = any(run.get("distill_seed") is not None for run in runs_by_method[baseline])

    def pair_key(run: dict[str, Any]) -> tuple[int, int | None]:
        return run["eval_seed"], run.get("distill_seed") if by_distill_seed else None

    baseline_by_seed = {pair_key(run): run["accuracy"] for run in runs_by_method[baseline]}
    differences: dict[str, list[float]] = {}
    by_eval_seed: dict[str, dict[int, list[float]]] = {}
    for run in runs_by_method[method]:
        paired = baseline_by_seed.get(pair_key(run))
        if paired is None:
            continue
        for key, value in run["accuracy"].items():
            if key in paired:
                differences.setdefault(key, []).append(value - paired[key])
                by_eval_seed.setdefault(key, {}).setdefault(run["eval_seed"], []).append(value - paired[key])
    return {
        key: {**summary_stats(values), "sem": standard_error(by_eval_seed[key])}
        for key, values in sorted(differences.items(), key=lambda item: float(item[0]))
    }


def standard_error(differences_by_eval_seed: dict[int, list[float]]) -> float:
    """s.e.m. over evaluation seeds of the per-seed mean difference (0 for one seed)."""
    means = [statistics.fmean(values) for values in differences_by_eval_seed.values()]
    return statistics.stdev(means) / math.sqrt(len(means)) if len(means) > 1 else 0.0


def paired_cell(cell: dict[str, Any]) -> str:
    """A paired difference as ``+1.2 ± 0.8 s.e. (sd 1.4, n 3)``; a cell without "sem" (an older file)
    as mean ± std (n)."""
    if "sem" not in cell:
        return f"{cell['mean']:+.1f} ± {cell['std']:.1f} ({cell['n']})"
    return f"{cell['mean']:+.1f} ± {cell['sem']:.1f} s.e. (sd {cell['std']:.1f}, n {cell['n']})"


def markdown_table(summary: dict, paired: dict[str, dict]) -> str:
    """The summary as a Markdown table (accuracy %, mean ± std (n)), then the paired differences."""
    fractions = sorted({key for rows in summary.values() for key in rows}, key=float)
    header = "| pre-training set | " + " | ".join(f"{float(f) * 100:g}% labels" for f in fractions) + " |"
    lines = [header, "|---|" + "---|" * len(fractions)]
    for method, rows in summary.items():
        cells = [
            f"{rows[f]['mean']:.1f} ± {rows[f]['std']:.1f} ({rows[f]['n']})" if f in rows else "–" for f in fractions
        ]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if paired:
        lines += [
            "",
            "Paired differences (same evaluation seed: same encoder init, same labels), points: mean ± its "
            "standard error over evaluation seeds (s.e.), then the std of the differences and their number:",
            "",
            header.replace("pre-training set", "difference"),
            "|---|" + "---|" * len(fractions),
        ]
        for name, rows in paired.items():
            cells = [paired_cell(rows[f]) if f in rows else "–" for f in fractions]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
