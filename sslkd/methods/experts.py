"""Expert trajectories: students trained from fresh inits to regress teacher representations (KD), or
with an SSL loss for the "MTT with SSL" baseline, with the flat parameters saved after every epoch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from sslkd.data.augmentations import DSAConfig, two_views
from sslkd.data.datasets import InputSpace
from sslkd.errors import SslkdError
from sslkd.methods.kd_steps import KDSteps, check_precision, train_kd
from sslkd.methods.teacher import SSL_OBJECTIVES, SSLConfig, ssl_loss
from sslkd.models import ConvNet, ConvNetConfig, ParameterLayout, seeded_module
from sslkd.seeding import derive_seed

log = logging.getLogger(__name__)

EXPERT_OBJECTIVES = ("kd",) + SSL_OBJECTIVES


@dataclass(frozen=True)
class ExpertsConfig:
    """K expert trajectories of ``epochs`` epochs (SGD with momentum and weight decay, constant lr).

    objective: kd (MKDT) or an SSL objective (barlow_twins, simclr: the "MTT with SSL" baseline, whose
    augmentations and loss settings come from ``ssl``); epochs: epochs trained and stored (distillation reads
    at most max_start_epoch + expert_epochs); compile: torch.compile the KD training step once per stage
    (SSL experts train eagerly); precision: 'float32', or 'bfloat16' for the KD step's forward pass in
    bfloat16 autocast (mixed precision; kd_steps.PRECISIONS); seed: expert k's init and data order derive
    from (seed, k); augment: KD experts train on differentiably augmented minibatches (DSA, as MTT's
    experts do; the targets stay the unaugmented images'), None: no augmentation.
    """

    student: ConvNetConfig
    objective: str
    num_experts: int
    epochs: int
    lr: float
    momentum: float
    weight_decay: float
    batch_size: int
    ssl: SSLConfig | None
    compile: bool
    precision: str
    seed: int
    augment: DSAConfig | None = None

    def __post_init__(self) -> None:
        check_precision(self.precision)
        if self.objective not in EXPERT_OBJECTIVES:
            raise SslkdError(
                f"unknown expert objective {self.objective!r}; choose one of {', '.join(EXPERT_OBJECTIVES)}"
            )
        if self.objective != "kd" and self.ssl is None:
            raise SslkdError(f"{self.objective} experts need sslkd.experts.ssl (the SSL objective's settings)")
        if self.num_experts < 1 or self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise SslkdError("experts need num_experts, epochs, batch_size >= 1 and lr > 0")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise SslkdError(
                f"experts need momentum in [0, 1) and weight_decay >= 0, got {self.momentum}, {self.weight_decay}"
            )


def build_student(config: ConvNetConfig, image_shape: tuple[int, ...], out_dim: int, seed: int) -> ConvNet:
    """A ConvNet for images of shape (C, H, W) with a D = ``out_dim`` head, initialised from ``seed``."""
    channels, height, width = image_shape
    if height != width:
        raise SslkdError(f"square images expected, got {height}×{width}")
    return seeded_module(lambda: ConvNet(config, channels, height, out_dim), seed)


def expert_seed(seed: int, index: int) -> int:
    return derive_seed(seed, index)


def train_expert(
    student: ConvNet,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: ExpertsConfig,
    generator: torch.Generator,
    input_space: InputSpace | None = None,
    steps: KDSteps | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Train ``student`` for config.epochs epochs; returns (snapshots [epochs + 1, P] on the CPU, mean loss
    per epoch).

    images: [N, C, H, W] normalised; targets: [N, D] teacher representations (kd); both on the student's
    device. KD experts train with ``steps`` (pass one :class:`KDSteps` to every expert of a stage so that
    it compiles once; default: built here with config.compile). SSL objectives augment in pixel space (``input_space``
    maps back and forth) and use the student's output as the projection. After each epoch
    ``on_checkpoint`` gets the training state (parameters, optimiser momentum, generator, snapshots so
    far); passing it back as ``resume`` continues bit-identically.
    """
    if config.objective == "kd":
        return _train_kd_expert(student, images, targets, config, generator, steps, resume, on_checkpoint)
    if input_space is None:
        raise ValueError("SSL experts need the input space to augment images")
    return _train_ssl_expert(student, images, config, generator, input_space, resume, on_checkpoint)


def _train_kd_expert(
    student: ConvNet,
    images: torch.Tensor,
    targets: torch.Tensor,
    config: ExpertsConfig,
    generator: torch.Generator,
    steps: KDSteps | None,
    resume: dict[str, Any] | None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None,
) -> tuple[torch.Tensor, list[float]]:
    layout = ParameterLayout.of(student)
    steps = steps or KDSteps(student, layout, compile=config.compile, precision=config.precision)
    snapshots, epoch_losses, velocity = [layout.flatten(student).cpu()], [], None  # snapshots kept on the CPU
    if resume is not None:
        generator.set_state(resume["generator"])
        snapshots, epoch_losses = list(resume["snapshots"]), list(resume["epoch_losses"])
        velocity = resume["velocity"].to(images.device)
    for parameters, velocity, loss in train_kd(  # noqa: B020 (the last velocity is kept for a resume)
        steps,
        snapshots[-1].to(images.device),
        images,
        targets,
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        batch_size=config.batch_size,
        epochs=config.epochs - len(epoch_losses),
        generator=generator,
        velocity=velocity,
        augment=config.augment,
    ):
        snapshots.append(parameters.cpu())
        epoch_losses.append(loss)
        if on_checkpoint is not None:
            on_checkpoint(
                {
                    "velocity": velocity,
                    "generator": generator.get_state(),
                    "snapshots": torch.stack(snapshots),
                    "epoch_losses": list(epoch_losses),
                }
            )
    layout.load_into(student, snapshots[-1])
    return torch.stack(snapshots), epoch_losses


def _train_ssl_expert(
    student: ConvNet,
    images: torch.Tensor,
    config: ExpertsConfig,
    generator: torch.Generator,
    input_space: InputSpace,
    resume: dict[str, Any] | None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None,
) -> tuple[torch.Tensor, list[float]]:
    if config.ssl is None:
        raise SslkdError(f"{config.objective} experts need sslkd.experts.ssl (the SSL objective's settings)")
    ssl = config.ssl
    layout = ParameterLayout.of(student)
    optimiser = torch.optim.SGD(
        student.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    snapshots = [layout.flatten(student).cpu()]
    epoch_losses: list[float] = []
    if resume is not None:
        student.load_state_dict(resume["student"])
        optimiser.load_state_dict(resume["optimiser"])
        generator.set_state(resume["generator"])
        snapshots, epoch_losses = list(resume["snapshots"]), list(resume["epoch_losses"])
    for _ in range(len(epoch_losses), config.epochs):
        epoch_losses.append(ssl_epoch(student, optimiser, images, ssl, config.batch_size, generator, input_space))
        snapshots.append(layout.flatten(student).cpu())
        if on_checkpoint is not None:
            on_checkpoint(
                {
                    "student": student.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "generator": generator.get_state(),
                    "snapshots": torch.stack(snapshots),
                    "epoch_losses": list(epoch_losses),
                }
            )
    return torch.stack(snapshots), epoch_losses


def ssl_epoch(
    student: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    images: torch.Tensor,
    ssl: SSLConfig,
    batch_size: int,
    generator: torch.Generator,
    input_space: InputSpace,
) -> float:
    """One pass of SSL training over images [N, C, H, W] (in ``input_space``) in seeded random order, the
    student's output used as the projection; returns the mean loss. Batches smaller than 2 are skipped
    (the SSL losses standardise over the batch)."""
    order = torch.randperm(len(images), generator=generator)
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = order[start : start + batch_size]
        if len(batch) < 2:
            continue
        view1, view2 = two_views(input_space.invert(images[batch]), ssl.augment, generator)
        loss = ssl_loss(ssl, student(input_space.apply(view1)), student(input_space.apply(view2)))
        if not torch.isfinite(loss):
            raise SslkdError(f"SSL training loss became {loss.item()}: lower the learning rate")
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total, count = total + loss.item(), count + 1
    return total / max(count, 1)


def with_objective(config: ExpertsConfig, objective: str) -> ExpertsConfig:
    """``config`` training ``objective`` (kd or an SSL objective, whose ``ssl`` settings it then uses)."""
    if objective != "kd" and config.ssl is None:
        raise SslkdError(f"{objective} experts need sslkd.experts.ssl (the SSL objective's settings)")
    ssl = replace(config.ssl, objective=objective) if objective != "kd" and config.ssl else config.ssl
    return replace(config, objective=objective, ssl=ssl)
