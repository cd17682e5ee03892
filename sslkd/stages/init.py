"""``sslkd init``: the real images that start the synthetic set -> artifacts/init/indices.pt.

Both the high-loss and a random subset of size M are written: ``method`` picks which one starts
distillation, and the evaluation's high-loss and random baselines read them.
"""

from __future__ import annotations

from sslkd import config
from sslkd.infra.devices import stage_device
from sslkd.methods.selection import (
    class_balanced_high_loss_indices,
    high_loss_indices,
    mean_expert_kd_loss,
    random_indices,
)
from sslkd.seeding import generator
from sslkd.stages.inputs import expert_trajectories, representations, student_data
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import save_artifact
from sslkd.store.workspace import Workspace


def main(workspace: Workspace, options: StageOptions) -> None:
    init_config = config.build("init")
    data = student_data(workspace)
    targets = representations(workspace, data)
    experts = expert_trajectories(workspace, data, targets.shape[1], epochs=1)
    device = stage_device()
    losses = mean_expert_kd_loss(
        experts.student.to(device), experts.layout, experts.snapshots[:, 1], data.images.to(device), targets.to(device)
    )
    if init_config.high_loss_scope == "per_class":
        high_loss = class_balanced_high_loss_indices(losses, data.labels, init_config.size)
    else:
        high_loss = high_loss_indices(losses, init_config.size)
    random = random_indices(len(data.images), init_config.size, generator(init_config.seed))
    save_artifact(
        workspace.init_indices,
        "init",
        {
            "indices": high_loss if init_config.method == "high_loss" else random,
            "high_loss_indices": high_loss,
            "random_indices": random,
            "kd_losses": losses,
            "method": init_config.method,
        },
        config=config.operative_config(),
        inputs={"representations": workspace.representations, "trajectories": workspace.trajectories},
        extra={"size": init_config.size, "method": init_config.method, "high_loss_scope": init_config.high_loss_scope},
    )
