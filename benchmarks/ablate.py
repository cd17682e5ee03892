"""Ablations on an existing workspace (README "Quality on cifar10_cpu"): re-distil or re-evaluate with one
thing changed, without rerunning the stages upstream of it. Not part of the pipeline or the tests.

    python benchmarks/ablate.py distill  --workdir W [--init random|high_loss|high_loss_per_class] \\
        [--bind 'sslkd.distill.iterations = 300'] --out SET.pt
    python benchmarks/ablate.py evaluate --workdir W --sets random,high_loss_per_class,SET.pt \\
        [--bind 'sslkd.pretrain.min_steps = 0']
    python benchmarks/ablate.py evaluate --workdir W --sets teacher   # the teacher's own features, probed
    python benchmarks/ablate.py evaluate --workdir W --sets expert:0:4   # expert 0 after epoch 4, probed as it is
    python benchmarks/ablate.py evaluate --workdir W --sets SET.pt --distilled-lr 0.1   # not its learned lr
    python benchmarks/ablate.py evaluate --workdir W --sets random,SET.pt --json OUT.json
    python benchmarks/ablate.py pairs --json OUT.json --pair SET.pt:random   # mean ± s.e. over seeds
    python benchmarks/ablate.py pairs --json OUT.json --pair A.pt+B.pt+C.pt:random   # their mean per seed

Hyperparameters come from the setting (``--setting``, default cifar10_cpu), params.yaml and ``--bind``,
exactly as for ``sslkd <stage>``. ``distill`` runs :func:`sslkd.methods.distill.distill` on the workspace's
experts and representations from the chosen start set, for the first distillation seed, and saves the
synthetic set; ``evaluate`` pre-trains and probes as ``sslkd evaluate`` does (the same sets, encoder init,
labels and probe at each evaluation seed) for method names, extra real subsets or saved sets, and prints
the accuracy per label fraction with the spread over seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sslkd import config
from sslkd.errors import SslkdError
from sslkd.evaluation.probe import pretrain_kd, probe_at_fractions, probe_features_at_fractions
from sslkd.methods.distill import distill
from sslkd.methods.experts import build_student
from sslkd.methods.selection import class_balanced_high_loss_indices, random_indices
from sslkd.methods.teacher import representations as teacher_representations
from sslkd.seeding import EvaluateStream, derive_seed, generator
from sslkd.stage_configs import METHODS
from sslkd.stages.evaluate import PretrainingSet, pretraining_sets
from sslkd.stages.inputs import (
    check_input_space,
    expert_trajectories,
    representations,
    student_data,
    teacher_encoder,
    training_data,
)
from sslkd.store.artifacts import load_artifact
from sslkd.store.workspace import Workspace

BASELINES = tuple(method for method in METHODS if method != "mkdt")
EXTRA_SETS = ("high_loss_per_class", "init_random", "random:N", "expert:K:E")
TEACHER = "teacher"  # not a set: the probe on the teacher's own representations (its strength)


def start_indices(name: str, init: dict, labels: torch.Tensor, count: int) -> torch.Tensor:
    """The real images a set starts from: the init stage's high-loss set, the per-class high-loss set, or
    the random subset drawn with (0, 99) — ``init_random`` at evaluation is that same subset."""
    size = len(init["high_loss_indices"])
    if name == "high_loss":
        return init["high_loss_indices"]
    if name == "high_loss_per_class":
        return class_balanced_high_loss_indices(init["kd_losses"], labels, size)
    return random_indices(count, size, generator(0, 99))


def run_distill(args: argparse.Namespace, workspace: Workspace) -> None:
    distill_config = config.build("distill")
    seed = distill_config.seeds[0] if args.seed is None else args.seed
    distill_config = dataclasses.replace(distill_config, seeds=(seed,))
    data = student_data(workspace)
    targets = representations(workspace, data)
    experts = expert_trajectories(workspace, data, targets.shape[1], epochs=distill_config.epochs_needed)
    init = load_artifact(workspace.init_indices, "init", produced_by="init")
    indices = start_indices(args.init, init, data.labels, len(data.images))
    started = time.perf_counter()
    result = distill(
        experts.student,
        experts.layout,
        experts.snapshots,
        data.images[indices],
        targets[indices],
        distill_config,
        generator(seed),
    )
    losses = np.asarray(result.matching_losses)
    blocks = [round(float(losses[i : i + 25].mean()), 4) for i in range(0, len(losses), 25)]
    print(f"{args.init}: {time.perf_counter() - started:.0f} s; matching loss, means of 25 iterations: {blocks}")
    print(
        f"inner lr {distill_config.lr_init} -> {result.lr:.4f}; rms change: images "
        f"{float((result.images - data.images[indices]).pow(2).mean().sqrt()):.3f}, representations "
        f"{float((result.representations - targets[indices]).pow(2).mean().sqrt()):.4f} "
        f"(their rms {float(targets[indices].pow(2).mean().sqrt()):.3f})"
    )
    for name, points in result.validation.items():
        print(f"matching loss on the {name} experts (iterations, loss): {[(i, round(v, 4)) for i, v in points]}")
    torch.save(
        {
            "images": result.images,
            "representations": result.representations,
            "lr": result.lr,
            "init": args.init,
            "matching_losses": result.matching_losses,
            "learning_rates": result.learning_rates,
            "validation": result.validation,
            "seed": seed,
            "seconds": time.perf_counter() - started,
            "input_space": data.space.name,
        },
        args.out,
    )


def pretraining_set(
    name: str,
    workspace: Workspace,
    data,
    targets: torch.Tensor,
    init: dict,
    eval_seed: int,
    baseline_lr: float,
    distilled_lr: float | None = None,
) -> PretrainingSet | None:
    """The set ``name`` pre-trains on at ``eval_seed`` (None: no pre-training): a method other than mkdt
    as ``sslkd evaluate`` builds it, an extra real subset (EXTRA_SETS) or a set saved by ``distill``."""
    if name in BASELINES:
        return pretraining_sets(name, workspace, data.images, targets, baseline_lr, eval_seed, data.space)[0][0]
    if name.startswith("random:"):  # N random images, drawn afresh per evaluation seed as ``random`` is
        indices = random_indices(
            len(data.images), int(name.split(":")[1]), generator(eval_seed, EvaluateStream.RANDOM_SUBSET)
        )
    elif name in ("high_loss_per_class", "init_random"):
        indices = start_indices(name.removeprefix("init_"), init, data.labels, len(data.images))
    else:
        if not Path(name).is_file():
            raise SslkdError(f"unknown set {name!r}: neither {', '.join(BASELINES + EXTRA_SETS)} nor a saved set")
        synthetic = torch.load(name, weights_only=False)
        check_input_space(synthetic, data.space, name, "distill (benchmarks/ablate.py distill)")
        lr = float(synthetic["lr"]) if distilled_lr is None else distilled_lr
        return PretrainingSet(synthetic["images"], synthetic["representations"], lr)
    return PretrainingSet(data.images[indices], targets[indices], baseline_lr)


def run_evaluate(args: argparse.Namespace, workspace: Workspace) -> None:
    evaluate_config = config.build("evaluate")
    data = student_data(workspace)
    targets = representations(workspace, data)
    init = load_artifact(workspace.init_indices, "init", produced_by="init")
    pool = data.pool_images()  # the probe's labels come from every non-held-out image, as in sslkd evaluate
    results: dict[str, dict] = {}
    for name in args.sets.split(","):
        started, rows = time.perf_counter(), []
        if name == TEACHER:  # the teacher's features of the probe's pool and of the test images
            standardised = training_data(workspace)  # what the teacher sees, whatever the students see
            teacher = teacher_encoder(workspace, standardised)
            teacher_pool_features = teacher_representations(teacher, standardised.pool_images())
            teacher_test_features = teacher_representations(teacher, standardised.test_images)
        for seed in evaluate_config.seeds:
            if name == TEACHER:  # the same labelled subsets as every set at this seed
                accuracy = probe_features_at_fractions(
                    teacher_pool_features,
                    data.pool_labels,
                    teacher_test_features,
                    data.test_labels,
                    evaluate_config.probe,
                    lambda index: generator(seed, EvaluateStream.LABELLED_SUBSET, index),
                )
                rows.append(list(accuracy.values()))
                continue
            student = build_student(
                evaluate_config.encoder,
                data.image_shape,
                targets.shape[1],
                derive_seed(seed, EvaluateStream.ENCODER_INIT),
            )
            if name.startswith("expert:"):  # an expert's snapshot as the encoder, no pre-training
                chosen = None
                expert, epoch = (int(part) for part in name.split(":")[1:])
                experts = expert_trajectories(workspace, data, targets.shape[1], epochs=epoch)
                experts.layout.load_into(student, experts.snapshots[expert, epoch].float())
            else:
                chosen = pretraining_set(
                    name, workspace, data, targets, init, seed, evaluate_config.pretrain.lr, args.distilled_lr
                )
            if chosen is not None:
                pretrain_kd(
                    student,
                    chosen.images,
                    chosen.targets,
                    chosen.lr,
                    evaluate_config.pretrain,
                    generator(seed, EvaluateStream.PRETRAINING),
                )
            accuracy = probe_at_fractions(
                student,
                pool,
                data.pool_labels,
                data.test_images,
                data.test_labels,
                evaluate_config.probe,
                lambda index: generator(seed, EvaluateStream.LABELLED_SUBSET, index),
            )
            rows.append(list(accuracy.values()))
        table = np.asarray(rows)
        cells = ", ".join(
            f"{float(key) * 100:g}% {table[:, i].mean():.1f} ± {table[:, i].std(ddof=1):.1f}"
            for i, key in enumerate(accuracy)
        )
        print(
            f"{name}: {cells}; per seed {table.round(1).tolist()} ({time.perf_counter() - started:.0f} s)", flush=True
        )
        results[name] = {"seeds": list(evaluate_config.seeds), "fractions": list(accuracy), "accuracy": rows}
        if args.json:  # rewritten after every set: a long call keeps what it has measured
            args.json.write_text(json.dumps(results, indent=1) + "\n")


def sets_named(names: str, results: dict[str, dict], paths: list[Path]) -> list[dict]:
    """One side of a pair: the results of set ``A``, or of ``A+B+C`` (compared by their mean accuracy at each
    evaluation seed, e.g. several distillation seeds' sets against one baseline)."""
    for name in names.split("+"):
        if name not in results:
            sys.exit(f"ablate: no set {name!r} in {[str(p) for p in paths]}")
    return [results[name] for name in names.split("+")]


def run_pairs(args: argparse.Namespace) -> None:
    """Paired differences A − B per label fraction from ``evaluate --json`` files (same evaluation seeds):
    mean ± standard error over the seeds, and the std."""
    results: dict[str, dict] = {}
    for path in args.json:
        results.update(json.loads(path.read_text()))
    for pair in args.pair:
        first, _, second = pair.partition(":")
        a, b = sets_named(first, results, args.json), sets_named(second, results, args.json)
        seeds, fractions = a[0]["seeds"], a[0]["fractions"]
        if any(c["seeds"] != seeds or c["fractions"] != fractions for c in a + b):
            sys.exit(f"ablate: {first} and {second} were evaluated at different seeds or label fractions")
        mean_a, mean_b = (np.mean([np.asarray(c["accuracy"]) for c in side], axis=0) for side in (a, b))
        differences = mean_a - mean_b  # [seeds, fractions]
        sem = differences.std(axis=0, ddof=1) / np.sqrt(len(differences))
        cells = ", ".join(
            f"{float(key) * 100:g}% {differences[:, i].mean():+.1f} ± {sem[i]:.1f} s.e. (sd {differences[:, i].std(ddof=1):.1f})"
            for i, key in enumerate(fractions)
        )
        print(f"{first} - {second}: {cells} (n {len(differences)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("distill", "evaluate"):
        command = commands.add_parser(name)
        command.add_argument("--workdir", type=Path, required=True, help="workspace holding the setting's artifacts")
        command.add_argument("--setting", default="cifar10_cpu")
        command.add_argument("--params", type=Path, default=Path("params.yaml"))
        command.add_argument("--config-dir", type=Path, default=Path("gin"))
        command.add_argument("--bind", action="append", default=[], help="extra gin binding (repeatable)")
        if name == "distill":
            command.add_argument("--init", choices=("random", "high_loss", "high_loss_per_class"), default="random")
            command.add_argument("--out", required=True, help="where to save the synthetic set (torch.save)")
            command.add_argument("--seed", type=int, default=None, help="distillation seed (default: distill.seeds[0])")
        else:
            command.add_argument(
                "--sets",
                required=True,
                help=f"comma-separated: {', '.join(BASELINES + EXTRA_SETS + (TEACHER,))} or saved sets",
            )
            command.add_argument(
                "--distilled-lr",
                type=float,
                default=None,
                help="pre-train saved distilled sets at this lr instead of their learned one "
                "(real sets use sslkd.pretrain.lr)",
            )
            command.add_argument("--json", type=Path, default=None, help="also write every set's accuracies per seed")
    pairs = commands.add_parser("pairs", help="paired differences of sets from evaluate --json files")
    pairs.add_argument("--json", type=Path, action="append", required=True)
    pairs.add_argument("--pair", action="append", required=True, metavar="A:B", help="A − B (repeatable)")
    args = parser.parse_args()
    if args.command == "pairs":
        return run_pairs(args)
    logging.basicConfig(level=logging.WARNING)
    try:
        config.parse(args.config_dir, args.setting, [], config.read_params(args.params).bindings() + args.bind)
        {"distill": run_distill, "evaluate": run_evaluate}[args.command](args, Workspace(args.workdir))
    except SslkdError as error:
        sys.exit(f"ablate: {error}")


if __name__ == "__main__":
    main()
