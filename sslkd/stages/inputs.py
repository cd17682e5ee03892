"""Loading the artifacts stages hand to each other, with the checks that make bad inputs fail clearly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslkd import config
from sslkd.data.datasets import InputSpace, Normalisation, ZCAWhitening
from sslkd.data.training_data import TrainingData
from sslkd.errors import SslkdError
from sslkd.methods.experts import build_student
from sslkd.models import ConvNet, ConvNetConfig, ParameterLayout, build_teacher_encoder
from sslkd.store.artifacts import load_artifact
from sslkd.store.workspace import Workspace


def training_data(workspace: Workspace) -> TrainingData:
    payload = load_artifact(workspace.dataset, "dataset", produced_by="data")
    normalisation = Normalisation(payload["mean"], payload["std"])
    return TrainingData(
        normalisation.from_uint8(payload["train_images"]),
        payload["train_labels"],
        normalisation.from_uint8(payload["test_images"]),
        payload["test_labels"],
        normalisation,
        payload.get("pool_images", payload["train_images"]),
        payload.get("pool_labels", payload["train_labels"]),
    )


def student_data(workspace: Workspace) -> TrainingData:
    """The training data as the students see them (``sslkd.student_input``): standardised, or ZCA-whitened
    with a whitening fit on the training images."""
    student_input = config.build("student_input")
    data = training_data(workspace)
    if not student_input.zca:
        return data
    standardisation = data.space
    assert isinstance(standardisation, Normalisation)  # training_data() always standardises
    whitening = ZCAWhitening.fit(standardisation, data.images, student_input.zca_regularisation)
    return TrainingData(
        whitening.whiten(data.images),
        data.labels,
        whitening.whiten(data.test_images),
        data.test_labels,
        whitening,
        data.pool_uint8,
        data.pool_labels,
    )


def check_input_space(payload: dict, space: InputSpace, path: object, rerun: str) -> None:
    """Refuse an artifact made of images in another space than ``space`` (artifacts without the key
    predate ZCA whitening: standardised)."""
    made_in = payload.get("input_space", "standardised")
    if made_in != space.name:
        raise SslkdError(
            f"{path} was made from {made_in} images, but the students now see {space.name} "
            f"images (sslkd.student_input): rerun `sslkd {rerun}`"
        )


def teacher_encoder(workspace: Workspace, data: TrainingData) -> nn.Module:
    """The teacher stage's encoder, checked against the dataset's channels."""
    payload = load_artifact(workspace.teacher, "teacher", produced_by="teacher")
    if payload["in_channels"] != data.image_shape[0]:
        raise SslkdError(
            f"teacher takes {payload['in_channels']}-channel images, the dataset has {data.image_shape[0]}: "
            "rerun `sslkd teacher` for this dataset"
        )
    encoder = build_teacher_encoder(payload.get("architecture", "resnet18"), payload["encoder"], data.image_shape[0])
    encoder.load_state_dict(payload["state_dict"])
    return encoder


def representations(workspace: Workspace, data: TrainingData) -> torch.Tensor:
    """Teacher representations [N, D], checked against the training images."""
    reps = load_artifact(workspace.representations, "representations", produced_by="represent")["representations"]
    if reps.ndim != 2 or len(reps) != len(data.images):
        raise SslkdError(
            f"{workspace.representations} has shape {tuple(reps.shape)}, expected [{len(data.images)}, D]: "
            "rerun `sslkd represent` for the current dataset"
        )
    return reps.float()


@dataclass
class ExpertTrajectories:
    """snapshots: [K, S, P] flat student parameters; the student the layout belongs to."""

    snapshots: torch.Tensor
    layout: ParameterLayout
    student_config: ConvNetConfig
    student: ConvNet
    objective: str


def expert_trajectories(
    workspace: Workspace, data: TrainingData, out_dim: int, epochs: int | None = None
) -> ExpertTrajectories:
    """Load the experts, reading only snapshots 0..``epochs`` (memory-mapped), and refuse trajectories
    whose architecture, image shape or output size differ from what they will be used with."""
    payload = load_artifact(workspace.trajectories, "trajectories", produced_by="experts")
    config = ConvNetConfig(**payload["student"])
    if tuple(payload["image_shape"]) != data.image_shape or payload["out_dim"] != out_dim:
        raise SslkdError(
            f"{workspace.trajectories} was trained on images {tuple(payload['image_shape'])} → D={payload['out_dim']}, "
            f"but the data are {data.image_shape} → D={out_dim}: rerun `sslkd experts`"
        )
    check_input_space(payload, data.space, workspace.trajectories, "experts")
    layout = ParameterLayout.from_json(payload["layout"])
    student = build_student(config, data.image_shape, out_dim, seed=0)
    if ParameterLayout.of(student) != layout:
        raise SslkdError(f"{workspace.trajectories}: parameter layout does not match a ConvNet {config}")
    snapshots = payload["snapshots"]
    if epochs is not None:
        if snapshots.shape[1] <= epochs:
            raise SslkdError(
                f"experts store epochs 0..{snapshots.shape[1] - 1}, epoch {epochs} is needed: raise experts.epochs"
            )
        snapshots = snapshots[:, : epochs + 1]
    return ExpertTrajectories(snapshots, layout, config, student, payload["objective"])
