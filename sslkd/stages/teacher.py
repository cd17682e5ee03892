"""``sslkd teacher``: train the SSL teacher (or import a checkpoint), write artifacts/teacher/encoder.pt."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from sslkd import config
from sslkd.artifacts import save_artifact
from sslkd.checkpoints import run_checkpoints
from sslkd.infra import tracking
from sslkd.infra.devices import stage_device
from sslkd.models import ResNet18, seeded_module
from sslkd.seeding import TeacherStream, derive_seed, generator
from sslkd.stages.inputs import training_data
from sslkd.stages.options import StageOptions
from sslkd.teacher import import_encoder_state, projector, train_ssl
from sslkd.workspace import Workspace

log = logging.getLogger(__name__)


def main(workspace: Workspace, options: StageOptions) -> None:
    """``options.checkpoints``: save the training state periodically and resume from it (jobs of a launcher)."""
    checkpoints = options.checkpoints
    teacher_config = config.build("teacher")
    device = stage_device()
    data = training_data(workspace)
    channels = data.image_shape[0]
    encoder = seeded_module(lambda: ResNet18(teacher_config.encoder, channels), derive_seed(teacher_config.seed, TeacherStream.ENCODER_INIT))
    inputs = {"dataset": workspace.dataset}
    run = run_checkpoints(checkpoints, "teacher", teacher_config, [workspace.dataset])
    if teacher_config.checkpoint:
        checkpoint = Path(teacher_config.checkpoint).expanduser()
        import_encoder_state(encoder, checkpoint)
        inputs["checkpoint"] = checkpoint
        losses: list[float] = []
        log.info("imported teacher from %s", checkpoint)
    else:
        head = seeded_module(
            lambda: projector(encoder.representation_dim, teacher_config.ssl.projector_dim),
            derive_seed(teacher_config.seed, TeacherStream.PROJECTOR_INIT),
        ).to(device)
        encoder.to(device)
        pixels = data.space.invert(data.images).to(device)
        losses = train_ssl(encoder, head, pixels, data.space.apply, teacher_config.ssl,
                           generator(teacher_config.seed, TeacherStream.TRAINING), resume=run.load("training"),
                           on_checkpoint=run.saver("training"),
                           on_epoch=lambda epoch, loss: tracking.log_metric("ssl_loss", loss, epoch))
    save_artifact(
        workspace.teacher,
        "teacher",
        {"state_dict": encoder.state_dict(), "epoch_losses": torch.tensor(losses),
         "encoder": dataclasses.asdict(teacher_config.encoder), "in_channels": channels},
        config=config.operative_config(),
        inputs=inputs,
        extra={"representation_dim": encoder.representation_dim, "epoch_losses": losses},
    )
    run.clear()
