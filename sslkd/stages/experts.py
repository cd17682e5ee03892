"""``sslkd experts``: K expert trajectories -> artifacts/experts/trajectories.pt ([K, epochs + 1, P])."""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm.auto import tqdm

from sslkd import config, tracking
from sslkd.artifacts import save_artifact
from sslkd.experts import build_student, expert_seed, train_expert
from sslkd.models import ParameterLayout
from sslkd.seeding import generator
from sslkd.stages.inputs import representations, training_data
from sslkd.workspace import Workspace

log = logging.getLogger(__name__)


def main(workspace: Workspace) -> None:
    experts_config = config.build("experts")
    data = training_data(workspace)
    targets = representations(workspace, data)
    trajectories, losses = [], []
    for index in tqdm(range(experts_config.num_experts), desc="experts", disable=None):
        student = build_student(experts_config.student, data.image_shape, targets.shape[1],
                                expert_seed(experts_config.seed, index))
        snapshots, epoch_losses = train_expert(
            student, data.images, targets, experts_config, generator(experts_config.seed, index, 1),
            data.normalisation,
        )
        trajectories.append(snapshots)
        losses.append(epoch_losses)
        for epoch, loss in enumerate(epoch_losses, start=1):
            tracking.log_metric(f"{experts_config.objective}_loss/expert_{index}", loss, epoch)
        log.info("expert %d: %s loss per epoch %s", index, experts_config.objective,
                 ", ".join(f"{loss:.4f}" for loss in epoch_losses))
    layout = ParameterLayout.of(student)
    save_artifact(
        workspace.trajectories,
        "trajectories",
        {
            "snapshots": torch.stack(trajectories),
            "epoch_losses": torch.tensor(losses),
            "layout": layout.to_json(),
            "student": dataclasses.asdict(experts_config.student),
            "image_shape": list(data.image_shape),
            "out_dim": targets.shape[1],
            "objective": experts_config.objective,
        },
        config=config.operative_config(),
        inputs={"dataset": workspace.dataset, "representations": workspace.representations},
        extra={"parameters": layout.numel, "epochs": experts_config.epochs, "objective": experts_config.objective},
    )
