"""Trajectory matching (MTT, Cazenavette et al. 2022) on KD trajectories: learn synthetic images,
their target representations and the inner learning rate so that a few SGD steps on the synthetic set
move a student as far along an expert trajectory as ``expert_epochs`` epochs on the real data did.

The inner learning rate α is kept positive by projection: after every optimiser step it is clamped
to ``lr_min`` (> 0), i.e. projected SGD on [lr_min, ∞), which leaves the paper's update unchanged
whenever α stays above the floor. A non-finite matching loss stops the run with an error instead of
writing NaNs. How the gradients reach X, Y and α through the inner steps (the exact constant-memory
adjoint, or the full autograd unroll) is sslkd/methods/unroll.py's business.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from sslkd.data.augmentations import DSAConfig, draw_dsa
from sslkd.errors import SslkdError
from sslkd.losses import trajectory_matching_loss
from sslkd.methods.kd_steps import KDSteps
from sslkd.methods.unroll import UNROLLS, Snapshots, check_snapshots, match_trajectory, sgd_steps
from sslkd.models import ConvNet, ParameterLayout
from sslkd.progress import track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    """Trajectory-matching hyperparameters (docs/method.md's table names in brackets).

    iterations: outer steps; syn_steps [syn_steps]: unrolled inner SGD steps N; expert_epochs: the
    target is the snapshot this many epochs after the start; max_start_epoch: start epochs are drawn from
    {min_start_epoch, …, max_start_epoch − 1}; batch_syn: synthetic minibatch per inner step; lr_images / momentum_images,
    lr_representations / momentum_representations, lr_lr / momentum_lr: the three SGD optimisers;
    lr_init: initial inner lr α; lr_min: floor that keeps α positive; learn_representations: False freezes
    the targets at their initial (teacher) values; unroll: how gradients reach X, Y, α through the inner
    steps (``adjoint``: exact, memory independent of syn_steps; ``full``: the autograd reference, see
    sslkd/methods/unroll.py); adjoint_snapshots: which inner-step snapshots the adjoint keeps (``all``: the N
    snapshots, fastest; ``sqrt``: every ⌈√N⌉-th, recomputing the others segment by segment in the
    backward sweep — bit-identical gradients, ≈ 2√N snapshots alive instead of N, for fewer than N extra
    inner SGD steps; a number K: at most K snapshots alive whatever N, for N − K recomputed steps; ignored
    by the full unroll); compile: torch.compile the adjoint's inner step and
    gradient-of-gradient once per run (the full unroll is always eager); seeds: one synthetic set per seed;
    augment: differentiable augmentation of every inner step's minibatch (DSA, MTT's; None: none);
    held_out_experts: the last this many experts are never matched: distillation reports the set's matching
    loss on their trajectories (:func:`validation_matching_loss`) beside the trained experts', a check of
    whether the set learnt the trajectories' common direction or only the experts it saw; min_start_epoch:
    the earliest start epoch (0: MTT's and the paper's); a later one matches only the stretch of the
    trajectories that leads past what a random real set teaches (docs/distillation.md).
    """

    iterations: int
    syn_steps: int
    expert_epochs: int
    max_start_epoch: int
    batch_syn: int
    lr_images: float
    momentum_images: float
    lr_representations: float
    momentum_representations: float
    lr_lr: float
    momentum_lr: float
    lr_init: float
    lr_min: float
    learn_representations: bool
    unroll: str
    adjoint_snapshots: Snapshots
    compile: bool
    seeds: tuple[int, ...]
    augment: DSAConfig | None = None
    held_out_experts: int = 0
    min_start_epoch: int = 0

    def __post_init__(self) -> None:
        if self.unroll not in UNROLLS:
            raise SslkdError(f"unknown unroll {self.unroll!r}; choose one of {', '.join(UNROLLS)}")
        check_snapshots(self.adjoint_snapshots, self.syn_steps)
        if min(self.iterations, self.syn_steps, self.expert_epochs, self.max_start_epoch, self.batch_syn) < 1:
            raise SslkdError("iterations, syn_steps, expert_epochs, max_start_epoch and batch_syn must be >= 1")
        if not 0 < self.lr_min <= self.lr_init:
            raise SslkdError(f"need 0 < lr_min <= lr_init, got lr_min={self.lr_min}, lr_init={self.lr_init}")
        if min(self.lr_images, self.lr_representations, self.lr_lr) < 0:
            raise SslkdError(
                f"distill needs lr_images, lr_representations, lr_lr >= 0 (0 freezes), got "
                f"{self.lr_images}, {self.lr_representations}, {self.lr_lr}"
            )
        momenta = (self.momentum_images, self.momentum_representations, self.momentum_lr)
        if not all(0 <= momentum < 1 for momentum in momenta):
            raise SslkdError(
                f"distill's momentum_images, momentum_representations and momentum_lr must lie in "
                f"[0, 1), got {', '.join(map(str, momenta))}"
            )
        if not self.seeds:
            raise SslkdError("distill.seeds must name at least one seed")
        if not 0 <= self.min_start_epoch < self.max_start_epoch:
            raise SslkdError(
                f"distill needs 0 <= min_start_epoch < max_start_epoch, got {self.min_start_epoch} and "
                f"{self.max_start_epoch}"
            )
        if self.held_out_experts < 0:
            raise SslkdError(f"distill.held_out_experts must be >= 0, got {self.held_out_experts}")

    @property
    def epochs_needed(self) -> int:
        """The last expert epoch distillation reads."""
        return self.max_start_epoch - 1 + self.expert_epochs


@dataclass
class DistillResult:
    """images [M, C, H, W], representations [M, D], lr: the learned α; per-iteration history."""

    images: torch.Tensor
    representations: torch.Tensor
    lr: float
    matching_losses: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    # {"trained" | "held_out": [(iterations done, validation matching loss), ...]}: at the start, every
    # tenth of the run (held-out experts only) and at the end
    validation: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


class MinibatchSampler:
    """Minibatches of indices into [0, size): successive chunks of seeded permutations (each example
    once per pass), as the upstream MTT code samples the synthetic set."""

    def __init__(self, size: int, batch: int, generator: torch.Generator) -> None:
        self.size, self.batch, self.generator = size, min(batch, size), generator
        self.pending = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        if len(self.pending) < self.batch:
            self.pending = torch.cat([self.pending, torch.randperm(self.size, generator=self.generator)])
        batch, self.pending = self.pending[: self.batch], self.pending[self.batch :]
        return batch


def sample_segment(
    trajectory: torch.Tensor, config: DistillConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(θ₀, θ*) = (snapshot t, snapshot t + expert_epochs), t uniform in {min_start_epoch, …, max_start_epoch − 1}.

    trajectory: [S, P] with S > epochs_needed (may be memory-mapped: only these two rows are read).
    """
    start_epoch = int(torch.randint(config.min_start_epoch, config.max_start_epoch, (1,), generator=generator))
    return trajectory[start_epoch].float(), trajectory[start_epoch + config.expert_epochs].float()


def expert_order(num_experts: int, iterations: int, generator: torch.Generator) -> list[int]:
    """Which expert each iteration matches: every expert once per pass, passes in seeded random order."""
    order: list[int] = []
    while len(order) < iterations:
        order += torch.randperm(num_experts, generator=generator).tolist()
    return order[:iterations]


def _restore(
    state: dict[str, Any],
    images: torch.Tensor,
    representations: torch.Tensor,
    lr: torch.Tensor,
    optimisers: list[torch.optim.Optimizer],
    sampler: MinibatchSampler,
    generator: torch.Generator,
    result: DistillResult,
) -> tuple[list[int], int]:
    """Load a checkpointed state into the run's tensors, optimisers, sampler and generator; returns
    (expert order, next iteration)."""
    with torch.no_grad():
        images.copy_(state["images"])
        representations.copy_(state["representations"])
        lr.copy_(state["lr"])
    for optimiser, optimiser_state in zip(optimisers, state["optimisers"], strict=True):
        optimiser.load_state_dict(optimiser_state)
    sampler.pending = state["sampler"]
    generator.set_state(state["generator"])
    result.matching_losses = list(state["matching_losses"])
    result.learning_rates = list(state["learning_rates"])
    result.validation = {name: [tuple(point) for point in points] for name, points in state["validation"].items()}
    log.info("distill: resuming after iteration %d", state["iteration"])
    return list(state["order"]), state["iteration"]


def check_trajectories(trajectories: torch.Tensor, layout: ParameterLayout, config: DistillConfig) -> None:
    """trajectories [K, S, P] must reach epoch ``config.epochs_needed``, hold the student's P parameters and
    leave at least one expert to match besides the held-out ones."""
    if config.held_out_experts >= len(trajectories):
        raise SslkdError(
            f"distill.held_out_experts = {config.held_out_experts} leaves none of the {len(trajectories)} experts "
            "to match: hold out fewer or train more experts"
        )
    if trajectories.shape[1] <= config.epochs_needed:
        raise SslkdError(
            f"experts store {trajectories.shape[1] - 1} epochs; distillation reads up to epoch "
            f"{config.epochs_needed} (max_start_epoch - 1 + expert_epochs): train experts longer"
        )
    if trajectories.shape[2] != layout.numel:
        raise SslkdError(f"trajectories hold {trajectories.shape[2]} parameters, the student has {layout.numel}")


def make_optimisers(
    images: torch.Tensor, representations: torch.Tensor, lr: torch.Tensor, config: DistillConfig
) -> list[torch.optim.Optimizer]:
    """SGD with momentum on the images, on the inner learning rate α and, if learnt, on the representations."""
    optimisers: list[torch.optim.Optimizer] = [
        torch.optim.SGD([images], lr=config.lr_images, momentum=config.momentum_images),
        torch.optim.SGD([lr], lr=config.lr_lr, momentum=config.momentum_lr),
    ]
    if config.learn_representations:
        optimisers.append(
            torch.optim.SGD([representations], lr=config.lr_representations, momentum=config.momentum_representations)
        )
    return optimisers


def checkpoint_state(
    iteration: int,
    order: list[int],
    images: torch.Tensor,
    representations: torch.Tensor,
    lr: torch.Tensor,
    optimisers: list[torch.optim.Optimizer],
    sampler: MinibatchSampler,
    generator: torch.Generator,
    result: DistillResult,
) -> dict[str, Any]:
    """Everything ``distill(resume=...)`` needs to continue at ``iteration`` bit-identically."""
    return {
        "iteration": iteration,
        "order": order,
        "images": images.detach(),
        "representations": representations.detach(),
        "lr": lr.detach(),
        "optimisers": [optimiser.state_dict() for optimiser in optimisers],
        "sampler": sampler.pending,
        "generator": generator.get_state(),
        "matching_losses": list(result.matching_losses),
        "learning_rates": list(result.learning_rates),
        "validation": {name: list(points) for name, points in result.validation.items()},
    }


VALIDATION_SEED = 0  # the minibatches of every validation unroll: the same at every check, whatever the run
VALIDATION_STARTS = 5  # at most this many start epochs per expert in a validation check


def validation_start_epochs(config: DistillConfig) -> list[int]:
    """The start epochs a validation check unrolls from: at most VALIDATION_STARTS, evenly spread over
    the ones distillation draws from, both ends included."""
    low, high = config.min_start_epoch, config.max_start_epoch - 1
    count = min(VALIDATION_STARTS, high - low + 1)
    return sorted({round(low + (high - low) * i / max(count - 1, 1)) for i in range(count)})


def validation_matching_loss(
    steps: KDSteps,
    trajectories: torch.Tensor,
    images: torch.Tensor,
    representations: torch.Tensor,
    lr: torch.Tensor,
    config: DistillConfig,
) -> float:
    """The set's matching loss on given experts, without gradients: the mean over experts (trajectories
    [K, S, P]) and VALIDATION_STARTS start epochs t spread evenly over {min_start_epoch, …, max_start_epoch − 1}
    of ‖θ_N − θ*‖² / ‖θ₀ − θ*‖², each unrolled for
    syn_steps plain SGD steps at α = ``lr`` on minibatches that depend only on VALIDATION_SEED (no augmentation),
    so that two checks of one run, or of two runs, unroll the same steps. images [M, C, H, W],
    representations [M, D]."""
    generator = torch.Generator().manual_seed(VALIDATION_SEED)
    sampler = MinibatchSampler(len(images), config.batch_syn, generator)
    data, targets, alpha = images.detach(), representations.detach(), lr.detach()
    losses = []
    for trajectory in trajectories:
        for start_epoch in validation_start_epochs(config):
            start = trajectory[start_epoch].float().to(images.device)
            target = trajectory[start_epoch + config.expert_epochs].float().to(images.device)
            batches = [sampler.next().to(images.device) for _ in range(config.syn_steps)]
            end = sgd_steps(steps, start, data, targets, alpha, batches, [None] * len(batches))[-1]
            losses.append(trajectory_matching_loss(end, start, target).item())
    return sum(losses) / len(losses)


def distill(
    student: ConvNet,
    layout: ParameterLayout,
    trajectories: torch.Tensor,
    init_images: torch.Tensor,
    init_representations: torch.Tensor,
    config: DistillConfig,
    generator: torch.Generator,
    on_iteration: Callable[[int, float, float], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    target_loss: str = "mse",
) -> DistillResult:
    """Learn a synthetic set by matching expert trajectories.

    trajectories: [K, S, P] flat expert snapshots (S > config.epochs_needed); init_images [M, C, H, W];
    init_representations [M, D]. ``on_iteration(iteration, matching_loss, lr)`` is called after each step,
    ``on_checkpoint(state)`` with the whole state (synthetic set, α, optimiser momenta, generator, sampler,
    expert order, history); passing such a state as ``resume`` continues bit-identically. ``target_loss``:
    the loss the inner steps train with, as the experts did (MSE on representations: MKDT; losses.TARGET_LOSSES).
    """
    check_trajectories(trajectories, layout, config)
    trained = trajectories[: len(trajectories) - config.held_out_experts]
    held_out = trajectories[len(trajectories) - config.held_out_experts :]
    images = init_images.detach().clone().requires_grad_(True)
    representations = init_representations.detach().clone().requires_grad_(config.learn_representations)
    lr = torch.tensor(config.lr_init, device=images.device).requires_grad_(True)
    optimisers = make_optimisers(images, representations, lr, config)
    steps = KDSteps(student, layout, compile=config.compile, target_loss=target_loss)
    sampler = MinibatchSampler(len(images), config.batch_syn, generator)
    result = DistillResult(images, representations, config.lr_init)
    first = 0

    def validate(iteration: int, on_trained: bool) -> None:
        parts = {"held_out": held_out} if len(held_out) else {}
        if on_trained:
            parts["trained"] = trained
        for name, experts in parts.items():
            loss = validation_matching_loss(steps, experts, images, representations, lr, config)
            result.validation.setdefault(name, []).append((iteration, loss))
            log.info("distill: matching loss on the %s experts after %d iterations: %.4f", name, iteration, loss)

    if resume is None:
        order = expert_order(len(trained), config.iterations, generator)
        validate(0, on_trained=len(held_out) > 0)
    else:
        order, first = _restore(resume, images, representations, lr, optimisers, sampler, generator, result)
    progress = track(order[first:], desc="distill")
    for iteration, expert in enumerate(progress, start=first):
        start, target = (theta.to(images.device) for theta in sample_segment(trained[expert], config, generator))
        batches = [sampler.next().to(images.device) for _ in range(config.syn_steps)]
        augmentations = None
        if config.augment is not None:
            augmentations = [draw_dsa((len(b), *images.shape[1:]), config.augment, generator) for b in batches]
        for optimiser in optimisers:
            optimiser.zero_grad(set_to_none=True)
        loss = match_trajectory(
            config.unroll,
            steps,
            start,
            target,
            images,
            representations,
            lr,
            batches,
            config.adjoint_snapshots,
            augmentations,
        )
        if not torch.isfinite(loss):
            raise SslkdError(
                f"matching loss became {loss.item()} at iteration {iteration}: lower distill.lr_images or lr_lr"
            )
        for optimiser in optimisers:
            optimiser.step()
        with torch.no_grad():
            lr.clamp_(min=config.lr_min)
        result.matching_losses.append(loss.item())
        result.learning_rates.append(lr.item())
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr.item():.4f}")
        if on_iteration is not None:
            on_iteration(iteration, loss.item(), lr.item())
        done = iteration + 1
        if len(held_out) and done % max(1, config.iterations // 10) == 0 and done < config.iterations:
            validate(done, on_trained=False)  # the last check, at the end, covers the trained experts too
        if on_checkpoint is not None:
            on_checkpoint(
                checkpoint_state(
                    iteration + 1, order, images, representations, lr, optimisers, sampler, generator, result
                )
            )
    if len(held_out):
        validate(config.iterations, on_trained=True)
    result.images = images.detach()
    result.representations = representations.detach()
    result.lr = lr.item()
    return result
