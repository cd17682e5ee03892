"""``sslkd mtt_ssl``: the MTT-SSL baseline -> artifacts/mtt_ssl/synthetic_seed<seed>.pt, one set per
distill seed.

Trains K experts with the SSL objective (the KD experts' settings otherwise; under a launcher each
finished expert is kept as a part of the run, as ``sslkd experts`` does), then matches their trajectories
from the init stage's random subset (drawn here with the same seed), learning the images only. Whether
the matching loss fell below 1 is recorded with each set (the variance study's finding, docs/variance.md).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from sslkd import config
from sslkd.data.training_data import TrainingData
from sslkd.infra import tracking
from sslkd.infra.devices import stage_device
from sslkd.methods.distill import DistillResult, distill
from sslkd.methods.experts import build_student
from sslkd.methods.mtt_ssl import final_matching_loss
from sslkd.methods.selection import random_indices
from sslkd.models import ParameterLayout
from sslkd.progress import track
from sslkd.seeding import MttSslStream, generator
from sslkd.stages.experts import ExpertsRun, expert
from sslkd.stages.inputs import representations, student_data
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import save_artifact
from sslkd.store.checkpoints import run_checkpoints
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)


def main(workspace: Workspace, options: StageOptions) -> None:
    mtt_config = config.build("mtt_ssl")
    experts_config, matching = mtt_config.ssl_experts, mtt_config.matching
    device = stage_device()
    data = student_data(workspace)
    targets = representations(workspace, data)
    inputs = [workspace.dataset, workspace.representations]
    run = ExpertsRun(
        experts_config,
        dataclasses.replace(data, images=data.images.to(device)),
        targets.to(device),
        run_checkpoints(options.checkpoints, "mtt_ssl", mtt_config, inputs),
        device,
    )
    parts = [expert(run, index) for index in track(range(experts_config.num_experts), desc="SSL experts", leave=True)]
    trajectories = torch.stack([part["snapshots"][: matching.epochs_needed + 1] for part in parts])
    for index, part in enumerate(parts):
        for epoch, loss in enumerate(part["epoch_losses"], start=1):
            tracking.log_metric(f"{experts_config.objective}_loss/expert_{index}", loss, epoch)
    student = build_student(experts_config.student, data.image_shape, targets.shape[1], 0).to(device)
    indices = random_indices(len(data.images), mtt_config.init.size, generator(mtt_config.init.seed))
    for seed in matching.seeds:
        result = distill(
            student,
            ParameterLayout.of(student),
            trajectories,
            data.images[indices].to(device),
            targets[indices].to(device),
            matching,
            generator(seed, MttSslStream.MATCHING),
            on_iteration=lambda iteration, loss, lr: tracking.log_metrics(
                {f"matching_loss/seed_{seed}": loss, f"inner_lr/seed_{seed}": lr}, iteration
            ),
            resume=run.checkpoints.load(f"seed{seed}"),
            on_checkpoint=run.checkpoints.saver(f"seed{seed}"),
        )
        final = final_matching_loss(result.matching_losses)
        log.info(
            "seed %d: matching loss %.4f -> %.4f (last tenth's mean): %s 1",
            seed,
            result.matching_losses[0],
            final,
            "below" if final < 1 else "not below",
        )
        save_mtt_ssl_set(workspace, seed, result, final, indices, parts, experts_config.objective, data)
    run.checkpoints.clear()


def save_mtt_ssl_set(
    workspace: Workspace,
    seed: int,
    result: DistillResult,
    final: float,
    indices: torch.Tensor,
    parts: list[dict],
    objective: str,
    data: TrainingData,
) -> None:
    """artifacts/mtt_ssl/synthetic_seed<seed>.pt: the set, its matching losses (``final``: the last tenth's
    mean) and its SSL experts' losses; the sidecar says whether the matching loss fell below 1."""
    save_artifact(
        workspace.method_set("mtt_ssl", seed),
        "synthetic",
        {
            "images": result.images.cpu(),
            "representations": result.representations.cpu(),
            "lr": result.lr,
            "init_indices": indices,
            "matching_losses": torch.tensor(result.matching_losses),
            "matching_loss_final": final,
            "expert_losses": torch.tensor([part["epoch_losses"] for part in parts]),
            "objective": objective,
            "input_space": data.space.name,
        },
        config=config.operative_config(),
        inputs={"dataset": workspace.dataset, "representations": workspace.representations},
        extra={
            "seed": seed,
            "objective": objective,
            "input_space": data.space.name,
            "matching_loss_first": result.matching_losses[0],
            "matching_loss_final": final,
            "matching_loss_below_one": final < 1,
        },
    )
