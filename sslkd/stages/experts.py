"""``sslkd experts``: K expert trajectories -> artifacts/experts/trajectories.pt ([K, epochs + 1, P]).

Expert k depends only on (experts.seed, k), so experts train independently. Under a launcher the
experts are first trained by a job array (:func:`train_parts`), each finished expert kept as a part file
of the run (``jobs/experts/state/<run key>/part_<k>.pt``, outside the DVC output, which DVC deletes
before rerunning the stage); :func:`main` then merges the parts, training any that are missing, into the
same artifact an inline run writes. A rerun after a partial failure trains only the missing experts.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from sslkd import config
from sslkd.data.training_data import TrainingData
from sslkd.infra import tracking
from sslkd.infra.devices import stage_device
from sslkd.methods.experts import ExpertsConfig, build_student, expert_seed, train_expert
from sslkd.methods.kd_steps import KDSteps
from sslkd.models import ParameterLayout
from sslkd.progress import track
from sslkd.seeding import ExpertStream, generator
from sslkd.stages.inputs import representations, student_data
from sslkd.stages.options import StageOptions, StageParts
from sslkd.store.artifacts import save_artifact
from sslkd.store.checkpoints import CheckpointPolicy, RunCheckpoints, run_checkpoints
from sslkd.store.workspace import Workspace

log = logging.getLogger(__name__)


@dataclass
class ExpertsRun:
    """The stage's config, inputs and the run's checkpoints (parts and mid-expert states)."""

    config: ExpertsConfig
    data: TrainingData
    targets: torch.Tensor
    checkpoints: RunCheckpoints
    device: torch.device
    steps: KDSteps | None = None  # one KDSteps for all experts of the run: the step compiles once


def prepare(workspace: Workspace, checkpoints: CheckpointPolicy | None, device: torch.device) -> ExpertsRun:
    """The run's config and inputs, the images and targets on ``device``."""
    experts_config = config.build("experts")
    data = student_data(workspace)
    targets = representations(workspace, data)
    run = run_checkpoints(checkpoints, "experts", experts_config, [workspace.dataset, workspace.representations])
    data = dataclasses.replace(data, images=data.images.to(device))
    return ExpertsRun(experts_config, data, targets.to(device), run, device)


def part_name(index: int) -> str:
    return f"part_{index:05d}"


def missing_experts(workspace: Workspace, checkpoints: CheckpointPolicy) -> list[int]:
    """Indices of the experts that have no finished part yet (what a job array still has to train)."""
    run = prepare(workspace, checkpoints, torch.device("cpu"))  # computes nothing: no device needed
    return [index for index in range(run.config.num_experts) if not run.checkpoints.has(part_name(index))]


def expert(run: ExpertsRun, index: int) -> dict:
    """Expert ``index``: {snapshots [epochs + 1, P], epoch_losses: list}, from its part if one is
    finished, else trained (resuming a checkpointed state) and kept as a part."""
    part = run.checkpoints.load(part_name(index))
    if part is not None:
        return part
    state_name = f"expert_{index:05d}"
    student = build_student(
        run.config.student, run.data.image_shape, run.targets.shape[1], expert_seed(run.config.seed, index)
    ).to(run.device)
    if run.config.objective == "kd" and run.steps is None:
        run.steps = KDSteps(
            student, ParameterLayout.of(student), compile=run.config.compile, precision=run.config.precision
        )
    snapshots, epoch_losses = train_expert(
        student,
        run.data.images,
        run.targets,
        run.config,
        generator(run.config.seed, index, ExpertStream.TRAINING),
        run.data.space,
        run.steps,
        resume=run.checkpoints.load(state_name),
        on_checkpoint=run.checkpoints.saver(state_name),
    )
    log.info(
        "expert %d: %s loss per epoch %s",
        index,
        run.config.objective,
        ", ".join(f"{loss:.4f}" for loss in epoch_losses),
    )
    part = {"snapshots": snapshots, "epoch_losses": epoch_losses}
    run.checkpoints.save(part_name(index), part)
    run.checkpoints.delete(state_name)
    return part


def train_parts(workspace: Workspace, indices: Sequence[int], checkpoints: CheckpointPolicy) -> None:
    """One job of the array: train experts ``indices`` and keep each as a part file."""
    run = prepare(workspace, checkpoints, stage_device())
    for index in indices:
        expert(run, index)


def main(workspace: Workspace, options: StageOptions) -> None:
    """All experts (merging finished parts when checkpointing) -> the trajectories artifact."""
    run = prepare(workspace, options.checkpoints, stage_device())
    experts_config = run.config
    parts = [expert(run, index) for index in track(range(experts_config.num_experts), desc="experts", leave=True)]
    layout = ParameterLayout.of(build_student(experts_config.student, run.data.image_shape, run.targets.shape[1], 0))
    for index, part in enumerate(parts):
        for epoch, loss in enumerate(part["epoch_losses"], start=1):
            tracking.log_metric(f"{experts_config.objective}_loss/expert_{index}", loss, epoch)
    save_artifact(
        workspace.trajectories,
        "trajectories",
        {
            "snapshots": torch.stack([part["snapshots"] for part in parts]),
            "epoch_losses": torch.tensor([part["epoch_losses"] for part in parts]),
            "layout": layout.to_json(),
            "student": dataclasses.asdict(experts_config.student),
            "image_shape": list(run.data.image_shape),
            "out_dim": run.targets.shape[1],
            "objective": experts_config.objective,
            "input_space": run.data.space.name,
        },
        config=config.operative_config(),
        inputs={"dataset": workspace.dataset, "representations": workspace.representations},
        extra={
            "parameters": layout.numel,
            "epochs": experts_config.epochs,
            "objective": experts_config.objective,
            "input_space": run.data.space.name,
        },
    )
    run.checkpoints.clear()


PARTS = StageParts(missing=missing_experts, train=train_parts)  # a launcher trains them as a job array
