"""The SSL teacher: Barlow Twins (or SimCLR) training of an encoder (a CIFAR-stem ResNet-18 or a BN
ConvNet), checkpoint import, and the target representations it yields."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from sslkd.data.augmentations import AugmentConfig, two_views
from sslkd.errors import SslkdError
from sslkd.losses import barlow_twins_loss, simclr_loss
from sslkd.progress import track

log = logging.getLogger(__name__)

SSL_OBJECTIVES = ("barlow_twins", "simclr")


@dataclass(frozen=True)
class SSLConfig:
    """An SSL objective and its optimisation: AdamW, a linear warm-up over ``warmup_steps`` steps, then a
    cosine schedule to zero over the remaining steps of ``epochs``.

    objective: barlow_twins | simclr; projector_dim: width of the 3-layer projector;
    off_diagonal_weight: Barlow Twins λ; temperature: SimCLR τ.
    """

    objective: str
    projector_dim: int
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    off_diagonal_weight: float
    temperature: float
    augment: AugmentConfig
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.objective not in SSL_OBJECTIVES:
            raise SslkdError(f"unknown SSL objective {self.objective!r}; choose one of {', '.join(SSL_OBJECTIVES)}")
        if self.epochs < 1 or self.batch_size < 2:
            raise SslkdError("SSL training needs epochs >= 1 and batch_size >= 2")
        if self.warmup_steps < 0:
            raise SslkdError(f"ssl.warmup_steps must be >= 0, got {self.warmup_steps}")


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """The lr factor at each step: linear from 1/warmup_steps to 1 over the warm-up, then a half cosine
    from 1 to 0 over the rest of ``total_steps``."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def projector(in_dim: int, out_dim: int) -> nn.Module:
    """Barlow Twins' projector: two Linear–BatchNorm–ReLU layers and a final Linear."""
    return nn.Sequential(
        nn.Linear(in_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim),
        nn.ReLU(inplace=True),
        nn.Linear(out_dim, out_dim, bias=False),
        nn.BatchNorm1d(out_dim),
        nn.ReLU(inplace=True),
        nn.Linear(out_dim, out_dim, bias=False),
    )


def ssl_loss(config: SSLConfig, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """The configured SSL loss of two projected views z1, z2: [B, P]."""
    if config.objective == "barlow_twins":
        return barlow_twins_loss(z1, z2, config.off_diagonal_weight)
    return simclr_loss(z1, z2, config.temperature)


def train_ssl(
    encoder: nn.Module,
    head: nn.Module,
    images: torch.Tensor,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    config: SSLConfig,
    generator: torch.Generator,
    on_epoch: Callable[[int, float], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> list[float]:
    """Train ``head(encoder(view))`` with the SSL objective; returns the mean loss of each epoch.

    images: [N, C, H, W] in [0, 1] (augmented, then normalised by ``normalise``). Batches smaller than
    2 are dropped (the losses need a batch). After each epoch ``on_checkpoint`` gets the training state
    (networks, optimiser, schedule, generator); passing such a state as ``resume`` continues from it
    exactly as if the run had never stopped.
    """
    parameters = list(encoder.parameters()) + list(head.parameters())
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(images) // config.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, warmup_cosine(config.warmup_steps, config.epochs * steps_per_epoch)
    )
    encoder.train()
    head.train()
    epoch_losses: list[float] = []
    first_epoch = 0
    stateful: dict[str, Any] = {"encoder": encoder, "head": head, "optimiser": optimiser, "schedule": schedule}
    if resume is not None:
        for name, part in stateful.items():
            part.load_state_dict(resume[name])
        generator.set_state(resume["generator"])
        epoch_losses, first_epoch = list(resume["epoch_losses"]), resume["epoch"]
        log.info("teacher: resuming after epoch %d", first_epoch)
    for epoch in track(range(first_epoch, config.epochs), desc="teacher epochs"):
        order = torch.randperm(len(images), generator=generator)
        total, count = 0.0, 0
        for start in range(0, steps_per_epoch * config.batch_size, config.batch_size):
            batch = images[order[start : start + config.batch_size]]
            view1, view2 = two_views(batch, config.augment, generator)
            loss = ssl_loss(config, head(encoder(normalise(view1))), head(encoder(normalise(view2))))
            if not torch.isfinite(loss):
                raise SslkdError(f"SSL loss became {loss.item()} at epoch {epoch}: lower ssl.lr")
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total, count = total + loss.item(), count + 1
        epoch_losses.append(total / count)
        log.info("teacher epoch %d: %s loss %.4f", epoch + 1, config.objective, epoch_losses[-1])
        if on_epoch is not None:
            on_epoch(epoch + 1, epoch_losses[-1])
        if on_checkpoint is not None:
            state = {name: part.state_dict() for name, part in stateful.items()}
            on_checkpoint(
                {"epoch": epoch + 1, **state, "generator": generator.get_state(), "epoch_losses": list(epoch_losses)}
            )
    return epoch_losses


_IGNORED_PREFIXES = ("module.", "backbone.", "encoder.", "model.")


def import_encoder_state(encoder: nn.Module, checkpoint: Path) -> None:
    """Load an external encoder checkpoint (usually a ResNet-18 (torchvision names; a ``state_dict``/``model`` entry, common
    wrapper prefixes and classifier/projector keys are handled); a mismatch is an error, never partial."""
    if not checkpoint.is_file():
        raise SslkdError(f"teacher checkpoint not found: {checkpoint}")
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as error:
        raise SslkdError(f"cannot read teacher checkpoint {checkpoint}: {type(error).__name__}") from None
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SslkdError(f"{checkpoint} holds no state dict")
    cleaned = {}
    for name, value in state.items():
        for prefix in _IGNORED_PREFIXES:
            name = name.removeprefix(prefix)
        if not name.startswith(("fc.", "projector.", "head.")):
            cleaned[name] = value
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(cleaned))
    unexpected = sorted(set(cleaned) - set(expected))
    wrong = [n for n in expected if n in cleaned and tuple(cleaned[n].shape) != tuple(expected[n].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{what}: {', '.join(names[:3])}{' …' if len(names) > 3 else ''}"
            for what, names in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong))
            if names
        )
        raise SslkdError(f"{checkpoint} does not fit the configured {type(encoder).__name__}: {detail}")
    encoder.load_state_dict(cleaned)


@torch.no_grad()
def representations(encoder: nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Teacher representations in eval mode, no augmentation: images [N, C, H, W] (normalised, on any
    device; moved to the encoder's batch by batch) -> [N, D] on the CPU."""
    encoder.eval()
    device = next(encoder.parameters()).device
    return torch.cat([encoder(images[i : i + batch_size].to(device)).cpu() for i in range(0, len(images), batch_size)])
