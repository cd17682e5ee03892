"""``sslkd represent``: teacher representations [N, D] in dataset order -> artifacts/represent/."""

from __future__ import annotations

from sslkd import config
from sslkd.infra.devices import stage_device
from sslkd.methods.teacher import representations
from sslkd.stages.inputs import teacher_encoder, training_data
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import save_artifact
from sslkd.store.workspace import Workspace


def main(workspace: Workspace, options: StageOptions) -> None:
    represent_config = config.build("represent")
    data = training_data(workspace)
    encoder = teacher_encoder(workspace, data)
    reps = representations(encoder.to(stage_device()), data.images, represent_config.batch_size)
    save_artifact(
        workspace.representations,
        "representations",
        {"representations": reps},
        config=config.operative_config(),
        inputs={"dataset": workspace.dataset, "teacher": workspace.teacher},
        extra={"representation_dim": reps.shape[1], "order": "dataset order (row i = training image i)"},
    )
