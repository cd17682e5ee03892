"""``sslkd teacher``: train the SSL teacher on every training image that is not held out (or import a
checkpoint), probe its own features against the same encoder untrained, write artifacts/teacher/encoder.pt."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslkd import config
from sslkd.data.training_data import TrainingData
from sslkd.evaluation.probe import probe_gain, probe_runs
from sslkd.infra import tracking
from sslkd.infra.devices import stage_device
from sslkd.methods.teacher import import_encoder_state, projector, representations, train_ssl
from sslkd.models import build_teacher_encoder, seeded_module, teacher_architecture
from sslkd.seeding import TeacherStream, derive_seed, generator
from sslkd.stage_configs import TeacherConfig
from sslkd.stages.inputs import training_data
from sslkd.stages.options import StageOptions
from sslkd.store.artifacts import save_artifact
from sslkd.store.checkpoints import RunCheckpoints, run_checkpoints
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)

PROBE_SEEDS = (0, 1, 2)  # label draws of the teacher's probe (seed streams of their own)


def probe_seeds(teacher_config: TeacherConfig) -> list:
    """The label draws of the teacher's probe (seed streams of their own), the same at every probe."""
    return [
        lambda index, seed=seed: generator(teacher_config.seed, TeacherStream.PROBE_LABELS, seed, index)
        for seed in PROBE_SEEDS
    ]


def encoder_probe_runs(
    encoder: nn.Module, data: TrainingData, teacher_config: TeacherConfig, device: torch.device
) -> list[dict[str, float]]:
    """The encoder's features (eval mode) probed at every label fraction of the pool, once per label draw."""
    features = (
        representations(encoder, data.space.apply(data.pool_pixels()).to(device)),
        representations(encoder, data.test_images.to(device)),
    )
    return probe_runs(features, data.pool_labels, data.test_labels, teacher_config.probe, probe_seeds(teacher_config))


def log_probe(probe: dict[str, Any], step: int) -> None:
    """MLflow: the teacher's probe, the untrained encoder's and the gain, per label fraction."""
    for name in ("trained", "untrained", "gain"):
        tracking.log_metrics({f"teacher_probe/{name}/{key}": stats["mean"] for key, stats in probe[name].items()}, step)
    log.info(
        "teacher probe after epoch %d: %s",
        step,
        ", ".join(
            f"{float(key) * 100:g}% labels {probe['trained'][key]['mean']:.1f} (untrained "
            f"{probe['untrained'][key]['mean']:.1f}, gain {probe['gain'][key]['mean']:+.1f})"
            for key in probe["gain"]
        ),
    )


def main(workspace: Workspace, options: StageOptions) -> None:
    """``options.checkpoints``: save the training state periodically and resume from it (jobs of a launcher)."""
    checkpoints = options.checkpoints
    teacher_config = config.build("teacher")
    device = stage_device()
    data = training_data(workspace)
    channels = data.image_shape[0]
    architecture = teacher_architecture(teacher_config.encoder)
    encoder_fields = dataclasses.asdict(teacher_config.encoder)
    encoder = seeded_module(
        lambda: build_teacher_encoder(architecture, encoder_fields, channels),
        derive_seed(teacher_config.seed, TeacherStream.ENCODER_INIT),
    ).to(device)
    untrained = encoder_probe_runs(encoder, data, teacher_config, device)
    inputs = {"dataset": workspace.dataset}
    run = run_checkpoints(checkpoints, "teacher", teacher_config, [workspace.dataset])
    losses: list[float] = []
    history: list[dict[str, Any]] = []  # the probe after each of probe_epochs: gain against compute
    if teacher_config.checkpoint:
        checkpoint = Path(teacher_config.checkpoint).expanduser()
        import_encoder_state(encoder, checkpoint)
        inputs["checkpoint"] = checkpoint
        log.info("imported teacher from %s", checkpoint)
    else:
        losses, history = train(encoder, data, teacher_config, untrained, run, device)
    probe = probe_gain(encoder_probe_runs(encoder, data, teacher_config, device), untrained)
    epochs = len(losses)
    log_probe(probe, epochs)
    if losses:
        steps_per_epoch = max(1, len(data.pool_labels) // teacher_config.ssl.batch_size)
        history.append({"epoch": epochs, "steps": epochs * steps_per_epoch, "probe": probe})
    save_artifact(
        workspace.teacher,
        "teacher",
        {
            "state_dict": encoder.state_dict(),
            "epoch_losses": torch.tensor(losses),
            "architecture": architecture,
            "encoder": encoder_fields,
            "in_channels": channels,
        },
        config=config.operative_config(),
        inputs=inputs,
        extra={
            "representation_dim": encoder.representation_dim,
            "epoch_losses": losses,
            "trained_on_images": len(data.pool_labels),
            "probe": probe,
            "probe_history": history,
        },
    )
    run.clear()


def train(
    encoder: nn.Module,
    data: TrainingData,
    teacher_config: TeacherConfig,
    untrained: list[dict[str, float]],
    run: RunCheckpoints,
    device: torch.device,
) -> tuple[list[float], list[dict[str, Any]]]:
    """SSL training of ``encoder`` on the pool, probing it after each of probe_epochs; returns the
    epoch losses and the probe history [{"epoch", "steps", "probe"}] (kept in the resumable state)."""
    representation_dim = int(teacher_config.encoder.representation_dim)
    head = seeded_module(
        lambda: projector(representation_dim, teacher_config.ssl.projector_dim),
        derive_seed(teacher_config.seed, TeacherStream.PROJECTOR_INIT),
    ).to(device)
    pixels = data.pool_pixels().to(device)
    steps_per_epoch = max(1, len(pixels) // teacher_config.ssl.batch_size)
    resume = run.load("training")
    history: list[dict[str, Any]] = list(resume.get("probe_history", [])) if resume else []
    save = run.saver("training")

    def on_epoch(epoch: int, loss: float) -> None:
        tracking.log_metric("ssl_loss", loss, epoch)
        if epoch in teacher_config.probe_epochs and epoch != teacher_config.ssl.epochs:
            probe = probe_gain(encoder_probe_runs(encoder, data, teacher_config, device), untrained)
            log_probe(probe, epoch)
            history.append({"epoch": epoch, "steps": epoch * steps_per_epoch, "probe": probe})
            encoder.train()

    on_checkpoint = None if save is None else (lambda state: save({**state, "probe_history": list(history)}))
    losses = train_ssl(
        encoder,
        head,
        pixels,
        data.space.apply,
        teacher_config.ssl,
        generator(teacher_config.seed, TeacherStream.TRAINING),
        resume=resume,
        on_checkpoint=on_checkpoint,
        on_epoch=on_epoch,
    )
    return losses, history
