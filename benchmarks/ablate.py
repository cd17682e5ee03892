"""Ablations on an existing workspace (README "Quality on cifar10_cpu"): re-distil or re-evaluate with one
thing changed, without rerunning the stages upstream of it. Not part of the pipeline or the tests.

    python benchmarks/ablate.py distill  --workdir W [--init random|high_loss|high_loss_per_class] \\
        [--iterations 300] [--lr-images 1000] ... --out SET.pt
    python benchmarks/ablate.py evaluate --workdir W --sets random,high_loss_per_class,SET.pt \\
        [--min-steps 800] [--epochs 20]

``distill`` runs :func:`sslkd.distill.distill` with the workspace's experts and representations and saves
the synthetic set; ``evaluate`` pre-trains and probes exactly as ``sslkd evaluate`` does (same encoder
init, random subset, labels and probe at each evaluation seed), for baseline names or saved sets, and
prints accuracy at 1% / 5% labels with the spread over seeds.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import torch

from sslkd.artifacts import load_artifact
from sslkd.distill import DistillConfig, distill
from sslkd.evaluation import PretrainConfig, ProbeConfig, pretrain_kd, probe_at_fractions
from sslkd.experts import build_student
from sslkd.models import ConvNetConfig
from sslkd.seeding import derive_seed, generator
from sslkd.selection import class_balanced_high_loss_indices, random_indices
from sslkd.stages.inputs import expert_trajectories, representations, training_data
from sslkd.workspace import Workspace

log = logging.getLogger("ablate")
BASELINES = ("no_pretrain", "random", "high_loss", "high_loss_per_class", "init_random", "full_data")


def start_indices(name: str, init: dict, labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """The real images a set starts from: the init stage's global high-loss set, the per-class high-loss
    set, or a random subset drawn with (seed, 99) — ``init_random`` at evaluation is that same subset."""
    size = len(init["high_loss_indices"])
    if name == "high_loss":
        return init["high_loss_indices"]
    if name == "high_loss_per_class":
        return class_balanced_high_loss_indices(init["kd_losses"], labels, size)
    return random_indices(count, size, generator(seed, 99))


def run_distill(args: argparse.Namespace) -> None:
    workspace = Workspace(Path(args.workdir))
    data = training_data(workspace)
    targets = representations(workspace, data)
    config = DistillConfig(
        iterations=args.iterations, syn_steps=args.syn_steps, expert_epochs=args.expert_epochs,
        max_start_epoch=args.max_start_epoch, batch_syn=args.batch_syn, lr_images=args.lr_images,
        momentum_images=0.5, lr_representations=args.lr_representations, momentum_representations=0.5,
        lr_lr=args.lr_lr, momentum_lr=0.5, lr_init=args.lr_init, lr_min=1e-4,
        learn_representations=args.lr_representations > 0, unroll="adjoint", adjoint_snapshots="all", compile=True,
        seeds=(args.seed,))
    experts = expert_trajectories(workspace, data, targets.shape[1], epochs=config.epochs_needed)
    init = load_artifact(workspace.init_indices, "init", produced_by="init")
    indices = start_indices(args.init, init, data.labels, len(data.images), args.seed)
    started = time.perf_counter()
    result = distill(experts.student, experts.layout, experts.snapshots, data.images[indices], targets[indices],
                     config, generator(args.seed))
    losses = np.asarray(result.matching_losses)
    blocks = [round(float(losses[i:i + 25].mean()), 4) for i in range(0, len(losses), 25)]
    print(f"{args.init}: {time.perf_counter() - started:.0f} s; matching loss, means of 25 iterations: {blocks}")
    print(f"inner lr {config.lr_init} -> {result.lr:.4f}; rms change: images "
          f"{float((result.images - data.images[indices]).pow(2).mean().sqrt()):.3f}, representations "
          f"{float((result.representations - targets[indices]).pow(2).mean().sqrt()):.4f} "
          f"(their rms {float(targets[indices].pow(2).mean().sqrt()):.3f})")
    torch.save({"images": result.images, "representations": result.representations, "lr": result.lr,
                "init": args.init, "matching_losses": result.matching_losses}, args.out)


def pretraining_set(name: str, data, targets: torch.Tensor, init: dict, eval_seed: int, lr: float):
    """(images, targets, lr) of a baseline name or a saved synthetic set; None for no pre-training."""
    if name == "no_pretrain":
        return None
    if name == "full_data":
        return data.images, targets, lr
    if name.split(":")[0] == "random":  # drawn afresh for every evaluation seed, as ``sslkd evaluate`` does
        size = int(name.split(":")[1]) if ":" in name else len(init["high_loss_indices"])  # random:N: N images
        indices = random_indices(len(data.images), size, generator(eval_seed, 3))
    elif name in ("high_loss", "high_loss_per_class"):
        indices = start_indices(name, init, data.labels, len(data.images), 0)
    elif name == "init_random":
        indices = start_indices("random", init, data.labels, len(data.images), 0)
    else:
        synthetic = torch.load(name, weights_only=False)
        return synthetic["images"], synthetic["representations"], float(synthetic["lr"])
    return data.images[indices], targets[indices], lr


def run_evaluate(args: argparse.Namespace) -> None:
    workspace = Workspace(Path(args.workdir))
    data = training_data(workspace)
    targets = representations(workspace, data)
    init = load_artifact(workspace.init_indices, "init", produced_by="init")
    pretrain = PretrainConfig(args.epochs, 256, 0.1, 0.9, 1e-4, True, args.min_steps)
    probe = ProbeConfig((0.01, 0.05), 1.0, 1000)
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for name in args.sets.split(","):
        started, accuracies = time.perf_counter(), []
        for seed in seeds:
            student = build_student(ConvNetConfig(args.width, 3), data.image_shape, targets.shape[1], derive_seed(seed, 0))
            chosen = pretraining_set(name, data, targets, init, seed, pretrain.lr)
            if chosen is not None:
                pretrain_kd(student, *chosen[:2], chosen[2], pretrain, generator(seed, 1))
            accuracy = probe_at_fractions(student, data.images, data.labels, data.test_images, data.test_labels,
                                          probe, lambda index: generator(seed, 2, index))
            accuracies.append([accuracy["0.01"], accuracy["0.05"]])
        table = np.asarray(accuracies)
        print(f"{name} (min_steps {args.min_steps}, epochs {args.epochs}): 1% {table[:, 0].mean():.1f} ± "
              f"{table[:, 0].std(ddof=1):.1f}, 5% {table[:, 1].mean():.1f} ± {table[:, 1].std(ddof=1):.1f}; "
              f"per seed {table.round(1).tolist()} ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("distill")
    d.add_argument("--workdir", required=True)
    d.add_argument("--init", choices=("random", "high_loss", "high_loss_per_class"), default="random")
    d.add_argument("--iterations", type=int, default=300)
    d.add_argument("--syn-steps", type=int, default=10)
    d.add_argument("--batch-syn", type=int, default=64)
    d.add_argument("--expert-epochs", type=int, default=2)
    d.add_argument("--max-start-epoch", type=int, default=2)
    d.add_argument("--lr-images", type=float, default=1000.0)
    d.add_argument("--lr-representations", type=float, default=1.0, help="0 keeps the teacher's")
    d.add_argument("--lr-lr", type=float, default=1e-4)
    d.add_argument("--lr-init", type=float, default=0.1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", required=True)
    e = commands.add_parser("evaluate")
    e.add_argument("--workdir", required=True)
    e.add_argument("--sets", required=True, help=f"comma-separated: {', '.join(BASELINES)}, random:N (N random images) or saved set paths")
    e.add_argument("--epochs", type=int, default=20)
    e.add_argument("--min-steps", type=int, default=0)
    e.add_argument("--width", type=int, default=32)
    e.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    {"distill": run_distill, "evaluate": run_evaluate}[args.command](args)


if __name__ == "__main__":
    main()
