"""``sslkd distill``: one synthetic set per seed -> artifacts/distill/synthetic_seed<seed>.pt."""

from __future__ import annotations

import dataclasses
import logging

import torch

from sslkd import config
from sslkd.data.training_data import TrainingData
from sslkd.evaluation.plots import plot_distillation_curve, plot_synthetic_set
from sslkd.infra import tracking
from sslkd.infra.devices import stage_device
from sslkd.methods.distill import DistillConfig, DistillResult, distill
from sslkd.seeding import generator
from sslkd.stages.inputs import expert_trajectories, representations, student_data
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import load_artifact, save_artifact
from sslkd.store.checkpoints import run_checkpoints
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)


def main(workspace: Workspace, options: StageOptions) -> None:
    """``options.checkpoints``: save each seed's state periodically and resume from it (jobs of a launcher)."""
    checkpoints = options.checkpoints
    distill_config = config.build("distill")
    device = stage_device()
    data = student_data(workspace)
    targets = representations(workspace, data)
    experts = expert_trajectories(workspace, data, targets.shape[1], epochs=distill_config.epochs_needed)
    indices = load_artifact(workspace.init_indices, "init", produced_by="init")["indices"]
    run = run_checkpoints(
        checkpoints,
        "distill",
        distill_config,
        [workspace.dataset, workspace.representations, workspace.trajectories, workspace.init_indices],
    )
    for seed in distill_config.seeds:
        result = distill(
            experts.student.to(device),
            experts.layout,
            experts.snapshots,
            data.images[indices].to(device),
            targets[indices].to(device),
            distill_config,
            generator(seed),
            resume=run.load(f"seed{seed}"),
            on_checkpoint=run.saver(f"seed{seed}"),
            on_iteration=lambda iteration, loss, lr: tracking.log_metrics(
                {f"matching_loss/seed_{seed}": loss, f"inner_lr/seed_{seed}": lr}, iteration
            ),
        )
        record_synthetic_set(workspace, seed, result, indices, data, distill_config)
    run.clear()


def record_synthetic_set(
    workspace: Workspace,
    seed: int,
    result: DistillResult,
    indices: torch.Tensor,
    data: TrainingData,
    distill_config: DistillConfig,
) -> None:
    """Save distillation seed ``seed``'s set (artifacts/distill/synthetic_seed<seed>.pt and its sidecar)
    and show it, with its matching-loss curve, in tracking."""
    result.images, result.representations = result.images.cpu(), result.representations.cpu()
    log.info(
        "seed %d: matching loss %.4f -> %.4f, lr %.4f",
        seed,
        result.matching_losses[0],
        result.matching_losses[-1],
        result.lr,
    )
    save_artifact(
        workspace.synthetic(seed),
        "synthetic",
        {
            "images": result.images,
            "representations": result.representations,
            "lr": result.lr,
            "init_indices": indices,
            "matching_losses": torch.tensor(result.matching_losses),
            "learning_rates": torch.tensor(result.learning_rates),
            "validation": result.validation,
            "input_space": data.space.name,
        },
        config=config.operative_config(),
        inputs={
            "trajectories": workspace.trajectories,
            "init": workspace.init_indices,
            "representations": workspace.representations,
        },
        extra={
            "seed": seed,
            "lr": result.lr,
            "distill": dataclasses.asdict(distill_config),
            "input_space": data.space.name,
            "matching_loss_first": result.matching_losses[0],
            "matching_loss_last": result.matching_losses[-1],
            # the set's matching loss on the held-out experts and, unrolled the same way, on the trained ones:
            # {"held_out" | "trained": [[iterations done, loss], ...]} ({} without held-out experts)
            "validation_matching_loss": result.validation,
        },
    )
    for name, points in result.validation.items():
        for iteration, loss in points:
            tracking.log_metric(f"validation_matching_loss/{name}/seed_{seed}", loss, iteration)
    pixels = data.space.invert
    tracking.log_image(
        f"synthetic_seed{seed}.png",
        lambda path: plot_synthetic_set(pixels(data.images[indices]), pixels(result.images), path),
    )
    tracking.log_image(
        f"distill_loss_seed{seed}.png",
        lambda path: plot_distillation_curve(result.matching_losses, result.learning_rates, path),
    )
    tracking.log_metric("learned_lr", result.lr, seed)
