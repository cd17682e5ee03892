"""MKDT − random and full data − random against the teacher's strength (issue 18): the same study run with
teachers trained for different numbers of epochs, each stage the pipeline's own ``sslkd <stage>``.

    python benchmarks/teacher_strength.py --out DIR --epochs 0 5 20 60 \\
        [--checkpoint NAME=PATH ...] [--setting digits] [--params params.yaml] \\
        [--bind 'sslkd.init.method = "random"'] [--plot]

For each teacher budget E, DIR/teacher_E is a workspace in which data, teacher (``sslkd.ssl.epochs = E``;
0 keeps the encoder untrained), represent, experts, init, distill and evaluate (random, full_data, mkdt)
run with the setting, params.yaml and the extra ``--bind``s. ``--checkpoint NAME=PATH`` adds a teacher the
stage imports instead of training (``sslkd.teacher.checkpoint``; e.g. the encoders benchmarks/teacher_curve.py
saves after 175 ... 1,400 steps), in DIR/teacher_NAME. The teacher stage probes its own features
against the same encoder untrained: that gain (points, at the smallest label fraction) is the x-axis.
DIR/teacher_strength.json holds, per budget, the gain and the paired differences at each horizon and label
fraction (mean, standard error, n over evaluation seeds and distillation seeds); ``--plot`` draws them.
Stages already done in a workspace (their artifact present) are not run again.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from sslkd.evaluation.report import paired_differences
from sslkd.stages.report import runs_by_horizon
from sslkd.store.workspace import Workspace

log = logging.getLogger("teacher_strength")
METHODS = ("random", "full_data", "mkdt")
PAIRS = (("mkdt", "random"), ("full_data", "random"))
STAGES = ("data", "teacher", "represent", "experts", "init", "distill")


def sslkd(stage: list[str], workdir: Path, args: argparse.Namespace, binds: list[str]) -> None:
    command = [sys.executable, "-m", "sslkd", *stage, "--workdir", str(workdir), "--params", str(args.params)]
    command += ["--no-tracking", "--config-dir", str(args.config_dir)]
    command += (["--setting", args.setting] if args.setting else []) + [f"--bind={b}" for b in binds]
    log.info("%s: sslkd %s", workdir.name, " ".join(stage))
    with open(workdir / f"log_{'_'.join(stage).replace('--method_', '')}.txt", "w") as out:
        subprocess.run(command, check=True, stdout=out, stderr=subprocess.STDOUT)


def output(workspace: Workspace, stage: str) -> Path:
    """The artifact whose presence says ``stage`` (or ``evaluate:<method>``) is done in the workspace."""
    if stage.startswith("evaluate:"):
        return workspace.evaluation(stage.removeprefix("evaluate:"))
    return {
        "data": workspace.dataset,
        "teacher": workspace.teacher,
        "represent": workspace.representations,
        "experts": workspace.trajectories,
        "init": workspace.init_indices,
        "distill": workspace.synthetic(0),
    }[stage]


def teachers(args: argparse.Namespace) -> dict[str, list[str]]:
    """name -> the bindings that give that teacher: trained ``--epochs`` or imported ``--checkpoint``s."""
    budgets = {str(epochs): [f"sslkd.ssl.epochs = {epochs}"] for epochs in args.epochs}
    for entry in args.checkpoint:
        name, sep, path = entry.partition("=")
        if not sep or not name or not Path(path).is_file():
            raise SystemExit(f"--checkpoint takes NAME=PATH to an encoder file, got {entry!r}")
        if name in budgets:
            raise SystemExit(f"teacher name {name!r} is given twice (--epochs and --checkpoint share DIR/teacher_NAME)")
        budgets[name] = [f"sslkd.teacher.checkpoint = '{Path(path).resolve()}'"]
    if not budgets:
        raise SystemExit("name at least one teacher: --epochs E ... or --checkpoint NAME=PATH ...")
    return budgets


def run_budget(name: str, teacher_binds: list[str], args: argparse.Namespace) -> Path:
    workdir = args.out / f"teacher_{name}"
    workdir.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(workdir)
    binds = [*args.bind, *teacher_binds, "sslkd.teacher.probe_epochs = ()"]
    for stage in STAGES:
        if not output(workspace, stage).is_file():
            sslkd([stage], workdir, args, binds)
    for method in METHODS:
        if not output(workspace, f"evaluate:{method}").is_file():
            sslkd(["evaluate", "--method", method], workdir, args, binds)
    return workdir


def paired(workdir: Path) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """'<a> - <b>' -> horizon -> fraction -> {mean, sem, n}: the report's paired differences (same horizon
    and evaluation seed), with the standard error of their mean."""
    workspace = Workspace(workdir)
    evaluations = {method: json.loads(workspace.evaluation(method).read_text()) for method in METHODS}
    horizons = evaluations["mkdt"]["horizons"]
    by_horizon = runs_by_horizon({method: e["runs"] for method, e in evaluations.items()}, horizons)
    table: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for a, b in PAIRS:
        for horizon, runs in by_horizon.items():
            table.setdefault(f"{a} - {b}", {})[horizon] = {
                fraction: {"mean": d["mean"], "sem": d["std"] / d["n"] ** 0.5, "n": d["n"]}
                for fraction, d in paired_differences(runs, a, b).items()
            }
    return table


def teacher_gain(workdir: Path) -> dict[str, float]:
    meta = json.loads((workdir / "artifacts" / "teacher" / "encoder.pt.meta.json").read_text())
    return {fraction: value["mean"] for fraction, value in meta["probe"]["gain"].items()}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    horizons = sorted({h for r in results.values() for h in r["paired"]["mkdt - random"]})
    figure, axes = plt.subplots(1, len(horizons), figsize=(5 * len(horizons), 4), squeeze=False)
    for axis, horizon in zip(axes[0], horizons):
        for pair, marker in (("mkdt - random", "o"), ("full_data - random", "s")):
            fractions = sorted(next(iter(results.values()))["paired"][pair][horizon], key=float)[:2]
            for fraction in fractions:  # x: the gain at the smallest label fraction, for every curve
                xs = [r["gain"][min(r["gain"], key=float)] for r in results.values()]
                ys = [r["paired"][pair][horizon][fraction]["mean"] for r in results.values()]
                es = [r["paired"][pair][horizon][fraction]["sem"] for r in results.values()]
                axis.errorbar(xs, ys, yerr=es, marker=marker, capsize=3, label=f"{pair}, {float(fraction):.0%}")
        axis.axhline(0, color="grey", lw=0.8)
        axis.set(
            title=f"horizon {horizon}", xlabel="teacher gain over untrained, fewest labels (points)", ylabel="points"
        )
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, nargs="+", default=[])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH")
    parser.add_argument("--setting", default=None)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--config-dir", type=Path, default=Path("gin"))
    parser.add_argument("--bind", action="append", default=[])
    parser.add_argument("--plot", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args.out, args.params, args.config_dir = args.out.resolve(), args.params.resolve(), args.config_dir.resolve()
    os.environ.setdefault("SSLKD_TRACKING", "off")
    results = {}
    for name, teacher_binds in teachers(args).items():
        workdir = run_budget(name, teacher_binds, args)
        results[name] = {"gain": teacher_gain(workdir), "paired": paired(workdir)}
        (args.out / "teacher_strength.json").write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        plot(results, args.out / "teacher_strength.png")


if __name__ == "__main__":
    main()
