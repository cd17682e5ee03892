"""``sslkd represent``: teacher representations [N, D] in dataset order -> artifacts/represent/."""

from __future__ import annotations

from sslkd import config
from sslkd.artifacts import load_artifact, save_artifact
from sslkd.devices import stage_device
from sslkd.errors import SslkdError
from sslkd.models import ResNet18, ResNetConfig
from sslkd.stages.inputs import training_data
from sslkd.teacher import representations
from sslkd.workspace import Workspace


def main(workspace: Workspace) -> None:
    represent_config = config.build("represent")
    data = training_data(workspace)
    payload = load_artifact(workspace.teacher, "teacher", produced_by="teacher")
    if payload["in_channels"] != data.image_shape[0]:
        raise SslkdError(
            f"teacher takes {payload['in_channels']}-channel images, the dataset has {data.image_shape[0]}: "
            "rerun `sslkd teacher` for this dataset"
        )
    encoder = ResNet18(ResNetConfig(**payload["encoder"]), data.image_shape[0])
    encoder.load_state_dict(payload["state_dict"])
    reps = representations(encoder.to(stage_device()), data.images, represent_config.batch_size)
    save_artifact(
        workspace.representations,
        "representations",
        {"representations": reps},
        config=config.operative_config(),
        inputs={"dataset": workspace.dataset, "teacher": workspace.teacher},
        extra={"representation_dim": reps.shape[1], "order": "dataset order (row i = training image i)"},
    )
