"""KRR-ST (Lee, Lee and Hwang, "Self-Supervised Dataset Distillation for Transfer Learning", ICLR 2024),
written from the paper's description: learn M synthetic images X_s and target representations Y_s so
that a kernel ridge regression fitted on (f(X_s), Y_s) predicts the teacher's representations of real
images, with f drawn from a pool of feature extractors that are themselves trained on (X_s, Y_s).

One outer step: draw a model of the pool; with its trunk features (a ones column appended) of X_s and of
an augmented real batch x_r, predict Ŷ_r = K_rs (K_ss + λI)⁻¹ Y_s (λ = ridge · tr(K_ss), held constant
for the gradient); the loss MSE(Ŷ_r, teacher(x_r)) moves X_s and Y_s (AdamW, linearly decayed lr); then
the drawn model takes one SGD step of MSE regression of Y_s on X_s, or is re-initialised once it has
taken ``model_steps`` steps.

The pool's step counters start at random values, so models are re-initialised at staggered times. The
upstream code never resets a counter when it re-initialises a model: once a counter has passed the budget
(after about pool_size × model_steps outer steps), its model is re-initialised at every draw and every
kernel comes from an untrained network. ``reset_step_counter=True`` (sslkd's default) resets it;
``False`` reproduces upstream.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from sslkd.data.augmentations import AugmentConfig, random_resized_crop
from sslkd.errors import SslkdError
from sslkd.methods.distill import MinibatchSampler
from sslkd.methods.selection import InitConfig
from sslkd.models import ConvNet, ConvNetConfig
from sslkd.progress import track

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KrrStConfig:
    """KRR-ST's hyperparameters (docs/baselines.md).

    student: the pool's architecture (the kernel uses its trunk features, its head regresses Y_s);
    init: its size M and seed give the starting real subset, the init stage's random one; augment: the
    real batch's random resized crop and flip (colour settings unused); iterations: outer steps;
    batch_real: real images per outer step; lr_images / lr_representations / weight_decay: AdamW on X_s and
    Y_s, both lrs decayed linearly to 0; ridge: λ = ridge · tr(K_ss); pool_size: models in the pool;
    model_steps: SGD steps a model takes before it is re-initialised; model_lr / model_momentum /
    model_weight_decay: the pool's SGD; reset_step_counter: reset a model's counter when it is
    re-initialised (False: upstream's behaviour); seeds: one synthetic set per seed.
    """

    student: ConvNetConfig
    init: InitConfig
    augment: AugmentConfig
    iterations: int
    batch_real: int
    lr_images: float
    lr_representations: float
    weight_decay: float
    ridge: float
    pool_size: int
    model_steps: int
    model_lr: float
    model_momentum: float
    model_weight_decay: float
    reset_step_counter: bool
    seeds: tuple[int, ...]

    def __post_init__(self) -> None:
        if min(self.iterations, self.batch_real, self.pool_size, self.model_steps) < 1:
            raise SslkdError("krr_st needs iterations, batch_real, pool_size and model_steps >= 1")
        if min(self.lr_images, self.lr_representations, self.weight_decay, self.model_weight_decay) < 0:
            raise SslkdError("krr_st needs lr_images, lr_representations, weight_decay, model_weight_decay >= 0")
        if self.ridge <= 0 or self.model_lr <= 0 or not 0 <= self.model_momentum < 1:
            raise SslkdError(
                f"krr_st needs ridge > 0, model_lr > 0 and model_momentum in [0, 1), got "
                f"{self.ridge}, {self.model_lr}, {self.model_momentum}"
            )
        if not self.seeds:
            raise SslkdError("krr_st.seeds must name at least one seed")


def with_bias(features: torch.Tensor) -> torch.Tensor:
    """features [B, F] -> [B, F + 1], a column of ones appended."""
    return torch.cat([features, torch.ones_like(features[:, :1])], dim=1)


def krr_predict(
    features_real: torch.Tensor, features_syn: torch.Tensor, targets_syn: torch.Tensor, ridge: float
) -> torch.Tensor:
    """Kernel ridge regression of targets_syn [M, D] on features_syn [M, F], evaluated at features_real
    [B, F]: K_rs (K_ss + λI)⁻¹ Y_s [B, D] with the linear kernel of the features with a bias column and
    λ = ridge · tr(K_ss) (detached: a constant for the gradient)."""
    syn, real = with_bias(features_syn), with_bias(features_real)
    kernel_ss = syn @ syn.T
    kernel_rs = real @ syn.T
    regulariser = ridge * torch.trace(kernel_ss).detach()
    eye = torch.eye(len(syn), dtype=syn.dtype, device=syn.device)
    return kernel_rs @ torch.linalg.solve(kernel_ss + regulariser * eye, targets_syn)


def krr_loss(
    model: ConvNet,
    images: torch.Tensor,
    targets: torch.Tensor,
    real: torch.Tensor,
    real_targets: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """MSE between the teacher's real_targets [B, D] and their KRR prediction from (images [M, C, H, W],
    targets [M, D]) through ``model``'s trunk features; differentiable in images and targets."""
    with torch.no_grad():
        features_real = model.features(real)
    return F.mse_loss(krr_predict(features_real, model.features(images), targets, ridge), real_targets)


def augment_real(pixels: torch.Tensor, augment: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """The real batch's augmentation: random resized crop and (if ``augment.flip``) flip of pixels
    [B, C, H, W] in [0, 1]."""
    return random_resized_crop(pixels, augment, generator)


class ModelPool:
    """``size`` models built by ``build(seed)`` (seeds drawn from ``generator``) on ``device``, each with its SGD
    optimiser, a step counter started uniformly in {0, …, budget − 1} and the number of steps it has
    trained since its last (re-)initialisation."""

    def __init__(
        self,
        build: Callable[[int], ConvNet],
        size: int,
        budget: int,
        make_optimiser: Callable[[ConvNet], torch.optim.Optimizer],
        reset_step_counter: bool,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> None:
        self.build, self.budget, self.make_optimiser = build, budget, make_optimiser
        self.reset_step_counter, self.generator, self.device = reset_step_counter, generator, torch.device(device)
        self.models = [self._fresh() for _ in range(size)]
        self.optimisers = [make_optimiser(model) for model in self.models]
        self.counters = torch.randint(budget, (size,), generator=generator).tolist()
        self.trained = [0] * size

    def _fresh(self) -> ConvNet:
        return self.build(int(torch.randint(2**62, (1,), generator=self.generator))).to(self.device)

    def draw(self) -> int:
        return int(torch.randint(len(self.models), (1,), generator=self.generator))

    def reinitialise(self, index: int) -> None:
        self.models[index] = self._fresh()
        self.optimisers[index] = self.make_optimiser(self.models[index])
        self.trained[index] = 0
        if self.reset_step_counter:
            self.counters[index] = 0

    def advance(self, index: int, images: torch.Tensor, targets: torch.Tensor) -> None:
        """After model ``index`` served a kernel: re-initialise it if its counter has reached the budget,
        else one SGD step of MSE regression of targets [M, D] on images [M, C, H, W] (both detached)."""
        if self.counters[index] >= self.budget:
            self.reinitialise(index)
            return
        model, optimiser = self.models[index], self.optimisers[index]
        optimiser.zero_grad(set_to_none=True)
        F.mse_loss(model(images.detach()), targets.detach()).backward()
        optimiser.step()
        self.counters[index] += 1
        self.trained[index] += 1

    def state(self) -> dict[str, Any]:
        return {
            "models": [model.state_dict() for model in self.models],
            "optimisers": [optimiser.state_dict() for optimiser in self.optimisers],
            "counters": list(self.counters),
            "trained": list(self.trained),
            "generator": self.generator.get_state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        for model, optimiser, model_state, optimiser_state in zip(
            self.models, self.optimisers, state["models"], state["optimisers"], strict=True
        ):
            model.load_state_dict(model_state)
            optimiser.load_state_dict(optimiser_state)
        self.counters, self.trained = list(state["counters"]), list(state["trained"])
        self.generator.set_state(state["generator"])


@dataclass
class KrrStResult:
    """images [M, C, H, W], representations [M, D]; per outer step: the loss and how many SGD steps the
    drawn model had taken since its initialisation (0: an untrained network's kernel)."""

    images: torch.Tensor
    representations: torch.Tensor
    losses: list[float] = field(default_factory=list)
    model_steps: list[int] = field(default_factory=list)


def make_pool(
    build: Callable[[int], ConvNet], config: KrrStConfig, generator: torch.Generator, device: torch.device
) -> ModelPool:
    """The config's pool of models on ``device``, SGD with the config's model_* settings."""

    def optimiser(model: ConvNet) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            model.parameters(),
            lr=config.model_lr,
            momentum=config.model_momentum,
            weight_decay=config.model_weight_decay,
        )

    return ModelPool(
        build, config.pool_size, config.model_steps, optimiser, config.reset_step_counter, generator, device
    )


def outer_step(
    model: ConvNet,
    images: torch.Tensor,
    targets: torch.Tensor,
    real: tuple[torch.Tensor, torch.Tensor],
    ridge: float,
    optimiser: torch.optim.Optimizer,
) -> float:
    """One outer step on (X_s, Y_s): the KRR loss of predicting the real batch's targets through ``model``'s
    kernel (``real``: images [B, C, H, W], teacher representations [B, D]), its gradient to X_s and Y_s only
    (not to the model), and the optimiser's step. Returns the loss (the step is skipped when it is not
    finite: the caller stops)."""
    loss = krr_loss(model, images, targets, real[0], real[1], ridge)
    if not torch.isfinite(loss):
        return loss.item()
    optimiser.zero_grad(set_to_none=True)
    images.grad, targets.grad = torch.autograd.grad(loss, [images, targets])
    optimiser.step()
    return loss.item()


def training_state(
    iteration: int,
    result: KrrStResult,
    optimisation: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
    pool: ModelPool,
    sampler: MinibatchSampler,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Everything a resume needs after ``iteration`` outer steps: X_s and Y_s (``result``'s, live), the
    optimiser and its schedule, the pool, the batch order and the generator, the curves so far."""
    optimiser, schedule = optimisation
    return {
        "iteration": iteration,
        "images": result.images.detach(),
        "representations": result.representations.detach(),
        "optimiser": optimiser.state_dict(),
        "schedule": schedule.state_dict(),
        "pool": pool.state(),
        "sampler": sampler.pending,
        "generator": generator.get_state(),
        "losses": list(result.losses),
        "model_steps": list(result.model_steps),
    }


def distill_krr_st(
    build: Callable[[int], ConvNet],
    init_images: torch.Tensor,
    init_representations: torch.Tensor,
    real_pixels: torch.Tensor,
    to_student: Callable[[torch.Tensor], torch.Tensor],
    teacher: Callable[[torch.Tensor], torch.Tensor],
    config: KrrStConfig,
    generator: torch.Generator,
    pool_generator: torch.Generator,
    on_iteration: Callable[[int, float], None] | None = None,
    resume: dict[str, Any] | None = None,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> KrrStResult:
    """Learn (X_s, Y_s) from init_images [M, C, H, W] (in the students' input space) and
    init_representations [M, D].

    real_pixels [N, C, H, W] in [0, 1]: the real images batches are drawn from; ``to_student`` maps pixels
    to the students' input space, ``teacher`` pixels to the teacher's representations [B, D] (no gradient).
    ``build(seed)`` makes a pool model. ``generator`` draws batches and augmentations, ``pool_generator`` the
    pool's models, draws and counters. ``on_checkpoint(state)`` gets the whole state after each step;
    passing it back as ``resume`` continues bit-identically.
    """
    device = init_images.device
    images = init_images.detach().clone().requires_grad_(True)
    targets = init_representations.detach().clone().requires_grad_(True)
    optimiser = torch.optim.AdamW(
        [{"params": [images], "lr": config.lr_images}, {"params": [targets], "lr": config.lr_representations}],
        weight_decay=config.weight_decay,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0 - step / config.iterations)
    pool = make_pool(build, config, pool_generator, device)
    sampler = MinibatchSampler(len(real_pixels), config.batch_real, generator)
    result = KrrStResult(images, targets)
    first = 0
    if resume is not None:
        with torch.no_grad():
            images.copy_(resume["images"])
            targets.copy_(resume["representations"])
        for part, name in ((optimiser, "optimiser"), (schedule, "schedule")):
            part.load_state_dict(resume[name])
        pool.restore(resume["pool"])
        sampler.pending = resume["sampler"]
        generator.set_state(resume["generator"])
        result.losses, result.model_steps = list(resume["losses"]), list(resume["model_steps"])
        first = resume["iteration"]
        log.info("krr_st: resuming after iteration %d", first)
    progress = track(range(first, config.iterations), desc="krr_st")
    for iteration in progress:
        pixels = augment_real(real_pixels[sampler.next()].to(device), config.augment, generator)
        real = to_student(pixels)
        real_targets = teacher(pixels)
        index = pool.draw()
        loss = outer_step(pool.models[index], images, targets, (real, real_targets), config.ridge, optimiser)
        if not math.isfinite(loss):
            raise SslkdError(f"krr_st loss became {loss} at iteration {iteration}: lower krr_st.lr_images")
        schedule.step()
        result.losses.append(loss)
        result.model_steps.append(pool.trained[index])
        pool.advance(index, images, targets)
        progress.set_postfix(loss=f"{loss:.4f}")
        if on_iteration is not None:
            on_iteration(iteration, loss)
        if on_checkpoint is not None:
            on_checkpoint(training_state(iteration + 1, result, (optimiser, schedule), pool, sampler, generator))
    result.images, result.representations = images.detach(), targets.detach()
    return result
