"""Which real images start the synthetic set: the highest-KD-loss examples under the epoch-1 experts
(MKDT's initialisation; over the whole set, or per class, which reads the labels), or a seeded random
subset."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sslkd.errors import SslkdError
from sslkd.losses import per_example_kd_loss
from sslkd.models import ConvNet, ParameterLayout

INIT_METHODS = ("high_loss", "random")
HIGH_LOSS_SCOPES = ("global", "per_class")


@dataclass(frozen=True)
class InitConfig:
    """size: M, the synthetic set's size; method: high_loss | random (which set starts distillation);
    high_loss_scope: global (the M highest losses, docs/method.md) | per_class (the highest M/C of each class:
    uses the labels, which an SSL pipeline otherwise never reads); seed: for ``random``."""

    size: int
    method: str
    high_loss_scope: str
    seed: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise SslkdError(f"init.size must be >= 1, got {self.size}")
        if self.method not in INIT_METHODS:
            raise SslkdError(f"unknown init method {self.method!r}; choose one of {', '.join(INIT_METHODS)}")
        if self.high_loss_scope not in HIGH_LOSS_SCOPES:
            raise SslkdError(
                f"unknown init.high_loss_scope {self.high_loss_scope!r}; choose one of {', '.join(HIGH_LOSS_SCOPES)}"
            )


@torch.no_grad()
def mean_expert_kd_loss(
    student: ConvNet,
    layout: ParameterLayout,
    expert_parameters: torch.Tensor,
    images: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Per-example KD loss averaged over experts, in dataset order.

    expert_parameters: [K, P] (e.g. every expert's epoch-1 snapshot); images: [N, C, H, W];
    targets: [N, D], on the student's device. Returns [N] on the CPU; entry i belongs to image i (no
    shuffling anywhere).
    """
    total = torch.zeros(len(images), dtype=torch.float64)
    for parameters in expert_parameters:
        layout.load_into(student, parameters)
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            total[start:stop] += per_example_kd_loss(student(images[start:stop]), targets[start:stop]).double().cpu()
    return (total / len(expert_parameters)).float()


def high_loss_indices(losses: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the ``size`` largest losses [N], returned in dataset order.

    Ties go to the earlier index (stable sort), so the set for a smaller size is a subset of the set
    for a larger one.
    """
    if not 0 < size <= len(losses):
        raise SslkdError(f"synthetic set size {size} must lie in 1..{len(losses)} (the training images)")
    ranked = torch.sort(losses, descending=True, stable=True).indices
    return torch.sort(ranked[:size]).values


def class_balanced_high_loss_indices(losses: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of the highest losses [N] within each class of ``labels`` [N], in dataset order.

    Every class gets size // C examples; the size % C left over go to the classes in label order. A class
    with fewer members than its share gives all it has and the rest goes to the next ranked examples
    overall, so exactly ``size`` distinct indices come back.
    """
    if not 0 < size <= len(losses):
        raise SslkdError(f"synthetic set size {size} must lie in 1..{len(losses)} (the training images)")
    if labels.shape != losses.shape:
        raise SslkdError(f"labels {tuple(labels.shape)} and losses {tuple(losses.shape)} must have the same shape")
    classes = torch.unique(labels, sorted=True)
    share, extra = divmod(size, len(classes))
    chosen = []
    for position, label in enumerate(classes.tolist()):
        members = torch.nonzero(labels == label).flatten()
        quota = share + (1 if position < extra else 0)
        ranked = members[torch.sort(losses[members], descending=True, stable=True).indices]
        chosen.append(ranked[:quota])
    picked = torch.cat(chosen)
    if len(picked) < size:  # small classes: top up with the highest remaining losses overall
        remaining = torch.ones(len(losses), dtype=torch.bool)
        remaining[picked] = False
        candidates = torch.nonzero(remaining).flatten()
        ranked = candidates[torch.sort(losses[candidates], descending=True, stable=True).indices]
        picked = torch.cat([picked, ranked[: size - len(picked)]])
    return torch.sort(picked).values


def random_indices(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``size`` distinct indices out of ``count``, drawn with ``generator``, in dataset order."""
    if not 0 < size <= count:
        raise SslkdError(f"subset size {size} must lie in 1..{count} (the training images)")
    return torch.sort(torch.randperm(count, generator=generator)[:size]).values
